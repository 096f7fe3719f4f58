"""Hugging Face hub ids (`ORG/NAME[@REVISION]`) resolved through the local Hugging Face cache only.

A benchmark never downloads: the snapshot is found with huggingface_hub's own cache lookup
(`snapshot_download(..., local_files_only=True)`, which honours HF_HOME / HF_HUB_CACHE), and a repository or
revision that is not cached is a one-line error naming the command that fetches it.

Inside a case id the repository is spelled as the cache spells its folder, `ORG--NAME` (`models--ORG--NAME`): the
id keeps its slash-separated shape, and the hub forbids `--` inside a name, so the spelling reads back unambiguously.
The revision is not part of the id (a baseline and a later run of a moved branch compare as the same case); it
travels to worker processes in the environment (REVISIONS_ENV), and the record names the resolved commit.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from harness.errors import UserError

REVISIONS_ENV = "DIFFBENCH_HUB_REVISIONS"   # {"ORG/NAME": "REVISION"} chosen for this run
DEFAULT_REVISION = "main"
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._]|-(?!-))*"          # a hub name part: no "--" inside (the hub forbids it)
_HUB_ID = re.compile(rf"(?P<org>{_PART})(?:/|--)(?P<name>{_PART})(?:@(?P<revision>[^\s@]+))?")


@dataclass(frozen=True)
class HubModel:
    repo: str            # ORG/NAME
    revision: str        # as asked: a branch, a tag or a commit hash
    commit: str          # the commit the cache resolved it to
    folder: Path         # the snapshot folder (symlinks into blobs/)

    @property
    def case_name(self) -> str:
        return case_name(self.repo)

    def record(self) -> dict:
        return {"source": "hub", "repo": self.repo, "revision": self.revision, "commit": self.commit}


def parse(name: str) -> tuple[str, str | None] | None:
    """("ORG/NAME", revision or None) for a hub id in either spelling (ORG/NAME or the case id's ORG--NAME), or None
    when `name` is not one."""
    m = _HUB_ID.fullmatch(name)
    if not m:
        return None
    return f"{m['org']}/{m['name']}", m["revision"]


def case_name(repo: str) -> str:
    """How a case id spells ORG/NAME: ORG--NAME, the cache's own spelling."""
    return repo.replace("/", "--")


def pinned_revisions() -> dict[str, str]:
    try:
        pins = json.loads(os.environ.get(REVISIONS_ENV) or "{}")
    except json.JSONDecodeError:
        raise UserError(f"{REVISIONS_ENV} is not valid JSON: {os.environ[REVISIONS_ENV][:80]!r}")
    return pins if isinstance(pins, dict) else {}


def pin(repo: str, revision: str) -> None:
    """Remember this run's revision of `repo` (in the environment: isolated and A/B workers inherit it). One
    revision per repository in a run: the revision is not part of the case id."""
    pins = pinned_revisions()
    if pins.get(repo, revision) != revision:
        raise UserError(f"conflicting revisions of {repo}: {pins[repo]} and {revision}; one revision per repository "
                        "in a run (the case id does not name the revision)")
    pins[repo] = revision
    os.environ[REVISIONS_ENV] = json.dumps(pins, sort_keys=True)


def resolve(name: str) -> HubModel:
    """The cached snapshot of a hub id; revision from the id, else this run's pin, else main."""
    repo, revision = parse(name) or (None, None)
    if repo is None:
        raise UserError(f"{name!r} is not a hub id (ORG/NAME[@REVISION])")
    return _resolve(repo, revision or pinned_revisions().get(repo) or DEFAULT_REVISION, _cache_dir())


def _cache_dir() -> str:
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE   # HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub


@lru_cache(maxsize=None)
def _resolve(repo: str, revision: str, cache_dir: str) -> HubModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    fetch = f"`hf download {repo} --revision {revision}`"
    try:
        folder = Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except IncompleteSnapshotError as exc:
        raise UserError(f"{repo}@{revision} is only partly in the Hugging Face cache {cache_dir} "
                        f"({str(exc).split(': ', 1)[-1].split('.')[0]}); complete it with {fetch} "
                        "(diffbench never downloads)")
    except LocalEntryNotFoundError:
        raise UserError(f"{repo}@{revision} is not in the Hugging Face cache {cache_dir}: fetch it with {fetch} "
                        "(diffbench never downloads; HF_HOME or HF_HUB_CACHE choose the cache)")
    return HubModel(repo, revision, folder.name, folder)
