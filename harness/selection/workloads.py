"""What a case does, by its model: text-to-image (a diffusers pipeline, the default) or text-embedding (a sentence
embedding pipeline: tokenizer, transformer encoder, mean pooling, L2 normalisation).

Light on purpose (no torch import): case ids, the matrix and the report ask it. The workload decides a case's shape
fields (height x width x steps, or the sequence length), its eager reference backend, and which stages it has.
"""
from __future__ import annotations

import json
from pathlib import Path

TEXT_TO_IMAGE = "text-to-image"
TEXT_EMBEDDING = "text-embedding"
WORKLOADS = (TEXT_TO_IMAGE, TEXT_EMBEDDING)

# the eager PyTorch reference every other backend of the workload is judged against
REFERENCES = {TEXT_TO_IMAGE: "diffusers", TEXT_EMBEDDING: "torch"}
EMBEDDING_MODELS = ("minilm-l6",)
# transformers encoders the embedding pipeline knows how to pool (sentence-transformers / BERT-style folders)
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "electra", "deberta-v2")


def of_model(model: str) -> str:
    """The workload of a model name or path:DIR (a folder with model_index.json is a diffusers pipeline; one with a
    BERT-style config.json is an embedding model). Unknown names fall to text-to-image: the zoo says what is
    unknown, with its own message."""
    if model in EMBEDDING_MODELS:
        return TEXT_EMBEDDING
    if model.startswith("path:"):
        folder = Path(model[5:]).expanduser()
        if not (folder / "model_index.json").is_file() and (folder / "config.json").is_file():
            try:
                model_type = json.loads((folder / "config.json").read_text()).get("model_type", "")
            except (OSError, ValueError, AttributeError):
                return TEXT_TO_IMAGE
            if model_type in ENCODER_TYPES:
                return TEXT_EMBEDDING
    return TEXT_TO_IMAGE


def reference_backend(workload: str) -> str:
    return REFERENCES[workload]


def is_reference(backend: str, variant: str) -> bool:
    """The plain eager reference of some workload (its options, e.g. vae-tiling, make it a variant to judge)."""
    return backend in REFERENCES.values() and not variant
