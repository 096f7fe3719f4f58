"""Benchmark: how often do change points (harness/verdict/changepoint.py) and the history gate's rule find what is there,
and only that, on simulated series? No records, no store: values with Gaussian noise, seeded.

For each shape, --series simulated series: how many got which change points, and how many would fail the history
gate at --threshold (the newest segment's median against the first's). Flat series of several lengths and noise
levels give the false-alarm rate.

    python -m suites.bench_changepoint [--series 200] [--noise 0.01] [--threshold 5]
"""
from __future__ import annotations

import argparse
from collections import Counter

import numpy as np

from harness.verdict.changepoint import change_points, segments

SHAPES = {
    "creep +2%/run, 8 runs": [1.02 ** i for i in range(8)],
    "step: 4 flat, 2 at +12%": [1.0] * 4 + [1.12] * 2,
    "step: 4 flat, 4 at +12%": [1.0] * 4 + [1.12] * 4,
    "flat, 8 runs": [1.0] * 8,
    "one +15% run in the middle": [1.0] * 4 + [1.15] + [1.0] * 4,
    "one +15% run, second of 20": [1.0, 1.15] + [1.0] * 18,
    "one +15% run, the newest": [1.0] * 7 + [1.15],
}


def gate_fails(values: np.ndarray, changes: list[int], threshold_pct: float) -> bool:
    segs = segments(len(values), changes)
    first, last = values[slice(*segs[0])], values[slice(*segs[-1])]
    return (np.median(last) / np.median(first) - 1) * 100 > threshold_pct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=200)
    parser.add_argument("--noise", type=float, default=0.01, help="relative noise of one run (sigma)")
    parser.add_argument("--threshold", type=float, default=5.0, help="history gate threshold in %%")
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    print(f"{args.series} series per shape, noise sigma {args.noise:.1%}, gate at +{args.threshold:g}%")
    for name, levels in SHAPES.items():
        found, fails = Counter(), 0
        for _ in range(args.series):
            values = np.array(levels) * (1 + rng.normal(0, args.noise, len(levels)))
            changes = change_points(values)
            found[tuple(changes)] += 1
            fails += gate_fails(values, changes, args.threshold)
        common = ", ".join(f"{list(k) or 'none'}: {n}" for k, n in found.most_common(3))
        print(f"  {name:<28} gate fails {fails:>4}/{args.series}   change points {common}")
    for sigma in (args.noise, 5 * args.noise):
        for n in (6, 8, 12, 20):
            any_change = fails = 0
            for _ in range(args.series):
                values = 1 + rng.normal(0, sigma, n)
                changes = change_points(values)
                any_change += bool(changes)
                fails += gate_fails(values, changes, args.threshold)
            print(f"  flat, {n:>2} runs, noise {sigma:.0%}: a change point in {any_change / args.series:.1%}, "
                  f"gate fails {fails / args.series:.1%}")


if __name__ == "__main__":
    main()
