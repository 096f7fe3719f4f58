"""The reference backend: eager diffusers pipelines. Its executors are the modules themselves.

Its options are diffusers' own memory-saving features, each applied through diffusers' API (never our own
offloading), combinable with "+" (e.g. `diffusers+model-offload+vae-tiling`):

  model-offload        pipeline.enable_model_cpu_offload: whole components move to the GPU when used
  sequential-offload   pipeline.enable_sequential_cpu_offload: leaf modules move to the GPU when used
  group-offload        pipeline.enable_group_offload, block level (one block per group), CUDA streams
  group-offload-leaf   pipeline.enable_group_offload, leaf level, CUDA streams
  vae-tiling           vae.enable_tiling: the latent is decoded in overlapping tiles
  vae-slicing          vae.enable_slicing: a batch is decoded one image at a time
  attention-slicing    pipeline.enable_attention_slicing: attention computed in slices (UNet pipelines)
  layerwise-fp8        denoiser.enable_layerwise_casting: weights stored in float8_e4m3fn, computed in the case dtype

A variant that would do nothing for a case is unsupported for it, with the reason, never measured as if it
worked: offloading without a GPU, VAE slicing at batch 1, VAE tiling where the latent fits in one tile, attention
slicing where no component's attention processors take slices.

  int8wo, int8dq, fp8dq, nvfp4, mxfp8, nf4
                       the denoiser quantised with torchao (through diffusers' TorchAoConfig) or bitsandbytes
                       (BitsAndBytesConfig): backends/quantization/ holds the scheme table, its GPU rules and
                       tolerances (docs/quantization.md)
  tf32                 TF32 matmuls and convolutions (GPU; the runner sets strict fp32 before every case, prepare
                       turns TF32 on, close restores it)

Parity: the plain reference is the yardstick. Offloading and slicing compute the same arithmetic (slicing in
another order: batch-1 kernels) and are held to the dtype's usual tolerances, which allow for reordering
(docs/measuring.md); tiling and fp8 storage change numbers by design and declare the tolerances below, set from the
error measured on correct runs (docs/variants.md).
"""
from __future__ import annotations

import torch

from backends import quantization
from backends.base import Backend, Prepared, Support, Unsupported, enable_tf32, variant_options
from harness.judge.compare import ImageTolerance

OFFLOAD = ("model-offload", "sequential-offload", "group-offload", "group-offload-leaf")

# (image tolerance, component overrides) per option whose output differs from the plain reference by design.
# vae-tiling: diffusers blends overlapping tiles; on the seeded tiny VAEs (random weights, a receptive field wider
# than the 64-pixel tile) the tiled decode of a correct run measured PSNR 24.3 dB / SSIM 0.89 (tiny-sd, 512x512) and
# 16.0 dB / 0.50 (tiny-sd3, 512x512) against the untiled one: held to 14 dB / 0.40, which still fails a blank,
# shifted or garbage decode (those measure below 10 dB). layerwise-fp8: e4m3 storage keeps 3 mantissa bits
# (relative weight error up to 6 %); measured 34.5 dB / 0.988 (tiny-sd) and 43.3 dB / 0.999 (tiny-sd3): held to
# 30 dB / 0.95, the fp16 image bound.
VARIANT_TOLERANCES = {
    "vae-tiling": (
        ImageTolerance(14.0, 0.40, "tiled vs untiled decode measured 24.3 dB / 0.89 (tiny-sd) and 16.0 dB / 0.50 "
                                   "(tiny-sd3) at 512x512; a blank, shifted or garbage decode < 10 dB"),
        {"vae": {"atol": 1.0, "rtol": 1.0, "statistic": "p99",
                 "source": "tiled vs untiled decode: overlapping tiles blended by design; tiny-sd's VAE output "
                           "at 1024x1024 measured max abs 1.08 (0.35 x max|ref|), mean 0.072, rel L2 0.28, p99 "
                           "within 1.0 (image 26.6 dB / 0.94)"}}),
    "layerwise-fp8": (
        ImageTolerance(30.0, 0.95, "e4m3 weight storage measured 34.5 dB / 0.988 (tiny-sd) and 43.3 dB / 0.999 "
                                   "(tiny-sd3): held to the fp16 image bound"),
        {"denoiser": {"atol": 0.25, "rtol": 0.25, "statistic": "p99",
                      "source": "e4m3 keeps 3 mantissa bits (weights off by up to 6 %): tiny-sd's denoiser output "
                                "measured max abs 0.097 (0.10 x max|ref|), mean 0.023, rel L2 0.08 at 64x64"}}),
}


class DiffusersBackend(Backend):
    name = "diffusers"
    options = (*OFFLOAD, "vae-tiling", "vae-slicing", "attention-slicing", "layerwise-fp8", *quantization.OPTIONS,
               "tf32")
    exclusive = (OFFLOAD, ("layerwise-fp8", *quantization.OPTIONS))    # one way to store the denoiser's weights
    description = "eager PyTorch diffusers pipeline (the reference), and diffusers' memory-saving features"

    def support(self, case, env) -> Support:
        base = super().support(case, env)
        if not base:
            return base
        chosen = variant_options(case.variant)
        device = env.get("device", "cpu") if isinstance(env, dict) else "cpu"
        if "tf32" in chosen and device != "cuda":
            return Support.no(f"tf32 is a CUDA math mode: on {device} this case would repeat the one without +tf32")
        offload = chosen & set(OFFLOAD)
        if offload and device != "cuda":
            return Support.no(f"{next(iter(offload))} moves weights between CPU and GPU: on CPU there is nothing "
                              "to offload")
        if "vae-slicing" in chosen and case.batch < 2:
            return Support.no("vae-slicing decodes a batch one image at a time: at batch 1 it does nothing")
        if "attention-slicing" in chosen:
            from harness import models
            kind = models.spec(case.model).kind
            if kind not in ("sd", "sdxl"):
                return Support.no(f"attention-slicing: the {kind} pipeline's transformer attention takes no slices "
                                  "(only UNet attention processors do)")
        if "layerwise-fp8" in chosen and not hasattr(torch, "float8_e4m3fn"):
            return Support.no(f"layerwise-fp8 needs torch.float8_e4m3fn (torch {torch.__version__} has none)")
        return quantization.support(case.variant, case, env)

    def load_device(self, case, device: str) -> str:
        # offloading starts from weights in CPU memory; loading them onto the GPU first would only add a spike
        return "cpu" if variant_options(case.variant) & set(OFFLOAD) else device

    def prepare(self, model, case, cache) -> Prepared:
        pipeline = model.pipeline
        chosen = variant_options(case.variant)
        applied, build = {}, {}
        scheme = quantization.scheme_of(case.variant)
        quantized = quantization.quantize(model, scheme, case, build) if scheme else None
        if chosen:
            applied = _apply(pipeline, model, case, chosen)
        executors = {name: getattr(pipeline, name) for name in model.components}
        tf32 = "tf32" in chosen
        info = {"attention": "SDPA (torch default)", "tf32": tf32}
        if applied:
            info["memory_features"] = applied
        if quantized:
            info["quantization"] = quantized
        image_tol, overrides = None, {}
        tolerances = {name: VARIANT_TOLERANCES[name] for name in chosen & set(VARIANT_TOLERANCES)}
        if scheme:
            tolerances[scheme.name] = quantization.tolerance(scheme)
        for tol, components in tolerances.values():
            image_tol = tol if image_tol is None else ImageTolerance(
                min(image_tol.min_psnr_db, tol.min_psnr_db), min(image_tol.min_ssim, tol.min_ssim),
                f"{image_tol.source}; {tol.source}")
            overrides.update(components)
        return Prepared(pipeline=pipeline, executors=executors, build=build, info=info, output_tolerance=image_tol,
                        tolerance_overrides=overrides or None, on_close=[enable_tf32()] if tf32 else [])


def _apply(pipeline, model, case, chosen: frozenset) -> dict:
    """Turn on each chosen feature through diffusers' API; say what was done (for the record)."""
    applied = {}
    vae = getattr(pipeline, model.vae)
    denoiser = getattr(pipeline, model.denoiser)
    if "vae-tiling" in chosen:
        latent = (case.height // model.vae_scale_factor, case.width // model.vae_scale_factor)
        vae.enable_tiling()
        tile = int(getattr(vae, "tile_latent_min_size", 0) or 0)
        if tile and max(latent) <= tile:
            raise Unsupported(f"vae-tiling: the {latent[0]}x{latent[1]} latent fits in one {tile}x{tile} tile of "
                              f"this VAE, so tiling does nothing at {case.height}x{case.width}")
        applied["vae-tiling"] = {"tile_latent": tile, "overlap": getattr(vae, "tile_overlap_factor", None)}
    if "vae-slicing" in chosen:
        vae.enable_slicing()
        applied["vae-slicing"] = {"batch": case.batch}
    if "attention-slicing" in chosen:
        before = _processors(pipeline)
        pipeline.enable_attention_slicing()
        changed = sum(1 for key, cls in _processors(pipeline).items() if before.get(key) != cls)
        if not changed:
            raise Unsupported("attention-slicing: no attention processor of this pipeline changed, so it does "
                              "nothing here")
        applied["attention-slicing"] = {"processors_sliced": changed}
    if "layerwise-fp8" in chosen:
        denoiser.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=denoiser.dtype)
        applied["layerwise-fp8"] = {"module": model.denoiser, "storage": "float8_e4m3fn",
                                    "compute": str(denoiser.dtype).removeprefix("torch.")}
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    if "model-offload" in chosen:
        pipeline.enable_model_cpu_offload(device=device)
        applied["model-offload"] = {}
    if "sequential-offload" in chosen:
        pipeline.enable_sequential_cpu_offload(device=device)
        applied["sequential-offload"] = {}
    for name, level in (("group-offload", "block_level"), ("group-offload-leaf", "leaf_level")):
        if name in chosen:
            kwargs = {"num_blocks_per_group": 1} if level == "block_level" else {}
            pipeline.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                          offload_type=level, use_stream=True, **kwargs)
            applied[name] = {"offload_type": level, "use_stream": True, **kwargs}
    return applied


def _processors(pipeline) -> dict:
    out = {}
    for name, component in pipeline.components.items():
        processors = getattr(component, "attn_processors", None)
        if isinstance(processors, dict):
            out.update({f"{name}.{k}": type(v).__name__ for k, v in processors.items()})
    return out
