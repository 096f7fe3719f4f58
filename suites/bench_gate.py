"""Benchmark: does the gate pass an unchanged build and catch a real 10 % slowdown on this noisy machine?

The slowdown is real work: the test-only `faulty+slow` backend (the reference pipeline plus a busy-wait of
DIFFBENCH_FAULT_SLEEP seconds in every denoiser call), sized to --slowdown of the baseline's e2e p50.

  stored  -- the classic gate: m baseline runs saved with `diffbench baseline save`, then an unchanged run and a
             slowed run, each a separate `diffbench run` (a fresh process, minutes apart, like CI)
  ab      -- `diffbench ab` with its defaults: baseline and current builds call by call in alternation, --rounds
             times each for an unchanged current and a slowed one (--threshold applies to the stored mode);
             --processes/--repeats/--warmup override ab's defaults, --log appends one JSON line per round
             (time, load average, measured change, band and verdict of each side)

  simulate -- no pipeline: the gate's paired rule (harness/verdict/noise.py paired_band, the +5 % threshold) on synthetic
             call-pair ratios, heavy-tailed call noise plus a per-process bias, to show how often each setting of
             process pairs x calls flags an unchanged and a 10 % slower build (seconds; seeded)

    python -m suites.bench_gate [--mode ab|stored|both|simulate] [--slowdown 0.10] [--rounds 3] [--threshold e2e.p50:+5%]
                                [--processes P] [--repeats N] [--warmup W] [--log rounds.jsonl]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from harness.verdict import noise
from harness.measure.timing import stats

ROOT = Path(__file__).resolve().parent.parent
BACKEND = "faulty+slow"


def _cli(*args: str, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DIFFBENCH_PLUGINS": "suites.fault_backends", **(env or {})}
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=ROOT, env=env, check=check,
                          capture_output=True, text=True)


def _first(records: Path) -> dict:
    return json.loads(records.read_text().splitlines()[0])


def _verdict(proc: subprocess.CompletedProcess, threshold: str) -> str:
    verdict = {0: "PASS", 1: "REGRESSED"}.get(proc.returncode, f"exit {proc.returncode}: {proc.stderr[-300:]}")
    row = next((line for line in proc.stdout.splitlines() if "e2e.p50" in line and threshold in line), "")
    return f"{verdict:<9} {row.split(threshold, 1)[0].split()[-1] if row else '':>7}  " \
           f"{row.split(threshold, 1)[-1].strip() if row else ''}"


def stored(args, tmp: Path) -> None:
    def run(name: str, sleep: float) -> Path:
        _cli("run", "--model", args.model, "--backend", BACKEND, "--no-report", "--results-dir", str(tmp / name),
             env={"DIFFBENCH_FAULT_SLEEP": f"{sleep:.6f}"}, check=True)
        return next((tmp / name).glob("*/records.jsonl"))
    base = [run(f"a{i}", 0.0) for i in range(args.baseline_runs)]
    b = run("b", 0.0)
    sleep = args.slowdown * _first(base[0])["e2e"]["p50"] / _first(base[0])["steps"]
    c = run("c", sleep)
    _cli("baseline", "save", *map(str, base), "-o", str(tmp / "baseline.jsonl"), check=True)
    p50s = [round(_first(p)["e2e"]["p50"] * 1e3, 1) for p in base]
    print(f"stored: baseline runs e2e p50 {p50s} ms; unchanged {_first(b)['e2e']['p50'] * 1e3:.1f}; "
          f"{args.slowdown:.0%} slower {_first(c)['e2e']['p50'] * 1e3:.1f}")
    for label, baseline in (("1 baseline run", base[0]), (f"{len(base)} baseline runs", tmp / "baseline.jsonl")):
        for what, current in (("unchanged", b), (f"{args.slowdown:.0%} slower", c)):
            proc = _cli("gate", "--baseline", str(baseline), "--current", str(current), "--threshold",
                        args.threshold, "--threshold", "status", "--all")
            print(f"  stored  {label:<16} {what:<12} -> {_verdict(proc, args.threshold)}")


def ab(args, tmp: Path) -> None:
    """`diffbench ab` with its own defaults (40 call pairs over 4 process pairs, its thresholds with e2e.p50:+5%)."""
    def run(name: str, sleep: float) -> tuple[subprocess.CompletedProcess, Path]:
        proc = _cli("ab", "--baseline-dir", str(ROOT), "--model", args.model, "--backend", BACKEND, "--no-report",
                    "--all", "--results-dir", str(tmp / name), "--baseline-env", "DIFFBENCH_FAULT_SLEEP=0",
                    "--current-env", f"DIFFBENCH_FAULT_SLEEP={sleep:.6f}",
                    *(["--repeats", str(args.repeats)] if args.repeats else []),
                    *(["--processes", str(args.processes)] if args.processes else []),
                    *(["--warmup", str(args.warmup)] if args.warmup is not None else []))
        return proc, next((tmp / name).glob("ab-*/baseline/*/records.jsonl"))

    def measured(proc: subprocess.CompletedProcess, name: str, started: float) -> dict:
        """What the gate saw for e2e.p50: the paired change, its band and how the band was made."""
        current = _first(next((tmp / name).glob("ab-*/current/*/records.jsonl")))
        ratio = current["paired"]["ratio_current_over_baseline"]
        pct, band, kind = noise.paired_band(ratio)
        calls_band = noise.paired_band({**ratio, "process_p50s": []})[1]   # the call pairs' band alone
        return {"exit": proc.returncode, "change_pct": round(pct, 2), "band_pct": round(band, 2), "band": kind,
                "call_pairs_band_pct": round(calls_band, 2),
                "process_change_pct": [round((v - 1) * 100, 2) for v in ratio.get("process_p50s") or []],
                "pairs": ratio["n"], "seconds": round(time.monotonic() - started), "flagged": flagged(proc)}

    def flagged(proc: subprocess.CompletedProcess) -> str:
        metrics = sorted({re.search(r"\s(e2e\.\w+|memory\.peak|parity\.psnr|status)\s", line).group(1)
                          for line in proc.stdout.splitlines() if line.startswith("REGRESSED")})
        return f"regressed: {', '.join(metrics) or 'nothing'}"
    for i in range(args.rounds):
        started, load = time.monotonic(), os.getloadavg()
        row = {"round": i + 1, "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "processes": args.processes,
               "repeats": args.repeats, "warmup": args.warmup}   # None: ab's default
        same, base = run(f"ab-same{i}", 0.0)
        row["unchanged"] = measured(same, f"ab-same{i}", started)
        sleep = args.slowdown * _first(base)["e2e"]["p50"] / _first(base)["steps"]
        started = time.monotonic()
        slow, _ = run(f"ab-slow{i}", sleep)
        row["slowed"] = measured(slow, f"ab-slow{i}", started)
        row["baseline_p50_ms"] = round(_first(base)["e2e"]["p50"] * 1e3, 1)
        row["load_1min"] = [round(load[0], 2), round(os.getloadavg()[0], 2)]   # at the round's start and end
        if args.log:
            with open(args.log, "a") as log:
                log.write(json.dumps(row) + "\n")
        print(f"  ab round {i + 1}: baseline e2e p50 {_first(base)['e2e']['p50'] * 1e3:.1f} ms")
        print(f"    unchanged        -> {_verdict(same, 'e2e.p50:+5%')}  [{flagged(same)}]")
        print(f"    {args.slowdown:.0%} slower       -> {_verdict(slow, 'e2e.p50:+5%')}  [{flagged(slow)}]")


def simulate(args) -> None:
    """How often the paired rule flags a build, by process pairs x calls each, with and without a per-process bias.
    Call noise: Student-t (3 degrees of freedom, heavy tails as on the shared VM) with a scale that gives 50 pairs
    in one process a call-pair band of about 3-4 %; a process's bias: normal, sd --process-bias."""
    rng = np.random.default_rng(0)
    settings = [(1, 50), (3, 17), (4, 13), (6, 9), (8, 7), (10, 5)]
    print(f"simulate: {args.trials} trials per line; call noise sd 9 % (t3), process bias sd 0 or "
          f"{args.process_bias:.0%}; flagged = change > +5 % and beyond the paired band")
    for bias in (0.0, args.process_bias):
        for processes, calls in settings:
            line = f"  bias {bias:4.0%}  {processes:2d} processes x {calls:2d} pairs:"
            for change in (0.0, args.slowdown):
                flagged, bands = 0, []
                for _ in range(args.trials):
                    log_ratio = (rng.normal(0, bias, (processes, 1))
                                 + 0.09 * rng.standard_t(3, (processes, calls)) / np.sqrt(3))
                    ratios = (1 + change) * np.exp(log_ratio)
                    ratio = stats(ratios.ravel())
                    if processes > 1:
                        ratio["process_p50s"] = list(np.median(ratios, axis=1))
                    pct, band, _kind = noise.paired_band(ratio)
                    flagged += pct > 5 and pct > band
                    bands.append(band)
                line += (f"  {'unchanged' if change == 0 else f'{change:.0%} slower'} flagged "
                         f"{flagged / args.trials:6.1%} (band median ±{np.median(bands):.1f}%, "
                         f"95th ±{np.percentile(bands, 95):.1f}%)")
            print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("ab", "stored", "both", "simulate"), default="both")
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--slowdown", type=float, default=0.10)
    parser.add_argument("--rounds", type=int, default=3, help="A/B rounds (each: unchanged, then slowed)")
    parser.add_argument("--repeats", type=int, help="A/B call pairs (default: diffbench ab's default)")
    parser.add_argument("--processes", type=int, help="A/B process pairs (default: diffbench ab's default)")
    parser.add_argument("--warmup", type=int, help="A/B warm-up call pairs (default: diffbench ab's default)")
    parser.add_argument("--log", help="A/B: append one JSON line per round to this file")
    parser.add_argument("--trials", type=int, default=2000, help="simulate: trials per setting")
    parser.add_argument("--process-bias", type=float, default=0.03, help="simulate: sd of a process's bias")
    parser.add_argument("--baseline-runs", type=int, default=3)
    parser.add_argument("--threshold", default="e2e.p50:+5%")
    args = parser.parse_args()
    if args.mode == "simulate":
        return simulate(args)
    tmp = Path(tempfile.mkdtemp(prefix="diffbench-gate-"))
    if args.mode in ("stored", "both"):
        stored(args, tmp)
    if args.mode in ("ab", "both"):
        ab(args, tmp)
    print(f"records under {tmp}")


if __name__ == "__main__":
    main()
