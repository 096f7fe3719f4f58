"""Is it right? Component parity and end-to-end parity of every backend against the eager reference: images
(PSNR / SSIM) for text-to-image, embeddings (cosine per sentence) and nearest-neighbour ranking for text-embedding.

On failure the message names the metric, the tolerance and the smallest tolerance that would have passed.
"""
import numpy as np
import pytest
import torch

from harness import models
from harness.measure.case import run_case
from harness.measure.run_options import RunOptions
from harness.measure.session import Session
from harness.selection import workloads
from harness.selection.cases import Case


def _measured(case, session):
    record = session.result(case)
    if record.status == "unsupported":
        pytest.skip(f"unsupported: {record.reason}")
    assert record.status != "error", f"{record.error_class}: {record.reason}"
    return record


def _output_key(case) -> str:
    return "embedding" if case.workload == workloads.TEXT_EMBEDDING else "image"


def test_output_parity(case, diffbench_session, case_properties):
    case_properties(diffbench_session.result(case))     # the figures as junit XML properties
    record = _measured(case, diffbench_session)
    output = record.parity[_output_key(case)]
    assert output["passed"], f"{case.id}: {output.get('error')}"
    if case.workload == workloads.TEXT_EMBEDDING:
        assert output["min_cosine"] >= output["tolerance"]["min_cosine"]
        ranking = record.parity["ranking"]
        assert ranking["passed"], f"{case.id}: nearest neighbours moved: {ranking}"
    else:   # PSNR is recorded as null when the images are identical (infinite PSNR)
        assert output["psnr"] is None or output["psnr"] >= output["tolerance"]["min_psnr_db"]


def test_output_parity_holds_on_the_last_measured_call(case, diffbench_session):
    """A backend right on its first call and wrong later (overwritten output buffers, stale state) must fail."""
    record = _measured(case, diffbench_session)
    last = record.parity[f"{_output_key(case)}_last"]
    assert last["passed"], f"{case.id}: last measured call: {last.get('error')}"


def test_component_parity(case, diffbench_session):
    record = _measured(case, diffbench_session)
    components = record.parity["components"]
    assert components, "no component was compared"
    failed = {name: r.get("error") or [k for k, o in r.get("outputs", {}).items() if not o["passed"]]
              for name, r in components.items() if not r["passed"]}
    assert not failed, f"{case.id}: component parity failed: {failed}"


def _run_reference(model_name, dtype="fp32"):
    model = models.load(model_name, dtype)
    return model, _outputs(model, _reference_case(model_name))


def _outputs(model, case):
    with torch.inference_mode():
        if model.workload == workloads.TEXT_EMBEDDING:
            from harness.models.embedding import embed
            from harness.models.sentences import texts_for
            return embed(model.pipeline, texts_for(case.seq), case.seq)
        return model.pipeline(**models.pipeline_inputs(model, case)).images


def _reference_case(model_name) -> Case:
    workload = workloads.of_model(model_name)
    seq = 16 if workload == workloads.TEXT_EMBEDDING else 0     # the short sentences
    return Case(model_name, workloads.reference_backend(workload), seq=seq)


def test_reference_same_seed_twice_identical(model_name):
    if models.spec(model_name).full_size:
        pytest.skip("full-size model: checked on the tiny models (another full-size run costs minutes)")
    model, first = _run_reference(model_name)
    second = _outputs(model, _reference_case(model_name))
    assert np.array_equal(first, second)
    assert first.std() > 0.01, "reference output is constant"


def test_reference_save_reload_roundtrip(model_name, tmp_path):
    """save_pretrained -> from_pretrained gives bit-identical outputs."""
    if models.spec(model_name).full_size:
        pytest.skip("full-size model: checked on the tiny models (another full-size run costs minutes)")
    model, first = _run_reference(model_name)
    if model.workload == workloads.TEXT_EMBEDDING:
        from harness.models.embedding import load_encoder_pipeline
        model.pipeline.encoder.save_pretrained(tmp_path, safe_serialization=True)
        model.pipeline.tokenizer.save_pretrained(tmp_path)
        model.pipeline = load_encoder_pipeline(tmp_path, models.TORCH_DTYPES["fp32"], "cpu")
    else:
        from diffusers import DiffusionPipeline
        model.pipeline.save_pretrained(tmp_path, safe_serialization=True)
        model.pipeline = DiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
        model.pipeline.set_progress_bar_config(disable=True)
    second = _outputs(model, _reference_case(model_name))
    assert np.array_equal(first, second)


@pytest.fixture
def faulty_backend():
    from suites import fault_backends
    fault_backends.register()
    yield
    fault_backends.unregister()


def test_wrong_executor_fails_parity(faulty_backend, tmp_path):
    """Proof the suite can fail: a denoiser whose output is 1% too large must fail parity, with the tolerance."""
    session = Session(tmp_path, RunOptions(warmup=0, repeats=1))
    try:
        record = run_case(Case("tiny-sd", "faulty", "scaled"), session)
    finally:
        session.close()
    assert record.status == "failed", record.reason
    assert record.error_class == "ParityError"
    assert record.parity["verdict"] == "fail"
    unet = record.parity["components"]["unet"]
    assert not unet["passed"] and "would pass with atol>=" in unet["error"]
    assert unet["tolerance"]["source"].startswith("fp32 default"), "the record names the tolerance that judged it"
    assert record.stages["denoise"]["n"] == 1, "a failed-parity case still carries its latency"
