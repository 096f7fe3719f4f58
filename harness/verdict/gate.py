"""Regression gate: current records vs a baseline, per case id and device class, with a verdict per metric.

Verdicts: PASS, REGRESSED (the row fails the gate: exit 1), IMPROVED, NEW (a case only in the current records),
MISSING (only in the baseline). Which metrics are judged, and how far they may move, is the threshold grammar
(harness/verdict/thresholds.py) over the metric table (harness/verdict/metrics.py); when a latency change is large enough to count
is the noise statistics (harness/verdict/noise.py).

What cannot pass silently: a metric measured in the baseline and missing now, a passed record without latency
samples (e2e.n = 0) when the baseline had them, a bound that cannot be checked on e2e latency. A metric missing only
in the baseline is not compared (PASS with a note); an absolute bound is judged on the current record alone, on new
cases too.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from harness.verdict import noise
from harness.measure.device import device_class as _env_device_class
from harness.errors import UserError
from harness.measure.memory import scope_mismatch
from harness.verdict.metrics import METRICS, PSNR_CAP_DB, Metric, stage_stats
from harness.records import REQUIRED, check_schema, sanitize, upgrade
from harness.verdict.thresholds import DEFAULT_THRESHOLDS, Threshold, parse_thresholds

VERDICTS = ("PASS", "REGRESSED", "IMPROVED", "NEW", "MISSING")
# a case's verdict is its worst row's; markdown lists cases in this order
_CASE_ORDER = ("REGRESSED", "MISSING", "NEW", "IMPROVED", "PASS")


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


class Verdicts:
    """What a gate's result (this one, or the history gate's) says as a whole: any REGRESSED row fails it."""
    rows: list

    @property
    def regressed(self) -> bool:
        return any(r.verdict == "REGRESSED" for r in self.rows)

    @property
    def exit_code(self) -> int:
        return 1 if self.regressed else 0


@dataclass
class GateResult(Verdicts):
    rows: list[GateRow] = field(default_factory=list)
    thresholds: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {v: sum(r.verdict == v for r in self.rows) for v in VERDICTS}

    def summary(self) -> str:
        counts = ", ".join(f"{n} {v.lower()}" for v, n in self.counts().items() if n)
        return f"gate: {'REGRESSED' if self.regressed else 'PASS'} ({counts or 'nothing compared'})"

    def table(self, all_rows: bool = False) -> str:
        """Terminal table: the rows that are not PASS (all rows with all_rows), then a summary line."""
        shown = [r for r in self.rows if all_rows or r.verdict != "PASS" or r.metric == "weights.commit"]
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

    def markdown(self) -> str:
        """A markdown table for a CI job summary: every compared case with its verdict (its worst row's),
        regressions first, the rows that decided it beside it; then a one-line summary."""
        cases: dict[tuple[str, str], list[GateRow]] = {}
        for r in self.rows:
            cases.setdefault((r.case_id, r.device_class), []).append(r)
        verdicts = {key: min((r.verdict for r in rows), key=_CASE_ORDER.index) for key, rows in cases.items()}
        order = sorted(cases, key=lambda key: (_CASE_ORDER.index(verdicts[key]), key))
        lines = ["| verdict | case | device class | metrics |", "|---|---|---|---|"]
        for key in order:
            verdict = verdicts[key]
            shown = f"**{verdict}**" if verdict == "REGRESSED" else verdict
            details = "; ".join(filter(None, map(_md_detail, cases[key])))
            lines.append(f"| {shown} | {_md(key[0])} | {_md(key[1])} | {_md(details) or '–'} |")
        counts = ", ".join(f"{n} {v.lower()}" for v in _CASE_ORDER if (n := list(verdicts.values()).count(v)))
        lines += ["", f"**gate: {'REGRESSED' if self.regressed else 'PASS'}** — {len(cases)} case(s): "
                      f"{counts or 'nothing compared'}; thresholds: {', '.join(self.thresholds)}"]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return sanitize({"regressed": self.regressed, "exit_code": self.exit_code, "counts": self.counts(),
                         "thresholds": self.thresholds, "rows": [asdict(r) for r in self.rows]})


def _md_detail(r: GateRow) -> str:
    """One row as markdown text: metric and change (or value); for a row that is not PASS, its verdict, threshold
    and note. Empty for a passed status (the verdict column says it)."""
    if r.metric in ("case", "weights.commit"):
        return r.note
    if r.metric == "status" and r.verdict == "PASS" and not r.note:
        return ""
    text = f"{r.metric} {r.change or _fmt(r.current)}"
    if r.verdict != "PASS":
        why = "; ".join(x for x in (r.threshold if r.threshold != "status" else "", r.note[:160]) if x)
        return f"{text} {r.verdict}" + (f" ({why})" if why else "")
    return f"{text} ({r.note[:160]})" if r.note and r.metric in ("status", "e2e.n") else text


def _md(text: str) -> str:
    """Text for a markdown table cell: pipes escaped, on one line."""
    return " ".join(str(text).split()).replace("|", "\\|")


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
        if c is None:
            result.rows.append(GateRow(case_id, dev, "case", b["status"], None, "", "", "MISSING",
                                       "in the baseline but not measured now"))
            continue
        if b is None:
            result.rows.append(GateRow(case_id, dev, "case", None, c["status"], "", "", "NEW",
                                       "not in the baseline for this device class"))
        result.rows.extend(_compare_case(case_id, dev, b, c, thresholds, base_runs.get(key, [])))
    return result


def _compare_case(case_id: str, dev: str, b: dict | None, c: dict, thresholds: dict,
                  b_runs: list[dict] = ()) -> list[GateRow]:
    """The rows of one case; b is None for a case new in the current records (only its bounds are judged)."""
    rows = []
    bs, cs = (b or {}).get("status"), c["status"]
    if b is not None:
        rows.append(_status_row(case_id, dev, bs, c))
        commit_row = _weights_commit_row(case_id, dev, b, c)
        if commit_row is not None:
            rows.append(commit_row)
    if cs != "passed":
        return rows   # the status rule has spoken; a case that did not pass has no figures to judge
    base = b if bs == "passed" else None   # a baseline that did not pass has no figures to compare with
    if stage_stats(c, "e2e") is None:
        rows.append(_no_samples_row(case_id, dev, base))
    for t in thresholds.values():
        if t.metric == "status":
            continue
        metric = METRICS[t.metric]
        if t.bound:
            rows.append(_bound_row(case_id, dev, t, metric, base, c, new=b is None))
        elif base is not None:
            row = _change_row(case_id, dev, t, metric, base, c, b_runs)
            if row is not None:
                rows.append(row)
    return rows


def _status_row(case_id: str, dev: str, bs: str, c: dict) -> GateRow:
    cs = c["status"]
    if bs == "passed" and cs != "passed":
        return GateRow(case_id, dev, "status", bs, cs, f"{bs}→{cs}", "status", "REGRESSED",
                       (c.get("reason") or "")[:200])
    if bs != "passed" and cs == "passed":
        return GateRow(case_id, dev, "status", bs, cs, f"{bs}→{cs}", "status", "IMPROVED", "")
    return GateRow(case_id, dev, "status", bs, cs, "", "status", "PASS",
                   "" if cs == "passed" else "not passed on either side; no metrics compared")


def _hub_commits(record: dict) -> dict[str, str]:
    """repo -> commit of every hub snapshot a record ran: the model's and its LoRAs'."""
    weights = record.get("weights") or {}
    entries = [weights, *(weights.get("lora") or [])]
    return {e.get("repo", "the model"): e["commit"] for e in entries if isinstance(e, dict) and e.get("commit")}


def _weights_commit_row(case_id: str, dev: str, b: dict, c: dict) -> GateRow | None:
    """A hub model or LoRA resolved to different commits in the baseline and now (a branch moved): the figures
    compare different weights. Said, not judged: the thresholds still decide the case."""
    bc, cc = _hub_commits(b), _hub_commits(c)
    moved = [(repo, bc[repo], cc[repo]) for repo in sorted(bc.keys() & cc.keys()) if bc[repo] != cc[repo]]
    if not moved:
        return None
    note = "different weights: " + "; ".join(f"{repo} resolved to commit {old[:12]} in the baseline and {new[:12]} "
                                             "now" for repo, old, new in moved)
    return GateRow(case_id, dev, "weights.commit", ", ".join(old[:12] for _, old, _ in moved),
                   ", ".join(new[:12] for _, _, new in moved), "", "", "PASS", note)


def _no_samples_row(case_id: str, dev: str, b: dict | None) -> GateRow:
    """A passed record that timed nothing (no e2e statistics, or n = 0) is not a measured pass."""
    bn = (stage_stats(b, "e2e") or {}).get("n") if b else None
    note = "passed without latency samples (no e2e statistics or e2e.n = 0): nothing was timed"
    if bn:
        return GateRow(case_id, dev, "e2e.n", bn, 0, "", "status", "REGRESSED", f"{note}; the baseline had {bn}")
    side = "the baseline had none either" if b else "no baseline to compare with"
    return GateRow(case_id, dev, "e2e.n", bn, 0, "", "status", "PASS", f"{note}; {side}")


def _missing_row(case_id, dev, t: Threshold, bv, cv) -> GateRow | None:
    """The row of a change threshold when a side lacks the metric; None when both do (not this case's metric)."""
    if bv is None and cv is None:
        return None
    if cv is None:
        return GateRow(case_id, dev, t.metric, bv, None, "", t.spec, "REGRESSED",
                       "measured in the baseline but missing in the current")
    return GateRow(case_id, dev, t.metric, None, cv, "", t.spec, "PASS", "not in the baseline; not compared")


def _change_row(case_id, dev, t: Threshold, metric: Metric, b: dict, c: dict, b_runs) -> GateRow | None:
    """A change against the baseline, with the noise rules for latency."""
    if metric.name == "parity.psnr":
        bv, cv = metric.read(b), metric.read(c)
        return _psnr_row(case_id, dev, t, bv, cv) if None not in (bv, cv) else _missing_row(case_id, dev, t, bv, cv)
    if not metric.stage:
        bv, cv = metric.read(b), metric.read(c)
        if None in (bv, cv):
            return _missing_row(case_id, dev, t, bv, cv)
        mismatch = scope_mismatch(b, c) if metric.name == "memory.peak" else ""
        if mismatch:   # an isolated peak and a shared-process one measure different things
            return GateRow(case_id, dev, t.metric, bv, cv, "", t.spec, "PASS", mismatch)
        return _relative_row(case_id, dev, t, metric, bv, cv, band=0.0)
    sb, sc = stage_stats(b, metric.stage), stage_stats(c, metric.stage)
    bv, cv = (sb or {}).get(metric.stat), (sc or {}).get(metric.stat)
    if None in (bv, cv):
        return _missing_row(case_id, dev, t, bv, cv)
    stat = metric.stat
    paired = _pairs(b, c)
    if paired and metric.name in noise.PAIRED_METRICS:
        return _paired_row(case_id, dev, t, bv, cv, paired)
    band, kind = noise.standard_error_band(sb, sc, stat), noise.STANDARD_ERROR_KIND
    bootstrap = noise.bootstrap_band((b.get("samples") or {}).get(metric.stage),
                                     (c.get("samples") or {}).get(metric.stage), stat)
    if bootstrap:
        band, kind = bootstrap
    median, between = noise.between_runs_band([v for v in (metric.read(r) for r in b_runs) if v is not None])
    if median is not None:
        bv = median
        if between > band:
            band, kind = between, f"{noise.NOISE_K:g} sigma of {len(b_runs)} baseline runs"
    return _relative_row(case_id, dev, t, metric, bv, cv, band=band, noise_kind=kind)


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


def _relative_row(case_id, dev, t: Threshold, metric: Metric, bv, cv, band: float,
                  noise_kind: str = noise.STANDARD_ERROR_KIND) -> GateRow:
    bv, cv = float(bv), float(cv)
    diff = cv - bv
    pct = diff / bv * 100 if bv > 0 else (0.0 if diff == 0 else math.inf)
    change = f"{pct:+.1f}%"
    verdict, note = "PASS", ""
    if abs(pct) > t.limit:
        if band and abs(diff) <= band:
            note = f"{change} is within run-to-run noise (±{band:.4g} {metric.unit} = {noise_kind}); not counted"
        else:
            verdict = "REGRESSED" if (diff > 0) != metric.higher_is_better else "IMPROVED"
            if band:
                note = f"beyond noise (±{band:.4g} {metric.unit} = {noise_kind})"
    return GateRow(case_id, dev, t.metric, bv, cv, change, t.spec, verdict, note)


def _psnr_row(case_id, dev, t: Threshold, bv: float, cv: float) -> GateRow:
    diff = cv - bv
    verdict = "REGRESSED" if diff < -t.limit else "IMPROVED" if diff > t.limit else "PASS"
    note = f"values capped at {PSNR_CAP_DB:g} dB (identical images)" if PSNR_CAP_DB in (bv, cv) else ""
    return GateRow(case_id, dev, t.metric, bv, cv, f"{diff:+.2f}dB", t.spec, verdict, note)


def _bound_row(case_id, dev, t: Threshold, metric: Metric, b: dict | None, c: dict, new: bool) -> GateRow:
    """An absolute bound, judged on the current record alone; the baseline's value is shown beside it."""
    bv, cv = metric.read(b) if b else None, metric.read(c)
    if cv is None:
        if bv is not None or metric.required:
            why = "measured in the baseline" if bv is not None else "every passed case must have latency samples"
            return GateRow(case_id, dev, t.metric, bv, None, "", t.spec, "REGRESSED",
                           f"missing in the current ({why}): the bound cannot be checked")
        return GateRow(case_id, dev, t.metric, None, None, "", t.spec, "PASS",
                       "not measured for this case; the bound is not checked")
    value = float(cv) / metric.bound_units[t.unit]   # in the bound's own unit, as the spec writes it
    holds = cv < t.bound_value if t.bound == "<" else cv > t.bound_value
    relation = t.bound if holds else {"<": "≥", ">": "≤"}[t.bound]
    change = f"{value:.4g}{t.unit} {relation} {t.limit:g}{t.unit}"
    if holds:
        return GateRow(case_id, dev, t.metric, bv, cv, change, t.spec, "PASS", "")
    side = "above" if t.bound == "<" else "below"
    note = f"{side} the bound (judged on the current record alone" + ("; a new case)" if new else ")")
    return GateRow(case_id, dev, t.metric, bv, cv, change, t.spec, "REGRESSED", note)
