"""summary.md: a short markdown summary of a run for a CI job summary (GitHub's $GITHUB_STEP_SUMMARY, GitLab notes).

Status counts per device class, the fastest and the slowest backend of every shape with their speed-up against the
reference measured beside them, and the gate's verdict when there is one. Only passed cases are timed here, as in
the report: a fast wrong result is never published.
"""
from __future__ import annotations

import math
from pathlib import Path

from harness.measure.device import device_class as _env_device_class
from harness.selection.workloads import is_reference
from reports.frame import shape_label

STATUSES = ("passed", "failed", "error", "over_budget", "unsupported", "interrupted")


def _device(record: dict) -> str:
    env = record.get("env") or {}
    return _env_device_class(env) if env else "unknown device"


def _backend(record: dict) -> str:
    return f"{record['backend']}+{record['variant']}" if record.get("variant") else record["backend"]


def _p50(record: dict) -> float | None:
    value = (record.get("e2e") or {}).get("p50")
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _cell(text) -> str:
    """Markdown table cells: a pipe or a newline would break the row."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _latest(records: list[dict]) -> list[dict]:
    """The latest record per (case id, device class), as the report and the gate read them."""
    keep: dict[tuple, dict] = {}
    for r in sorted(records, key=lambda r: r.get("timestamp") or 0):
        keep[(r["case_id"], _device(r))] = r
    return list(keep.values())


def _speed(record: dict, reference: dict | None) -> str:
    if reference is None or _p50(reference) is None:
        return ""
    return f" ({_p50(reference) / _p50(record):.2f}x vs {reference['backend']})"


def summary_markdown(records: list[dict], gate_result=None, title: str = "diffbench") -> str:
    records = _latest(records)
    devices = sorted({_device(r) for r in records})
    lines = [f"## {_cell(title)}: {len(records)} case(s) on {len(devices)} device class(es)", ""]

    statuses = [s for s in STATUSES if any(r["status"] == s for r in records)]
    statuses += sorted({r["status"] for r in records} - set(STATUSES))
    lines += ["| device class | " + " | ".join(statuses) + " |", "|---" * (len(statuses) + 1) + "|"]
    for dev in devices:
        counts = [sum(r["status"] == s and _device(r) == dev for r in records) for s in statuses]
        lines.append(f"| {_cell(dev)} | " + " | ".join(map(str, counts)) + " |")
    lines.append("")

    shapes: dict[tuple, list[dict]] = {}
    for r in records:
        if r["status"] == "passed" and _p50(r) is not None:
            key = (_device(r), r["model"], r["dtype"], r["batch"], r["height"], r["width"], r["steps"],
                   r.get("seq") or 0)
            shapes.setdefault(key, []).append(r)
    if shapes:
        lines += ["| device class | shape | fastest (e2e p50) | slowest (e2e p50) | fastest vs slowest |",
                  "|---|---|---|---|---|"]
        for key in sorted(shapes):
            rows = sorted(shapes[key], key=lambda r: (_p50(r), _backend(r)))
            fastest, slowest = rows[0], rows[-1]
            dev, shape = key[0], shape_label(fastest)
            # one model per shape, so the only eager reference present is its workload's
            reference = next((r for r in rows if is_reference(r["backend"], r.get("variant", ""))), None)
            fast = f"{_cell(_backend(fastest))} {_p50(fastest) * 1000:.1f} ms{_speed(fastest, reference)}"
            if len(rows) == 1:
                slow, spread = "(one backend)", "-"
            else:
                slow = f"{_cell(_backend(slowest))} {_p50(slowest) * 1000:.1f} ms{_speed(slowest, reference)}"
                spread = f"{_p50(slowest) / _p50(fastest):.2f}x"
            lines.append(f"| {_cell(dev)} | {_cell(shape)} | {fast} | {slow} | {spread} |")
        lines.append("")
    else:
        lines += ["No passed case was timed.", ""]

    not_passed = [r for r in records if r["status"] not in ("passed", "unsupported")]
    if not_passed:
        named = [f"`{r['case_id']}` ({r['status']}" + (f": {r['error_class']}" if r.get("error_class") else "") + ")"
                 for r in not_passed[:10]]
        more = f" and {len(not_passed) - 10} more" if len(not_passed) > 10 else ""
        lines += ["Not passed: " + ", ".join(named) + more, ""]

    if gate_result is not None:
        verdict = "REGRESSED" if gate_result.regressed else "PASS"
        counts = ", ".join(f"{n} {v.lower()}" for v, n in gate_result.counts().items() if n) or "nothing compared"
        lines.append(f"**Gate: {verdict}** ({counts}; thresholds: {', '.join(gate_result.thresholds)})")
        regressed = [row for row in gate_result.rows if row.verdict == "REGRESSED"]
        for row in regressed[:10]:
            lines.append(f"- `{row.case_id}` on {row.device_class}: {row.metric} {row.change} "
                         f"(limit {row.threshold})")
        if len(regressed) > 10:
            lines.append(f"- and {len(regressed) - 10} more")
        lines.append("")
    lines.append("Full report: report.html (with records.csv) beside this file.")
    return "\n".join(lines) + "\n"


def write_summary_markdown(records: list[dict], out_dir: str | Path, gate_result=None) -> Path:
    path = Path(out_dir) / "summary.md"
    path.write_text(summary_markdown(records, gate_result), encoding="utf-8")
    return path
