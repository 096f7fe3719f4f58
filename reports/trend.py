"""The report's trend section: one chart per case and metric over the runs of a history store (harness/verdict/history.py),
change points marked (harness/verdict/history_gate.py finds them), accepted runs marked, the commit under each run."""
from __future__ import annotations

import statistics
import time

from matplotlib.figure import Figure

from harness.verdict import changepoint
from harness.verdict.history_gate import TREND_METRICS, build_series
from harness.verdict.metrics import METRICS
from reports.charts import PngWriter

MAX_TICKS = 40   # past this many runs, every n-th commit is written under the axis


def trend_section(records: list[dict], accepted: set[str], pngs: PngWriter) -> list[dict] | None:
    """[{title, stack, png, changes: [text]}] per series with at least one run; None without history."""
    if not records:
        return None
    out = []
    for series in build_series(records, TREND_METRICS, accepted, whole=True):
        changes = [f"{series.points[i].label} ({series.points[i].run_id})" for i in series.changes]
        out.append({"title": f"{series.metric} — {series.case_id} on {series.device_class}",
                    "stack": series.stack, "png": _chart(series, accepted, pngs), "changes": changes,
                    "runs": len(series.points)})
    return out


def _chart(series, accepted: set[str], pngs: PngWriter) -> str:
    metric = METRICS[series.metric]
    scale, unit = (1000.0, "ms") if metric.unit == "s" else (1.0, metric.unit)
    values = [p.value * scale for p in series.points]
    xs = list(range(len(values)))
    fig = Figure(figsize=(8.5, 3.0))
    ax = fig.add_subplot()
    ax.plot(xs, values, marker="o", markersize=4, color="#4e79a7", linewidth=1)
    for start, stop in changepoint.segments(len(values), series.changes):
        level = statistics.median(values[start:stop])
        ax.hlines(level, start - 0.3, stop - 0.7, colors="#f28e2b", linewidth=2)
    for i in series.changes:
        ax.axvline(i - 0.5, color="#e15759", linestyle="--", linewidth=1.2)
        word = "accepted" if series.points[i].run_id in accepted else "change"
        ax.annotate(word, (i - 0.5, 1), xycoords=("data", "axes fraction"), fontsize=7, color="#e15759",
                    ha="left", va="top")
    for i, p in enumerate(series.points):
        if p.run_id in accepted:
            ax.plot([i], [values[i]], marker="s", markersize=8, markerfacecolor="none", color="#59a14f")
    step = max(1, -(-len(xs) // MAX_TICKS))
    ax.set_xticks(xs[::step])
    ax.set_xticklabels([p.label for p in series.points][::step], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"{series.metric} ({unit})", fontsize=8)
    first, last = (time.strftime("%Y-%m-%d", time.gmtime(series.points[k].timestamp)) for k in (0, -1))
    ax.set_title(f"{series.metric} — {series.case_id}  ({len(xs)} runs, {first} … {last})", fontsize=9)
    return pngs.save(fig, "trend")

