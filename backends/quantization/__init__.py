"""Quantisation schemes as users ship them, shared by the backends that apply them (diffusers, torch_compile).

A package beside the backends, as backends/onnx/ is, rather than a harness/ module: it imports torchao, diffusers'
quantisation configs and bitsandbytes (lazily) and rewrites pipeline components, which is backend work; harness/
stays free of backend libraries, and the backends share it without importing each other.

SCHEMES is the table: one row per option name (`diffusers+int8wo`, `torch_compile+int8wo`, ...) with its library,
what it needs (compute capability, CPU, torch pairing, calibration), the diffusers config it is built from, the
components it quantises, and its parity tolerance with the tolerance's source. `support()` applies the table's
rules before any model loads; `quantize()` applies a scheme to a loaded pipeline.

torchao schemes go through diffusers' own `TorchAoConfig`: diffusers quantises at `from_pretrained` time by calling
`torchao.quantize_(linear, config.get_apply_tensor_subclass())` on each nn.Linear outside `modules_to_not_convert`
and the model's `_keep_in_fp32_modules` (diffusers/quantizers/torchao/torchao_quantizer.py, 0.42.1). diffbench loads
a model once for every backend, so `quantize()` does exactly that on the loaded denoiser; a user's load-time
equivalent is `DiffusionPipeline.from_pretrained(..., quantization_config=PipelineQuantizationConfig(
quant_mapping={"transformer": TorchAoConfig(...)}))`, named in each record. nf4 reloads the denoiser through
diffusers' `BitsAndBytesConfig`, the only way diffusers applies it.
"""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from backends.base import DESCRIBED, Support, Unsupported, timed, variant_options
from harness.judge.compare import ImageTolerance


@dataclass(frozen=True)
class Scheme:
    name: str                      # the backend option
    library: str                   # the distribution that does the work
    description: str
    config: Callable[[torch.dtype], Any]     # the diffusers quantisation config (lazy imports inside)
    config_text: str               # how a user writes it
    cpu: bool = False              # runs on a CPU
    min_capability: tuple[int, int] | None = None          # lowest CUDA compute capability
    capabilities: tuple[tuple[int, int], ...] = ()         # only these exact capabilities, if set
    capability_reason: str = ""    # the sentence a refusal says
    calibration: bool = False      # needs calibration data (static scales)
    tolerance: ImageTolerance = ImageTolerance(30.0, 0.95)
    denoiser_tolerance: dict = field(default_factory=dict)  # component override (compare.Tolerance fields)
    tolerance_source: str = ""


def _torchao(name: str, **kwargs) -> Callable[[torch.dtype], Any]:
    """A TorchAoConfig around torchao's `name` config class (looked up in torchao's public and prototype APIs)."""
    def build(dtype: torch.dtype):
        from diffusers import TorchAoConfig
        import torchao.quantization as quantization
        if hasattr(quantization, name):
            cls = getattr(quantization, name)
        else:
            from torchao.prototype import mx_formats
            cls = getattr(mx_formats, name)
        args = {k: (v() if callable(v) else v) for k, v in kwargs.items()}
        return TorchAoConfig(cls(**args))
    return build


def _per_row():
    from torchao.quantization import PerRow
    return PerRow()


def _nf4(dtype: torch.dtype):
    from diffusers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


_MEASURED_INT8 = ("measured here on tiny-sd 64x64, 4 steps, fp32 (docs/quantization.md): image PSNR {psnr} against the "
                  "unquantised reference; held {margin} below it, far above a blank, shifted or garbage image "
                  "(< 10 dB, docs/variants.md)")
_FORMAT_ONLY = ("not yet measured here (no {gpu} on these machines): the {fmt} bound, to be replaced by the error "
                "measured on a correct GPU run (docs/quantization.md)")

SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Scheme("int8wo", "torchao", "int8 weight-only (torchao Int8WeightOnlyConfig)",
           _torchao("Int8WeightOnlyConfig"), "TorchAoConfig(Int8WeightOnlyConfig())", cpu=True,
           tolerance=ImageTolerance(50.0, 0.999), denoiser_tolerance={"atol": 5e-3, "rtol": 5e-2, "statistic": "p99"},
           tolerance_source=_MEASURED_INT8.format(psnr="66.5 dB", margin="~16 dB")),
    Scheme("int8dq", "torchao",
           "int8 dynamic activations + int8 weights (torchao Int8DynamicActivationInt8WeightConfig)",
           _torchao("Int8DynamicActivationInt8WeightConfig"), "TorchAoConfig(Int8DynamicActivationInt8WeightConfig())",
           cpu=True, tolerance=ImageTolerance(45.0, 0.998),
           denoiser_tolerance={"atol": 1e-2, "rtol": 1e-1, "statistic": "p99"},
           tolerance_source=_MEASURED_INT8.format(psnr="58.1 dB", margin="~13 dB")),
    Scheme("fp8dq", "torchao", "float8 e4m3 dynamic activations + weights, per-row scales (torchao "
           "Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))",
           _torchao("Float8DynamicActivationFloat8WeightConfig", granularity=_per_row),
           "TorchAoConfig(Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))",
           min_capability=(8, 9), capability_reason="fp8dq needs compute capability 8.9+ (sm_89): float8 matmuls "
           "(torch._scaled_mm) run on Ada, Hopper and Blackwell GPUs",
           tolerance=ImageTolerance(30.0, 0.95), denoiser_tolerance={"atol": 0.25, "rtol": 0.25, "statistic": "p99"},
           tolerance_source=_FORMAT_ONLY.format(gpu="sm_89+ GPU", fmt="float8 e4m3 storage (layerwise-fp8's measured "
                                                "34.5 dB on tiny-sd, held to 30 dB)")),
    Scheme("nvfp4", "torchao", "NVFP4 dynamic activations + weights (torchao prototype "
           "NVFP4DynamicActivationNVFP4WeightConfig; e2m1 values, e4m3 scales per 16, a per-tensor scale)",
           _torchao("NVFP4DynamicActivationNVFP4WeightConfig"),
           "TorchAoConfig(NVFP4DynamicActivationNVFP4WeightConfig())",
           min_capability=(10, 0), capabilities=((10, 0), (10, 3), (12, 0)),
           capability_reason="nvfp4 needs a Blackwell GPU (sm_100): NVFP4 matmuls run on sm_100/sm_103 (sm_120 "
           "partially)",
           tolerance=ImageTolerance(20.0, 0.80), denoiser_tolerance={"atol": 1.0, "rtol": 1.0, "statistic": "p99"},
           tolerance_source=_FORMAT_ONLY.format(gpu="Blackwell GPU", fmt="4-bit e2m1 (1 mantissa bit, ~12 % relative "
                                                "rounding error per value)")),
    Scheme("mxfp8", "torchao",
           "MXFP8 dynamic activations + weights (torchao prototype MXDynamicActivationMXWeightConfig, "
           "e4m3 values, e8m0 scales per 32)",
           _torchao("MXDynamicActivationMXWeightConfig", activation_dtype=torch.float8_e4m3fn,
                    weight_dtype=torch.float8_e4m3fn),
           "TorchAoConfig(MXDynamicActivationMXWeightConfig(activation_dtype=torch.float8_e4m3fn, "
           "weight_dtype=torch.float8_e4m3fn))",
           min_capability=(10, 0), capabilities=((10, 0), (10, 3)),
           capability_reason="mxfp8 needs a datacenter Blackwell GPU (sm_100/sm_103): no MXFP8 kernels for sm_120",
           tolerance=ImageTolerance(30.0, 0.95), denoiser_tolerance={"atol": 0.25, "rtol": 0.25, "statistic": "p99"},
           tolerance_source=_FORMAT_ONLY.format(gpu="Blackwell GPU", fmt="float8 e4m3 (fp8dq's)")),
    Scheme("nf4", "bitsandbytes", "4-bit NormalFloat weights (bitsandbytes through diffusers' BitsAndBytesConfig)",
           _nf4, 'BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=...)',
           capability_reason="nf4 needs a CUDA GPU: diffusers 0.42's bitsandbytes quantizer "
           "refuses to quantise without one (\"No GPU found. A GPU is needed for quantization.\")",
           tolerance=ImageTolerance(20.0, 0.80), denoiser_tolerance={"atol": 1.0, "rtol": 1.0, "statistic": "p99"},
           tolerance_source=_FORMAT_ONLY.format(gpu="CUDA GPU", fmt="4-bit NormalFloat (16 levels per 64-weight "
                                                "block)")),
)}
OPTIONS = tuple(SCHEMES)

# The torch each torchao release's prebuilt C++/CUDA extensions were built for, from each wheel's torchao/__init__.py:
# 0.15 and 0.16 load them only on exactly the torch they were built against (ABI, pytorch/ao#2919), 0.17 and later
# on that torch or newer; otherwise torchao logs "Skipping import of cpp extensions" and its kernels are missing.
# diffusers 0.42's TorchAoConfig needs torchao 0.15+.
TORCHAO_TORCH = {(0, 15): ("==", (2, 9, 1)), (0, 16): ("==", (2, 10, 0)), (0, 17): (">=", (2, 11, 0)),
                 (0, 18): (">=", (2, 11, 0))}
DIFFUSERS_MIN_TORCHAO = (0, 15)


def scheme_of(variant: str) -> Scheme | None:
    """The quantisation scheme a variant names (at most one: they are exclusive), or None."""
    chosen = [SCHEMES[n] for n in OPTIONS if n in variant_options(variant)]
    return chosen[0] if chosen else None


def _version(dist: str) -> tuple[int, ...] | None:
    """The installed distribution's version as numbers, or None."""
    try:
        return _parse(importlib.metadata.version(dist))
    except importlib.metadata.PackageNotFoundError:
        return None


def _parse(text: str) -> tuple[int, ...]:
    """Version text to numbers: 2.13.0+cpu -> (2, 13, 0)."""
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def pairing_problem(torchao: tuple[int, ...] | None, torch_version: tuple[int, ...] | None) -> str | None:
    """Why this torchao cannot serve this torch, or None."""
    if torchao is None:
        return "torchao not installed (pip install 'diffbench[quant]')"
    if torchao[:2] < DIFFUSERS_MIN_TORCHAO:
        return (f"torchao {'.'.join(map(str, torchao))} is older than diffusers' TorchAoConfig needs "
                f"({'.'.join(map(str, DIFFUSERS_MIN_TORCHAO))}+)")
    pairing = TORCHAO_TORCH.get(torchao[:2])
    if pairing and torch_version:
        op, built = pairing
        ok = torch_version[:3] == built if op == "==" else torch_version[:3] >= built
        if not ok:
            return (f"torchao {'.'.join(map(str, torchao))} pairs with torch {'' if op == '==' else '>='}"
                    f"{'.'.join(map(str, built))} (its prebuilt extensions), this is torch "
                    f"{'.'.join(map(str, torch_version))}")
    return None


def capability_problem(scheme: Scheme, device: str, capability: tuple[int, int] | None) -> str | None:
    """Why this device cannot run the scheme, or None: the scheme's own sentence naming what it needs."""
    if device != "cuda" or capability is None:
        if scheme.cpu:
            return None
        return f"{scheme.capability_reason}; this run is on {'a CPU' if device == 'cpu' else device}"
    if scheme.min_capability and capability < scheme.min_capability:
        return f"{scheme.capability_reason}; this GPU is sm_{capability[0]}{capability[1]}"
    if scheme.capabilities and not any(capability[0] == major and capability[1] == minor
                                       for major, minor in scheme.capabilities):
        return f"{scheme.capability_reason}; this GPU is sm_{capability[0]}{capability[1]}"
    return None


def support(variant: str, case, env: dict) -> Support:
    """Can this case's scheme run here? Decided from the table and installed versions, before the model loads."""
    scheme = scheme_of(variant)
    if scheme is None:
        return Support.yes()
    if case.workload != "text-to-image":
        return Support.no(f"{scheme.name} quantises a diffusion denoiser; {case.workload} cases are not covered")
    from harness.judge import preflight
    device = env.get("device", "cpu") if isinstance(env, dict) else "cpu"
    problem = capability_problem(scheme, device, preflight.Stack.from_env(env).capability)
    if problem:
        return Support.no(problem)
    if scheme.calibration:
        return Support.no(f"{scheme.name} needs calibration data (static scales): diffbench ships none yet")
    # a described stack (diffbench backends --stack) names its own versions; a live run's env names the installed ones
    # (a described stack that names no torchao has none: this machine's must not stand in for it)
    versions = (env.get("versions") or {}) if isinstance(env, dict) else {}
    described = isinstance(env, dict) and bool(env.get(DESCRIBED))
    stack_torch = preflight.Stack.from_env(env).torch
    if scheme.library == "torchao":
        torchao = (_parse(versions["torchao"]) if versions.get("torchao")
                   else None if described else _version("torchao"))
        problem = pairing_problem(torchao, _parse(stack_torch) if stack_torch else _version("torch"))
    elif not (versions.get(scheme.library) or (not described and _version(scheme.library))):
        problem = f"{scheme.library} not installed (pip install {scheme.library})"
    if problem:
        return Support.no(problem)
    return Support.yes()


def tolerance(scheme: Scheme) -> tuple[ImageTolerance, dict]:
    """(image tolerance, component overrides) for a quantised case: only the denoiser changes."""
    image = ImageTolerance(scheme.tolerance.min_psnr_db, scheme.tolerance.min_ssim, scheme.tolerance_source)
    return image, {"denoiser": {**scheme.denoiser_tolerance, "source": scheme.tolerance_source}}


def quantize(model, scheme: Scheme, case, build: dict[str, float]) -> dict:
    """Quantise the model's denoiser in place with `scheme` (time added to build["quantize"]); the facts the record
    names: which components, how, with which library versions, and the user's load-time equivalent."""
    denoiser_name = model.denoiser
    denoiser = getattr(model.pipeline, denoiser_name)
    dtype = getattr(denoiser, "dtype", None) or next(denoiser.parameters()).dtype
    config = scheme.config(dtype)
    with timed(build, "quantize"):
        if scheme.library == "torchao":
            layers = _quantize_torchao(denoiser, config)
        else:
            layers = _reload_bitsandbytes(model, config)
    return {"scheme": scheme.name, "library": f"{scheme.library} {importlib.metadata.version(scheme.library)}",
            "config": scheme.config_text, "components": {denoiser_name: {"linear_layers": layers}},
            "not_quantized": [c for c in model.components if c != denoiser_name],
            "load_time_equivalent": (f"PipelineQuantizationConfig(quant_mapping={{{denoiser_name!r}: "
                                     f"{scheme.config_text}}})"),
            "tolerance_source": scheme.tolerance_source}


def _quantize_torchao(module: torch.nn.Module, config) -> int:
    """What diffusers' TorchAoHfQuantizer does per weight at load time, on an already loaded module: each nn.Linear
    outside modules_to_not_convert and _keep_in_fp32_modules through torchao.quantize_. Returns how many."""
    from torchao.quantization import quantize_
    skip = [*(config.modules_to_not_convert or []), *(getattr(module, "_keep_in_fp32_modules", None) or [])]
    chosen = []

    def wanted(child: torch.nn.Module, fqn: str) -> bool:
        take = isinstance(child, torch.nn.Linear) and not any(fqn == k or fqn.startswith(k + ".") or
                                                             f".{k}." in f".{fqn}." for k in skip)
        if take:
            chosen.append(fqn)
        return take
    quantize_(module, config.get_apply_tensor_subclass(), filter_fn=wanted)
    if not chosen:
        raise Unsupported("the denoiser has no nn.Linear layers to quantise")
    return len(chosen)


def _reload_bitsandbytes(model, config) -> int:
    """diffusers applies bitsandbytes only while loading: reload the denoiser from the model's folder with it."""
    from pathlib import Path
    folder = Path(model.source)
    if not (folder / model.denoiser).is_dir():
        raise Unsupported(f"nf4: diffusers quantises with bitsandbytes while loading a checkpoint; {model.name} "
                          "has no checkpoint folder (random full-size weights)")
    old = getattr(model.pipeline, model.denoiser)
    new = type(old).from_pretrained(str(folder), subfolder=model.denoiser, quantization_config=config, dtype=old.dtype,
                                    local_files_only=True, use_safetensors=True)   # diffusers puts it on the GPU
    setattr(model.pipeline, model.denoiser, new)
    import bitsandbytes as bnb
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in new.modules())
