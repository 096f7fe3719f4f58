"""Noise statistics of the regression gate: how large a latency change must be before it counts.

Standard-error band (within one run): records carry summary statistics of n repeats. A latency change counts only
when it exceeds the threshold AND k = 3 standard errors of the difference of the two runs -- the Welch-test bound
(a ~99.7 % band if the noise were normal). For the median the per-sample spread comes from the quartiles
(1.253 x IQR / 1.349, robust to one stray repeat; std for records without quartiles), for other statistics from the
std (for p99 that underestimates the noise, so tail gates stay the stricter ones). With n = 1 or no spread the
threshold alone decides.

Bootstrap band (per-call samples): when both records keep every measured call's seconds, the band of an e2e
statistic is a 99.7 % bootstrap interval of its difference -- honest for tails, where std/sqrt(n) is not.

Between-run band: on a shared machine whole runs drift (measured on the 2-core CI VM: one unchanged build gave e2e
p50 from 57.6 to 101.6 ms over six runs while each run's own std was 1-13 ms), which no within-run spread can see.
A baseline that holds several runs of a case gives the gate that drift: the baseline value is then the median over
its runs, and the band is the larger of the within-run band and k x (sample std over the baseline runs) x
sqrt(1 + 1/m) -- a prediction band for one new run around m old ones.

Paired band (A/B runs, harness/verdict/ab.py): when the current record was measured call by call in alternation with the
baseline record, the change is the median of the per-pair ratios current/baseline and the band k standard errors of
that median: the machine's drift is common to both calls of a pair and cancels. What biases a whole process (its
place on the cores, its allocator) does not cancel: an A/B run over several process pairs (`diffbench ab
--processes P`) records each pair's median ratio, and the band is then at least k standard errors of their mean,
k x stdev(process medians) / sqrt(P) -- the spread between processes, as pyperf reports it.
"""
from __future__ import annotations

import math

import numpy as np

NOISE_K = 3.0
# the central statistics an A/B run's per-pair ratios speak for; tails and stages use the unpaired rule
PAIRED_METRICS = ("e2e.p50", "e2e.mean")
BOOTSTRAP_RESAMPLES = 4000
BOOTSTRAP_MIN_CALLS = 8
STANDARD_ERROR_KIND = f"{NOISE_K:g} standard errors of the difference"
_STAT_FUNCTIONS = {
    "p50": lambda a: np.percentile(a, 50, axis=-1), "p90": lambda a: np.percentile(a, 90, axis=-1),
    "p99": lambda a: np.percentile(a, 99, axis=-1), "mean": lambda a: a.mean(axis=-1),
    "min": lambda a: a.min(axis=-1), "max": lambda a: a.max(axis=-1)}


def median_spread(stats: dict) -> float:
    """Per-sample spread for the standard error of a median: from the quartiles when the record has them
    (1.253 x IQR / 1.349 -- one slow outlier does not widen it), else 1.253 x std."""
    if stats.get("p25") is not None and stats.get("p75") is not None:
        return 1.253 * (stats["p75"] - stats["p25"]) / 1.349
    return 1.253 * (stats.get("std") or 0.0)


def standard_error_band(sb: dict, sc: dict, stat: str = "p50") -> float:
    """k standard errors of the difference between the two runs' statistic (0 when a side has no spread)."""
    var = 0.0
    for s in (sb, sc):
        n = s.get("n") or 0
        spread = median_spread(s) if stat == "p50" else (s.get("std") or 0.0)
        if n > 1:
            var += spread * spread / n
    return NOISE_K * math.sqrt(var)


def bootstrap_band(base_samples, current_samples, stat: str) -> tuple[float, str] | None:
    """The half-width, on the side of the observed change, of a 99.7 % bootstrap interval (the k = 3 equivalent) of
    the statistic's difference, and how it was made; None with fewer than BOOTSTRAP_MIN_CALLS calls on a side.
    A p99 of 50 calls is about their maximum, and its interval shows it."""
    xb = np.asarray(base_samples or [], dtype=float)
    xc = np.asarray(current_samples or [], dtype=float)
    if xb.size < BOOTSTRAP_MIN_CALLS or xc.size < BOOTSTRAP_MIN_CALLS:
        return None   # a handful of calls has too few distinct resamples for a 99.7 % interval
    rng = np.random.default_rng(0)   # a fixed seed: the same records always get the same verdict
    fb = _STAT_FUNCTIONS[stat](xb[rng.integers(0, xb.size, (BOOTSTRAP_RESAMPLES, xb.size))])
    fc = _STAT_FUNCTIONS[stat](xc[rng.integers(0, xc.size, (BOOTSTRAP_RESAMPLES, xc.size))])
    observed = _STAT_FUNCTIONS[stat](xc[None, :])[0] - _STAT_FUNCTIONS[stat](xb[None, :])[0]
    tail = (1 - math.erf(NOISE_K / math.sqrt(2))) / 2
    low, high = np.quantile(fc - fb, [tail, 1 - tail])
    half = observed - low if observed > 0 else high - observed
    return float(max(half, 0.0)), f"99.7 % bootstrap interval from {xb.size}+{xc.size} calls"


def between_runs_band(values: list[float]) -> tuple[float | None, float]:
    """Median of a statistic over m baseline runs and its k-sigma prediction band for one new run
    (None, 0 with fewer than 2 runs)."""
    if len(values) < 2:
        return None, 0.0
    values = sorted(values)
    mid = len(values) // 2
    median = values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return median, NOISE_K * std * math.sqrt(1 + 1 / len(values))


def paired_band(ratio: dict) -> tuple[float, float, str]:
    """(change %, band %, how the band was made) from the statistics of the per-pair ratios current/baseline:
    the median ratio, and k standard errors of that median."""
    pct = (ratio["p50"] - 1) * 100
    band = NOISE_K * median_spread(ratio) / math.sqrt(ratio["n"]) * 100
    kind = f"{NOISE_K:g} standard errors of the median of {ratio['n']} interleaved call pairs"
    process_p50s = ratio.get("process_p50s") or []
    if len(process_p50s) >= 2:
        mean = sum(process_p50s) / len(process_p50s)
        stdev = math.sqrt(sum((v - mean) ** 2 for v in process_p50s) / (len(process_p50s) - 1))
        between = NOISE_K * stdev / math.sqrt(len(process_p50s)) * 100
        if between > band:
            return pct, between, (f"{NOISE_K:g} standard errors of the mean of {len(process_p50s)} process pairs' "
                                  f"median ratios")
        kind += f", wider than the spread between {len(process_p50s)} process pairs"
    return pct, band, kind
