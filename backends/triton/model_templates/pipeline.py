"""Triton python-backend model: a whole diffusers pipeline (prompt, seed, steps, height, width in -> image out).
Copied verbatim into <repository>/<model>/1/model.py by backends/triton/repository.py.

Dynamic batching hands execute() several requests: those with the same steps, size and guidance run as one
batched pipeline call with one generator per request, so each image is what a single request would give.
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
GUIDANCE = {"StableDiffusionPipeline": 7.5, "StableDiffusionXLPipeline": 5.0, "StableDiffusion3Pipeline": 7.0,
            "FluxPipeline": 3.5}


def scalar(request, name, default=None):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    value = tensor.as_numpy().reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else value.item()


class TritonPythonModel:
    def initialize(self, args):
        import torch
        from diffusers import DiffusionPipeline
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        threads = int(params.get("torch_threads") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        self.torch = torch
        self.pipeline = DiffusionPipeline.from_pretrained(
            params["source"], torch_dtype=getattr(torch, DTYPES[params["dtype"]]), local_files_only=True)
        self.pipeline.set_progress_bar_config(disable=True)
        self.default_guidance = GUIDANCE.get(type(self.pipeline).__name__, 5.0)

    def execute(self, requests):
        groups = {}
        for index, request in enumerate(requests):
            try:
                item = dict(prompt=scalar(request, "PROMPT"), negative=scalar(request, "NEGATIVE_PROMPT", ""),
                            seed=int(scalar(request, "SEED")), steps=int(scalar(request, "STEPS")),
                            height=int(scalar(request, "HEIGHT")), width=int(scalar(request, "WIDTH")),
                            guidance=float(scalar(request, "GUIDANCE", self.default_guidance)))
            except Exception as exc:
                groups.setdefault(("bad", index), []).append((index, exc))
                continue
            key = (item["steps"], item["height"], item["width"], item["guidance"])
            groups.setdefault(key, []).append((index, item))
        responses = [None] * len(requests)
        for key, members in groups.items():
            try:
                if key[0] == "bad":
                    raise members[0][1]
                items = [item for _, item in members]
                generators = [self.torch.Generator("cpu").manual_seed(i["seed"]) for i in items]
                with self.torch.inference_mode():
                    images = self.pipeline(prompt=[i["prompt"] for i in items],
                                           negative_prompt=[i["negative"] for i in items],
                                           num_inference_steps=key[0], height=key[1], width=key[2],
                                           guidance_scale=key[3], generator=generators, output_type="np").images
                for (index, _), image in zip(members, images):
                    out = pb_utils.Tensor("IMAGE", np.asarray(image, dtype=np.float32)[None])
                    responses[index] = pb_utils.InferenceResponse(output_tensors=[out])
            except Exception as exc:  # the client gets the error message, the server keeps serving
                error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
                for index, _ in members:
                    responses[index] = pb_utils.InferenceResponse(output_tensors=[], error=error)
        return responses
