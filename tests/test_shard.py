"""--shard I/N: deterministic, disjoint, complete, never an empty shard while N <= cases, balanced within a stated
bound when durations are known, models kept together when that costs no balance; and `diffbench list`."""
import itertools
import json
import random

import numpy as np

import pytest

from harness.cli import main
from harness.errors import UserError
from harness.selection import shard
from harness.selection.cases import Case
from harness.selection.options import select_cases

BACKENDS = ("diffusers", "torch_compile", "onnxruntime", "tensorrt", "triton")


def random_cases(rng: random.Random) -> list[Case]:
    models = [f"m{i}" for i in range(rng.randint(1, 6))]
    cases = {Case(rng.choice(models), rng.choice(BACKENDS), "", rng.choice(("fp32", "bf16")), 1,
                  rng.choice((64, 128)), 64, rng.choice((2, 4))) for _ in range(rng.randint(1, 40))}
    # shuffled from a fixed order: a set's own order follows the per-process string hash seed
    return sorted(sorted(cases, key=lambda c: c.id), key=lambda c: rng.random())


def random_durations(rng: random.Random, cases) -> dict[str, float]:
    """Known for most cases (some zero: unsupported), unknown for a few; a heavy tail as compile cases have."""
    return {c.id: (0.0 if rng.random() < 0.15 else rng.lognormvariate(2, 1.2))
            for c in cases if rng.random() < 0.85}


def loads(shards, weights) -> list[float]:
    return [sum(weights[c.id] for c in s) for s in shards]


@pytest.mark.parametrize("with_durations", [False, True])
def test_many_random_splits_are_disjoint_complete_non_empty_and_deterministic(with_durations):
    rng = random.Random(17)
    for _ in range(300):
        cases = random_cases(rng)
        durations = random_durations(rng, cases) if with_durations else None
        count = rng.randint(1, len(cases) + 3)
        shards = shard.assign(cases, count, durations)
        ids = [c.id for s in shards for c in s]
        assert len(shards) == count
        assert sorted(ids) == sorted(c.id for c in cases), "not complete, or a case in two shards"
        if count <= len(cases):
            assert all(shards), f"an empty shard with {count} shards for {len(cases)} cases"
        else:
            assert sum(1 for s in shards if s) == len(cases)
        # the same split from a shuffled case list (every runner computes it on its own)
        shuffled = sorted(cases, key=lambda c: rng.random())
        again = shard.assign(shuffled, count, durations)
        assert [sorted(c.id for c in s) for s in again] == [sorted(c.id for c in s) for s in shards]
        # each shard keeps the order the cases were given in
        position = {c.id: i for i, c in enumerate(cases)}
        assert all([position[c.id] for c in s] == sorted(position[c.id] for c in s) for s in shards)


def _best_largest(weights: list[float], count: int) -> float:
    """The best possible largest shard, by trying every assignment (small instances only)."""
    w = np.asarray(weights)
    assignment = np.array(list(itertools.product(range(count), repeat=len(w))))
    loads_per_shard = np.stack([(assignment == k) @ w for k in range(count)], axis=1)
    return float(loads_per_shard.max(axis=1).min())


def test_balance_stays_within_the_stated_bound_when_durations_are_known():
    """Largest shard <= (1 + SPLIT_TOLERANCE) x 4/3 x the best possible largest shard (found by exhaustive search
    on instances small enough for it)."""
    rng = random.Random(3)
    worst = 0.0
    for _ in range(200):
        cases = random_cases(rng)[:8]
        durations = random_durations(rng, cases)
        count = rng.randint(1, min(3, len(cases)))
        weights = shard.case_weights(cases, durations)
        largest = max(loads(shard.assign(cases, count, durations), weights))
        best = _best_largest([weights[c.id] for c in cases], count)
        if best:
            ratio = largest / best
            worst = max(worst, ratio)
            assert ratio <= (1 + shard.SPLIT_TOLERANCE) * 4 / 3 + 1e-9, (count, ratio)
    assert worst > 1.0     # the bound was exercised, not met trivially


def test_models_stay_together_when_that_costs_no_balance():
    cases = [Case(m, b) for m in ("a", "b", "c") for b in BACKENDS]
    shards = shard.assign(cases, 3)
    assert sorted({c.model for c in s}.pop() for s in shards) == ["a", "b", "c"]
    assert all(len({c.model for c in s}) == 1 for s in shards)


def test_a_model_is_split_rather_than_leave_a_shard_idle_or_unbalanced():
    cases = [Case("only", b, "", d) for b in BACKENDS for d in ("fp32", "bf16")]
    shards = shard.assign(cases, 4)
    assert all(shards) and sorted(len(s) for s in shards) == [2, 2, 3, 3]
    # one heavy model and one light one: the heavy one is spread, the light one stays whole
    heavy = [Case("heavy", b, "", d) for b in BACKENDS for d in ("fp32", "bf16")]
    light = [Case("light", b) for b in BACKENDS[:2]]
    durations = {**{c.id: 10.0 for c in heavy}, **{c.id: 1.0 for c in light}}
    shards = shard.assign(heavy + light, 3, durations)
    assert max(loads(shards, durations)) <= 40.0
    assert sum(any(c.model == "light" for c in s) for s in shards) == 1


def test_durations_balance_and_unknown_cases_take_the_mean():
    cases = [Case("m", b) for b in BACKENDS]
    durations = {cases[0].id: 100.0, cases[1].id: 1.0, cases[2].id: 1.0, cases[3].id: 0.0}
    weights = shard.case_weights(cases, durations)
    assert weights[cases[4].id] == pytest.approx(34.0)          # mean of the known non-zero ones
    shards = shard.assign(cases, 2, durations)
    assert [cases[0].id] in [[c.id for c in s] for s in shards]  # the 100 s case alone on one shard


def test_without_durations_the_split_follows_a_stable_hash_not_the_process():
    """sha256-based, so the split is the same in every process (Python's hash() is salted per process)."""
    import subprocess
    import sys
    code = ("from harness.selection import shard; from harness.selection.cases import Case; "
            "cases = [Case(m, b, '', d) for m in ('a', 'b', 'c') for b in ('x', 'y', 'z') for d in ('fp32', 'bf16')]; "
            "print([[c.id for c in s] for s in shard.assign(cases, 4)])")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed, "PYTHONPATH": "."}).stdout for seed in ("1", "2", "3")}
    assert len(outs) == 1
    cases = [Case(m, b, "", d) for m in ("a", "b", "c") for b in ("x", "y", "z") for d in ("fp32", "bf16")]
    assert outs.pop().strip() == str([[c.id for c in s] for s in shard.assign(cases, 4)])


@pytest.mark.parametrize("text", ["0/3", "4/3", "1/0", "x", "1-3", "1/3/4", ""])
def test_malformed_shard_is_a_user_error(text):
    with pytest.raises(UserError, match="--shard"):
        shard.parse_shard(text)


def test_estimate_is_cold_start_plus_calls_times_mean():
    record = {"status": "passed", "cold_s": 5.0, "e2e": {"mean": 0.5}, "timing": {"warmup": 2, "repeats": 10}}
    assert shard.estimate_seconds(record) == pytest.approx(5.0 + 12 * 0.5)
    assert shard.estimate_seconds(record, warmup=1, repeats=3) == pytest.approx(5.0 + 4 * 0.5)
    assert shard.estimate_seconds({"status": "unsupported"}) == 0.0
    assert shard.estimate_seconds({"status": "error", "e2e": {}}) is None
    records = [{**record, "case_id": "x", "cold_s": c} for c in (1.0, 3.0, 100.0)]
    assert shard.expected_durations(records, ["x"]) == {"x": pytest.approx(3.0 + 6.0)}   # the median


# -- diffbench list ----------------------------------------------------------------------------------------------------
def _list_json(capsys, *args) -> list[dict]:
    assert main(["list", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_list_shards_of_the_default_matrix_are_disjoint_and_complete(capsys):
    full = [c.id for c in select_cases()]
    everything = _list_json(capsys)
    assert [row["case_id"] for row in everything] == full
    assert all(isinstance(row["supported"], bool) and row["shard"] is None for row in everything)
    assert all(row["reason"] for row in everything if not row["supported"])
    parts = [_list_json(capsys, "--shard", f"{i}/3") for i in (1, 2, 3)]
    ids = [row["case_id"] for part in parts for row in part]
    assert sorted(ids) == sorted(full) and len(ids) == len(set(ids))
    assert all(part and {row["shard"] for row in part} == {f"{i}/3"} for i, part in enumerate(parts, 1))


def test_list_gives_expected_times_from_earlier_records(capsys, tmp_path):
    from tests.synthetic_runs import write_synthetic_run
    records = write_synthetic_run(tmp_path / "run", models=("tiny-sd",), backends=("diffusers", "onnxruntime"))
    rows = _list_json(capsys, "--model", "tiny-sd", "--backend", "diffusers", "--backend", "onnxruntime",
                      "--backend", "triton", "--quick", "--durations-from", str(records.parent))
    by_id = {row["case_id"]: row for row in rows}
    recorded = {json.loads(line)["case_id"]: json.loads(line) for line in records.read_text().splitlines()}
    for case_id, record in recorded.items():
        if case_id not in by_id:
            continue        # the sample run's extra rows (fp16, tensorrt) are not selected here
        assert by_id[case_id]["expected_s"] == pytest.approx(record["cold_s"] + 4 * record["e2e"]["mean"])
    assert by_id["tiny-sd/triton/fp32/b1/64x64/s4"]["expected_s"] is None   # no record of it
    assert main(["list", "--model", "tiny-sd", "--backend", "diffusers", "--durations-from",
                 str(records)]) == 0
    out = capsys.readouterr().out
    assert "tiny-sd/diffusers/fp32/b1/64x64/s4" in out and "1 supported here; expected" in out


@pytest.mark.parametrize("args, message", [
    (["list", "--shard", "4/3"], "--shard 4/3"),
    (["run", "--shard", "two/3"], "--shard 'two/3'"),
    (["list", "--durations-from", "/nonexistent/records.jsonl"], "does not exist"),
])
def test_bad_shard_input_is_one_line_and_exit_2(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
