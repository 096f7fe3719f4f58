"""diffbench fit: the budget search (on a fake memory model: a real one would take minutes per budget), the table
drawn from records, the Pareto front, and memory budgets on real cases (over_budget records)."""
import pytest

from harness.errors import UserError
from harness.measure import fit
from harness.selection.cases import Case
from harness.selection.options import parse_memory_size


def _fake_measure(peak_per_image_mb: dict[str, float], base_mb: float = 500.0, fail: set = frozenset(),
                  calls: list | None = None):
    """A memory model: peak = base + batch x per-image cost; latency grows with the batch."""
    def measure(case: Case, budget_mb, attempt):
        if calls is not None:
            calls.append((case.backend_spec, case.batch, budget_mb, attempt))
        spec = case.backend_spec
        peak = base_mb + case.batch * peak_per_image_mb[spec]
        status, reason = "passed", ""
        if spec in fail:
            status, reason = "failed", "ParityError"
        budget = {}
        if budget_mb is not None:   # GPU: a real cap; over it the case ran out of memory
            budget = {"limit_mb": budget_mb, "capped": True, "peak_mb": peak}
            if peak > budget_mb:
                status, reason, peak = "over_budget", "out of memory under the budget", None
        return {"case_id": case.id, "backend": case.backend, "variant": case.variant, "batch": case.batch,
                "status": status, "reason": reason, "memory": {"peak_mb": peak}, "budget": budget,
                "e2e": {"p50": 0.05 * case.batch * (1.3 if "slicing" in spec else 1.0)}}
    return measure


def test_largest_batch_doubles_then_bisects():
    tried = []
    result = fit.largest_batch(lambda b: tried.append(b) or b <= 23, 64, lambda: False)
    assert result.largest == 23 and not result.capped
    assert tried[:6] == [1, 2, 4, 8, 16, 32] and len(tried) <= 6 + 4   # log2 bisection between 16 and 32
    assert fit.largest_batch(lambda b: True, 64, lambda: False).largest == 64
    assert fit.largest_batch(lambda b: True, 64, lambda: False).capped
    assert fit.largest_batch(lambda b: b <= 40, 48, lambda: False).largest == 40       # max not a power of two
    assert fit.largest_batch(lambda b: True, 48, lambda: False).tried[-1] == 48
    nothing = fit.largest_batch(lambda b: False, 64, lambda: False)
    assert nothing.largest is None and nothing.tried == [1]
    clock = iter([False, False, True, True, True])
    stopped = fit.largest_batch(lambda b: True, 64, lambda: next(clock))
    assert stopped.largest == 2 and "time cap" in stopped.stopped


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fit_table_on_a_fake_memory_model(device):
    costs = {"diffusers": 100.0, "diffusers+vae-slicing": 60.0, "diffusers+layerwise-fp8": 40.0}
    plan = fit.FitPlan("m", list(costs), [400.0, 2000.0, 6000.0], max_batch=64, confirm=2)
    calls = []
    result = fit.run_fit(plan, _fake_measure(costs, fail={"diffusers+layerwise-fp8"}, calls=calls), device,
                         log=lambda _line: None)
    table = fit.table_from_records(result["records"], plan.budgets_mb, plan.max_batch)
    by_budget = {}
    for row in table:
        by_budget.setdefault(row["budget_mb"], []).append(row)
    assert [r["configuration"] for r in by_budget[400.0]] == ["nothing fits"]   # 500 MB before any image
    small = {r["configuration"]: r for r in by_budget[2000.0]}
    assert set(small) == {"diffusers", "diffusers+vae-slicing"}                 # the failing variant never fits
    assert small["diffusers"]["largest_batch"] == "15" and small["diffusers+vae-slicing"]["largest_batch"] == "25"
    assert small["diffusers"].get("fastest") and small["diffusers"]["success_rate"] == 1.0
    big = {r["configuration"]: r for r in by_budget[6000.0]}
    assert big["diffusers"]["largest_batch"] == "55" and big["diffusers+vae-slicing"]["largest_batch"] == ">= 64"
    if device == "cpu":   # one measurement per (configuration, batch) serves every budget
        assert len({c[:2] + (c[3],) for c in calls}) == len(calls)
    else:                 # a cap per budget: trials are per budget
        assert {c[2] for c in calls} == set(plan.budgets_mb)


def test_fit_table_redraws_from_merged_records_of_two_runs():
    costs = {"diffusers": 100.0}
    plan = fit.FitPlan("m", ["diffusers"], [2000.0], max_batch=8, confirm=0)
    one = fit.run_fit(plan, _fake_measure(costs), "cpu", log=lambda _l: None)["records"]
    two = fit.run_fit(plan, _fake_measure(costs), "cpu", log=lambda _l: None)["records"]
    table = fit.table_from_records(one + two, [2000.0], 8)
    assert table[0]["largest_batch"] == ">= 8" and table[0]["success_rate"] == 1.0


def test_a_peak_measured_in_a_shared_process_never_fits():
    """Records merged from a default CPU run (one process for every case) say nothing about what fits: their peaks
    hold what earlier cases left. Only peaks measured in the case's own worker count."""
    plan = fit.FitPlan("m", ["diffusers"], [2000.0], max_batch=8, confirm=0)
    records = fit.run_fit(plan, _fake_measure({"diffusers": 100.0}), "cpu", log=lambda _l: None)["records"]
    shared = [{**r, "memory": {**r["memory"], "isolated": False, "cases_before": 3}} for r in records]
    assert fit.table_from_records(shared, [2000.0], 8)[0]["configuration"] == "nothing fits"
    own = [{**r, "memory": {**r["memory"], "isolated": True, "cases_before": 0}} for r in records]
    assert fit.table_from_records(own + shared, [2000.0], 8)[0]["largest_batch"] == ">= 8"


def test_pareto_front():
    points = [(100, 50), (200, 40), (150, 60), (300, 30), (300, 45)]
    assert fit.pareto_front(points) == [0, 1, 3]


def test_memory_sizes():
    assert parse_memory_size("12GB", "--budget") == 12 * 1024
    assert parse_memory_size("0.2GB", "--budget") == pytest.approx(204.8)
    assert parse_memory_size("512MB", "--budget") == 512
    for bad in ("12", "twelve GB", "-1GB", "0GB", "5PB"):
        with pytest.raises(UserError):
            parse_memory_size(bad, "--budget")


def test_over_budget_is_a_record_not_a_failure(tmp_path):
    """A real case held to a budget far below what any torch process needs: measured, correct, over_budget."""
    from harness.commands import run_exit_code
    from harness.measure.run_options import RunOptions
    from harness.measure.session import Session
    session = Session(tmp_path, RunOptions(warmup=0, repeats=1, memory_budget_mb=50.0, time_components=False))
    try:
        record = session.result(Case("tiny-sd", "diffusers", steps=1))
    finally:
        session.close()
    assert record.status == "over_budget" and record.error_class == "OverBudget", record.reason
    assert record.budget["limit_mb"] == 50.0 and record.budget["peak_mb"] > 50.0
    assert record.parity["verdict"] == "pass"
    assert run_exit_code([record]) == 0
