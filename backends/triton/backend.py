"""TritonBackend: pipeline components served by a real Triton Inference Server, called with tritonclient.

prepare() writes the model repository, starts one local tritonserver per session and loads the component models
from it -- or, with --triton-url (DIFFBENCH_TRITON_URL), sends them to that server through Triton's model-load API
(the config and the model files, weights included, in the request) and unloads them at close() -- then swaps
executors into the pipeline. Variants pick the protocol (http default, grpc)
and what is served:
  "" / http / grpc      the denoiser, run with torch in the python backend (from_pretrained of the model folder)
  http-all / grpc-all   + the text encoders and the VAE decoder
  onnx / grpc-onnx      every component as its exported ONNX graph (backends.onnx export cache), run by ONNX
                        Runtime in the python backend
Either way a served component takes and returns its interface (backends.onnx.components): the executors are
backends.onnx's, with Triton as their runner.
"""
from __future__ import annotations

import math
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from backends.base import Backend, Prepared, Support, module_available, timed
from backends.triton import repository as repo
from backends.triton import served as user_served
from backends.onnx.components import component_specs
from backends.onnx.executors import make_executor
from backends.onnx.export import export_model
from backends.triton.client import Client, failure
from backends.triton.server import ExternalServer, TritonServer, missing_reason
from harness.models.sentences import texts_for

URL_ENV = "DIFFBENCH_TRITON_URL"
GRPC_URL_ENV = "DIFFBENCH_TRITON_GRPC_URL"         # --triton-grpc-url
METRICS_URL_ENV = "DIFFBENCH_TRITON_METRICS_URL"   # --triton-metrics-url
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


def server_version(server) -> str | None:
    """The server's own name and version (server metadata), as the record names what was measured."""
    import tritonclient.http as httpclient
    client = httpclient.InferenceServerClient(server.http_url, connection_timeout=10, network_timeout=10)
    try:
        meta = client.get_server_metadata()
        return f"{meta.get('name', 'triton')} {meta.get('version', '?')}"
    except Exception:
        return None
    finally:
        client.close()


def _prune(base: Path, keep: int) -> None:
    """Keep the newest `keep` session folders (repository + server log) under .cache/triton."""
    import shutil
    sessions = sorted((p for p in base.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in sessions[:-keep] if keep else sessions:
        shutil.rmtree(old, ignore_errors=True)


def load_model(server, name: str, timeout_s: float = LOAD_TIMEOUT_S, request: tuple[str, dict] | None = None) -> None:
    """Load one model (explicit model control) over gRPC: thread-safe and with a real client timeout, so loads
    can run in parallel threads (tritonclient's sync HTTP client must not be shared or used that way).
    `request`: (config JSON, {"file:<path>": bytes}) for a server that does not see our repository."""
    import tritonclient.grpc as grpcclient
    client = grpcclient.InferenceServerClient(server.grpc_url)
    config, files = request or (None, None)
    try:
        client.load_model(name, config=config, files=files, client_timeout=timeout_s)
    except Exception as exc:
        raise failure(server, f"tritonserver {server.http_url} refused to load model {name}"
                      f"{refusal_reason(exc)}", exc) from exc
    finally:
        client.close()


def refusal_reason(exc: BaseException) -> str:
    """Why a server refuses a load, in words, for the refusals a user can fix on the server's side."""
    import re
    message = str(exc.message() if callable(getattr(exc, "message", None)) else exc)
    if "explicit model load / unload is not allowed" in message:
        return " (its model control mode is not explicit: start it with --model-control-mode=explicit)"
    lacking = re.search(r"unable to find backend library for backend '([^']+)'", message)
    if lacking:
        return f" (the server has no {lacking.group(1)} backend)"
    return ""


def unload_models(server, names) -> None:
    """Unload what we loaded, and wait until it is gone: nothing of ours stays loaded on someone's server."""
    import tritonclient.grpc as grpcclient
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for name in names:
            client.unload_model(name, client_timeout=60)
        deadline = time.monotonic() + 60
        while any(client.is_model_ready(n) for n in names) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        client.close()


class TritonBackend(Backend):
    name = "triton"
    workloads = ("text-to-image", "text-embedding")
    options = ("http", "grpc", "http-all", "grpc-all", "onnx", "grpc-onnx")
    exclusive = (options,)   # each names a protocol and what is served
    extra = "triton"
    packages = ("tritonclient",)
    description = "Triton Inference Server (python backend, torch) via tritonclient HTTP/gRPC"

    def __init__(self):
        self.server: TritonServer | ExternalServer | None = None
        self.repository: Path | None = None
        self.loaded: set[str] = set()
        self.requests: dict[str, tuple[str, dict]] = {}   # external server: what its model-load requests carry
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
        if os.environ.get(user_served.MODEL_ENV):
            if case.workload != "text-embedding":
                return Support.no("--triton-model stands in for a text-embedding encoder; text-to-image models are "
                                  "served as diffbench writes them (drop --triton-model)")
            if case.variant not in ("", "http", "grpc"):
                return Support.no(f"variant {case.variant}: --triton-model serves the model as it is; only the "
                                  "protocol (http, grpc) can be chosen")
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
            base = Path(cache or tempfile.gettempdir()) / "triton"
            base.mkdir(parents=True, exist_ok=True)
            _prune(base, keep=10)
            session = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=base))
            # the repository: served by the local server, or where the load requests to an external one are staged
            self.repository = session / "repository"
            self.repository.mkdir()
            url = os.environ.get(URL_ENV)
            if url:
                self.server = ExternalServer(url, os.environ.get(GRPC_URL_ENV), os.environ.get(METRICS_URL_ENV))
            else:
                log_dir = Path(os.environ.get(LOG_DIR_ENV) or session)
                self.server = TritonServer(self.repository, log_dir).start()
            self.server_start_s = self.server.start_s
            return self.server

    def load(self, name: str) -> None:
        """Load a model by name (explicit model control); a failure carries the server's message."""
        if name in self.loaded:
            return
        load_model(self.server, name, request=self.requests.pop(name, None))
        with self._lock:
            self.loaded.add(name)

    # -- prepare --------------------------------------------------------------------------------------------------
    def prepare(self, model, case, cache) -> Prepared:
        if os.environ.get(user_served.MODEL_ENV):
            return self.prepare_served(model, case, cache, os.environ[user_served.MODEL_ENV])
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
        shipped = server.external   # the server never saw our files: the weights travel in the load request
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
                else:   # served in the dtype the pipeline runs it in (SDXL's VAE: fp32, vae_spec)
                    dtype = interface.meta.get("dtype", model.dtype)
                    name = repo.safe_name(f"{model.name}_{dtype}_{component}_{interface.role}")
                    source = repo.SHIPPED_SOURCE if shipped else model.source
                    spec, model_file = repo.interface_model(name, interface, dtype, source=source,
                                                            subfolder=component, device=str(model.device),
                                                            threads=threads, max_batch_size=max_batch), None
                folder = repo.write_model(self.repository, spec, model_file)
                if shipped and spec.name not in self.loaded:
                    self.requests[spec.name] = repo.load_request(
                        folder, source=None if onnx else model.source,
                        subfolder="" if model.encoder else component)
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
            "served_versions": ["1"],   # repository.write_model writes each model as version 1
            "server": "external" if server.external else "local", "url": server.http_url,
            "grpc_url": server.grpc_url, "metrics_url": server.metrics_url,
            "server_version": server_version(server),
            "delivery": "model-load request (config and files, weights included)" if shipped else "repository",
            "log": str(server.log_path) if server.log_path else None,
            "repository": str(self.repository) if self.repository else None,
            "server_start_s": self.server_start_s,
            "backend": "python (onnxruntime CPU)" if onnx else "python (torch)",
            "wire_dtype": specs[0].inputs[0].dtype,
            "max_batch_size": {c: spec.max_batch_size for c, (_, spec) in served.items()},
            "instances": {c: spec.instances for c, (_, spec) in served.items()},
            "threads": {"model_threads": threads, "process_cores": repo.process_cores(),
                        "client_torch_threads": torch.get_num_threads(),
                        "ort_spinning": False if onnx else None,
                        "applies_to": "external server (sent with the model)" if shipped else "local server"},
        }}
        if onnx:
            info["triton"]["exporter"] = exports.exporter
        return Prepared(pipeline=pipeline, executors=executors, build=build, info=info, on_close=[client.close],
                        weights_outside_torch=True)

    def prepare_served(self, model, case, cache, name: str) -> Prepared:
        """The user's own served model (--triton-model) as the case's encoder: nothing written, loaded or
        unloaded; its interface read from the server and fitted to the encoder's (backends.triton.served)."""
        build: dict[str, float] = {}
        with timed(build, "server_start"):
            server = self.ensure_server(cache)
        (interface,) = component_specs(model, case, [model.encoder])
        metadata, config = user_served.describe(server, name)
        fitted = user_served.fit_encoder(metadata, config, list(interface.inputs))
        user_served.check_batch(fitted, case.batch)
        protocol = protocol_of(case.variant)
        client = Client(server, protocol)
        runner = user_served.RenamingRunner(TritonRunner(client, fitted.served, model.device), fitted)
        executor = make_executor(interface, getattr(model.pipeline, model.encoder), runner)
        setattr(model.pipeline, model.encoder, executor)
        info = {"triton": {
            "protocol": protocol, "served": {model.encoder: name}, "server": "external", "url": server.http_url,
            "grpc_url": server.grpc_url, "metrics_url": server.metrics_url, "server_version": server_version(server),
            "delivery": "the server's own model (--triton-model)", **fitted.description}}
        unjudged = {model.encoder: f"{name} returns pooled embeddings, not the hidden state: its embeddings and "
                                   "ranking are judged"} if fitted.pooled else {}
        before = user_served.statistics(server, name)   # the case's calls are what is counted from here
        # the sweep's requests: the case's `batch` sentences of its set, rotating (the cycle of starting sentences
        # repeats after len / gcd(len, batch) requests), tokenized at its length here, outside the sweep's clocks
        texts = texts_for(case.seq)
        requests = [fitted.arrays(model.pipeline.tokenize([texts[(i * case.batch + k) % len(texts)]
                                                           for k in range(case.batch)], case.seq))
                    for i in range(len(texts) // math.gcd(len(texts), case.batch))]

        def request(i: int) -> dict:
            return requests[i % len(requests)]

        def after_measure() -> dict:
            serving = user_served.serving(server, fitted, request, protocol, case.batch, before, runner.requests,
                                          user_served.sweep_levels())
            # the version the case's calls reached, beside the versions the server had ready
            return {"serving": serving, "triton": {**info["triton"], "measured_version": serving["version"]}}

        return Prepared(pipeline=model.pipeline, executors={model.encoder: executor}, build=build, info=info,
                        on_close=[client.close], unjudged_components=unjudged, after_measure=after_measure)

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
            if self.server is not None and self.server.external and self.loaded:
                try:
                    unload_models(self.server, sorted(self.loaded))
                except Exception as exc:   # the run's results stand; say what may be left on the server
                    import warnings
                    warnings.warn(f"could not unload {sorted(self.loaded)} from {self.server.http_url}: {exc}")
            if self.server is not None:
                self.server.stop()
            self.server = None
            self.loaded.clear()
