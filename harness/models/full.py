"""Full-size architectures with random weights, from the genuine public component configs in configs/.

Weights are created directly on the target device in the requested dtype (torch default device + default dtype
while constructing), so no fp32 copy is ever materialised; random weights cost the same time as real ones.
Tokenizers are offline stand-ins of the right max length (see tokenizers.py).

On the meta device a model costs no memory and no time: `run_on_meta` builds one there and runs its text encoders,
its denoiser and its VAE decoder once with the real input shapes of a full-size image, which proves the builder and
every shape of models that do not fit on the machine at hand (sd35-large and flux-dev need 28-34 GB in bf16).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import torch

from harness.models.tokenizers import clip_tokenizer, t5_tokenizer

FULL_MODELS = ("sd15", "sdxl", "sd35-large", "flux-dev")
# Parameters + buffers of all components, counted on the meta device (tests/test_full_models.py checks them), so that
# the memory a model needs is known before it is built.
ELEMENTS = {"sd15": 1_066_235_384, "sdxl": 3_468_838_021, "sd35-large": 13_810_721_405,
            "flux-dev": 16_870_599_216}
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


def weights_bytes(name: str, dtype: torch.dtype) -> int:
    """Memory of a full-size model's weights in `dtype` (activations come on top)."""
    return ELEMENTS[name] * torch.empty((), dtype=dtype).element_size()


def run_on_meta(name: str, height: int = 1024, width: int = 1024, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Build `name` on the meta device and run, with the inputs the pipeline itself prepares for a height x width
    image, its text encoders (through the pipeline's encode_prompt), its denoiser once and its VAE decoder once.
    Returns the output shapes ("prompt_embeds", "denoiser", "image"), their device and the model's element count."""
    meta = torch.device("meta")
    pipe = build_full(name, dtype, "meta")
    kind = type(pipe).__name__
    prompt = "a photograph of an astronaut riding a horse on the moon"
    with torch.no_grad():
        if kind == "FluxPipeline":
            embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=meta,
                                                          max_sequence_length=512)
            latents, image_ids = pipe.prepare_latents(1, pipe.transformer.config.in_channels // 4, height, width,
                                                      dtype, meta, None)
            guidance = torch.full((1,), 3.5, device=meta) if pipe.transformer.config.guidance_embeds else None
            out = pipe.transformer(hidden_states=latents, timestep=torch.full((1,), 1.0, device=meta),
                                   guidance=guidance, pooled_projections=pooled, encoder_hidden_states=embeds,
                                   txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
            latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        elif kind == "StableDiffusion3Pipeline":
            pos, neg, pooled, neg_pooled = pipe.encode_prompt(
                prompt=prompt, prompt_2=None, prompt_3=None, device=meta, do_classifier_free_guidance=True,
                negative_prompt="", max_sequence_length=256)
            embeds, pooled = torch.cat([neg, pos]), torch.cat([neg_pooled, pooled])
            latents = pipe.prepare_latents(1, pipe.transformer.config.in_channels, height, width, dtype, meta, None)
            out = pipe.transformer(hidden_states=torch.cat([latents] * 2), encoder_hidden_states=embeds,
                                   timestep=torch.full((2,), 1000.0, device=meta), pooled_projections=pooled,
                                   return_dict=False)[0]
        else:
            added = None
            if kind == "StableDiffusionXLPipeline":
                pos, neg, pooled, neg_pooled = pipe.encode_prompt(prompt=prompt, device=meta,
                                                                  do_classifier_free_guidance=True, negative_prompt="")
                time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype,
                                                  pipe.text_encoder_2.config.projection_dim).to(meta)
                added = {"text_embeds": torch.cat([neg_pooled, pooled]), "time_ids": torch.cat([time_ids] * 2)}
            else:
                pos, neg = pipe.encode_prompt(prompt, meta, 1, True, negative_prompt="")
            embeds = torch.cat([neg, pos])
            latents = pipe.prepare_latents(1, pipe.unet.config.in_channels, height, width, dtype, meta, None)
            out = pipe.unet(torch.cat([latents] * 2), torch.full((2,), 999, device=meta), encoder_hidden_states=embeds,
                            added_cond_kwargs=added, return_dict=False)[0]
        vae = pipe.vae.config
        latents = latents / vae.scaling_factor + (getattr(vae, "shift_factor", None) or 0.0)
        image = pipe.vae.decode(latents, return_dict=False)[0]
    elements = sum(t.numel() for module in pipe.components.values() if isinstance(module, torch.nn.Module)
                   for t in (*module.parameters(), *module.buffers()))
    return {"prompt_embeds": tuple(embeds.shape), "denoiser": tuple(out.shape), "image": tuple(image.shape),
            "device": image.device.type, "elements": elements}
