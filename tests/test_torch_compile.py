"""torch_compile backend: option rules, the recipe preset, process-global settings undone at close, counters read
after the measured calls, one real (tiny) compile: cold vs warm inductor cache, recompiles; and the default
matrix's torch.compile cases through `diffbench run` into the checkout's own inductor cache."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from backends import torch_compile as tc
from backends.base import enable_tf32
from harness.models import LoadedModel
from harness.selection.cases import Case

ROOT = Path(__file__).resolve().parent.parent
CPU = {"device": "cpu"}


def test_variants_and_support():
    b = tc.TorchCompileBackend()
    assert "reduce-overhead" in b.options and ("max-autotune", "reduce-overhead", "recipe") in b.exclusive
    assert "conflicting options" in b.support(Case("tiny-sd", "torch_compile", "max-autotune+reduce-overhead"), CPU).reason
    assert b.support(Case("tiny-sd", "torch_compile"), CPU)
    ro = b.support(Case("tiny-sd", "torch_compile", "reduce-overhead"), CPU)
    assert not ro and "CUDA graphs" in ro.reason
    assert "unknown variant" in b.support(Case("tiny-sd", "torch_compile", "turbo"), CPU).reason
    assert tc.compile_options("fullgraph") == {"fullgraph": True}
    assert tc.compile_options("channels-last") == {}
    assert tc.compile_options("max-autotune") == {"mode": "max-autotune"}
    tf32 = b.support(Case("tiny-sd", "torch_compile", "tf32"), CPU)
    assert not tf32 and "CUDA math mode" in tf32.reason


def test_recipe_is_a_preset_exclusive_with_what_it_holds():
    b = tc.TorchCompileBackend()
    assert tc.compile_options("recipe") == {"mode": "max-autotune-no-cudagraphs", "fullgraph": True}
    knobs = tc.knobs_for("recipe")
    assert knobs["channels_last"] and knobs["fuse_qkv"]
    assert knobs["inductor_config"] == {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True,
                                        "epilogue_fusion": False, "coordinate_descent_check_all_directions": True}
    for other in ("max-autotune", "reduce-overhead", "fullgraph", "channels-last", "fused-qkv"):
        assert "conflicting options" in b.support(Case("tiny-sd", "torch_compile", f"recipe+{other}"), CPU).reason
    assert b.support(Case("tiny-sd", "torch_compile", "recipe+dynamic"), CPU)
    assert b.canonical_variant("tf32+recipe") == "recipe+tf32"


def test_inductor_config_is_undone():
    import torch._inductor.config as config
    before = {k: getattr(config, k) for k in tc.RECIPE_INDUCTOR_CONFIG}
    undo = tc.apply_inductor_config(tc.RECIPE_INDUCTOR_CONFIG)
    assert {k: getattr(config, k) for k in before} == tc.RECIPE_INDUCTOR_CONFIG != before
    undo()
    assert {k: getattr(config, k) for k in before} == before


@pytest.fixture
def strict_fp32():
    """The runner's state before every case: strict fp32; torch's defaults put back afterwards."""
    precision, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.allow_tf32 = cudnn


def test_tf32_on_and_restored(strict_fp32):
    restore = enable_tf32()
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    restore()
    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.conv.fp32_precision = "ieee"          # strict fp32 set through torch's newer API
    restore = enable_tf32()
    assert torch.backends.cudnn.allow_tf32
    restore()
    assert not torch.backends.cudnn.allow_tf32


def test_cudagraph_skips_are_read_from_inductors_own_counter_and_metrics():
    """inductor's own skip logger, called as inductor calls it during a compilation (a real skip needs CUDA)."""
    from torch._dynamo.utils import counters, get_metrics_context
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

    counters.clear()
    torch._dynamo.utils.clear_compilation_metrics()
    with get_metrics_context():
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs (1 instances)")
    stats = tc.dynamo_stats()
    assert stats["cudagraph_skips"] == 1
    assert stats["cudagraph_skip_reasons"] == ["skipping cudagraphs due to mutated inputs (1 instances)"]
    counters.clear()


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
    return LoadedModel("tiny-sd", "sd", pipeline, "fp32", "cpu", denoiser="unet", vae="vae")


class _NoCallBackend(tc.TorchCompileBackend):
    """The real prepare path without calling the compiled modules: torch.compile is lazy, so nothing compiles."""
    seen: dict = {}

    def warm_call(self, model, case):
        import torch._inductor.config as config
        self.seen = {"inductor": {k: getattr(config, k) for k in tc.RECIPE_INDUCTOR_CONFIG},
                     "matmul_precision": torch.get_float32_matmul_precision()}


def test_recipe_and_tf32_hold_during_the_case_and_are_undone_at_close(tmp_path, strict_fp32):
    import torch._inductor.config as config
    before = {k: getattr(config, k) for k in tc.RECIPE_INDUCTOR_CONFIG}
    backend, model = _NoCallBackend(), _model()
    prepared = backend.prepare(model, Case("tiny-sd", "torch_compile", "recipe+tf32"), tmp_path)
    assert backend.seen == {"inductor": tc.RECIPE_INDUCTOR_CONFIG, "matmul_precision": "high"}
    assert prepared.info["recipe"] and prepared.info["compile_options"]["mode"] == "max-autotune-no-cudagraphs"
    assert prepared.info["channels_last"] and prepared.info["tf32"]
    assert model.pipeline.vae.decoder.conv.weight.is_contiguous(memory_format=torch.channels_last)
    prepared.close()
    assert {k: getattr(config, k) for k in before} == before
    assert torch.get_float32_matmul_precision() == "highest"
    backend.close()


def test_compile_cold_then_warm_and_recompile_is_counted(tmp_path):
    backend = _TinyBackend()
    case = Case("tiny-sd", "torch_compile")
    eager = _model()
    model = _model()
    cold = backend.prepare(model, case, tmp_path)
    assert cold.info["inductor_cache"] == "cold" and cold.build["compile"] > 0
    assert cold.info["graph_breaks"] == 0 and cold.info["recompiles"] == 0 and cold.info["graphs"] == 2
    assert cold.info["cudagraph_skips"] == 0 and cold.info["cudagraph_skip_reasons"] == []
    assert (tmp_path / "inductor").is_dir()
    assert not model.pipeline.unet._forward_hooks and not model.pipeline.vae.decoder._forward_hooks  # nothing timed
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model.pipeline.unet(x, torch.tensor(1.0))[0], eager.pipeline.unet(x, torch.tensor(1.0))[0],
                              atol=1e-5)
        model.pipeline.unet(torch.randn(1, 4, 10, 12), torch.tensor(1.0))     # new shape: dynamo recompiles
    assert cold.info["recompiles"] == 0                      # info is what prepare saw ...
    assert cold.after_measure()["recompiles"] >= 1           # ... the counters are read after the measured calls
    cold.close()

    warm = backend.prepare(_model(), case, tmp_path)        # same cache folder, fresh dynamo state
    assert warm.info["inductor_cache"] == "warm" and warm.info["recompiles"] == 0
    warm.close()
    backend.close()


@pytest.mark.slow
def test_the_default_matrix_compiles_through_the_cli_into_the_checkouts_cache(tmp_path):
    """`diffbench run --backend torch_compile --quick` as a user runs it: in the checkout, with its .cache, with
    the machine's usual torch threads (inductor's cache key holds the thread count). Both default models compile
    whole (two graphs, no break), pass parity, never recompile while measured, and the record says cold or warm
    as inductor's own counters do. Cost: ~100 s on the 2-core CI VM on a fresh clone (two cold compiles), ~35 s
    with the cache warm. On a fresh clone this is the cold compile of those cases, here in the parallel stage:
    the suites, which then run the same two cases alone, find the cache warm and say so in their records."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)       # the unit stage's one thread per worker: the suites run without it
    shared_cache = (ROOT / env.get("DIFFBENCH_CACHE", ".cache")).resolve()
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--model", "tiny-sd", "--model", "tiny-sd3",
                           "--backend", "torch_compile", "--quick", "--no-report", "--results-dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (records_file,) = tmp_path.glob("*/records.jsonl")
    records = {r["model"]: r for r in map(json.loads, records_file.read_text().splitlines())}
    assert set(records) == {"tiny-sd", "tiny-sd3"}
    for name, record in records.items():
        info = record["info"]
        assert record["status"] == "passed" and record["parity"]["verdict"] == "pass", (name, record["reason"])
        assert (info["graphs"], info["graph_breaks"], info["recompiles"]) == (2, 0, 0), (name, info)
        assert info["fxgraph_cache_hit"] + info["fxgraph_cache_miss"] == 2, (name, info)
        assert info["inductor_cache"] == tc.cache_state(info) in ("cold", "warm"), (name, info)
        assert Path(info["inductor_cache_dir"]) == shared_cache / "inductor"       # the suites' and the main job's
        assert record["build"]["compile"] > 0
