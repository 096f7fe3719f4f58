"""A/B runs: two real worker processes with real pipelines, paced call by call, and the gate's paired rule."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.records import Record, load_many
from harness.selection.cases import Case
from harness.verdict import gate
from suites.fault_backends import sigint_as_at_a_terminal

ROOT = Path(__file__).resolve().parent.parent
SLOW = "tiny-sd/faulty+slow/fp32/b1/64x64/s4"
EAGER = "tiny-sd/diffusers/fp32/b1/64x64/s4"
CRASH = "tiny-sd/faulty+exit/fp32/b1/64x64/s4"


def _ab(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DIFFBENCH_PLUGINS": "suites.fault_backends"}
    return subprocess.run([sys.executable, "-m", "harness.cli", "ab", "--baseline-dir", str(ROOT), "--model",
                           "tiny-sd", "--warmup", "1", "--no-report", "--results-dir", str(tmp_path),
                           "--processes", "1", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _records(tmp_path: Path, side: str) -> dict[str, dict]:
    return {r["case_id"]: r for r in load_many(list(tmp_path.glob(f"ab-*/{side}/*/records.jsonl")))}


def test_ab_catches_a_slowdown_on_one_side_and_survives_a_crash(tmp_path):
    """Real workers, real pipelines, three cases in one A/B run:
    faulty+exit ends both workers mid-case (a native crash): an error record on each side, fresh workers go on;
    faulty+slow busy-waits 100 ms per denoiser call on the current side only: the gate flags it from the paired
    call ratios; diffusers is the same on both sides and passes."""
    proc = _ab(tmp_path, "--backend", "faulty+exit", "--backend", "faulty+slow", "--backend", "diffusers",
               "--repeats", "6", "--baseline-env", "DIFFBENCH_FAULT_SLEEP=0",
               "--current-env", "DIFFBENCH_FAULT_SLEEP=0.1", "--threshold", "e2e.p50:+50%", "--threshold", "status")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert len(list(tmp_path.glob("ab-*/*/*/records.jsonl"))) == 2, "a restarted worker must keep its side's run"
    base, cur = _records(tmp_path, "baseline"), _records(tmp_path, "current")
    assert set(base) == set(cur) == {CRASH, SLOW, EAGER}
    for side in (base, cur):
        assert side[CRASH]["status"] == "error" and side[CRASH]["error_class"] == "WorkerDied"
        assert "worker exited with code 3" in side[CRASH]["reason"]
    for case_id in (SLOW, EAGER):
        b, c = base[case_id], cur[case_id]
        assert b["status"] == c["status"] == "passed", (b["reason"], c["reason"])
        assert c["paired"]["with_run"] == b["run_id"] and b["paired"]["with_run"] == c["run_id"]
        ratio = c["paired"]["ratio_current_over_baseline"]
        assert ratio["n"] == 6 == c["e2e"]["n"] == b["e2e"]["n"] == len(c["samples"]["e2e"])
        assert c["parity"]["verdict"] == "pass"
    assert cur[SLOW]["paired"]["ratio_current_over_baseline"]["p50"] > 1.5   # 400 ms of busy-wait per call
    regressed = {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("REGRESSED")}
    assert regressed == {SLOW}, proc.stdout
    assert "paired A/B" in proc.stdout


def _record(run_id: str, p50: float, paired_with: str = "", ratio: dict | None = None) -> dict:
    r = Record.for_case(Case("tiny-sd", "diffusers"), run_id, env={"cpu": {"model": "AMD EPYC"}},
                        e2e={"p50": p50, "p25": p50 * 0.95, "p75": p50 * 1.05, "std": p50 * 0.1, "n": 30,
                             "mean": p50, "p90": p50, "p99": p50, "min": p50, "max": p50})
    if ratio is not None:
        r.paired = {"with_run": paired_with, "side": "current", "ratio_current_over_baseline": ratio}
    return r.to_dict()


def _ratio(p50: float, iqr: float, n: int = 30) -> dict:
    return {"p50": p50, "p25": p50 - iqr / 2, "p75": p50 + iqr / 2, "n": n}


def _row(result):
    return next(r for r in result.rows if r.metric == "e2e.p50")


def test_paired_rule_judges_the_call_ratios_not_the_drifting_medians():
    """The sides' medians differ by 20 % (the machine drifted between their calls... or not), but the paired
    ratios say +1 %: PASS. And a tight +10 % in the ratios is a regression even when the medians agree."""
    base = [_record("A", 0.100)]
    row = _row(gate.compare(base, [_record("B", 0.120, "A", _ratio(1.01, 0.04))], ["e2e.p50:+5%"]))
    assert row.verdict == "PASS" and row.change == "+1.0%" and "paired A/B" in row.note
    row = _row(gate.compare(base, [_record("B", 0.100, "A", _ratio(1.10, 0.04))], ["e2e.p50:+5%"]))
    assert row.verdict == "REGRESSED" and row.change == "+10.0%"


def test_paired_change_inside_its_own_noise_is_not_counted():
    row = _row(gate.compare([_record("A", 0.1)], [_record("B", 0.1, "A", _ratio(1.10, 0.6, n=9))], ["e2e.p50:+5%"]))
    assert row.verdict == "PASS" and "within the paired noise" in row.note


def test_pairs_with_another_run_are_ignored():
    """Ratios measured against some other baseline run say nothing about this one: the unpaired rule applies."""
    row = _row(gate.compare([_record("A", 0.100)], [_record("B", 0.100, "X", _ratio(1.5, 0.01))], ["e2e.p50:+5%"]))
    assert row.verdict == "PASS" and "paired" not in row.note


def test_worker_speaks_only_json_on_its_protocol_pipe(tmp_path):
    """Whatever libraries print goes to stderr; the protocol pipe carries one JSON object per line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    settings = {"results_dir": str(tmp_path), "run_id": "run-1", "device": "cpu", "warmup": 0, "repeats": 1,
                "timeout_s": None}
    proc = subprocess.run([sys.executable, "-m", "harness.worker", json.dumps(settings)],
                          input=json.dumps({"op": "exit"}) + "\n", cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["ready"] is True


@pytest.mark.parametrize("sig", [signal.SIGTERM])   # SIGINT takes the same KeyboardInterrupt path (see test_faults)
def test_interrupted_ab_records_the_case_in_flight_and_leaves_no_worker(tmp_path, sig):
    """--baseline-rev HEAD, interrupted: the baseline side runs from a temporary worktree of HEAD (its record names
    that commit); the case in flight is recorded interrupted on both sides; no worker and no worktree is left."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "ab", "--baseline-rev", "HEAD", "--model",
                             "tiny-sd", "--backend", "diffusers", "--steps", "2", "--steps", "3", "--warmup", "0",
                             "--repeats", "400", "--no-report", "--results-dir", str(tmp_path)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_as_at_a_terminal)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(tmp_path.glob("ab-*/current/*/records.jsonl")):
        time.sleep(0.2)
    time.sleep(3.0)   # inside the first case's paced calls
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    for side in ("baseline", "current"):
        (records,) = tmp_path.glob(f"ab-*/{side}/*/records.jsonl")
        side_records = load_many([records])
        assert [r["status"] for r in side_records] == ["interrupted"], side_records
        if side == "baseline":
            assert side_records[0]["git"]["commit"] == head and side_records[0]["paired"]["side"] == "baseline"
    time.sleep(2.0)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in ps, "a worker outlived the A/B run"
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "diffbench-ab-" not in worktrees
