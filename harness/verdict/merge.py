"""Merge the records of many runs (shards, runners) into one records file: every record once, with where it came from.

"Once" means one record per (run id, case id, device class). A copy of a record that is identical apart from where
it was read (the same shard given twice, an artifact downloaded twice) is dropped; two different records with the
same key (a resumed run re-recorded an interrupted case) keep the later one, by timestamp. The same case measured
in two runs on one device class (overlapping shards, a rerun) keeps both: they are different measurements; the
report and the gate read the latest, and the merge says how many there were.

Each kept record gains `merged_from` = {"file": the records file it was read from, "shard": "I/N" or null} (a record
merged again keeps its first provenance), and its image is copied to images/<run id>/ beside the merged file.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from harness.measure.device import device_class as _env_device_class
from harness.errors import UserError
from harness.records import read_records, sanitize

RECORDS_FILE = "records.jsonl"
# read-time fields that say where a record was read, not what it is
_WHERE = ("_source", "merged_from", "image")


@dataclass
class MergeResult:
    path: Path
    records: int = 0
    files: list[Path] = field(default_factory=list)
    empty: list[Path] = field(default_factory=list)       # empty shards: a run folder with no records
    duplicates: int = 0                                   # identical copies dropped
    superseded: int = 0                                   # same key, an earlier version dropped
    remeasured: int = 0                                   # (case, device class) pairs found in more than one run

    def summary(self) -> str:
        parts = [f"{self.records} record(s) from {len(self.files)} file(s)"]
        if self.empty:
            parts.append(f"{len(self.empty)} empty shard(s) skipped")
        if self.duplicates:
            parts.append(f"{self.duplicates} identical duplicate(s) dropped")
        if self.superseded:
            parts.append(f"{self.superseded} earlier version(s) of a record dropped")
        text = "merged " + "; ".join(parts)
        if self.remeasured:
            text += (f"\nwarning: {self.remeasured} case(s) were measured in more than one run on the same device "
                     f"class (overlapping shards or a rerun); the report and the gate use the latest")
        return text


def device_class(record: dict) -> str:
    env = record.get("env") or {}
    return _env_device_class(env) if env else "unknown device"


def records_files(paths, exclude: Path | None = None) -> list[Path]:
    """Records files named by `paths`: a records file, a run folder, or a folder holding run folders (searched
    recursively, as CI artifacts are downloaded). Files inside `exclude` (the merge's own output) are left out."""
    found: list[Path] = []
    for given in map(Path, paths):
        if given.is_file():
            candidates = [given]
        elif (given / RECORDS_FILE).is_file():
            candidates = [given / RECORDS_FILE]
        elif given.is_dir():
            candidates = sorted(given.rglob(RECORDS_FILE))
            if not candidates:
                raise UserError(f"no {RECORDS_FILE} under {given}")
        else:
            raise UserError(f"{given} does not exist")
        for path in candidates:
            resolved = path.resolve()
            if exclude is not None and resolved.is_relative_to(exclude.resolve()):
                continue
            if resolved not in {f.resolve() for f in found}:
                found.append(path)
    return found


def is_empty(path: Path) -> bool:
    """A records file without records: the run folder of an empty shard."""
    try:
        return not path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UserError(f"cannot read records file {path}: {exc.strerror or exc}")


def _content(record: dict) -> str:
    return json.dumps({k: v for k, v in record.items() if k not in _WHERE}, sort_keys=True, default=str)


def _copy_image(record: dict, out_dir: Path) -> str:
    """Copy the record's image beside the merged file; its new relative path, or "" when there is none."""
    if not record.get("image") or not record.get("_source"):
        return ""
    source = Path(record["_source"]).parent / record["image"]
    if not source.is_file():
        return ""
    run = re.sub(r"[^A-Za-z0-9._-]+", "_", str(record.get("run_id") or "run"))
    target = out_dir / "images" / run / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.resolve() != target.resolve():
        shutil.copyfile(source, target)
    return str(target.relative_to(out_dir))


def merge(paths, out_dir: str | Path) -> MergeResult:
    """Write out_dir/records.jsonl from the records under `paths`."""
    out_dir = Path(out_dir)
    result = MergeResult(out_dir / RECORDS_FILE)
    kept: dict[tuple, dict] = {}
    order: list[tuple] = []
    for path in records_files(paths, exclude=out_dir):
        if is_empty(path):
            result.empty.append(path)
            continue
        result.files.append(path)
        for record in read_records(path):
            key = (record.get("run_id", ""), record["case_id"], device_class(record))
            record.setdefault("merged_from", {"file": str(path), "shard": (record.get("env") or {}).get("shard")})
            if key not in kept:
                kept[key] = record
                order.append(key)
            elif _content(kept[key]) == _content(record):
                result.duplicates += 1
            else:
                result.superseded += 1
                if (record.get("timestamp") or 0) >= (kept[key].get("timestamp") or 0):
                    kept[key] = record
    if not kept:
        raise UserError("no records to merge: " + (f"every shard was empty ({len(result.empty)})" if result.empty
                                                   else "no records files given"))
    runs_per_case: dict[tuple, set] = {}
    for run_id, case_id, dev in order:
        runs_per_case.setdefault((case_id, dev), set()).add(run_id)
    result.remeasured = sum(len(runs) > 1 for runs in runs_per_case.values())
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lines = []
        for key in order:
            record = dict(kept[key])
            record["image"] = _copy_image(record, out_dir)
            record.pop("_source", None)
            lines.append(json.dumps(sanitize(record), allow_nan=False, default=str))
        # written whole, then renamed: a reader never sees half a merge
        fd, tmp = tempfile.mkstemp(prefix=".records-", suffix=".jsonl", dir=out_dir)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        os.replace(tmp, result.path)
    except OSError as exc:
        raise UserError(f"cannot write merged records to {out_dir}: {exc.strerror or exc}")
    result.records = len(order)
    return result
