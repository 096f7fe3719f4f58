"""The metrics the gate judges: what each reads from a record, which way is worse, and the units a threshold on it
takes. A new metric is one entry in METRICS with a function that reads it from a record."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

LATENCY_STATS = ("p50", "p90", "p99", "mean", "min", "max")
STAGE_NAMES = ("e2e", "text_encode", "denoise", "denoise_step", "vae_decode", "other")
# PSNR of identical images is infinite (stored as null); anything above this is "identical" for the gate.
PSNR_CAP_DB = 100.0
# the units an absolute bound may be written in -> factor to the unit the record stores
TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
MEMORY_UNITS = {"MB": 1.0, "GB": 1024.0}   # records store MiB (2**20 bytes) as "MB"; a GB is 1024 of them
RATE_UNITS = {"/s": 1.0}
DB_UNITS = {"dB": 1.0}


@dataclass(frozen=True)
class Metric:
    name: str
    read: Callable[[dict], float | None]   # the value in a record, in `unit`; None when the record lacks it
    unit: str                              # what the record stores: s, MB, dB, /s
    bound_units: dict[str, float]          # units an absolute bound may be written in -> factor to `unit`
    higher_is_better: bool = False         # throughput, PSNR; latency and memory are lower-is-better
    change_unit: str = "%"                 # a change against the baseline is bounded in % (dB for PSNR)
    stage: str = ""                        # latency metrics: the stage whose statistics the noise rules read
    stat: str = ""
    required: bool = False                 # every passed record must carry it (e2e latency)


def stage_stats(record: dict, stage: str) -> dict | None:
    """The latency statistics of a stage ("e2e" = the whole call); None when the stage was not timed (absent, or
    n = 0: a record that passed without latency samples has nothing to compare)."""
    stats = record.get("e2e") if stage == "e2e" else (record.get("stages") or {}).get(stage)
    if not stats or stats.get("n") == 0:
        return None
    return stats


def _latency_reader(stage: str, stat: str) -> Callable[[dict], float | None]:
    def read(record: dict) -> float | None:
        return (stage_stats(record, stage) or {}).get(stat)
    return read


def _field(*keys: str) -> Callable[[dict], float | None]:
    """A reader of record[k1][k2]...; None where a level is missing or not a dict."""
    def read(record: dict) -> float | None:
        value = record
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return read


def _psnr(record: dict) -> float | None:
    image = (record.get("parity") or {}).get("image") or {}
    if "psnr" not in image or image.get("error"):
        return None
    value = image["psnr"]
    # null psnr without an error is an identical image (inf does not survive JSON)
    return PSNR_CAP_DB if value is None else min(float(value), PSNR_CAP_DB)


METRICS: dict[str, Metric] = {
    **{f"{stage}.{stat}": Metric(f"{stage}.{stat}", _latency_reader(stage, stat), "s", TIME_UNITS, stage=stage,
                                 stat=stat, required=stage == "e2e")
       for stage in STAGE_NAMES for stat in LATENCY_STATS},
    "memory.peak": Metric("memory.peak", _field("memory", "peak_mb"), "MB", MEMORY_UNITS),
    "parity.psnr": Metric("parity.psnr", _psnr, "dB", DB_UNITS, higher_is_better=True, change_unit="dB"),
    # workloads that count what they serve (text embedding: embeddings per second) record throughput.per_s
    "throughput": Metric("throughput", _field("throughput", "per_s"), "/s", RATE_UNITS, higher_is_better=True),
}
