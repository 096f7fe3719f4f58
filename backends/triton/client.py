"""Talking to the server: sync and asyncio clients (HTTP or gRPC), and the executors that stand in for pipeline
components.

Every call has a timeout, and a failure while the server is gone raises TritonServerError carrying the server's
log tail -- never a hang. The asyncio client awaits the aio transports only (no blocking call in the event loop).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any

import numpy as np
import torch

from backends.base import Executor
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


# -- executors: drop-in stand-ins for pipeline components ----------------------------------------------------------
class _Executor(Executor):
    """A served stand-in. The original is kept outside the module tree only to answer attribute reads the pipeline
    makes (e.g. SDXL's add_embedding)."""

    def __init__(self, original: torch.nn.Module, client: Client, model_name: str, wire_dtype: str):
        super().__init__(original)
        self.__dict__["_original"] = original
        self.client, self.model_name = client, model_name
        self.wire = np.dtype({"FP32": "float32", "FP16": "float16"}[wire_dtype])
        self._signature = inspect.signature(original.forward)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_original"], name)

    def _bind(self, args, kwargs) -> dict[str, Any]:
        bound = self._signature.bind(*args, **kwargs)
        return dict(bound.arguments)

    def _array(self, tensor: torch.Tensor) -> np.ndarray:
        return tensor.detach().to("cpu", torch.float32).numpy().astype(self.wire, copy=False)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(array)).to(device=self._device, dtype=self._dtype)

    @staticmethod
    def _reject(arguments: dict, allowed: set[str]) -> None:
        extra = [k for k, v in arguments.items() if k not in allowed and v is not None and k != "return_dict"]
        if extra:
            raise NotImplementedError(f"triton executor does not forward argument(s) {', '.join(extra)}")


def _timestep(t, batch: int) -> np.ndarray:
    """The pipeline passes a 0-d timestep (or a float): the served model takes one per sample, shape (batch, 1)."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
    return t.expand(batch).reshape(batch, 1).cpu().numpy() if t.numel() == 1 else t.reshape(batch, 1).cpu().numpy()


class DenoiserExecutor(_Executor):
    """UNet2DConditionModel (sd, sdxl) or SD3Transformer2DModel (sd3) served by Triton."""

    def __init__(self, original, client, model_name, wire_dtype, model_kind: str):
        super().__init__(original, client, model_name, wire_dtype)
        self.model_kind = model_kind

    def forward(self, *args, **kwargs):
        a = self._bind(args, kwargs)
        if self.model_kind in ("sd", "sdxl"):
            sample = a["sample"]
            arrays = {"sample": self._array(sample), "timestep": _timestep(a["timestep"], sample.shape[0]),
                      "encoder_hidden_states": self._array(a["encoder_hidden_states"])}
            allowed = {"sample", "timestep", "encoder_hidden_states"}
            added = a.get("added_cond_kwargs")
            if self.model_kind == "sdxl":
                arrays["text_embeds"] = self._array(added["text_embeds"])
                arrays["time_ids"] = self._array(added["time_ids"])
                allowed.add("added_cond_kwargs")
            elif added:
                raise NotImplementedError("triton executor does not forward added_cond_kwargs for sd")
        else:
            hidden = a["hidden_states"]
            arrays = {"hidden_states": self._array(hidden), "timestep": _timestep(a["timestep"], hidden.shape[0]),
                      "encoder_hidden_states": self._array(a["encoder_hidden_states"]),
                      "pooled_projections": self._array(a["pooled_projections"])}
            allowed = set(arrays)
        self._reject({k: v for k, v in a.items() if k not in ("args", "kwargs")}, allowed)
        out = self._tensor(self.client.infer(self.model_name, arrays, ["out_sample"])["out_sample"])
        if a.get("return_dict", True):
            return self._output_class()(sample=out)
        return (out,)

    def _output_class(self):
        if self.model_kind in ("sd", "sdxl"):
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
            return UNet2DConditionOutput
        from diffusers.models.modeling_outputs import Transformer2DModelOutput
        return Transformer2DModelOutput


class TextEncoderExecutor(_Executor):
    """CLIPTextModel (sd): input_ids -> last_hidden_state, pooler_output."""

    def forward(self, *args, **kwargs):
        a = self._bind(args, kwargs)
        self._reject(a, {"input_ids"})
        ids = a["input_ids"].detach().to("cpu", torch.int64).numpy()
        out = self.client.infer(self.model_name, {"input_ids": ids}, ["last_hidden_state", "pooler_output"])
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        result = BaseModelOutputWithPooling(last_hidden_state=self._tensor(out["last_hidden_state"]),
                                            pooler_output=self._tensor(out["pooler_output"]))
        return result if a.get("return_dict") is not False else result.to_tuple()


class VaeDecoderExecutor(_Executor):
    """AutoencoderKL whose decode() runs on Triton (encode is not served)."""

    def __init__(self, original, client, model_name, wire_dtype):
        super().__init__(original, client, model_name, wire_dtype)
        self._signature = inspect.signature(original.decode)

    def decode(self, *args, **kwargs):
        a = self._bind(args, kwargs)
        self._reject(a, {"z", "return_dict", "generator"})  # AutoencoderKL ignores generator
        out = self._tensor(self.client.infer(self.model_name, {"latent": self._array(a["z"])}, ["image"])["image"])
        if a.get("return_dict", True):
            from diffusers.models.autoencoders.vae import DecoderOutput
            return DecoderOutput(sample=out)
        return (out,)

    def forward(self, *args, **kwargs):
        raise NotImplementedError("the served VAE only decodes")
