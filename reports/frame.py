"""Records as the report reads them: the latest record per case and device class, the flat pandas table
(records.csv), and the small helpers every section shares (reading nested fields, formatting numbers, labels)."""
from __future__ import annotations

import math

import pandas as pd

from harness.verdict.gate import device_class

REFERENCE = "diffusers"
STACK = ("text_encode", "denoise", "vae_decode")     # + other = e2e - these
STATUS_ORDER = ("passed", "failed", "error", "over_budget", "unsupported", "interrupted")


def get(d, *keys, default=None):
    """d[k1][k2]... or default when any level is missing, None or not a dict."""
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return default
        d = d[k]
    return d


def num(x) -> float | None:
    """A finite float, or None."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def fmt(x, digits: int = 3) -> str:
    v = num(x)
    if v is None:
        return "–"
    return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"


def ms(seconds) -> str:
    v = num(seconds)
    return "–" if v is None else f"{v * 1000:.1f}"


def backend_spec(r: dict) -> str:
    return f"{r['backend']}+{r['variant']}" if r.get("variant") else r["backend"]


def shape_label(r: dict) -> str:
    if r.get("seq"):
        return f"{r['model']} {r['dtype']} b{r['batch']} seq{r['seq']}"
    return f"{r['model']} {r['dtype']} b{r['batch']} {r['height']}x{r['width']} s{r['steps']}"


def shape_key(r: dict) -> tuple:
    return (r["_device"], r["model"], r["dtype"], r["batch"], r["height"], r["width"], r["steps"], r.get("seq") or 0)


def is_reference(r: dict) -> bool:
    from harness.selection.workloads import is_reference as eager_reference
    return eager_reference(r["backend"], r.get("variant", ""))


def latest(records: list[dict]) -> tuple[list[dict], int]:
    """The latest record per (case id, device class), with _device and _backend added, in display order; and how
    many older ones were dropped."""
    keep: dict[tuple, dict] = {}
    for r in sorted(records, key=lambda r: num(r.get("timestamp")) or 0):
        r = {**r, "_device": device_class(r), "_backend": backend_spec(r)}
        keep[(r["case_id"], r["_device"])] = r
    rows = sorted(keep.values(), key=lambda r: (r["_device"], r["model"], r["dtype"], r["batch"], r["height"],
                                                r["width"], r["steps"], not is_reference(r), r["_backend"]))
    return rows, len(records) - len(rows)


def table(df: pd.DataFrame) -> dict:
    """A DataFrame as plain strings for the template (Jinja escapes them)."""
    df = df.fillna("–")
    return {"columns": [str(c) for c in df.columns], "rows": [[str(v) for v in row] for row in df.itertuples(index=False)]}


def records_frame(records: list[dict]) -> pd.DataFrame:
    """One row per record with the headline numbers (seconds, MB, dB); this is records.csv."""
    rows = []
    for r in records:
        if "_device" not in r:   # a record straight from the loader
            r = {**r, "_device": device_class(r), "_backend": backend_spec(r)}
        row = {"case_id": r["case_id"], "device_class": r["_device"], "run_id": r.get("run_id"),
               "model": r["model"], "backend": r["_backend"], "dtype": r["dtype"], "batch": r["batch"],
               "height": r["height"], "width": r["width"], "steps": r["steps"], "status": r["status"],
               "error_class": r.get("error_class") or "", "reason": r.get("reason") or ""}
        for stat in ("p25", "p50", "p75", "p90", "p99", "mean", "std", "n"):
            row[f"e2e_{stat}_s" if stat != "n" else "e2e_n"] = get(r, "e2e", stat)
        for stage in (*STACK, "denoise_step", "other"):
            row[f"{stage}_p50_s"] = get(r, "stages", stage, "p50")
        build = r.get("build") or {}
        row["cold_s"] = r.get("cold_s")
        row["build_total_s"] = sum(v for v in build.values() if num(v) is not None) if build else None
        row["peak_mb"] = get(r, "memory", "peak_mb")
        row["parity"] = get(r, "parity", "verdict")
        row["psnr_db"] = get(r, "parity", "image", "psnr")
        row["ssim"] = get(r, "parity", "image", "ssim")
        row["image"] = r.get("image") or ""
        row["source"] = r.get("_source") or ""
        row["synthetic"] = bool(r.get("synthetic"))
        rows.append(row)
    return pd.DataFrame(rows)
