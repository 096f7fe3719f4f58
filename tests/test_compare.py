import numpy as np
import pytest
import torch

from harness import compare
from harness.compare import Tolerance


def test_identical_tensors_pass_with_zero_error():
    x = torch.randn(2, 4, 8, 8)
    r = compare.check_tensor(x, x.clone(), Tolerance(0.0, 0.0, "max"))
    assert r["passed"] and r["max_abs"] == 0 and r["cosine"] == pytest.approx(1.0)


def test_known_error_and_smallest_passing_tolerance():
    ref = torch.ones(100)
    out = ref.clone()
    out[7] = 1.5
    r = compare.check_tensor(ref, out, Tolerance(1e-3, 1e-3, "elemwise"))
    assert not r["passed"]
    assert r["max_abs"] == pytest.approx(0.5)
    assert r["needed"]["atol"] == pytest.approx(0.5 - 1e-3)
    assert "would pass with atol>=" in r["error"]
    # the tolerance it names does pass
    assert compare.check_tensor(ref, out, Tolerance(r["needed"]["atol"] + 1e-9, 1e-3, "elemwise"))["passed"]


def test_statistics_mean_vs_max():
    ref = torch.zeros(1000) + 1.0
    out = ref.clone()
    out[0] = 2.0                                        # one outlier
    assert not compare.check_tensor(ref, out, Tolerance(0.01, 0.0, "max"))["passed"]
    assert compare.check_tensor(ref, out, Tolerance(0.01, 0.0, "mean"))["passed"]     # mean abs 0.001
    assert compare.check_tensor(ref, out, Tolerance(0.01, 0.0, "median"))["passed"]


def test_rel_l2_and_cosine_known():
    ref = torch.tensor([3.0, 4.0])
    out = torch.tensor([3.0, 4.5])
    m = compare.tensor_metrics(ref, out)
    assert m["rel_l2"] == pytest.approx(0.5 / 5.0)
    assert m["cosine"] == pytest.approx((9 + 18) / (5 * np.hypot(3, 4.5)))


def test_nan_guard():
    r = compare.check_tensor(torch.ones(4), torch.tensor([1.0, float("nan"), 1.0, float("inf")]),
                             Tolerance(1, 1, "max"))
    assert not r["passed"] and "1 NaN and 1 Inf" in r["error"]


def test_psnr_known_answer():
    ref = np.full((8, 8, 3), 0.5)
    out = ref + 0.1                                      # MSE 0.01 -> 20 dB
    assert compare.psnr(ref, out) == pytest.approx(20.0)


def test_image_check_constant_guard_and_ssim():
    rng = np.random.default_rng(0)
    ref = rng.random((1, 16, 16, 3))
    r = compare.check_image(ref, np.zeros_like(ref), compare.ImageTolerance(40, 0.9))
    assert not r["passed"] and "constant" in r["error"]
    ok = compare.check_image(ref, ref.copy(), compare.ImageTolerance(40, 0.9))
    assert ok["passed"] and ok["ssim"] == pytest.approx(1.0) and ok["psnr"] == float("inf")
    noisy = np.clip(ref + rng.normal(0, 0.05, ref.shape), 0, 1)
    bad = compare.check_image(ref, noisy, compare.ImageTolerance(40, 0.98))
    assert not bad["passed"] and 20 < bad["psnr"] < 30 and "would pass with min_psnr<=" in bad["error"]


def test_tolerance_defaults_and_overrides():
    assert compare.tolerance_for("unet", "fp32").atol == 1e-4
    assert compare.tolerance_for("text_encoder_2", "fp16").statistic == "p99"
    t = compare.tolerance_for("transformer", "bf16", {"denoiser": {"atol": 0.5}})
    assert t.atol == 0.5 and t.rtol == 5e-2
    with pytest.raises(ValueError):
        Tolerance(1, 1, "mode")


def test_flatten_output_positions():
    out = (torch.ones(1), [torch.zeros(2), torch.zeros(3)])
    flat = compare.flatten_output(out)
    assert list(flat) == ["0", "1.0", "1.1"]
