"""Case = model x backend(+variant) x dtype x batch x height x width x steps, and the matrix expansion."""
from __future__ import annotations

import itertools
import tomllib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

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

    @property
    def backend_spec(self) -> str:
        return f"{self.backend}+{self.variant}" if self.variant else self.backend

    @property
    def id(self) -> str:
        return (f"{self.model}/{self.backend_spec}/{self.dtype}/b{self.batch}/"
                f"{self.height}x{self.width}/s{self.steps}")

    @property
    def shape_key(self) -> tuple:
        """What the reference output depends on: everything but the backend."""
        return (self.model, self.dtype, self.batch, self.height, self.width, self.steps)

    def as_dict(self) -> dict:
        return asdict(self)

    def with_backend(self, backend: str, variant: str = "") -> "Case":
        return Case(self.model, backend, variant, self.dtype, self.batch, self.height, self.width, self.steps)

    @classmethod
    def from_id(cls, case_id: str) -> "Case":
        try:
            model_and_backend, rest = case_id.rsplit("/", 4)[0], case_id.rsplit("/", 4)[1:]
            model, backend_spec = model_and_backend.rsplit("/", 1)
            dtype, b, hw, s = rest
            backend, _, variant = backend_spec.partition("+")
            h, w = hw.split("x")
            return cls(model, backend, variant, dtype, int(b[1:]), int(h), int(w), int(s[1:]))
        except (ValueError, IndexError):
            raise UserError(f"malformed case id {case_id!r}: expected model/backend[+variant]/dtype/bN/HxW/sN")


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
    """What to run; every list is crossed with every other."""
    models: list[str] = field(default_factory=lambda: ["tiny-sd", "tiny-sd3"])
    backends: list[str] = field(default_factory=lambda: ["diffusers"])
    dtypes: list[str] = field(default_factory=lambda: ["fp32"])
    batches: list[int] = field(default_factory=lambda: [1])
    sizes: list[tuple[int, int]] = field(default_factory=lambda: [(64, 64)])
    steps: list[int] = field(default_factory=lambda: [4])

    def expand(self) -> list[Case]:
        cases = []
        for model, spec, dtype, batch, (h, w), steps in itertools.product(
                self.models, self.backends, self.dtypes, self.batches, self.sizes, self.steps):
            backend, variant = parse_backend_spec(spec)
            if dtype not in DTYPES:
                raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
            validate_shape(batch, h, w, steps)
            cases.append(Case(model, backend, variant, dtype, batch, h, w, steps))
        seen, unique = set(), []
        for c in cases:
            if c.id not in seen:
                seen.add(c.id)
                unique.append(c)
        return unique


_MATRIX_KEYS = {"models", "backends", "dtypes", "batches", "sizes", "steps"}


def matrix_from_toml_text(text: str, source: str) -> Matrix:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"malformed TOML matrix {source}: {exc}")
    table = data.get("matrix", data)
    if not isinstance(table, dict):
        raise UserError(f"matrix file {source}: [matrix] must be a table")
    unknown = set(table) - _MATRIX_KEYS
    if unknown:
        raise UserError(f"matrix file {source}: unknown key(s) {', '.join(sorted(unknown))}; "
                        f"allowed: {', '.join(sorted(_MATRIX_KEYS))}")
    m = Matrix()
    for key in _MATRIX_KEYS & set(table):
        value = table[key]
        if not isinstance(value, list) or not value:
            raise UserError(f"matrix file {source}: {key} must be a non-empty list")
        if key == "sizes":
            value = [parse_size(v) for v in value]
        elif key in ("batches", "steps"):
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise UserError(f"matrix file {source}: {key} must be a list of integers")
        elif not all(isinstance(v, str) for v in value):
            raise UserError(f"matrix file {source}: {key} must be a list of strings")
        setattr(m, key, list(value))
    return m


def load_matrix(path: str | Path | None) -> Matrix:
    """A TOML matrix file, or the embedded default (harness/default_matrix.toml)."""
    if path is None:
        text = resources.files("harness").joinpath("default_matrix.toml").read_text()
        return matrix_from_toml_text(text, "(embedded default)")
    p = Path(path)
    if not p.is_file():
        raise UserError(f"matrix file {p} does not exist")
    return matrix_from_toml_text(p.read_text(), str(p))
