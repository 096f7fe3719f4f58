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
    """
    pipeline: Any
    executors: dict[str, Any]
    build: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    on_close: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        while self.on_close:
            self.on_close.pop()()


class Backend:
    """Base class. Subclasses set `name`, `variants`, and implement the three methods."""
    name: str = ""
    variants: tuple[str, ...] = ("",)          # "" is the default variant
    description: str = ""
    extra: str = ""                             # the pyproject extra that installs what it needs ("": core)

    def available(self) -> Support:
        """Can this backend run at all here (packages, devices)? Cheap; no model work."""
        return Support.yes()

    def configure(self, cases: list) -> None:
        """Told the whole case list before a run (e.g. engine profiles that span every shape). Optional."""

    def support(self, case, env) -> Support:
        """Can this backend run this case here? Cheap, checked before any work."""
        if case.variant not in self.variants:
            known = ", ".join(v or "(default)" for v in self.variants)
            return Support.no(f"unknown variant {case.variant!r} for {self.name}; known: {known}")
        return self.available()

    def prepare(self, model, case, cache) -> Prepared:
        """Export / compile / build / deploy (cached) and return the pipeline with executors swapped in."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend holds across cases (servers, sessions)."""


@contextmanager
def timed(build: dict[str, float], step: str) -> Iterator[None]:
    """Add the wall time of a build step to `build[step]`."""
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
    "torch_compile": "backends.torch_compile:TorchCompileBackend",
    "onnxruntime": "backends.onnxruntime:OnnxRuntimeBackend",
    "tensorrt": "backends.tensorrt:TensorRTBackend",
    "triton": "backends.triton:TritonBackend",
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
