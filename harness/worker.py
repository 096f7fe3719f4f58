"""The worker side of harness/measure/worker_process.py: started as `python -m harness.worker SETTINGS_JSON` in
its build's folder, it measures the cases its coordinator sends (the protocol is described there). It stays at this
path in every build, so an A/B coordinator starts the other build's worker the same way."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from harness.measure.worker_process import PROTOCOL


def serve(settings: dict) -> None:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                                   # stray prints must not corrupt the protocol
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the coordinator owns Ctrl-C and stops us

    from harness.selection.cases import Case
    from harness.records import sanitize
    from harness.measure.run_options import RunOptions
    from harness.measure.session import Session
    from harness.measure.case import run_case

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
