"""Cases measured in a fresh process: the launcher (WorkerProcess) and the worker it starts.

Two users: an A/B run (harness/ab.py) keeps one worker per build and paces their calls; an isolated run
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
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import UserError

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


# -- the worker side ------------------------------------------------------------------------------------------------
def serve(settings: dict) -> None:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                                   # stray prints must not corrupt the protocol
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the coordinator owns Ctrl-C and stops us

    from harness.cases import Case
    from harness.records import sanitize
    from harness.runner import RunOptions, Session, run_case

    def send(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")

    def receive() -> dict:
        line = sys.stdin.readline()
        if not line:
            raise SystemExit(0)                     # the coordinator went away
        return json.loads(line)

    def paced_loop(call, warmup_calls: int, repeat_calls: int, setup=None) -> None:
        for i in range(warmup_calls + repeat_calls):
            if setup is not None:
                setup()
            send({"call": i})
            if receive().get("op") != "go":
                raise RuntimeError("A/B coordinator stopped the case")
            start = time.perf_counter()
            call()
            send({"done": i, "seconds": time.perf_counter() - start})

    options = RunOptions(**settings["options"]) if "options" in settings else RunOptions(
        device=settings["device"], warmup=settings["warmup"], repeats=settings["repeats"],
        timeout_s=settings["timeout_s"])
    options.isolate = False                         # this process is the isolation
    # a restarted worker keeps its side's run; an isolated case writes into its coordinator's run folder
    session = Session(Path(settings["results_dir"]), options, run_id=settings["run_id"],
                      resume=bool(settings.get("in_run_dir")))
    send({"ready": True, "protocol": PROTOCOL, "run_id": session.run_id, "run_dir": str(session.run_dir),
          "records_path": str(session.records_path), "root": str(Path(__file__).resolve().parent.parent)})
    while True:
        message = receive()
        if message["op"] == "configure":
            session.configure([Case.from_id(c) for c in message["cases"]])
        elif message["op"] in ("case", "run"):
            loop = paced_loop if message["op"] == "case" else None
            record = run_case(Case.from_id(message["case"]), session, loop=loop)
            record.env, record.git = record.env or session.env, session.git
            send({"record": sanitize(record.to_dict())})
        elif message["op"] == "exit":
            session.close()
            return


if __name__ == "__main__":
    from backends.base import load_plugins
    load_plugins()
    serve(json.loads(sys.argv[1]))
