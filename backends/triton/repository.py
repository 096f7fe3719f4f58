"""Triton model repositories: config.pbtxt text per served model, plus the model files.

Three kinds of served model:
- a component (denoiser, text encoder, VAE decoder) run by the python backend with torch (`model_templates/
  component.py`, loading the component with from_pretrained from the model folder) -- what runs on this CPU server;
- the same component for the onnxruntime / tensorrt_plan backends of a GPU server (NGC container): config text and
  the model file name only (the ONNX / engine file comes from the export / engine-build caches);
- the whole pipeline (prompt, seed, steps, height, width in -> image out) for serving benchmarks.

Model files are copied from templates: no user string is ever written into code; the model folder, component and
dtype reach model.py as config parameters (escaped pbtxt strings).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

TEMPLATES = Path(__file__).parent / "model_templates"
MODES = ("python", "onnxruntime", "tensorrt_plan")
NUMPY_DTYPE = {"FP32": "float32", "FP16": "float16", "INT64": "int64", "INT32": "int32", "BOOL": "bool",
               "BYTES": "object"}


@dataclass
class TensorSpec:
    name: str
    dtype: str                       # Triton datatype without TYPE_: FP32, FP16, INT64, INT32, BYTES
    dims: list[int]                  # without the batch dimension (max_batch_size > 0)
    optional: bool = False
    reshape: list[int] | None = None  # e.g. [] for a per-sample scalar sent as [batch, 1]


@dataclass
class ServedModel:
    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    mode: str = "python"
    max_batch_size: int = 8
    preferred_batch_sizes: list[int] = field(default_factory=lambda: [2, 4, 8])
    max_queue_delay_us: int = 2000
    instances: int = 1
    kind: str = "KIND_CPU"
    parameters: dict[str, str] = field(default_factory=dict)
    template: str = "component.py"   # python mode: which model_templates file becomes 1/model.py

    @property
    def model_file(self) -> str:
        return {"python": "model.py", "onnxruntime": "model.onnx", "tensorrt_plan": "model.plan"}[self.mode]


def process_cores() -> int:
    """Cores this process may run on; a local tritonserver (our child) inherits the same affinity."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:       # not Linux
        return os.cpu_count() or 1


def model_threads(threads: int | None) -> int:
    """Threads of a python-backend model instance. None: every core of this process -- the client waits while the
    server computes, and each model has one instance, so a model's threads never compete with another's or with
    the client's. 0: the library's own default."""
    return process_cores() if threads is None else threads


def safe_name(text: str) -> str:
    """A Triton model name (a folder name): letters, digits, '_', '-', '.'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "model"


def _pbtxt_str(value: str) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _tensor_text(t: TensorSpec, is_input: bool) -> str:
    # the config calls BYTES tensors TYPE_STRING
    data_type = "STRING" if t.dtype == "BYTES" else t.dtype
    parts = [f"name: {_pbtxt_str(t.name)}", f"data_type: TYPE_{data_type}", f"dims: [ {', '.join(map(str, t.dims))} ]"]
    if t.reshape is not None:
        parts.append(f"reshape: {{ shape: [ {', '.join(map(str, t.reshape))} ] }}")
    if is_input and t.optional:
        parts.append("optional: true")
    return "  {\n    " + "\n    ".join(parts) + "\n  }"


def config_text(m: ServedModel) -> str:
    """The config.pbtxt of one served model."""
    if m.mode not in MODES:
        raise ValueError(f"unknown repository mode {m.mode!r}; choose from {', '.join(MODES)}")
    lines = [f"name: {_pbtxt_str(m.name)}"]
    if m.mode == "python":
        lines.append('backend: "python"')
    elif m.mode == "onnxruntime":
        lines += ['platform: "onnxruntime_onnx"', 'backend: "onnxruntime"', 'default_model_filename: "model.onnx"']
    else:
        lines += ['platform: "tensorrt_plan"', 'backend: "tensorrt"', 'default_model_filename: "model.plan"']
    lines.append(f"max_batch_size: {m.max_batch_size}")
    lines.append("input [\n" + ",\n".join(_tensor_text(t, True) for t in m.inputs) + "\n]")
    lines.append("output [\n" + ",\n".join(_tensor_text(t, False) for t in m.outputs) + "\n]")
    if m.max_batch_size > 0:
        preferred = [b for b in m.preferred_batch_sizes if b <= m.max_batch_size]
        lines.append("dynamic_batching {\n"
                     + (f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n" if preferred else "")
                     + f"  max_queue_delay_microseconds: {m.max_queue_delay_us}\n}}")
    lines.append(f"instance_group [\n  {{\n    count: {m.instances}\n    kind: {m.kind}\n  }}\n]")
    for key, value in m.parameters.items():
        lines.append(f"parameters {{\n  key: {_pbtxt_str(key)}\n  value: {{ string_value: {_pbtxt_str(value)} }}\n}}")
    return "\n".join(lines) + "\n"


# -- components: served with the same interface as their ONNX export ------------------------------------------------
_TRITON_TYPES = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16", "int64": "INT64", "int32": "INT32",
                 "bool": "BOOL"}


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def interface_model(name: str, interface, dtype: str, mode: str = "python", source: str | Path = "",
                    subfolder: str = "", max_batch_size: int = 8, instances: int = 1, kind: str | None = None,
                    max_queue_delay_us: int = 2000, threads: int | None = None, device: str = "cpu") -> ServedModel:
    """A served pipeline component whose inputs and outputs are its interface (a backends.onnx ComponentSpec):
    the names, order and dynamic axes of its ONNX export, so the shared executors run it with Triton as their
    runner. Python mode runs the torch component itself (model_templates/component.py, from_pretrained of
    `source`/`subfolder`); bf16 travels as FP32 there (numpy has no bfloat16) and per-sample scalars such as the
    timestep as [batch, 1]. The GPU modes are config text for the onnxruntime / tensorrt_plan backends.
    An input without a batch axis (flux's ids) makes the model unbatched (max_batch_size 0)."""
    floating = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype]
    shapes = {n: list(t.shape) for n, t in interface.inputs.items()}
    shapes.update(interface.output_shapes)
    batched = max_batch_size > 0 and all(interface.dynamic_axes.get(n, {}).get(0) == "batch" for n in shapes)
    scalars = [n for n in interface.inputs if len(shapes[n]) == 1 and batched]
    # tensors follow the case's dtype; per-sample scalars (the timestep) keep the precision the pipeline passes
    dtypes = {n: floating if t.is_floating_point() and n not in scalars else _dtype_name(t.dtype)
              for n, t in interface.inputs.items()}
    dtypes.update({n: floating for n in interface.outputs})

    def tensor(n: str) -> TensorSpec:
        axes = interface.dynamic_axes.get(n, {})
        dims = [-1 if i in axes else size for i, size in enumerate(shapes[n])][1 if batched else 0:]
        wire = dtypes[n]
        if mode == "python" and wire == "bfloat16":
            wire = "float32"
        reshape = [] if mode != "python" and batched and not dims else None   # the python model flattens itself
        return TensorSpec(n, _TRITON_TYPES[wire], dims or [1], reshape=reshape)

    params = {"role": interface.role, "subfolder": subfolder, "dtype": dtype}
    if mode == "python":
        params.update(source=str(source), torch_threads=str(model_threads(threads)), device=device,
                      interface=json.dumps({
            "inputs": list(interface.inputs), "input_dtypes": {n: dtypes[n] for n in interface.inputs},
            "scalars": scalars,
            "groups": interface.meta.get("groups", {}), "fields": interface.meta.get("fields", []),
            "hidden_states": interface.meta.get("hidden_states", False)}))
    # an embedding service's requests are single sentences: let dynamic batching gather them into the batch
    # sizes the encoder runs best at; a pipeline component's requests already carry the pipeline's batch
    preferred = [8, 16, 32, 64, 128] if interface.role == "encoder" else [2, 4, 8]
    return ServedModel(name=name, inputs=[tensor(n) for n in interface.inputs],
                       outputs=[tensor(n) for n in interface.outputs], mode=mode,
                       max_batch_size=max_batch_size if batched else 0, instances=instances,
                       kind=kind or ("KIND_CPU" if mode == "python" else "KIND_GPU"), preferred_batch_sizes=preferred,
                       max_queue_delay_us=max_queue_delay_us, parameters=params)


def pipeline_model(name: str, source: str | Path, dtype: str, max_batch_size: int = 8,
                   max_queue_delay_us: int = 5000, threads: int | None = None) -> ServedModel:
    """The whole pipeline as one served model: requests with the same steps/size/guidance are batched into one
    pipeline call (one generator per request, so results do not depend on the batching)."""
    scalar = lambda n, t, opt=False: TensorSpec(n, t, [1], optional=opt)  # noqa: E731
    return ServedModel(
        name=name, template="pipeline.py", max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
        inputs=[scalar("PROMPT", "BYTES"), scalar("NEGATIVE_PROMPT", "BYTES", True), scalar("SEED", "INT64"),
                scalar("STEPS", "INT32"), scalar("HEIGHT", "INT32"), scalar("WIDTH", "INT32"),
                scalar("GUIDANCE", "FP32", True)],
        outputs=[TensorSpec("IMAGE", "FP32", [-1, -1, 3])],
        parameters={"source": str(source), "dtype": dtype, "torch_threads": str(model_threads(threads))})


def write_model(repository: str | Path, model: ServedModel, model_file: str | Path | None = None) -> Path:
    """Write <repository>/<name>/config.pbtxt and 1/<model file>. Python mode copies its template; the other
    modes take `model_file` (the exported ONNX / built engine) when given, else only the config is written.
    Rewrites only what changed, so a loaded model's folder is not touched needlessly."""
    folder = Path(repository) / model.name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    _write_if_changed(folder / "config.pbtxt", config_text(model))
    if model.mode == "python":
        _write_if_changed(folder / "1" / "model.py", (TEMPLATES / model.template).read_text())
    if model_file is not None:   # python mode: the graph its model.py runs (onnx.py template)
        _copy_if_changed(Path(model_file), folder / "1" / ("model.onnx" if model.mode == "python"
                                                          else model.model_file))
        data = Path(str(model_file) + ".data")   # external weights keep the name the graph refers to
        if data.is_file():
            _copy_if_changed(data, folder / "1" / data.name)
    return folder


# -- a server that never saw our files: Triton's model-load API ----------------------------------------------------
SHIPPED_SOURCE = "1/source"   # python model.py: a relative `source` is a folder inside the served model's own folder


def load_request(folder: str | Path, source: str | Path | None = None, subfolder: str = "") -> tuple[str, dict]:
    """A model folder written by write_model as Triton's model-load API takes it (model repository extension,
    "load" with parameters): the config as JSON, and every file of the model keyed "file:<path in the model
    folder>" with its bytes. With `source`, the component's weights travel too, under SHIPPED_SOURCE (its
    model_index.json and `subfolder`, or the encoder folder's own files): config and weights only."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2
    folder = Path(folder)
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    files = {f"file:{p.relative_to(folder).as_posix()}": p.read_bytes()
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "config.pbtxt"}
    if source is not None:
        source = Path(source)
        wanted = [source / "model_index.json", *sorted((source / subfolder).iterdir())] if subfolder else \
            sorted(source.iterdir())
        for path in wanted:
            if path.is_file() and (path.suffix in (".json", ".safetensors")):
                files[f"file:{SHIPPED_SOURCE}/{path.relative_to(source).as_posix()}"] = path.read_bytes()
    return json_format.MessageToJson(config), files


def _copy_if_changed(src: Path, dst: Path) -> None:
    if dst.is_file() and dst.stat().st_size == src.stat().st_size and dst.stat().st_mtime >= src.stat().st_mtime:
        return
    shutil.copy2(src, dst)


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


# -- GPU servers (NGC container): repositories from the shared ONNX exports -----------------------------------------
_ONNX_TYPES = {1: "FP32", 10: "FP16", 16: "BF16", 7: "INT64", 6: "INT32", 9: "BOOL"}


def onnx_model(name: str, onnx_path: str | Path, mode: str = "onnxruntime", max_batch_size: int = 8,
               instances: int = 1, threads: int | None = None, spinning: bool = False) -> ServedModel:
    """mode "python": the graph run by ONNX Runtime inside the python backend (model_templates/onnx.py) on CPU,
    with `threads` intra-op threads (model_threads), one inter-op thread and, unless `spinning`, thread pools
    that do not busy-wait after a run (the client's torch work runs on the same cores between requests);
    per-sample scalars are sent as [batch, 1] and flattened by model.py. Falls back to max_batch_size 0 when an
    input has no batch axis (flux's ids)."""
    try:
        served = _onnx_model(name, onnx_path, mode, max_batch_size, instances)
    except _NoBatchAxis:
        served = _onnx_model(name, onnx_path, mode, 0, instances)
    if mode == "python":
        served.parameters.update(threads=str(model_threads(threads)), allow_spinning="1" if spinning else "0")
    return served


class _NoBatchAxis(ValueError):
    pass


def _onnx_model(name: str, onnx_path: str | Path, mode: str, max_batch_size: int, instances: int) -> ServedModel:
    """A ServedModel whose inputs/outputs are read from an ONNX graph (names, element types, dims; symbolic dims
    -> -1). With max_batch_size > 0 the first axis must be dynamic everywhere and is left out of dims; a rank-1
    (batch,) input such as the timestep becomes dims [1] with reshape [] (Triton has no empty dims)."""
    import onnx
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def specs(values) -> list[TensorSpec]:
        result = []
        for v in values:
            if v.name in initializers:
                continue
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            if t.elem_type not in _ONNX_TYPES:
                raise ValueError(f"{onnx_path}: {v.name} has ONNX element type {t.elem_type}, not served")
            if max_batch_size > 0:
                if not dims or dims[0] != -1:
                    raise _NoBatchAxis(f"{onnx_path}: {v.name} has no dynamic batch axis")
                dims = dims[1:]
            native = mode != "python"   # the python model flattens [batch, 1] itself
            result.append(TensorSpec(v.name, _ONNX_TYPES[t.elem_type], dims or [1],
                                     reshape=[] if native and max_batch_size > 0 and not dims else None))
        return result
    return ServedModel(name=name, inputs=specs(graph.input), outputs=specs(graph.output), mode=mode,
                       max_batch_size=max_batch_size, instances=instances,
                       kind="KIND_CPU" if mode == "python" else "KIND_GPU",
                       template="onnx.py" if mode == "python" else "component.py")


def export_repository(model, case, target: str | Path, cache: str | Path, mode: str = "onnxruntime",
                      exporter: str = "legacy", components: list[str] | None = None,
                      max_batch_size: int = 8) -> list[Path]:
    """Export the components (backends.onnx export cache) and write a repository for a GPU Triton server:
    onnxruntime models are copied ready to load; tensorrt_plan configs are written beside the ONNX, which
    trtexec / the tensorrt backend turns into 1/model.plan on the target GPU (engines are per GPU and TRT
    version, so they are not built here)."""
    from backends.onnx.export import export_model
    result = export_model(model, case, Path(cache), exporter=exporter, components=components)
    folders = []
    for component, export in result.components.items():
        name = safe_name(f"{model.name}_{model.dtype}_{component}_{mode}")
        served = onnx_model(name, export.path, mode, max_batch_size)
        if mode == "onnxruntime":
            folders.append(write_model(target, served, export.path))
        else:
            folder = write_model(target, served)
            shutil.copy2(export.path, folder / "model.onnx")
            data = Path(str(export.path) + ".data")
            if data.is_file():
                shutil.copy2(data, folder / data.name)
            folders.append(folder)
    return folders
