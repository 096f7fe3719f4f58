"""diffusers (reference) backend: its only option, tf32, is refused off CUDA and undone at close."""
from types import SimpleNamespace

import torch

from backends.diffusers import DiffusersBackend
from harness.models import LoadedModel
from harness.selection.cases import Case


def test_tf32_option_rules():
    b = DiffusersBackend()
    assert b.support(Case("tiny-sd", "diffusers"), {"device": "cpu"})
    refused = b.support(Case("tiny-sd", "diffusers", "tf32"), {"device": "cpu"})
    assert not refused and "CUDA math mode" in refused.reason
    assert b.support(Case("tiny-sd", "diffusers", "tf32"), {"device": "cuda"})
    assert "unknown variant" in b.support(Case("tiny-sd", "diffusers", "fast"), {"device": "cpu"}).reason


def test_tf32_is_on_during_the_case_and_restored_at_close():
    precision, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")       # what the runner sets before every case
    torch.backends.cudnn.allow_tf32 = False
    try:
        model = LoadedModel("tiny-sd", "sd", SimpleNamespace(unet="unet", vae="vae"), "fp32", "cpu", denoiser="unet",
                            vae="vae")
        plain = DiffusersBackend().prepare(model, Case("tiny-sd", "diffusers"), None)
        assert torch.get_float32_matmul_precision() == "highest" and plain.info["tf32"] is False
        plain.close()
        prepared = DiffusersBackend().prepare(model, Case("tiny-sd", "diffusers", "tf32"), None)
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        assert prepared.info["tf32"] is True and prepared.executors == {"unet": "unet", "vae": "vae"}
        prepared.close()
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = cudnn
