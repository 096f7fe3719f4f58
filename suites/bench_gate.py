"""Benchmark: is the gate trustworthy on this noisy machine with the default repeats?

Three real runs of the same case in one go, through the CLI (fresh process each, like CI):
  A, B -- unchanged build: `faulty+slow` with a 0 s injected sleep (identical to the reference pipeline)
  C    -- the same case with a sleep per denoiser call sized to slow the whole pipeline call by --slowdown
Then `diffbench gate` A vs B (must PASS) and A vs C (must be REGRESSED). Prints both verdicts.

    python -m suites.bench_gate [--slowdown 0.10] [--repeats 10] [--model tiny-sd]
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


def _gate(baseline: Path, current: Path) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "gate", "--baseline", str(baseline), "--current",
                           str(current), "--threshold", "e2e.p50:+5%", "--threshold", "status"],
                          cwd=ROOT, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--slowdown", type=float, default=0.10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="diffbench-gate-"))
    a = _run(tmp / "a", args.model, 0.0, args.warmup, args.repeats)
    b = _run(tmp / "b", args.model, 0.0, args.warmup, args.repeats)
    first = json.loads(a.read_text().splitlines()[0])
    steps = first["steps"]
    sleep = args.slowdown * first["e2e"]["p50"] / steps          # spread the slowdown over the denoiser calls
    c = _run(tmp / "c", args.model, sleep, args.warmup, args.repeats)
    for label, current in (("unchanged (A vs B)", b), (f"{args.slowdown:.0%} slower (A vs C)", c)):
        code, table = _gate(a, current)
        p50 = json.loads(current.read_text().splitlines()[0])["e2e"]["p50"]
        print(f"== {label}: gate exit {code}; e2e p50 {first['e2e']['p50']*1e3:.1f} -> {p50*1e3:.1f} ms")
        print(table)
    print(f"records under {tmp}")


if __name__ == "__main__":
    main()
