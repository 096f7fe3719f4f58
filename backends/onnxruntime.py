"""ONNX Runtime backend: every component exported once to ONNX (harness.onnx_export, cached by content hash) and
run in an InferenceSession. CPUExecutionProvider on CPU; CUDAExecutionProvider with IO binding on torch CUDA tensors
(on torch's current stream, no host round trip) on GPU; TensorrtExecutionProvider as the "trt-ep" variant.

Variants: "" = legacy (TorchScript) exporter, 1 s per model; "dynamo" = torch.export-based exporter (9-24 s);
"trt-ep" = legacy export run by ORT's TensorRT EP (GPU only).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from backends.base import Backend, Prepared, Support, module_available, timed

_TORCH_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16,
                 "tensor(int64)": torch.int64, "tensor(int32)": torch.int32}


def session_options(threads: int | None = None):
    """Session options used for every component (recorded in info)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # same thread count as the eager reference, so CPU comparisons are fair
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


def describe_options(opts) -> dict:
    return {"graph_optimization_level": str(opts.graph_optimization_level).split(".")[-1],
            "execution_mode": str(opts.execution_mode).split(".")[-1],
            "intra_op_num_threads": opts.intra_op_num_threads, "inter_op_num_threads": opts.inter_op_num_threads}


class OrtRunner:
    """One InferenceSession; runs a dict of torch tensors and returns torch tensors on the same device."""

    def __init__(self, path: Path, providers: list, opts, device: str, symbols: dict[str, tuple[str, int]]):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.device = torch.device(device)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self._out_meta = self.session.get_outputs()
        self.symbols = symbols          # output-only dim name -> (dim name it derives from, scale)

    def providers(self) -> list[str]:
        return self.session.get_providers()

    def __call__(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        feeds = {name: self._cast(name, t) for name, t in feeds.items() if name in self.inputs}
        if self.device.type == "cpu":
            arrays = self.session.run(None, {n: t.detach().contiguous().numpy() for n, t in feeds.items()})
            return [torch.from_numpy(a) for a in arrays]
        return self._run_bound(feeds)

    def _cast(self, name: str, t: torch.Tensor) -> torch.Tensor:
        want = _TORCH_DTYPES.get(self.inputs[name].type)
        return t.to(device=self.device, dtype=want) if want is not None else t.to(self.device)

    def _run_bound(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        # IO binding: ORT reads and writes torch's CUDA buffers directly (no host round trip)
        binding = self.session.io_binding()
        dims: dict[str, int] = {}
        keep = []
        for name, t in feeds.items():
            t = t.contiguous()
            keep.append(t)
            for sym, size in zip(self.inputs[name].shape, t.shape):
                if isinstance(sym, str):
                    dims[sym] = size
            binding.bind_input(name, "cuda", self.device.index or 0, _element_type(t.dtype), list(t.shape),
                               t.data_ptr())
        outputs = []
        for meta in self._out_meta:
            shape = [self._resolve(d, dims) for d in meta.shape]
            out = torch.empty(shape, dtype=_TORCH_DTYPES[meta.type], device=self.device)
            outputs.append(out)
            binding.bind_output(meta.name, "cuda", self.device.index or 0, _element_type(out.dtype), shape,
                                out.data_ptr())
        self.session.run_with_iobinding(binding)
        return outputs

    def _resolve(self, dim, dims: dict[str, int]) -> int:
        if isinstance(dim, int):
            return dim
        if dim in dims:
            return dims[dim]
        if dim in self.symbols:
            source, scale = self.symbols[dim]
            return dims[source] * scale
        raise RuntimeError(f"cannot infer ONNX output dimension {dim!r} for IO binding")


def _element_type(dtype: torch.dtype):
    # bind_* take numpy types; bf16 has none
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
            torch.int32: np.int32}.get(dtype, np.float16)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    variants = ("", "dynamo", "trt-ep")
    extra = "onnx"                               # on a GPU runner: "gpu" (onnxruntime-gpu instead)
    description = "ONNX export (legacy or dynamo exporter) run in ONNX Runtime (CPU EP; CUDA EP / TensorRT EP on GPU)"

    def available(self) -> Support:
        return module_available("onnxruntime")

    def support(self, case, env) -> Support:
        base = super().support(case, env)
        if not base:
            return base
        import onnxruntime as ort

        device = env.get("device", "cpu") if isinstance(env, dict) else "cpu"
        providers = ort.get_available_providers()
        if case.variant == "trt-ep":
            if device != "cuda":
                return Support.no("TensorRT execution provider needs a CUDA GPU")
            if "TensorrtExecutionProvider" not in providers:
                return Support.no("TensorrtExecutionProvider not in this onnxruntime build "
                                  "(needs onnxruntime-gpu and TensorRT libraries)")
        if device == "cuda" and "CUDAExecutionProvider" not in providers:
            return Support.no("CUDAExecutionProvider not available: install onnxruntime-gpu instead of onnxruntime")
        if device == "cpu" and case.dtype != "fp32":
            return Support.no(f"{case.dtype} on ONNX Runtime CPU: the CPU EP lacks {case.dtype} kernels for most "
                              "ops (Conv, GroupNorm, attention); fp32 only on CPU")
        return Support.yes()

    def providers(self, case, device: str, cache: Path) -> list:
        if device != "cuda":
            return ["CPUExecutionProvider"]
        cuda = ("CUDAExecutionProvider", {"device_id": torch.cuda.current_device(),
                                          # run on torch's current stream: no cross-stream sync needed
                                          "user_compute_stream": str(torch.cuda.current_stream().cuda_stream),
                                          "do_copy_in_default_stream": True})
        if case.variant == "trt-ep":
            trt_cache = cache / "ort-trt"
            trt_cache.mkdir(parents=True, exist_ok=True)
            return [("TensorrtExecutionProvider", {"trt_fp16_enable": case.dtype == "fp16",
                                                   "trt_bf16_enable": case.dtype == "bf16",
                                                   "trt_engine_cache_enable": True,
                                                   "trt_engine_cache_path": str(trt_cache),
                                                   "trt_timing_cache_enable": True}), cuda]
        return [cuda]

    def prepare(self, model, case, cache) -> Prepared:
        from harness.onnx_export import export_model, make_executor, output_symbols

        cache = Path(cache)
        exporter = "dynamo" if case.variant == "dynamo" else "legacy"
        build: dict[str, float] = {}
        with timed(build, "export"):
            result = export_model(model, case, cache, exporter)
        opts = session_options()
        providers = self.providers(case, model.device, cache)
        pipeline = model.pipeline
        executors, used = {}, {}
        with timed(build, "session"):
            for name, export in result.components.items():
                runner = OrtRunner(export.path, providers, opts, model.device, output_symbols(export))
                executor = make_executor(export, getattr(pipeline, name), runner)
                setattr(pipeline, name, executor)
                executors[name] = executor
                used[name] = runner.providers()
        info = {"exporter": exporter, "opset": result.opset, "export_reused": {c: e.reused for c, e in
                                                                              result.components.items()},
                "export_seconds": {c: round(e.seconds, 3) for c, e in result.components.items()},
                "session_options": describe_options(opts), "providers": used,
                "io_binding": model.device == "cuda", "onnx_dtype": case.dtype,
                "onnxruntime": _ort_version()}
        if result.notes:
            info["notes"] = list(result.notes)
        return Prepared(pipeline, executors, build, info)


def _ort_version() -> str:
    import onnxruntime as ort
    return ort.__version__

