"""One HTML page (Jinja2, autoescaped) + matplotlib PNGs + records.csv from records of one or many runs.

Every section is built from whatever the records hold and left out when they hold nothing for it, so a run of
only unsupported rows, without images or without serving data still renders.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
# Figure objects render through the Agg canvas on savefig: no pyplot global state, no display, thread-safe
from matplotlib.figure import Figure

from harness.gate import device_class

REFERENCE = "diffusers"
IMAGE_DIR = "report_images"   # copies of the output images and the difference maps
STACK = ("text_encode", "denoise", "vae_decode")     # + other = e2e - these
STACK_COLORS = {"text_encode": "#4e79a7", "denoise": "#f28e2b", "vae_decode": "#59a14f", "other": "#bab0ac"}
STATUS_ORDER = ("passed", "failed", "error", "unsupported", "interrupted")
# worst first: the colour of a heatmap cell that aggregates several shapes
_SEVERITY = {"error": 4, "failed": 3, "interrupted": 2, "unsupported": 1, "passed": 0}


# -- small helpers ----------------------------------------------------------------------------------------------
def _get(d, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return default
        d = d[k]
    return d


def _num(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _fmt(x, digits: int = 3) -> str:
    v = _num(x)
    if v is None:
        return "–"
    return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"


def _ms(seconds) -> str:
    v = _num(seconds)
    return "–" if v is None else f"{v * 1000:.1f}"


def backend_spec(r: dict) -> str:
    return f"{r['backend']}+{r['variant']}" if r.get("variant") else r["backend"]


def shape_label(r: dict) -> str:
    return f"{r['model']} {r['dtype']} b{r['batch']} {r['height']}x{r['width']} s{r['steps']}"


def _shape_key(r: dict) -> tuple:
    return (r["_device"], r["model"], r["dtype"], r["batch"], r["height"], r["width"], r["steps"])


def _is_reference(r: dict) -> bool:
    return r["backend"] == REFERENCE and not r.get("variant")


def _latest(records: list[dict]) -> tuple[list[dict], int]:
    """The latest record per (case id, device class); how many older ones were dropped."""
    keep: dict[tuple, dict] = {}
    for r in sorted(records, key=lambda r: _num(r.get("timestamp")) or 0):
        r = {**r, "_device": device_class(r), "_backend": backend_spec(r)}
        keep[(r["case_id"], r["_device"])] = r
    rows = sorted(keep.values(), key=lambda r: (r["_device"], r["model"], r["dtype"], r["batch"], r["height"],
                                                r["width"], r["steps"], not _is_reference(r), r["_backend"]))
    return rows, len(records) - len(rows)


def _table(df: pd.DataFrame) -> dict:
    """A DataFrame as plain strings for the template (Jinja escapes them)."""
    df = df.fillna("–")
    return {"columns": [str(c) for c in df.columns], "rows": [[str(v) for v in row] for row in df.itertuples(index=False)]}


class _Pngs:
    """Saves figures as numbered PNGs beside the page and returns their relative names."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.n = out_dir, 0

    def save(self, fig: Figure, stem: str) -> str:
        self.n += 1
        name = f"{stem}_{self.n:02d}.png"
        fig.tight_layout()
        fig.savefig(self.out_dir / name, dpi=100)
        return name


# -- the flat table ---------------------------------------------------------------------------------------------
def records_frame(records: list[dict]) -> pd.DataFrame:
    """One row per record with the headline numbers (seconds, MB, dB); this is records.csv."""
    rows = []
    for r in records:
        row = {"case_id": r["case_id"], "device_class": r["_device"], "run_id": r.get("run_id"),
               "model": r["model"], "backend": r["_backend"], "dtype": r["dtype"], "batch": r["batch"],
               "height": r["height"], "width": r["width"], "steps": r["steps"], "status": r["status"],
               "error_class": r.get("error_class") or "", "reason": r.get("reason") or ""}
        for stat in ("p25", "p50", "p75", "p90", "p99", "mean", "std", "n"):
            row[f"e2e_{stat}_s" if stat != "n" else "e2e_n"] = _get(r, "e2e", stat)
        for stage in (*STACK, "denoise_step", "other"):
            row[f"{stage}_p50_s"] = _get(r, "stages", stage, "p50")
        build = r.get("build") or {}
        row["cold_s"] = r.get("cold_s")
        row["build_total_s"] = sum(v for v in build.values() if _num(v) is not None) if build else None
        row["peak_mb"] = _get(r, "memory", "peak_mb")
        row["parity"] = _get(r, "parity", "verdict")
        row["psnr_db"] = _get(r, "parity", "image", "psnr")
        row["ssim"] = _get(r, "parity", "image", "ssim")
        row["image"] = r.get("image") or ""
        row["source"] = r.get("_source") or ""
        rows.append(row)
    return pd.DataFrame(rows)


# -- sections ---------------------------------------------------------------------------------------------------
def _summary(records: list[dict], dropped: int, gate_result) -> dict:
    by_dev = defaultdict(list)
    for r in records:
        by_dev[r["_device"]].append(r)
    envs = []
    for dev, group in sorted(by_dev.items()):
        env = group[0].get("env") or {}
        gpu = env.get("gpu") or {}
        versions = ", ".join(f"{k} {v}" for k, v in sorted((env.get("versions") or {}).items()) if v)
        driver = [f"driver {gpu['driver']}" if gpu.get("driver") else "", f"CUDA {gpu['cuda']}" if gpu.get("cuda") else ""]
        envs.append({"device": dev, "arch": gpu.get("arch", "") if gpu else "CPU",
                     "platform": env.get("platform", ""), "python": env.get("python", ""),
                     "driver": " / ".join(x for x in driver if x), "versions": versions, "records": len(group),
                     "runs": ", ".join(sorted({str(r.get("run_id")) for r in group}))})
    df = pd.DataFrame({"backend": [r["_backend"] for r in records], "status": [r["status"] for r in records]})
    counts = pd.crosstab(df["backend"], df["status"])
    columns = [s for s in STATUS_ORDER if s in counts.columns] + sorted(set(counts.columns) - set(STATUS_ORDER))
    counts = counts.reindex(columns=columns, fill_value=0)
    counts.loc["total"] = counts.sum()
    totals = {s: int(counts.loc["total", s]) for s in columns}
    gate = None
    if gate_result is not None:
        gate = {"summary": gate_result.summary(), "regressed": gate_result.regressed}
    return {"envs": envs, "counts": _table(counts.reset_index()),
            "totals": totals, "n": len(records), "dropped": dropped, "gate": gate}


def _latency(records: list[dict], pngs: _Pngs) -> list[dict]:
    groups = defaultdict(list)
    for r in records:
        if r["status"] == "passed" and _num(_get(r, "e2e", "p50")) is not None:
            groups[_shape_key(r)].append(r)
    hidden = defaultdict(list)  # never publish a fast wrong result: timings of non-passed cases are not shown
    for r in records:
        if r["status"] != "passed" and _num(_get(r, "e2e", "p50")) is not None:
            hidden[_shape_key(r)].append(f"{r['_backend']} ({r['status']}: {r.get('error_class') or r['status']})")
    out = []
    for key, rows in groups.items():
        dev = key[0]
        labels = [r["_backend"] for r in rows]
        ref = next((r for r in rows if _is_reference(r)), None)
        # stacked stage bars of the p50s; "other" = e2e p50 - the stages (medians do not add exactly: clipped at 0)
        parts = {s: np.array([(_num(_get(r, "stages", s, "p50")) or 0.0) * 1000 for r in rows]) for s in STACK}
        e2e = np.array([_num(r["e2e"]["p50"]) * 1000 for r in rows])
        parts["other"] = np.clip(e2e - sum(parts.values()), 0, None)
        fig = Figure(figsize=(8.5, 1.2 + 0.45 * len(rows)))
        ax = fig.add_subplot()
        left = np.zeros(len(rows))
        for stage, values in parts.items():
            ax.barh(labels, values, left=left, color=STACK_COLORS[stage], label=stage)
            left += values
        for y, (total, r) in enumerate(zip(e2e, rows)):
            speed = f"  ×{_num(ref['e2e']['p50']) / _num(r['e2e']['p50']):.2f}" if ref and r is not ref else ""
            ax.text(total, y, f" {total:.1f} ms{speed}", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("p50 latency (ms) by stage")
        ax.set_xlim(0, max(e2e) * 1.35 if len(e2e) else 1)
        ax.set_title(f"{shape_label(rows[0])} — {dev}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        bars = pngs.save(fig, "latency")
        box = _box_plot(rows, dev, pngs)
        table = []
        for r in rows:
            speedup = (_num(ref["e2e"]["p50"]) / _num(r["e2e"]["p50"])) if ref else None
            table.append({"backend": r["_backend"], "e2e p50 ms": _ms(r["e2e"].get("p50")),
                          "p90 ms": _ms(r["e2e"].get("p90")), "p99 ms": _ms(r["e2e"].get("p99")),
                          "std ms": _ms(r["e2e"].get("std")), "n": r["e2e"].get("n", "–"),
                          **{f"{s} ms": _ms(_get(r, "stages", s, "p50")) for s in (*STACK, "denoise_step")},
                          f"speedup vs {REFERENCE}": f"×{speedup:.2f}" if speedup else "–",
                          "parity": _get(r, "parity", "verdict", default="–")})
        out.append({"title": f"{shape_label(rows[0])} — {dev}", "bars": bars, "box": box,
                    "table": _table(pd.DataFrame(table)), "no_reference": ref is None,
                    "hidden": hidden.get(key, [])})
    return out


def _box_plot(rows: list[dict], dev: str, pngs: _Pngs) -> str:
    """Records carry summary stats, not samples: whiskers min..max, box p25..p75 (p50..p90 for records made before
    quartiles were stored), line at p50, ◆ p99, ▲ mean."""
    stats = []
    quartiles = all(_num(r["e2e"].get("p25")) is not None for r in rows)
    for r in rows:
        e = r["e2e"]
        p50 = _num(e.get("p50")) * 1000
        def ms(k, fallback):
            v = _num(e.get(k))
            return v * 1000 if v is not None else fallback
        box = (ms("p25", p50), ms("p75", p50)) if quartiles else (p50, ms("p90", p50))
        stats.append({"label": r["_backend"], "med": p50, "q1": box[0], "q3": box[1],
                      "whislo": ms("min", p50), "whishi": ms("max", p50), "mean": ms("mean", p50),
                      "fliers": [ms("p99", p50)]})
    fig = Figure(figsize=(7, 0.9 + 0.45 * len(rows)))
    ax = fig.add_subplot()
    ax.bxp(stats, orientation="horizontal", showmeans=True, widths=0.5,
           flierprops={"marker": "D", "markersize": 4, "markerfacecolor": "#e15759"})
    ax.invert_yaxis()
    box = "p25–p75" if quartiles else "p50–p90"
    ax.set_xlabel(f"e2e latency (ms): whiskers min–max, box {box}, ◆ p99, ▲ mean")
    ax.set_title(f"{shape_label(rows[0])} — {dev}", fontsize=9)
    return pngs.save(fig, "latency_box")


def _cold_build(records: list[dict], pngs: _Pngs) -> list[dict]:
    out = []
    by_dev = defaultdict(list)
    for r in records:
        if _num(r.get("cold_s")) is not None or r.get("build"):
            by_dev[r["_device"]].append(r)
    for dev, rows in by_dev.items():
        steps = sorted({k for r in rows for k in (r.get("build") or {})})
        labels = [f"{shape_label(r)} · {r['_backend']}" for r in rows]
        fig = Figure(figsize=(8, 1.0 + 0.35 * len(rows)))
        ax = fig.add_subplot()
        left = np.zeros(len(rows))
        colors = matplotlib.colormaps["tab10"]
        for i, step in enumerate(steps):
            values = np.array([_num((r.get("build") or {}).get(step)) or 0.0 for r in rows])
            ax.barh(labels, values, left=left, label=f"build: {step}", color=colors(i % 10))
            left += values
        cold = [_num(r.get("cold_s")) for r in rows]
        ys = [y for y, c in enumerate(cold) if c is not None]
        ax.scatter([cold[y] for y in ys], ys, marker="|", s=200, color="black", label="cold start", zorder=3)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel("seconds")
        ax.set_title(dev, fontsize=9)
        ax.legend(fontsize=7)
        table = pd.DataFrame([{"case": r["case_id"], "status": r["status"], "cold s": _fmt(r.get("cold_s")),
                               "first call s": _fmt(r.get("first_call_s")),
                               **{f"{s} s": _fmt((r.get("build") or {}).get(s)) for s in steps}} for r in rows])
        out.append({"device": dev, "png": pngs.save(fig, "cold_build"), "table": _table(table)})
    return out


def _memory(records: list[dict], pngs: _Pngs) -> list[dict]:
    out = []
    by_dev = defaultdict(list)
    for r in records:
        if _num(_get(r, "memory", "peak_mb")) is not None:
            by_dev[r["_device"]].append(r)
    for dev, rows in by_dev.items():
        labels = [f"{shape_label(r)} · {r['_backend']}" for r in rows]
        peaks = [_num(r["memory"]["peak_mb"]) for r in rows]
        fig = Figure(figsize=(8, 1.0 + 0.35 * len(rows)))
        ax = fig.add_subplot()
        ax.barh(labels, peaks, color=["#4e79a7" if r["status"] == "passed" else "#e15759" for r in rows])
        for y, v in enumerate(peaks):
            ax.text(v, y, f" {v:.0f}", va="center", fontsize=7)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel("peak memory (MB)")
        ax.set_title(dev, fontsize=9)
        detail_keys = sorted({k for r in rows for k, v in r["memory"].items() if k != "peak_mb" and _num(v) is not None})
        table = pd.DataFrame([{"case": r["case_id"], "status": r["status"], "peak MB": _fmt(r["memory"]["peak_mb"], 5),
                               **{k: _fmt(r["memory"].get(k), 5) for k in detail_keys}} for r in rows])
        out.append({"device": dev, "png": pngs.save(fig, "memory"), "table": _table(table)})
    return out


def _compat(records: list[dict]) -> dict:
    """backend × (device class, model, dtype) cells; several shapes in a cell aggregate to the worst status."""
    devices = sorted({r["_device"] for r in records})
    columns = sorted({(r["_device"], r["model"], r["dtype"]) for r in records})
    backends = sorted({r["_backend"] for r in records}, key=lambda b: (b != REFERENCE, b))
    cells = defaultdict(list)
    for r in records:
        cells[(r["_backend"], r["_device"], r["model"], r["dtype"])].append(r)
    rows = []
    for b in backends:
        row = []
        for col in columns:
            rs = cells.get((b, *col), [])
            if not rs:
                row.append({"cls": "none", "text": "", "title": "not run"})
                continue
            worst = max(rs, key=lambda r: _SEVERITY.get(r["status"], 5))["status"]
            passed = sum(r["status"] == "passed" for r in rs)
            text = worst if len(rs) == 1 else f"{passed}/{len(rs)} passed"
            title = "\n".join(f"{r['case_id']}: {r['status']}" + (f" — {r.get('reason')}" if r.get("reason") else "")
                              for r in rs)
            row.append({"cls": worst if worst in _SEVERITY else "error", "text": text, "title": title})
        rows.append({"backend": b, "cells": row})
    # header rows: device class spans, then model/dtype
    dev_spans = [(d, sum(c[0] == d for c in columns)) for d in devices]
    reasons = pd.DataFrame([{"device": r["_device"], "case": r["case_id"], "status": r["status"],
                             "error class": r.get("error_class") or "", "reason": r.get("reason") or ""}
                            for r in records if r["status"] != "passed"])
    return {"dev_spans": dev_spans, "columns": [{"model": c[1], "dtype": c[2]} for c in columns], "rows": rows,
            "multi_device": len(devices) > 1, "reasons": _table(reasons) if len(reasons) else None}


def _correctness(records: list[dict]) -> dict | None:
    rows = []
    for r in records:
        parity = r.get("parity") or {}
        if not parity:
            continue
        image = parity.get("image") or {}
        psnr = image.get("psnr")
        comps = []
        for name, c in (parity.get("components") or {}).items():
            if isinstance(c, dict):
                mark = "✓" if c.get("passed") else "✗"
                comps.append(f"{name} {mark} (max abs {_fmt(c.get('max_abs'))}, cos {_fmt(c.get('cosine'), 6)})")
        rows.append({"case": r["case_id"], "device": r["_device"], "verdict": parity.get("verdict", "–"),
                     "PSNR dB": ("∞ (identical)" if psnr is None and "psnr" in image and not image.get("error")
                                 else _fmt(psnr, 4)),
                     "SSIM": _fmt(image.get("ssim"), 4), "max abs": _fmt(image.get("max_abs")),
                     "rel L2": _fmt(image.get("rel_l2")), "cosine": _fmt(image.get("cosine"), 6),
                     "components": "; ".join(comps) or "–",
                     "error": image.get("error") or next((c.get("error") for c in (parity.get("components") or {})
                                                          .values() if isinstance(c, dict) and c.get("error")), "")})
    return _table(pd.DataFrame(rows)) if rows else None


def _load_image(r: dict) -> tuple[np.ndarray | None, str]:
    """The record's PNG as float HxWxC in [0,1] (path relative to its records file), or why not."""
    from PIL import Image, UnidentifiedImageError
    base = Path(r["_source"]).parent if r.get("_source") else Path(".")
    path = base / r["image"]
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0, ""
    except (OSError, UnidentifiedImageError) as exc:
        return None, f"image {path} unreadable: {exc.__class__.__name__}"


def _save_array(array: np.ndarray, out_dir: Path, name: str) -> str:
    from PIL import Image
    # not images/: the report may be written into a run folder whose images/ holds the run's own outputs
    (out_dir / IMAGE_DIR).mkdir(exist_ok=True)
    Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(out_dir / IMAGE_DIR / name)
    return f"{IMAGE_DIR}/{name}"


def _images(records: list[dict], out_dir: Path) -> list[dict]:
    groups = defaultdict(list)
    for r in records:
        if r.get("image"):
            groups[_shape_key(r)].append(r)
    out, n = [], 0
    magma = matplotlib.colormaps["magma"]
    for key, rows in groups.items():
        ref = next((r for r in rows if _is_reference(r)), None)
        ref_img, ref_note = _load_image(ref) if ref else (None, f"no {REFERENCE} image for this shape")
        tiles, diffs = [], []
        for r in rows:
            n += 1
            img, note = (ref_img, ref_note) if r is ref else _load_image(r)
            tile = {"backend": r["_backend"], "status": r["status"], "is_ref": r is ref, "src": None, "diff": None,
                    "note": note, "caption": ""}
            if img is not None:
                tile["src"] = _save_array(img, out_dir, f"img_{n:03d}.png")
                if r is not ref and ref_img is not None:
                    if img.shape != ref_img.shape:
                        tile["note"] = f"shape {img.shape} differs from the reference {ref_img.shape}"
                    else:
                        diffs.append((tile, np.abs(img - ref_img).max(axis=-1), f"diff_{n:03d}.png"))
            tiles.append(tile)
        # one colour scale per row of tiles, so that a backend that is further off looks further off
        scale = max([float(d.max()) for _, d, _ in diffs] + [1 / 255])
        for tile, diff, name in diffs:
            tile["diff"] = _save_array(magma(diff / scale)[..., :3], out_dir, name)
            tile["caption"] = f"|Δ| max {diff.max():.3f}, mean {diff.mean():.4f}"
        out.append({"title": f"{shape_label(rows[0])} — {key[0]}", "tiles": tiles, "scale": f"{scale:.3f}",
                    "prompt": " | ".join(rows[0].get("prompt") or [])})
    return out


def _serving(records: list[dict], pngs: _Pngs) -> list[dict]:
    out = []
    for r in records:
        sweep = [p for p in (_get(r, "serving", "sweep") or []) if isinstance(p, dict) and "concurrency" in p]
        if not sweep:
            continue
        sweep = sorted(sweep, key=lambda p: p["concurrency"])
        conc = [p["concurrency"] for p in sweep]
        fig = Figure(figsize=(11, 3.2))
        ax1, ax2, ax3 = fig.subplots(1, 3)
        ax1.plot(conc, [_num(p.get("throughput_rps")) for p in sweep], marker="o")
        ax1.set(xlabel="concurrency", ylabel="throughput (req/s)", title="throughput")
        for stat in ("p50", "p99"):
            ax2.plot(conc, [_num(_get(p, "latency", stat)) for p in sweep], marker="o", label=stat)
        ax2.set(xlabel="concurrency", ylabel="latency (ms)", title="client latency")
        ax2.legend(fontsize=7)
        parts = ("queue_ms", "compute_input_ms", "compute_infer_ms", "compute_output_ms")
        bottom = np.zeros(len(sweep))
        x = np.arange(len(sweep))
        for part in parts:
            values = np.array([_num(_get(p, "server", part)) or 0.0 for p in sweep])
            ax3.bar(x, values, bottom=bottom, label=part.removesuffix("_ms"))
            bottom += values
        ax3.set_xticks(x, [str(c) for c in conc])
        ax3.set(xlabel="concurrency", ylabel="ms per request", title="server: queue / compute")
        ax3.legend(fontsize=7)
        fig.suptitle(f"{r['case_id']} — {r['_device']}", fontsize=9)
        table = pd.DataFrame([{"concurrency": p["concurrency"], "throughput rps": _fmt(p.get("throughput_rps"), 4),
                               **{f"{s} ms": _fmt(_get(p, "latency", s), 4) for s in ("p50", "p90", "p99")},
                               **{f"{k.removesuffix('_ms')} ms": _fmt(_get(p, "server", k), 4) for k in parts}}
                              for p in sweep])
        facts = {k: v for k, v in (r.get("serving") or {}).items() if k != "sweep" and isinstance(v, (str, int, float))}
        out.append({"title": f"{r['case_id']} — {r['_device']}", "png": pngs.save(fig, "serving"),
                    "table": _table(table), "facts": ", ".join(f"{k}: {v}" for k, v in facts.items())})
    return out


def _gate(gate_result) -> dict | None:
    if gate_result is None:
        return None
    order = {"REGRESSED": 0, "IMPROVED": 1, "MISSING": 2, "NEW": 3, "PASS": 4}
    rows = sorted(gate_result.rows, key=lambda r: order.get(r.verdict, 5))
    def frame(rows):
        return pd.DataFrame([{"verdict": r.verdict, "case": r.case_id, "device": r.device_class, "metric": r.metric,
                              "baseline": _fmt(r.baseline, 4) if _num(r.baseline) is not None else (r.baseline or "–"),
                              "current": _fmt(r.current, 4) if _num(r.current) is not None else (r.current or "–"),
                              "change": r.change or "–", "threshold": r.threshold or "–", "note": r.note}
                             for r in rows])
    flagged = [r for r in rows if r.verdict != "PASS"]
    passing = [r for r in rows if r.verdict == "PASS"]
    return {"summary": gate_result.summary(), "regressed": gate_result.regressed,
            "thresholds": ", ".join(gate_result.thresholds),
            "flagged": _table(frame(flagged)) if flagged else None,
            "passing": _table(frame(passing)) if passing else None, "n_passing": len(passing)}


# -- the page ---------------------------------------------------------------------------------------------------
_OUTPUTS = ("latency_[0-9]*.png", "latency_box_[0-9]*.png", "cold_build_[0-9]*.png", "memory_[0-9]*.png",
            "serving_[0-9]*.png", "report_images/img_[0-9]*.png", "report_images/diff_[0-9]*.png")
_ENV = Environment(loader=PackageLoader("reports", "templates"), autoescape=select_autoescape(default=True,
                   default_for_string=True), undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def build_report(records: list[dict], out_dir: Path, gate_result=None, title: str = "diffbench report") -> Path:
    """Write out_dir/report.html, its PNGs and records.csv; return the HTML path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for pattern in _OUTPUTS:  # an earlier report's numbered PNGs would otherwise linger beside the new page
        for old in out_dir.glob(pattern):
            old.unlink()
    records, dropped = _latest(list(records))
    records_frame(records).to_csv(out_dir / "records.csv", index=False)
    pngs = _Pngs(out_dir)
    page = _ENV.get_template("report.html.j2").render(
        title=title, generated=time.strftime("%Y-%m-%d %H:%M:%S"),
        summary=_summary(records, dropped, gate_result) if records else None,
        latency=_latency(records, pngs), cold_build=_cold_build(records, pngs), memory=_memory(records, pngs),
        compat=_compat(records) if records else None, correctness=_correctness(records),
        images=_images(records, out_dir), serving=_serving(records, pngs), gate=_gate(gate_result),
        reference=REFERENCE)
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path

