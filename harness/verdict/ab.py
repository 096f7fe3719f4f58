"""A/B: two builds measured call by call in alternation on the same machine, then gated against each other.

On a shared machine whole runs drift by more than a 10 % regression (measured on the 2-core CI VM: e2e p50 of one
unchanged build from 107 to 145 ms over twelve runs, and a fixed probe workload did not follow the drift), so a
stored baseline cannot tell a slower build from a busier hour. Interleaving can: both builds live in their own
worker process (python -m harness.worker) and take turns, one pipeline call each, in A B B A order, so every pair of calls
sees the same machine. The per-pair ratio current/baseline cancels what the machine did; its median over the pairs
is the change the gate judges (harness/verdict/gate.py, paired rule), with the noise band from the pairs' own spread.

Pairs of calls cannot see what biases a whole process: where the OS put it on the cores, what its allocator and
caches did. Measured on the 2-core VM, two unchanged sides in one process each differed by up to 9 % in identical
stages. So with `--processes P` (pyperf's answer) every case is measured by P fresh pairs of workers, one after
the other, alternating which side starts first and which calls first; each pair takes its share of the call pairs.
The ratio statistics then span every pair of every process, and the median ratio of each process pair goes into
the record (`paired.ratio_current_over_baseline.process_p50s`), so the noise band also covers the spread between
processes (harness/verdict/noise.py, paired band).

    diffbench ab --baseline-dir ../main-checkout [selection] [--repeats 40] [--processes 4]
    diffbench ab --baseline-rev origin/main [selection]       (a temporary git worktree of that revision)

Both sides' records are ordinary records files (RESULTS/ab-ID/{baseline,current}/RUN/records.jsonl); the report
and the gate read them like any other run. A side whose worker dies gets an error record for the case and a fresh
worker for the next one; the run goes on.
"""
from __future__ import annotations

import copy
import math
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness.selection.cases import Case
from harness.errors import UserError
from harness.records import Record, RecordWriter, git_info, new_run_id, sanitize
from harness.measure.timing import stats
from harness.measure.worker_process import PROTOCOL, WorkerDied, WorkerProcess  # both builds speak the same message set

SIDES = ("baseline", "current")


@dataclass
class Side:
    """One build of an A/B run: its worker process (restarted after a crash) and its records file."""
    name: str
    worker: WorkerProcess
    run_id: str
    device: str
    writer: RecordWriter | None = None

    def start(self) -> None:
        self.worker.start()
        if self.writer is None:   # one records file per side, kept across worker restarts
            self.writer = RecordWriter(self.worker.info["records_path"])

    def close(self) -> None:
        self.worker.stop()
        if self.writer:
            self.writer.close()
            self.writer = None


def _paced_case(sides: dict[str, Side], case: Case, warmup: int,
                first: str = "baseline") -> tuple[dict[str, dict], list[float]]:
    """Run one case on both sides, one call each in A B B A order (`first` is A). Returns each side's record and
    the current/baseline ratio of every measured pair."""
    pending, records, seconds = {}, {}, {side: {} for side in SIDES}
    # both sides load and prepare at once (no paced call before the first paced call): half the wall time of a
    # case's setup, which dominates an A/B run over several process pairs. An A/B record's cold start and first
    # call were therefore taken beside the other side's: the gate never compares them (docs/gate.md)
    for side, s in sides.items():
        try:
            s.worker.send({"op": "case", "case": case.id})
            pending[side] = {}
        except WorkerDied as exc:
            records[side] = _unmeasured_record(case, s, "error", "WorkerDied", str(exc))
    for side in list(pending):
        try:
            pending[side] = sides[side].worker.read()
        except WorkerDied as exc:
            del pending[side]
            records[side] = _unmeasured_record(case, sides[side], "error", "WorkerDied", str(exc))
    turn = 0
    while any("call" in message for message in pending.values()):
        order = SIDES if (turn + SIDES.index(first)) % 2 == 0 else SIDES[::-1]
        for side in order:
            message = pending.get(side, {})
            if "call" not in message:
                continue
            worker = sides[side].worker
            try:
                worker.send({"op": "go"})
                answer = worker.read()
                if "done" in answer:
                    seconds[side][answer["done"]] = answer["seconds"]
                    answer = worker.read()
                pending[side] = answer
            except WorkerDied as exc:
                pending[side], records[side] = {}, _unmeasured_record(case, sides[side], "error", "WorkerDied",
                                                                      str(exc))
        turn += 1
    for side, message in pending.items():
        if "record" in message:
            records[side] = message["record"]
    ratios = [seconds["current"][i] / seconds["baseline"][i]
              for i in sorted(seconds["current"]) if i >= warmup and seconds["baseline"].get(i)]
    return records, ratios


def _unmeasured_record(case: Case, side: Side, status: str, error_class: str, reason: str) -> dict:
    """The record a side gets when its worker could not report one (it died, or the run was interrupted): it still
    names the build it belongs to."""
    record = Record.for_case(case, side.run_id, device=side.device)
    record.status, record.error_class, record.reason = status, error_class, reason
    record.git = git_info(side.worker.root)
    record.paired = {"side": side.name}
    return sanitize(record.to_dict())


def run_ab(cases: list[Case], baseline_root: Path, current_root: Path, out_dir: Path, device: str, warmup: int,
           repeats: int, timeout_s: float | None, env: dict[str, dict] | None = None,
           processes: int = 1) -> dict[str, Path]:
    """Measure every case on both builds in alternation; write both sides' records; return their paths. With
    processes > 1, every case gets that many fresh worker pairs, each measuring ceil(repeats / processes) pairs."""
    env = env or {}
    sides = {}
    run_id = new_run_id()
    per_process = math.ceil(repeats / processes)
    for name, root in zip(SIDES, (baseline_root, current_root)):
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        settings = {"protocol": PROTOCOL, "results_dir": str(out_dir / name), "run_id": f"{run_id}-{name}",
                    "device": device, "warmup": warmup, "repeats": per_process, "timeout_s": timeout_s}
        worker = WorkerProcess(Path(root).resolve(), settings, out_dir / name / "worker.log", env.get(name, {}),
                               label=f"{name} build's worker")
        sides[name] = Side(name, worker, settings["run_id"], device)

    def start(order) -> None:
        for name in order:
            sides[name].start()
            sides[name].worker.send({"op": "configure", "cases": [c.id for c in cases]})

    try:
        if processes == 1:
            start(SIDES)
        for case in cases:
            parts = []
            for p in range(processes):
                first = SIDES[p % 2]   # alternate which side's process starts first and calls first
                try:
                    if processes > 1:   # inside the try: an interrupt while a pair starts is recorded too
                        start((first, *[s for s in SIDES if s != first]))
                    parts.append(_paced_case(sides, case, warmup, first))
                except KeyboardInterrupt:
                    for side in (s for s in sides.values() if s.writer):   # a side never started has no file
                        side.writer.write(_unmeasured_record(case, side, "interrupted", "Interrupted",
                                                             "A/B run interrupted by signal"))
                    raise
                finally:
                    if processes > 1:
                        for side in sides.values():
                            side.worker.stop()
            records = {name: merge_processes([part[0][name] for part in parts]) for name in SIDES}
            ratios = [r for _records, part_ratios in parts for r in part_ratios]
            pair_stats = stats(ratios) if ratios else {"n": 0}
            if processes > 1 and ratios:
                pair_stats["process_p50s"] = [stats(part[1])["p50"] for part in parts if part[1]]
            for name, other in zip(SIDES, SIDES[::-1]):
                record = records[name]
                record["paired"] = {"with_run": sides[other].run_id, "side": name,
                                    "order": "ABBA, one call each" + (f"; {processes} process pairs, alternating "
                                                                      "which starts first" if processes > 1 else ""),
                                    "processes": processes, "ratio_current_over_baseline": pair_stats}
                sides[name].writer.write(sanitize(record))
            verdicts = "  ".join(f"{name} {records[name]['status']}" for name in SIDES)
            change = f"  paired median {(pair_stats['p50'] - 1) * 100:+.1f}% over {len(ratios)} pairs" \
                if ratios else ""
            spread = (f" (process pairs: {', '.join(f'{(v - 1) * 100:+.1f}%' for v in pair_stats['process_p50s'])})"
                      if pair_stats.get("process_p50s") else "")
            print(f"  {case.id}: {verdicts}{change}{spread}", flush=True)
            if processes == 1:
                for side in sides.values():
                    if not side.worker.alive():    # died during the case: a fresh one for the next
                        side.worker.stop()
                        start([side.name])
    finally:
        for side in sides.values():
            side.close()
    return {name: Path(side.worker.info["records_path"]) for name, side in sides.items()}


def merge_processes(records: list[dict]) -> dict:
    """One side's record of a case measured in several processes. A process whose case did not pass decides the
    record (a failure is never averaged away). Otherwise e2e statistics and samples come from every measured call of
    every process, and the rest (stages, memory, parity) from the median process by e2e p50 (stage statistics of
    different processes do not merge exactly); a note names every process's e2e p50."""
    if len(records) == 1:
        return records[0]
    failed = next((r for r in records if r.get("status") != "passed"), None)
    if failed is not None:
        return failed
    p50s = [r["e2e"]["p50"] for r in records]
    median = sorted(range(len(records)), key=lambda i: p50s[i])[(len(records) - 1) // 2]
    merged = copy.deepcopy(records[median])
    calls = [s for r in records for s in (r.get("samples") or {}).get("e2e") or []]
    if calls:
        merged["samples"] = {**(merged.get("samples") or {}), "e2e": calls}
        merged["e2e"] = stats(calls)
        merged["timing"] = {**(merged.get("timing") or {}), "repeats": len(calls)}
    merged["notes"] = [*(merged.get("notes") or []),
                       f"measured in {len(records)} processes: e2e from all {len(calls)} calls, stages and memory "
                       f"from the median process; process e2e p50s {', '.join(f'{v * 1000:.1f} ms' for v in p50s)}"]
    return merged


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
