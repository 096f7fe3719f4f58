"""Executors: drop-in stand-ins for pipeline components that run a component's plain-tensor interface
(backends.onnx.components) through any runner -- an ONNX Runtime session, a TensorRT engine, a Triton client.

A runner is a callable {input name: torch tensor} -> [output tensors in the interface's output order]. The
executors turn the pipeline's keyword call into those feeds (a 0-d timestep expanded to (batch,), grouped keyword
arguments flattened) and the runner's outputs back into what the pipeline expects (the same ModelOutput classes).
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
from typing import Callable

import torch

from backends.base import Executor

def output_symbols(interface) -> dict[str, tuple[str, int]]:
    """Output dims that no input carries, as (input dim, scale): the VAE image is 8x the latent."""
    if interface.role == "vae":
        f = interface.meta["scale_factor"]
        return {"height": ("latent_height", f), "width": ("latent_width", f)}
    return {}


def make_executor(interface, original: torch.nn.Module, runner: Callable) -> torch.nn.Module:
    """The stand-in for `original` that runs `interface` (a ComponentSpec or ComponentExport: anything with role,
    inputs and meta) through `runner`."""
    if interface.role == "text_encoder":
        return TextEncoderExecutor(original, runner, interface.meta)
    if interface.role == "denoiser":
        return DenoiserExecutor(original, runner, list(interface.inputs), interface.meta)
    if interface.role == "encoder":
        return EncoderExecutor(original, runner, list(interface.inputs))
    return VaeExecutor(original, runner, interface.meta.get("dtype"))


def weightless_copy(module: torch.nn.Module) -> torch.nn.Module:
    """The module's structure with every parameter and buffer on the meta device: it answers the attribute reads
    pipelines make (SDXL reads unet.add_embedding.linear_1.in_features) without keeping the weights alive, so a
    backend's memory figures hold only what the backend itself holds."""
    memo = {}
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


class _Executor(Executor):
    """A stand-in: the executor contract, the runner that computes the component, and a weightless copy of the
    original for attribute reads the executor does not answer itself."""

    def __init__(self, original, runner: Callable):
        super().__init__(original)
        self.runner = runner
        self.__dict__["_structure"] = weightless_copy(original)   # outside the module tree

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_structure"], name)

    def to(self, *args, **kwargs):
        # the runner has fixed precision; pipelines that "upcast" the VAE only change what we report
        dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), None)
        if dtype is not None:
            self._dtype = dtype
        return self


def _empty(value) -> bool:
    return value is None or (isinstance(value, dict) and not value)


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
            raise NotImplementedError("the text encoder's interface has no attention mask input")
        # a runner whose wire has no bf16 (Triton's numpy) returns fp32: hand the pipeline the component's dtype
        out = [t.to(self._dtype) if t.is_floating_point() else t for t in self.runner({"input_ids": input_ids})]
        fields = dict(zip(self.fields, out))
        hidden = tuple(out[len(self.fields):]) if self.has_hidden and output_hidden_states else None
        result = self.output_class(**fields, hidden_states=hidden)
        return result if return_dict is not False else result.to_tuple()


class DenoiserExecutor(_Executor):
    """Keyword call like the diffusers UNet/transformer; 0-d timestep expanded to (batch,); returns (sample,).
    An argument the interface does not carry is refused rather than silently dropped (wrong images otherwise)."""

    def __init__(self, original, runner, inputs: list[str], meta: dict):
        super().__init__(original, runner)
        self.input_names, self.groups, self.first = inputs, meta["groups"], meta["first"]
        self._arg_order = list(inspect.signature(original.forward).parameters)   # for positional calls
        self._carried = {name.partition(".")[0] for name in inputs}

    def forward(self, *args, return_dict: bool = True, **kwargs):
        kwargs.update(zip(self._arg_order, args))
        dropped = [k for k, v in kwargs.items() if k not in self._carried and not _empty(v)]
        if dropped:
            raise NotImplementedError(f"the {self.first} interface does not carry argument(s) {', '.join(dropped)}")
        sample = kwargs[self.first]
        feeds = {}
        for name in self.input_names:
            group, _, key = name.partition(".")
            value = kwargs.get(group) if key else kwargs.get(name)
            if key:
                value = (value or {}).get(key)
            if value is None:
                raise ValueError(f"{name} is an input of the interface but the pipeline did not pass it")
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


class EncoderExecutor(_Executor):
    """A transformers encoder's call (input_ids, attention_mask, token_type_ids) -> BaseModelOutput(last_hidden_state)."""

    def __init__(self, original, runner, inputs: list[str]):
        super().__init__(original, runner)
        self.input_names = inputs

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, return_dict=True, **kwargs):
        dropped = [k for k, v in kwargs.items() if not _empty(v)]
        if dropped:
            raise NotImplementedError(f"the encoder interface does not carry argument(s) {', '.join(dropped)}")
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        if given["attention_mask"] is None:
            given["attention_mask"] = torch.ones_like(input_ids)
        if given["token_type_ids"] is None:
            given["token_type_ids"] = torch.zeros_like(input_ids)
        hidden = self.runner({n: given[n] for n in self.input_names})[0]
        hidden = hidden.to(self._dtype) if hidden.is_floating_point() else hidden
        from transformers.modeling_outputs import BaseModelOutput
        result = BaseModelOutput(last_hidden_state=hidden)
        return result if return_dict else result.to_tuple()


class VaeExecutor(_Executor):
    """`.decode(latents, return_dict=False) -> (image,)`; the encoder is not part of the interface (text-to-image).
    `compute_dtype`: the precision its runner decodes in ("fp32" for SDXL's upcast VAE, whatever the pipeline
    casts this stand-in to), recorded beside the reference's."""

    def __init__(self, original, runner, compute_dtype: str | None = None):
        super().__init__(original, runner)
        self.compute_dtype = compute_dtype

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
        return torch.nn.Linear(1, 1, bias=False, dtype=self._dtype, device="meta")
