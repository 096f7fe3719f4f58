"""Is it right? Component parity and end-to-end image parity of every backend against the eager reference.

On failure the message names the metric, the tolerance and the smallest tolerance that would have passed.
"""
import numpy as np
import pytest
import torch

from harness import models
from harness.cases import Case
from harness.runner import RunOptions, Session, run_case


def _measured(case, session):
    record = session.result(case)
    if record.status == "unsupported":
        pytest.skip(f"unsupported: {record.reason}")
    assert record.status != "error", f"{record.error_class}: {record.reason}"
    return record


def test_image_parity(case, diffbench_session, case_properties):
    case_properties(diffbench_session.result(case))     # the figures as junit XML properties
    record = _measured(case, diffbench_session)
    image = record.parity["image"]
    assert image["passed"], f"{case.id}: {image.get('error')}"
    # PSNR is recorded as null when the images are identical (infinite PSNR)
    assert image["psnr"] is None or image["psnr"] >= image["tolerance"]["min_psnr_db"]


def test_image_parity_holds_on_the_last_measured_call(case, diffbench_session):
    """A backend right on its first call and wrong later (overwritten output buffers, stale state) must fail."""
    record = _measured(case, diffbench_session)
    last = record.parity["image_last"]
    assert last["passed"], f"{case.id}: last measured call: {last.get('error')}"


def test_component_parity(case, diffbench_session):
    record = _measured(case, diffbench_session)
    components = record.parity["components"]
    assert components, "no component was compared"
    failed = {name: r.get("error") or [k for k, o in r.get("outputs", {}).items() if not o["passed"]]
              for name, r in components.items() if not r["passed"]}
    assert not failed, f"{case.id}: component parity failed: {failed}"


def _run_reference(model_name, dtype="fp32"):
    case = Case(model_name, "diffusers")
    model = models.load(model_name, dtype)
    with torch.inference_mode():
        return model, model.pipeline(**models.pipeline_inputs(model, case)).images


def test_reference_same_seed_twice_identical(model_name):
    if models.spec(model_name).full_size:
        pytest.skip("full-size model: checked on the tiny models (another full-size run costs minutes)")
    model, first = _run_reference(model_name)
    with torch.inference_mode():
        second = model.pipeline(**models.pipeline_inputs(model, Case(model_name, "diffusers"))).images
    assert np.array_equal(first, second)
    assert first.std() > 0.01, "reference image is blank"


def test_reference_save_reload_roundtrip(model_name, tmp_path):
    """save_pretrained -> from_pretrained gives bit-identical images."""
    if models.spec(model_name).full_size:
        pytest.skip("full-size model: checked on the tiny models (another full-size run costs minutes)")
    from diffusers import DiffusionPipeline
    model, first = _run_reference(model_name)
    model.pipeline.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = DiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    model.pipeline = reloaded
    with torch.inference_mode():
        second = reloaded(**models.pipeline_inputs(model, Case(model_name, "diffusers"))).images
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
    assert record.stages["denoise"]["n"] == 1, "a failed-parity case still carries its latency"
