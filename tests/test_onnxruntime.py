"""onnxruntime backend: support rules, executor parity against eager (tiny-sd), export reuse, pipeline parity."""
import numpy as np
import pytest
import torch

from backends.onnxruntime import OnnxRuntimeBackend
from harness.cases import Case
from harness.models import load, pipeline_inputs

CPU = {"device": "cpu"}


def test_support_rules():
    b = OnnxRuntimeBackend()
    assert b.support(Case("tiny-sd", "onnxruntime"), CPU)
    assert b.support(Case("tiny-sd", "onnxruntime", "dynamo"), CPU)
    fp16 = b.support(Case("tiny-sd", "onnxruntime", dtype="fp16"), CPU)
    assert not fp16 and "CPU EP" in fp16.reason
    trt = b.support(Case("tiny-sd", "onnxruntime", "trt-ep"), CPU)
    assert not trt and "CUDA GPU" in trt.reason
    assert "unknown variant" in b.support(Case("tiny-sd", "onnxruntime", "nope"), CPU).reason


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(eager model, ORT-prepared model, Prepared, cache folder) for tiny-sd."""
    cache = tmp_path_factory.mktemp("ort-cache")
    eager, model = load("tiny-sd", "fp32"), load("tiny-sd", "fp32")
    prepared = OnnxRuntimeBackend().prepare(model, Case("tiny-sd", "onnxruntime"), cache)
    return eager, model, prepared, cache


def test_executors_replace_the_components(pair):
    eager, model, prepared, _ = pair
    assert set(prepared.executors) == {"text_encoder", "unet", "vae"}
    for name, executor in prepared.executors.items():
        assert getattr(model.pipeline, name) is executor and isinstance(executor, torch.nn.Module)
        assert executor.config == getattr(eager.pipeline, name).config
        assert executor.dtype == torch.float32 and executor.device.type == "cpu"
    info = prepared.info
    assert info["exporter"] == "legacy" and info["providers"]["unet"] == ["CPUExecutionProvider"]
    assert info["session_options"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert {"export", "session"} <= set(prepared.build)


def test_text_encoder_parity(pair):
    eager, model, _, _ = pair
    ids = torch.randint(0, 1000, (2, 77))
    with torch.no_grad():
        ref = eager.pipeline.text_encoder(ids, output_hidden_states=True)
        out = model.pipeline.text_encoder(ids, output_hidden_states=True)
    assert type(out) is type(ref)
    assert (out[0] - ref[0]).abs().max() < 1e-5
    assert (out.pooler_output - ref.pooler_output).abs().max() < 1e-5
    assert (out.hidden_states[-2] - ref.hidden_states[-2]).abs().max() < 1e-5
    assert model.pipeline.text_encoder(ids).hidden_states is None


def test_unet_parity_with_0d_timestep_and_tuple_output(pair):
    eager, model, _, _ = pair
    torch.manual_seed(1)
    sample, ehs, t = torch.randn(2, 4, 9, 9), torch.randn(2, 77, 32), torch.tensor(981.0)
    with torch.no_grad():
        ref = eager.pipeline.unet(sample, t, encoder_hidden_states=ehs, return_dict=False)[0]
        out = model.pipeline.unet(sample, t, encoder_hidden_states=ehs, cross_attention_kwargs=None,
                                  return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == ref.shape
    assert (out[0] - ref).abs().max() < 1e-5


def test_vae_decode_parity(pair):
    eager, model, _, _ = pair
    z = torch.randn(1, 4, 8, 10)
    with torch.no_grad():
        ref = eager.pipeline.vae.decode(z, return_dict=False)[0]
        out = model.pipeline.vae.decode(z, return_dict=False, generator=None)
    assert isinstance(out, tuple) and out[0].shape == ref.shape == (1, 3, 64, 80)
    assert (out[0] - ref).abs().max() < 1e-5
    assert model.pipeline.vae.decode(z).sample.shape == ref.shape


def test_second_prepare_reuses_exports_and_corruption_is_noted(pair):
    _, _, _, cache = pair
    case = Case("tiny-sd", "onnxruntime")
    again = OnnxRuntimeBackend().prepare(load("tiny-sd", "fp32"), case, cache)
    assert all(again.info["export_reused"].values()) and "notes" not in again.info
    data = next((cache / "onnx" / "tiny-sd").glob("vae-*")) / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-10])
    third = OnnxRuntimeBackend().prepare(load("tiny-sd", "fp32"), case, cache)
    assert third.info["export_reused"] == {"text_encoder": True, "unet": True, "vae": False}
    assert third.info["notes"] == ["onnx export cache vae re-exported: model.onnx.data truncated "
                                   f"({data.stat().st_size - 10} of {data.stat().st_size} bytes)"]


@pytest.mark.parametrize("which,size", [("tiny-sd", 72), ("tiny-sd3", 96)])
def test_pipeline_image_parity(which, size, tmp_path):
    """Whole pipeline with ORT executors vs eager: same latents, same prompt; odd latent size for tiny-sd."""
    case = Case(which, "onnxruntime", height=size, width=size, steps=2)
    eager = load(which, "fp32")
    with torch.no_grad():
        ref = eager.pipeline(**pipeline_inputs(eager, case)).images
    model = load(which, "fp32")
    OnnxRuntimeBackend().prepare(model, case, tmp_path)
    with torch.no_grad():
        out = model.pipeline(**pipeline_inputs(model, case)).images
    mse = float(np.mean((out - ref) ** 2))
    assert out.shape == ref.shape == (1, size, size, 3)
    assert 10 * np.log10(1.0 / max(mse, 1e-20)) > 80
