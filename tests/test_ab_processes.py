"""A/B over several process pairs per side (harness/verdict/ab.py --processes): one real round, and the noise rule that
takes the spread between processes into the paired band (harness/verdict/noise.py)."""
import os
import subprocess
import sys
from pathlib import Path

from harness.records import Record, load_many
from harness.selection.cases import Case
from harness.verdict import gate
from harness.verdict.ab import merge_processes

ROOT = Path(__file__).resolve().parent.parent
SLOW = "tiny-sd/faulty+slow/fp32/b1/64x64/s4"


def test_one_round_over_two_process_pairs_catches_a_slowdown(tmp_path):
    """Real workers, two process pairs per side: the current side busy-waits 100 ms per denoiser call."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DIFFBENCH_PLUGINS": "suites.fault_backends"}
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "ab", "--baseline-dir", str(ROOT), "--model",
                           "tiny-sd", "--backend", "faulty+slow", "--warmup", "1", "--repeats", "6",
                           "--processes", "2", "--no-report", "--results-dir", str(tmp_path),
                           "--baseline-env", "DIFFBENCH_FAULT_SLEEP=0", "--current-env", "DIFFBENCH_FAULT_SLEEP=0.1",
                           "--threshold", "e2e.p50:+50%"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "in 2 process pair(s)" in proc.stdout and "process pairs: +" in proc.stdout
    current = load_many(list(tmp_path.glob("ab-*/current/*/records.jsonl")))
    baseline = load_many(list(tmp_path.glob("ab-*/baseline/*/records.jsonl")))
    assert len(current) == len(baseline) == 1    # one merged record per side
    c, b = current[0], baseline[0]
    assert c["case_id"] == SLOW and c["status"] == b["status"] == "passed"
    ratio = c["paired"]["ratio_current_over_baseline"]
    assert c["paired"]["processes"] == 2 and len(ratio["process_p50s"]) == 2
    assert ratio["n"] == c["e2e"]["n"] == len(c["samples"]["e2e"]) == 6    # 3 pairs in each of 2 processes
    assert all(v > 1.5 for v in ratio["process_p50s"])


def _record(run_id: str, ratio: dict | None = None, p50: float = 0.1, status: str = "passed",
            samples=(0.1, 0.1)) -> dict:
    r = Record.for_case(Case("tiny-sd", "diffusers"), run_id, env={"cpu": {"model": "AMD EPYC"}}, status=status,
                        e2e={"p50": p50, "p25": p50, "p75": p50, "n": len(samples)}, samples={"e2e": list(samples)})
    if ratio is not None:
        r.paired = {"with_run": "A", "side": "current", "ratio_current_over_baseline": ratio}
    return r.to_dict()


def test_spread_between_processes_widens_the_paired_band():
    """Each process pair's calls agree tightly (+10 % with a tiny IQR), but the pairs say +0, +10 and +20 %: one
    process landing badly is not a regression the pairs inside it can vouch for."""
    tight = {"p50": 1.10, "p25": 1.099, "p75": 1.101, "n": 51}
    row = next(r for r in gate.compare([_record("A")], [_record("B", tight)], ["e2e.p50:+5%"]).rows
               if r.metric == "e2e.p50")
    assert row.verdict == "REGRESSED"
    spread = {**tight, "process_p50s": [1.0, 1.10, 1.20]}
    row = next(r for r in gate.compare([_record("A")], [_record("B", spread)], ["e2e.p50:+5%"]).rows
               if r.metric == "e2e.p50")
    assert row.verdict == "PASS" and "3 process pairs' median ratios" in row.note
    agree = {**tight, "process_p50s": [1.099, 1.10, 1.101]}
    row = next(r for r in gate.compare([_record("A")], [_record("B", agree)], ["e2e.p50:+5%"]).rows
               if r.metric == "e2e.p50")
    assert row.verdict == "REGRESSED"


def test_merge_processes_pools_calls_and_keeps_failures():
    a, b, c = (_record("R", p50=p, samples=(p, p * 1.01)) for p in (0.10, 0.30, 0.20))
    merged = merge_processes([a, b, c])
    assert merged["e2e"]["n"] == 6 and sorted(merged["samples"]["e2e"]) == sorted(
        a["samples"]["e2e"] + b["samples"]["e2e"] + c["samples"]["e2e"])
    assert merged["timing"]["repeats"] == 6 and "3 processes" in merged["notes"][-1]
    failed = _record("R", status="failed")
    assert merge_processes([a, failed, c]) is failed


def test_ab_defaults_judge_the_paired_centre_not_the_tail_of_few_calls():
    """One slow call among an A/B run's 40 moves their p99 (about their maximum) by +37 %: `diffbench ab`'s default
    thresholds leave that tail alone (docs/gate.md, round 9 of the quiet rounds) and still catch a 10 % step."""
    import numpy as np
    from harness.commands import AB_THRESHOLDS
    rng = np.random.default_rng(3)
    base = 0.1 * (1 + 0.02 * rng.standard_normal(40))
    spiky = 0.1 * (1 + 0.02 * rng.standard_normal(40))
    spiky[7] = base.max() * 1.6

    def sampled(run_id, calls, ratio=None):
        r = _record(run_id, ratio, p50=float(np.median(calls)), samples=calls)
        r["e2e"].update({"p99": float(np.percentile(calls, 99)), "std": float(np.std(calls))})
        return r
    steady = {"p50": 1.0, "p25": 0.99, "p75": 1.01, "n": 40, "process_p50s": [0.99, 1.01, 1.0, 1.0]}
    tail = next(r for r in gate.compare([sampled("A", base)], [sampled("B", spiky, steady)], ["e2e.p99:+15%"]).rows
                if r.metric == "e2e.p99")
    assert float(tail.change.rstrip("%")) > 15   # the tail did move
    result = gate.compare([sampled("A", base)], [sampled("B", spiky, steady)], AB_THRESHOLDS)
    assert result.exit_code == 0 and "e2e.p99" not in {r.metric for r in result.rows}, result.table(all_rows=True)
    slowed = {"p50": 1.10, "p25": 1.09, "p75": 1.11, "n": 40, "process_p50s": [1.09, 1.11, 1.10, 1.10]}
    result = gate.compare([sampled("A", base)], [sampled("B", base * 1.1, slowed)], AB_THRESHOLDS)
    assert {r.metric for r in result.rows if r.verdict == "REGRESSED"} == {"e2e.p50"}, result.table(all_rows=True)
