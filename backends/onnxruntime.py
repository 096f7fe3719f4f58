"""ONNX Runtime backend: every component exported once to ONNX (backends.onnx, cached by content hash) and
run in an InferenceSession. CPUExecutionProvider on CPU; CUDAExecutionProvider with IO binding on torch CUDA tensors
on GPU; TensorrtExecutionProvider as the "trt-ep" option.

Options: "dynamo" = torch.export-based exporter (9-24 s; default: the legacy TorchScript exporter, 1 s per model);
"trt-ep" = ORT's TensorRT EP (GPU only); "spin" = keep ORT's default busy-waiting thread pools; "tf32" = let the
CUDA EP use TF32 for fp32 matmuls and convolutions (off by default: fp32 means fp32); "int8" = the text-embedding
encoder dynamically quantised with ONNX Runtime's own tooling (onnxruntime.quantization.quantize_dynamic: int8
weights, activations quantised per call), cached beside the fp32 export.

Configured as ONNX Runtime's own performance guide would for this workload (docs/backends.md has the figures):
- the sessions share the process's cores with torch (scheduler, guidance, text encoders, hooks run between ORT
  calls), so the intra-op pool does not spin after a run: a spinning pool steals the cores torch needs next;
- intra-op threads = torch's thread count (the eager reference gets the same cores), inter-op 1 (sequential
  execution mode: the inter-op pool is unused), so neither library oversubscribes the cores;
- GPU: inputs and outputs bound in place (IO binding, bf16 as bf16) on a dedicated CUDA stream ordered against
  torch's stream with stream waits, and no host synchronisation at the end of a run.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from backends.base import Backend, Prepared, Support, described, module_available, timed, variant_options
from backends.onnx.executors import make_executor, output_symbols
from backends.onnx.export import export_model

_TORCH_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16,
                 "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(bool)": torch.bool}
SPINNING_KEYS = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")
# RunOptions entry: do not cudaStreamSynchronize the compute stream at the end of every run
NO_SYNC_KEY = "disable_synchronize_execution_providers"


class ExecutionProviderError(RuntimeError):
    """The session does not run on the execution provider the case asks for (e.g. a silent CPU fallback)."""


def process_cores() -> int:
    """Cores this process may run on (its CPU affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:       # not Linux
        return os.cpu_count() or 1


def session_options(spin: bool = False, threads: int | None = None):
    """Session options used for every component (recorded in info)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # the same cores as the eager reference, so CPU comparisons are fair
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    if not spin:
        # ORT's pools busy-wait after each run by default; between ORT calls the pipeline runs torch work, which
        # then competes with spinning threads for the same cores (issue 13: 16 ms vs 3 ms per denoise step)
        for key in SPINNING_KEYS:
            opts.add_session_config_entry(key, "0")
    opts.log_severity_level = 3
    return opts


def _config_entry(opts, key: str) -> str | None:
    try:
        return opts.get_session_config_entry(key)
    except RuntimeError:         # not set: ORT's default applies
        return None


def describe_options(opts) -> dict:
    return {"graph_optimization_level": str(opts.graph_optimization_level).split(".")[-1],
            "execution_mode": str(opts.execution_mode).split(".")[-1],
            "intra_op_num_threads": opts.intra_op_num_threads, "inter_op_num_threads": opts.inter_op_num_threads,
            # ORT's default for both pools is to spin
            "intra_op_allow_spinning": _config_entry(opts, SPINNING_KEYS[0]) != "0",
            "inter_op_allow_spinning": _config_entry(opts, SPINNING_KEYS[1]) != "0"}


def thread_facts(opts) -> dict:
    """Who may use how many cores: torch's and ORT's pools run one after the other (never together), so the
    process is oversubscribed only when one of them alone wants more threads than it has cores."""
    cores = process_cores()
    torch_threads = torch.get_num_threads()
    return {"process_cores": cores, "cpu_count": os.cpu_count(), "torch_threads": torch_threads,
            "torch_interop_threads": torch.get_num_interop_threads(),
            "ort_intra_op_threads": opts.intra_op_num_threads, "ort_inter_op_threads": opts.inter_op_num_threads,
            "ort_spinning": describe_options(opts)["intra_op_allow_spinning"],
            "oversubscribed": max(torch_threads, opts.intra_op_num_threads) > cores}


def element_type(dtype: torch.dtype):
    """What IOBinding.bind_input/bind_output take as element type for a torch dtype: a numpy type, or, for
    bfloat16 (numpy has none), the ONNX TensorProto enum value, which onnxruntime's bindings accept as well."""
    if dtype == torch.bfloat16:
        from onnx import TensorProto
        return TensorProto.BFLOAT16
    types = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32,
             torch.bool: np.bool_}
    if dtype not in types:
        raise TypeError(f"no ONNX Runtime element type for {dtype}")
    return types[dtype]


def check_providers(active: list[str], required: list[str], component: str, device: str) -> None:
    """Refuse a session that silently fell back to another provider (ORT only logs when a provider fails to load,
    e.g. CUDA/cuDNN libraries missing, and then runs on the CPU)."""
    missing = [p for p in required if p not in active]
    if missing:
        raise ExecutionProviderError(
            f"ONNX Runtime session for {component} runs on {', '.join(active)} although the case is on {device}: "
            f"{', '.join(missing)} did not load (check the onnxruntime-gpu install and its CUDA/cuDNN libraries)")


def session_device(device) -> torch.device:
    """The one device a case's sessions compute on and their IO binding names: the GPU given (cuda:1), else torch's
    current GPU (where the pipeline makes its tensors); the CUDA EP's device_id and bind_input's device_id must
    both be its index, or ONNX Runtime reads and writes another GPU's addresses."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class OrtRunner:
    """One InferenceSession; runs a dict of torch tensors and returns torch tensors on the same device.

    On CUDA (and wherever io_binding is asked for) inputs and outputs are bound in place. `stream` is the CUDA
    stream the session computes on (the CUDA EP's user_compute_stream): the runner orders it after torch's
    current stream before a run and torch's stream after it, so no host synchronisation is needed."""

    def __init__(self, path: Path, providers: list, opts, device: str, symbols: dict[str, tuple[str, int]],
                 component: str = "", required: list[str] = (), stream=None, io_binding: bool | None = None):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        check_providers(self.session.get_providers(), list(required), component or Path(path).parent.name,
                        torch.device(device).type)
        self.device = session_device(device)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self._out_meta = self.session.get_outputs()
        self.symbols = symbols          # output-only dim name -> (dim name it derives from, scale)
        self.stream = stream
        self.io_binding = self.device.type != "cpu" if io_binding is None else io_binding
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry(NO_SYNC_KEY, "1")

    def providers(self) -> list[str]:
        return self.session.get_providers()

    def __call__(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        feeds = {name: self._cast(name, t) for name, t in feeds.items() if name in self.inputs}
        if not self.io_binding:
            arrays = self.session.run(None, {n: t.detach().contiguous().numpy() for n, t in feeds.items()})
            return [torch.from_numpy(a) for a in arrays]
        return self.run_bound(feeds)

    def _cast(self, name: str, t: torch.Tensor) -> torch.Tensor:
        want = _TORCH_DTYPES.get(self.inputs[name].type)
        return t.to(device=self.device, dtype=want) if want is not None else t.to(self.device)

    def run_bound(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """IO binding: ORT reads and writes torch's buffers directly (no copies, no host round trip)."""
        binding, inputs, outputs = self._bind(feeds)
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(current)        # inputs and output buffers are torch's stream's work
            for t in inputs:
                # the caching allocator must not hand this memory out again before ORT's stream has read it
                t.record_stream(self.stream)
        self.session.run_with_iobinding(binding, self.run_options)
        if self.stream is not None:
            current.wait_stream(self.stream)        # torch reads the outputs only after ORT wrote them
        return outputs

    def _bind(self, feeds: dict[str, torch.Tensor]):
        binding = self.session.io_binding()
        device_type = "cuda" if self.device.type == "cuda" else "cpu"
        device_id = self.device.index or 0          # the session's own GPU (session_device)
        dims: dict[str, int] = {}
        inputs = []                                 # referenced until the run has been enqueued
        for name, t in feeds.items():
            t = t.contiguous()
            inputs.append(t)
            for sym, size in zip(self.inputs[name].shape, t.shape):
                if isinstance(sym, str):
                    dims[sym] = size
            binding.bind_input(name, device_type, device_id, element_type(t.dtype), list(t.shape), t.data_ptr())
        outputs = []
        for meta in self._out_meta:
            shape = [self._resolve(d, dims) for d in meta.shape]
            out = torch.empty(shape, dtype=_TORCH_DTYPES[meta.type], device=self.device)
            outputs.append(out)
            binding.bind_output(meta.name, device_type, device_id, element_type(out.dtype), shape, out.data_ptr())
        return binding, inputs, outputs

    def _resolve(self, dim, dims: dict[str, int]) -> int:
        if isinstance(dim, int):
            return dim
        if dim in dims:
            return dims[dim]
        if dim in self.symbols:
            source, scale = self.symbols[dim]
            return dims[source] * scale
        raise RuntimeError(f"cannot infer ONNX output dimension {dim!r} for IO binding")


# ONNX Conv, ConvTranspose and InstanceNormalization take bfloat16 only from opset 22 (their type constraints in the
# ONNX operator spec, onnx/defs/nn/defs.cc); the exports are opset 17 (legacy) / 18 (dynamo), so onnxruntime refuses
# a bf16 UNet/VAE at session creation, on every provider: "INVALID_GRAPH ... Type 'tensor(bfloat16)' of input
# parameter (latent) of operator (Conv) ... is invalid" (tests/test_stacks.py builds such a session on the CPU)
BF16_GRAPH_REASON = ("bf16 on ONNX Runtime: a text-to-image graph does not load (ONNX Conv and InstanceNormalization "
                     "take bfloat16 only from opset 22, the exports are opset 17/18: INVALID_GRAPH at session "
                     "creation on every provider); use fp16 or fp32")


def providers_in(env) -> list[str]:
    """The execution providers of the onnxruntime the case runs with: as the env recorded them (this machine's
    fingerprint, or a described stack), else this process's."""
    recorded = ((env.get("stack") or {}).get("onnxruntime") or {}) if isinstance(env, dict) else {}
    if "providers" in recorded or described(env):
        return list(recorded.get("providers") or ())
    import onnxruntime as ort
    return ort.get_available_providers()


def trt_ep_options(dtype: str, cache: Path) -> dict:
    """TensorRT EP options. trt_bf16_enable only for bf16: onnxruntime-gpu before 1.23 has no such key and rejects
    unknown ones ("Unknown provider option"), so every other dtype runs on those releases too."""
    options = {"trt_fp16_enable": dtype == "fp16", "trt_engine_cache_enable": True,
               "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": True}
    if dtype == "bf16":
        options["trt_bf16_enable"] = True
    return options


# int8 embeddings are held to this cosine against the fp32 reference: dynamic int8 quantisation of MiniLM-L6 measured
# a worst sentence of 0.990 and a mean of 0.996 over the fixed set (short and long, 2026-11-23); 0.98 leaves room
# for other encoders while a broken quantisation (a wrong scale, a dropped layer) falls far below it. The ranking
# check (every sentence keeps its nearest neighbour) holds as for fp32.
INT8_MIN_COSINE = 0.98


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    workloads = ("text-to-image", "text-embedding")
    options = ("dynamo", "trt-ep", "spin", "tf32", "int8")
    extra = "onnx"                               # on a GPU runner: "gpu" (onnxruntime-gpu instead)
    packages = ("onnxruntime", "onnxruntime-gpu")
    description = ("ONNX export (legacy or dynamo exporter) run in ONNX Runtime (CPU EP; CUDA EP / TensorRT EP on "
                   "GPU); options: spin (ORT's spinning thread pools), tf32")

    def available(self) -> Support:
        return module_available("onnxruntime")

    def support(self, case, env) -> Support:
        base = super().support(case, env)
        if not base:
            return base
        device = env.get("device", "cpu") if isinstance(env, dict) else "cpu"
        providers = providers_in(env)
        chosen = variant_options(case.variant)
        if case.dtype == "bf16" and case.workload == "text-to-image":
            return Support.no(BF16_GRAPH_REASON)
        if "tf32" in chosen and device != "cuda":
            return Support.no(f"tf32 is a CUDA math mode: on {device} this case would repeat the one without +tf32")
        if "trt-ep" in chosen:
            if device != "cuda":
                return Support.no("TensorRT execution provider needs a CUDA GPU")
            if "TensorrtExecutionProvider" not in providers:
                return Support.no("TensorrtExecutionProvider not in this onnxruntime build "
                                  "(needs onnxruntime-gpu and TensorRT libraries)")
            if case.dtype == "fp32" and "tf32" not in chosen:
                return Support.no("ORT's TensorRT EP has no option to clear TensorRT's TF32 flag (on by default), "
                                  "so its fp32 is not strict fp32: run it as onnxruntime+trt-ep+tf32")
        if "int8" in chosen:
            if case.workload != "text-embedding":
                return Support.no("int8: dynamic quantisation suits transformer encoders (MatMul weights); a "
                                  "diffusion denoiser needs static, calibrated quantisation, which this backend "
                                  "does not produce")
            if device != "cpu" or case.dtype != "fp32":
                return Support.no("int8: dynamically quantised models run on ONNX Runtime's CPU provider from an "
                                  "fp32 export (the CUDA provider lacks the integer MatMul kernels)")
        if device == "cuda" and "CUDAExecutionProvider" not in providers:
            return Support.no("CUDAExecutionProvider not available: install onnxruntime-gpu instead of onnxruntime")
        if device == "cpu" and case.dtype != "fp32":
            return Support.no(f"{case.dtype} on ONNX Runtime CPU: the CPU EP lacks {case.dtype} kernels for most "
                              "ops (Conv, GroupNorm, attention); fp32 only on CPU")
        return Support.yes()

    def providers(self, case, device: str, cache: Path, stream=None) -> list:
        """The provider list for a case; on CUDA the CUDA EP computes on `stream` (the runners order it against
        torch's stream)."""
        if torch.device(device).type != "cuda":
            return ["CPUExecutionProvider"]
        chosen = variant_options(case.variant)
        cuda_options = {"device_id": session_device(device).index, "use_tf32": int("tf32" in chosen)}
        if stream is not None:
            cuda_options["user_compute_stream"] = str(stream.cuda_stream)
        cuda = ("CUDAExecutionProvider", cuda_options)
        if "trt-ep" in chosen:
            trt_cache = cache / "ort-trt"
            trt_cache.mkdir(parents=True, exist_ok=True)
            trt_options = trt_ep_options(case.dtype, trt_cache)
            if stream is not None:
                trt_options["user_compute_stream"] = str(stream.cuda_stream)
            return [("TensorrtExecutionProvider", trt_options), cuda]
        return [cuda]

    @staticmethod
    def required_providers(case, device: str) -> list[str]:
        if torch.device(device).type != "cuda":
            return []
        return ["TensorrtExecutionProvider", "CUDAExecutionProvider"] if "trt-ep" in variant_options(case.variant) \
            else ["CUDAExecutionProvider"]

    def prepare(self, model, case, cache) -> Prepared:
        cache = Path(cache)
        chosen = variant_options(case.variant)
        exporter = "dynamo" if "dynamo" in chosen else "legacy"
        build: dict[str, float] = {}
        with timed(build, "export"):
            result = export_model(model, case, cache, exporter)
        quantized = {}
        if "int8" in chosen:
            with timed(build, "quantize"):
                quantized = {name: quantize_int8(export.path, cache) for name, export in result.components.items()}
        opts = session_options(spin="spin" in chosen)
        device = session_device(model.device)       # sessions, IO binding and stream on one GPU
        # one stream for all of this case's sessions: they run one after another, like the pipeline's components
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        providers = self.providers(case, device, cache, stream)
        required = self.required_providers(case, device)
        pipeline = model.pipeline
        executors, used = {}, {}
        with timed(build, "session"):
            for name, export in result.components.items():
                runner = OrtRunner(quantized.get(name, export.path), providers, opts, device,
                                   output_symbols(export), component=name, required=required, stream=stream)
                executor = make_executor(export, getattr(pipeline, name), runner)
                setattr(pipeline, name, executor)
                executors[name] = executor
                used[name] = runner.providers()
        info = {"exporter": exporter, "opset": result.opset, "export_reused": {c: e.reused for c, e in
                                                                              result.components.items()},
                "export_seconds": {c: round(e.seconds, 3) for c, e in result.components.items()},
                "session_options": describe_options(opts), "threads": thread_facts(opts), "providers": used,
                "io_binding": device.type == "cuda", "onnx_dtype": case.dtype,
                "onnxruntime": _ort_version()}
        if device.type == "cuda":
            info["cuda"] = {"use_tf32": "tf32" in chosen, "stream": "dedicated, ordered with torch's stream",
                            "host_sync_per_run": False, "device_id": device.index}
        if result.notes:
            info["notes"] = list(result.notes)
        if quantized:
            from harness.judge.compare import EmbeddingTolerance
            info["quantization"] = {"method": "onnxruntime.quantization.quantize_dynamic", "weights": "QInt8",
                                    "per_channel": True, "min_cosine": INT8_MIN_COSINE}
            output = EmbeddingTolerance(INT8_MIN_COSINE, "int8 dynamic quantisation of MiniLM-L6 measured a worst "
                                        "sentence cosine of 0.990, mean 0.996 (2026-11-23)")
            encoder = {"atol": 0.5, "rtol": 0.5, "statistic": "p99",
                       "source": "int8 weights: a loose bound on the hidden states, not measured per component; the "
                                 "embedding's cosine and ranking checks judge the output"}
            return Prepared(pipeline, executors, build, info, output_tolerance=output,
                            tolerance_overrides={"text_encoder": encoder},
                            weights_outside_torch=True)
        return Prepared(pipeline, executors, build, info, weights_outside_torch=True)


def quantize_int8(onnx_path: Path, cache: Path) -> Path:
    """The export dynamically quantised to int8 weights, cached next to the exports (keyed by the fp32 export's own
    folder and ONNX Runtime's version) and written atomically."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from harness.atomic import atomic_folder, build_lock
    source = Path(onnx_path)
    target = cache / "onnx-int8" / f"{source.parent.name}-ort{ort.__version__}"
    model = target / "model.onnx"
    with build_lock(target):
        if model.is_file():
            return model
        with atomic_folder(target, "int8") as tmp:
            quantize_dynamic(str(source), str(tmp / "model.onnx"), weight_type=QuantType.QInt8, per_channel=True)
    return model


def _ort_version() -> str:
    import onnxruntime as ort
    return ort.__version__
