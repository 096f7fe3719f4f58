"""Every PNG the report writes: matplotlib charts (latency by stage, latency boxes, cold start and build, peak memory,
serving sweeps), copies of the output images and their difference maps to the reference."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
# Figure objects render through the Agg canvas on savefig: no pyplot global state, no display, thread-safe
from matplotlib.figure import Figure

from reports.frame import STACK, get, num, shape_label

IMAGE_DIR = "report_images"   # copies of the output images and the difference maps
STACK_COLORS = {"text_encode": "#4e79a7", "denoise": "#f28e2b", "vae_decode": "#59a14f", "other": "#bab0ac"}
SERVER_PARTS = ("queue_ms", "compute_input_ms", "compute_infer_ms", "compute_output_ms")
# the numbered files one report writes; a rebuild into the same folder removes the earlier ones first
OUTPUTS = ("latency_[0-9]*.png", "latency_box_[0-9]*.png", "cold_build_[0-9]*.png", "memory_[0-9]*.png",
           "serving_[0-9]*.png", "fit_[0-9]*.png", "throughput_[0-9]*.png", "trend_[0-9]*.png", f"{IMAGE_DIR}/img_[0-9]*.png", f"{IMAGE_DIR}/diff_[0-9]*.png")


class PngWriter:
    """Saves figures as numbered PNGs beside the page and returns their relative names."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.n = out_dir, 0

    def save(self, fig: Figure, stem: str) -> str:
        self.n += 1
        name = f"{stem}_{self.n:02d}.png"
        fig.tight_layout()
        fig.savefig(self.out_dir / name, dpi=100)
        return name


def remove_outputs(out_dir: Path) -> None:
    for pattern in OUTPUTS:  # an earlier report's numbered PNGs would otherwise linger beside the new page
        for old in out_dir.glob(pattern):
            old.unlink()


def latency_stages(rows: list[dict], ref: dict | None, title: str, pngs: PngWriter) -> str:
    """Stacked stage bars of the p50s; "other" = e2e p50 - the stages (medians do not add exactly: clipped at 0);
    each bar labelled with its e2e p50 and its speed-up against the reference."""
    labels = [r["_backend"] for r in rows]
    parts = {s: np.array([(num(get(r, "stages", s, "p50")) or 0.0) * 1000 for r in rows]) for s in STACK}
    e2e = np.array([num(r["e2e"]["p50"]) * 1000 for r in rows])
    parts["other"] = np.clip(e2e - sum(parts.values()), 0, None)
    fig = Figure(figsize=(8.5, 1.2 + 0.45 * len(rows)))
    ax = fig.add_subplot()
    left = np.zeros(len(rows))
    for stage, values in parts.items():
        ax.barh(labels, values, left=left, color=STACK_COLORS[stage], label=stage)
        left += values
    for y, (total, r) in enumerate(zip(e2e, rows)):
        speed = f"  ×{num(ref['e2e']['p50']) / num(r['e2e']['p50']):.2f}" if ref and r is not ref else ""
        ax.text(total, y, f" {total:.1f} ms{speed}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("p50 latency (ms) by stage")
    ax.set_xlim(0, max(e2e) * 1.35 if len(e2e) else 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return pngs.save(fig, "latency")


def latency_box(rows: list[dict], title: str, pngs: PngWriter) -> str:
    """Records carry summary stats, not samples: whiskers min..max, box p25..p75 (p50..p90 for records made before
    quartiles were stored), line at p50, ◆ p99, ▲ mean."""
    stats = []
    quartiles = all(num(r["e2e"].get("p25")) is not None for r in rows)
    for r in rows:
        e = r["e2e"]
        p50 = num(e.get("p50")) * 1000
        def to_ms(k, fallback):
            v = num(e.get(k))
            return v * 1000 if v is not None else fallback
        box = (to_ms("p25", p50), to_ms("p75", p50)) if quartiles else (p50, to_ms("p90", p50))
        stats.append({"label": r["_backend"], "med": p50, "q1": box[0], "q3": box[1],
                      "whislo": to_ms("min", p50), "whishi": to_ms("max", p50), "mean": to_ms("mean", p50),
                      "fliers": [to_ms("p99", p50)]})
    fig = Figure(figsize=(7, 0.9 + 0.45 * len(rows)))
    ax = fig.add_subplot()
    ax.bxp(stats, orientation="horizontal", showmeans=True, widths=0.5,
           flierprops={"marker": "D", "markersize": 4, "markerfacecolor": "#e15759"})
    ax.invert_yaxis()
    box = "p25–p75" if quartiles else "p50–p90"
    ax.set_xlabel(f"e2e latency (ms): whiskers min–max, box {box}, ◆ p99, ▲ mean")
    ax.set_title(title, fontsize=9)
    return pngs.save(fig, "latency_box")


def cold_build(rows: list[dict], steps: list[str], title: str, pngs: PngWriter) -> str:
    """Stacked build steps per case, with the cold start (load + prepare + first call) as a tick."""
    labels = [f"{shape_label(r)} · {r['_backend']}" for r in rows]
    fig = Figure(figsize=(8, 1.0 + 0.35 * len(rows)))
    ax = fig.add_subplot()
    left = np.zeros(len(rows))
    colors = matplotlib.colormaps["tab10"]
    for i, step in enumerate(steps):
        values = np.array([num((r.get("build") or {}).get(step)) or 0.0 for r in rows])
        ax.barh(labels, values, left=left, label=f"build: {step}", color=colors(i % 10))
        left += values
    cold = [num(r.get("cold_s")) for r in rows]
    ys = [y for y, c in enumerate(cold) if c is not None]
    ax.scatter([cold[y] for y in ys], ys, marker="|", s=200, color="black", label="cold start", zorder=3)
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("seconds")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return pngs.save(fig, "cold_build")


def peak_memory(rows: list[dict], title: str, pngs: PngWriter) -> str:
    """Peak memory bars; cases that did not pass in red; hatched where measured in a process shared with earlier
    cases (their leftovers count too)."""
    from harness.measure.memory import isolated
    labels = [f"{shape_label(r)} · {r['_backend']}" for r in rows]
    peaks = [num(r["memory"]["peak_mb"]) for r in rows]
    fig = Figure(figsize=(8, 1.0 + 0.35 * len(rows)))
    ax = fig.add_subplot()
    bars = ax.barh(labels, peaks, color=["#4e79a7" if r["status"] == "passed" else "#e15759" for r in rows])
    for bar, r in zip(bars, rows):
        if isolated(r) is False:
            bar.set_hatch("//")
    for y, v in enumerate(peaks):
        ax.text(v, y, f" {v:.0f}", va="center", fontsize=7)
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("peak memory (MB)")
    ax.set_title(title, fontsize=9)
    return pngs.save(fig, "memory")


def throughput_by_batch(series: dict[str, list[tuple[int, float]]], title: str, pngs: PngWriter) -> str:
    """Embeddings per second against batch size, one line per backend (log-2 batch axis)."""
    fig = Figure(figsize=(7.5, 3.6))
    ax = fig.add_subplot()
    for backend, points in sorted(series.items()):
        points = sorted(points)
        ax.plot([b for b, _ in points], [v for _, v in points], marker="o", label=backend)
    ax.set_xscale("log", base=2)
    batches = sorted({b for points in series.values() for b, _ in points})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set(xlabel="batch (sentences per call)", ylabel="embeddings / s", title=title)
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    return pngs.save(fig, "throughput")


def fit_pareto(points: list[dict], front: list[int], title: str, pngs: PngWriter) -> str:
    """Batch-1 latency against peak memory for every configuration that passed; the Pareto front (nothing else is
    both smaller and faster) joined and marked."""
    fig = Figure(figsize=(8, 4.2))
    ax = fig.add_subplot()
    ax.scatter([p["peak_mb"] for p in points], [p["p50_ms"] for p in points], color="#bab0ac", zorder=2)
    for p in points:
        ax.annotate(p["label"], (p["peak_mb"], p["p50_ms"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    on_front = sorted((points[i] for i in front), key=lambda p: p["peak_mb"])
    ax.plot([p["peak_mb"] for p in on_front], [p["p50_ms"] for p in on_front], color="#e15759", marker="o",
            zorder=3, label="Pareto front")
    ax.set(xlabel="peak memory at batch 1 (MB)", ylabel="e2e p50 at batch 1 (ms)", title=title)
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    return pngs.save(fig, "fit")


def serving_sweep(sweep: list[dict], title: str, pngs: PngWriter, axis: str = "concurrency") -> str:
    """Throughput, client latency and the server's queue / compute split against concurrency (or, for a sweep in
    request-rate mode, `axis` = "request_rate")."""
    conc = [p[axis] for p in sweep]
    xlabel = "concurrency" if axis == "concurrency" else "request rate (req/s)"
    fig = Figure(figsize=(11, 3.2))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    ax1.plot(conc, [num(p.get("throughput_rps")) for p in sweep], marker="o")
    ax1.set(xlabel=xlabel, ylabel="throughput (req/s)", title="throughput")
    for stat in ("p50", "p99"):   # the sweep records seconds
        ax2.plot(conc, [(num(get(p, "latency", stat)) or 0.0) * 1000 for p in sweep], marker="o", label=stat)
    ax2.set(xlabel=xlabel, ylabel="latency (ms)", title="client latency")
    ax2.legend(fontsize=7)
    bottom = np.zeros(len(sweep))
    x = np.arange(len(sweep))
    for part in SERVER_PARTS:
        values = np.array([num(get(p, "server", part)) or 0.0 for p in sweep])
        ax3.bar(x, values, bottom=bottom, label=part.removesuffix("_ms"))
        bottom += values
    ax3.set_xticks(x, [str(c) for c in conc])
    ax3.set(xlabel=xlabel, ylabel="ms per request", title="server: queue / compute")
    ax3.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return pngs.save(fig, "serving")


def load_image(r: dict) -> tuple[np.ndarray | None, str]:
    """The record's PNG as float HxWxC in [0,1] (path relative to its records file), or why not."""
    from PIL import Image, UnidentifiedImageError
    base = Path(r["_source"]).parent if r.get("_source") else Path(".")
    path = base / r["image"]
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0, ""
    except (OSError, UnidentifiedImageError) as exc:
        return None, f"image {path} unreadable: {exc.__class__.__name__}"


def save_image(array: np.ndarray, out_dir: Path, name: str) -> str:
    """An HxWx3 array in [0,1] as out_dir/IMAGE_DIR/name; returns the page-relative path."""
    from PIL import Image
    # not images/: the report may be written into a run folder whose images/ holds the run's own outputs
    (out_dir / IMAGE_DIR).mkdir(exist_ok=True)
    Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(out_dir / IMAGE_DIR / name)
    return f"{IMAGE_DIR}/{name}"


def save_difference_map(diff: np.ndarray, scale: float, out_dir: Path, name: str) -> str:
    """A per-pixel difference (HxW) coloured with magma on a 0..scale range (black = identical)."""
    return save_image(matplotlib.colormaps["magma"](diff / scale)[..., :3], out_dir, name)
