"""Regression gate: current records vs a baseline, per case id and device class, with a verdict per metric.

Verdicts: PASS, REGRESSED, IMPROVED, NEW (a case only in the current records), MISSING (only in the baseline).
Which metrics are compared, and by how much they may change, is the threshold grammar (harness/thresholds.py);
when a latency change is large enough to count is the noise statistics (harness/noise.py).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from harness import noise
from harness.device import device_class as _env_device_class
from harness.errors import UserError
from harness.records import REQUIRED, check_schema, sanitize, upgrade
from harness.thresholds import DEFAULT_THRESHOLDS, Threshold, parse_thresholds

VERDICTS = ("PASS", "REGRESSED", "IMPROVED", "NEW", "MISSING")
# PSNR of identical images is infinite (stored as null); anything above this is "identical" for the gate.
PSNR_CAP_DB = 100.0


def device_class(record: dict) -> str:
    """GPU name + compute capability, or the CPU model, from record["env"]."""
    env = record.get("env") or {}
    if not env:
        return "unknown device"
    return _env_device_class(env)


# -- comparing -------------------------------------------------------------------------------------------------
@dataclass
class GateRow:
    case_id: str
    device_class: str
    metric: str
    baseline: float | str | None
    current: float | str | None
    change: str
    threshold: str
    verdict: str
    note: str = ""


@dataclass
class GateResult:
    rows: list[GateRow] = field(default_factory=list)
    thresholds: list[str] = field(default_factory=list)

    @property
    def regressed(self) -> bool:
        return any(r.verdict == "REGRESSED" for r in self.rows)

    @property
    def exit_code(self) -> int:
        return 1 if self.regressed else 0

    def counts(self) -> dict[str, int]:
        return {v: sum(r.verdict == v for r in self.rows) for v in VERDICTS}

    def summary(self) -> str:
        counts = ", ".join(f"{n} {v.lower()}" for v, n in self.counts().items() if n)
        return f"gate: {'REGRESSED' if self.regressed else 'PASS'} ({counts or 'nothing compared'})"

    def table(self, all_rows: bool = False) -> str:
        """Terminal table: the rows that are not PASS (all rows with all_rows), then a summary line."""
        shown = [r for r in self.rows if all_rows or r.verdict != "PASS"]
        lines = []
        if shown:
            cols = ("verdict", "case_id", "device_class", "metric", "baseline", "current", "change", "threshold",
                    "note")
            cells = [[_fmt(getattr(r, c)) for c in cols] for r in shown]
            widths = [min(60, max(len(c), *(len(row[i]) for row in cells))) for i, c in enumerate(cols)]
            lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
            for row in cells:
                lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
        lines.append(self.summary())
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return sanitize({"regressed": self.regressed, "exit_code": self.exit_code, "counts": self.counts(),
                         "thresholds": self.thresholds, "rows": [asdict(r) for r in self.rows]})


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _check_records(records: list[dict], side: str) -> None:
    for r in records:
        if not isinstance(r, dict):
            raise UserError(f"{side}: not a diffbench record: {str(r)[:60]!r}")
        missing = [k for k in REQUIRED if k not in r]
        if missing:
            raise UserError(f"{side}: record {r.get('case_id', '?')} is not a diffbench record "
                            f"(missing {', '.join(missing)})")
        check_schema(r, f"{side}: record {r['case_id']}")


def _index(records: list[dict]) -> dict[tuple[str, str], dict]:
    """(case_id, device class) -> the latest record (a rerun of a case supersedes the earlier one)."""
    out: dict[tuple[str, str], dict] = {}
    for r in sorted(records, key=lambda r: r.get("timestamp") or 0):
        out[(r["case_id"], device_class(r))] = r
    return out


def _runs(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(case_id, device class) -> its passed records, the latest per run id (several runs = between-run noise)."""
    latest: dict[tuple[str, str, str], dict] = {}
    for r in sorted(records, key=lambda r: r.get("timestamp") or 0):
        if r.get("status") == "passed":
            latest[(r["case_id"], device_class(r), r.get("run_id", ""))] = r
    out: dict[tuple[str, str], list[dict]] = {}
    for (case_id, dev, _run), r in latest.items():
        out.setdefault((case_id, dev), []).append(r)
    return out


def _latency(record: dict, metric: str) -> dict | None:
    stage, stat = metric.split(".")
    stats = record.get("e2e") if stage == "e2e" else (record.get("stages") or {}).get(stage)
    if not stats or stats.get(stat) is None:
        return None
    return stats


def _psnr(record: dict) -> float | None:
    image = (record.get("parity") or {}).get("image") or {}
    if "psnr" not in image or image.get("error"):
        return None
    value = image["psnr"]
    # null psnr without an error is an identical image (inf does not survive JSON)
    return PSNR_CAP_DB if value is None else min(float(value), PSNR_CAP_DB)


def compare(baseline: list[dict], current: list[dict], thresholds=DEFAULT_THRESHOLDS) -> GateResult:
    """Compare current records with the baseline. thresholds: parse_thresholds() output or a list of specs."""
    if not isinstance(thresholds, dict):
        thresholds = parse_thresholds(list(thresholds))
    _check_records(baseline, "baseline")
    _check_records(current, "current")
    baseline, current = [upgrade(r) for r in baseline], [upgrade(r) for r in current]
    base, cur, base_runs = _index(baseline), _index(current), _runs(baseline)
    result = GateResult(thresholds=[t.spec for t in thresholds.values()])
    for key in sorted(set(base) | set(cur)):
        case_id, dev = key
        b, c = base.get(key), cur.get(key)
        if b is None:
            result.rows.append(GateRow(case_id, dev, "case", None, c["status"], "", "", "NEW",
                                       "not in the baseline for this device class"))
            continue
        if c is None:
            result.rows.append(GateRow(case_id, dev, "case", b["status"], None, "", "", "MISSING",
                                       "in the baseline but not measured now"))
            continue
        result.rows.extend(_compare_case(case_id, dev, b, c, thresholds, base_runs.get(key, [])))
    return result


def _compare_case(case_id: str, dev: str, b: dict, c: dict, thresholds: dict,
                  b_runs: list[dict] = ()) -> list[GateRow]:
    rows = []
    bs, cs = b["status"], c["status"]
    if bs == "passed" and cs != "passed":
        rows.append(GateRow(case_id, dev, "status", bs, cs, f"{bs}→{cs}", "status", "REGRESSED",
                            (c.get("reason") or "")[:200]))
    elif bs != "passed" and cs == "passed":
        rows.append(GateRow(case_id, dev, "status", bs, cs, f"{bs}→{cs}", "status", "IMPROVED", ""))
    else:
        rows.append(GateRow(case_id, dev, "status", bs, cs, "", "status", "PASS",
                            "" if cs == "passed" else "not passed on either side; no metrics compared"))
    if not (bs == cs == "passed"):
        return rows
    for metric, t in thresholds.items():
        if metric == "status":
            continue
        if metric == "memory.peak":
            bv = (b.get("memory") or {}).get("peak_mb")
            cv = (c.get("memory") or {}).get("peak_mb")
            rows.append(_relative_row(case_id, dev, t, bv, cv, band=0.0, unit="MB"))
        elif metric == "parity.psnr":
            rows.append(_psnr_row(case_id, dev, t, _psnr(b), _psnr(c)))
        else:
            sb, sc = _latency(b, metric), _latency(c, metric)
            if sb is None and sc is None:
                continue  # stage not measured by this pipeline on either side
            stat = metric.split(".")[1]
            paired = _pairs(b, c)
            if paired and metric in noise.PAIRED_METRICS and sb and sc:
                rows.append(_paired_row(case_id, dev, t, sb[stat], sc[stat], paired))
                continue
            band = noise.standard_error_band(sb, sc, stat) if sb and sc else 0.0
            kind = noise.STANDARD_ERROR_KIND
            stage = metric.split(".")[0]
            bootstrap = noise.bootstrap_band((b.get("samples") or {}).get(stage),
                                             (c.get("samples") or {}).get(stage), stat)
            if bootstrap:
                band, kind = bootstrap
            bv = sb and sb[stat]
            median, between = noise.between_runs_band([s[stat] for s in (_latency(r, metric) for r in b_runs) if s])
            if median is not None:
                bv = median
                if between > band:
                    band, kind = between, f"{noise.NOISE_K:g} sigma of {len(b_runs)} baseline runs"
            rows.append(_relative_row(case_id, dev, t, bv, sc and sc[stat], band=band, unit="s", noise_kind=kind))
    return rows


def _pairs(b: dict, c: dict) -> dict | None:
    """The per-pair ratio statistics when c was measured interleaved with b (an A/B run), else None."""
    paired = c.get("paired") or {}
    ratio = paired.get("ratio_current_over_baseline") or {}
    if paired.get("with_run") and paired.get("with_run") == b.get("run_id") and (ratio.get("n") or 0) >= 2:
        return ratio
    return None


def _paired_row(case_id, dev, t: Threshold, bv: float, cv: float, ratio: dict) -> GateRow:
    """A/B rule: the change is the median of the per-pair ratios current/baseline, the noise band k standard
    errors of that median -- both sides saw the same machine, so its drift is not in the band."""
    pct, band, kind = noise.paired_band(ratio)
    verdict, note = "PASS", f"paired A/B: median current/baseline call ratio; noise ±{band:.1f}% = {kind}"
    if abs(pct) > t.limit:
        if abs(pct) <= band:
            note = f"{pct:+.1f}% is within the paired noise (±{band:.1f}% = {kind}); not counted"
        else:
            verdict = "REGRESSED" if pct > 0 else "IMPROVED"
    return GateRow(case_id, dev, t.metric, bv, cv, f"{pct:+.1f}%", t.spec, verdict, note)


def _relative_row(case_id, dev, t: Threshold, bv, cv, band: float, unit: str,
                  noise_kind: str = noise.STANDARD_ERROR_KIND) -> GateRow:
    if bv is None or cv is None:
        side = "baseline" if bv is None else "current"
        return GateRow(case_id, dev, t.metric, bv, cv, "", t.spec, "PASS", f"not measured in the {side}; not compared")
    bv, cv = float(bv), float(cv)
    diff = cv - bv
    pct = diff / bv * 100 if bv > 0 else (0.0 if diff == 0 else math.inf)
    change = f"{pct:+.1f}%"
    verdict, note = "PASS", ""
    if abs(pct) > t.limit:
        if band and abs(diff) <= band:
            note = f"{change} is within run-to-run noise (±{band:.4g} {unit} = {noise_kind}); not counted"
        else:
            verdict = "REGRESSED" if diff > 0 else "IMPROVED"
            if band:
                note = f"beyond noise (±{band:.4g} {unit} = {noise_kind})"
    return GateRow(case_id, dev, t.metric, bv, cv, change, t.spec, verdict, note)


def _psnr_row(case_id, dev, t: Threshold, bv, cv) -> GateRow:
    if bv is None or cv is None:
        side = "baseline" if bv is None else "current"
        return GateRow(case_id, dev, t.metric, bv, cv, "", t.spec, "PASS",
                       f"no image PSNR in the {side}; not compared")
    diff = cv - bv
    verdict = "REGRESSED" if diff < -t.limit else "IMPROVED" if diff > t.limit else "PASS"
    note = f"values capped at {PSNR_CAP_DB:g} dB (identical images)" if PSNR_CAP_DB in (bv, cv) else ""
    return GateRow(case_id, dev, t.metric, bv, cv, f"{diff:+.2f}dB", t.spec, verdict, note)
