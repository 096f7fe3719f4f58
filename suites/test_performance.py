"""How fast, how big? Per-stage latency, cold start, build time and peak memory per case.

pytest-benchmark drives the timed loop (pedantic rounds: one multi-second call per round); our stage timer
splits each call into stages and the record carries them with the case's parity verdict.
"""
import pytest

from harness.selection import workloads

# the stage each workload must time, and the one whose component is also timed alone (the denoiser's step; the
# embedding encoder's whole call)
STAGES = {workloads.TEXT_TO_IMAGE: ("text_encode", "denoise", "denoise_step", "vae_decode"),
          workloads.TEXT_EMBEDDING: ("encode",)}
ALONE_STAGE = {workloads.TEXT_TO_IMAGE: "denoise_step", workloads.TEXT_EMBEDDING: "encode"}


def test_latency(case, diffbench_session, benchmark, case_properties):
    options = diffbench_session.options

    def loop(call, warmup, repeats, setup):
        # pedantic's setup runs before each round outside its clock, as ours does
        benchmark.pedantic(call, setup=setup, rounds=repeats, warmup_rounds=warmup, iterations=1)

    record = diffbench_session.result(case, loop=loop)
    case_properties(record)     # the figures as junit XML properties
    if record.status == "unsupported":
        pytest.skip(f"unsupported: {record.reason}")
    assert record.status in ("passed", "failed"), f"{record.status}: {record.error_class}: {record.reason}"
    assert record.e2e["n"] == options.repeats
    for stage in STAGES[case.workload]:
        assert record.stages[stage]["n"] > 0, f"stage {stage} was not timed"
    if case.workload == workloads.TEXT_TO_IMAGE:
        assert record.stages["denoise_step"]["n"] == case.steps * options.repeats
    else:
        assert record.throughput["per_s"] > 0
    # cold = load + prepare + first call (a busy machine can make one steady call slower than all of it)
    assert record.cold_s > record.first_call_s > 0 and record.e2e["p50"] > 0
    assert record.memory.get("peak_mb"), "no peak memory recorded"
    assert record.parity.get("verdict") in ("pass", "fail"), "latency without a parity verdict"
    benchmark.extra_info.update(case=case.id, parity=record.parity["verdict"],
                                stages_p50_ms={k: v["p50"] * 1000 for k, v in record.stages.items()},
                                cold_s=record.cold_s, build=record.build, peak_mb=record.memory["peak_mb"])


def test_in_pipeline_step_stays_close_to_the_component_alone(case, diffbench_session):
    """A backend configured badly for life inside a pipeline (e.g. ONNX Runtime's spinning thread pool fighting
    torch's threads for the cores) shows as an in-pipeline denoiser step far slower than the same executor alone on
    the same inputs. Both are measured in the same run, so this is a ratio, not an absolute time; as in the gate, an
    excess counts only beyond the noise of the two measurements (3 standard errors of the difference of medians)."""
    from harness.verdict.noise import standard_error_band
    from harness.measure.parity import INTEGRATION_WARNING
    record = diffbench_session.result(case)
    if record.status != "passed":
        pytest.skip(f"{record.status}: {record.reason}")
    stage = ALONE_STAGE[case.workload]
    step = record.stages[stage]
    assert step.get("alone"), f"the component of {stage} was not timed alone"
    alone = step["alone"]
    band = standard_error_band(step, alone)
    assert step["p50"] <= INTEGRATION_WARNING * alone["p50"] + band, (
        f"{case.id}: in-pipeline {stage} p50 {step['p50'] * 1e3:.2f} ms vs alone {alone['p50'] * 1e3:.2f} ms "
        f"= {step['integration']:.2f}x, beyond {INTEGRATION_WARNING}x + the noise band {band * 1e3:.2f} ms")
