"""LoRA adapters on text-to-image models: `--lora PATH_OR_ORG/NAME` (repeatable), `--lora-scale S`, `--lora-fuse`.

A LoRA changes the model's weights, so it is part of the model's name in the case id:
`tiny-sd+lora:pixel/diffusers/fp32/b1/64x64/s4`, `org--my-sdxl+lora:org--style+scale:0.8+fused/...`. Each adapter
is named by a label (a file's stem, a folder's name, a hub id spelled ORG--NAME); the label -> source map of the
run travels to worker processes in the environment (SOURCES_ENV), as hub revisions do. The eager reference of a
LoRA case is computed with the same LoRA, the same scale and the same fusing.

Adapters load through diffusers' own `load_lora_weights` (peft underneath) from a local file only: safetensors,
nothing downloaded, nothing unpickled. Unfused, every denoising step pays the adapter's extra matmuls; fused
(`fuse_lora` then `unload_lora_weights`), the weights are merged once, a build step of its own (`lora_fuse`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import UserError
from harness.models import hub

SOURCES_ENV = "DIFFBENCH_LORAS"          # {"label": "PATH or ORG/NAME[@REVISION]"} of this run
MARK = "+lora:"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"   # what save_lora_weights writes


@dataclass(frozen=True)
class LoraChoice:
    """What a model name says about its LoRA: the base model, the adapters' labels, their scale, fused or not."""
    base: str
    labels: tuple[str, ...] = ()
    scale: float = 1.0
    fused: bool = False

    @property
    def name(self) -> str:
        if not self.labels:
            return self.base
        text = self.base + "".join(f"{MARK}{label}" for label in self.labels)
        if self.scale != 1.0:
            text += f"+scale:{self.scale:g}"
        return text + ("+fused" if self.fused else "")


def parse(name: str) -> LoraChoice:
    """`base+lora:a+lora:b+scale:0.5+fused` -> LoraChoice; a name without LoRA -> LoraChoice(name)."""
    if MARK not in name:
        return LoraChoice(name)
    base, _, rest = name.partition(MARK)
    labels, scale, fused = [], 1.0, False
    for part in ("lora:" + rest).split("+"):
        kind, _, value = part.partition(":")
        if kind == "lora" and value:
            labels.append(value)
        elif kind == "scale":
            try:
                scale = float(value)
            except ValueError:
                raise UserError(f"model {name!r}: bad LoRA scale {value!r}")
        elif part == "fused":
            fused = True
        else:
            raise UserError(f"model {name!r}: unknown LoRA part {part!r} (expected lora:LABEL, scale:S, fused)")
    return LoraChoice(base, tuple(labels), scale, fused)


def base_of(name: str) -> str:
    return name.partition(MARK)[0]


def missing() -> str | None:
    """Why LoRA cases cannot run here (peft is not installed), or None."""
    import importlib.util
    if importlib.util.find_spec("peft") is None:
        return "LoRA adapters load through peft: pip install peft (or the diffbench[lora] extra)"
    return None


# -- sources ----------------------------------------------------------------------------------------------------
@dataclass
class LoraFile:
    label: str
    source: str          # as the user named it
    file: Path           # the safetensors file that loads
    record: dict = field(default_factory=dict)


def label_of(source: str) -> str:
    """A file's stem, a folder's name, or a hub id spelled ORG--NAME: characters a case id and a file name take."""
    path = Path(source).expanduser()
    if path.exists():
        text = path.stem if path.is_file() else path.name
    else:
        text = hub.case_name((hub.parse(source) or (source, None))[0])
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "lora"


def locate(source: str) -> LoraFile:
    """The safetensors file of a LoRA: a file, a folder holding one (save_lora_weights' pytorch_lora_weights.
    safetensors first), or a hub id in the local Hugging Face cache. One-line error otherwise."""
    path = Path(source).expanduser()
    record: dict = {"source": source}
    if path.exists():
        folder = path if path.is_dir() else None
    elif hub.parse(source) is not None:
        try:
            resolved = hub.resolve(source)
        except UserError as exc:
            raise UserError(f"--lora {source}: no such file or folder; as a hub id: {exc}")
        folder, record = resolved.folder, {**record, "repo": resolved.repo, "revision": resolved.revision,
                                           "commit": resolved.commit}
    else:
        raise UserError(f"--lora {source}: no such file or folder, and not a hub id (ORG/NAME[@REVISION])")
    if folder is None:
        file = path
    else:
        candidates = sorted(folder.glob("*.safetensors"))
        preferred = [c for c in candidates if c.name == DIFFUSERS_FILE]
        if not (preferred or len(candidates) == 1):
            found = ", ".join(c.name for c in candidates) or "none"
            raise UserError(f"--lora {source}: expected {DIFFUSERS_FILE} or a single .safetensors file in {folder} "
                            f"(found {found}); name the file")
        file = (preferred or candidates)[0]
    if file.suffix != ".safetensors":
        raise UserError(f"--lora {source}: LoRA weights load from .safetensors only (nothing is unpickled)")
    return LoraFile(label_of(source), source, file, {**record, "file": file.name})


def pinned_sources() -> dict[str, str]:
    try:
        return json.loads(os.environ.get(SOURCES_ENV) or "{}")
    except json.JSONDecodeError:
        raise UserError(f"{SOURCES_ENV} is not valid JSON")


def choose(sources: list[str], scale: float, fused: bool) -> tuple[str, ...]:
    """Check this run's LoRAs (each located now: a missing one stops the run before any case starts) and remember
    them for the run (the environment: workers inherit it). Returns their labels."""
    if not sources:
        return ()
    problem = missing()
    if problem:
        raise UserError(problem)
    if scale <= 0 and fused:
        raise UserError(f"--lora-scale {scale:g} with --lora-fuse: fusing needs a positive scale")
    pins = pinned_sources()
    labels = []
    for source in sources:
        lora = locate(source)
        if pins.get(lora.label, source) != source or lora.label in labels:
            raise UserError(f"two LoRAs named {lora.label!r} ({pins.get(lora.label, source)} and {source}): the "
                            "case id names a LoRA by its file stem, folder name or ORG--NAME; rename one")
        pins[lora.label] = source
        labels.append(lora.label)
    os.environ[SOURCES_ENV] = json.dumps(pins, sort_keys=True)
    return tuple(labels)


# -- applying ---------------------------------------------------------------------------------------------------
def apply(pipeline, choice: LoraChoice, build: dict[str, float]) -> list[dict]:
    """Load the choice's adapters into the pipeline (timed as build step `lora_load`), set their scale, and fuse
    them when asked (`lora_fuse`). Returns what the record's `weights.lora` says of each."""
    sources = pinned_sources()
    files = []
    for label in choice.labels:
        if label not in sources:
            raise UserError(f"LoRA {label!r} is not among this run's --lora adapters ({', '.join(sources) or 'none'})")
        files.append(locate(sources[label]))
    start = time.perf_counter()
    for lora in files:
        pipeline.load_lora_weights(str(lora.file.parent), weight_name=lora.file.name, adapter_name=lora.label,
                                   local_files_only=True)
    pipeline.set_adapters(list(choice.labels), [choice.scale] * len(choice.labels))
    build["lora_load"] = time.perf_counter() - start
    if choice.fused:
        start = time.perf_counter()
        pipeline.fuse_lora(adapter_names=list(choice.labels), lora_scale=1.0)   # the scale is set_adapters'
        pipeline.unload_lora_weights()          # the LoRA layers go; the merged weights stay
        build["lora_fuse"] = time.perf_counter() - start
    return [{**lora.record, "label": lora.label, "sha256": hashlib.sha256(lora.file.read_bytes()).hexdigest(),
             "scale": choice.scale, "fused": choice.fused} for lora in files]
