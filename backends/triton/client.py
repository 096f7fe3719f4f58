"""Talking to the server: sync and asyncio clients (HTTP or gRPC) and whole-pipeline requests. (The executors that
stand in for pipeline components are backends.onnx's, with backend.TritonRunner as their runner.)

Every call has a timeout, and a failure while the server is gone raises TritonServerError carrying the server's
log tail -- never a hang. The asyncio client awaits the aio transports only (no blocking call in the event loop).
"""
from __future__ import annotations

import importlib

import numpy as np

from backends.triton.server import TritonServerError

PROTOCOLS = ("http", "grpc")
NUMPY_TO_TRITON = {np.dtype("float32"): "FP32", np.dtype("float16"): "FP16", np.dtype("int64"): "INT64",
                   np.dtype("int32"): "INT32", np.dtype("object"): "BYTES", np.dtype("uint8"): "UINT8",
                   np.dtype("bool"): "BOOL"}


def _module(protocol: str, aio: bool = False):
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    return importlib.import_module(f"tritonclient.{protocol}" + (".aio" if aio else ""))


def _inputs(module, arrays: dict[str, np.ndarray]) -> list:
    result = []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        item = module.InferInput(name, list(array.shape), NUMPY_TO_TRITON[array.dtype])
        item.set_data_from_numpy(array)
        result.append(item)
    return result


class Client:
    """Blocking inference over HTTP or gRPC. One per thread (tritonclient's sync clients are not thread-safe)."""

    def __init__(self, server, protocol: str = "http", timeout_s: float = 120.0):
        self.server, self.protocol, self.timeout_s = server, protocol, timeout_s
        self.module = _module(protocol)
        if protocol == "http":
            self.raw = self.module.InferenceServerClient(server.http_url, connection_timeout=timeout_s,
                                                         network_timeout=timeout_s)
        else:
            self.raw = self.module.InferenceServerClient(server.grpc_url)

    def infer(self, model: str, arrays: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        requested = [self.module.InferRequestedOutput(n) for n in outputs]
        try:
            if self.protocol == "grpc":
                result = self.raw.infer(model, _inputs(self.module, arrays), outputs=requested,
                                        client_timeout=self.timeout_s)
            else:
                result = self.raw.infer(model, _inputs(self.module, arrays), outputs=requested)
        except Exception as exc:
            raise failure(self.server, f"inference on {model} over {self.protocol} failed", exc) from exc
        return {n: result.as_numpy(n) for n in outputs}

    def close(self) -> None:
        try:
            self.raw.close()
        except Exception:
            pass


class AsyncClient:
    """asyncio inference over HTTP (aiohttp) or gRPC (grpc.aio). Create it inside the running event loop."""

    def __init__(self, server, protocol: str = "http", timeout_s: float = 120.0):
        self.server, self.protocol, self.timeout_s = server, protocol, timeout_s
        self.module = _module(protocol, aio=True)
        if protocol == "http":
            self.raw = self.module.InferenceServerClient(server.http_url, conn_timeout=timeout_s)
        else:
            self.raw = self.module.InferenceServerClient(server.grpc_url)

    async def infer(self, model: str, arrays: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        requested = [self.module.InferRequestedOutput(n) for n in outputs]
        try:
            if self.protocol == "grpc":
                result = await self.raw.infer(model, _inputs(self.module, arrays), outputs=requested,
                                              client_timeout=self.timeout_s)
            else:
                result = await self.raw.infer(model, _inputs(self.module, arrays), outputs=requested)
        except Exception as exc:
            raise failure(self.server, f"inference on {model} over {self.protocol} (asyncio) failed", exc) from exc
        return {n: result.as_numpy(n) for n in outputs}

    async def close(self) -> None:
        await self.raw.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


_CONNECTION_LOST = ("connection reset", "connection refused", "disconnected", "broken pipe", "eof occurred",
                    "connection aborted", "socket closed")


def failure(server, summary: str, exc: BaseException) -> Exception:
    """The server's own message: from the error response, and the log tail when the server is gone."""
    # tritonclient's InferenceServerException carries the server's message in .message()
    message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    message = str(message or "").strip()
    # a connection dropped by a dying server can arrive before its process has exited: give it a moment
    dropped = any(k in f"{message} {exc!r}".lower() for k in _CONNECTION_LOST)
    if server is not None and not server.alive(grace_s=2.0 if dropped else 0.0):
        return server.error(f"{summary}: tritonserver is gone ({message.splitlines()[0] if message else exc!r})")
    return TritonServerError(f"{summary}: {message or type(exc).__name__}")


def pipeline_request(prompt: str, seed: int, steps: int, height: int, width: int,
                     negative_prompt: str | None = None, guidance: float | None = None) -> dict[str, np.ndarray]:
    """Inputs of one whole-pipeline request (batch dimension 1)."""
    arrays = {"PROMPT": np.array([[prompt.encode()]], dtype=object), "SEED": np.array([[seed]], dtype=np.int64),
              "STEPS": np.array([[steps]], dtype=np.int32), "HEIGHT": np.array([[height]], dtype=np.int32),
              "WIDTH": np.array([[width]], dtype=np.int32)}
    if negative_prompt is not None:
        arrays["NEGATIVE_PROMPT"] = np.array([[negative_prompt.encode()]], dtype=object)
    if guidance is not None:
        arrays["GUIDANCE"] = np.array([[guidance]], dtype=np.float32)
    return arrays
