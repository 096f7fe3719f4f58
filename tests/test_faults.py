"""A failing case never takes the run down or loses a result: each injected fault ends as its record and the
cases after it still run."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.measure.run_options import RunOptions
from harness.measure.session import Session
from harness.records import read_records
from harness.selection.cases import Case
from suites import fault_backends

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def faulty():
    fault_backends.register()
    yield
    fault_backends.unregister()


EXPECTED = {  # fault -> (status, error class, text in the reason)
    "raise": ("error", "RuntimeError", "injected executor failure"),
    "hang": ("error", "TimeoutError", "timeout"),
    "nan": ("failed", "NaNError", "NaN"),
    "oom": ("error", "OutOfMemoryError", "out of memory"),
    "blank": ("failed", "ConstantImageError", "constant"),
    # right on the first call only: caught by the executor's own parity, run on inputs after the measured calls
    "drift": ("failed", "ParityError", "unet parity"),
}


def test_every_fault_is_a_record_and_the_run_goes_on(faulty, tmp_path):
    # a passing case before (imports and reference done, so the timeout below only meets the hang) and after
    cases = [Case("tiny-sd", "diffusers")] + [Case("tiny-sd", "faulty", f) for f in EXPECTED] + [
        Case("tiny-sd", "diffusers", steps=2)]
    # a generous timeout for every case (a loaded machine must not time out a right one) but the hang's own
    session = Session(tmp_path, RunOptions(warmup=0, repeats=1, timeout_s=300.0))
    hang_s = None
    try:
        for case in cases:
            session.options.timeout_s = 3.0 if case.variant == "hang" else 300.0
            started = time.monotonic()
            session.result(case)
            if case.variant == "hang":
                hang_s = time.monotonic() - started
    finally:
        session.close()
    assert hang_s is not None and hang_s < 60, f"the hung case was not cut off by its 3 s timeout ({hang_s} s)"
    records = {r["case_id"]: r for r in read_records(session.records_path)}
    assert len(records) == len(cases)
    for fault, (status, error_class, text) in EXPECTED.items():
        r = records[Case("tiny-sd", "faulty", fault).id]
        assert (r["status"], r["error_class"]) == (status, error_class), (fault, r["reason"])
        assert text.lower() in r["reason"].lower(), (fault, r["reason"])
    assert records[Case("tiny-sd", "diffusers", steps=2).id]["status"] == "passed", "the case after the faults did not run"


def test_a_case_without_measured_calls_is_an_error_not_a_pass(tmp_path):
    """pytest --benchmark-disable runs the benchmarked function once: every call a warm-up, nothing timed."""
    session = Session(tmp_path, RunOptions(warmup=2, repeats=10))
    try:
        record = session.result(Case("tiny-sd", "diffusers", steps=1),
                                loop=lambda call, warmup, repeats, setup: (setup(), call()))
    finally:
        session.close()
    assert (record.status, record.error_class) == ("error", "NoSamples"), record.reason
    assert "benchmark-disable" in record.reason


def test_isolated_run_gives_each_case_its_own_process_and_exits_1_on_a_failure(tmp_path):
    """--isolate: every case in a fresh worker (its own pid), records written by the coordinator; a case wrong only
    after its first call fails, and the run exits 1 (--allow-failures: 0)."""
    args = ["run", "--isolate", "--model", "tiny-sd", "--backend", "diffusers", "--backend", "faulty+drift",
            "--steps", "2", "--warmup", "0", "--repeats", "2", "--no-report", "--results-dir", str(tmp_path)]
    proc = _diffbench(args, env_extra={"DIFFBENCH_PLUGINS": "suites.fault_backends"})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, (out, err)
    assert "1 case(s) failed or errored" in err
    (records_file,) = tmp_path.glob("*/records.jsonl")
    records = {r["backend"]: r for r in read_records(records_file)}
    assert records["diffusers"]["status"] == "passed"
    assert records["faulty"]["status"] == "failed" and "unet parity" in records["faulty"]["reason"]
    assert records["faulty"]["parity"]["image"]["passed"]     # its first call was right: that alone would pass
    pids = {r["env"]["pid"] for r in records.values()}
    assert len(pids) == 2 and proc.pid not in pids
    assert all(r["timing"]["isolated"] for r in records.values())
    assert (records_file.parent / "references").is_dir()     # the second worker reused the first one's reference


def test_unsupported_variant_is_a_record(faulty, tmp_path):
    session = Session(tmp_path, RunOptions(warmup=0, repeats=1))
    record = session.result(Case("tiny-sd", "faulty", "no-such-fault"))
    session.close()
    assert record.status == "unsupported" and "unknown variant" in record.reason


_RUNNER = """
import sys
from suites import fault_backends
fault_backends.register()
from harness.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _diffbench(args, env_extra=None, **kw):
    # faulty+slow busy-waits 0.15 s per denoiser call: its cases last 2-4 s, longer than the 1 s before each signal
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DIFFBENCH_FAULT_SLEEP": "0.15", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-c", _RUNNER, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=fault_backends.sigint_as_at_a_terminal, **kw)


def _wait_for_records(folder: Path, count: int, timeout_s: float = 120) -> Path:
    """The run's records file once it holds `count` records (the next case is then running)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = list(folder.glob("*/records.jsonl"))
        if found and found[0].read_text().count("\n") >= count:
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} record(s) appeared in {timeout_s:.0f} s")


def test_interrupt_then_resume_records_every_case_once(tmp_path):
    """Interrupt mid-run with SIGINT, resume, interrupt the resumed run with SIGTERM, resume again: each interrupt
    records the case in flight as interrupted and keeps the JSONL valid; the last resume finishes every case once."""
    selection = ["--model", "tiny-sd", "--backend", "diffusers", "--backend", "faulty+slow", "--steps", "2",
                 "--steps", "3", "--warmup", "0", "--repeats", "3", "--no-report"]
    proc = _diffbench(["run", *selection, "--results-dir", str(tmp_path)])
    records_file = _wait_for_records(tmp_path, 1)
    done = {}
    for sig, resume_from in ((signal.SIGINT, None), (signal.SIGTERM, records_file.parent)):
        if resume_from is not None:
            proc = _diffbench(["run", "--resume", str(resume_from), *selection])
            _wait_for_records(tmp_path, len(read_records(records_file)) + 1)
        time.sleep(1.0)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, (sig, err)
        assert "--resume" in err and "Traceback" not in err
        records = read_records(records_file)                         # still valid JSONL
        assert records[-1]["status"] == "interrupted", [r["status"] for r in records]
        done[sig] = {r["case_id"] for r in records if r["status"] != "interrupted"}
    assert done[signal.SIGINT] < done[signal.SIGTERM]                 # the first resume skipped, then added

    resume = _diffbench(["run", "--resume", str(records_file.parent), *selection])
    out, err = resume.communicate(timeout=300)
    assert resume.returncode == 0, err
    assert "skip" in out
    final = [r for r in read_records(records_file) if r["status"] != "interrupted"]
    ids = [r["case_id"] for r in final]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 4, ids


def test_no_tritonserver_or_child_left_behind():
    """Our runs start servers as child processes; none may outlive the run (checked for this process tree)."""
    import psutil
    children = [p for p in psutil.Process().children(recursive=True) if "tritonserver" in (p.name() or "")]
    assert not children, children
