"""The gate's threshold grammar and thresholds files.

One spec per string. A change against the baseline:

    e2e.p50:+10%        end-to-end latency statistic (p50 p90 p99 mean min max) may grow by at most 10 %
    denoise.p50:+10%    the same for a stage of record["stages"] (text_encode, denoise, denoise_step, vae_decode, other)
    memory.peak:+5%     record["memory"]["peak_mb"] may grow by at most 5 %
    parity.psnr:-1dB    record["parity"]["image"]["psnr"] may drop by at most 1 dB
    throughput:-10%     record["throughput"]["per_s"] may drop by at most 10 % (higher is better)

An absolute bound, judged on the current record alone (a service's targets; no baseline value needed):

    e2e.p50:<10ms       lower-is-better metrics take an upper bound: latency in us / ms / s, memory in MB / GB
    memory.peak:<8GB
    throughput:>500/s   higher-is-better metrics take a lower bound: throughput in /s, PSNR in dB
    parity.psnr:>40dB

    status              passed before and not passed now is a regression (always applied, listed for clarity)

The sign of a change may be left out (denoise.p50:10% = +10%); a sign or bound in the direction that is better is
bad input. Later specs for the same metric and kind (change or bound) win; a change and a bound on one metric both
apply. Aliases: latency.<stat> = e2e.<stat>, vram.peak = memory.peak, psnr = parity.psnr.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from harness.errors import UserError
from harness.verdict.metrics import LATENCY_STATS, METRICS, STAGE_NAMES

DEFAULT_THRESHOLDS = ["status", "e2e.p50:+10%", "e2e.p99:+15%", "memory.peak:+5%", "parity.psnr:-1dB"]
_ALIASES = {"latency": "e2e", "vram": "memory", "psnr": "parity.psnr", "vram.peak": "memory.peak"}
_UNITS = {"%": "%", "db": "dB", "us": "us", "ms": "ms", "s": "s", "mb": "MB", "gb": "GB", "/s": "/s"}


@dataclass(frozen=True)
class Threshold:
    metric: str          # canonical: "status", "e2e.p50", "denoise.p99", "memory.peak", "parity.psnr", "throughput"
    limit: float = 0.0   # as written (always positive): percent or dB for a change, the bound in `unit` for a bound
    unit: str = ""       # "%" or "dB" for a change; a bound's unit ("ms", "GB", "/s"...); "" for status
    bound: str = ""      # "<" or ">" for an absolute bound; "" for a change against the baseline

    @property
    def key(self) -> str:
        """What a later spec replaces: one change and one bound per metric."""
        return f"{self.metric}:{self.bound}" if self.bound else self.metric

    @property
    def bound_value(self) -> float:
        """The bound in the unit the record stores (seconds, MB, per second, dB)."""
        return self.limit * METRICS[self.metric].bound_units[self.unit]

    @property
    def spec(self) -> str:
        if self.metric == "status":
            return "status"
        if self.bound:
            return f"{self.metric}:{self.bound}{self.limit:g}{self.unit}"
        sign = "-" if METRICS[self.metric].higher_is_better else "+"
        return f"{self.metric}:{sign}{self.limit:g}{self.unit}"


_SPEC = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*"
                   r"(?::\s*([<>]|[+-]?)\s*(\d+(?:\.\d+)?)\s*(%|dB|us|ms|s|MB|GB|/s)\s*)?$", re.IGNORECASE)


def _canonical_metric(name: str, spec: str) -> str:
    name = _ALIASES.get(name, name)
    head, _, tail = name.partition(".")
    head = _ALIASES.get(head, head)
    name = f"{head}.{tail}" if tail else head
    if name == "status" or name in METRICS:
        return name
    allowed = (f"status, memory.peak, parity.psnr, throughput, <stage>.<stat> with stage in "
               f"{'/'.join(STAGE_NAMES)} and stat in {'/'.join(LATENCY_STATS)}")
    raise UserError(f"unknown gate metric {name!r} in threshold {spec!r}; allowed: {allowed}")


def parse_thresholds(specs: list[str]) -> dict[str, Threshold]:
    """Parse threshold specs into {Threshold.key: Threshold}. The status rule is always included."""
    out: dict[str, Threshold] = {"status": Threshold("status")}
    for spec in specs:
        if not isinstance(spec, str):
            raise UserError(f"malformed threshold {spec!r}: expected a string such as e2e.p50:+10%")
        m = _SPEC.match(spec)
        if not m:
            raise UserError(f"malformed threshold {spec!r}: expected METRIC:+N% (a change), METRIC:<N UNIT or "
                            f"METRIC:>N UNIT (a bound), parity.psnr:-NdB or status")
        name, sign, number, unit = m.groups()
        metric = _canonical_metric(name, spec)
        if metric == "status":
            if number is not None:
                raise UserError(f"malformed threshold {spec!r}: status takes no value")
            continue
        if number is None:
            raise UserError(f"malformed threshold {spec!r}: {metric} needs a limit, e.g. "
                            f"{'-1dB' if metric == 'parity.psnr' else '+10%'}")
        threshold = _threshold(spec, metric, sign, float(number), _UNITS[unit.lower()])
        out[threshold.key] = threshold
    return out


def _threshold(spec: str, metric: str, sign: str, number: float, unit: str) -> Threshold:
    m = METRICS[metric]
    if sign in ("<", ">"):
        want = ">" if m.higher_is_better else "<"
        units = "/".join(m.bound_units)
        if sign != want:
            better = "higher" if m.higher_is_better else "lower"
            raise UserError(f"malformed threshold {spec!r}: {better} is better for {metric}, so its bound is "
                            f"{want}N ({units})")
        if unit not in m.bound_units:
            raise UserError(f"malformed threshold {spec!r}: a bound on {metric} is in {units}")
        return Threshold(metric, number, unit, bound=sign)
    want_sign = "-" if m.higher_is_better else "+"
    if unit != m.change_unit or sign not in ("", want_sign):
        raise UserError(f"malformed threshold {spec!r}: {metric} takes {want_sign}N{m.change_unit} "
                        f"(the direction that is worse) or a bound {'>' if m.higher_is_better else '<'}N")
    return Threshold(metric, number, unit)


def load_thresholds_toml(path: str | Path) -> list[str]:
    """Threshold specs from a TOML file: either `thresholds = ["e2e.p50:+10%", ...]` or a table
    `[thresholds]` of `"e2e.p50" = "+10%"` (a list for several on one metric: `"e2e.p50" = ["+10%", "<10ms"]`;
    and `status = true`)."""
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
            elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
                specs.extend(f"{metric}:{v}" for v in value)
            else:
                raise UserError(f"thresholds file {p}: {metric} = {value!r} must be a string such as \"+10%\"")
        return specs
    raise UserError(f"thresholds file {p}: expected `thresholds = [\"e2e.p50:+10%\", ...]` or a [thresholds] table")
