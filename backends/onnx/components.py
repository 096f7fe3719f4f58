"""What each pipeline component takes and returns, as plain named tensors: the interface shared by the ONNX export,
the executors, and any runner (ONNX Runtime, TensorRT, Triton).

A ComponentSpec names a component's inputs (with example tensors taken from the real pipeline's own call), its
outputs, their dynamic axes (batch, height, width, sequence) and what an executor needs to rebuild the outputs the
pipeline expects (ModelOutput class and fields, grouped keyword arguments such as SDXL's added_cond_kwargs). The
wrapper is the same component behind positional tensors, which is what the ONNX exporters trace and what a Triton
python model calls.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

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
    output_shapes: dict[str, list[int]]         # example output shapes (fixed dims of served configs)
    meta: dict[str, Any] = field(default_factory=dict)   # what the executor needs to rebuild outputs

# ---------------------------------------------------------------------------------------------------------------
# wrappers: plain positional tensors in, tensors out (what ONNX can express)

class TextEncoderWrapper(torch.nn.Module):
    def __init__(self, module, hidden_states: bool, fields: list[str]):
        super().__init__()
        self.module, self.hidden_states, self.fields = module, hidden_states, fields

    def forward(self, input_ids):
        out = self.module(input_ids, output_hidden_states=self.hidden_states, return_dict=True)
        tensors = [out[k] for k in self.fields]
        if self.hidden_states:
            tensors.extend(out.hidden_states)
        return tuple(tensors)


class DenoiserWrapper(torch.nn.Module):
    def __init__(self, module, names: list[str], groups: dict[str, list[str]]):
        super().__init__()
        self.module, self.names, self.groups = module, names, groups

    def forward(self, *tensors):
        kwargs = dict(zip(self.names, tensors))
        for group, keys in self.groups.items():        # e.g. SDXL added_cond_kwargs={text_embeds, time_ids}
            kwargs[group] = {k: kwargs.pop(f"{group}.{k}") for k in keys}
        return self.module(**kwargs, return_dict=False)[0]


class EncoderWrapper(torch.nn.Module):
    """A transformers encoder (BERT-style) behind positional tensors: its token inputs in, last_hidden_state out."""

    def __init__(self, module, names: list[str]):
        super().__init__()
        self.module, self.names = module, names

    def forward(self, *tensors):
        return self.module(**dict(zip(self.names, tensors)), return_dict=True).last_hidden_state


class VaeDecodeWrapper(torch.nn.Module):
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
    shapes = {n: list((out[n] if n in fields else out.hidden_states[int(n.split(".")[1])]).shape) for n in names}
    return ComponentSpec(component, "text_encoder", TextEncoderWrapper(module, hidden, fields), {"input_ids": ids},
                         names, axes, shapes, meta={"output_class": f"{type(out).__module__}.{type(out).__qualname__}",
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
    out_channels = getattr(module.config, "out_channels", None) or sample.shape[-1 if sample.ndim == 3 else 1]
    out_shape = [*sample.shape[:2], out_channels] if sample.ndim == 3 else [sample.shape[0], out_channels,
                                                                             *sample.shape[2:]]
    return ComponentSpec(model.denoiser, "denoiser", DenoiserWrapper(module, names, groups), inputs, ["out_sample"],
                         axes, {"out_sample": out_shape}, meta={"groups": groups, "first": first, "in_channels": sample.shape[1]})


def vae_spec(model, case) -> ComponentSpec:
    """The VAE decoder in the dtype the pipeline decodes in: an fp16 SDXL VAE with force_upcast decodes in fp32 in
    the reference pipeline, so the backends' VAE is an fp32 copy too (like with like; meta["dtype"] says which)."""
    vae = getattr(model.pipeline, model.vae)
    dtype = model.vae_decode_dtype
    if dtype != model.dtype:
        from harness.models import TORCH_DTYPES
        vae = copy.deepcopy(vae).to(TORCH_DTYPES[dtype])
    f = model.vae_scale_factor
    latent = torch.randn(2, vae.config.latent_channels, case.height // f, case.width // f,
                         dtype=vae.dtype, device=model.device)
    return ComponentSpec(model.vae, "vae", VaeDecodeWrapper(vae), {"latent": latent}, ["image"],
                         {"latent": {0: "batch", 2: "latent_height", 3: "latent_width"},
                          "image": {0: "batch", 2: "height", 3: "width"}},
                         {"image": [2, vae.config.out_channels, case.height // f * f, case.width // f * f]},
                         meta={"scale_factor": f, "out_channels": vae.config.out_channels, "dtype": dtype})


def encoder_spec(model, case) -> ComponentSpec:
    """A text-embedding model's encoder: the tokenizer's tensors of two sentences at the case's length in, the last
    hidden state out; batch and sequence dynamic."""
    from harness.models.sentences import texts_for
    module = getattr(model.pipeline, model.encoder)
    tokens = model.pipeline.tokenize(texts_for(case.seq)[:2], case.seq)
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokens]
    inputs = {n: tokens[n].to(model.device) for n in names}
    with torch.no_grad():
        hidden = module(**inputs, return_dict=True).last_hidden_state
    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]}
    return ComponentSpec(model.encoder, "encoder", EncoderWrapper(module, names), inputs, ["last_hidden_state"],
                         axes, {"last_hidden_state": list(hidden.shape)}, meta={"inputs": names})


def component_specs(model, case, components: list[str] | None = None) -> list[ComponentSpec]:
    if model.encoder:
        return [encoder_spec(model, case)]
    wanted = components or model.components
    specs = [text_encoder_spec(model, c) for c in model.text_encoders if c in wanted]
    if model.denoiser in wanted:
        specs.append(denoiser_spec(model, case))
    if model.vae in wanted:
        specs.append(vae_spec(model, case))
    return specs
