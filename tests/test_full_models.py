"""The full-size zoo before any GPU sees it.

sd35-large and flux-dev do not fit in this machine's memory (28 and 34 GB of bf16 weights: T5-XXL, a 12B
transformer): they are built on the meta device and run there with the real 1024x1024 input shapes (all four
models, ~12 s in all). sd15 runs for real on CPU through the runner, as `diffbench run --model sd15` does: the one
full-size smoke test of the whole path, and the slowest test of this file (about a minute on 2 cores: two random-
weight builds of 1.07 B parameters, three 64x64 one-step calls and the component parity).
"""
import psutil
import pytest
import torch

from harness import models
from harness.judge.preflight import support_of
from harness.measure.run_options import RunOptions
from harness.measure.session import Session
from harness.models.full import ELEMENTS, FULL_MODELS, run_on_meta, weights_bytes
from harness.selection.cases import Case

EXPECTED = {  # (text embeddings, denoiser output) of one 1024x1024 image; guidance doubles the batch but for Flux
    "sd15": ((2, 77, 768), (2, 4, 128, 128)),
    "sdxl": ((2, 77, 2048), (2, 4, 128, 128)),
    "sd35-large": ((2, 333, 4096), (2, 16, 128, 128)),     # 77 CLIP + 256 T5 tokens
    "flux-dev": ((1, 512, 4096), (1, 4096, 64)),           # 2x2-packed latents: 64x64 patches of 16x4 channels
}


@pytest.mark.parametrize("name", FULL_MODELS)
def test_full_size_model_runs_on_meta_at_1024(name):
    """Text encoders, denoiser and VAE decoder run once with the pipeline's own inputs for 1024x1024, on meta."""
    result = run_on_meta(name, 1024, 1024)
    assert result["device"] == "meta"
    assert (result["prompt_embeds"], result["denoiser"]) == EXPECTED[name]
    assert result["image"] == (1, 3, 1024, 1024)
    # the table the CPU memory rule reads (transformers 5.0 counts T5's untied embedding twice: +0.8 %)
    assert result["elements"] == pytest.approx(ELEMENTS[name], rel=0.01)


def test_cpu_memory_rule():
    assert weights_bytes("flux-dev", torch.bfloat16) == 2 * ELEMENTS["flux-dev"]
    problem = models.cpu_memory_problem("flux-dev", "bf16", 24 * 10**9)
    assert problem and "33.7 GB" in problem and "24.0 GB of RAM" in problem
    assert models.cpu_memory_problem("sd35-large", "bf16", 24 * 10**9)          # 27.6 GB: does not fit in 24 GB
    assert models.cpu_memory_problem("sd15", "fp32", 24 * 10**9) is None       # 4.3 GB
    assert models.cpu_memory_problem("sd35-large", "bf16", 64 * 10**9) is None


def test_full_size_models_are_supported_on_cpu_when_they_fit():
    cpu = {"device": "cpu"}
    assert support_of(Case("sd15", "diffusers"), cpu)
    assert not support_of(Case("sd15", "diffusers", dtype="fp16"), cpu)         # the fp16-on-CPU rule still holds
    flux = support_of(Case("flux-dev", "diffusers", dtype="bf16"), cpu)
    assert bool(flux) == (models.cpu_memory_problem("flux-dev", "bf16", psutil.virtual_memory().total) is None)
    assert "full-size" not in models.spec("tiny-sd").description and not models.spec("tiny-sd").full_size


@pytest.mark.slow
def test_sd15_runs_on_cpu_through_the_runner(tmp_path):
    """A real 1.07 B-parameter SD1.5 (random weights), 64x64, one step, fp32, through Session/run_case."""
    session = Session(tmp_path, RunOptions(warmup=0, repeats=1, save_images=False, timeout_s=600))
    try:
        record = session.result(Case("sd15", "diffusers", height=64, width=64, steps=1))
    finally:
        session.close()
    assert record.status == "passed", f"{record.error_class}: {record.reason}"
    assert record.parity["verdict"] == "pass"
    assert set(record.parity["components"]) == {"text_encoder", "unet", "vae"}
    assert record.e2e["n"] == 1 and record.e2e["p50"] > 0
    assert record.build["load"] > 0
    assert any("full-size sd15 on CPU: 4.3 GB of fp32" in note for note in record.notes)
