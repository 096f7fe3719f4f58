"""TritonBackend: pipeline components served by a real Triton Inference Server, called with tritonclient.

prepare() writes the model repository, starts one local tritonserver per session (or uses DIFFBENCH_TRITON_URL),
loads the component models and swaps executors into the pipeline. Variants pick the protocol (http default, grpc)
and what is served:
  "" / http / grpc      the denoiser, run with torch in the python backend (from_pretrained of the model folder)
  http-all / grpc-all   + the text encoder and VAE decoder (sd only: other text encoders need hidden states)
  onnx / grpc-onnx      every component as its exported ONNX graph (harness.onnx_export cache), run by ONNX
                        Runtime in the python backend; the executors are harness.onnx_export's, Triton their runner
"""
from __future__ import annotations

import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from backends.base import Backend, Prepared, Support, module_available, timed
from backends.triton import repository as repo
from backends.triton.client import (Client, DenoiserExecutor, TextEncoderExecutor, VaeDecoderExecutor, failure)
from backends.triton.server import ExternalServer, TritonServer, missing_reason

URL_ENV = "DIFFBENCH_TRITON_URL"
LOG_DIR_ENV = "DIFFBENCH_TRITON_LOG_DIR"
LOAD_TIMEOUT_S = 300.0


def served_roles(model_kind: str, variant: str) -> list[str]:
    return ["denoiser", "text_encoder", "vae_decoder"] if variant.endswith("all") else ["denoiser"]


def protocol_of(variant: str) -> str:
    return "grpc" if variant.startswith("grpc") else "http"


class _TritonRunner:
    """harness.onnx_export's runner contract: {input name: tensor} -> [output tensors in graph order]."""

    def __init__(self, client: Client, served: repo.ServedModel, device):
        self.client, self.name, self.device = client, served.name, device
        self.inputs = {t.name: t for t in served.inputs}
        self.outputs = [t.name for t in served.outputs]
        self.batched = served.max_batch_size > 0

    def __call__(self, feeds):
        import numpy as np
        import torch
        arrays = {}
        for name, tensor in feeds.items():
            array = tensor.detach().cpu().numpy().astype(repo.NUMPY_DTYPE[self.inputs[name].dtype], copy=False)
            if self.batched and array.ndim == 1:   # per-sample scalar: Triton needs a dim beyond the batch
                array = array.reshape(-1, 1)
            arrays[name] = array
        out = self.client.infer(self.name, arrays, self.outputs)
        return [torch.from_numpy(np.array(out[n])).to(self.device) for n in self.outputs]


def _prune(base: Path, keep: int) -> None:
    """Keep the newest `keep` session folders (repository + server log) under .cache/triton."""
    import shutil
    sessions = sorted((p for p in base.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in sessions[:-keep] if keep else sessions:
        shutil.rmtree(old, ignore_errors=True)


def load_model(server, name: str, timeout_s: float = LOAD_TIMEOUT_S) -> None:
    """Load one model (explicit model control) over gRPC: thread-safe and with a real client timeout, so loads
    can run in parallel threads (tritonclient's sync HTTP client must not be shared or used that way)."""
    import tritonclient.grpc as grpcclient
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        if not (server.external and client.is_model_ready(name)):
            client.load_model(name, client_timeout=timeout_s)
    except Exception as exc:
        raise failure(server, f"tritonserver failed to load model {name}", exc) from exc
    finally:
        client.close()


class TritonBackend(Backend):
    name = "triton"
    variants = ("", "http", "grpc", "http-all", "grpc-all", "onnx", "grpc-onnx")
    extra = "triton"
    description = "Triton Inference Server (python backend, torch) via tritonclient HTTP/gRPC"

    def __init__(self):
        self.server: TritonServer | ExternalServer | None = None
        self.repository: Path | None = None
        self.loaded: set[str] = set()
        self.server_start_s: float | None = None
        self._lock = threading.Lock()

    # -- support --------------------------------------------------------------------------------------------------
    def available(self) -> Support:
        for name in ("tritonclient.http", "tritonclient.grpc"):
            found = module_available(name)
            if not found:
                return found
        if not os.environ.get(URL_ENV):
            reason = missing_reason()
            if reason:
                return Support.no(reason)
        return Support.yes()

    def support(self, case, env) -> Support:
        basic = super().support(case, env)
        if not basic:
            return basic
        from harness import models
        spec = models.spec(case.model)
        if spec.source == "full":
            return Support.no("triton serves components loaded from a model folder; full-size random-weight "
                              "architectures exist only in memory (save one and use path:DIR)")
        if spec.kind == "flux":
            return Support.no("flux denoiser is not served by the triton backend yet (its ids have no batch "
                              "dimension)")
        if case.variant.endswith("onnx"):
            for name in ("onnx", "onnxruntime"):
                found = module_available(name)
                if not found:
                    return found
            if case.dtype != "fp32":
                return Support.no(f"variant {case.variant}: {case.dtype} ONNX tensors cannot cross tritonclient's "
                                  "numpy API (no bfloat16 in numpy; fp16 only on GPU servers)")
            return Support.yes()
        if case.variant.endswith("all") and spec.kind != "sd":
            return Support.no(f"variant {case.variant}: {spec.kind} text encoders are not served yet "
                              "(only sd's CLIPTextModel)")
        return Support.yes()

    # -- server ---------------------------------------------------------------------------------------------------
    def ensure_server(self, cache) -> TritonServer | ExternalServer:
        """The session's server: started once, reused by every case; a dead one is replaced."""
        with self._lock:
            if self.server is not None and self.server.alive():
                return self.server
            if self.server is not None:   # it died: start afresh, forget what it had loaded
                self.server.stop()
                self.loaded.clear()
            url = os.environ.get(URL_ENV)
            if url:
                self.server = ExternalServer(url)
                self.repository = None
            else:
                base = Path(cache or tempfile.gettempdir()) / "triton"
                base.mkdir(parents=True, exist_ok=True)
                _prune(base, keep=10)
                session = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=base))
                self.repository = session / "repository"
                self.repository.mkdir()
                log_dir = Path(os.environ.get(LOG_DIR_ENV) or session)
                self.server = TritonServer(self.repository, log_dir).start()
            self.server_start_s = self.server.start_s
            return self.server

    def load(self, name: str) -> None:
        """Load a model by name (explicit model control); a failure carries the server's message."""
        if name in self.loaded:
            return
        load_model(self.server, name)
        with self._lock:
            self.loaded.add(name)

    # -- prepare --------------------------------------------------------------------------------------------------
    def prepare(self, model, case, cache) -> Prepared:
        if case.variant.endswith("onnx"):
            return self._prepare_onnx(model, case, cache)
        protocol = protocol_of(case.variant)
        build: dict[str, float] = {}
        pipeline = model.pipeline
        components = {"denoiser": model.denoiser, "vae_decoder": model.vae}
        if model.text_encoders:
            components["text_encoder"] = model.text_encoders[0]
        roles = served_roles(model.kind, case.variant)
        server = None
        with timed(build, "server_start"):
            server = self.ensure_server(cache)
        served = []
        with timed(build, "repository"):
            for role in roles:
                subfolder = components[role]
                config = repo.component_config(model.source, subfolder)
                name = repo.safe_name(f"{model.name}_{model.dtype}_{subfolder}_{role}")
                spec = repo.component_model(name, model.kind, role, config, model.dtype, model.source, subfolder,
                                            device=str(model.device))
                if self.repository is not None:
                    repo.write_model(self.repository, spec)
                served.append((role, subfolder, spec))
        with timed(build, "model_load"):
            # in parallel: each python model spends seconds importing torch in its own stub process
            with ThreadPoolExecutor(len(served)) as pool:
                list(pool.map(self.load, [spec.name for _, _, spec in served]))
        client = Client(server, protocol)
        executors, originals = {}, {}
        for role, subfolder, spec in served:
            original = getattr(pipeline, subfolder)
            wire = spec.inputs[0].dtype if role != "text_encoder" else spec.outputs[0].dtype
            if role == "denoiser":
                executor = DenoiserExecutor(original, client, spec.name, wire, model.kind)
            elif role == "text_encoder":
                executor = TextEncoderExecutor(original, client, spec.name, wire)
            else:
                executor = VaeDecoderExecutor(original, client, spec.name, wire)
            originals[subfolder] = original
            setattr(pipeline, subfolder, executor)
            executors[subfolder] = executor

        def restore():
            for sub, original in originals.items():
                setattr(pipeline, sub, original)
            client.close()

        info = {"triton": {
            "protocol": protocol, "served": {sub: spec.name for _, sub, spec in served},
            "server": "external" if server.external else "local", "url": server.http_url,
            "grpc_url": server.grpc_url, "log": str(server.log_path) if server.log_path else None,
            "repository": str(self.repository) if self.repository else None,
            "server_start_s": self.server_start_s, "backend": "python (torch)",
            "wire_dtype": served[0][2].inputs[0].dtype,
            "max_batch_size": served[0][2].max_batch_size,
        }}
        return Prepared(pipeline=pipeline, executors=executors, build=build, info=info, on_close=[restore])

    def _prepare_onnx(self, model, case, cache) -> Prepared:
        """Every component exported to ONNX (the shared export cache) and served as its graph, run by ONNX
        Runtime inside the python backend; executors from harness.onnx_export call Triton as their runner."""
        from harness.onnx_export import export_model, make_executor
        protocol = protocol_of(case.variant)
        build: dict[str, float] = {}
        with timed(build, "export"):
            exports = export_model(model, case, Path(cache or tempfile.gettempdir()))
        with timed(build, "server_start"):
            server = self.ensure_server(cache)
        served = {}
        with timed(build, "repository"):
            for component, export in exports.components.items():
                name = repo.safe_name(f"{model.name}_{model.dtype}_{component}_onnx_{export.key[:12]}")
                spec = repo.onnx_model(name, export.path, mode="python")
                if self.repository is not None:
                    repo.write_model(self.repository, spec, export.path)
                served[component] = spec
        with timed(build, "model_load"):
            with ThreadPoolExecutor(len(served)) as pool:
                list(pool.map(self.load, [spec.name for spec in served.values()]))
        client = Client(server, protocol)
        pipeline, executors, originals = model.pipeline, {}, {}
        for component, export in exports.components.items():
            original = getattr(pipeline, component)
            runner = _TritonRunner(client, served[component], model.device)
            executors[component] = make_executor(export, original, runner)
            originals[component] = original
            setattr(pipeline, component, executors[component])

        def restore():
            for sub, original in originals.items():
                setattr(pipeline, sub, original)
            client.close()
        info = {"triton": {"protocol": protocol, "served": {c: s.name for c, s in served.items()},
                           "server": "external" if server.external else "local", "url": server.http_url,
                           "log": str(server.log_path) if server.log_path else None,
                           "backend": "python (onnxruntime CPU)", "exporter": exports.exporter,
                           "max_batch_size": {c: s.max_batch_size for c, s in served.items()},
                           "server_start_s": self.server_start_s}}
        return Prepared(pipeline=pipeline, executors=executors, build=build, info=info, on_close=[restore])

    def close(self) -> None:
        with self._lock:
            if self.server is not None:
                self.server.stop()
            self.server = None
            self.loaded.clear()
