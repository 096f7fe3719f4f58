"""torch.compile backend: the denoiser and the VAE decoder compiled with TorchInductor; text encoders stay eager.

Compilation is lazy, so prepare() runs the pipeline once on the case's shapes and records that as build["compile"].
The inductor cache lives under the run's cache folder (TORCHINDUCTOR_CACHE_DIR), kept across runs: the first run
is a cold compile, later ones are warm (info["inductor_cache"] says which, from inductor's own hit/miss counters).
Graph breaks and recompiles come from torch._dynamo's counters; `info` is refreshed after every executor call, so a
shape change that forces a recompile during the timed run shows up in the record (info["recompiles"]).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from backends.base import Backend, Prepared, Support, timed, variant_options

# option -> torch.compile options and model knobs; a variant merges its options' entries
VARIANTS = {
    "": {},
    "max-autotune": {"mode": "max-autotune"},
    "reduce-overhead": {"mode": "reduce-overhead"},      # CUDA graphs
    "fullgraph": {"fullgraph": True},
    "dynamic": {"dynamic": True},
    "channels-last": {"channels_last": True},
    "fused-qkv": {"fuse_qkv": True},
}
_COMPILE_KEYS = ("mode", "fullgraph", "dynamic")


def knobs_for(variant: str) -> dict:
    knobs: dict = {}
    for name in variant_options(variant):
        knobs.update(VARIANTS[name])
    return knobs


def compile_options(variant: str) -> dict:
    return {k: v for k, v in knobs_for(variant).items() if k in _COMPILE_KEYS}


def dynamo_stats() -> dict:
    """Graph, graph-break and cache counters of torch._dynamo / inductor since the last reset."""
    from torch._dynamo.utils import counters

    breaks = counters.get("graph_break", {})
    inductor = counters.get("inductor", {})
    return {"graphs": int(counters.get("stats", {}).get("unique_graphs", 0)),
            "graph_breaks": int(sum(breaks.values())),
            "graph_break_reasons": [str(r)[:200] for r in list(breaks)[:5]],
            "fxgraph_cache_hit": int(inductor.get("fxgraph_cache_hit", 0)),
            "fxgraph_cache_miss": int(inductor.get("fxgraph_cache_miss", 0))}


def cache_state(stats: dict) -> str:
    """cold: inductor compiled graphs from scratch; warm: every graph came from the on-disk cache."""
    if stats["fxgraph_cache_miss"] == 0 and stats["fxgraph_cache_hit"] > 0:
        return "warm"
    return "cold" if stats["fxgraph_cache_hit"] == 0 else "partial"


def set_inductor_cache(folder: Path) -> Path:
    """Point inductor's on-disk caches at `folder` (read at compile time, so setting it here is enough)."""
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder


class TorchCompileBackend(Backend):
    name = "torch_compile"
    options = tuple(v for v in VARIANTS if v)
    exclusive = (("max-autotune", "reduce-overhead"),)
    description = "torch.compile (TorchInductor) of the denoiser and VAE decoder; modes, fullgraph, dynamic, knobs"

    def __init__(self):
        self._live: dict | None = None      # the info dict of the current Prepared, refreshed after each call
        self._baseline_graphs = 0

    def support(self, case, env) -> Support:
        base = super().support(case, env)
        if not base:
            return base
        device = env.get("device", "cpu") if isinstance(env, dict) else "cpu"
        if "reduce-overhead" in variant_options(case.variant) and device != "cuda":
            return Support.no("reduce-overhead uses CUDA graphs: needs a CUDA device")
        return Support.yes()

    def prepare(self, model, case, cache) -> Prepared:
        previous_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        cache_dir = set_inductor_cache(Path(cache) / "inductor")
        # a fresh dynamo state per case: compiled code is cached per code object, and stale entries from earlier
        # cases would eat the recompile limit (then dynamo silently falls back to eager)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        knobs = knobs_for(case.variant)
        options = compile_options(case.variant)
        pipeline = model.pipeline
        denoiser = getattr(pipeline, model.denoiser)
        vae = getattr(pipeline, model.vae)
        build: dict[str, float] = {}
        if knobs.get("fuse_qkv"):
            for module in (denoiser, vae):
                if hasattr(module, "fuse_qkv_projections"):
                    module.fuse_qkv_projections()
        if knobs.get("channels_last"):
            denoiser.to(memory_format=torch.channels_last)
            vae.to(memory_format=torch.channels_last)

        compiled_denoiser = torch.compile(denoiser, **options)
        setattr(pipeline, model.denoiser, compiled_denoiser)
        vae.decoder = torch.compile(vae.decoder, **options)   # pipeline keeps calling vae.decode(...)
        executors = {model.denoiser: compiled_denoiser, model.vae: vae}

        info = {"compile_options": {k: options.get(k) for k in _COMPILE_KEYS}, "compiled": [model.denoiser, "vae.decoder"],
                "channels_last": bool(knobs.get("channels_last")), "fused_qkv": bool(knobs.get("fuse_qkv")),
                "inductor_cache_dir": str(cache_dir), "torch": torch.__version__}
        with timed(build, "compile"), torch.inference_mode():
            self.warm_call(model, case)
        stats = dynamo_stats()
        info.update(stats, inductor_cache=cache_state(stats), graphs_at_prepare=stats["graphs"], recompiles=0)
        self._live, self._baseline_graphs = info, stats["graphs"]
        handles = [m.register_forward_hook(lambda *_: self._refresh()) for m in (compiled_denoiser, vae.decoder)]

        def close():
            for h in handles:
                h.remove()
            self._live = None
            if previous_dir is None:     # leave the process as we found it
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous_dir
        return Prepared(pipeline, executors, build, info, on_close=[close])

    def warm_call(self, model, case) -> None:
        """Compilation is lazy: one pipeline call on this case's shapes compiles every graph it needs."""
        from harness.models import pipeline_inputs
        model.pipeline(**pipeline_inputs(model, case))

    def _refresh(self) -> None:
        if self._live is not None:
            stats = dynamo_stats()
            self._live.update(stats, recompiles=stats["graphs"] - self._baseline_graphs)

    def run_stats(self) -> dict:
        """Counters now (graphs, graph breaks, recompiles since prepare) for the current prepared pipeline."""
        self._refresh()
        return dict(self._live or dynamo_stats())

    def close(self) -> None:
        torch._dynamo.reset()
