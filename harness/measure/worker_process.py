"""Cases measured in a fresh process: the launcher (WorkerProcess) and the worker it starts.

Two users: an A/B run (harness/verdict/ab.py) keeps one worker per build and paces their calls; an isolated run
(`--isolate`, the default with `--gpu`) gives every case its own worker, so allocator pools, dynamo caches, CUDA
graphs, ONNX Runtime arenas and the RSS high-water mark of one case cannot leak into the next.

A worker is started as `python -m harness.worker SETTINGS_JSON` with its build's folder as working directory and
first on sys.path, so each side of an A/B run runs its own code. It speaks JSON lines: it reads commands on stdin
and answers on the stdout it was started with; everything libraries print goes to stderr (the worker log).

    -> {"ready": true, "protocol": 1, "run_id", "run_dir", "records_path", "root"}
    <- {"op": "configure", "cases": [case ids]}          (no answer)
    <- {"op": "case", "case": case id}                   paced (A/B):
    -> {"call": i}            before every pipeline call i (warm-up included); wait for
    <- {"op": "go"}           then run the call and answer
    -> {"done": i, "seconds": wall seconds of the call}
    -> {"record": {...}}      after the case (also when it failed before or between calls)
    <- {"op": "run", "case": case id}                    unpaced (isolation): the case as a run measures it
    -> {"record": {...}}
    <- {"op": "exit"}

The worker never writes records: its coordinator writes them (adding the pairing in an A/B run).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import UserError
from harness.measure.run_options import Interrupted, ISOLATION_ENV, interrupted_record
from harness.records import Record
from harness.selection.cases import Case

PROTOCOL = 1


class WorkerDied(Exception):
    pass


@dataclass
class WorkerProcess:
    """A worker process of one build: start it, talk to it, stop it."""
    root: Path                    # the build whose code the worker runs
    settings: dict                # results_dir, run_id, device, warmup, repeats, timeout_s (+ options)
    log_path: Path
    env: dict = field(default_factory=dict)
    label: str = "worker"
    proc: subprocess.Popen | None = None
    info: dict = field(default_factory=dict)

    def start(self) -> "WorkerProcess":
        env = {**os.environ, **self.env, "PYTHONPATH": os.pathsep.join(
            [str(self.root), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:   # the child keeps its own copy of the handle
            self.proc = subprocess.Popen([sys.executable, "-m", "harness.worker", json.dumps(self.settings)],
                                         cwd=self.root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, text=True, bufsize=1)
        try:
            self.info = self.read()
        except (WorkerDied, json.JSONDecodeError) as exc:
            raise UserError(f"the {self.label} did not start: {exc}")
        if self.info.get("protocol") != PROTOCOL:
            self.stop()
            raise UserError(f"the {self.label} speaks worker protocol {self.info.get('protocol')}, this build "
                            f"{PROTOCOL}; use builds from the same protocol generation")
        return self

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
        return f"{self.label} exited with code {code} (log: {self.log_path})"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            try:
                self.send({"op": "exit"})
                self.proc.stdin.close()           # EOF ends a worker that was waiting inside a case
                self.proc.wait(timeout=60)
            except (WorkerDied, OSError, subprocess.TimeoutExpired):
                self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_isolated(case: Case, session) -> Record:
    """Measure the case in a fresh worker process of this build and return its record. A worker that dies (a crash
    in native code, the kernel's OOM killer) becomes an error record; Ctrl-C / SIGTERM stop it and record the case
    as interrupted."""
    from dataclasses import asdict

    from harness.measure.worker_process import WorkerDied, WorkerProcess
    options = {**asdict(session.options), "isolate": False, "share_references": True}
    settings = {"results_dir": str(session.run_dir), "run_id": session.run_id, "in_run_dir": True,
                "device": session.options.device, "warmup": session.options.warmup,
                "repeats": session.options.repeats, "timeout_s": session.options.timeout_s, "options": options}
    worker = WorkerProcess(Path(__file__).resolve().parents[2], settings, session.run_dir / "workers.log",
                           {ISOLATION_ENV: "1", **session.telemetry.idle_env()}, label=f"worker of {case.id}")
    try:
        worker.start()
        worker.send({"op": "configure", "cases": [c.id for c in session.cases or [case]]})
        worker.send({"op": "run", "case": case.id})
        message = worker.read()
        worker.stop()
        record = Record.from_dict(message["record"])
        record.env = {**session.env, **(record.env or {})}   # the run's own facts (its shard) + the worker's
        return record
    except WorkerDied as exc:
        record = Record.for_case(case, session.run_id, device=session.options.device)
        record.status, record.error_class, record.reason = "error", "WorkerDied", str(exc)
        return record
    except (Interrupted, KeyboardInterrupt):
        worker.kill()
        session.write(interrupted_record(case, session))
        raise
    finally:
        worker.kill()
