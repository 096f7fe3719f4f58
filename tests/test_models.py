import json

import pytest
import torch

from harness import models
from harness.errors import UserError
from harness.models.full import build_full
from harness.selection.cases import Case


def test_tiny_build_is_deterministic(tmp_path):
    """Building twice from the fixed seeds yields byte-identical weights."""
    first = models.save_tiny("tiny-sd", tmp_path / "a")
    second = models.save_tiny("tiny-sd", tmp_path / "b")
    assert first == second
    manifest = json.loads((tmp_path / "a" / models.MANIFEST).read_text())
    assert manifest["weights"][""] == first and len(manifest["weights"]) > 3


def test_corrupt_cache_entry_is_detected_and_rebuilt(tmp_path):
    folder, digest, notes = models.ensure_tiny("tiny-sd", tmp_path)
    assert notes == []
    weights = next(folder.rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])          # a partial write
    folder2, digest2, notes2 = models.ensure_tiny("tiny-sd", tmp_path)
    assert digest2 == digest and notes2 and "hash mismatch" in notes2[0]
    (folder / models.MANIFEST).unlink()                         # no manifest: also rebuilt
    assert "unreadable manifest" in models.ensure_tiny("tiny-sd", tmp_path)[2][0]


def test_path_model_loads_through_from_pretrained(tmp_path):
    models.save_tiny("tiny-sd3", tmp_path / "ckpt")
    name = f"path:{tmp_path / 'ckpt'}"
    assert models.spec(name).kind == "sd3"
    loaded = models.load(name, "fp32")
    assert loaded.denoiser == "transformer" and len(loaded.text_encoders) == 3


def test_path_model_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        models.spec(f"path:{tmp_path / 'missing'}")
    with pytest.raises(UserError, match="not a diffusers model folder"):
        models.spec(f"path:{tmp_path}")
    with pytest.raises(UserError, match="unknown model"):
        models.spec("sd99")


def test_fixed_latents_are_the_same_for_every_backend():
    model = models.load("tiny-sd", "fp32")
    a = models.initial_latents(model, Case("tiny-sd", "diffusers"))
    b = models.initial_latents(model, Case("tiny-sd", "onnxruntime"))
    assert torch.equal(a, b) and a.shape == (1, 4, 8, 8)
    c = models.initial_latents(model, Case("tiny-sd", "diffusers", height=128))
    assert c.shape == (1, 4, 16, 8)


@pytest.mark.parametrize("name, component, billions", [
    ("sd15", "unet", 0.8595), ("sdxl", "unet", 2.5675), ("sd35-large", "transformer", 8.0566),
    ("flux-dev", "transformer", 11.9014)])
def test_full_size_architectures_build_on_meta_in_requested_dtype(name, component, billions):
    """The genuine configs give the published parameter counts; nothing is materialised (meta device)."""
    pipe = build_full(name, torch.bfloat16, "meta")
    module = getattr(pipe, component)
    assert sum(p.numel() for p in module.parameters()) / 1e9 == pytest.approx(billions, abs=1e-3)
    for value in pipe.components.values():
        if isinstance(value, torch.nn.Module):
            assert {p.dtype for p in value.parameters()} == {torch.bfloat16}
            assert next(value.parameters()).device.type == "meta"


def test_pickled_checkpoints_are_refused(tmp_path):
    """Weights load with safetensors only: a .bin (pickle) checkpoint we did not write is never unpickled."""
    from harness.models.tiny import build_tiny_sd
    build_tiny_sd().save_pretrained(tmp_path, safe_serialization=False)
    assert list(tmp_path.rglob("*.bin"))
    with pytest.raises(UserError, match="no file named diffusion_pytorch_model.safetensors"):
        models.load(f"path:{tmp_path}", "fp32")
