"""Baselines: records files the gate compares a run with, saved from one or several runs."""
from __future__ import annotations

import json
from pathlib import Path

from harness.errors import UserError
from harness.verdict.gate import device_class
from harness.records import load_many, read_records, sanitize


def load_baseline(path: str | Path) -> list[dict]:
    """A baseline file (records JSONL); bad or foreign files are UserError."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"baseline {p} does not exist")
    try:
        return read_records(p)
    except UserError as exc:
        raise UserError(f"baseline: {exc}")


def save_baseline(records_paths, out_file: str | Path) -> Path:
    """Merge records files into one baseline JSONL: the latest record per (case id, device class, run id) -- so
    several runs give the gate their between-run spread -- without the image path (it is relative to the run
    folder and means nothing beside the baseline)."""
    if isinstance(records_paths, (str, Path)):
        records_paths = [records_paths]
    records = load_many(records_paths)
    out = Path(out_file)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as fh:
            latest = {(r["case_id"], device_class(r), r.get("run_id", "")): r
                      for r in sorted(records, key=lambda r: r.get("timestamp") or 0)}
            for r in latest.values():
                data = {k: v for k, v in r.items() if k != "_source"}
                data["image"] = ""
                fh.write(json.dumps(sanitize(data), allow_nan=False) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write baseline {out}: {exc.strerror or exc}")
    return out
