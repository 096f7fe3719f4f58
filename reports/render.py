"""The report page: one HTML page (Jinja2, autoescaped) built from sections, with its PNGs and records.csv beside it.

Every section is built from whatever the records hold and left out when they hold nothing for it, so a run of
only unsupported rows, without images or without serving data still renders. The numbers come from
reports/frame.py, the PNGs from reports/charts.py.
"""
from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from reports import charts
from reports.frame import (REFERENCE, STACK, STATUS_ORDER, backend_spec, fmt, get, is_reference, latest, ms, num,
                           records_frame, shape_key, shape_label, table)
from reports.trend import trend_section

# worst first: the colour of a heatmap cell that aggregates several shapes
_SEVERITY = {"error": 4, "failed": 3, "interrupted": 2, "over_budget": 1.5, "unsupported": 1, "passed": 0}
# stages a component timed alone maps to (harness.measure.parity.stages_alone)
_ALONE_STAGES = ("text_encode", "denoise_step", "vae_decode", "encode")


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
    return {"envs": envs, "counts": table(counts.reset_index()),
            "totals": totals, "n": len(records), "dropped": dropped, "gate": gate}


def _synthetic(records: list[dict]) -> dict | None:
    """How many of the report's records are made up (`synthetic: true`) and from which runs; None when none is."""
    made_up = [r for r in records if r.get("synthetic")]
    if not made_up:
        return None
    return {"n": len(made_up), "total": len(records),
            "runs": sorted({str(r.get("run_id")) for r in made_up})}


def _latency(records: list[dict], pngs: charts.PngWriter) -> list[dict]:
    groups = defaultdict(list)
    for r in records:
        if r["status"] == "passed" and num(get(r, "e2e", "p50")) is not None:
            groups[shape_key(r)].append(r)
    hidden = defaultdict(list)  # never publish a fast wrong result: timings of non-passed cases are not shown
    for r in records:
        if r["status"] != "passed" and num(get(r, "e2e", "p50")) is not None:
            hidden[shape_key(r)].append(f"{r['_backend']} ({r['status']}: {r.get('error_class') or r['status']})")
    out = []
    for key, rows in groups.items():
        title = f"{shape_label(rows[0])} — {key[0]}"
        ref = next((r for r in rows if is_reference(r)), None)
        external = any(get(r, "info", "triton", "server") == "external" for r in rows)   # --triton-url
        rows_out = []
        for r in rows:
            speedup = (num(ref["e2e"]["p50"]) / num(r["e2e"]["p50"])) if ref else None
            rows_out.append({"backend": r["_backend"], "e2e p50 ms": ms(r["e2e"].get("p50")),
                             "p90 ms": ms(r["e2e"].get("p90")), "p99 ms": ms(r["e2e"].get("p99")),
                             "std ms": ms(r["e2e"].get("std")), "n": r["e2e"].get("n", "–"),
                             **{f"{s} ms": ms(get(r, "stages", s, "p50")) for s in (*STACK, "denoise_step")},
                             f"speedup vs {REFERENCE}": f"×{speedup:.2f}" if speedup else "–",
                             "parity": get(r, "parity", "verdict", default="–"),
                             **({"served by": _served_by(r)} if external else {})})
        out.append({"title": title, "bars": charts.latency_stages(rows, ref, title, pngs),
                    "box": charts.latency_box(rows, title, pngs), "table": table(pd.DataFrame(rows_out)),
                    "integration": _integration(rows), "findings": [f"{r['_backend']}: {f}" for r in rows
                                                                    for f in r.get("findings") or []],
                    "no_reference": ref is None, "hidden": hidden.get(key, [])})
    return out


def _integration(rows: list[dict]) -> dict | None:
    """Per stage: the in-pipeline p50, the component alone on the reference's inputs, and their ratio."""
    out = []
    for r in rows:
        for stage in _ALONE_STAGES:
            stats = get(r, "stages", stage) or {}
            if not stats.get("alone"):
                continue
            ratio = num(stats.get("integration"))
            out.append({"backend": r["_backend"], "stage": stage, "in pipeline p50 ms": ms(stats.get("p50")),
                        "alone p50 ms": ms(get(stats, "alone", "p50")),
                        "pipeline / alone": f"×{ratio:.2f}" + (" ⚠" if ratio and ratio > 1.5 else "")
                        if ratio else "–"})
    return table(pd.DataFrame(out)) if out else None


def _cold_build(records: list[dict], pngs: charts.PngWriter) -> list[dict]:
    out = []
    by_dev = defaultdict(list)
    for r in records:
        if num(r.get("cold_s")) is not None or r.get("build"):
            by_dev[r["_device"]].append(r)
    for dev, rows in by_dev.items():
        steps = sorted({k for r in rows for k in (r.get("build") or {})})
        df = pd.DataFrame([{"case": r["case_id"], "status": r["status"], "cold s": fmt(r.get("cold_s")),
                            "first call s": fmt(r.get("first_call_s")),
                            **{f"{s} s": fmt((r.get("build") or {}).get(s)) for s in steps}} for r in rows])
        out.append({"device": dev, "png": charts.cold_build(rows, steps, dev, pngs), "table": table(df)})
    return out


def _memory(records: list[dict], pngs: charts.PngWriter) -> list[dict]:
    out = []
    by_dev = defaultdict(list)
    for r in records:
        if num(get(r, "memory", "peak_mb")) is not None:
            by_dev[r["_device"]].append(r)
    for dev, rows in by_dev.items():
        df = pd.DataFrame([_memory_row(r) for r in rows]).dropna(axis=1, how="all")
        out.append({"device": dev, "png": charts.peak_memory(rows, dev, pngs), "table": table(df)})
    return out


_PHASE_FIELDS = (("rss_mb", "this process"), ("children_mb", "children"), ("gpu_process_mb", "GPU process tree"),
                 ("gpu_device_mb", "GPU device"), ("torch_reserved_mb", "torch reserved"))


def measured_in(r: dict) -> str:
    """Where a record's memory was measured: its own worker process, or a process shared with earlier cases."""
    from harness.measure.memory import isolated
    where = isolated(r)
    if where is None:
        return "not recorded"
    if where:
        return "own worker process"
    before = get(r, "memory", "cases_before")
    if not isinstance(before, int):
        return "shared process"
    return "shared process, its first case" if before == 0 else f"shared process, after {before} case(s)"


def _memory_row(r: dict) -> dict:
    """Peak of the process tree per phase, the inference phase's parts, energy per call (GPU)."""
    memory = r["memory"]
    row = {"case": r["case_id"], "status": r["status"], "peak MB (inference)": fmt(memory["peak_mb"], 5),
           "measured in": measured_in(r)}
    for phase in ("load", "build"):
        row[f"{phase} peak MB"] = fmt(get(memory, phase, "peak_mb"), 5) if memory.get(phase) else None
    if num(get(memory, "weights_mb", "total")) is not None:   # as stored: quantised weights at their real size
        row["weights MB"] = fmt(memory["weights_mb"]["total"], 5)
    inference = memory.get("inference") or {}
    for key, label in _PHASE_FIELDS:
        if num(inference.get(key)) is not None:
            row[f"{label} MB"] = fmt(inference[key], 5)
    if num(inference.get("left_out_mb")):
        row["left out MB"] = f"{fmt(inference['left_out_mb'], 5)} ({'; '.join(inference.get('left_out') or [])})"
    if inference.get("peak_source"):
        row["peak from"] = inference["peak_source"]
    if num(get(r, "budget", "limit_mb")) is not None:
        row["budget MB"] = fmt(r["budget"]["limit_mb"], 5)
    energy = r.get("energy") or {}
    if num(energy.get("joules_per_call")) is not None:
        row["J / call"] = fmt(energy["joules_per_call"], 4)
        row["W mean"] = fmt(energy.get("watts_mean"), 4)
    return row


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
                row.append({"cls": "none", "text": "", "title": "not run", "why": ""})
                continue
            worst_record = max(rs, key=lambda r: _SEVERITY.get(r["status"], 5))
            worst = worst_record["status"]
            passed = sum(r["status"] == "passed" for r in rs)
            text = worst if len(rs) == 1 else f"{passed}/{len(rs)} passed"
            title = "\n".join(f"{r['case_id']}: {r['status']}" + (f" — {r.get('reason')}" if r.get("reason") else "")
                              for r in rs)
            row.append({"cls": worst if worst in _SEVERITY else "error", "text": text, "title": title,
                        "why": _short_reason(worst_record) if worst != "passed" else ""})
        rows.append({"backend": b, "cells": row})
    # header rows: device class spans, then model/dtype
    dev_spans = [(d, sum(c[0] == d for c in columns)) for d in devices]
    reasons = pd.DataFrame([{"device": r["_device"], "case": r["case_id"], "status": r["status"],
                             "error class": r.get("error_class") or "", "reason": r.get("reason") or ""}
                            for r in records if r["status"] != "passed"])
    stacks = {d: _stack_summary(next(r for r in records if r["_device"] == d)) for d in devices}
    return {"dev_spans": dev_spans, "columns": [{"model": c[1], "dtype": c[2]} for c in columns], "rows": rows,
            "multi_device": len(devices) > 1, "reasons": table(reasons) if len(reasons) else None,
            "stacks": stacks}


def _short_reason(r: dict) -> str:
    """What does not fit, without the fix (the tooltip and the reasons table hold the whole reason)."""
    reason = (r.get("reason") or "").split("; ")[0]
    if r["status"] in ("failed", "error") and r.get("error_class"):
        reason = f"{r['error_class']}: {reason}"
    reason = reason.split(": install")[0].split(": pip ")[0].split(": run with")[0]
    return reason if len(reason) <= 70 else reason[:69] + "…"


def _stack_summary(r: dict) -> str:
    """The stack behind a device class's verdicts, as one line (torch build and arch list, driver, ORT...)."""
    from harness.judge import preflight
    try:
        return preflight.Stack.from_env(r.get("env") or {}).summary()
    except Exception:   # records older than the stack facts (schema 1): nothing to summarise
        return ""


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
                comps.append(f"{name} not compared ({c['skipped']})" if c.get("skipped") else
                             f"{name} {mark} (max abs {fmt(c.get('max_abs'))}, cos {fmt(c.get('cosine'), 6)})")
        rows.append({"case": r["case_id"], "device": r["_device"], "verdict": parity.get("verdict", "–"),
                     "PSNR dB": ("∞ (identical)" if psnr is None and "psnr" in image and not image.get("error")
                                 else fmt(psnr, 4)),
                     "SSIM": fmt(image.get("ssim"), 4),
                     "last call": _last_call(parity), "max abs": fmt(image.get("max_abs")),
                     "rel L2": fmt(image.get("rel_l2")), "cosine": fmt(image.get("cosine"), 6),
                     "components": "; ".join(comps) or "–",
                     "error": image.get("error") or next((c.get("error") for c in (parity.get("components") or {})
                                                          .values() if isinstance(c, dict) and c.get("error")), "")})
    return table(pd.DataFrame(rows)) if rows else None


def _embedding(records: list[dict], pngs: charts.PngWriter) -> list[dict]:
    """Text-embedding cases: embeddings/s against batch per backend (one chart per device, model, dtype and
    sequence length), the latency percentiles, and the parity table (cosine per sentence, nearest neighbours)."""
    groups = defaultdict(list)
    for r in records:
        if r.get("seq") and r.get("variant") != "serving":
            groups[(r["_device"], r["model"], r["dtype"], r["seq"])].append(r)
    out = []
    for (dev, model, dtype, seq), rows in sorted(groups.items()):
        series = defaultdict(list)
        for r in rows:
            if r["status"] == "passed" and num(get(r, "throughput", "per_s")) is not None:
                series[r["_backend"]].append((r["batch"], num(r["throughput"]["per_s"])))
        title = f"{model} {dtype} seq{seq} — {dev}"
        latency = pd.DataFrame([{"backend": r["_backend"], "batch": r["batch"], "status": r["status"],
                                 "p50 ms": ms(get(r, "e2e", "p50")), "p90 ms": ms(get(r, "e2e", "p90")),
                                 "p99 ms": ms(get(r, "e2e", "p99")),
                                 "embeddings/s": fmt(get(r, "throughput", "per_s"), 4), "served by": _served_by(r)}
                                for r in sorted(rows, key=lambda r: (r["batch"], r["_backend"]))])
        parity = pd.DataFrame([{"backend": r["_backend"], "batch": r["batch"],
                                "verdict": get(r, "parity", "verdict", default="–"),
                                "min cosine": fmt(get(r, "parity", "embedding", "min_cosine"), 7),
                                "mean cosine": fmt(get(r, "parity", "embedding", "mean_cosine"), 7),
                                "last call min cosine": fmt(get(r, "parity", "embedding_last", "min_cosine"), 7),
                                "same nearest": f"{get(r, 'parity', 'ranking', 'same_nearest')}/"
                                                f"{get(r, 'parity', 'ranking', 'ranked')}"
                                if get(r, "parity", "ranking") else "–",
                                "tolerance": fmt(get(r, "parity", "embedding", "tolerance", "min_cosine"), 5)}
                               for r in rows if r.get("parity")])
        out.append({"title": title, "png": charts.throughput_by_batch(series, title, pngs) if series else None,
                    "latency": table(latency), "parity": table(parity) if len(parity) else None})
    return out


def _served_by(r: dict) -> str:
    """Which server measured a case it did not start (--triton-url), and which served model and version."""
    triton = get(r, "info", "triton") or {}
    if triton.get("server") != "external":
        return "–"
    model = triton.get("served_model") or ", ".join((triton.get("served") or {}).values())
    # the version the case's calls reached; else the versions the server had ready
    versions = triton.get("measured_version") or "/".join(triton.get("served_versions") or [])
    return f"{model}{' v' + versions if versions else ''} on {triton.get('server_version') or 'triton'} " \
           f"at {triton.get('url')}"


def _last_call(parity: dict) -> str:
    """The last measured call's image check (a backend right only on its first call fails here)."""
    last = parity.get("image_last")
    if not last:
        return "–"
    if not last.get("passed"):
        return f"✗ {last.get('error') or ''}".strip()
    psnr = last.get("psnr")
    return "✓ identical" if psnr is None else f"✓ {fmt(psnr, 4)} dB"


def _fit(fit: dict | None, records: list[dict], pngs: charts.PngWriter) -> dict | None:
    """What fits in N GB: the fit's table (fastest configuration per budget first) and latency against peak memory
    at batch 1 for every configuration that passed, with the Pareto front."""
    if not fit:
        return None
    from harness.measure import fit as fitting
    rows = [{"budget": f"{row['budget_mb']:g} MB", "configuration": ("★ " if row.get("fastest") else "")
             + row["configuration"], "e2e p50 ms (batch 1)": fmt(row["e2e_p50_ms"], 4),
             "largest batch": row["largest_batch"], "peak MB at largest": fmt(row["peak_mb_at_largest"], 5),
             "success rate": f"{row['success_rate']:.0%}" if row["success_rate"] is not None else "–",
             "images/s at largest": fmt(row.get("images_per_s_at_largest"), 4)} for row in fit["table"]]
    points = []
    for r in records:
        if r["batch"] == 1 and r["status"] == "passed" and num(get(r, "memory", "peak_mb")) is not None \
                and num(get(r, "e2e", "p50")) is not None and not any(p["label"] == r["_backend"] for p in points):
            points.append({"label": r["_backend"], "peak_mb": num(r["memory"]["peak_mb"]),
                           "p50_ms": num(r["e2e"]["p50"]) * 1000})
    plan = fit.get("plan") or {}
    title = f"{plan.get('model', '')} {plan.get('height')}x{plan.get('width')} {plan.get('dtype')} s{plan.get('steps')}"
    png = charts.fit_pareto(points, fitting.pareto_front([(p["peak_mb"], p["p50_ms"]) for p in points]), title,
                            pngs) if points else None
    stopped = [f"{s['configuration']} under {s['budget_mb']:g} MB: {s['stopped']}" for s in fit.get("searches", [])
               if s.get("stopped")]
    return {"title": title, "table": table(pd.DataFrame(rows)), "png": png, "stopped": stopped,
            "max_batch": plan.get("max_batch"), "time_cap_s": plan.get("time_cap_s")}


def _images(records: list[dict], out_dir: Path) -> list[dict]:
    groups = defaultdict(list)
    for r in records:
        if r.get("image"):
            groups[shape_key(r)].append(r)
    out, n = [], 0
    for key, rows in groups.items():
        ref = next((r for r in rows if is_reference(r)), None)
        ref_img, ref_note = charts.load_image(ref) if ref else (None, f"no {REFERENCE} image for this shape")
        tiles, diffs = [], []
        for r in rows:
            n += 1
            img, note = (ref_img, ref_note) if r is ref else charts.load_image(r)
            tile = {"backend": r["_backend"], "status": r["status"], "is_ref": r is ref, "src": None, "diff": None,
                    "note": note, "caption": ""}
            if img is not None:
                tile["src"] = charts.save_image(img, out_dir, f"img_{n:03d}.png")
                if r is not ref and ref_img is not None:
                    if img.shape != ref_img.shape:
                        tile["note"] = f"shape {img.shape} differs from the reference {ref_img.shape}"
                    else:
                        diffs.append((tile, np.abs(img - ref_img).max(axis=-1), f"diff_{n:03d}.png"))
            tiles.append(tile)
        # one colour scale per row of tiles, so that a backend that is further off looks further off
        scale = max([float(d.max()) for _, d, _ in diffs] + [1 / 255])
        for tile, diff, name in diffs:
            tile["diff"] = charts.save_difference_map(diff, scale, out_dir, name)
            tile["caption"] = f"|Δ| max {diff.max():.3f}, mean {diff.mean():.4f}"
        out.append({"title": f"{shape_label(rows[0])} — {key[0]}", "tiles": tiles, "scale": f"{scale:.3f}",
                    "prompt": " | ".join(rows[0].get("prompt") or [])})
    return out


def _serving(records: list[dict], pngs: charts.PngWriter) -> list[dict]:
    out = []
    for r in records:
        # levels are concurrencies (closed loop), or requests/s for an http service swept in request-rate mode
        points = [p for p in (get(r, "serving", "sweep") or []) if isinstance(p, dict)]
        axis = "concurrency" if any("concurrency" in p for p in points) else "request_rate"
        sweep = [p for p in points if axis in p]
        if not sweep:
            continue
        sweep = sorted(sweep, key=lambda p: p[axis])
        title = f"{r['case_id']} — {r['_device']}"
        df = pd.DataFrame([{axis.replace("_", " "): p[axis], "throughput rps": fmt(p.get("throughput_rps"), 4),
                            **{f"{s} ms": ms(get(p, "latency", s)) for s in ("p50", "p90", "p99")},
                            **{f"{k.removesuffix('_ms')} ms": fmt(get(p, "server", k), 4)
                               for k in charts.SERVER_PARTS},
                            **({"stable": p["stable"]} if "stable" in p else {})}
                           for p in sweep])
        facts = {k: v for k, v in (r.get("serving") or {}).items() if k != "sweep" and isinstance(v, (str, int, float))}
        out.append({"title": title, "png": charts.serving_sweep(sweep, title, pngs, axis), "table": table(df),
                    "facts": ", ".join(f"{k}: {v}" for k, v in facts.items())})
    return out


def _gate(gate_result) -> dict | None:
    if gate_result is None:
        return None
    order = {"REGRESSED": 0, "IMPROVED": 1, "MISSING": 2, "NEW": 3, "PASS": 4}
    rows = sorted(gate_result.rows, key=lambda r: order.get(r.verdict, 5))
    def frame(rows):
        return pd.DataFrame([{"verdict": r.verdict, "case": r.case_id, "device": r.device_class, "metric": r.metric,
                              "baseline": fmt(r.baseline, 4) if num(r.baseline) is not None else (r.baseline or "–"),
                              "current": fmt(r.current, 4) if num(r.current) is not None else (r.current or "–"),
                              "change": r.change or "–", "threshold": r.threshold or "–", "note": r.note}
                             for r in rows])
    flagged = [r for r in rows if r.verdict != "PASS"]
    passing = [r for r in rows if r.verdict == "PASS"]
    return {"summary": gate_result.summary(), "regressed": gate_result.regressed,
            "thresholds": ", ".join(gate_result.thresholds),
            "flagged": table(frame(flagged)) if flagged else None,
            "passing": table(frame(passing)) if passing else None, "n_passing": len(passing)}


# -- the page ---------------------------------------------------------------------------------------------------
_ENV = Environment(loader=PackageLoader("reports", "templates"), autoescape=select_autoescape(default=True,
                   default_for_string=True), undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def build_report(records: list[dict], out_dir: Path, gate_result=None, title: str = "diffbench report",
                 fit: dict | None = None, history=None) -> Path:
    """Write out_dir/report.html, its PNGs and records.csv; return the HTML path. `fit`: a `diffbench fit`
    document (harness/measure/fit.py), shown as its own section. `history`: a history store (harness/verdict/history.py), drawn as
    the trend section."""
    fit_records = list(records)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    charts.remove_outputs(out_dir)
    records, dropped = latest(list(records))
    records_frame(records).to_csv(out_dir / "records.csv", index=False)
    pngs = charts.PngWriter(out_dir)
    page = _ENV.get_template("report.html.j2").render(
        title=title, generated=time.strftime("%Y-%m-%d %H:%M:%S"),
        synthetic=_synthetic(records),
        summary=_summary(records, dropped, gate_result) if records else None,
        latency=_latency(records, pngs), cold_build=_cold_build(records, pngs), memory=_memory(records, pngs),
        compat=_compat(records) if records else None, correctness=_correctness(records),
        images=_images(records, out_dir), serving=_serving(records, pngs), gate=_gate(gate_result),
        embedding=_embedding(records, pngs),
        fit=_fit(fit, [{**r, "_backend": r.get("_backend") or backend_spec(r)} for r in fit_records], pngs),
        reference=REFERENCE,
        trend=trend_section(history.records(), history.accepted_runs(), pngs) if history is not None else None)
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
