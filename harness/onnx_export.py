"""ONNX export of pipeline components, shared by the onnxruntime and tensorrt backends and the Triton helper.

Each component (text encoders, denoiser, VAE decoder) is exported once per model x dtype x exporter with dynamic
axes (batch, height, width, sequence) into `<cache>/onnx/<model>/<component>-<dtype>-<exporter>-<key>/`:
model.onnx + model.onnx.data (external data beside the model) + manifest.json (sha256 of every file). The key is a
content hash of the weights, config, input signature, exporter, opset and torch version, so N cases of one model
export once. Entries are written into a temp folder and renamed into place (atomic); on load every file is checked
against the manifest, and a corrupt or partial entry is re-exported with a note saying so.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from backends.base import Executor
from harness.atomic import atomic_folder  # the executor contract lives in the adapter interface

EXPORTERS = ("legacy", "dynamo")
OPSET = {"legacy": 17, "dynamo": 18}
FORMAT_VERSION = 1          # bump when the export layout or wrappers change: old cache entries are then unused
MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
_TOKENIZER_FOR = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}


@dataclass
class ComponentSpec:
    """How one component is exported and called: a wrapper with positional tensor inputs, names, axes."""
    component: str
    role: str                                   # text_encoder | denoiser | vae
    wrapper: torch.nn.Module
    inputs: dict[str, torch.Tensor]             # name -> example tensor (order = wrapper's positional order)
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    meta: dict[str, Any] = field(default_factory=dict)   # what the executor needs to rebuild outputs


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
# wrappers: plain positional tensors in, tensors out (what ONNX can express)

class _TextEncoderWrapper(torch.nn.Module):
    def __init__(self, module, hidden_states: bool, fields: list[str]):
        super().__init__()
        self.module, self.hidden_states, self.fields = module, hidden_states, fields

    def forward(self, input_ids):
        out = self.module(input_ids, output_hidden_states=self.hidden_states, return_dict=True)
        tensors = [out[k] for k in self.fields]
        if self.hidden_states:
            tensors.extend(out.hidden_states)
        return tuple(tensors)


class _DenoiserWrapper(torch.nn.Module):
    def __init__(self, module, names: list[str], groups: dict[str, list[str]]):
        super().__init__()
        self.module, self.names, self.groups = module, names, groups

    def forward(self, *tensors):
        kwargs = dict(zip(self.names, tensors))
        for group, keys in self.groups.items():        # e.g. SDXL added_cond_kwargs={text_embeds, time_ids}
            kwargs[group] = {k: kwargs.pop(f"{group}.{k}") for k in keys}
        return self.module(**kwargs, return_dict=False)[0]


class _VaeDecodeWrapper(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


# ---------------------------------------------------------------------------------------------------------------
# specs

def text_encoder_spec(model, component: str) -> ComponentSpec:
    module = getattr(model.pipeline, component)
    tokenizer = getattr(model.pipeline, _TOKENIZER_FOR.get(component, "tokenizer"), None)
    seq = int(getattr(tokenizer, "model_max_length", 77) or 77)
    ids = torch.ones((2, seq), dtype=torch.long, device=model.device)
    # CLIP encoders: the pipelines read hidden_states[-2] (sdxl, sd3, clip_skip): export every hidden state.
    # T5 is only ever asked for [0].
    hidden = "clip" in str(getattr(module.config, "model_type", "")).lower()
    with torch.no_grad():
        out = module(ids, output_hidden_states=hidden, return_dict=True)
    fields = [k for k in out.keys() if k not in ("hidden_states", "attentions")]
    names = [*fields, *(f"hidden_states.{i}" for i in range(len(out.hidden_states) if hidden else 0))]
    axes: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "sequence"}}
    for name in names:
        value = out[name] if name in fields else out.hidden_states[int(name.split(".")[1])]
        axes[name] = {0: "batch", **({1: "sequence"} if value.ndim == 3 else {})}
    return ComponentSpec(component, "text_encoder", _TextEncoderWrapper(module, hidden, fields), {"input_ids": ids},
                         names, axes, meta={"output_class": f"{type(out).__module__}.{type(out).__qualname__}",
                                            "fields": fields, "hidden_states": hidden, "sequence": seq})


class _Captured(Exception):
    pass


def capture_denoiser_call(model, case) -> dict[str, Any]:
    """The keyword arguments the real pipeline passes to its denoiser for this case (one call, then stop)."""
    from harness.models import pipeline_inputs

    module = getattr(model.pipeline, model.denoiser)
    seen: dict[str, Any] = {}
    signature = inspect.signature(module.forward)

    def hook(_module, args, kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        seen.update(bound.arguments)
        raise _Captured

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        kwargs = pipeline_inputs(model, case)
        kwargs["num_inference_steps"] = 1
        with torch.no_grad():
            model.pipeline(**kwargs)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"the pipeline never called its {model.denoiser}")
    return seen


def denoiser_spec(model, case) -> ComponentSpec:
    module = getattr(model.pipeline, model.denoiser)
    call = capture_denoiser_call(model, case)
    first = next(iter(call))                       # sample (unet) / hidden_states (transformers)
    batch = call[first].shape[0]
    inputs: dict[str, torch.Tensor] = {}
    groups: dict[str, list[str]] = {}
    for name, value in call.items():
        if isinstance(value, dict):
            tensors = {k: v for k, v in value.items() if isinstance(v, torch.Tensor)}
            if tensors:
                groups[name] = list(tensors)
                inputs.update({f"{name}.{k}": v for k, v in tensors.items()})
        elif isinstance(value, torch.Tensor):
            if name == "timestep" and value.ndim == 0:
                value = value.expand(batch)       # ONNX / TRT want a (batch,) timestep
            inputs[name] = value
    sample = inputs[first]
    if model.denoiser == "unet":
        # Traced UNets bake "latent size divisible by 2**upsamplers" as a constant; exported from an odd size the
        # graph carries explicit upsample sizes and then runs at every size (checked in tests/test_onnx_export.py).
        h, w = sample.shape[-2:]
        sample = torch.randn(*sample.shape[:-2], h + 1 - h % 2, w + 1 - w % 2, dtype=sample.dtype,
                             device=sample.device)
        inputs[first] = sample
    axes: dict[str, dict[int, str]] = {}
    for name, value in inputs.items():
        if name == first and value.ndim == 4:
            axes[name] = {0: "batch", 2: "latent_height", 3: "latent_width"}
        elif name == first and value.ndim == 3:           # flux: packed latents (batch, image_seq, channels)
            axes[name] = {0: "batch", 1: "image_sequence"}
        elif name == "encoder_hidden_states":
            axes[name] = {0: "batch", 1: "text_sequence"}
        elif name == "img_ids":
            axes[name] = {0: "image_sequence"} if value.ndim == 2 else {0: "batch", 1: "image_sequence"}
        elif name == "txt_ids":
            axes[name] = {0: "text_sequence"} if value.ndim == 2 else {0: "batch", 1: "text_sequence"}
        elif value.ndim >= 1:
            axes[name] = {0: "batch"}
    axes["out_sample"] = dict(axes[first])
    names = list(inputs)
    return ComponentSpec(model.denoiser, "denoiser", _DenoiserWrapper(module, names, groups), inputs, ["out_sample"],
                         axes, meta={"groups": groups, "first": first, "in_channels": sample.shape[1]})


def vae_spec(model, case) -> ComponentSpec:
    vae = getattr(model.pipeline, model.vae)
    f = model.vae_scale_factor
    latent = torch.randn(2, vae.config.latent_channels, case.height // f, case.width // f,
                         dtype=vae.dtype, device=model.device)
    return ComponentSpec(model.vae, "vae", _VaeDecodeWrapper(vae), {"latent": latent}, ["image"],
                         {"latent": {0: "batch", 2: "latent_height", 3: "latent_width"},
                          "image": {0: "batch", 2: "height", 3: "width"}},
                         meta={"scale_factor": f, "out_channels": vae.config.out_channels})


def component_specs(model, case, components: list[str] | None = None) -> list[ComponentSpec]:
    wanted = components or model.components
    specs = [text_encoder_spec(model, c) for c in model.text_encoders if c in wanted]
    if model.denoiser in wanted:
        specs.append(denoiser_spec(model, case))
    if model.vae in wanted:
        specs.append(vae_spec(model, case))
    return specs


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
        export, note = export_component(spec, module, Path(root), model.name, model.dtype, exporter, opset)
        result.components[spec.component] = export
        if note:
            result.notes.append(note)
    return result


# ---------------------------------------------------------------------------------------------------------------
# executors: drop-in stand-ins that call any runner with the exported graph's inputs/outputs (ONNX Runtime,
# TensorRT, Triton). A runner is a callable {input name: torch tensor} -> [output tensors in graph order].

def output_symbols(export: ComponentExport) -> dict[str, tuple[str, int]]:
    """Output dims that no input carries, as (input dim, scale): the VAE image is 8x the latent."""
    if export.role == "vae":
        f = export.meta["scale_factor"]
        return {"height": ("latent_height", f), "width": ("latent_width", f)}
    return {}


def make_executor(export: ComponentExport, original: torch.nn.Module, runner: Callable) -> torch.nn.Module:
    if export.role == "text_encoder":
        return TextEncoderExecutor(original, runner, export.meta)
    if export.role == "denoiser":
        return DenoiserExecutor(original, runner, export.inputs, export.meta)
    return VaeExecutor(original, runner)


class _Executor(Executor):
    """An ONNX-graph stand-in: the executor contract plus the runner that executes the graph."""

    def __init__(self, original, runner: Callable):
        super().__init__(original)
        self.runner = runner

    def to(self, *args, **kwargs):
        # the ONNX graph has fixed precision; pipelines that "upcast" the VAE only change what we report
        dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), None)
        if dtype is not None:
            self._dtype = dtype
        return self


def _import_class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


class TextEncoderExecutor(_Executor):
    """Returns the same ModelOutput class as the transformers model (fields, pooled/text_embeds, hidden_states)."""

    def __init__(self, original, runner, meta: dict):
        super().__init__(original, runner)
        self.output_class = _import_class(meta["output_class"])
        self.fields, self.has_hidden = meta["fields"], meta["hidden_states"]

    def forward(self, input_ids, attention_mask=None, output_hidden_states=None, return_dict=True, **_):
        if attention_mask is not None and not bool((attention_mask == 1).all()):
            raise NotImplementedError("the ONNX text encoder was exported without an attention mask input")
        out = self.runner({"input_ids": input_ids})
        fields = dict(zip(self.fields, out))
        hidden = tuple(out[len(self.fields):]) if self.has_hidden and output_hidden_states else None
        result = self.output_class(**fields, hidden_states=hidden)
        return result if return_dict is not False else result.to_tuple()


class DenoiserExecutor(_Executor):
    """Keyword call like the diffusers UNet/transformer; 0-d timestep expanded to (batch,); returns (sample,)."""

    def __init__(self, original, runner, inputs: list[str], meta: dict):
        super().__init__(original, runner)
        self.input_names, self.groups, self.first = inputs, meta["groups"], meta["first"]
        self._arg_order = list(inspect.signature(original.forward).parameters)   # for positional calls

    def forward(self, *args, return_dict: bool = True, **kwargs):
        kwargs.update(zip(self._arg_order, args))
        sample = kwargs[self.first]
        feeds = {}
        for name in self.input_names:
            group, _, key = name.partition(".")
            value = kwargs.get(group) if key else kwargs.get(name)
            if key:
                value = (value or {}).get(key)
            if value is None:
                raise ValueError(f"{name} was exported as an input but the pipeline did not pass it")
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value, device=sample.device)
            if name == "timestep" and value.ndim == 0:
                value = value.expand(sample.shape[0])
            feeds[name] = value
        out = self.runner(feeds)[0].to(sample.dtype)
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput
            return Transformer2DModelOutput(sample=out)
        return (out,)

    @contextlib.contextmanager
    def cache_context(self, name):   # FluxPipeline wraps each call in transformer.cache_context(...)
        yield


class VaeExecutor(_Executor):
    """`.decode(latents, return_dict=False) -> (image,)`; the encoder is not exported (text-to-image only)."""

    def decode(self, z, return_dict: bool = True, **_):
        image = self.runner({"latent": z})[0].to(z.dtype)
        if return_dict:
            from diffusers.models.autoencoders.vae import DecoderOutput
            return DecoderOutput(sample=image)
        return (image,)

    def forward(self, z):
        return self.decode(z, return_dict=False)[0]

    @property
    def post_quant_conv(self):  # SDXL reads its dtype after "upcasting" the VAE
        return torch.nn.Linear(1, 1, bias=False, dtype=self._dtype)
