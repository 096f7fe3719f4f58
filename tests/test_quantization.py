"""Quantised variants (backends/quantization/): the GPU rules decided before any model loads, the torchao pairing,
weights counted as stored, and int8 weight-only on the real tiny-sd pipeline passing parity with smaller weights,
eager (through the runner) and compiled (the real torch_compile prepare on a small stand-in denoiser)."""
import math
from types import SimpleNamespace

import pytest
import torch

from backends import quantization as q
from backends.base import DESCRIBED
from backends.diffusers import DiffusersBackend
from backends.torch_compile import TorchCompileBackend
from harness.measure.memory import stored_bytes
from harness.measure.run_options import RunOptions
from harness.measure.session import Session
from harness.models import LoadedModel
from harness.selection.cases import Case


def _gpu(capability: str) -> dict:
    return {"device": "cuda", "gpu": {"name": "GPU", "capability": capability}}


CPU = {"device": "cpu"}


@pytest.mark.parametrize("backend", [DiffusersBackend(), TorchCompileBackend()], ids=lambda b: b.name)
def test_each_scheme_is_judged_on_each_gpu_before_the_model_loads(backend):
    def verdict(option, env):
        return backend.support(Case("tiny-sd", backend.name, option), env)

    assert verdict("int8wo", CPU) and verdict("int8dq", CPU)
    for option, needs in (("fp8dq", "needs compute capability 8.9+ (sm_89)"),
                          ("nvfp4", "needs a Blackwell GPU (sm_100)"), ("mxfp8", "sm_100/sm_103"),
                          ("nf4", "needs a CUDA GPU")):
        refused = verdict(option, CPU)
        assert not refused and needs in refused.reason and "CPU" in refused.reason, refused.reason
    assert "this GPU is sm_86" in verdict("fp8dq", _gpu("8.6")).reason           # A10 / RTX 3090
    assert "sm_90" in verdict("nvfp4", _gpu("9.0")).reason                       # H100
    assert "no MXFP8 kernels for sm_120" in verdict("mxfp8", _gpu("12.0")).reason  # RTX 5090
    # torchao is installed here, so every capability rule that passes leaves the case supported
    for option, capability in (("fp8dq", "8.9"), ("fp8dq", "9.0"), ("nvfp4", "10.0"), ("nvfp4", "12.0"),
                               ("mxfp8", "10.0"), ("int8wo", "7.5")):
        assert verdict(option, _gpu(capability)), (option, capability)
    # a described stack is judged with its own versions (diffbench backends --stack), not this machine's
    described = {**_gpu("9.0"), "stack": {"torch": "2.10.0+cu128"}, "versions": {"torchao": "0.18.0"}}
    assert "torchao 0.18.0 pairs with torch >=2.11.0" in verdict("fp8dq", described).reason
    assert verdict("fp8dq", {**described, "stack": {"torch": "2.12.1+cu130"}})
    # a described stack without torchao has none, whatever this machine holds
    without = {**_gpu("9.0"), "stack": {"torch": "2.12.1+cu130"}, "versions": {}, DESCRIBED: "stack.json"}
    assert "torchao not installed" in verdict("fp8dq", without).reason
    assert "bitsandbytes not installed" in verdict("nf4", without).reason
    if "text-embedding" in backend.workloads:
        embedding = backend.support(Case("minilm-l6", backend.name, "int8wo", seq=16), CPU)
        assert "quantises a diffusion denoiser" in embedding.reason


def test_one_scheme_per_case_and_not_with_layerwise_fp8():
    assert "conflicting" in DiffusersBackend().variant_problem("int8wo+fp8dq")
    assert "conflicting" in DiffusersBackend().variant_problem("layerwise-fp8+int8wo")
    assert "conflicting" in TorchCompileBackend().variant_problem("int8dq+nvfp4")
    assert TorchCompileBackend().canonical_variant("int8wo+max-autotune") == "max-autotune+int8wo"


def test_torchao_torch_pairing():
    assert q.pairing_problem((0, 18, 0), (2, 13, 0)) is None
    assert q.pairing_problem((0, 18, 0), (2, 11, 0)) is None
    assert "torchao 0.18.0 pairs with torch >=2.11.0" in q.pairing_problem((0, 18, 0), (2, 10, 1))
    assert q.pairing_problem((0, 16, 0), (2, 10, 0)) is None
    assert "pairs with torch 2.10.0 (" in q.pairing_problem((0, 16, 0), (2, 13, 0))       # ABI: exactly that one
    assert "0.15+" in q.pairing_problem((0, 14, 1), (2, 13, 0))
    assert "not installed" in q.pairing_problem(None, (2, 13, 0))


def test_every_scheme_builds_its_real_diffusers_config_without_a_gpu():
    built = {name: scheme.config(torch.bfloat16) for name, scheme in q.SCHEMES.items() if scheme.library == "torchao"}
    assert {name: type(c.quant_type).__name__ for name, c in built.items()} == {
        "int8wo": "Int8WeightOnlyConfig", "int8dq": "Int8DynamicActivationInt8WeightConfig",
        "fp8dq": "Float8DynamicActivationFloat8WeightConfig", "nvfp4": "NVFP4DynamicActivationNVFP4WeightConfig",
        "mxfp8": "MXDynamicActivationMXWeightConfig"}
    assert type(built["fp8dq"].quant_type.granularity[0]).__name__ == "PerRow"     # per-row scales, as published
    assert built["mxfp8"].quant_type.weight_dtype == torch.float8_e4m3fn
    for name, config in built.items():
        assert type(config.quant_type).__name__ in q.SCHEMES[name].config_text
    # bitsandbytes is not installed here: nf4 is refused before its config is ever built
    assert "bitsandbytes not installed" in DiffusersBackend().support(Case("tiny-sd", "diffusers", "nf4"),
                                                                       _gpu("9.0")).reason


def test_quantising_the_loaded_denoiser_equals_diffusers_load_time_quantisation():
    """What quantize() does after loading is bit for bit what PipelineQuantizationConfig does while loading."""
    from diffusers import DiffusionPipeline, PipelineQuantizationConfig, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig
    from harness import models
    folder, _, _ = models.ensure_tiny("tiny-sd")
    config = PipelineQuantizationConfig(quant_mapping={"unet": TorchAoConfig(Int8WeightOnlyConfig())})
    at_load = DiffusionPipeline.from_pretrained(str(folder), quantization_config=config, dtype=torch.float32,
                                                local_files_only=True, use_safetensors=True).unet
    model = models.load("tiny-sd", "fp32", "cpu")
    facts = q.quantize(model, q.SCHEMES["int8wo"], Case("tiny-sd", "diffusers", "int8wo"), {})
    after = dict(model.pipeline.unet.named_parameters())
    quantised = 0
    for name, expected in at_load.named_parameters():
        got = after[name]
        assert type(got) is type(expected), name
        if hasattr(expected, "__tensor_flatten__"):
            quantised += 1
            assert all(torch.equal(getattr(got, t), getattr(expected, t)) for t in expected.__tensor_flatten__()[0])
        else:
            assert torch.equal(got, expected), name
    assert quantised == facts["components"]["unet"]["linear_layers"] > 0


def test_a_quantised_weight_is_counted_at_its_stored_size():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    linear = torch.nn.Linear(256, 256)
    quantize_(linear, Int8WeightOnlyConfig())
    weight = linear.weight
    # the subclass reports the original fp32 element size, so numel * element_size counts 4 bytes per int8 weight
    assert weight.dtype == torch.float32 and weight.numel() * weight.element_size() == 256 * 256 * 4
    inner = sum(getattr(weight, name).untyped_storage().nbytes() for name in weight.__tensor_flatten__()[0])
    assert stored_bytes([weight, linear.bias]) == inner + 256 * 4
    assert 256 * 256 <= inner < 256 * 256 * 1.1                 # int8 data plus per-row scales


def test_int8wo_passes_parity_against_the_unquantised_reference_with_smaller_weights(tmp_path):
    session = Session(tmp_path, RunOptions(warmup=0, repeats=1, time_components=False, save_images=False))
    try:
        plain = session.result(Case("tiny-sd", "diffusers", steps=2))
        record = session.result(Case("tiny-sd", "diffusers", "int8wo", steps=2))
    finally:
        session.close()
    assert plain.status == "passed" and record.status == "passed", (record.reason, record.info.get("traceback"))
    image = record.parity["image"]
    assert math.isfinite(image["psnr"]) and 50.0 <= image["psnr"] < 100.0     # close, never identical
    assert image["tolerance"]["min_psnr_db"] == q.SCHEMES["int8wo"].tolerance.min_psnr_db
    assert record.parity["components"]["unet"]["passed"] and record.parity["components"]["unet"]["max_abs"] > 0
    assert record.memory["weights_mb"]["unet"] < 0.8 * plain.memory["weights_mb"]["unet"]
    assert record.memory["weights_mb"]["vae"] == plain.memory["weights_mb"]["vae"]
    assert record.memory["weights_mb"]["total"] < plain.memory["weights_mb"]["total"]
    assert record.build["quantize"] > 0
    facts = record.info["quantization"]
    assert facts["components"]["unet"]["linear_layers"] > 0 and facts["not_quantized"] == ["text_encoder", "vae"]
    assert facts["library"].startswith("torchao ") and "TorchAoConfig(Int8WeightOnlyConfig())" in facts["config"]


class _Denoiser(torch.nn.Module):
    """Linear layers (what torchao quantises) around a conv, the shape of a denoiser block."""
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 64, 1)
        self.proj = torch.nn.Linear(64, 64)
        self.out = torch.nn.Linear(64, 4)

    def forward(self, sample, timestep, return_dict=True):
        h = self.conv(sample).permute(0, 2, 3, 1)
        h = self.out(torch.nn.functional.silu(self.proj(h)) * timestep)
        return (h.permute(0, 3, 1, 2),)


class _Decoder(torch.nn.Module):
    def forward(self, z):
        return torch.tanh(z[:, :3])


class _CompileOnce(TorchCompileBackend):
    """The real prepare path (quantise, then compile); the warm call runs the stand-in denoiser once."""
    def warm_call(self, model, case):
        model.pipeline.unet(torch.randn(1, 4, 8, 8), torch.tensor(1.0))


def test_torch_compile_quantises_before_it_compiles(tmp_path):
    torch.manual_seed(0)
    reference = _Denoiser()
    pipeline = SimpleNamespace(unet=_Denoiser(), vae=SimpleNamespace(decoder=_Decoder()))
    pipeline.unet.load_state_dict(reference.state_dict())
    model = LoadedModel("tiny-sd", "sd", pipeline, "fp32", "cpu", text_encoders=[], denoiser="unet", vae="vae")
    backend = _CompileOnce()
    prepared = backend.prepare(model, Case("tiny-sd", "torch_compile", "int8wo"), tmp_path)
    try:
        assert prepared.build["quantize"] > 0 and prepared.build["compile"] > 0
        assert prepared.info["quantization"]["components"]["unet"]["linear_layers"] == 2
        assert prepared.info["graph_breaks"] == 0
        int8wo = q.SCHEMES["int8wo"]
        assert prepared.output_tolerance == q.tolerance(int8wo)[0]
        assert (prepared.output_tolerance.min_psnr_db, prepared.output_tolerance.source) == (
            int8wo.tolerance.min_psnr_db, int8wo.tolerance_source)             # the scheme's bound, with its source
        x = torch.randn(1, 4, 8, 8)
        with torch.inference_mode():
            out, ref = pipeline.unet(x, torch.tensor(1.0))[0], reference(x, torch.tensor(1.0))[0]
        error = (out - ref).abs().max().item()
        assert 0 < error < 0.05 * ref.abs().max().item()        # quantised: close, not identical
    finally:
        prepared.close()
        backend.close()


def test_the_reports_memory_table_shows_the_weights_as_stored():
    from reports.render import _memory_row
    record = {"case_id": "tiny-sd/diffusers+int8wo/fp32/b1/64x64/s4", "status": "passed",
              "memory": {"peak_mb": 900.0, "weights_mb": {"text_encoder": 0.262, "unet": 3.862, "total": 8.049}}}
    assert _memory_row(record)["weights MB"] == "8.049"
    assert "weights MB" not in _memory_row({**record, "memory": {"peak_mb": 900.0}})    # older records
