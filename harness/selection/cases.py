"""Case = model x backend(+variant) x dtype x batch x shape, and the matrix expansion.

The shape is the workload's: height x width x steps for text-to-image, the sequence length for text-embedding
(harness/selection/workloads.py). Case ids say it: `tiny-sd/onnxruntime/fp32/b1/64x64/s4`, `minilm-l6/torch/fp32/b8/seq16`.
"""
from __future__ import annotations

import itertools
import tomllib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from harness.selection import workloads
from harness.errors import UserError

DTYPES = ("fp32", "fp16", "bf16")
VAE_FACTOR = 8


@dataclass(frozen=True, order=True)
class Case:
    model: str
    backend: str
    variant: str = ""
    dtype: str = "fp32"
    batch: int = 1
    height: int = 64
    width: int = 64
    steps: int = 4
    seq: int = 0                  # text-embedding: the sequence length (height, width and steps are 0 then)

    @property
    def workload(self) -> str:
        return workloads.TEXT_EMBEDDING if self.seq else workloads.TEXT_TO_IMAGE

    @property
    def backend_spec(self) -> str:
        return f"{self.backend}+{self.variant}" if self.variant else self.backend

    @property
    def shape_id(self) -> str:
        return f"seq{self.seq}" if self.seq else f"{self.height}x{self.width}/s{self.steps}"

    @property
    def id(self) -> str:
        return f"{self.model}/{self.backend_spec}/{self.dtype}/b{self.batch}/{self.shape_id}"

    @property
    def shape_key(self) -> tuple:
        """What the reference output depends on: everything but the backend."""
        return (self.model, self.dtype, self.batch, self.height, self.width, self.steps, self.seq)

    def as_dict(self) -> dict:
        return asdict(self)

    def with_backend(self, backend: str, variant: str = "") -> "Case":
        return Case(self.model, backend, variant, self.dtype, self.batch, self.height, self.width, self.steps,
                    self.seq)

    @classmethod
    def embedding(cls, model: str, backend: str, variant: str = "", dtype: str = "fp32", batch: int = 1,
                  seq: int = 16) -> "Case":
        return cls(model, backend, variant, dtype, batch, 0, 0, 0, seq)

    @classmethod
    def from_id(cls, case_id: str) -> "Case":
        try:
            if case_id.rsplit("/", 1)[-1].startswith("seq"):
                head, seq = case_id.rsplit("/", 1)
                model_and_backend, dtype, b = head.rsplit("/", 2)
                model, backend_spec = model_and_backend.rsplit("/", 1)
                backend, _, variant = backend_spec.partition("+")
                return cls.embedding(model, backend, variant, dtype, int(b[1:]), int(seq[3:]))
            model_and_backend, rest = case_id.rsplit("/", 4)[0], case_id.rsplit("/", 4)[1:]
            model, backend_spec = model_and_backend.rsplit("/", 1)
            dtype, b, hw, s = rest
            backend, _, variant = backend_spec.partition("+")
            h, w = hw.split("x")
            return cls(model, backend, variant, dtype, int(b[1:]), int(h), int(w), int(s[1:]))
        except (ValueError, IndexError):
            raise UserError(f"malformed case id {case_id!r}: expected model/backend[+variant]/dtype/bN/HxW/sN "
                            "or model/backend[+variant]/dtype/bN/seqN")


def parse_backend_spec(spec: str) -> tuple[str, str]:
    backend, _, variant = spec.strip().partition("+")
    if not backend:
        raise UserError(f"empty backend in {spec!r}")
    return backend, variant


def parse_size(text: str) -> tuple[int, int]:
    parts = str(text).lower().split("x")
    try:
        if len(parts) == 1:
            h = w = int(parts[0])
        elif len(parts) == 2:
            h, w = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise UserError(f"bad size {text!r}: expected HxW such as 64x64 or one number")
    return h, w


def validate_shape(batch: int, height: int, width: int, steps: int) -> None:
    if batch < 1:
        raise UserError(f"batch must be at least 1, got {batch}")
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    for name, v in (("height", height), ("width", width)):
        if v <= 0:
            raise UserError(f"{name} must be positive, got {v}")
        if v % VAE_FACTOR:
            raise UserError(f"{name} {v} is not divisible by the VAE factor {VAE_FACTOR}")


@dataclass
class Matrix:
    """What to run; every list is crossed with every other. Text-embedding models take their shapes from `seqs`,
    and may take backends, dtypes and batches from `embedding` (the [matrix.text-embedding] table), since the
    eager reference and the interesting batches differ from an image pipeline's."""
    models: list[str] = field(default_factory=lambda: ["tiny-sd", "tiny-sd3"])
    backends: list[str] = field(default_factory=lambda: ["diffusers"])
    dtypes: list[str] = field(default_factory=lambda: ["fp32"])
    batches: list[int] = field(default_factory=lambda: [1])
    sizes: list[tuple[int, int]] = field(default_factory=lambda: [(64, 64)])
    steps: list[int] = field(default_factory=lambda: [4])
    seqs: list[int] = field(default_factory=lambda: [16, 128])
    embedding: dict[str, list] = field(default_factory=dict)   # backends / dtypes / batches for embedding models

    def expand(self) -> list[Case]:
        cases = []
        for model in self.models:
            if workloads.of_model(model) == workloads.TEXT_EMBEDDING:
                lists = [self.embedding.get(k) or getattr(self, k) for k in ("backends", "dtypes", "batches")]
                for spec, dtype, batch, seq in itertools.product(*lists, self.seqs):
                    backend, variant = parse_backend_spec(spec)
                    _check_dtype(dtype)
                    validate_sequence(batch, seq)
                    cases.append(Case.embedding(model, backend, variant, dtype, batch, seq))
                continue
            for spec, dtype, batch, (h, w), steps in itertools.product(
                    self.backends, self.dtypes, self.batches, self.sizes, self.steps):
                backend, variant = parse_backend_spec(spec)
                _check_dtype(dtype)
                validate_shape(batch, h, w, steps)
                cases.append(Case(model, backend, variant, dtype, batch, h, w, steps))
        seen, unique = set(), []
        for c in cases:
            if c.id not in seen:
                seen.add(c.id)
                unique.append(c)
        return unique


def quick_look(cases: list[Case]) -> list[Case]:
    """`--quick`: one batch and one shape per model, the smallest it was selected with (text-to-image: the smallest
    batch, the smallest size, the fewest steps; text-embedding: the smallest batch, the shortest sequence), on
    every selected backend and dtype."""
    smallest: dict[str, tuple] = {}
    for model in dict.fromkeys(c.model for c in cases):
        mine = [c for c in cases if c.model == model]
        size = min(((c.height * c.width, c.height, c.width) for c in mine))
        smallest[model] = (min(c.batch for c in mine), size[1], size[2], min(c.steps for c in mine),
                           min(c.seq for c in mine))
    return [c for c in cases if (c.batch, c.height, c.width, c.steps, c.seq) == smallest[c.model]]


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")


def validate_sequence(batch: int, seq: int) -> None:
    if batch < 1:
        raise UserError(f"batch must be at least 1, got {batch}")
    if not 1 <= seq <= 512:
        raise UserError(f"sequence length must be between 1 and 512 tokens, got {seq}")


_MATRIX_KEYS = {"models", "backends", "dtypes", "batches", "sizes", "steps", "seqs"}
_EMBEDDING_KEYS = {"backends", "dtypes", "batches"}


def matrix_from_toml_text(text: str, source: str) -> Matrix:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"malformed TOML matrix {source}: {exc}")
    table = data.get("matrix", data)
    if not isinstance(table, dict):
        raise UserError(f"matrix file {source}: [matrix] must be a table")
    table = dict(table)
    embedding = table.pop(workloads.TEXT_EMBEDDING, {})
    unknown = set(table) - _MATRIX_KEYS
    if unknown:
        raise UserError(f"matrix file {source}: unknown key(s) {', '.join(sorted(unknown))}; "
                        f"allowed: {', '.join(sorted(_MATRIX_KEYS))} and a [matrix.{workloads.TEXT_EMBEDDING}] table")
    if not isinstance(embedding, dict) or set(embedding) - _EMBEDDING_KEYS:
        raise UserError(f"matrix file {source}: [matrix.{workloads.TEXT_EMBEDDING}] may set "
                        f"{', '.join(sorted(_EMBEDDING_KEYS))}")
    m = Matrix()
    for key in _MATRIX_KEYS & set(table):
        setattr(m, key, _matrix_list(table[key], key, source))
    m.embedding = {key: _matrix_list(value, key, source) for key, value in embedding.items()}
    return m


def _matrix_list(value, key: str, source: str) -> list:
    if not isinstance(value, list) or not value:
        raise UserError(f"matrix file {source}: {key} must be a non-empty list")
    if key == "sizes":
        return [parse_size(v) for v in value]
    if key in ("batches", "steps", "seqs"):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise UserError(f"matrix file {source}: {key} must be a list of integers")
    elif not all(isinstance(v, str) for v in value):
        raise UserError(f"matrix file {source}: {key} must be a list of strings")
    return list(value)


def load_matrix(path: str | Path | None) -> Matrix:
    """A TOML matrix file, or the embedded default (harness/selection/default_matrix.toml)."""
    if path is None:
        text = resources.files("harness.selection").joinpath("default_matrix.toml").read_text()
        return matrix_from_toml_text(text, "(embedded default)")
    p = Path(path)
    if not p.is_file():
        raise UserError(f"matrix file {p} does not exist")
    return matrix_from_toml_text(p.read_text(), str(p))
