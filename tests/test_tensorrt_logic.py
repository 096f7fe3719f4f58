"""tensorrt backend logic that needs no TensorRT: precision/arch rules, profiles, cache keys, ONNX preparation."""
import pytest
import torch

from backends import tensorrt as trtb
from harness.cases import Case


def test_precision_rules():
    ok = trtb.precision_support
    assert ok("fp16", (7, 5), "10.0.1")
    assert not ok("bf16", (7, 5), "10.0.1") and "sm_75" in ok("bf16", (7, 5), "10.0.1").reason
    assert ok("bf16", (8, 0), "10.0.1") and not ok("bf16", (8, 0), "8.6.1")
    assert not ok("fp8", (8, 6), "10.3.0") and ok("fp8", (8, 9), "10.3.0") and ok("fp8", (9, 0), "10.3.0")
    assert not ok("fp8", (9, 0), "9.2.0")
    for cc in ((10, 0), (10, 3), (12, 0)):
        assert ok("fp4", cc, "10.8.0")
    assert not ok("fp4", (9, 0), "10.8.0") and "Blackwell" in ok("fp4", (9, 0), "10.8.0").reason
    assert not ok("fp4", (10, 0), "10.7.0")
    assert not ok("fp16", (6, 1), "10.0.0")
    assert not trtb.quantization_support("fp8") and trtb.quantization_support("fp16")
    assert trtb.precision_for(Case("m", "tensorrt", "fp8", "fp16")) == "fp8"
    assert trtb.precision_for(Case("m", "tensorrt", "static", "bf16")) == "bf16"


def _cases(*shapes):
    return [Case("sdxl", "tensorrt", "", "fp16", b, h, w) for b, h, w in shapes]


def test_axis_ranges_from_the_matrix():
    cases = _cases((1, 1024, 1024), (1, 1024, 1024), (4, 768, 1344))
    r = trtb.axis_ranges(cases, "sdxl", "denoiser")
    assert r["batch"] == (2, 2, 8)                      # classifier-free guidance doubles the denoiser batch
    assert r["latent_height"] == (96, 128, 128) and r["latent_width"] == (128, 128, 168)
    assert trtb.axis_ranges(cases, "sdxl", "vae")["batch"] == (1, 1, 4)
    assert trtb.axis_ranges(cases, "flux", "denoiser")["batch"] == (1, 1, 4)
    assert trtb.axis_ranges(cases, "flux", "denoiser")["image_sequence"] == (48 * 84, 64 * 64, 64 * 64)
    static = trtb.axis_ranges(cases, "sdxl", "vae", static=True)
    assert all(lo == opt == hi for lo, opt, hi in static.values())
    with pytest.raises(ValueError):
        trtb.axis_ranges([], "sd", "vae")


def test_input_profile_and_outside_check():
    shapes = {"sample": ["batch", 4, "latent_height", "latent_width"], "timestep": ["batch"],
              "encoder_hidden_states": ["batch", "text_sequence", 2048]}
    example = {"sample": [2, 4, 129, 129], "timestep": [2], "encoder_hidden_states": [2, 77, 2048]}
    ranges = trtb.axis_ranges(_cases((1, 512, 512), (2, 1024, 1024)), "sdxl", "denoiser")
    profile = trtb.input_profile(shapes, ranges, example)
    assert profile["sample"] == ((2, 4, 64, 64), (2, 4, 64, 64), (4, 4, 128, 128))
    assert profile["encoder_hidden_states"] == ((2, 77, 2048), (2, 77, 2048), (4, 77, 2048))   # text length fixed
    assert trtb.outside_profile(profile, {"sample": (2, 4, 96, 96)}) is None
    assert "outside the engine profile [64, 128]" in trtb.outside_profile(profile, {"sample": (2, 4, 160, 96)})
    need = trtb.case_shapes(Case("sdxl", "tensorrt", "", "fp16", 1, 768, 512), "sdxl", "denoiser", shapes, example)
    assert need["sample"] == (2, 4, 96, 64) and need["encoder_hidden_states"] == (2, 77, 2048)


def test_engine_key_changes_with_every_ingredient():
    profile = {"x": ((1, 4), (1, 4), (2, 4))}
    base = trtb.engine_key("10.3.0", (9, 0), "onnxkey", profile, "fp16", False)
    assert base == trtb.engine_key("10.3.0", (9, 0), "onnxkey", profile, "fp16", False)
    others = [trtb.engine_key("10.4.0", (9, 0), "onnxkey", profile, "fp16", False),
              trtb.engine_key("10.3.0", (8, 9), "onnxkey", profile, "fp16", False),
              trtb.engine_key("10.3.0", (9, 0), "other", profile, "fp16", False),
              trtb.engine_key("10.3.0", (9, 0), "onnxkey", {"x": ((1, 4), (2, 4), (2, 4))}, "fp16", False),
              trtb.engine_key("10.3.0", (9, 0), "onnxkey", profile, "bf16", False),
              trtb.engine_key("10.3.0", (9, 0), "onnxkey", profile, "fp16", True)]
    assert len({base, *others}) == 7


def test_onnx_preparation_reads_axes_and_fixes_dims(tmp_path):
    import onnx
    from backends.onnx import export as ox
    from backends.onnx.components import ComponentSpec
    conv = torch.nn.Conv2d(4, 3, 3, padding=1)
    spec = ComponentSpec("vae", "vae", conv, {"latent": torch.randn(2, 4, 8, 8)}, ["image"],
                         {"latent": {0: "batch", 2: "latent_height", 3: "latent_width"},
                          "image": {0: "batch", 2: "height", 3: "width"}}, {"image": [2, 3, 8, 8]})
    folder = tmp_path / "entry"
    folder.mkdir()
    ox._export_to(spec, folder, "legacy", 17)
    shapes = trtb.io_shapes(folder / ox.ONNX_FILE)
    assert shapes == {"latent": ["batch", 4, "latent_height", "latent_width"]}
    fixed = trtb.fix_input_dims(folder / ox.ONNX_FILE, {"latent": (1, 4, 12, 10)}, tmp_path / "static")
    assert trtb.io_shapes(fixed) == {"latent": [1, 4, 12, 10]}
    onnx.checker.check_model(str(fixed))      # the copy still finds its weights beside it


def test_unsupported_here_with_reasons(monkeypatch):
    b = trtb.TensorRTBackend()
    case = Case("tiny-sd", "tensorrt")
    monkeypatch.setattr(trtb, "_trt_version", lambda: None)
    reason = b.support(case, {"device": "cpu"}).reason
    assert "tensorrt not installed" in reason
    monkeypatch.setattr(trtb, "_trt_version", lambda: "10.8.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 6))
    assert "needs a CUDA GPU" in b.support(case, {"device": "cpu"}).reason
    gpu = {"device": "cuda"}
    assert b.support(case, gpu)
    assert "fp8 needs Ada" in b.support(Case("tiny-sd", "tensorrt", "fp8", "fp16"), gpu).reason
    big = Case("tiny-sd", "tensorrt", "", "fp32", 1, 256, 256)
    assert "outside the engine profile" in b.support(big, gpu).reason
    assert b.support(Case("tiny-sd", "tensorrt", "static", "fp32", 1, 256, 256), gpu)
    b.configure([big, Case("tiny-sd", "tensorrt")])       # the matrix widens the profile
    assert b.support(big, gpu)
    assert "unknown variant" in b.support(Case("tiny-sd", "tensorrt", "int3"), gpu).reason
