"""Offline tokenizers: byte-level CLIP BPE and a small T5 unigram, built from code (no vocab files, no hub).

They serve the tiny models and stand in for the full-size tokenizers, whose vocab files we do not ship: the text
encoders' cost depends on the sequence length, not on the vocabulary.
"""
from __future__ import annotations

import string

# A few merges so the BPE path is exercised; every part and result is in the vocab.
_CLIP_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("o", "f</w>"), ("i", "n"), ("o", "n</w>")]


def _byte_level_chars() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table: 256 printable stand-ins, one per byte."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def clip_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer
    chars = _byte_level_chars()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    for a, b in _CLIP_MERGES:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=list(_CLIP_MERGES), model_max_length=max_length)


def t5_tokenizer(max_length: int = 256):
    from transformers import T5Tokenizer
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + c, -1.0) for c in string.ascii_lowercase]
    pieces += [(c, -2.0) for c in string.ascii_lowercase + string.digits + ".,'-"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)
