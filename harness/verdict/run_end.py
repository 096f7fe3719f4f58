"""What every run does at its end, from the CLI and from pytest alike: the summary table, the gate against a
baseline when one is given, and the report (report.html, its PNGs, records.csv, and summary.md for CI)."""
from __future__ import annotations

from pathlib import Path


def summary_table(records) -> str:
    """One line per case: status, e2e p50, speed-up vs the reference measured in the same run, PSNR, reason."""
    from harness.selection.workloads import is_reference
    reference_p50 = {(r.model, r.dtype, r.batch, r.height, r.width, r.steps, r.seq): r.e2e.get("p50")
                     for r in records if is_reference(r.backend, r.variant) and r.status == "passed"}
    rows = [("case", "status", "e2e p50 ms", "vs eager", "psnr dB / cos", "reason")]
    for r in records:
        p50 = r.e2e.get("p50")
        ref = reference_p50.get((r.model, r.dtype, r.batch, r.height, r.width, r.steps, r.seq))
        rows.append((r.case_id, r.status, f"{p50 * 1000:.1f}" if p50 else "-",
                     f"{ref / p50:.2f}x" if p50 and ref else "-", _parity_figure(r.parity or {}),
                     (r.reason or "")[:70]))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def _parity_figure(parity: dict) -> str:
    """PSNR of the image (inf: identical), or the worst cosine of the embeddings."""
    if parity.get("embedding"):
        cosine = parity["embedding"].get("min_cosine")
        return f"{cosine:.6f}" if cosine is not None else "-"
    image = parity.get("image") or {}
    psnr = image.get("psnr")
    if psnr in (None, float("inf")) and image.get("passed"):
        return "inf"
    return f"{psnr:.1f}" if psnr is not None else "-"


def gate_and_report(records: list[dict], out_dir: Path, baseline=None, thresholds=(), write_report=True,
                    history=None):
    """The gate against a baseline if one is given, then the report (with a trend section when given a history
    store). Returns (gate result or None, report path or None)."""
    from harness.records import load_many
    result = None
    if baseline:
        from harness.verdict import gate
        from harness.verdict.thresholds import DEFAULT_THRESHOLDS, parse_thresholds
        result = gate.compare(load_many([baseline]), records, parse_thresholds(list(thresholds) or DEFAULT_THRESHOLDS))
    report = None
    if write_report:
        import reports
        from reports.summary_markdown import write_summary_markdown
        report = reports.build_report(records, out_dir, gate_result=result, history=history)
        write_summary_markdown(records, out_dir, gate_result=result)   # beside report.html, for CI job summaries
    return result, report


def add_to_history(store, records_paths) -> str:
    """`--history STORE` on a run: its records join the history store; returns the line that says so."""
    from harness.verdict.history import HistoryStore
    with HistoryStore(store) as history:
        added = history.add(records_paths)
    return f"history: {sum(n for _, n in added)} record(s) of run {', '.join(r for r, _ in added)} added to {store}"


def junit_properties(record) -> list[tuple[str, str]]:
    """A case's figures as (name, value) pairs for pytest's junit XML (`record_property`): what a CI system shows
    beside the test without opening the report."""
    from harness.measure.device import device_class
    data = record.to_dict() if hasattr(record, "to_dict") else record
    props = [("case_id", data["case_id"]), ("status", data["status"])]
    if data.get("reason"):
        props.append(("reason", data["reason"][:300]))
    e2e = data.get("e2e") or {}
    for stat in ("p50", "p99"):
        if e2e.get(stat) is not None:
            props.append((f"e2e_{stat}_ms", f"{e2e[stat] * 1000:.3f}"))
    image = (data.get("parity") or {}).get("image") or {}
    if (data.get("parity") or {}).get("verdict"):
        props.append(("parity", data["parity"]["verdict"]))
    if "psnr" in image:
        # null PSNR without an error: identical images
        props.append(("psnr_db", "inf" if image["psnr"] is None and not image.get("error") else
                      "-" if image["psnr"] is None else f"{image['psnr']:.2f}"))
    peak = (data.get("memory") or {}).get("peak_mb")
    if peak is not None:
        props.append(("peak_mb", f"{peak:.1f}"))
    if data.get("cold_s") is not None:
        props.append(("cold_s", f"{data['cold_s']:.3f}"))
    env = data.get("env") or {}
    if env:
        props.append(("device_class", device_class(env)))
    if env.get("shard"):
        props.append(("shard", env["shard"]))
    return props
