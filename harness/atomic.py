"""Atomic cache entries: build in a temp folder beside the target, then rename, so a reader never sees half; and one
builder at a time per entry, so that processes sharing a cache (parallel test sessions, shards on one machine)
never replace an entry another one has just built and is reading."""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_folder(target: Path, prefix: str) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces `target`, on any failure it is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{prefix}-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def build_lock(target: Path) -> Iterator[None]:
    """Hold the entry's build lock (a file beside it). Check the entry again once inside: another process may have
    built it while this one waited."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
