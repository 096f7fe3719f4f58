"""Triton python-backend model: one diffusers pipeline component (text encoder, denoiser or VAE decoder) run with
torch. Copied verbatim into <repository>/<model>/1/model.py by backends/triton/repository.py; everything
model-specific comes from the config parameters (source folder, subfolder, role, dtype, and the component's
interface: the input names in order, their dtypes, grouped keyword arguments, the text encoder's output fields).
The inputs and outputs are those of the component's ONNX export, so one executor family calls both. This file runs
in the server's own interpreter and cannot import diffbench: the few lines that rebuild the component's keyword
call repeat what backends/onnx/components.py's wrappers do.

Dynamic batching hands execute() several requests at once: inputs of the same shape are concatenated along the
batch dimension, run in one call, and the output is split back per request.
"""
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
LIBRARIES = ("diffusers", "transformers")


def load_component(source, subfolder, dtype, role):
    import importlib

    import torch
    if role == "encoder":   # a sentence-embedding model's folder holds the encoder itself (no model_index.json)
        from transformers import AutoModel
        kwargs = dict(torch_dtype=getattr(torch, DTYPES[dtype]), use_safetensors=True)
        try:
            module = AutoModel.from_pretrained(source, add_pooling_layer=False, **kwargs)
        except TypeError:
            module = AutoModel.from_pretrained(source, **kwargs)
        return module.eval()
    with open(os.path.join(source, "model_index.json")) as fh:
        library, cls_name = json.load(fh)[subfolder]
    if library not in LIBRARIES:
        raise ValueError(f"component {subfolder}: library {library!r} is not one of {LIBRARIES}")
    cls = getattr(importlib.import_module(library), cls_name)
    module = cls.from_pretrained(source, subfolder=subfolder, torch_dtype=getattr(torch, DTYPES[dtype]))
    return module.eval()


class TritonPythonModel:
    def initialize(self, args):
        import torch
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        threads = int(params.get("torch_threads") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        self.torch = torch
        self.role, self.interface = params["role"], json.loads(params["interface"])
        self.dtype = getattr(torch, DTYPES[params["dtype"]])
        self.device = torch.device(params.get("device") or "cpu")
        # a relative source was sent with the model (model-load API): it lies inside this model's folder
        source = os.path.join(args["model_repository"], params["source"])
        self.module = load_component(source, params["subfolder"], params["dtype"], self.role).to(self.device)
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]]

    def execute(self, requests):
        torch = self.torch
        # group requests whose inputs have the same shapes (beyond batch): one torch call per group
        groups = {}
        for index, request in enumerate(requests):
            arrays = {}
            for name in self.inputs:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    arrays[name] = tensor.as_numpy()
            key = tuple((n, a.shape[1:]) for n, a in sorted(arrays.items()))
            groups.setdefault(key, []).append((index, arrays))
        responses = [None] * len(requests)
        for members in groups.values():
            try:
                sizes = [next(iter(a.values())).shape[0] for _, a in members]
                batched = {n: np.concatenate([a[n] for _, a in members]) for n in members[0][1]}
                with torch.inference_mode():
                    outputs = self.run(batched)
                start = 0
                for (index, _), size in zip(members, sizes):
                    tensors = [pb_utils.Tensor(name, out[start:start + size].astype(np_dtype))
                               for (name, np_dtype), out in zip(self.outputs, outputs)]
                    responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
                    start += size
            except Exception as exc:  # the client gets the error message, the server keeps serving
                error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
                for index, _ in members:
                    responses[index] = pb_utils.InferenceResponse(output_tensors=[], error=error)
        return responses

    def tensor(self, array, name):
        """An input as the torch tensor of the interface's dtype (bf16 arrives as FP32; scalars as [batch, 1])."""
        if name in self.interface["scalars"]:
            array = array.reshape(-1)
        dtype = getattr(self.torch, self.interface["input_dtypes"][name])
        return self.torch.from_numpy(np.ascontiguousarray(array)).to(self.device, dtype)

    def run(self, x):
        """Component call -> list of numpy outputs in config order."""
        m = self.module
        if self.role == "denoiser":
            kwargs = {}
            for name in self.interface["inputs"]:
                group, _, key = name.partition(".")   # e.g. SDXL's added_cond_kwargs.text_embeds
                if key:
                    kwargs.setdefault(group, {})[key] = self.tensor(x[name], name)
                else:
                    kwargs[name] = self.tensor(x[name], name)
            outs = [m(**kwargs, return_dict=False)[0]]
        elif self.role == "text_encoder":
            hidden = self.interface["hidden_states"]
            result = m(self.tensor(x["input_ids"], "input_ids"), output_hidden_states=hidden, return_dict=True)
            outs = [result[f] for f in self.interface["fields"]] + (list(result.hidden_states) if hidden else [])
        elif self.role == "encoder":
            tokens = {name: self.tensor(x[name], name) for name in self.interface["inputs"]}
            outs = [m(**tokens, return_dict=True).last_hidden_state]
        elif self.role == "vae":
            outs = [m.decode(self.tensor(x["latent"], "latent"), return_dict=False)[0]]
        else:
            raise ValueError(f"unknown role {self.role!r}")
        return [o.float().cpu().numpy() for o in outs]
