"""Benchmark: is the gate trustworthy on this noisy machine with the default repeats?

Real runs of the same case, through the CLI (a fresh process each, like CI):
  A1..Am -- the baseline: unchanged build, `faulty+slow` with a 0 s busy-wait (identical to the reference pipeline)
  B      -- unchanged build again
  C      -- a busy-wait per denoiser call sized to slow the whole pipeline call by --slowdown
Then `diffbench gate` against A1 alone and against all m baseline runs, for B (must PASS) and C (must REGRESS).

    python -m suites.bench_gate [--slowdown 0.10] [--repeats 10] [--baseline-runs 3] [--threshold e2e.p50:+5%]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_RUNNER = "import sys; from suites import fault_backends; fault_backends.register(); " \
          "from harness.cli import main; sys.exit(main(sys.argv[1:]))"


def _run(out: Path, model: str, sleep_s: float, warmup: int, repeats: int) -> Path:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DIFFBENCH_FAULT_SLEEP": f"{sleep_s:.6f}"}
    subprocess.run([sys.executable, "-c", _RUNNER, "run", "--model", model, "--backend", "faulty+slow",
                    "--warmup", str(warmup), "--repeats", str(repeats), "--no-report", "--results-dir", str(out)],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    return next(out.glob("*/records.jsonl"))


def _gate(baseline: Path, current: Path, threshold: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "gate", "--baseline", str(baseline), "--current",
                           str(current), "--threshold", threshold, "--threshold", "status"],
                          cwd=ROOT, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def _p50(records: Path) -> float:
    return json.loads(records.read_text().splitlines()[0])["e2e"]["p50"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--slowdown", type=float, default=0.10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--baseline-runs", type=int, default=3)
    parser.add_argument("--threshold", default="e2e.p50:+5%")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="diffbench-gate-"))
    base = [_run(tmp / f"a{i}", args.model, 0.0, args.warmup, args.repeats) for i in range(args.baseline_runs)]
    first = json.loads(base[0].read_text().splitlines()[0])
    b = _run(tmp / "b", args.model, 0.0, args.warmup, args.repeats)
    # size the busy-wait from the fastest baseline call (the machine's real cost; noise only adds) and spread it
    # over the denoiser calls
    fastest = min(json.loads(p.read_text().splitlines()[0])["e2e"]["min"] for p in base)
    sleep = args.slowdown * fastest / first["steps"]
    c = _run(tmp / "c", args.model, sleep, args.warmup, args.repeats)
    subprocess.run([sys.executable, "-m", "harness.cli", "baseline", "save", *map(str, base), "-o",
                    str(tmp / "baseline.jsonl")], cwd=ROOT, check=True, capture_output=True)
    print(f"baseline runs e2e p50 (ms): {[round(_p50(p) * 1e3, 1) for p in base]}; "
          f"unchanged {_p50(b) * 1e3:.1f}; {args.slowdown:.0%} slower {_p50(c) * 1e3:.1f}")
    for label, baseline in (("one baseline run", base[0]), (f"{len(base)} baseline runs", tmp / "baseline.jsonl")):
        for what, current in (("unchanged", b), (f"{args.slowdown:.0%} slower", c)):
            code, table = _gate(baseline, current, args.threshold)
            verdict = "REGRESSED" if code == 1 else "PASS" if code == 0 else f"exit {code}"
            note = next((line.split(args.threshold, 1)[-1].strip() for line in table.splitlines()
                         if "e2e.p50" in line and args.threshold in line), "")
            print(f"  {label:<16} {what:<12} -> {verdict:<9} {note}")
    print(f"records under {tmp}")


if __name__ == "__main__":
    main()
