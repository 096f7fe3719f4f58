"""A/B worker: one build of diffbench that measures cases on command, one pipeline call at a time.

Started by harness/ab.py as `python -m harness.worker SETTINGS_JSON` with the build's
own folder as working directory and first on sys.path, so each side runs its own code. It speaks JSON lines: it
reads commands on stdin and answers on the stdout it was started with; everything libraries print goes to stderr.

    -> {"ready": true, "protocol": 1, "run_id", "run_dir", "records_path", "root"}
    <- {"op": "configure", "cases": [case ids]}          (no answer)
    <- {"op": "case", "case": case id}
    -> {"call": i}            before every pipeline call i (warm-up included); wait for
    <- {"op": "go"}           then run the call and answer
    -> {"done": i, "seconds": wall seconds of the call}
    -> {"record": {...}}      after the case (also when it failed before or between calls)
    <- {"op": "exit"}

The worker never writes records: the coordinator adds the pairing to them and writes both sides' files.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


PROTOCOL = 1


def serve(results_dir: str, run_id: str, device: str, warmup: int, repeats: int, timeout_s: float | None) -> None:
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

    def paced_loop(call, warmup_calls: int, repeat_calls: int) -> None:
        for i in range(warmup_calls + repeat_calls):
            send({"call": i})
            if receive().get("op") != "go":
                raise RuntimeError("A/B coordinator stopped the case")
            start = time.perf_counter()
            call()
            send({"done": i, "seconds": time.perf_counter() - start})

    options = RunOptions(device=device, warmup=warmup, repeats=repeats, timeout_s=timeout_s)
    session = Session(Path(results_dir), options, run_id=run_id)   # a restarted worker keeps its side's run
    send({"ready": True, "protocol": PROTOCOL, "run_id": session.run_id, "run_dir": str(session.run_dir),
          "records_path": str(session.records_path), "root": str(Path(__file__).resolve().parent.parent)})
    while True:
        message = receive()
        if message["op"] == "configure":
            session.configure([Case.from_id(c) for c in message["cases"]])
        elif message["op"] == "case":
            record = run_case(Case.from_id(message["case"]), session, loop=paced_loop)
            record.env, record.git = session.env, session.git
            send({"record": sanitize(record.to_dict())})
        elif message["op"] == "exit":
            session.close()
            return


if __name__ == "__main__":
    from backends.base import load_plugins
    load_plugins()
    settings = json.loads(sys.argv[1])
    serve(settings["results_dir"], settings["run_id"], settings["device"], settings["warmup"], settings["repeats"],
          settings["timeout_s"])
