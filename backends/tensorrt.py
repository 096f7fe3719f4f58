"""TensorRT backend: engines built from the same ONNX exports as onnxruntime (harness.onnx_export).

One optimisation profile per component, min/opt/max derived from the case matrix (batch, latent height/width,
image sequence); the "static" variant builds for exactly the case's shapes. Precision follows the case dtype
(fp16/bf16; fp32 = TF32); fp8 (sm_89+) and fp4 (Blackwell) are variants gated by arch and TensorRT version. Engines
are cached under `<cache>/tensorrt/` keyed by TensorRT version + compute capability + ONNX key + profile +
precision, with a shared timing cache. Engines run on torch CUDA tensors on torch's current stream
(set_tensor_address + execute_async_v3), no host round trips.

`tensorrt` is imported lazily: where it is missing (CPU machines, CI) support() says so. Everything that needs no
TensorRT (profiles, keys, precision/arch rules, ONNX preparation) is plain functions with unit tests.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable

import torch

from backends.base import Backend, Prepared, Support, timed

VARIANTS = ("", "static", "fp8", "fp4")
# (min, opt, max) image side in pixels when no matrix is configured, per model kind (demoDiffusion-like ranges)
DEFAULT_SIDES = {"tiny": (64, 64, 128), "sd": (256, 512, 1024), "sdxl": (512, 1024, 1536),
                 "sd3": (512, 1024, 1536), "flux": (512, 1024, 1536)}
DEFAULT_BATCH = (1, 1, 4)
VAE_FACTOR = 8


class EngineBuildError(RuntimeError):
    """TensorRT could not parse or build; the message carries the parser/builder log."""


# ---------------------------------------------------------------------------------------------------------------
# precision / arch rules

def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for p in version.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def precision_for(case) -> str:
    return case.variant if case.variant in ("fp8", "fp4") else case.dtype


def precision_support(precision: str, capability: tuple[int, int], trt_version: str) -> Support:
    """Can this GPU (compute capability) and TensorRT version build `precision` engines?"""
    sm = capability[0] * 10 + capability[1]
    version = _version_tuple(trt_version)
    name = f"sm_{sm}"
    if sm < 70:
        return Support.no(f"TensorRT 10 needs compute capability 7.0+, this GPU is {name}")
    if precision in ("fp32", "fp16"):
        return Support.yes()
    if precision == "bf16":
        if sm < 80:
            return Support.no(f"bf16 engines need Ampere (sm_80) or newer, this GPU is {name}")
        if version < (9, 0):
            return Support.no(f"bf16 needs TensorRT 9+, this is {trt_version}")
        return Support.yes()
    if precision == "fp8":
        if sm < 89:
            return Support.no(f"fp8 needs Ada/Hopper or newer (sm_89+), this GPU is {name}")
        if version < (10, 0):
            return Support.no(f"fp8 needs TensorRT 10+, this is {trt_version}")
        return Support.yes()
    if precision == "fp4":
        if sm not in (100, 103, 120, 121):
            return Support.no(f"fp4 needs Blackwell (sm_100/sm_103/sm_120), this GPU is {name}")
        if version < (10, 8):
            return Support.no(f"fp4 needs TensorRT 10.8+, this is {trt_version}")
        return Support.yes()
    return Support.no(f"unknown precision {precision!r}")


def quantization_support(precision: str) -> Support:
    """fp8/fp4 engines need an ONNX with Q/DQ nodes (NVIDIA ModelOpt calibration); the shared exports have none."""
    if precision in ("fp8", "fp4"):
        return Support.no(f"{precision} needs a Q/DQ-quantized ONNX (NVIDIA ModelOpt); this harness exports "
                          "unquantized graphs")
    return Support.yes()


# ---------------------------------------------------------------------------------------------------------------
# profiles

def denoiser_batch(kind: str, batch: int) -> int:
    """Classifier-free guidance doubles the denoiser batch; FLUX.1-dev is guidance-distilled (no doubling)."""
    return batch if kind == "flux" else 2 * batch


def _range(values: Iterable[int]) -> tuple[int, int, int]:
    values = list(values)
    common = Counter(values).most_common(1)[0][0]          # opt: the shape the matrix runs most
    return min(values), common, max(values)


def axis_ranges(cases: list, kind: str, role: str, static: bool = False) -> dict[str, tuple]:
    """(min, opt, max) per named dynamic axis of one component over the cases (the matrix).

    Sequence axes are not here: their size is fixed by the tokenizer and read from the export's example inputs.
    """
    if not cases:
        raise ValueError("no cases to derive a profile from")
    batches = [denoiser_batch(kind, c.batch) if role == "denoiser" else c.batch for c in cases]
    heights = [c.height // VAE_FACTOR for c in cases]
    widths = [c.width // VAE_FACTOR for c in cases]
    images = [(h // 2) * (w // 2) for h, w in zip(heights, widths)]     # flux packs 2x2 latent patches
    ranges = {"batch": _range(batches), "latent_height": _range(heights), "latent_width": _range(widths),
              "image_sequence": _range(images)}
    if static:
        ranges = {k: (v[1], v[1], v[1]) for k, v in ranges.items()}
    return ranges


def default_cases(case, kind: str):
    """Cases spanning the default profile for a model kind (used when no matrix was configured)."""
    sides = DEFAULT_SIDES["tiny" if case.model.startswith("tiny") else kind]
    out = []
    for batch, side in zip(DEFAULT_BATCH, sides):
        out.append(type(case)(case.model, case.backend, case.variant, case.dtype, batch, side, side, case.steps))
    return out


def input_profile(shapes: dict[str, list], ranges: dict[str, tuple], example: dict[str, list[int]]) -> dict:
    """Per input: (min, opt, max) shapes. A named dim takes its axis range; a named dim without a range (text
    sequence) takes the export's example size; fixed dims stay."""
    profile = {}
    for name, dims in shapes.items():
        lo, opt, hi = [], [], []
        for i, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                r = (d, d, d)
            elif isinstance(d, str) and d in ranges:
                r = ranges[d]
            else:
                size = example[name][i]
                r = (size, size, size)
            lo.append(r[0])
            opt.append(r[1])
            hi.append(r[2])
        profile[name] = (tuple(lo), tuple(opt), tuple(hi))
    return profile


def outside_profile(profile: dict, shapes: dict[str, tuple]) -> str | None:
    """Why these input shapes do not fit the profile, or None."""
    for name, shape in shapes.items():
        if name not in profile:
            continue
        lo, _, hi = profile[name]
        for i, (a, s, b) in enumerate(zip(lo, shape, hi)):
            if not a <= s <= b:
                return f"{name} dim {i} = {s} outside the engine profile [{a}, {b}]"
    return None


def case_shapes(case, kind: str, role: str, shapes: dict[str, list], example: dict[str, list[int]]) -> dict:
    """The concrete input shapes a case will feed (for the profile check before running)."""
    ranges = axis_ranges([case], kind, role, static=True)
    return {n: p[1] for n, p in input_profile(shapes, ranges, example).items()}


# ---------------------------------------------------------------------------------------------------------------
# cache keys and ONNX preparation

def engine_key(trt_version: str, capability: tuple[int, int], onnx_key: str, profile: dict, precision: str,
               static: bool) -> str:
    data = {"trt": trt_version, "sm": f"{capability[0]}{capability[1]}", "onnx": onnx_key, "precision": precision,
            "static": static, "profile": {k: [list(s) for s in v] for k, v in sorted(profile.items())}}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def io_shapes(onnx_path: Path) -> dict[str, list]:
    """Graph input dims (ints or axis names) without loading the weights."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {i.name for i in proto.graph.initializer}
    shapes = {}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        shapes[value.name] = [d.dim_param if d.dim_param else d.dim_value
                              for d in value.type.tensor_type.shape.dim]
    return shapes


def fix_input_dims(onnx_path: Path, shapes: dict[str, tuple], out_dir: Path) -> Path:
    """A copy of the graph with fixed input dims (static engines: TensorRT folds all shape arithmetic). The
    weights file is referenced by a relative location, so the copy is written beside it (symlinked data)."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    for value in proto.graph.input:
        if value.name in shapes:
            for dim, size in zip(value.type.tensor_type.shape.dim, shapes[value.name]):
                dim.ClearField("dim_param")
                dim.dim_value = int(size)
    out_dir.mkdir(parents=True, exist_ok=True)
    for data in onnx_path.parent.glob("*.data"):
        link = out_dir / data.name
        if not link.exists():
            os.symlink(data.resolve(), link)
    target = out_dir / onnx_path.name
    onnx.save_model(proto, str(target))
    return target


# ---------------------------------------------------------------------------------------------------------------
# TensorRT (real API; needs the tensorrt package and a CUDA GPU)

def _logger():
    import tensorrt as trt

    class CapturingLogger(trt.ILogger):
        """Keeps warnings and errors so a failed build can say why."""
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.WARNING:
                self.messages.append(f"{severity.name}: {msg}")
    return CapturingLogger()


def build_engine(onnx_path: Path, profile: dict, precision: str, timing_cache: Path) -> bytes:
    import tensorrt as trt

    logger = _logger()
    builder = trt.Builder(logger)
    flags = 0 if _version_tuple(trt.__version__) >= (10, 0) else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"ONNX parse failed for {onnx_path.parent.name}: {errors}")
    config = builder.create_builder_config()
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    elif precision == "fp8":
        config.set_flag(trt.BuilderFlag.FP8)
    elif precision == "fp4":
        config.set_flag(trt.BuilderFlag.FP4)
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        log = " | ".join(logger.messages[-8:]) or "no log"
        raise EngineBuildError(f"TensorRT engine build failed for {onnx_path.parent.name} ({precision}): {log}")
    _atomic_write(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


_TRT_TO_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
                 "INT32": torch.int32, "BOOL": torch.bool, "INT8": torch.int8}


class TrtRunner:
    """One engine + execution context; {name: CUDA tensor} -> [output tensors], on torch's current stream."""

    def __init__(self, engine_bytes: bytes, device: str):
        import tensorrt as trt

        self.logger = _logger()
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise EngineBuildError("TensorRT could not deserialize the cached engine: " + " | ".join(self.logger.messages[-4:]))
        self.context = self.engine.create_execution_context()
        self.device = torch.device(device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self.dtypes = {n: _TRT_TO_TORCH[self.engine.get_tensor_dtype(n).name] for n in names}

    def __call__(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        # every tensor is allocated on torch's current stream, which also runs the engine: the caching
        # allocator's stream ordering keeps inputs valid until the engine has read them
        for name in self.inputs:
            t = feeds[name].to(device=self.device, dtype=self.dtypes[name]).contiguous()
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outputs = []
        for name in self.outputs:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed: " + " | ".join(self.logger.messages[-4:]))
        return outputs


def _trt_version() -> str | None:
    try:
        import tensorrt as trt
        return trt.__version__
    except Exception:
        return None


class TensorRTBackend(Backend):
    name = "tensorrt"
    variants = VARIANTS
    extra = "tensorrt"
    description = "TensorRT engines from the ONNX exports: profiles from the case matrix, cached per TRT x GPU"

    def __init__(self):
        self.matrix: list | None = None

    def configure(self, cases: list) -> None:
        """Give the run's case matrix: engine profiles then span every case of a model (built once)."""
        self.matrix = list(cases)

    def available(self) -> Support:
        missing = []
        if _trt_version() is None:
            missing.append("tensorrt not installed (pip install tensorrt on a GPU machine)")
        if not torch.cuda.is_available():
            missing.append("no CUDA GPU visible to torch")
        return Support.no("; ".join(missing)) if missing else Support.yes()

    def support(self, case, env) -> Support:
        if case.variant not in self.variants:
            return super().support(case, env)
        device = env.get("device", "cpu") if isinstance(env, dict) else "cpu"
        base = self.available()
        if not base:
            return base
        if device != "cuda":
            return Support.no(f"TensorRT needs a CUDA GPU (this run is on {device})")
        capability = torch.cuda.get_device_capability()
        precision = precision_for(case)
        for check in (precision_support(precision, capability, _trt_version()), quantization_support(precision)):
            if not check:
                return check
        if case.variant != "static":
            # the engine profile must contain this case (checked again per input in prepare)
            lo_hi = axis_ranges(self._cases_for(case), "", "vae")
            side = lo_hi["latent_height"], lo_hi["latent_width"], lo_hi["batch"]
            h, w = case.height // VAE_FACTOR, case.width // VAE_FACTOR
            for (lo, _, hi), value, what in zip(side, (h, w, case.batch), ("latent height", "latent width", "batch")):
                if not lo <= value <= hi:
                    where = "the matrix" if self.matrix else "the default profile (configure() widens it)"
                    return Support.no(f"{what} {value} outside the engine profile [{lo}, {hi}] of {where}")
        return Support.yes()

    def _cases_for(self, case) -> list:
        if self.matrix:
            same = [c for c in self.matrix if c.model == case.model and c.backend == case.backend
                    and c.variant == case.variant and c.dtype == case.dtype]
            if same:
                return same
        from harness.models import spec
        return default_cases(case, spec(case.model).kind)

    def prepare(self, model, case, cache) -> Prepared:
        from harness.onnx_export import export_model, make_executor

        cache = Path(cache)
        build: dict[str, float] = {}
        with timed(build, "export"):
            exports = export_model(model, case, cache, "legacy")
        capability = torch.cuda.get_device_capability()
        version = _trt_version()
        precision = precision_for(case)
        static = case.variant == "static"
        cases = [case] if static else self._cases_for(case)
        pipeline = model.pipeline
        executors, engines, reused = {}, {}, {}
        for name, export in exports.components.items():
            shapes = io_shapes(export.path)
            ranges = axis_ranges(cases, model.kind, export.role, static=static)
            profile = input_profile(shapes, ranges, export.example_shapes)
            needed = case_shapes(case, model.kind, export.role, shapes, export.example_shapes)
            problem = outside_profile(profile, needed)
            if problem:
                raise EngineBuildError(f"{name}: case outside its engine profile: {problem}")
            key = engine_key(version, capability, export.key, profile, precision, static)
            path = cache / "tensorrt" / f"{name}-{precision}-{key[:16]}.engine"
            reused[name] = path.is_file()
            if not path.is_file():
                source = fix_input_dims(export.path, needed, cache / "tensorrt" / f"static-{key[:16]}") \
                    if static else export.path
                with timed(build, "engine"):
                    engine = build_engine(source, profile, precision, cache / "tensorrt" / "timing.cache")
                _atomic_write(path, engine)
            with timed(build, "engine_load"):
                runner = TrtRunner(path.read_bytes(), model.device)
            executor = make_executor(export, getattr(pipeline, name), runner)
            setattr(pipeline, name, executor)
            executors[name] = executor
            engines[name] = {"engine": path.name, "profile": {k: [list(s) for s in v] for k, v in profile.items()}}
        info = {"tensorrt": version, "precision": precision, "static": static, "engines": engines,
                "engine_reused": reused, "compute_capability": f"{capability[0]}.{capability[1]}",
                "exporter": exports.exporter, "opset": exports.opset}
        if exports.notes:
            info["notes"] = list(exports.notes)
        return Prepared(pipeline, executors, build, info)
