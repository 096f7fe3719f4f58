"""A/B: two builds measured call by call in alternation on the same machine, then gated against each other.

On a shared machine whole runs drift by more than a 10 % regression (measured on the 2-core CI VM: e2e p50 of one
unchanged build from 107 to 145 ms over twelve runs, and a fixed probe workload did not follow the drift), so a
stored baseline cannot tell a slower build from a busier hour. Interleaving can: both builds live in their own
worker process (harness/worker.py) and take turns, one pipeline call each, in A B B A order, so every pair of calls
sees the same machine. The per-pair ratio current/baseline cancels what the machine did; its median over the pairs
is the change the gate judges (harness/gate.py, paired rule), with the noise band from the pairs' own spread.

    diffbench ab --baseline-dir ../main-checkout [selection] [--repeats 50]
    diffbench ab --baseline-rev origin/main [selection]       (a temporary git worktree of that revision)

Both sides' records are ordinary records files (RESULTS/ab-ID/{baseline,current}/RUN/records.jsonl); the report
and the gate read them like any other run. A side whose worker dies gets an error record for the case and a fresh
worker for the next one; the run goes on.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.cases import Case
from harness.errors import UserError
from harness.records import Record, RecordWriter, new_run_id, sanitize
from harness.timing import stats
from harness.worker import PROTOCOL   # both builds of an A/B run must speak the same message set

SIDES = ("baseline", "current")


class WorkerDied(Exception):
    pass


@dataclass
class Worker:
    """One build's worker process and its pending message."""
    side: str
    root: Path
    results_dir: Path
    run_id: str
    device: str
    warmup: int
    repeats: int
    timeout_s: float | None
    env: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    info: dict = field(default_factory=dict)
    writer: RecordWriter | None = None

    def start(self) -> None:
        env = {**os.environ, **self.env, "PYTHONPATH": os.pathsep.join(
            [str(self.root), *filter(None, [os.environ.get("PYTHONPATH")])])}
        settings = {"protocol": PROTOCOL, "results_dir": str(self.results_dir), "run_id": self.run_id,
                    "device": self.device, "warmup": self.warmup, "repeats": self.repeats, "timeout_s": self.timeout_s}
        with open(self.results_dir / "worker.log", "a") as log:   # the child keeps its own copy of the handle
            self.proc = subprocess.Popen([sys.executable, "-m", "harness.worker", json.dumps(settings)],
                                         cwd=self.root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, text=True, bufsize=1)
        try:
            self.info = self.read()
        except (WorkerDied, json.JSONDecodeError) as exc:
            raise UserError(f"the {self.side} build's worker did not start: {exc}")
        if self.info.get("protocol") != PROTOCOL:
            self.stop()
            raise UserError(f"the {self.side} build speaks A/B protocol {self.info.get('protocol')}, this one "
                            f"{PROTOCOL}; use builds from the same protocol generation")
        if self.writer is None:   # one records file per side, kept across worker restarts
            self.writer = RecordWriter(self.info["records_path"])

    def send(self, message: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerDied(self._death())

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerDied(self._death())
        return json.loads(line)

    def _death(self) -> str:
        code = self.proc.wait(timeout=30)
        return f"{self.side} worker exited with code {code} (log: {self.results_dir / 'worker.log'})"

    def stop(self, close_records: bool = True) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                self.send({"op": "exit"})
                self.proc.stdin.close()           # EOF ends a worker that was waiting inside a case
                self.proc.wait(timeout=60)
            except (WorkerDied, OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if close_records and self.writer:
            self.writer.close()
            self.writer = None


def _paced_case(workers: dict[str, Worker], case: Case, warmup: int) -> tuple[dict[str, dict], list[float]]:
    """Run one case on both sides, one call each in A B B A order. Returns each side's record and the
    current/baseline ratio of every measured pair."""
    pending, records, seconds = {}, {}, {side: {} for side in SIDES}
    for side, worker in workers.items():
        try:
            worker.send({"op": "case", "case": case.id})
            pending[side] = worker.read()
        except WorkerDied as exc:
            records[side] = _unmeasured_record(case, worker, "error", "WorkerDied", str(exc))
    turn = 0
    while any("call" in message for message in pending.values()):
        order = SIDES if turn % 2 == 0 else SIDES[::-1]
        for side in order:
            message = pending.get(side, {})
            if "call" not in message:
                continue
            worker = workers[side]
            try:
                worker.send({"op": "go"})
                answer = worker.read()
                if "done" in answer:
                    seconds[side][answer["done"]] = answer["seconds"]
                    answer = worker.read()
                pending[side] = answer
            except WorkerDied as exc:
                pending[side], records[side] = {}, _unmeasured_record(case, worker, "error", "WorkerDied", str(exc))
        turn += 1
    for side, message in pending.items():
        if "record" in message:
            records[side] = message["record"]
    ratios = [seconds["current"][i] / seconds["baseline"][i]
              for i in sorted(seconds["current"]) if i >= warmup and seconds["baseline"].get(i)]
    return records, ratios


def _unmeasured_record(case: Case, worker: Worker, status: str, error_class: str, reason: str) -> dict:
    """The record a side gets when its worker could not report one (it died, or the run was interrupted)."""
    record = Record.for_case(case, worker.run_id, device=worker.device)
    record.status, record.error_class, record.reason = status, error_class, reason
    return sanitize(record.to_dict())


def run_ab(cases: list[Case], baseline_root: Path, current_root: Path, out_dir: Path, device: str, warmup: int,
           repeats: int, timeout_s: float | None, env: dict[str, dict] | None = None) -> dict[str, Path]:
    """Measure every case on both builds in alternation; write both sides' records; return their paths."""
    env = env or {}
    workers = {}
    run_id = new_run_id()
    for side, root in zip(SIDES, (baseline_root, current_root)):
        (out_dir / side).mkdir(parents=True, exist_ok=True)
        workers[side] = Worker(side, Path(root).resolve(), out_dir / side, f"{run_id}-{side}", device, warmup,
                               repeats, timeout_s, env.get(side, {}))
    try:
        for worker in workers.values():
            worker.start()
            worker.send({"op": "configure", "cases": [c.id for c in cases]})
        for case in cases:
            try:
                records, ratios = _paced_case(workers, case, warmup)
            except KeyboardInterrupt:
                for worker in workers.values():
                    worker.writer.write(_unmeasured_record(case, worker, "interrupted", "Interrupted",
                                                           "A/B run interrupted by signal"))
                raise
            pair_stats = stats(ratios) if ratios else {"n": 0}
            for side, other in zip(SIDES, SIDES[::-1]):
                record = records[side]
                record["paired"] = {"with_run": workers[other].run_id, "side": side,
                                    "order": "ABBA, one call each", "ratio_current_over_baseline": pair_stats}
                workers[side].writer.write(sanitize(record))
            verdicts = "  ".join(f"{side} {records[side]['status']}" for side in SIDES)
            change = f"  paired median {(pair_stats['p50'] - 1) * 100:+.1f}% over {len(ratios)} pairs" \
                if ratios else ""
            print(f"  {case.id}: {verdicts}{change}", flush=True)
            for side, worker in workers.items():
                if worker.proc.poll() is not None:    # died during the case: a fresh one for the next
                    worker.stop(close_records=False)
                    worker.start()
                    worker.send({"op": "configure", "cases": [c.id for c in cases]})
    finally:
        for worker in workers.values():
            worker.stop()
    return {side: Path(worker.info["records_path"]) for side, worker in workers.items()}


class Worktree:
    """A temporary `git worktree` of a revision of this repository (removed afterwards)."""

    def __init__(self, repo: Path, rev: str):
        self.repo, self.rev = repo, rev
        proc = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise UserError(f"--baseline-rev {rev}: not a commit of {repo}")
        self.commit = proc.stdout.strip()
        self.path = Path(tempfile.mkdtemp(prefix="diffbench-ab-")) / "baseline"

    def __enter__(self) -> Path:
        proc = subprocess.run(["git", "-C", str(self.repo), "worktree", "add", "--detach", str(self.path), self.commit],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise UserError(f"--baseline-rev {self.rev}: {(proc.stderr.strip().splitlines() or ['git failed'])[-1]}")
        if not (self.path / "harness" / "worker.py").is_file():
            self.__exit__()
            raise UserError(f"--baseline-rev {self.rev}: that revision predates A/B runs (no harness/worker.py)")
        return self.path

    def __exit__(self, *_exc) -> None:
        subprocess.run(["git", "-C", str(self.repo), "worktree", "remove", "--force", str(self.path)],
                       capture_output=True)
        shutil.rmtree(self.path.parent, ignore_errors=True)


def check_build(root: Path, flag: str) -> Path:
    root = Path(root)
    if not (root / "harness" / "worker.py").is_file():
        raise UserError(f"{flag} {root}: not a diffbench checkout with A/B support (no harness/worker.py)")
    return root.resolve()


def new_ab_dir(results_dir: Path) -> Path:
    path = Path(results_dir) / time.strftime("ab-%Y%m%d-%H%M%S")
    suffix = 0
    while path.exists():
        suffix += 1
        path = path.with_name(f"{path.name.split('.')[0]}.{suffix}")
    return path
