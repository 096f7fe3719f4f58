"""torch_compile backend: variant rules, and one real (tiny) compile: cold vs warm inductor cache, recompiles."""
from types import SimpleNamespace

import torch

from backends import torch_compile as tc
from harness.cases import Case

CPU = {"device": "cpu"}


def test_variants_and_support():
    b = tc.TorchCompileBackend()
    assert "reduce-overhead" in b.options and ("max-autotune", "reduce-overhead") in b.exclusive
    assert b.support(Case("tiny-sd", "torch_compile"), CPU)
    ro = b.support(Case("tiny-sd", "torch_compile", "reduce-overhead"), CPU)
    assert not ro and "CUDA graphs" in ro.reason
    assert "unknown variant" in b.support(Case("tiny-sd", "torch_compile", "turbo"), CPU).reason
    assert tc.compile_options("fullgraph") == {"fullgraph": True}
    assert tc.compile_options("channels-last") == {}
    assert tc.compile_options("max-autotune") == {"mode": "max-autotune"}


def test_cache_state():
    assert tc.cache_state({"fxgraph_cache_hit": 0, "fxgraph_cache_miss": 2}) == "cold"
    assert tc.cache_state({"fxgraph_cache_hit": 2, "fxgraph_cache_miss": 0}) == "warm"
    assert tc.cache_state({"fxgraph_cache_hit": 1, "fxgraph_cache_miss": 1}) == "partial"


class _Decoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        return torch.tanh(self.conv(x))


class _Vae(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = _Decoder()

    def decode(self, z):
        return (self.decoder(z),)


class _Denoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, sample, timestep, return_dict=True):
        return (torch.nn.functional.silu(self.conv(sample)) * timestep,)


class _TinyBackend(tc.TorchCompileBackend):
    """The real prepare path, with a two-module stand-in pipeline (a real UNet compile takes ~1-2 min cold)."""
    def warm_call(self, model, case):
        latents = torch.randn(case.batch, 4, case.height // 8, case.width // 8)
        out = model.pipeline.unet(latents, torch.tensor(1.0), return_dict=False)[0]
        model.pipeline.vae.decode(out)


def _model():
    torch.manual_seed(0)
    pipeline = SimpleNamespace(unet=_Denoiser(), vae=_Vae())
    return SimpleNamespace(pipeline=pipeline, denoiser="unet", vae="vae")


def test_compile_cold_then_warm_and_recompile_is_counted(tmp_path):
    backend = _TinyBackend()
    case = Case("tiny-sd", "torch_compile")
    eager = _model()
    model = _model()
    cold = backend.prepare(model, case, tmp_path)
    assert cold.info["inductor_cache"] == "cold" and cold.build["compile"] > 0
    assert cold.info["graph_breaks"] == 0 and cold.info["recompiles"] == 0 and cold.info["graphs"] == 2
    assert (tmp_path / "inductor").is_dir()
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model.pipeline.unet(x, torch.tensor(1.0))[0], eager.pipeline.unet(x, torch.tensor(1.0))[0],
                              atol=1e-5)
        model.pipeline.unet(torch.randn(1, 4, 10, 12), torch.tensor(1.0))     # new shape: dynamo recompiles
    assert cold.info["recompiles"] >= 1 and backend.run_stats()["recompiles"] >= 1
    cold.close()

    warm = backend.prepare(_model(), case, tmp_path)        # same cache folder, fresh dynamo state
    assert warm.info["inductor_cache"] == "warm" and warm.info["recompiles"] == 0
    warm.close()
    backend.close()
