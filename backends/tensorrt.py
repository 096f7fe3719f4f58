"""TensorRT backend: engines built from the same ONNX exports as onnxruntime (backends/onnx).

One optimisation profile per component, min/opt/max derived from the case matrix (batch, latent height/width,
image sequence) and, for text encoders, the token length the pipeline really sends (SD3's T5: 256, Flux's: 512);
the "static" option builds for exactly the case's shapes. Networks are strongly typed (the precision is the ONNX
graph's own, as exported from the case's dtype: TensorRT 11 knows no other mode); TF32 is cleared unless the case
says +tf32 (fp32 means fp32). fp8 (sm_89+) and fp4 (Blackwell) are options gated by arch and TensorRT version.

Engines are cached under `<cache>/tensorrt/` keyed by TensorRT version + compute capability + ONNX key + profile +
precision + builder flags, with one timing cache per TensorRT version and GPU (a refused or unreadable cache falls
back to a fresh one; the engine is written before its cache is saved). An engine is built by its own process
(`python -m backends.tensorrt build JOB`) with its own build timeout (DIFFBENCH_TRT_BUILD_TIMEOUT, default 3600 s), apart from
the case timeout: a case that times out while waiting leaves the build running to completion (or to its own limit),
and the engine is in the cache for the next run. A builder crash is an EngineBuildError with the build log, never a
crash of the harness.

Engines run on a dedicated CUDA stream (TensorRT warns that the legacy default stream costs extra synchronisation),
ordered after torch's current stream and torch's stream after it (stream waits, no host synchronisation); inputs
are kept from reuse by the caching allocator until the engine's stream has read them (record_stream); outputs are
bound and returned by tensor name; a rejected input shape is an error naming the profile.

`tensorrt` is imported lazily: where it is missing (CPU machines, CI) support() says so. Everything that needs no
TensorRT (profiles, sequence lengths, flags, keys, build orchestration, name-based binding) is unit-tested.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch

from backends.base import Backend, Prepared, Support, timed, variant_options

OPTIONS = ("static", "fp8", "fp4", "tf32")
# (min, opt, max) image side in pixels when no matrix is configured, per model kind (demoDiffusion-like ranges)
DEFAULT_SIDES = {"tiny": (64, 64, 128), "sd": (256, 512, 1024), "sdxl": (512, 1024, 1536),
                 "sd3": (512, 1024, 1536), "flux": (512, 1024, 1536)}
DEFAULT_BATCH = (1, 1, 4)
VAE_FACTOR = 8
BUILD_TIMEOUT_ENV = "DIFFBENCH_TRT_BUILD_TIMEOUT"
DEFAULT_BUILD_TIMEOUT_S = 3600.0
T5_MODEL_TYPES = ("t5", "umt5")


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
    quantized = variant_options(case.variant) & {"fp8", "fp4"}
    return next(iter(quantized)) if quantized else case.dtype


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

    Sequence axes are not here: a text encoder's token length is what the pipeline sends (sent_sequence_length),
    the denoiser's text sequence is read from the export's example inputs (captured from the pipeline's call).
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


def sent_sequence_length(model_type: str, tokenizer_max_length: int, pipeline_cls: type, call_kwargs: dict) -> int:
    """The token length a pipeline feeds a text encoder. CLIP encoders get their tokenizer's model_max_length (77).
    T5 encoders get the call's max_sequence_length, whose default is the pipeline's own (SD3: 256, Flux: 512),
    not the tokenizer's model_max_length (512 in SD3.5's tokenizer_3 config)."""
    if model_type not in T5_MODEL_TYPES:
        return int(tokenizer_max_length)
    if call_kwargs.get("max_sequence_length") is not None:
        return int(call_kwargs["max_sequence_length"])
    parameter = inspect.signature(pipeline_cls.__call__).parameters.get("max_sequence_length")
    if parameter is None or parameter.default in (None, inspect.Parameter.empty):
        return int(tokenizer_max_length)
    return int(parameter.default)


def text_sequence_lengths(model, case) -> dict[str, int]:
    """Per text encoder of a loaded model: the token length this case's pipeline call sends it."""
    from harness.models import pipeline_inputs

    kwargs = pipeline_inputs(model, case)
    tokenizers = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}
    lengths = {}
    for name in model.text_encoders:
        encoder = getattr(model.pipeline, name)
        tokenizer = getattr(model.pipeline, tokenizers.get(name, "tokenizer"), None)
        lengths[name] = sent_sequence_length(str(getattr(encoder.config, "model_type", "")),
                                             int(getattr(tokenizer, "model_max_length", 77) or 77),
                                             type(model.pipeline), kwargs)
    return lengths


def default_cases(case, kind: str):
    """Cases spanning the default profile for a model kind (used when no matrix was configured)."""
    sides = DEFAULT_SIDES["tiny" if case.model.startswith("tiny") else kind]
    out = []
    for batch, side in zip(DEFAULT_BATCH, sides):
        out.append(type(case)(case.model, case.backend, case.variant, case.dtype, batch, side, side, case.steps))
    return out


def input_profile(shapes: dict[str, list], ranges: dict[str, tuple], example: dict[str, list[int]]) -> dict:
    """Per input: (min, opt, max) shapes. A named dim takes its axis range; a named dim without a range (the
    denoiser's text sequence) takes the export's example size; fixed dims stay."""
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


def case_shapes(case, kind: str, role: str, shapes: dict[str, list], example: dict[str, list[int]],
                fixed: dict[str, tuple] | None = None) -> dict:
    """The concrete input shapes a case will feed (for the profile check before running). `fixed` adds axis
    ranges that do not come from the case (a text encoder's sequence)."""
    ranges = {**axis_ranges([case], kind, role, static=True), **(fixed or {})}
    return {n: p[1] for n, p in input_profile(shapes, ranges, example).items()}


# ---------------------------------------------------------------------------------------------------------------
# builder flags, cache keys and ONNX preparation

def build_settings(precision: str, tf32: bool, trt_version: str) -> dict:
    """What the builder is told, by flag name. TensorRT 10+: a strongly typed network, so every tensor keeps the
    type the ONNX graph gives it -- the fp16/bf16 export of the case's model, with the fp32 islands (norms,
    softmax upcasts) the model itself asked for -- instead of the builder picking per-layer precisions from
    FP16/BF16 hints (weak typing: deprecated since 10.12, gone in 11, where strong typing is always on). Older
    TensorRT: explicit batch and the precision flag. TF32 is on by default in TensorRT's builder: cleared unless
    the case opts in."""
    strongly_typed = _version_tuple(trt_version) >= (10, 0)
    network = ["STRONGLY_TYPED"] if strongly_typed else ["EXPLICIT_BATCH"]
    builder = [] if strongly_typed or precision == "fp32" else [precision.upper()]
    return {"network_flags": network, "set_flags": builder + (["TF32"] if tf32 else []),
            "clear_flags": [] if tf32 else ["TF32"]}


def engine_key(trt_version: str, capability: tuple[int, int], onnx_key: str, profile: dict, precision: str,
               static: bool, settings: dict | None = None) -> str:
    data = {"trt": trt_version, "sm": f"{capability[0]}{capability[1]}", "onnx": onnx_key, "precision": precision,
            "static": static, "profile": {k: [list(s) for s in v] for k, v in sorted(profile.items())},
            "settings": settings or {}}
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
# engine builds: one process per build, with its own timeout, cached even when the case that asked times out

def build_timeout_s() -> float:
    value = os.environ.get(BUILD_TIMEOUT_ENV)
    try:
        return float(value) if value else DEFAULT_BUILD_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{BUILD_TIMEOUT_ENV}={value!r} is not a number of seconds") from None


@dataclass
class BuildJob:
    """Everything a builder process needs, written as JSON beside the engine it will produce."""
    onnx: str
    engine: str
    profile: dict
    precision: str
    settings: dict
    timing_cache: str
    timeout_s: float
    device: int = 0                        # CUDA device index: the engine is built for that GPU's arch

    @property
    def engine_path(self) -> Path:
        return Path(self.engine)

    @property
    def job_path(self) -> Path:
        return Path(self.engine + ".job.json")

    @property
    def lock_path(self) -> Path:          # the pid of the builder at work
        return Path(self.engine + ".building")

    @property
    def log_path(self) -> Path:
        return Path(self.engine + ".build.log")

    def write(self) -> Path:
        _atomic_write(self.job_path, json.dumps(asdict(self), indent=1).encode())
        return self.job_path

    @classmethod
    def read(cls, path: str | Path) -> "BuildJob":
        data = json.loads(Path(path).read_text())
        data["profile"] = {k: tuple(tuple(s) for s in v) for k, v in data["profile"].items()}
        return cls(**data)


def builder_command(job_path: Path) -> list[str]:
    return [sys.executable, "-m", "backends.tensorrt", "build", str(job_path)]


def live_builder(job: BuildJob) -> int | None:
    """The pid of a builder process still at work on this job's engine (an earlier case may have left one), or
    None when there is none or the lock is stale (its process is gone, or the pid now belongs to another one)."""
    import psutil

    try:
        pid = int(job.lock_path.read_text().strip())
        process = psutil.Process(pid)
        if process.status() != psutil.STATUS_ZOMBIE and str(job.job_path) in process.cmdline():
            return pid
    except (OSError, ValueError, psutil.Error):
        pass
    return None


def build_plan(job: BuildJob) -> str:
    """reuse: the engine is cached; join: a builder is already at work on it; build: start one."""
    if job.engine_path.is_file():
        return "reuse"
    return "join" if live_builder(job) is not None else "build"


def launch_build(job: BuildJob, command: list[str] | None = None) -> subprocess.Popen:
    """Start the builder in its own session: the terminal's Ctrl-C and the case's process group do not reach it,
    the harness decides when it stops (its own timeout, or a user interrupt of the run)."""
    job.write()
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    with open(job.log_path, "wb") as log:
        process = subprocess.Popen(command or builder_command(job.job_path), cwd=root, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    _atomic_write(job.lock_path, str(process.pid).encode())
    return process


def _last_line(path: Path) -> str:
    """The builder's verdict: its log's last line (the traceback, if any, is above it in the log)."""
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no build log"
    return lines[-1] if lines else "empty build log (the builder was killed?)"


def ensure_engine(job: BuildJob, command: list[str] | None = None, poll_s: float = 0.2) -> str:
    """The engine of `job` in the cache: reused, built by a new builder process, or by one already at work.
    Returns the plan taken. While waiting, an Exception (the case's timeout) leaves the builder running -- the
    engine lands in the cache for the next run -- and says so in its message; an interrupt of the run (a
    BaseException such as KeyboardInterrupt) stops a builder this call started."""
    plan = build_plan(job)
    if plan == "reuse":
        return plan
    process = launch_build(job, command) if plan == "build" else None
    pid = process.pid if process is not None else live_builder(job)
    if pid is None:                    # the builder we meant to join has just ended: look again
        return ensure_engine(job, command, poll_s)
    try:
        while not job.engine_path.is_file():
            running = process.poll() is None if process is not None else live_builder(job) == pid
            if not running:
                if job.engine_path.is_file():
                    break
                raise EngineBuildError(f"TensorRT engine build failed for {Path(job.onnx).parent.name} "
                                       f"({job.precision}): {_last_line(job.log_path)} (log: {job.log_path})")
            time.sleep(poll_s)
    except EngineBuildError:
        raise
    except Exception as exc:
        note = (f"; the TensorRT engine build (pid {pid}, own limit {job.timeout_s:g} s) goes on and will be "
                f"cached as {job.engine_path.name}")
        exc.args = (f"{exc.args[0] if exc.args else type(exc).__name__}{note}", *exc.args[1:])
        raise
    except BaseException:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        raise
    return plan


def build_main(job_path: str) -> int:
    """The builder process: build one engine and write it into the cache atomically. Its own timeout cancels the
    build through TensorRT's progress monitor; an alarm a minute later ends the process if TensorRT does not
    return (SIGALRM's default action, no Python handler)."""
    job = BuildJob.read(job_path)
    signal.alarm(int(job.timeout_s) + 60)
    try:
        if torch.cuda.is_available():
            torch.cuda.set_device(job.device)    # TensorRT builds on the calling thread's current device
        engine, config = build_engine(Path(job.onnx), job.profile, job.precision, Path(job.timing_cache),
                                      job.settings, job.timeout_s)
        _atomic_write(job.engine_path, engine)          # first the engine: its cache must never cost it
        print(f"timing cache {Path(job.timing_cache).name}: {save_timing_cache(config, Path(job.timing_cache))}",
              flush=True)
    except Exception as exc:
        traceback.print_exc()
        print(f"{type(exc).__name__}: {exc}".replace("\n", " | "), flush=True)
        return 1
    finally:
        job.lock_path.unlink(missing_ok=True)
    return 0


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


def _deadline_monitor(timeout_s: float):
    """A TensorRT progress monitor that cancels the build once `timeout_s` have passed (TensorRT 10+)."""
    import tensorrt as trt

    class DeadlineMonitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.deadline = time.monotonic() + timeout_s
            self.cancelled = False

        def phase_start(self, phase_name, parent_phase, num_steps):
            pass

        def phase_finish(self, phase_name):
            pass

        def step_complete(self, phase_name, step):
            self.cancelled = time.monotonic() > self.deadline
            return not self.cancelled
    return DeadlineMonitor()


def build_engine(onnx_path: Path, profile: dict, precision: str, timing_cache: Path, settings: dict,
                 timeout_s: float = DEFAULT_BUILD_TIMEOUT_S) -> tuple[bytes, object]:
    """The serialized engine and the builder config, whose timing cache the caller saves once the engine is
    written (save_timing_cache)."""
    import tensorrt as trt

    logger = _logger()
    builder = trt.Builder(logger)
    flags = 0
    for name in settings["network_flags"]:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"ONNX parse failed for {onnx_path.parent.name}: {errors}")
    config = builder.create_builder_config()
    for name in settings["set_flags"]:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in settings["clear_flags"]:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    monitor = _deadline_monitor(timeout_s) if hasattr(trt, "IProgressMonitor") else None
    if monitor is not None:
        config.progress_monitor = monitor
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    cache, cache_note = attach_timing_cache(config, timing_cache)   # held: it must outlive the build
    print(f"timing cache {timing_cache.name}: {cache_note}", flush=True)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        if monitor is not None and monitor.cancelled:
            raise EngineBuildError(f"TensorRT engine build for {onnx_path.parent.name} ({precision}) cancelled: "
                                   f"it exceeded its {timeout_s:g} s build timeout ({BUILD_TIMEOUT_ENV})")
        log = " | ".join(logger.messages[-8:]) or "no log"
        raise EngineBuildError(f"TensorRT engine build failed for {onnx_path.parent.name} ({precision}): {log}")
    return bytes(serialized), config


# The timing cache only speeds builds up: every path here fails open (a slower build), never loses an engine.
# TensorRT's Python API (python/docstrings/infer/pyCoreDoc.h, IBuilderConfigDoc; the IBuilderConfig page of the
# Python API reference): create_timing_cache(b"") creates a new cache; set_timing_cache "returns a bool indicating
# whether the operation is done successfully" and fails when the cache's verification header names another CUDA
# device; get_timing_cache returns "None if no timing cache is set". ITimingCache.combine: a cache "must be
# generated by a TensorRT build of exact same version". Hence one cache file per TensorRT version and GPU.

def timing_cache_path(root: Path, trt_version: str, capability: tuple[int, int], gpu_name: str) -> Path:
    """The timing cache of one TensorRT version on one GPU model (a cache of another version or device is
    refused by TensorRT)."""
    gpu = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"
    return root / "tensorrt" / f"timing-trt{trt_version}-sm{capability[0]}{capability[1]}-{gpu}.cache"


def attach_timing_cache(config, path: Path):
    """Attach the stored timing cache, or a fresh one where it is missing or refused. Returns (the cache object,
    which must outlive the build, or None; what happened, for the build log)."""
    data = path.read_bytes() if path.is_file() else b""
    problem = "none stored yet"
    if data:
        try:
            cache = config.create_timing_cache(data)
        except Exception as exc:           # a truncated or foreign file
            cache, problem = None, f"unreadable ({type(exc).__name__}: {exc})"
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return cache, "reused"
        if cache is not None:
            problem = "refused by TensorRT (made by another TensorRT version or device)"
    cache = config.create_timing_cache(b"")
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return cache, f"fresh ({problem})"
    return None, f"none: TensorRT refused a fresh timing cache ({problem}); building without one"


def save_timing_cache(config, path: Path) -> str:
    """Write the builder's timing cache (after the engine is safe on disk); what happened, never an exception."""
    try:
        cache = config.get_timing_cache()
        if cache is None:
            return "not saved: no timing cache was attached to the build"
        _atomic_write(path, bytes(cache.serialize()))
        return "saved"
    except Exception as exc:
        return f"not saved: {type(exc).__name__}: {exc}"


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


_TRT_TO_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
                 "INT32": torch.int32, "BOOL": torch.bool, "INT8": torch.int8}


class TrtRunner:
    """One engine + execution context; {name: tensor} -> [output tensors in `output_names` order].

    Runs on its own CUDA stream: it waits for torch's current stream (which wrote the inputs), enqueues the
    engine, and makes torch's stream wait for it; no host synchronisation."""

    def __init__(self, engine, device: str, output_names: list[str], logger=None):
        self.engine, self.logger = engine, logger
        self.context = engine.create_execution_context()
        self.device = torch.device(device)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n).name == "INPUT" for n in names}
        self.inputs = [n for n in names if is_input[n]]
        engine_outputs = [n for n in names if not is_input[n]]
        missing = [n for n in output_names if n not in engine_outputs]
        if missing:
            raise EngineBuildError(f"engine has no output(s) {', '.join(missing)} (it has {', '.join(engine_outputs)})")
        self.output_names = list(output_names)
        self.dtypes = {n: _TRT_TO_TORCH[engine.get_tensor_dtype(n).name] for n in names}
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @classmethod
    def from_bytes(cls, engine_bytes: bytes, device: str, output_names: list[str]) -> "TrtRunner":
        import tensorrt as trt

        logger = _logger()
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(engine_bytes)
        if engine is None:
            raise EngineBuildError("TensorRT could not deserialize the cached engine: " + " | ".join(logger.messages[-4:]))
        runner = cls(engine, device, output_names, logger)
        runner.runtime = runtime            # the engine must not outlive its runtime
        return runner

    def _log(self) -> str:
        return " | ".join(self.logger.messages[-4:]) if self.logger is not None else ""

    def bind(self, feeds: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Set every input's shape and address and allocate every output by name. Returns the (converted)
        input tensors, which must stay allocated until the engine has read them, and the outputs by name."""
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise ValueError(f"engine input(s) {', '.join(missing)} not fed")
        inputs = []
        for name in self.inputs:
            t = feeds[name].to(device=self.device, dtype=self.dtypes[name]).contiguous()
            inputs.append(t)
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise RuntimeError(f"TensorRT rejected shape {tuple(t.shape)} for input {name}: outside the engine's "
                                   f"profile {self._profile(name)} {self._log()}".rstrip())
            self.context.set_tensor_address(name, t.data_ptr())
        unresolved = self.context.infer_shapes()
        if unresolved:
            raise RuntimeError(f"TensorRT cannot infer the shapes of {', '.join(unresolved)}")
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"TensorRT output {name} has unresolved shape {shape}")
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        return inputs, outputs

    def _profile(self, name: str) -> str:
        try:
            lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
            return f"[{tuple(lo)} .. {tuple(hi)}]"
        except Exception:   # older TensorRT, or a fake engine in tests
            return "(unknown)"

    def __call__(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        inputs, outputs = self.bind(feeds)
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)             # the inputs (and output buffers) are torch's stream's work
        for t in inputs:
            # freed by the caller any time after this returns: the caching allocator must not reuse the memory
            # before the engine's stream has read it
            t.record_stream(self.stream)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed {self._log()}".rstrip())
        current.wait_stream(self.stream)             # torch reads the outputs only after the engine wrote them
        return [outputs[name] for name in self.output_names]


def _trt_version() -> str | None:
    try:
        import tensorrt as trt
        return trt.__version__
    except Exception:
        return None


class TensorRTBackend(Backend):
    name = "tensorrt"
    options = OPTIONS
    exclusive = (("fp8", "fp4"),)
    extra = "tensorrt"
    packages = ("tensorrt",)
    description = ("TensorRT engines from the ONNX exports: profiles from the case matrix, strongly typed, cached "
                   "per TRT x GPU; options: static, fp8, fp4, tf32")

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
        problem = self.variant_problem(case.variant)
        if problem:
            return Support.no(problem)
        device = env.get("device", "cpu") if isinstance(env, dict) else "cpu"
        base = self.available_in(env)
        if not base:
            return base
        if device != "cuda":
            return Support.no(f"TensorRT needs a CUDA GPU (this run is on {device})")
        # the GPU and TensorRT as the env recorded them (a described stack is judged without its GPU)
        env = env if isinstance(env, dict) else {}
        gpu = env.get("gpu") or {}
        capability = tuple(int(n) for n in gpu["capability"].split(".")) if gpu.get("capability") \
            else torch.cuda.get_device_capability()
        version = ((env.get("stack") or {}).get("tensorrt") or {}).get("version") \
            or (env.get("versions") or {}).get("tensorrt") or _trt_version()
        precision = precision_for(case)
        for check in (precision_support(precision, capability, version), quantization_support(precision)):
            if not check:
                return check
        if "static" not in variant_options(case.variant):
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
        from backends.onnx.executors import make_executor
        from backends.onnx.export import export_model

        cache = Path(cache)
        build: dict[str, float] = {}
        with timed(build, "export"):
            exports = export_model(model, case, cache, "legacy")
        capability = torch.cuda.get_device_capability()
        version = _trt_version()
        precision = precision_for(case)
        chosen = variant_options(case.variant)
        static = "static" in chosen
        settings = build_settings(precision, "tf32" in chosen, version)
        timeout_s = build_timeout_s()
        cases = [case] if static else self._cases_for(case)
        sequences = text_sequence_lengths(model, case)
        timing_cache = timing_cache_path(cache, version, capability, torch.cuda.get_device_name())
        pipeline = model.pipeline
        executors, engines, plans = {}, {}, {}
        for name, export in exports.components.items():
            shapes = io_shapes(export.path)
            fixed = {"sequence": (sequences[name],) * 3} if name in sequences else {}
            ranges = {**axis_ranges(cases, model.kind, export.role, static=static), **fixed}
            profile = input_profile(shapes, ranges, export.example_shapes)
            needed = case_shapes(case, model.kind, export.role, shapes, export.example_shapes, fixed)
            problem = outside_profile(profile, needed)
            if problem:
                raise EngineBuildError(f"{name}: case outside its engine profile: {problem}")
            key = engine_key(version, capability, export.key, profile, precision, static, settings)
            runs_in = export.meta.get("dtype") or precision      # SDXL's upcast VAE: an fp32 graph (vae_spec)
            path = cache / "tensorrt" / f"{name}-{runs_in}-{key[:16]}.engine"
            source = fix_input_dims(export.path, needed, cache / "tensorrt" / f"static-{key[:16]}") \
                if static and not path.is_file() else export.path
            job = BuildJob(str(source), str(path), profile, precision, settings, str(timing_cache), timeout_s,
                           torch.cuda.current_device())
            with timed(build, "engine"):
                plans[name] = ensure_engine(job)
            with timed(build, "engine_load"):
                runner = TrtRunner.from_bytes(path.read_bytes(), model.device, export.outputs)
            executor = make_executor(export, getattr(pipeline, name), runner)
            setattr(pipeline, name, executor)
            executors[name] = executor
            engines[name] = {"engine": path.name, "profile": {k: [list(s) for s in v] for k, v in profile.items()},
                             "precision": runs_in}
        info = {"tensorrt": version, "precision": precision, "static": static, "engines": engines,
                "engine_reused": {n: p == "reuse" for n, p in plans.items()}, "engine_build": plans,
                "builder": settings, "tf32": "tf32" in chosen, "build_timeout_s": timeout_s,
                "text_sequence": sequences, "stream": "dedicated per engine, ordered with torch's stream",
                "compute_capability": f"{capability[0]}.{capability[1]}", "timing_cache": timing_cache.name,
                "exporter": exports.exporter, "opset": exports.opset}
        if exports.notes:
            info["notes"] = list(exports.notes)
        return Prepared(pipeline, executors, build, info, weights_outside_torch=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "build":
        sys.exit(build_main(sys.argv[2]))
    sys.exit("usage: python -m backends.tensorrt build JOB.json")
