"""ONNX export of pipeline components, cached, shared by the onnxruntime, tensorrt and triton backends.

Each component (text encoders, denoiser, VAE decoder) is exported once per model x dtype x exporter with dynamic
axes (batch, height, width, sequence) into `<cache>/onnx/<model>/<component>-<dtype>-<exporter>-<key>/`:
model.onnx + model.onnx.data (external data beside the model) + manifest.json (sha256 of every file). The key is a
content hash of the weights, config, input signature, exporter, opset and torch version, so N cases of one model
export once. Entries are written into a temp folder and renamed into place (atomic); on load every file is checked
against the manifest, and a corrupt or partial entry is re-exported with a note saying so.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from backends.onnx.components import ComponentSpec, component_specs
from harness.atomic import atomic_folder, build_lock

EXPORTERS = ("legacy", "dynamo")
OPSET = {"legacy": 17, "dynamo": 18}
FORMAT_VERSION = 1          # bump when the export layout or wrappers change: old cache entries are then unused
MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


@dataclass
class ComponentExport:
    component: str
    role: str
    folder: Path
    inputs: list[str]
    outputs: list[str]
    input_dtypes: dict[str, str]
    example_shapes: dict[str, list[int]]       # the export's example inputs (fixed-size axes, e.g. text length)
    dynamic_axes: dict[str, dict[int, str]]
    meta: dict[str, Any]
    key: str
    reused: bool
    seconds: float

    @property
    def path(self) -> Path:
        return self.folder / ONNX_FILE


@dataclass
class ExportResult:
    exporter: str
    opset: int
    components: dict[str, ComponentExport]
    notes: list[str] = field(default_factory=list)

    @property
    def exported(self) -> list[str]:
        return [c for c, e in self.components.items() if not e.reused]


# ---------------------------------------------------------------------------------------------------------------
# cache keys

def weights_hash(module: torch.nn.Module, full_limit_bytes: int = 1 << 30) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes). Above `full_limit_bytes` (full-size
    random-weight models on a GPU) only a strided sample of each tensor is hashed, so keying stays seconds."""
    h = hashlib.sha256()
    tensors = list(module.state_dict().items())
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    for name, t in tensors:
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        flat = t.detach().reshape(-1)
        if total > full_limit_bytes and flat.numel() > 4096:
            flat = flat[:: max(1, flat.numel() // 4096)]
        h.update(flat.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def export_key(spec: ComponentSpec, module: torch.nn.Module, exporter: str, opset: int, dtype: str) -> str:
    config = getattr(module, "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})   # transformers | diffusers
    signature = {n: [str(t.dtype), t.ndim] for n, t in spec.inputs.items()}
    parts = {"weights": weights_hash(module), "config": json.dumps(config, sort_keys=True, default=str),
             "role": spec.role, "inputs": signature, "outputs": spec.outputs, "axes": spec.dynamic_axes,
             "exporter": exporter, "opset": opset, "torch": torch.__version__, "dtype": dtype,
             "format": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# cache entries: write atomically, verify on load

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_entry(folder: Path, key: str) -> str | None:
    """None if the entry is complete and intact, else what is wrong with it."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return "manifest missing"
    except (OSError, json.JSONDecodeError) as exc:
        return f"unreadable manifest ({type(exc).__name__})"
    if manifest.get("key") != key:
        return "key mismatch"
    for name, expected in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} truncated ({path.stat().st_size} of {expected['size']} bytes)"
        if _sha256(path) != expected["sha256"]:
            return f"{name} hash mismatch"
    if ONNX_FILE not in manifest.get("files", {}):
        return "manifest lists no model"
    return None


def _export_to(spec: ComponentSpec, folder: Path, exporter: str, opset: int) -> None:
    import onnx

    raw = folder / "raw"
    raw.mkdir()
    args = tuple(spec.inputs.values())
    names = list(spec.inputs)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")     # tracer warnings about python-side shape checks
        if exporter == "legacy":
            torch.onnx.export(spec.wrapper, args, str(raw / ONNX_FILE), input_names=names,
                              output_names=spec.outputs, dynamic_axes=spec.dynamic_axes, opset_version=opset,
                              do_constant_folding=True, dynamo=False)
        else:
            torch.onnx.export(spec.wrapper, args, str(raw / ONNX_FILE), input_names=names,
                              output_names=spec.outputs, dynamic_shapes=dynamo_shapes(spec), opset_version=opset,
                              dynamo=True, external_data=True, optimize=True, verbose=False)
    proto = onnx.load(str(raw / ONNX_FILE), load_external_data=True)
    name_dynamic_axes(proto, spec.dynamic_axes)
    # one layout for every exporter and size: graph in model.onnx, all weights in model.onnx.data beside it
    onnx.save_model(proto, str(folder / ONNX_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE)
    shutil.rmtree(raw)


def dynamo_shapes(spec: ComponentSpec) -> dict:
    """dynamic_axes as torch.export dynamic_shapes, keyed like the wrapper's signature (*tensors or named)."""
    from torch.export import Dim

    per_input = [{axis: Dim.DYNAMIC for axis in spec.dynamic_axes.get(n, {})} for n in spec.inputs]
    params = list(inspect.signature(spec.wrapper.forward).parameters.values())
    if params and params[0].kind is inspect.Parameter.VAR_POSITIONAL:
        return {params[0].name: tuple(per_input)}
    return {p.name: shape for p, shape in zip(params, per_input)}


def name_dynamic_axes(proto, axes: dict[str, dict[int, str]]) -> None:
    """Give the graph's dynamic input/output dims our axis names (both exporters), so IO binding and TensorRT
    profiles can tell which dims are batch, height, width or sequence."""
    for value in [*proto.graph.input, *proto.graph.output]:
        for axis, label in axes.get(value.name, {}).items():
            dims = value.type.tensor_type.shape.dim
            if axis < len(dims):
                dims[axis].ClearField("dim_value")
                dims[axis].dim_param = label


def export_component(spec: ComponentSpec, module: torch.nn.Module, root: Path, model_name: str, dtype: str,
                     exporter: str = "legacy", opset: int | None = None) -> tuple[ComponentExport, str | None]:
    """Export one component into the cache (or reuse a verified entry). Returns the export and a note (re-export)."""
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown ONNX exporter {exporter!r}; choose from {', '.join(EXPORTERS)}")
    opset = opset or OPSET[exporter]
    key = export_key(spec, module, exporter, opset, dtype)
    parent = root / "onnx" / model_name.replace("/", "_").replace(":", "_")
    folder = parent / f"{spec.component}-{dtype}-{exporter}-{key[:16]}"
    note = None
    description = dict(inputs=list(spec.inputs), outputs=spec.outputs,
                       input_dtypes={n: str(t.dtype).removeprefix("torch.") for n, t in spec.inputs.items()},
                       example_shapes={n: list(t.shape) for n, t in spec.inputs.items()},
                       dynamic_axes=spec.dynamic_axes, meta=spec.meta)
    with build_lock(folder):
        if folder.exists():
            problem = verify_entry(folder, key)
            if problem is None:
                return ComponentExport(spec.component, spec.role, folder, key=key, reused=True, seconds=0.0,
                                       **description), None
            note = f"onnx export cache {spec.component} re-exported: {problem}"
        start = time.perf_counter()
        with atomic_folder(folder, spec.component) as tmp:
            _export_to(spec, tmp, exporter, opset)
            files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
            seconds = time.perf_counter() - start
            (tmp / MANIFEST).write_text(json.dumps(
                {"key": key, "component": spec.component, "exporter": exporter, "opset": opset, "dtype": dtype,
                 "torch": torch.__version__, "seconds": round(seconds, 3), "files": files, **description},
                indent=1, default=str))
        return ComponentExport(spec.component, spec.role, folder, key=key, reused=False, seconds=seconds,
                               **description), note


def export_model(model, case, root: Path, exporter: str = "legacy", components: list[str] | None = None,
                 opset: int | None = None, progress: Callable[[str], None] | None = None) -> ExportResult:
    """Export (or reuse) every wanted component of a loaded model. Specs are built on the model's own device."""
    opset = opset or OPSET[exporter]
    result = ExportResult(exporter, opset, {})
    for spec in component_specs(model, case, components):
        module = getattr(model.pipeline, spec.component)
        if progress:
            progress(spec.component)
        # a component may run in another dtype than the model's (SDXL's upcast VAE: vae_spec)
        dtype = spec.meta.get("dtype", model.dtype)
        export, note = export_component(spec, module, Path(root), model.name, dtype, exporter, opset)
        result.components[spec.component] = export
        if note:
            result.notes.append(note)
    return result
