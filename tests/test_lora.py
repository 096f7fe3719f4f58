"""LoRA adapters (--lora, --lora-scale, --lora-fuse): a real adapter made with peft on the tiny UNet and saved with
diffusers' own save_lora_weights; case ids, sources (file, folder, hub cache), loading, fusing, a parity run."""
import json
import os

import huggingface_hub
import numpy as np
import pytest
import torch

from harness import models
from harness.errors import UserError
from harness.measure.run_options import RunOptions
from harness.measure.session import Session
from harness.models import hub, lora
from harness.selection import options
from harness.selection.cases import Case
from tests.hf_cache import add_to_cache


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A rank-4 LoRA on the tiny UNet's attention projections, non-zero (init_lora_weights=False: a fresh peft
    adapter is an identity), saved as a LoRA trainer saves it."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    folder = tmp_path_factory.mktemp("lora") / "pixel"
    unet = UNet2DConditionModel.from_pretrained(str(models.ensure_tiny("tiny-sd")[0]), subfolder="unet")
    torch.manual_seed(7)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=get_peft_model_state_dict(unet))
    return folder


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.setenv(lora.SOURCES_ENV, "{}")
    monkeypatch.setenv(hub.REVISIONS_ENV, "{}")


def test_lora_is_part_of_the_model_in_the_case_id(adapter, clean_env):
    (case,) = options.select_cases(["tiny-sd"], ["diffusers"], loras=[str(adapter)])
    assert case.id == "tiny-sd+lora:pixel/diffusers/fp32/b1/64x64/s4" and Case.from_id(case.id) == case
    assert json.loads(os.environ[lora.SOURCES_ENV]) == {"pixel": str(adapter)}   # workers get the source
    file = adapter / lora.DIFFUSERS_FILE
    (fused,) = options.select_cases(["tiny-sd"], ["torch_compile"], loras=[str(file)], lora_scale=0.5, lora_fuse=True)
    assert fused.model == "tiny-sd+lora:pytorch_lora_weights+scale:0.5+fused"
    assert lora.parse(fused.model) == lora.LoraChoice("tiny-sd", ("pytorch_lora_weights",), 0.5, True)
    assert models.spec(fused.model).kind == "sd" and models.seed_for(fused) == models.seed_for(case)
    # text-embedding models in the same run are left as they are
    assert {c.model for c in options.select_cases(["tiny-sd", "minilm-l6"], ["diffusers"], seqs=[16],
                                                  loras=[str(adapter)])} == {"tiny-sd+lora:pixel", "minilm-l6"}


def test_lora_sources_and_their_errors(adapter, clean_env, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no such file or folder, and not a hub id"):
        lora.choose([str(tmp_path / "nope.safetensors")], 1.0, False)
    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "b.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="expected pytorch_lora_weights.safetensors or a single .safetensors"):
        lora.locate(str(tmp_path))
    other = tmp_path / "x" / "pixel"
    other.mkdir(parents=True)
    (other / "w.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="two LoRAs named 'pixel'"):
        lora.choose([str(adapter), str(other)], 1.0, False)
    # a LoRA repository in the local Hugging Face cache: named ORG--NAME, recorded with its commit
    cache = tmp_path / "hub"
    commit = add_to_cache(cache, "org/pixel-lora", adapter)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert lora.choose(["org/pixel-lora"], 1.0, False) == ("org--pixel-lora",)
    located = lora.locate("org/pixel-lora")
    assert located.record["commit"] == commit and located.file.name == lora.DIFFUSERS_FILE
    with pytest.raises(UserError, match="`hf download org/gone-lora --revision main`"):
        lora.choose(["org/gone-lora"], 1.0, False)


def test_the_lora_changes_the_image(adapter, clean_env):
    """The adapter really runs: the image moves (fused = unfused is the parity test below)."""
    (case,) = options.select_cases(["tiny-sd"], ["diffusers"], loras=[str(adapter)], lora_scale=0.5, steps=[2])

    def image(name):
        model = models.load(name, "fp32")
        with torch.no_grad():
            return model, np.asarray(model.pipeline(**models.pipeline_inputs(model, case)).images)
    _, base = image("tiny-sd")
    with_lora, changed = image(case.model)
    assert np.abs(base - changed).max() > 0.05
    assert set(with_lora.build) == {"lora_load"}
    (entry,) = with_lora.weights["lora"]
    assert entry["label"] == "pixel" and entry["scale"] == 0.5 and not entry["fused"] and len(entry["sha256"]) == 64


def test_a_fused_lora_case_passes_parity_against_the_unfused_reference(adapter, clean_env, tmp_path):
    """The eager reference of a LoRA case runs the same LoRA; of a fused one, the same LoRA unfused: fusing is
    judged like an optimisation."""
    (case,) = options.select_cases(["tiny-sd"], ["diffusers"], loras=[str(adapter)], lora_fuse=True, steps=[2])
    session = Session(tmp_path, RunOptions(warmup=0, repeats=1, time_components=False, save_images=False))
    try:
        record = session.result(case)
    finally:
        session.close()
    assert record.status == "passed", (record.reason, record.info.get("traceback"))
    # fused weights round differently from the unfused layers: close, not identical (the merge happened)
    assert record.parity["verdict"] == "pass" and 0 < record.parity["image"]["max_abs"] < 1e-3
    assert {"load", "lora_load", "lora_fuse"} <= set(record.build)
    assert record.weights["lora"][0]["label"] == "pixel" and record.weights["lora"][0]["fused"]
