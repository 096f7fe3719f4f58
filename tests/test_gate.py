"""The regression gate: thresholds, verdicts, device classes, noise, bad input."""
import json

import pytest

from harness.errors import UserError
from harness.records import load_many
from harness.verdict import gate
from harness.verdict.baseline import load_baseline, save_baseline
from harness.verdict.thresholds import DEFAULT_THRESHOLDS, load_thresholds_toml, parse_thresholds
from tests.synthetic_runs import CPU_ENV, H100_ENV, write_synthetic_run

SD_ORT = "tiny-sd/onnxruntime/fp32/b1/64x64/s4"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    return {
        "base": write_synthetic_run(root / "base", seed=1, images=False),
        "same": write_synthetic_run(root / "same", seed=1, images=False),
        "slow": write_synthetic_run(root / "slow", seed=1, scale=1.2, images=False),
        "failed": write_synthetic_run(root / "failed", seed=1, images=False, failed=(SD_ORT,)),
        "gpu": write_synthetic_run(root / "gpu", seed=1, images=False, env=H100_ENV),
        "root": root,
    }


def regressed_cases(result):
    return {r.case_id for r in result.rows if r.verdict == "REGRESSED"}


def test_records_against_themselves_pass(runs):
    records = load_many([runs["base"]])
    result = gate.compare(records, records, DEFAULT_THRESHOLDS)
    assert result.exit_code == 0 and not result.regressed
    assert {r.verdict for r in result.rows} == {"PASS"}
    assert "gate: PASS" in result.table()


def test_twenty_percent_slower_regresses_and_names_the_cases(runs):
    base, slow = load_many([runs["base"]]), load_many([runs["slow"]])
    result = gate.compare(base, slow, parse_thresholds(["e2e.p50:+10%"]))
    assert result.exit_code == 1
    passed = {r["case_id"] for r in base if r["status"] == "passed"}
    assert regressed_cases(result) == passed
    table = result.table()
    assert "REGRESSED" in table and SD_ORT in table
    row = next(r for r in result.rows if r.case_id == SD_ORT and r.metric == "e2e.p50")
    assert row.change.startswith("+20.")
    assert "beyond noise" in row.note
    # a looser threshold lets the same change through
    assert gate.compare(base, slow, ["e2e.p50:+25%"]).exit_code == 0


def test_faster_run_is_improved_not_regressed(runs):
    result = gate.compare(load_many([runs["slow"]]), load_many([runs["base"]]), ["e2e.p50:+10%"])
    assert result.exit_code == 0
    assert any(r.verdict == "IMPROVED" and r.metric == "e2e.p50" for r in result.rows)


def test_stage_threshold_reads_record_stages(runs):
    base = load_many([runs["base"]])
    current = json.loads(json.dumps(base))
    for r in current:
        if r["case_id"] == SD_ORT:
            for key in ("p50", "mean", "min", "max", "p90", "p99"):
                r["stages"]["vae_decode"][key] *= 2
    result = gate.compare(base, current, ["vae_decode.p50:+10%"])
    assert regressed_cases(result) == {SD_ORT}
    assert gate.compare(base, current, ["e2e.p50:+10%"]).exit_code == 0  # e2e barely moved (vae is ~12 %)


def test_passed_to_failed_is_a_regression_whatever_the_thresholds(runs):
    result = gate.compare(load_many([runs["base"]]), load_many([runs["failed"]]), ["e2e.p50:+1000%"])
    assert result.exit_code == 1
    row = next(r for r in result.rows if r.verdict == "REGRESSED")
    assert (row.case_id, row.metric, row.current) == (SD_ORT, "status", "failed")
    assert "ParityError" in row.note
    # and back: failed -> passed is an improvement
    back = gate.compare(load_many([runs["failed"]]), load_many([runs["base"]]), [])
    assert back.exit_code == 0
    assert [(r.case_id, r.verdict) for r in back.rows if r.metric == "status" and r.verdict != "PASS"] == [
        (SD_ORT, "IMPROVED")]


def test_memory_and_psnr_thresholds():
    base = {"schema": 1, "run_id": "a", "case_id": "m/onnxruntime/fp32/b1/64x64/s4", "model": "m",
            "backend": "onnxruntime", "variant": "", "dtype": "fp32", "batch": 1, "height": 64, "width": 64,
            "steps": 4, "status": "passed", "env": CPU_ENV, "memory": {"peak_mb": 1000.0},
            "e2e": {"p50": 0.1, "n": 10}, "parity": {"verdict": "pass", "image": {"psnr": 50.0, "passed": True}}}
    cur = json.loads(json.dumps(base))
    cur["memory"]["peak_mb"] = 1060.0
    cur["parity"]["image"]["psnr"] = 48.5
    result = gate.compare([base], [cur], ["memory.peak:+5%", "parity.psnr:-1dB"])
    verdicts = {r.metric: r.verdict for r in result.rows}
    assert verdicts == {"status": "PASS", "memory.peak": "REGRESSED", "parity.psnr": "REGRESSED"}
    assert gate.compare([base], [cur], ["vram.peak:+10%", "psnr:-2dB"]).exit_code == 0
    # identical images store PSNR as null (inf): it is compared as the cap, so identical -> 60 dB is a drop
    base["parity"]["image"]["psnr"] = None
    cur["parity"]["image"]["psnr"] = 60.0
    row = next(r for r in gate.compare([base], [cur], ["parity.psnr:-1dB"]).rows if r.metric == "parity.psnr")
    assert row.verdict == "REGRESSED" and row.baseline == gate.PSNR_CAP_DB


def test_new_and_missing_cases_are_not_errors(runs):
    base = load_many([runs["base"]])
    gone = [r for r in base if r["case_id"] != SD_ORT]
    result = gate.compare(base, gone, DEFAULT_THRESHOLDS)
    assert result.exit_code == 0
    assert [(r.case_id, r.verdict) for r in result.rows if r.verdict != "PASS"] == [(SD_ORT, "MISSING")]
    result = gate.compare(gone, base, DEFAULT_THRESHOLDS)
    assert [(r.case_id, r.verdict) for r in result.rows if r.verdict != "PASS"] == [(SD_ORT, "NEW")]


def test_device_classes_are_never_compared(runs):
    """The same case measured on an H100 is not compared with a CPU baseline: MISSING there, NEW here."""
    cpu, gpu = load_many([runs["base"]]), load_many([runs["gpu"]])
    assert gate.device_class(gpu[0]) == "NVIDIA H100 80GB HBM3 (sm 9.0)"
    assert gate.device_class(cpu[0]).startswith("CPU Intel(R) Xeon(R)")
    result = gate.compare(cpu, gpu, DEFAULT_THRESHOLDS)  # the GPU run is 20x faster: must not be IMPROVED
    assert result.exit_code == 0
    assert {r.verdict for r in result.rows} == {"NEW", "MISSING"}
    # merged runners: each case is compared within its own device class
    result = gate.compare(cpu + gpu, load_many([runs["slow"]]) + gpu, ["e2e.p50:+10%"])
    regressed = {(r.case_id, r.device_class) for r in result.rows if r.verdict == "REGRESSED"}
    assert regressed and all(dev.startswith("CPU") for _, dev in regressed)


def test_noise_aware_change_within_spread_does_not_count(tmp_path):
    """+30 % median with a huge spread over 5 repeats is noise; the same +30 % with a tight spread is not."""
    base = load_many([write_synthetic_run(tmp_path / "b", seed=3, jitter=0.6, repeats=5, images=False,
                                       models=("tiny-sd",), backends=("diffusers",))])
    cur = json.loads(json.dumps(base))
    for r in cur:
        if r["status"] == "passed":
            r["e2e"]["p50"] = base[0]["e2e"]["p50"] * 1.3
    result = gate.compare(base, cur, ["e2e.p50:+10%"])
    row = next(r for r in result.rows if r.metric == "e2e.p50")
    assert row.verdict == "PASS" and row.change == "+30.0%"
    assert "within run-to-run noise" in row.note and "standard errors" in row.note
    assert result.exit_code == 0
    for r in (*base, *cur):
        if r["status"] == "passed":
            p50 = r["e2e"]["p50"]
            r["e2e"].update(std=0.001, p25=p50 - 0.001, p75=p50 + 0.001)
    row = next(r for r in gate.compare(base, cur, ["e2e.p50:+10%"]).rows if r.metric == "e2e.p50")
    assert row.verdict == "REGRESSED"
    # the median's band comes from the quartiles: one wild repeat (a huge std) does not hide the change
    for r in (*base, *cur):
        if r["status"] == "passed":
            r["e2e"]["std"] = r["e2e"]["p50"]
    row = next(r for r in gate.compare(base, cur, ["e2e.p50:+10%"]).rows if r.metric == "e2e.p50")
    assert row.verdict == "REGRESSED"


def test_unsupported_records_only_get_the_status_rule(runs):
    base = load_many([runs["base"]])
    result = gate.compare(base, load_many([runs["slow"]]), ["e2e.p50:+10%"])
    unsupported = {r["case_id"] for r in base if r["status"] == "unsupported"}
    rows = [r for r in result.rows if r.case_id in unsupported]
    assert rows and {r.metric for r in rows} == {"status"} and {r.verdict for r in rows} == {"PASS"}


@pytest.mark.parametrize("spec, message", [
    ("latency.p42:+10%", "unknown gate metric"),
    ("throughput.p50:+10%", "unknown gate metric"),
    ("e2e.p50", "needs a limit"),
    ("e2e.p50:-10%", "malformed threshold"),
    ("parity.psnr:+1%", "malformed threshold"),
    ("e2e.p50:+ten%", "malformed threshold"),
    ("status:+1%", "status takes no value"),
    ("e2e.p50:>10ms", "lower is better for e2e.p50"),
    ("throughput:<500/s", "higher is better for throughput"),
    ("e2e.p50:<10MB", "a bound on e2e.p50 is in s/ms/us"),
    ("memory.peak:<8ms", "a bound on memory.peak is in MB/GB"),
    ("throughput:+10%", "throughput takes -N%"),
    ("e2e.p50:<10", "malformed threshold"),
    ("e2e.p50:+10ms", "e2e.p50 takes [+]N%"),
])
def test_bad_threshold_is_a_user_error(spec, message):
    with pytest.raises(UserError, match=message):
        parse_thresholds([spec])


def test_threshold_grammar_and_toml(tmp_path):
    parsed = parse_thresholds(["e2e.p99:+15%", "denoise.p50:10%", "memory.peak:+5%", "parity.psnr:-1dB",
                                    "e2e.p99:+20%"])
    assert parsed["e2e.p99"].limit == 20.0  # the later spec wins (CLI after the TOML file)
    assert set(parsed) == {"status", "e2e.p99", "denoise.p50", "memory.peak", "parity.psnr"}
    assert parsed["parity.psnr"].spec == "parity.psnr:-1dB"
    (tmp_path / "list.toml").write_text('thresholds = ["e2e.p50:+10%", "status"]\n')
    assert load_thresholds_toml(tmp_path / "list.toml") == ["e2e.p50:+10%", "status"]
    (tmp_path / "table.toml").write_text('[thresholds]\n"e2e.p50" = "+10%"\nstatus = true\n')
    assert load_thresholds_toml(tmp_path / "table.toml") == ["e2e.p50:+10%", "status"]
    (tmp_path / "bad.toml").write_text('thresholds = [\n')
    with pytest.raises(UserError, match="malformed thresholds file"):
        load_thresholds_toml(tmp_path / "bad.toml")
    with pytest.raises(UserError, match="cannot read"):
        load_thresholds_toml(tmp_path / "absent.toml")


def test_malformed_baseline_is_a_user_error(tmp_path, runs):
    bad = tmp_path / "baseline.jsonl"
    bad.write_text('{"not": "a record"}\n{"either": 1}\n')
    with pytest.raises(UserError):
        load_baseline(bad)
    bad.write_text("garbage line\n" + runs["base"].read_text())
    with pytest.raises(UserError, match="not a JSON record"):
        load_baseline(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_baseline(tmp_path / "absent.jsonl")
    with pytest.raises(UserError, match="not a diffbench record"):
        gate.compare([{"case_id": "x"}], load_many([runs["base"]]), [])


def test_other_schema_version_is_a_user_error(tmp_path, runs):
    records = load_many([runs["base"]])
    old = [{**r, "schema": 0} for r in records]
    with pytest.raises(UserError, match="schema version 0"):
        gate.compare(old, records, DEFAULT_THRESHOLDS)
    path = tmp_path / "old.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "_source"}) + "\n" for r in old))
    with pytest.raises(UserError, match="schema version 0"):
        load_baseline(path)


def test_save_baseline_merges_and_round_trips(tmp_path, runs):
    out = save_baseline([runs["base"], runs["gpu"]], tmp_path / "baselines" / "main.jsonl")
    saved = load_baseline(out)
    assert len(saved) == len(load_many([runs["base"]])) + len(load_many([runs["gpu"]]))
    assert all(r["image"] == "" for r in saved)
    result = gate.compare(saved, load_many([runs["same"], runs["gpu"]]), DEFAULT_THRESHOLDS)
    assert result.exit_code == 0 and {r.verdict for r in result.rows} == {"PASS"}
    json.dumps(result.to_dict(), allow_nan=False)
    with pytest.raises(UserError):
        save_baseline([tmp_path / "absent.jsonl"], tmp_path / "x.jsonl")


def _run_record(run_id, p50, std=0.001, n=10, ts=0.0):
    from harness.selection.cases import Case
    from harness.records import Record
    r = Record.for_case(Case("tiny-sd", "diffusers"), run_id, env=CPU_ENV, timestamp=ts,
                        e2e={"p50": p50, "std": std, "n": n, "mean": p50, "p90": p50, "p99": p50,
                             "min": p50, "max": p50})
    return r.to_dict()


def test_baseline_of_several_runs_uses_their_spread():
    """Whole runs drift on a shared machine: with several baseline runs the gate compares with their median and
    widens the noise band to their spread, so an unchanged build does not fail on drift alone."""
    drifty = [_run_record(f"r{i}", p, ts=i) for i, p in enumerate([0.050, 0.052, 0.070])]
    current = [_run_record("now", 0.060, ts=9)]
    result = gate.compare(drifty, current, ["e2e.p50:+10%"])
    row = next(r for r in result.rows if r.metric == "e2e.p50")
    assert row.baseline == pytest.approx(0.052)                       # the median, not the latest (0.070)
    assert row.verdict == "PASS" and "3 baseline runs" in row.note
    # the same +15 % against a steady baseline is a regression
    steady = [_run_record(f"r{i}", p, ts=i) for i, p in enumerate([0.0520, 0.0521, 0.0519])]
    assert gate.compare(steady, current, ["e2e.p50:+10%"]).exit_code == 1


def test_save_baseline_keeps_every_run(tmp_path):
    from harness.records import RecordWriter
    paths = []
    for i, p in enumerate([0.05, 0.06]):
        path = tmp_path / f"run{i}.jsonl"
        with RecordWriter(path) as w:
            w.write(_run_record(f"r{i}", p, ts=i))
        paths.append(path)
    out = save_baseline(paths, tmp_path / "baseline.jsonl")
    assert len(load_many([out])) == 2


def _sampled_record(run_id, samples, ts=0.0):
    from harness.selection.cases import Case
    from harness.records import Record
    from harness.measure.timing import stats
    r = Record.for_case(Case("tiny-sd", "diffusers"), run_id, env=CPU_ENV, timestamp=ts, e2e=stats(samples),
                        samples={"e2e": list(samples)})
    return r.to_dict()


def test_tail_of_few_calls_is_judged_by_its_bootstrap_interval():
    """50 calls: p99 is about the maximum, so one slow call in the current run moves it by +25 %. std/sqrt(n) calls
    that significant; the bootstrap interval of the p99 difference does not -- and a real shift of every call still
    is caught, at p50 and p99 alike."""
    import numpy as np
    rng = np.random.default_rng(5)
    base = 0.100 * (1 + 0.05 * rng.standard_normal(50))
    spiky = 0.100 * (1 + 0.05 * rng.standard_normal(50))
    spiky[17] = base.max() * 1.35
    result = gate.compare([_sampled_record("b", base)], [_sampled_record("c", spiky, ts=1)], ["e2e.p99:+15%"])
    row = next(r for r in result.rows if r.metric == "e2e.p99")
    assert float(row.change.rstrip("%")) > 15 and row.verdict == "PASS", row
    assert "bootstrap interval from 50+50 calls" in row.note
    shifted = base * 1.2 + 0.002 * rng.standard_normal(50)
    result = gate.compare([_sampled_record("b", base)], [_sampled_record("c", shifted, ts=1)],
                          ["e2e.p50:+10%", "e2e.p99:+15%"])
    assert {r.metric for r in result.rows if r.verdict == "REGRESSED"} == {"e2e.p50", "e2e.p99"}


# -- a metric missing on one side; passed without latency samples -------------------------------------------------
def _record(run_id="r", ts=0.0, env=CPU_ENV, **fields):
    """A passed hand-made record: tiny-sd/diffusers with e2e 100 ms over 10 calls unless fields say otherwise.
    throughput={"per_s": N} stands for the field a throughput-measuring workload records."""
    from harness.selection.cases import Case
    from harness.records import Record
    fields.setdefault("e2e", {"p50": 0.1, "p99": 0.1, "std": 0.0, "n": 10})
    throughput = fields.pop("throughput", None)
    record = Record.for_case(Case("tiny-sd", "diffusers"), run_id, env=env, timestamp=ts, **fields).to_dict()
    return {**record, "throughput": throughput} if throughput else record


def _rows(result, metric):
    return [r for r in result.rows if r.metric == metric]


def test_a_metric_missing_in_the_current_regresses_and_one_missing_in_the_baseline_is_not_compared():
    stages = {"denoise": {"p50": 0.07, "n": 10}, "vae_decode": {"p50": 0.02, "n": 10}}
    base = _record(memory={"peak_mb": 900.0}, stages=stages)
    lost = _record(ts=1, stages={"denoise": stages["denoise"]})        # no memory, no vae_decode stage
    result = gate.compare([base], [lost], ["memory.peak:+5%", "vae_decode.p50:+10%", "text_encode.p50:+10%"])
    assert result.exit_code == 1
    for metric in ("memory.peak", "vae_decode.p50"):
        [row] = _rows(result, metric)
        assert row.verdict == "REGRESSED" and row.current is None
        assert row.note == "measured in the baseline but missing in the current"
    assert _rows(result, "text_encode.p50") == []          # on neither side: not this pipeline's stage
    back = gate.compare([lost], [base], ["memory.peak:+5%", "vae_decode.p50:+10%"])
    assert back.exit_code == 0
    assert {r.note for r in back.rows if r.metric != "status"} == {"not in the baseline; not compared"}


@pytest.mark.parametrize("e2e", [{"n": 0}, {}], ids=["n=0", "no e2e"])
def test_passed_without_latency_samples_cannot_pass_silently(e2e):
    """What a pytest-benchmark run with --benchmark-disable leaves: status passed, nothing timed."""
    base, untimed = _record(memory={"peak_mb": 900.0}), _record(ts=1, e2e=e2e, memory={"peak_mb": 900.0})
    result = gate.compare([base], [untimed], DEFAULT_THRESHOLDS)
    assert result.exit_code == 1
    [row] = _rows(result, "e2e.n")
    assert (row.verdict, row.baseline, row.current) == ("REGRESSED", 10, 0)
    assert "passed without latency samples" in row.note
    assert {r.verdict for r in _rows(result, "e2e.p50") + _rows(result, "e2e.p99")} == {"REGRESSED"}
    # a baseline without samples either: nothing to compare, but the row still says so
    result = gate.compare([_record(e2e=e2e)], [untimed], DEFAULT_THRESHOLDS)
    [row] = _rows(result, "e2e.n")
    assert row.verdict == "PASS" and "the baseline had none either" in row.note
    assert result.exit_code == 0 and _rows(result, "e2e.p50") == []
    # a bound on latency cannot hold on a case that timed nothing, new or not
    result = gate.compare([], [untimed], ["e2e.p50:<10s"])
    assert [(r.metric, r.verdict) for r in result.rows] == [("case", "NEW"), ("e2e.n", "PASS"),
                                                             ("e2e.p50", "REGRESSED")]
    assert "the bound cannot be checked" in result.rows[-1].note


# -- absolute bounds ------------------------------------------------------------------------------------------------
def test_absolute_bounds_grammar():
    parsed = parse_thresholds(["e2e.p50:+10%", "e2e.p50:<10ms", "latency.p99:<0.5s", "vram.peak:<8GB",
                               "throughput:>500/s", "psnr:>40dB", "memory.peak:<1000mb", "throughput:-10%"])
    assert set(parsed) == {"status", "e2e.p50", "e2e.p50:<", "e2e.p99:<", "memory.peak:<", "throughput:>",
                           "parity.psnr:>", "throughput"}      # a change and a bound on one metric both apply
    assert parsed["e2e.p50:<"].bound_value == pytest.approx(0.010)
    assert parsed["e2e.p99:<"].bound_value == pytest.approx(0.5)
    assert parsed["memory.peak:<"].bound_value == 1000.0         # the later memory bound won
    assert parsed["throughput:>"].bound_value == 500.0 and parsed["throughput"].spec == "throughput:-10%"
    assert parse_thresholds(["memory.peak:<8GB"])["memory.peak:<"].bound_value == 8 * 1024
    for t in parsed.values():   # every spec reads back as itself
        assert parse_thresholds([t.spec])[t.key] == t


def test_absolute_bounds_are_judged_on_the_current_record_alone():
    fast, slow = (_record(ts=1, e2e={"p50": s, "p99": s, "n": 10}) for s in (0.008, 0.012))
    # the same 12 ms on both sides: no change, but the target is missed
    result = gate.compare([_record(e2e={"p50": 0.012, "n": 10})], [slow], ["e2e.p50:+10%", "e2e.p50:<10ms"])
    bound = next(r for r in result.rows if r.threshold == "e2e.p50:<10ms")
    assert (bound.verdict, bound.change, bound.baseline) == ("REGRESSED", "12ms ≥ 10ms", 0.012)
    assert "above the bound" in bound.note
    assert next(r for r in result.rows if r.threshold == "e2e.p50:+10%").verdict == "PASS"
    assert result.exit_code == 1
    result = gate.compare([slow], [fast], ["e2e.p50:<10ms"])
    assert [r.change for r in _rows(result, "e2e.p50")] == ["8ms < 10ms"] and result.exit_code == 0
    # a case only in the current run is judged too: the targets must hold on a new case
    assert gate.compare([], [fast], ["e2e.p50:<10ms"]).exit_code == 0
    new = gate.compare([], [slow], ["e2e.p50:<10ms"])
    assert new.exit_code == 1 and "a new case" in _rows(new, "e2e.p50")[0].note
    # a case that did not pass is the status rule's business, not the bound's
    failed = {**slow, "status": "failed", "reason": "ParityError: x"}
    assert _rows(gate.compare([], [failed], ["e2e.p50:<10ms"]), "e2e.p50") == []
    # memory in GB
    heavy = _record(ts=1, memory={"peak_mb": 9000.0})
    assert [r.verdict for r in _rows(gate.compare([], [heavy], ["memory.peak:<8GB"]), "memory.peak")] == [
        "REGRESSED"]
    assert gate.compare([], [heavy], ["memory.peak:<9GB"]).exit_code == 0


def test_bounds_are_judged_per_device_class(runs):
    """One bound, merged runners: each device class's record is judged on its own figures."""
    cpu, gpu = load_many([runs["base"]]), load_many([runs["gpu"]])
    result = gate.compare(cpu + gpu, cpu + gpu, ["e2e.p50:<50ms"])   # synthetic: CPU ~200 ms, H100 ~10 ms
    rows = [r for r in result.rows if r.metric == "e2e.p50"]
    assert rows and {r.verdict for r in rows if r.device_class.startswith("NVIDIA")} == {"PASS"}
    assert {r.verdict for r in rows if r.device_class.startswith("CPU")} == {"REGRESSED"}


def test_throughput_is_one_metric_entry_read_from_the_record():
    """Higher is better: a lower bound and a relative drop; records without throughput are not judged on it."""
    served = [_record(ts=1, throughput={"per_s": v}) for v in (612.0, 431.0)]
    verdicts = [_rows(gate.compare([], [r], ["throughput:>500/s"]), "throughput")[0] for r in served]
    assert [(r.verdict, r.change) for r in verdicts] == [("PASS", "612/s > 500/s"), ("REGRESSED", "431/s ≤ 500/s")]
    base = _record(throughput={"per_s": 600.0})
    drop = gate.compare([base], [_record(ts=1, throughput={"per_s": 500.0})], ["throughput:-10%"])
    assert [(r.verdict, r.change) for r in _rows(drop, "throughput")] == [("REGRESSED", "-16.7%")]
    gain = gate.compare([base], [_record(ts=1, throughput={"per_s": 700.0})], ["throughput:-10%"])
    assert [r.verdict for r in _rows(gain, "throughput")] == ["IMPROVED"]
    # a text-to-image case has no throughput: the bound is not checked there, unless the baseline measured it
    unmeasured = gate.compare([_record()], [_record(ts=1)], ["throughput:>500/s"])
    assert [(r.verdict, r.note) for r in _rows(unmeasured, "throughput")] == [
        ("PASS", "not measured for this case; the bound is not checked")]
    assert gate.compare([base], [_record(ts=1)], ["throughput:>500/s"]).exit_code == 1


# -- markdown for a CI job summary -----------------------------------------------------------------------------
def test_markdown_lists_every_case_regressions_first(runs):
    base, slow = load_many([runs["base"]]), load_many([runs["slow"]])
    gone = [r for r in slow if r["case_id"] != SD_ORT]
    result = gate.compare(base, gone, ["e2e.p50:+10%"])
    lines = result.markdown().splitlines()
    assert lines[:2] == ["| verdict | case | device class | metrics |", "|---|---|---|---|"]
    table = [line for line in lines[2:] if line.startswith("|")]
    assert len(table) == len({r["case_id"] for r in base})            # every case once
    verdicts = [line.split(" | ")[0].strip("| *") for line in table]
    assert verdicts == sorted(verdicts, key=["REGRESSED", "MISSING", "NEW", "IMPROVED", "PASS"].index)
    assert verdicts[0] == "REGRESSED" and "MISSING" in verdicts and "PASS" in verdicts
    first = table[0]
    assert "e2e.p50 +2" in first and "REGRESSED (e2e.p50:+10%; beyond noise" in first
    assert lines[-1].startswith("**gate: REGRESSED** — ") and f"{len(table)} case(s)" in lines[-1]
    # a note with a pipe cannot break the table
    odd = [{**r, "reason": "a | b"} if r["case_id"] == SD_ORT else r for r in load_many([runs["failed"]])]
    text = gate.compare(base, odd, []).markdown()
    assert "a \\| b" in text and all(line.count(" | ") == 3 for line in text.splitlines() if line.startswith("| "))


def test_gate_cli_markdown_and_bounds(runs, tmp_path, capsys):
    from harness.cli import main
    from harness.records import RecordWriter
    assert main(["gate", "--baseline", str(runs["base"]), "--current", str(runs["slow"]), "--threshold",
                 "e2e.p50:+10%", "--format", "markdown"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("| verdict | case | device class | metrics |\n") and "**gate: REGRESSED**" in out
    # the embedding service's target on measured throughput: exit 1 below it, 0 above
    for per_s, code in ((431.0, 1), (612.0, 0)):
        path = tmp_path / f"{per_s}.jsonl"
        with RecordWriter(path) as w:
            w.write(_record(throughput={"per_s": per_s}))
        assert main(["gate", "--baseline", str(path), "--current", str(path), "--threshold", "throughput:>500/s"]) \
            == code
    capsys.readouterr()
    assert main(["gate", "--baseline", str(path), "--current", str(path), "--format", "html"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_an_isolated_peak_is_never_compared_with_a_shared_process_one():
    """A peak measured in a process shared with earlier cases holds what they left there: comparing it with a peak
    measured in the case's own worker would flag (or hide) a change neither build made."""
    base = {"schema": 1, "run_id": "a", "case_id": "m/diffusers/fp32/b1/64x64/s4", "model": "m",
            "backend": "diffusers", "variant": "", "dtype": "fp32", "batch": 1, "height": 64, "width": 64,
            "steps": 4, "status": "passed", "env": CPU_ENV, "e2e": {"p50": 0.1, "n": 10},
            "memory": {"peak_mb": 500.0, "isolated": True, "cases_before": 0}}
    shared = json.loads(json.dumps(base))
    shared["memory"] = {"peak_mb": 740.0, "isolated": False, "cases_before": 5}
    for b, c in ((base, shared), (shared, base)):
        (row,) = _rows(gate.compare([b], [c], ["memory.peak:+5%"]), "memory.peak")
        assert row.verdict == "PASS" and row.note.startswith("not compared") and "--isolate" in row.note
    # measured the same way, compared as ever; records from before memory.isolated fall back on timing.isolated
    older = {**base, "memory": {"peak_mb": 600.0}, "timing": {"isolated": True}}
    (row,) = _rows(gate.compare([base], [older], ["memory.peak:+5%"]), "memory.peak")
    assert row.verdict == "REGRESSED"
