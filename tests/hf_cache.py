"""A real Hugging Face cache entry written from a local folder, offline, as huggingface_hub's own download writes it
(huggingface_hub/file_download.py, `_hf_hub_download_to_cache_dir` and `_create_symlink`):

    <cache>/models--ORG--NAME/blobs/<etag>                     the file's bytes, named by its etag: the sha256 of
                                                               an LFS file (weights), the git blob sha1 of others
    <cache>/models--ORG--NAME/snapshots/<commit>/<path>        a relative symlink to ../../blobs/<etag>
    <cache>/models--ORG--NAME/refs/<revision>                  the commit hash, no newline

Tests check it with huggingface_hub's scan_cache_dir (no warnings, the commit and refs read back).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from huggingface_hub.utils.sha import git_hash

LFS_SUFFIXES = (".safetensors", ".bin", ".onnx", ".pt")


def add_to_cache(cache: Path, repo: str, folder: Path, revision: str = "main", commit: str | None = None) -> str:
    """Put every file of `folder` into `cache` as snapshot `commit` of `repo`, with `refs/<revision>` naming it.
    Returns the commit hash (by default a hash of the files, so the same folder gives the same commit)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    etags = {}
    for path in files:
        data = path.read_bytes()
        etags[path] = hashlib.sha256(data).hexdigest() if path.suffix in LFS_SUFFIXES else git_hash(data)
    if commit is None:
        listing = "".join(f"{p.relative_to(folder)} {etags[p]}\n" for p in files)
        commit = hashlib.sha1(listing.encode()).hexdigest()
    storage = Path(cache) / f"models--{repo.replace('/', '--')}"
    for path in files:
        blob = storage / "blobs" / etags[path]
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(path, blob)
        pointer = storage / "snapshots" / commit / path.relative_to(folder)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        if not pointer.is_symlink():
            pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / revision).write_text(commit)
    return commit
