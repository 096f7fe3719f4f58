"""What every run does at its end, from the CLI and from pytest alike: the summary table, the gate against a
baseline when one is given, and the report."""
from __future__ import annotations

from pathlib import Path


def summary_table(records) -> str:
    """One line per case: status, e2e p50, speed-up vs the reference measured in the same run, PSNR, reason."""
    from harness.workloads import is_reference
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


def gate_and_report(records: list[dict], out_dir: Path, baseline=None, thresholds=(), write_report=True):
    """The gate against a baseline if one is given, then the report. Returns (gate result or None, report path or
    None)."""
    from harness.records import load_many
    result = None
    if baseline:
        from harness import gate
        from harness.thresholds import DEFAULT_THRESHOLDS, parse_thresholds
        result = gate.compare(load_many([baseline]), records, parse_thresholds(list(thresholds) or DEFAULT_THRESHOLDS))
    report = None
    if write_report:
        import reports
        report = reports.build_report(records, out_dir, gate_result=result)
    return result, report
