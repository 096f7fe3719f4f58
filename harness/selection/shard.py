"""Split a run's cases into N shards: deterministic, disjoint, complete, balanced; cases of one model stay together
where that keeps the shards balanced (a model is loaded, exported or compiled once per shard).

How (the least-duration idea of pytest-split, applied to groups of cases):
- Weights: each case's expected seconds from earlier records (`expected_durations`), a case without records taking
  the mean of the known ones; with no records at all every case weighs 1.
- Units: first one unit per model. Units are dealt heaviest first to the shard with the least load so far (ties:
  fewer cases, then the lower shard number); equal units are ordered by a stable hash of their cases (sha256, not
  Python's randomised hash()), so every runner computes the same split from the same case list, in any order.
- A model is split (its heaviest unit halved, in case-id order, so a backend's cases stay side by side) while
  there are fewer units than shards, or while the largest shard is more than SPLIT_TOLERANCE above what dealing
  single cases would give. So no shard is empty while N <= cases, and the largest shard is at most
  (1 + SPLIT_TOLERANCE) x that of greedy case-by-case dealing, which is itself at most 4/3 of the best possible
  split (Graham's bound for largest-first dealing).
"""
from __future__ import annotations

import hashlib
import heapq
import math
import re
import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence

from harness.errors import UserError

# how much imbalance keeping a model's cases together may cost before the model is split across shards
SPLIT_TOLERANCE = 0.10


@dataclass(frozen=True)
class Shard:
    index: int   # 1-based
    count: int

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match:
        raise UserError(f"--shard {text!r}: expected I/N, e.g. 2/3")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 1 <= index <= count:
        raise UserError(f"--shard {text}: I must be between 1 and N (N >= 1)")
    return Shard(index, count)


# -- expected durations -------------------------------------------------------------------------------------------
def estimate_seconds(record: dict, warmup: int | None = None, repeats: int | None = None) -> float | None:
    """What running this case again should take, from one earlier record: its cold start (load + build + first
    call) plus (warm-up + measured calls) x its mean call. Calls follow the planned run when `warmup`/`repeats` are
    given, else the record's own. Unsupported: 0 (only the support check runs). None when the record has no
    figures (an error before the first call). Not counted: parity checks and the reference (once per shape)."""
    if record.get("status") == "unsupported":
        return 0.0
    mean = (record.get("e2e") or {}).get("mean")
    cold = record.get("cold_s")
    if mean is None or cold is None:
        return None
    timing = record.get("timing") or {}
    calls = (timing.get("warmup", 0) if warmup is None else warmup) + \
            (timing.get("repeats", 0) if repeats is None else repeats)
    return float(cold) + calls * float(mean)


def expected_durations(records: Iterable[dict], case_ids: Iterable[str] | None = None, warmup: int | None = None,
                       repeats: int | None = None) -> dict[str, float]:
    """case id -> expected seconds, the median over every record of that case (records of several runs or device
    classes: give the ones of the device class you shard for). Only cases with figures; `case_ids` narrows it."""
    wanted = None if case_ids is None else set(case_ids)
    estimates: dict[str, list[float]] = {}
    for record in records:
        if wanted is not None and record["case_id"] not in wanted:
            continue
        seconds = estimate_seconds(record, warmup, repeats)
        if seconds is not None:
            estimates.setdefault(record["case_id"], []).append(seconds)
    return {case_id: statistics.median(values) for case_id, values in estimates.items()}


def case_weights(cases: Sequence, durations: dict[str, float] | None) -> dict[str, float]:
    """Every case's weight: its expected seconds; unknown ones the mean of the known non-zero ones (as
    pytest-split gives unknown tests the average); 1 each when nothing is known."""
    durations = durations or {}
    known = [durations[c.id] for c in cases if c.id in durations]
    positive = [d for d in known if d > 0]
    # fsum: exact, so the mean does not depend on the order the cases came in (every runner must agree)
    fallback = math.fsum(positive) / len(positive) if positive else 1.0
    return {c.id: durations.get(c.id, fallback) for c in cases}


# -- the split ------------------------------------------------------------------------------------------------------
def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


@dataclass(frozen=True)
class _Unit:
    cases: tuple          # Case objects, in case-id order
    weight: float

    @property
    def key(self) -> int:
        return _stable_hash("\n".join(c.id for c in self.cases))


def _deal(units: list[_Unit], count: int) -> list[list[_Unit]]:
    """Largest unit first to the least-loaded shard (ties: fewer cases, then lower shard number)."""
    shards: list[list[_Unit]] = [[] for _ in range(count)]
    heap = [(0.0, 0, i) for i in range(count)]
    for unit in sorted(units, key=lambda u: (-u.weight, u.key)):
        load, n, i = heapq.heappop(heap)
        shards[i].append(unit)
        heapq.heappush(heap, (load + unit.weight, n + len(unit.cases), i))
    return shards


def _largest(shards: list[list[_Unit]]) -> float:
    return max((sum(u.weight for u in s) for s in shards), default=0.0)


def _halves(unit: _Unit, weights: dict[str, float]) -> tuple[_Unit, _Unit]:
    """Two contiguous parts (in case-id order) of as equal weight as possible, each with at least one case."""
    cases = unit.cases
    best, cut, running = None, 1, 0.0
    for i in range(1, len(cases)):
        running += weights[cases[i - 1].id]
        gap = abs(2 * running - unit.weight)
        if best is None or gap < best:
            best, cut = gap, i
    left, right = cases[:cut], cases[cut:]
    return _Unit(left, math.fsum(weights[c.id] for c in left)), _Unit(right, math.fsum(weights[c.id] for c in right))


def assign(cases: Sequence, count: int, durations: dict[str, float] | None = None) -> list[list]:
    """The `count` shards of `cases`: lists of cases, each in the order the cases were given."""
    if count < 1:
        raise UserError(f"shard count must be >= 1, got {count}")
    weights = case_weights(cases, durations)
    ordered = sorted(cases, key=lambda c: c.id)
    by_model: dict[str, list] = {}
    for case in ordered:
        by_model.setdefault(case.model, []).append(case)
    units = [_Unit(tuple(group), math.fsum(weights[c.id] for c in group)) for group in by_model.values()]
    singles = _largest(_deal([_Unit((c,), weights[c.id]) for c in ordered], count))
    while True:
        shards = _deal(units, count)
        balanced = _largest(shards) <= (1 + SPLIT_TOLERANCE) * singles + 1e-9
        splittable = [u for u in units if len(u.cases) > 1]
        if (len(units) >= count and balanced) or not splittable:
            break
        heaviest = max(splittable, key=lambda u: (u.weight, len(u.cases), u.key))
        units.remove(heaviest)
        units.extend(_halves(heaviest, weights))
    position = {c.id: i for i, c in enumerate(cases)}
    return [sorted((c for u in shard for c in u.cases), key=lambda c: position[c.id]) for shard in shards]


def select(cases: Sequence, shard: Shard, durations: dict[str, float] | None = None) -> list:
    """The cases of one shard, in the order given."""
    return assign(cases, shard.count, durations)[shard.index - 1]
