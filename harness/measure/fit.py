"""What fits in N GB: for each memory budget, the fastest correct configuration of a model and its largest batch.

    diffbench fit --model sd15 --budget 4GB --budget 8GB [--variants diffusers+vae-tiling ...] [--max-batch 64]

Every trial is an ordinary case (model x backend+variant x dtype x batch x size x steps) measured in its own worker
process (harness/measure/worker_process.py), so each peak is the case's own and a crash or an out-of-memory stays
in its worker.
On GPU a trial runs under a real allocator cap of the budget (one run folder per budget); on CPU a trial runs once
and its measured inference peak (process tree) is held against every budget.

Search, per variant and budget: batch 1, 2, 4, ... while it fits, then bisection between the last batch that fit
and the first that did not, never beyond --max-batch (the answer then reads ">= max"), and never past --time-cap
seconds for the whole fit (then it says where it stopped). The largest fitting batch of each variant and budget is
run --confirm more times: its success rate. The fastest configuration of a budget is the passing one with the
lowest batch-1 e2e p50 (the latency of one image); its largest batch is reported beside it.

The table is a pure function of records (table_from_records), so it can be redrawn from merged runs of several
machines; fit.csv / fit.json are that table, written into the fit's run folder with the report.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from harness.measure.memory import isolated
from harness.selection.cases import Case

DEFAULT_MAX_BATCH = 64
DEFAULT_TIME_CAP_S = 1800.0
DEFAULT_CONFIRM = 2


@dataclass
class Trial:
    """One measured configuration, as fit needs it (from a record)."""
    case_id: str
    backend_spec: str
    batch: int
    status: str
    peak_mb: float | None
    e2e_p50_s: float | None
    limit_mb: float | None = None        # the cap it ran under (GPU), None when measured without one
    reason: str = ""
    isolated: bool | None = True         # False: measured in a process shared with earlier cases

    def fits(self, budget_mb: float) -> bool:
        if self.status != "passed" or self.peak_mb is None:
            return False
        if self.isolated is False:
            return False                   # its peak holds what earlier cases left: it cannot tell what fits
        if self.limit_mb is not None and self.limit_mb != budget_mb:
            return False                   # ran under another budget's cap: says nothing about this one
        return self.peak_mb <= budget_mb


def trial_from_record(record: dict) -> Trial:
    spec = f"{record['backend']}+{record['variant']}" if record.get("variant") else record["backend"]
    budget = record.get("budget") or {}
    return Trial(record["case_id"], spec, record["batch"], record["status"],
                 (record.get("memory") or {}).get("peak_mb") or budget.get("peak_mb"),
                 (record.get("e2e") or {}).get("p50"), budget.get("limit_mb") if budget.get("capped") else None,
                 record.get("reason") or "", isolated(record))


# -- the search ----------------------------------------------------------------------------------------------------
@dataclass
class Search:
    """The largest batch that fits one budget, found with as few trials as doubling + bisection allow."""
    largest: int | None = None        # None: not even batch 1 fits
    capped: bool = False              # fits at max_batch: the true largest is >= max_batch
    stopped: str = ""                 # why the search ended early (time cap), else ""
    tried: list[int] = field(default_factory=list)


def largest_batch(fits: Callable[[int], bool | None], max_batch: int, out_of_time: Callable[[], bool]) -> Search:
    """fits(batch) -> True / False, or None when that batch cannot be judged (unsupported, error): the search
    treats it as not fitting. Doubling from 1 while it fits, then bisection."""
    result = Search()

    def check(batch: int) -> bool:
        result.tried.append(batch)
        return bool(fits(batch))

    good, bad, batch = 0, None, 1
    while batch <= max_batch:
        if out_of_time():
            result.stopped = f"time cap reached before batch {batch}"
            break
        if check(batch):
            good, batch = batch, batch * 2
        else:
            bad = batch
            break
    if bad is None and good and good < max_batch and not result.stopped:
        # every power of two up to max_batch fit: max_batch itself decides, or bisection below it
        if check(max_batch):
            good = max_batch
        else:
            bad = max_batch
    while bad is not None and bad - good > 1 and not result.stopped:
        if out_of_time():
            result.stopped = f"time cap reached while bisecting between {good} and {bad}"
            break
        middle = (good + bad) // 2
        if check(middle):
            good = middle
        else:
            bad = middle
    result.largest = good or None
    result.capped = good == max_batch
    return result


# -- the table -----------------------------------------------------------------------------------------------------
def table_from_records(records: list[dict], budgets_mb: list[float], max_batch: int = DEFAULT_MAX_BATCH) -> list[dict]:
    """For every budget: every configuration that fits at batch 1, fastest first (batch-1 e2e p50), with its
    largest fitting batch (">= max" when it fit at max_batch), peak and success rate; or one row saying nothing
    fits."""
    trials = [trial_from_record(r) for r in records]
    rows = []
    for budget in budgets_mb:
        by_spec: dict[str, list[Trial]] = {}
        for t in trials:
            by_spec.setdefault(t.backend_spec, []).append(t)
        fitting = []
        for spec, group in by_spec.items():
            at_one = [t for t in group if t.batch == 1 and t.fits(budget)]
            if not at_one:
                continue
            fits_batches = sorted({t.batch for t in group if t.fits(budget)})
            largest = max(fits_batches)
            runs = [t for t in group if t.batch == largest and (t.limit_mb in (None, budget))]
            success = sum(t.fits(budget) for t in runs) / len(runs)
            p50 = float(np.median([t.e2e_p50_s for t in at_one if t.e2e_p50_s is not None]))
            peak = max(t.peak_mb for t in group if t.batch == largest and t.fits(budget))
            per_image = [t.e2e_p50_s / t.batch for t in group if t.batch == largest and t.fits(budget)
                         and t.e2e_p50_s]
            fitting.append({"budget_mb": budget, "configuration": spec, "e2e_p50_ms": p50 * 1000,
                            "largest_batch": f">= {largest}" if largest >= max_batch else str(largest),
                            "peak_mb_at_largest": peak, "success_rate": success,
                            "images_per_s_at_largest": 1.0 / min(per_image) if per_image else None})
        if not fitting:
            rows.append({"budget_mb": budget, "configuration": "nothing fits", "e2e_p50_ms": None,
                         "largest_batch": "-", "peak_mb_at_largest": None, "success_rate": None,
                         "images_per_s_at_largest": None})
            continue
        fitting.sort(key=lambda row: row["e2e_p50_ms"])
        fitting[0]["fastest"] = True
        rows.extend(fitting)
    return rows


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (peak MB, latency) that no other point beats on both (lower is better)."""
    front = []
    for i, (m, t) in enumerate(points):
        if not any((m2 <= m and t2 <= t) and (m2 < m or t2 < t) for j, (m2, t2) in enumerate(points) if j != i):
            front.append(i)
    return front


# -- the driver ----------------------------------------------------------------------------------------------------
@dataclass
class FitPlan:
    model: str
    variants: list[str]                  # canonical backend specs
    budgets_mb: list[float]
    dtype: str = "fp32"
    height: int = 64
    width: int = 64
    steps: int = 4
    max_batch: int = DEFAULT_MAX_BATCH
    time_cap_s: float = DEFAULT_TIME_CAP_S
    confirm: int = DEFAULT_CONFIRM


def run_fit(plan: FitPlan, measure: Callable[[Case, float | None, int], dict], device: str,
            log: Callable[[str], None] = print) -> dict:
    """Search every variant against every budget. measure(case, budget_mb or None, attempt) returns the record
    dict of that trial (a fresh worker each time); on CPU trials run without a cap and are shared by all budgets."""
    started = time.monotonic()
    out_of_time = lambda: time.monotonic() - started > plan.time_cap_s   # noqa: E731
    records: list[dict] = []
    cache: dict[tuple, dict] = {}
    searches = []

    def trial(spec: str, batch: int, budget: float | None, attempt: int = 0) -> dict:
        key = (spec, batch, budget if device == "cuda" else None, attempt)
        if key not in cache:
            backend, _, variant = spec.partition("+")
            case = Case(plan.model, backend, variant, plan.dtype, batch, plan.height, plan.width, plan.steps)
            record = measure(case, key[2], attempt)
            cache[key] = record
            records.append(record)
            peak = (record.get("memory") or {}).get("peak_mb")
            log(f"  {record['status']:<12} {case.id}" + (f" under {budget:g} MB" if key[2] else "")
                + (f"  peak {peak:.0f} MB" if peak else "") + (f"  ({record['reason'][:80]})"
                                                               if record.get("reason") else ""))
        return cache[key]

    for spec in plan.variants:
        for budget in sorted(plan.budgets_mb):
            def fits(batch: int, spec=spec, budget=budget) -> bool:
                return trial_from_record(trial(spec, batch, budget)).fits(budget)
            search = largest_batch(fits, plan.max_batch, out_of_time)
            searches.append({"configuration": spec, "budget_mb": budget, **asdict(search)})
            if search.largest:
                for attempt in range(1, plan.confirm + 1):
                    if out_of_time():
                        break
                    trial(spec, search.largest, budget, attempt)
    return {"records": records, "searches": searches, "elapsed_s": time.monotonic() - started,
            "time_cap_reached": out_of_time()}


def write_outputs(out_dir: Path, plan: FitPlan, records: list[dict], searches: list[dict], elapsed_s: float) -> dict:
    """fit.json (plan, searches, table) and fit.csv (the table) in the fit's run folder."""
    import pandas as pd
    table = table_from_records(records, plan.budgets_mb, plan.max_batch)
    document = {"plan": asdict(plan), "table": table, "searches": searches, "elapsed_s": elapsed_s,
                "trials": len(records)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fit.json").write_text(json.dumps(document, indent=1, default=str))
    pd.DataFrame(table).to_csv(out_dir / "fit.csv", index=False)
    return document
