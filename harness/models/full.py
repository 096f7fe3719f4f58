"""Full-size architectures with random weights, from the genuine public component configs in configs/.

Weights are created directly on the target device in the requested dtype (torch default device + default dtype
while constructing), so no fp32 copy is ever materialised; random weights cost the same time as real ones.
Tokenizers are offline stand-ins of the right max length (see tokenizers.py).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import torch

from harness.models.tokenizers import clip_tokenizer, t5_tokenizer

FULL_MODELS = ("sd15", "sdxl", "sd35-large", "flux-dev")
_SKIPPED = {"safety_checker", "feature_extractor", "image_encoder"}


def config_dir(name: str) -> Path:
    return Path(str(resources.files("harness.models").joinpath("configs", name)))


@contextmanager
def _default_dtype_and_device(dtype: torch.dtype, device: str):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _tokenizer(folder: Path, class_name: str):
    config = json.loads((folder / "tokenizer_config.json").read_text())
    max_length = int(config.get("model_max_length", 77))
    if max_length > 4096:  # some configs carry a sentinel "unbounded" value
        max_length = 512
    return t5_tokenizer(max_length) if class_name.startswith("T5") else clip_tokenizer(max_length)


def build_full(name: str, dtype: torch.dtype, device: str, seed: int = 0):
    import diffusers
    import transformers

    root = config_dir(name)
    index = json.loads((root / "model_index.json").read_text())
    pipeline_cls = getattr(diffusers, index["_class_name"])
    torch.manual_seed(seed)
    components = {}
    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, list):
            continue
        library, class_name = spec
        folder = root / component
        if component in _SKIPPED or class_name is None:
            components[component] = None
        elif component.startswith("tokenizer"):
            components[component] = _tokenizer(folder, class_name)
        elif component == "scheduler":  # schedulers keep their tables on the CPU: build outside the device context
            cls = getattr(diffusers, class_name)
            components[component] = cls.from_config(cls.load_config(str(folder)))
        else:
            with _default_dtype_and_device(dtype, device):
                if library == "transformers":
                    cls = getattr(transformers, class_name)
                    config = cls.config_class.from_json_file(str(folder / "config.json"))
                    # the config may name its own dtype (transformers honours it): force the requested one
                    components[component] = cls(config).to(dtype).eval()
                else:
                    cls = getattr(diffusers, class_name)
                    components[component] = cls.from_config(cls.load_config(str(folder))).eval()
    if "requires_safety_checker" in index or "safety_checker" in components:
        components["requires_safety_checker"] = False
    return pipeline_cls(**components)
