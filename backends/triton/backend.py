"""TritonBackend: pipeline components served by a real Triton Inference Server, called with tritonclient.

prepare() writes the model repository, starts one local tritonserver per session (or uses DIFFBENCH_TRITON_URL),
loads the component models and swaps executors into the pipeline. Variants pick the protocol (http default, grpc)
and what is served:
  "" / http / grpc      the denoiser, run with torch in the python backend (from_pretrained of the model folder)
  http-all / grpc-all   + the text encoders and the VAE decoder
  onnx / grpc-onnx      every component as its exported ONNX graph (backends.onnx export cache), run by ONNX
                        Runtime in the python backend
Either way a served component takes and returns its interface (backends.onnx.components): the executors are
backends.onnx's, with Triton as their runner.
"""
from __future__ import annotations

import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from backends.base import Backend, Prepared, Support, module_available, timed
from backends.triton import repository as repo
from backends.onnx.components import component_specs
from backends.onnx.executors import make_executor
from backends.onnx.export import export_model
from backends.triton.client import Client, failure
from backends.triton.server import ExternalServer, TritonServer, missing_reason

URL_ENV = "DIFFBENCH_TRITON_URL"
LOG_DIR_ENV = "DIFFBENCH_TRITON_LOG_DIR"
LOAD_TIMEOUT_S = 300.0


def served_components(model, variant: str) -> list[str]:
    if model.encoder:                  # text-embedding: the encoder is the one component
        return [model.encoder]
    return model.components if variant.endswith("all") else [model.denoiser]


def protocol_of(variant: str) -> str:
    return "grpc" if variant.startswith("grpc") else "http"


class TritonRunner:
    """backends.onnx's runner contract: {input name: tensor} -> [output tensors in the interface's order]."""

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
            tensor = tensor.detach().cpu()
            if tensor.dtype == torch.bfloat16:   # numpy has no bfloat16: it travels as FP32
                tensor = tensor.float()
            array = tensor.numpy().astype(repo.NUMPY_DTYPE[self.inputs[name].dtype], copy=False)
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
    workloads = ("text-to-image", "text-embedding")
    options = ("http", "grpc", "http-all", "grpc-all", "onnx", "grpc-onnx")
    exclusive = (options,)   # each names a protocol and what is served
    extra = "triton"
    description = "Triton Inference Server (python backend, torch) via tritonclient HTTP/gRPC"

    def __init__(self):
        self.server: TritonServer | ExternalServer | None = None
        self.repository: Path | None = None
        self.loaded: set[str] = set()
        self.server_start_s: float | None = None
        self.models_of: dict[str, set[str]] = {}    # case id -> the served models it calls
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
        protocol, onnx = protocol_of(case.variant), case.variant.endswith("onnx")
        build: dict[str, float] = {}
        pipeline = model.pipeline
        if onnx:   # every component's exported graph (the shared export cache), run by ORT in the python backend
            with timed(build, "export"):
                exports = export_model(model, case, Path(cache or tempfile.gettempdir()))
            interfaces = list(exports.components.values())
        else:      # the torch components themselves, with the same interface as their exports
            interfaces = component_specs(model, case, served_components(model, case.variant))
        with timed(build, "server_start"):
            server = self.ensure_server(cache)
        # the client blocks while the server computes: each served model gets one instance and every core of
        # this process (the local server inherits its affinity); nothing else computes meanwhile
        threads = repo.model_threads(None)
        # a request carries the whole pipeline batch (twice the case's under classifier-free guidance); an
        # embedding encoder's dynamic batching may gather up to 128 single sentences
        max_batch = max(128, case.batch) if model.encoder else max(8, 2 * case.batch)
        served = {}
        with timed(build, "repository"):
            for interface in interfaces:
                component = interface.component
                if onnx:
                    name = repo.safe_name(f"{model.name}_{model.dtype}_{component}_onnx_{interface.key[:12]}")
                    spec, model_file = repo.onnx_model(name, interface.path, mode="python", max_batch_size=max_batch,
                                                       threads=threads), interface.path
                else:
                    name = repo.safe_name(f"{model.name}_{model.dtype}_{component}_{interface.role}")
                    spec, model_file = repo.interface_model(name, interface, model.dtype, source=model.source,
                                                            subfolder=component, device=str(model.device),
                                                            threads=threads, max_batch_size=max_batch), None
                if self.repository is not None:
                    repo.write_model(self.repository, spec, model_file)
                served[component] = (interface, spec)
        with timed(build, "model_load"):
            # in parallel: each python model spends seconds importing torch in its own stub process
            with ThreadPoolExecutor(len(served)) as pool:
                list(pool.map(self.load, [spec.name for _, spec in served.values()]))
        client = Client(server, protocol)
        executors = {}
        for component, (interface, spec) in served.items():
            runner = TritonRunner(client, spec, model.device)
            executors[component] = make_executor(interface, getattr(pipeline, component), runner)
            setattr(pipeline, component, executors[component])
        specs = [spec for _, spec in served.values()]
        self.models_of[case.id] = {spec.name for spec in specs}
        info = {"triton": {
            "protocol": protocol, "served": {c: spec.name for c, (_, spec) in served.items()},
            "server": "external" if server.external else "local", "url": server.http_url,
            "grpc_url": server.grpc_url, "log": str(server.log_path) if server.log_path else None,
            "repository": str(self.repository) if self.repository else None,
            "server_start_s": self.server_start_s,
            "backend": "python (onnxruntime CPU)" if onnx else "python (torch)",
            "wire_dtype": specs[0].inputs[0].dtype,
            "max_batch_size": {c: spec.max_batch_size for c, (_, spec) in served.items()},
            "instances": {c: spec.instances for c, (_, spec) in served.items()},
            "threads": {"model_threads": threads, "process_cores": repo.process_cores(),
                        "client_torch_threads": torch.get_num_threads(),
                        "ort_spinning": False if onnx else None,
                        "applies_to": "local server" if self.repository is not None else
                                      "not applied: external server's own configuration"},
        }}
        if onnx:
            info["triton"]["exporter"] = exports.exporter
        return Prepared(pipeline=pipeline, executors=executors, build=build, info=info, on_close=[client.close])

    def foreign_processes(self, case) -> dict[int, str]:
        """The shared local server belongs to the triton cases: to another backend's case, the whole server (its
        stubs are its children); to a triton case, the stubs of models it does not call (loaded by earlier
        cases; before its own prepare(), every stub)."""
        server = self.server
        if server is None or server.external or not server.alive():
            return {}
        if case.backend != self.name:
            return {server.proc.pid: "tritonserver shared by the triton cases"}
        mine = self.models_of.get(case.id, set())
        return {pid: "tritonserver stubs of other cases' models" for pid, model in server.stubs().items()
                if model not in mine}

    def close(self) -> None:
        with self._lock:
            if self.server is not None:
                self.server.stop()
            self.server = None
            self.loaded.clear()
