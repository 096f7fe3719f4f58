"""Where did a series of runs change? Change-point detection over one metric's values, oldest run first.

Binary segmentation with a Student t-test, the way Apache Otava (formerly Hunter) judges the splits its E-divisive
search proposes: the split of a segment that best separates the two sides' means is a change point when

  1. its t statistic (difference of the means over the pooled standard error of the two sides -- the noise comes
     from the runs themselves) is larger than the same maximum over every allowed split of a series of the same
     length made of pure Gaussian noise in at least 1 - ALPHA of simulated series (a seeded Monte Carlo table, so
     the search over split positions is paid for and the same values always give the same answer), and
  2. it survives every run being left out in turn (a two-sided t-test at ALPHA on the same split without that run):
     one noisy run is never a change, wherever it lands;

and both sides then hold at least MIN_SEGMENT runs. Each side is searched again the same way. Why not a permutation
test: with the handful of runs a gate sees, the permutation distribution is too coarse to say anything (a perfect
4-against-4 split has a p-value of 2/70 at best, a 4-against-2 one 2/15). Why not `ruptures` (it installs beside the
pinned stack): it finds the best splits for a given penalty or count, the easy part here; the noise model, the
significance and the one-run rule -- what decides whether a gate fails -- would still be ours.

This module knows nothing of records or stores: a list of floats in, the indices where new segments start out.
"""
from __future__ import annotations

import functools

import numpy as np
from scipy import stats

MIN_SEGMENT = 2      # runs on each side of a change: a lone run can never be a segment of its own
ALPHA = 0.05         # false-change rate of one search over a flat Gaussian series
_SIMULATIONS = 4000


def _split_t(values: np.ndarray, min_segment: int) -> tuple[np.ndarray, np.ndarray]:
    """t statistic of every allowed split of each row: (split positions k, |t| per row and k). A split at k puts
    values[:k] on the left. Vectorised over rows, so the Monte Carlo table and one series share the code."""
    n = values.shape[-1]
    ks = np.arange(min_segment, n - min_segment + 1)
    csum, csq = np.cumsum(values, axis=-1), np.cumsum(values * values, axis=-1)
    left_n, right_n = ks, n - ks
    left_sum, left_sq = csum[..., ks - 1], csq[..., ks - 1]
    right_sum, right_sq = csum[..., -1:] - left_sum, csq[..., -1:] - left_sq
    left_mean, right_mean = left_sum / left_n, right_sum / right_n
    within = (left_sq - left_n * left_mean ** 2) + (right_sq - right_n * right_mean ** 2)
    pooled_var = np.maximum(within, 0.0) / (n - 2)
    se = np.sqrt(pooled_var * (1 / left_n + 1 / right_n))
    diff = np.abs(right_mean - left_mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, diff / np.where(se > 0, se, 1.0), np.where(diff > 0, np.inf, 0.0))
    return ks, t


@functools.lru_cache(maxsize=256)
def _null_max_t(n: int, min_segment: int) -> np.ndarray:
    """Sorted maxima over the allowed splits of |t| for seeded Gaussian series of length n."""
    rng = np.random.default_rng(0)
    rows = max(1, min(_SIMULATIONS, 2_000_000 // n))   # in chunks: a long history must not take gigabytes
    maxima = [_split_t(rng.standard_normal((min(rows, _SIMULATIONS - done), n)), min_segment)[1].max(axis=-1)
              for done in range(0, _SIMULATIONS, rows)]
    return np.sort(np.concatenate(maxima))


def _max_t_pvalue(t: float, n: int, min_segment: int) -> float:
    table = _null_max_t(n, min_segment)
    return (table.size - np.searchsorted(table, t, side="left") + 1) / (table.size + 1)


def _holds_without_each_run(values: np.ndarray, k: int, alpha: float) -> bool:
    """The split at k is still significant (two-sided t-test) with any one run left out."""
    n = values.size
    for i in range(n):
        rest = np.delete(values, i)
        split = k - 1 if i < k else k
        left, right = rest[:split], rest[split:]
        if left.size == 0 or right.size == 0 or n - 1 < 3:
            return False
        within = ((left - left.mean()) ** 2).sum() + ((right - right.mean()) ** 2).sum()
        se = np.sqrt(within / (n - 3) * (1 / left.size + 1 / right.size))
        diff = abs(right.mean() - left.mean())
        if se == 0:
            if diff == 0:
                return False
            continue
        if 2 * stats.t.sf(diff / se, n - 3) > alpha:
            return False
    return True


def _search(values: np.ndarray, offset: int, min_segment: int, alpha: float, found: list[int]) -> None:
    n = values.size
    if n < 2 * min_segment or n < 4:
        return
    ks, t = _split_t(values, min_segment)
    for i in np.argsort(-t, kind="stable"):   # the best split first; a lesser one when a single run made the best
        if _max_t_pvalue(float(t[i]), n, min_segment) > alpha:
            return
        k = int(ks[i])
        if _holds_without_each_run(values, k, alpha):
            found.append(offset + k)
            _search(values[:k], offset, min_segment, alpha, found)
            _search(values[k:], offset + k, min_segment, alpha, found)
            return


def change_points(values, min_segment: int = MIN_SEGMENT, alpha: float = ALPHA) -> list[int]:
    """Indices where a new segment starts (sorted); [] for a series without a change. NaN values are not allowed:
    leave out the runs that did not measure the metric."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or not np.all(np.isfinite(x)):
        raise ValueError("change_points needs a 1-D series of finite values")
    found: list[int] = []
    _search(x, 0, min_segment, alpha, found)
    return sorted(found)


def segments(n: int, changes: list[int]) -> list[tuple[int, int]]:
    """[(start, stop)] of the segments a series of n values falls into at the given change points."""
    bounds = [0, *changes, n]
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
