"""The history store: every run's records in one embedded SQLite file, for change detection across deploys.

    diffbench history add --history STORE RUN_DIR...        (or `--history STORE` on `run` / `ab`)
    diffbench history show --history STORE [--model M] [--backend B] [--case GLOB]
    diffbench history accept --history STORE RUN_ID [--note TEXT]

Each record is kept whole, as the JSON a run wrote (the records format stays the public format), beside the keys
a series is made of: case id, device class (harness.measure.device.device_class) and software stack (stack_of below). A
run added twice replaces its rows; a case re-run within one run keeps its latest record.

Two CI jobs may add at the same moment: the file is in WAL mode, every connection waits up to BUSY_TIMEOUT_S for
the write lock instead of failing, and each add is one `BEGIN IMMEDIATE` transaction (all of a run or nothing).
WAL needs a local file system (not NFS or SMB), as SQLite documents.

`accept` records an intended change: series that hold a record of that run start again at it, so the history
gate (harness/verdict/history_gate.py) judges later runs against the new level, not against the old one forever.
"""
from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from harness.measure.device import device_class
from harness.errors import UserError
from harness.records import load_many

BUSY_TIMEOUT_S = 60.0
STORE_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id     TEXT PRIMARY KEY,
    timestamp  REAL NOT NULL,        -- the run's first record
    git_commit TEXT NOT NULL,        -- "" when the run was not in a git checkout
    added      REAL NOT NULL,
    source     TEXT NOT NULL         -- the records file it was added from
);
CREATE TABLE IF NOT EXISTS records (
    run_id       TEXT NOT NULL REFERENCES runs(run_id),
    case_id      TEXT NOT NULL,
    device_class TEXT NOT NULL,
    stack        TEXT NOT NULL,
    timestamp    REAL NOT NULL,
    status       TEXT NOT NULL,
    record       TEXT NOT NULL,      -- the record, whole, as JSON
    PRIMARY KEY (run_id, case_id, device_class)
);
CREATE INDEX IF NOT EXISTS records_by_series ON records (case_id, device_class, stack, timestamp);
CREATE TABLE IF NOT EXISTS accepted (
    run_id   TEXT PRIMARY KEY,
    accepted REAL NOT NULL,
    note     TEXT NOT NULL
);
"""


def stack_of(record: dict) -> str:
    """The software stack a record was measured with: the library versions of its fingerprint, Python, and on a GPU
    the CUDA runtime. A change of any of them starts a new series instead of being read as a regression."""
    env = record.get("env") or {}
    parts = [f"{name} {version}" for name, version in sorted((env.get("versions") or {}).items()) if version]
    if env.get("python"):
        parts.append(f"python {'.'.join(str(env['python']).split('.')[:2])}")
    cuda = (env.get("gpu") or {}).get("cuda")
    if cuda:
        parts.append(f"cuda {cuda}")
    return ", ".join(parts) or "unknown stack"


@dataclass(frozen=True)
class Run:
    run_id: str
    timestamp: float
    git_commit: str
    records: int
    accepted: bool


class HistoryStore:
    """One SQLite file. Open with `HistoryStore(path)` (created when missing unless create=False)."""

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise UserError(f"history store {self.path} does not exist (add runs with: diffbench history add "
                            f"--history {self.path} RUN_DIR)")
        if self.path.is_dir():
            raise UserError(f"history store {self.path} is a folder; give a file path (e.g. history.sqlite)")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are ours (BEGIN IMMEDIATE), not the module's implicit ones
            self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            self.db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            self.db.execute("PRAGMA journal_mode = WAL")
            self._create()
        except sqlite3.OperationalError as exc:   # locked past the timeout, read-only, disk full
            raise UserError(f"history store {self.path}: {exc}")
        except sqlite3.DatabaseError as exc:
            raise UserError(f"history store {self.path}: not a diffbench history store ({exc})")
        except OSError as exc:
            raise UserError(f"cannot open history store {self.path}: {exc.strerror or exc}")

    def _create(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version == STORE_VERSION:
            return
        if version not in (0, STORE_VERSION):
            raise UserError(f"history store {self.path} has version {version}; this diffbench reads "
                            f"{STORE_VERSION}")
        with self._write():
            for statement in filter(str.strip, _SCHEMA.split(";")):   # executescript would COMMIT first
                self.db.execute(statement)
            self.db.execute(f"PRAGMA user_version = {STORE_VERSION}")

    def _write(self):
        return _Transaction(self.db)

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.close()

    # -- writing ---------------------------------------------------------------------------------------------
    def add(self, paths) -> list[tuple[str, int]]:
        """Add the runs in these records files or run folders; returns [(run id, records added)] per run."""
        records = load_many(paths)
        by_run: dict[str, list[dict]] = {}
        for r in sorted(records, key=lambda r: r.get("timestamp") or 0):
            by_run.setdefault(r["run_id"], []).append(r)
        added = []
        now = time.time()
        with self._write():
            for run_id, rows in by_run.items():
                commit = next((((r.get("git") or {}).get("commit")) for r in rows
                               if (r.get("git") or {}).get("commit")), "") or ""
                self.db.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?) ON CONFLICT(run_id) DO UPDATE SET "
                                "timestamp = min(timestamp, excluded.timestamp), git_commit = excluded.git_commit, "
                                "added = excluded.added, source = excluded.source",
                                (run_id, rows[0].get("timestamp") or now, commit, now, rows[0].get("_source", "")))
                for r in rows:   # oldest first: a case's later record replaces an earlier one
                    data = {k: v for k, v in r.items() if k != "_source"}
                    self.db.execute("INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?, ?, ?)",
                                    (run_id, r["case_id"], device_class(r.get("env") or {}) if r.get("env") else
                                     "unknown device", stack_of(r), r.get("timestamp") or now, r["status"],
                                     json.dumps(data, allow_nan=False)))
                added.append((run_id, len(rows)))
        return added

    def accept(self, run_id: str, note: str = "") -> Run:
        """Mark the change at this run as intended: the series it belongs to start again at it."""
        run = self.run(run_id)
        with self._write():
            self.db.execute("INSERT OR REPLACE INTO accepted VALUES (?, ?, ?)", (run_id, time.time(), note))
        return run

    # -- reading ---------------------------------------------------------------------------------------------
    def run(self, run_id: str) -> Run:
        found = [r for r in self.runs() if r.run_id == run_id]
        if not found:
            raise UserError(f"run {run_id} is not in the history store {self.path}")
        return found[0]

    def runs(self) -> list[Run]:
        """Every run, oldest first."""
        rows = self.db.execute(
            "SELECT runs.run_id, runs.timestamp, runs.git_commit, count(records.case_id), "
            "accepted.run_id IS NOT NULL FROM runs LEFT JOIN records USING (run_id) "
            "LEFT JOIN accepted USING (run_id) GROUP BY runs.run_id ORDER BY runs.timestamp, runs.run_id")
        return [Run(run_id, ts, commit, n, bool(acc)) for run_id, ts, commit, n, acc in rows]

    def accepted_runs(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT run_id FROM accepted")}

    def records(self) -> list[dict]:
        """Every stored record, oldest first, each with `_series`: (case id, device class, stack)."""
        out = []
        for case_id, dev, stack, record in self.db.execute(
                "SELECT case_id, device_class, stack, record FROM records ORDER BY timestamp, run_id, case_id"):
            data = json.loads(record)
            data["_series"] = (case_id, dev, stack)
            out.append(data)
        return out


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an error): the write lock is taken at the start, so a second writer
    waits in the busy handler instead of failing half-way."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:   # still locked after the busy timeout, or a read-only file
            raise UserError(f"history store: cannot write ({exc})")
        return self.db

    def __exit__(self, exc_type, _exc, _tb):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
