"""The adapter interface every backend implements, and the registry.

A backend does not reimplement the diffusion loop: it turns components of a real diffusers pipeline (text
encoders, denoiser, VAE decoder) into executors -- drop-in nn.Modules with the same call signature and output type
-- and puts them into the pipeline. Scheduler, guidance and pre/post-processing stay diffusers' own.
"""
from __future__ import annotations

import importlib
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from harness.errors import UserError
from harness.measure import progress


class Unsupported(Exception):
    """Raised by prepare() when only the loaded pipeline can tell that a case cannot run, or that its variant would
    do nothing for it (e.g. VAE tiling where the latent fits in one tile): the case becomes an unsupported row
    with this reason, not an error."""


@dataclass(frozen=True)
class Support:
    supported: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.supported

    @classmethod
    def yes(cls) -> "Support":
        return cls(True, "")

    @classmethod
    def no(cls, reason: str) -> "Support":
        return cls(False, reason)


class Executor(torch.nn.Module):
    """Base of a drop-in stand-in for a pipeline component. diffusers reads `.config`, `.dtype` and `.device` of its
    components (without `.device` the pipeline fails with a misleading `_execution_device` AttributeError), so an
    executor carries the original's; it holds no weights of its own unless a subclass adds them."""

    def __init__(self, original: torch.nn.Module):
        super().__init__()
        self.config = original.config
        self._dtype, self._device = original.dtype, original.device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device


@dataclass
class Prepared:
    """A pipeline with this backend's executors swapped in.

    executors: component name -> the module now in the pipeline (e.g. "text_encoder", "unet", "vae").
    build: step -> seconds (export, compile, engine build, deploy...), recorded under `build`.
    info: extra facts for the record (session options, graph breaks, provider, exporter...).
    after_measure: called once after the measured calls; returns facts to merge into `info` (counters such as
        recompiles are read there, never inside the timed region).
    output_tolerance / tolerance_overrides: parity bounds for a variant whose output differs from the reference by
        design (VAE tiling, fp8 storage, int8 weights), set from the error measured on correct runs, each with its
        `source` (the measurement); None = the dtype's defaults. output_tolerance: an ImageTolerance or
        EmbeddingTolerance (by workload). tolerance_overrides: role ("text_encoder", "denoiser", "vae") or component
        name -> Tolerance fields, e.g. {"vae": {"atol": 0.08, "rtol": 0.08, "statistic": "p99", "relative_to":
        "max|ref|", "source": "tiled vs untiled decode measured p99 0.03 x max|ref|"}}. The record names the variant
        as the one that declared them (harness/judge/compare.py: declared, declared_output).
    weights_outside_torch: the executors run the components' weights outside torch (ONNX Runtime sessions,
        TensorRT engines, a Triton server): the runner then empties torch's caching allocator after prepare.
    unjudged_components: component -> why its own outputs cannot be compared with the reference's (a served
        model that returns pooled embeddings has no hidden state to compare); the pipeline's output still is.
    remote: set (to what it is) when the pipeline is a remote service called whole: its components cannot be
        reached, so component parity, component timing and stage hooks are skipped (e2e only).
    """
    pipeline: Any
    executors: dict[str, Any]
    build: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    on_close: list[Callable[[], None]] = field(default_factory=list)
    after_measure: Callable[[], dict] | None = None
    output_tolerance: Any = None
    tolerance_overrides: dict | None = None
    weights_outside_torch: bool = False
    unjudged_components: dict[str, str] = field(default_factory=dict)
    remote: str = ""

    def close(self) -> None:
        while self.on_close:
            self.on_close.pop()()


# env key set by harness.judge.stacks when an env describes another machine (a stack file judged by `diffbench backends
# --stack`): what is installed is then read from the env, never from this process
DESCRIBED = "described_by"


def described(env) -> bool:
    return isinstance(env, dict) and bool(env.get(DESCRIBED))


def variant_options(variant: str) -> frozenset[str]:
    """The named options a case's variant string holds ("max-autotune+fused-qkv" -> both; "" -> none)."""
    return frozenset(name for name in variant.split("+") if name)


class Backend:
    """Base class. Subclasses set `name` and `options`, and implement available/support/prepare.

    A case's variant is a set of the backend's named options joined by "+", always written in the order of
    `options`, so `torch_compile+fused-qkv+max-autotune` and `torch_compile+max-autotune+fused-qkv` are one case
    id everywhere (gate, merge, resume). Options in one `exclusive` group do not combine."""
    name: str = ""
    workloads: tuple[str, ...] = ("text-to-image",)    # what it can run (harness/selection/workloads.py)
    options: tuple[str, ...] = ()                      # named options, in canonical order
    exclusive: tuple[tuple[str, ...], ...] = ()        # groups of options of which a case may choose one
    description: str = ""
    extra: str = ""                             # the pyproject extra that installs what it needs ("": core)
    packages: tuple[str, ...] = ()              # distributions it imports, one of which must be installed

    def variant_problem(self, variant: str) -> str | None:
        """What is wrong with a variant string (unknown or conflicting options), or None."""
        names = variant_options(variant)
        unknown = sorted(names - set(self.options))
        if unknown:
            known = ", ".join(self.options) or "(none)"
            return (f"unknown variant option {', '.join(map(repr, unknown))} for backend {self.name}; "
                    f"choose from {known}")
        for group in self.exclusive:
            chosen = [n for n in group if n in names]
            if len(chosen) > 1:
                return f"conflicting options {' and '.join(chosen)} for backend {self.name}: choose one"
        return None

    def canonical_variant(self, variant: str) -> str:
        """The variant with its options in canonical order; UserError when it names unknown or conflicting ones."""
        problem = self.variant_problem(variant)
        if problem:
            raise UserError(problem)
        names = variant_options(variant)
        return "+".join(n for n in self.options if n in names)

    def available(self) -> Support:
        """Can this backend run at all here (packages, devices)? Cheap; no model work."""
        return Support.yes()

    def available_in(self, env) -> Support:
        """available() for the machine `env` describes: this process's answer, or, for a described stack, whether
        its recorded versions hold one of `packages`."""
        if not described(env):
            return self.available()
        versions = env.get("versions") or {}
        if not self.packages or any(versions.get(name) for name in self.packages):
            return Support.yes()
        return Support.no(f"{' or '.join(self.packages)} not installed in this stack")

    def configure(self, cases: list) -> None:
        """Told the whole case list before a run (e.g. engine profiles that span every shape). Optional."""

    def load_device(self, case, device: str) -> str:
        """Where the model is loaded before prepare() (offloading variants load on the CPU)."""
        return device

    def support(self, case, env) -> Support:
        """Can this backend run this case here? Cheap, checked before any work."""
        problem = self.variant_problem(case.variant)
        if problem:
            return Support.no(problem)
        if case.workload not in self.workloads:
            return Support.no(f"{self.name} runs {' and '.join(self.workloads)} cases, not {case.workload}")
        return self.available_in(env)

    def prepare(self, model, case, cache) -> Prepared:
        """Export / compile / build / deploy (cached) and return the pipeline with executors swapped in."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend holds across cases (servers, sessions)."""

    def foreign_processes(self, case) -> dict[int, str]:
        """Processes this backend keeps alive across cases (a shared server and its workers) that `case` does not
        use: pid -> what it is. The memory sampler leaves them, with their children, out of the case's figures."""
        return {}


def enable_tf32() -> Callable[[], None]:
    """TF32 for float32 matmuls (cuBLAS) and convolutions (cuDNN), for a `+tf32` option; returns the function that
    restores the previous settings. Only set_float32_matmul_precision and cudnn.allow_tf32 are used: they read
    back consistently whether strict fp32 was set through them or through torch's newer fp32_precision
    attributes (after which reading allow_tf32 raises in torch 2.13)."""
    cudnn = torch.backends.cudnn
    precision = torch.get_float32_matmul_precision()
    try:
        cudnn_tf32 = cudnn.allow_tf32
    except RuntimeError:          # strict fp32 was set through cudnn.conv.fp32_precision
        cudnn_tf32 = cudnn.conv.fp32_precision == "tf32"
    torch.set_float32_matmul_precision("high")
    cudnn.allow_tf32 = True

    def restore() -> None:
        torch.set_float32_matmul_precision(precision)
        cudnn.allow_tf32 = cudnn_tf32
    return restore


@contextmanager
def timed(build: dict[str, float], step: str) -> Iterator[None]:
    """Add the wall time of a build step to `build[step]`; the step is the run's progress phase meanwhile."""
    progress.phase(step)
    start = time.perf_counter()
    try:
        yield
    finally:
        build[step] = build.get(step, 0.0) + time.perf_counter() - start


def module_available(name: str) -> Support:
    try:
        importlib.import_module(name)
    except Exception as exc:  # ImportError, or a broken native library
        return Support.no(f"{name} not installed ({type(exc).__name__}: {exc})".split("\n")[0])
    return Support.yes()


# name -> "module:Class". Modules are imported only when asked for, so a backend whose package is missing
# never breaks the others. Tests may register extra (fault-injecting) backends at run time.
_REGISTRY: dict[str, str] = {
    "diffusers": "backends.diffusers:DiffusersBackend",
    "torch": "backends.torch_eager:TorchEagerBackend",
    "torch_compile": "backends.torch_compile:TorchCompileBackend",
    "onnxruntime": "backends.onnxruntime:OnnxRuntimeBackend",
    "tensorrt": "backends.tensorrt:TensorRTBackend",
    "triton": "backends.triton:TritonBackend",
    "http": "backends.http:HttpBackend",
}
_INSTANCES: dict[str, Backend] = {}
REFERENCE = "diffusers"


def register(name: str, target: str | type) -> None:
    """Register a backend under `name`: a "module:Class" path or a Backend subclass."""
    _REGISTRY[name] = target  # type: ignore[assignment]
    _INSTANCES.pop(name, None)


def load_plugins(spec: str | None = None) -> None:
    """Register backends from outside this package: DIFFBENCH_PLUGINS (or `spec`) names comma-separated modules,
    each with a register() that calls register(name, target). Used by the CLI and by A/B workers."""
    for module_name in filter(None, (s.strip() for s in (spec or os.environ.get("DIFFBENCH_PLUGINS", "")).split(","))):
        try:
            module = importlib.import_module(module_name)
            module.register()
        except Exception as exc:
            raise UserError(f"DIFFBENCH_PLUGINS: cannot load {module_name!r}: {type(exc).__name__}: {exc}")


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)
    inst = _INSTANCES.pop(name, None)
    if inst is not None:
        inst.close()


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise UserError(f"unknown backend {name!r}; choose from {', '.join(_REGISTRY)}")
    if name not in _INSTANCES:
        target = _REGISTRY[name]
        if isinstance(target, str):
            module_name, _, cls_name = target.partition(":")
            try:
                cls = getattr(importlib.import_module(module_name), cls_name)
            except Exception as exc:  # a broken backend module must not take the others down
                cls = _unavailable_backend(name, f"{target} failed to load: {type(exc).__name__}: {exc}")
        else:
            cls = target
        _INSTANCES[name] = cls()
    return _INSTANCES[name]


def foreign_processes(case) -> dict[int, str]:
    """Every live backend's processes that `case` does not use (Backend.foreign_processes)."""
    out: dict[int, str] = {}
    for inst in list(_INSTANCES.values()):
        try:
            out.update(inst.foreign_processes(case))
        except Exception:   # a backend that cannot tell leaves its processes counted, as before
            pass
    return out


def close_all() -> None:
    for inst in list(_INSTANCES.values()):
        try:
            inst.close()
        except Exception:  # closing must never hide the run's own result
            pass
    _INSTANCES.clear()


def _unavailable_backend(name: str, reason: str) -> type:
    class Unavailable(Backend):
        def available(self) -> Support:
            return Support.no(reason)

        def support(self, case, env) -> Support:
            return Support.no(reason)
    Unavailable.name = name
    return Unavailable
