"""torch.compile backend: the denoiser and the VAE decoder compiled with TorchInductor; text encoders stay eager.

Compilation is lazy, so prepare() runs the pipeline once on the case's shapes and records that as build["compile"].
The inductor cache lives under the run's cache folder (TORCHINDUCTOR_CACHE_DIR), kept across runs: the first run
is a cold compile, later ones are warm (info["inductor_cache"] says which, from inductor's own hit/miss counters).
Graph breaks, recompiles and inductor's CUDA-graph skips come from torch._dynamo's counters, read once after the
measured calls (Prepared.after_measure), never inside the timed region.

Options (a variant merges its options' entries of OPTION_TABLE):
  max-autotune, reduce-overhead (CUDA graphs), fullgraph, dynamic, channels-last, fused-qkv: one knob each;
  recipe: the public diffusers "fast" recipe as one preset (fullgraph, max-autotune without CUDA graphs, fused QKV
    projections, channels-last, and the inductor flags of diffusion-fast / diffusers-torchao), so our figures can
    be set beside the published ones (docs/backends.md has the sources);
  tf32: TF32 matmuls and convolutions (the runner sets strict fp32 before every case; restored at close);
  int8wo, int8dq, fp8dq, nvfp4, mxfp8, nf4: the denoiser quantised before it is compiled (backends/quantization/,
    the scheme table shared with the diffusers backend); build["quantize"] apart from build["compile"].
Inductor config is process-global: what a case changes is undone at close.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from backends import quantization
from backends.base import Backend, Prepared, Support, enable_tf32, timed, variant_options

# the inductor flags of the diffusers fast recipe (huggingface/diffusion-fast README and utils/pipeline_utils.py;
# sayakpaul/diffusers-torchao inference/benchmark_video.py as first published)
RECIPE_INDUCTOR_CONFIG = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True, "epilogue_fusion": False,
                          "coordinate_descent_check_all_directions": True}

# option -> torch.compile options and model knobs; a variant merges its options' entries
OPTION_TABLE = {
    "max-autotune": {"mode": "max-autotune"},
    "reduce-overhead": {"mode": "reduce-overhead"},      # CUDA graphs
    "fullgraph": {"fullgraph": True},
    "dynamic": {"dynamic": True},
    "channels-last": {"channels_last": True},
    "fused-qkv": {"fuse_qkv": True},
    # the published recipes pass mode="max-autotune", which also turns on CUDA graphs on a GPU: the recipe here
    # keeps them off (reduce-overhead is the CUDA-graph figure), so the compiler's own gain is what is measured
    "recipe": {"mode": "max-autotune-no-cudagraphs", "fullgraph": True, "channels_last": True, "fuse_qkv": True,
               "inductor_config": RECIPE_INDUCTOR_CONFIG},
    "tf32": {"tf32": True},
}
_COMPILE_KEYS = ("mode", "fullgraph", "dynamic")


def knobs_for(variant: str) -> dict:
    knobs: dict = {}
    for name in variant_options(variant) & set(OPTION_TABLE):
        knobs.update(OPTION_TABLE[name])
    return knobs


def compile_options(variant: str) -> dict:
    return {k: v for k, v in knobs_for(variant).items() if k in _COMPILE_KEYS}


def dynamo_stats() -> dict:
    """Graph, graph-break, cache and CUDA-graph counters of torch._dynamo / inductor since the last reset."""
    from torch._dynamo.utils import counters

    breaks = counters.get("graph_break", {})
    inductor = counters.get("inductor", {})
    return {"graphs": int(counters.get("stats", {}).get("unique_graphs", 0)),
            "graph_breaks": int(sum(breaks.values())),
            "graph_break_reasons": [str(r)[:200] for r in list(breaks)[:5]],
            "fxgraph_cache_hit": int(inductor.get("fxgraph_cache_hit", 0)),
            "fxgraph_cache_miss": int(inductor.get("fxgraph_cache_miss", 0)),
            # inductor bumps this each time it logs "skipping cudagraphs due to ..." (torch 2.2+)
            "cudagraph_skips": int(inductor.get("cudagraph_skips", 0)),
            "cudagraph_skip_reasons": cudagraph_skip_reasons()}


def cudagraph_skip_reasons() -> list[str]:
    """Why inductor ran graphs without CUDA graphs: each compilation's metrics keep its last skip reason."""
    from torch._dynamo.utils import get_compilation_metrics

    reasons = []
    for metrics in get_compilation_metrics():
        reason = getattr(metrics, "cudagraph_skip_reason", None)
        if reason and reason not in reasons:
            reasons.append(str(reason)[:200])
    return reasons[:5]


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


def apply_inductor_config(values: dict) -> Callable[[], None]:
    """Set process-global inductor config entries; returns the function that puts the previous values back."""
    import torch._inductor.config as config

    saved = {key: getattr(config, key) for key in values}
    for key, value in values.items():
        setattr(config, key, value)

    def undo() -> None:
        for key, value in saved.items():
            setattr(config, key, value)
    return undo


class TorchCompileBackend(Backend):
    name = "torch_compile"
    workloads = ("text-to-image", "text-embedding")
    options = (*OPTION_TABLE, *quantization.OPTIONS)
    # one mode; and the recipe already holds fullgraph, channels-last and fused QKV; one quantisation scheme
    exclusive = (("max-autotune", "reduce-overhead", "recipe"), ("recipe", "fullgraph"), ("recipe", "channels-last"),
                 ("recipe", "fused-qkv"), quantization.OPTIONS)
    description = ("torch.compile (TorchInductor) of the denoiser and VAE decoder; modes, fullgraph, dynamic, knobs, "
                   "the diffusers fast recipe, tf32")

    def support(self, case, env) -> Support:
        base = super().support(case, env)
        if not base:
            return base
        device = env.get("device", "cpu") if isinstance(env, dict) else "cpu"
        chosen = variant_options(case.variant)
        if "reduce-overhead" in chosen and device != "cuda":
            return Support.no("reduce-overhead uses CUDA graphs: needs a CUDA device")
        if "tf32" in chosen and device != "cuda":
            return Support.no(f"tf32 is a CUDA math mode: on {device} this case would repeat the one without +tf32")
        diffusion_only = sorted(chosen & {"recipe", "fused-qkv", "channels-last"})
        if diffusion_only and case.workload != "text-to-image":
            return Support.no(f"{', '.join(diffusion_only)}: knobs of diffusion denoisers and VAEs (convolutions, "
                              "diffusers' QKV fusion), not of a text encoder")
        return quantization.support(case.variant, case, env)

    def prepare(self, model, case, cache) -> Prepared:
        undo: list[Callable[[], None]] = []
        previous_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")

        def restore_cache_dir() -> None:     # leave the process as we found it
            if previous_dir is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous_dir
        cache_dir = set_inductor_cache(Path(cache) / "inductor")
        undo.append(restore_cache_dir)
        # a fresh dynamo state per case: compiled code is cached per code object, and stale entries from earlier
        # cases would eat the recompile limit (then dynamo silently falls back to eager)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        torch._dynamo.utils.clear_compilation_metrics()
        knobs = knobs_for(case.variant)
        options = compile_options(case.variant)
        if knobs.get("inductor_config"):
            undo.append(apply_inductor_config(knobs["inductor_config"]))
        if knobs.get("tf32"):
            undo.append(enable_tf32())
        pipeline = model.pipeline
        build: dict[str, float] = {}
        info = {"compile_options": {k: options.get(k) for k in _COMPILE_KEYS},
                "inductor_config": dict(knobs.get("inductor_config") or {}), "tf32": bool(knobs.get("tf32")),
                "inductor_cache_dir": str(cache_dir), "torch": torch.__version__}
        try:
            if model.encoder:   # text-embedding: the encoder is the whole model worth compiling
                compiled = torch.compile(getattr(pipeline, model.encoder), **options)
                setattr(pipeline, model.encoder, compiled)
                executors = {model.encoder: compiled}
                info["compiled"] = [model.encoder]
            else:
                scheme = quantization.scheme_of(case.variant)
                if scheme:   # quantised first, as the published recipes do: the compiled graph holds its kernels
                    info["quantization"] = quantization.quantize(model, scheme, case, build)
                denoiser = getattr(pipeline, model.denoiser)
                vae = getattr(pipeline, model.vae)
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
                info.update(compiled=[model.denoiser, "vae.decoder"],
                            channels_last=bool(knobs.get("channels_last")), fused_qkv=bool(knobs.get("fuse_qkv")),
                            recipe="recipe" in variant_options(case.variant))
            with timed(build, "compile"), torch.inference_mode():
                self.warm_call(model, case)
        except BaseException:
            for fn in reversed(undo):
                fn()
            raise
        prepared = self._prepared(pipeline, executors, build, info, undo)
        scheme = quantization.scheme_of(case.variant)
        if scheme:
            prepared.output_tolerance, prepared.tolerance_overrides = quantization.tolerance(scheme)
        return prepared

    @staticmethod
    def _prepared(pipeline, executors, build, info, undo) -> Prepared:
        stats = dynamo_stats()
        info.update(stats, inductor_cache=cache_state(stats), graphs_at_prepare=stats["graphs"], recompiles=0)

        def after_measure() -> dict:
            """Counters after the measured calls: a shape change that forced a recompile shows up here."""
            now = dynamo_stats()
            return {**now, "recompiles": now["graphs"] - stats["graphs"]}
        return Prepared(pipeline, executors, build, info, on_close=undo, after_measure=after_measure)

    def warm_call(self, model, case) -> None:
        """Compilation is lazy: one pipeline call on this case's shapes compiles every graph it needs."""
        if model.encoder:
            from harness.models.embedding import batch_texts
            model.pipeline(batch_texts(case), case.seq)
            return
        from harness.models import pipeline_inputs
        model.pipeline(**pipeline_inputs(model, case))

    def close(self) -> None:
        torch._dynamo.reset()
