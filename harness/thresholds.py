"""The gate's threshold grammar and thresholds files.

One spec per string; later specs for the same metric win:

    e2e.p50:+10%        end-to-end latency statistic (p50 p90 p99 mean min max) may grow by at most 10 %
    denoise.p50:+10%    the same for a stage of record["stages"] (text_encode, denoise, denoise_step, vae_decode, other)
    memory.peak:+5%     record["memory"]["peak_mb"] may grow by at most 5 %
    parity.psnr:-1dB    record["parity"]["image"]["psnr"] may drop by at most 1 dB
    status              passed before and not passed now is a regression (always applied, listed for clarity)

Aliases: latency.<stat> = e2e.<stat>, vram.peak = memory.peak, psnr = parity.psnr.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from harness.errors import UserError

LATENCY_STATS = ("p50", "p90", "p99", "mean", "min", "max")
STAGE_NAMES = ("e2e", "text_encode", "denoise", "denoise_step", "vae_decode", "other")
DEFAULT_THRESHOLDS = ["status", "e2e.p50:+10%", "e2e.p99:+15%", "memory.peak:+5%", "parity.psnr:-1dB"]
_ALIASES = {"latency": "e2e", "vram": "memory", "psnr": "parity.psnr", "vram.peak": "memory.peak"}


@dataclass(frozen=True)
class Threshold:
    metric: str          # canonical: "status", "e2e.p50", "denoise.p99", "memory.peak", "parity.psnr"
    limit: float = 0.0   # percent for latency/memory, dB for psnr (always positive)
    unit: str = ""       # "%", "dB" or "" (status)

    @property
    def spec(self) -> str:
        if self.metric == "status":
            return "status"
        sign = "-" if self.unit == "dB" else "+"
        return f"{self.metric}:{sign}{self.limit:g}{self.unit}"


_SPEC = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(?::\s*([+-]?)\s*(\d+(?:\.\d+)?)\s*(%|dB|db)\s*)?$")


def _canonical_metric(name: str, spec: str) -> str:
    name = _ALIASES.get(name, name)
    head, _, tail = name.partition(".")
    head = _ALIASES.get(head, head)
    name = f"{head}.{tail}" if tail else head
    if name in ("status", "memory.peak", "parity.psnr"):
        return name
    if head in STAGE_NAMES and tail in LATENCY_STATS:
        return name
    allowed = (f"status, memory.peak, parity.psnr, <stage>.<stat> with stage in {'/'.join(STAGE_NAMES)} "
               f"and stat in {'/'.join(LATENCY_STATS)}")
    raise UserError(f"unknown gate metric {name!r} in threshold {spec!r}; allowed: {allowed}")


def parse_thresholds(specs: list[str]) -> dict[str, Threshold]:
    """Parse threshold specs into {metric: Threshold}. The status rule is always included."""
    out: dict[str, Threshold] = {"status": Threshold("status")}
    for spec in specs:
        if not isinstance(spec, str):
            raise UserError(f"malformed threshold {spec!r}: expected a string such as e2e.p50:+10%")
        m = _SPEC.match(spec)
        if not m:
            raise UserError(f"malformed threshold {spec!r}: expected METRIC:+N% (latency, memory), "
                            f"parity.psnr:-NdB or status")
        name, sign, number, unit = m.groups()
        metric = _canonical_metric(name, spec)
        if metric == "status":
            if number is not None:
                raise UserError(f"malformed threshold {spec!r}: status takes no value")
            continue
        if number is None:
            raise UserError(f"malformed threshold {spec!r}: {metric} needs a limit, e.g. "
                            f"{'-1dB' if metric == 'parity.psnr' else '+10%'}")
        unit = "dB" if unit.lower() == "db" else unit
        want_unit, want_sign = ("dB", "-") if metric == "parity.psnr" else ("%", "+")
        if unit != want_unit or sign not in ("", want_sign):
            raise UserError(f"malformed threshold {spec!r}: {metric} takes {want_sign}N{want_unit} "
                            f"(the direction that is worse)")
        out[metric] = Threshold(metric, float(number), unit)
    return out


def load_thresholds_toml(path: str | Path) -> list[str]:
    """Threshold specs from a TOML file: either `thresholds = ["e2e.p50:+10%", ...]` or a table
    `[thresholds]` of `"e2e.p50" = "+10%"` (and `status = true`)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"cannot read thresholds file {p}: {exc.strerror or exc}")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"malformed thresholds file {p}: {exc}")
    section = data.get("gate", data)  # [gate] thresholds = ... or a top-level thresholds
    table = section.get("thresholds") if isinstance(section, dict) else None
    if isinstance(table, list) and all(isinstance(s, str) for s in table):
        return list(table)
    if isinstance(table, dict):
        specs = []
        for metric, value in table.items():
            if value is True and metric == "status":
                specs.append("status")
            elif isinstance(value, str):
                specs.append(f"{metric}:{value}")
            else:
                raise UserError(f"thresholds file {p}: {metric} = {value!r} must be a string such as \"+10%\"")
        return specs
    raise UserError(f"thresholds file {p}: expected `thresholds = [\"e2e.p50:+10%\", ...]` or a [thresholds] table")
