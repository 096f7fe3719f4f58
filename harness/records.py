"""The Record schema and the append-only JSONL store.

One JSON object per case per run. Appended and flushed (and fsynced) record by record, so an interrupted run keeps
everything measured so far; the loader merges many files and survives a truncated last line.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

from harness.errors import UserError

SCHEMA_VERSION = 3
# versions the loader reads: older records are upgraded in memory (upgrade()), so baselines kept for months still
# load and compare
READABLE_SCHEMAS = (1, 2, 3)
# over_budget: measured and correct, but above the run's --memory-budget (an answer, not a failure)
STATUSES = ("passed", "failed", "unsupported", "over_budget", "error", "interrupted")
# fields every record must carry (the loader refuses files without them)
REQUIRED = ("schema", "run_id", "case_id", "model", "backend", "variant", "dtype", "batch", "height", "width",
            "steps", "status")


@dataclass
class Record:
    run_id: str
    case_id: str
    model: str
    backend: str
    variant: str
    dtype: str
    batch: int
    height: int
    width: int
    steps: int
    status: str = "passed"            # passed | failed | unsupported | over_budget | error | interrupted
    reason: str = ""                  # why not passed: "<ErrorClass>: message" or the unsupported reason
    error_class: str = ""             # e.g. OutOfMemoryError, TimeoutError, ParityError, NaNError
    device: str = "cpu"
    stages: dict[str, dict] = field(default_factory=dict)   # stage -> {p50, p90, p99, mean, std, min, max, n}
    e2e: dict = field(default_factory=dict)                  # same stats, whole pipeline call
    samples: dict[str, list] = field(default_factory=dict)  # {"e2e": seconds of every measured call, in order}
    cold_s: float | None = None       # load + prepare + first call
    first_call_s: float | None = None
    build: dict[str, float] = field(default_factory=dict)   # step -> seconds (load, export, compile, engine...)
    memory: dict[str, Any] = field(default_factory=dict)    # {load, build, inference: {...}, peak_mb (headline)}
    energy: dict[str, Any] = field(default_factory=dict)    # GPU: joules_per_call, watts_mean, idle_watts
    budget: dict[str, Any] = field(default_factory=dict)    # --memory-budget: limit_mb, peak_mb, enforced (how)
    throughput: dict[str, Any] = field(default_factory=dict)  # text-embedding: per_s (embeddings/s), batch
    seq: int = 0                      # text-embedding: sequence length (height, width, steps are 0)
    parity: dict[str, Any] = field(default_factory=dict)    # {verdict, image: {...}, components: {...}}
    info: dict[str, Any] = field(default_factory=dict)      # backend facts (providers, exporter, graph breaks...)
    serving: dict[str, Any] = field(default_factory=dict)   # triton: sweep, server stats, metrics
    timing: dict[str, Any] = field(default_factory=dict)    # warmup, repeats, clock (cuda-events|perf_counter)
    paired: dict[str, Any] = field(default_factory=dict)    # A/B runs: the other side's run id, per-pair ratios
    env: dict[str, Any] = field(default_factory=dict)       # device fingerprint
    git: dict[str, Any] = field(default_factory=dict)
    prompt: list[str] = field(default_factory=list)
    seed: int | None = None
    image: str = ""                   # path of the saved output image (relative to the records file)
    notes: list[str] = field(default_factory=list)
    weights: dict[str, Any] = field(default_factory=dict)   # which weights ran: {source, repo, revision, commit...}
    findings: list[str] = field(default_factory=list)       # worth a look, not failures (e.g. integration cost)
    synthetic: bool = False           # made-up numbers (test fixtures, demos): the report says so in a banner
    timestamp: float = field(default_factory=time.time)
    schema: int = SCHEMA_VERSION

    @classmethod
    def for_case(cls, case, run_id: str, **kw) -> "Record":
        return cls(run_id=run_id, case_id=case.id, model=case.model, backend=case.backend, variant=case.variant,
                   dtype=case.dtype, batch=case.batch, height=case.height, width=case.width, steps=case.steps,
                   seq=case.seq, **kw)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Record":
        """A record read back (e.g. from a worker); keys this version does not know are dropped."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in upgrade(data).items() if k in names})


class RecordWriter:
    """Append-only JSONL; every record is flushed and fsynced before write() returns."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot write results to {self.path.parent}: {exc.strerror or exc}")

    def write(self, record: Record | dict) -> None:
        data = record.to_dict() if isinstance(record, Record) else record
        self._fh.write(json.dumps(data, default=_json_default, allow_nan=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def sanitize(value):
    """Replace NaN/Inf (not valid JSON) by None, recursively."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [sanitize(v) for v in value]
    return value


def upgrade(record: dict) -> dict:
    """A record of a readable older schema in today's shape (new fields at their defaults); the version it was
    written with stays in `schema_written`."""
    version = record.get("schema")
    if version == SCHEMA_VERSION:
        return record
    upgraded = dict(record)
    if version == 1:
        # v2 added: synthetic (False for every real run), energy, findings, and memory per phase (load, build,
        # inference); a v1 peak_mb was the whole case's peak (load and build included), kept as it was
        upgraded.setdefault("synthetic", False)
        upgraded.setdefault("energy", {})
        upgraded.setdefault("findings", [])
        upgraded.setdefault("budget", {})
        upgraded.setdefault("throughput", {})
        upgraded.setdefault("seq", 0)
    if version in (1, 2):
        # v3 added `weights` (what was loaded: hub repo and commit, tiny-model digest, LoRA adapters) and, inside
        # existing fields, memory.{isolated, cases_before, includes, weights_mb}, parity.vae_decode, energy.idle;
        # a record without memory.isolated was measured as its timing.isolated says (harness.measure.memory.isolated)
        upgraded.setdefault("weights", {})
    upgraded["schema_written"], upgraded["schema"] = version, SCHEMA_VERSION
    return upgraded


def check_schema(record: dict, where: str) -> None:
    if record.get("schema") not in READABLE_SCHEMAS:
        readable = ", ".join(map(str, READABLE_SCHEMAS))
        raise UserError(f"{where}: schema version {record.get('schema')} but this diffbench reads {readable}")


def read_records(path: str | Path, *, strict_schema: bool = True) -> list[dict]:
    """Records of one JSONL file. A truncated or corrupt LAST line is dropped with a warning; a corrupt line in
    the middle, an empty file, or an unreadable schema version is bad input (UserError). Records of an older
    readable schema are upgraded in memory."""
    p = Path(path)
    if p.is_dir():
        p = p / "records.jsonl"
    if not p.is_file():
        raise UserError(f"records file {p} does not exist")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read records file {p}: {exc}")
    records = []
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    for pos, (lineno, line) in enumerate(numbered):
        try:
            data = json.loads(line)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if pos == len(numbered) - 1:
                warnings.warn(f"{p}:{lineno}: truncated last record dropped ({exc})")
                continue
            raise UserError(f"{p}:{lineno}: not a JSON record ({exc})")
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise UserError(f"{p}:{lineno}: not a diffbench record (missing {', '.join(missing)})")
        if strict_schema:
            check_schema(data, f"{p}:{lineno}")
            data = upgrade(data)
        data.setdefault("_source", str(p))
        records.append(data)
    if not records:
        raise UserError(f"records file {p} holds no records")
    return records


def load_many(paths: Iterable[str | Path]) -> list[dict]:
    """Merge records from many files (e.g. one per GPU runner)."""
    merged: list[dict] = []
    for path in paths:
        merged.extend(read_records(path))
    if not merged:
        raise UserError("no records files given")
    return merged


def recorded_case_ids(path: str | Path) -> set[str]:
    """Case ids already in a run's records (for --resume); interrupted records do not count."""
    p = Path(path)
    if not p.exists():
        return set()
    try:
        return {r["case_id"] for r in read_records(p) if r.get("status") != "interrupted"}
    except UserError:
        return set()


def git_info(cwd: str | Path | None = None) -> dict[str, Any]:
    def run(*args):
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5)
            return out.stdout.strip() if out.returncode == 0 else ""
        except (OSError, subprocess.TimeoutExpired):
            return ""
    commit = run("rev-parse", "HEAD")
    return {"commit": commit, "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))} if commit else {}


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid() % 100000:05d}"
