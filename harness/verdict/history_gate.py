"""The history gate: the newest runs of each series against the series' first segment since the last accepted change.

    diffbench gate --history STORE [--threshold e2e.p50:+5%]...

A series is one case on one device class with one software stack (harness/verdict/history.py), one metric's value per run,
runs ordered by timestamp (of each case and device class, only the stack measured last is judged); runs that did not pass or did not measure the metric are left out of it ("measured
nothing" is not a value). An accepted run (`diffbench history accept`) starts the series again. With fewer than
MIN_RUNS runs the series is not judged ("not enough history (N of 6 runs)"). Otherwise change points
(harness/verdict/changepoint.py) cut the series into segments; the first segment is the baseline -- fixed until a change is
accepted, so a slow creep cannot move it the way a rolling baseline moves -- and the last segment holds the newest
runs. A metric whose last segment is worse than the first by more than its threshold fails the gate (exit 1),
naming the first run of the earliest segment that crossed the threshold, with its git commit.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from harness.errors import UserError
from harness.verdict import changepoint
from harness.verdict.gate import Verdicts
from harness.verdict.metrics import Metric, METRICS
from harness.verdict.thresholds import Threshold, parse_thresholds

MIN_RUNS = 6
DEFAULT_HISTORY_THRESHOLDS = ["e2e.p50:+5%"]
# what the report's trend section draws: end to end, the stages, memory and parity
TREND_METRICS = ("e2e.p50", "text_encode.p50", "denoise.p50", "vae_decode.p50", "memory.peak", "parity.psnr")


@dataclass
class Point:
    run_id: str
    timestamp: float
    commit: str
    value: float

    @property
    def label(self) -> str:
        """The commit (short) or, outside git, the run id."""
        return self.commit[:10] if self.commit else self.run_id


@dataclass
class Series:
    case_id: str
    device_class: str
    stack: str
    metric: str
    points: list[Point] = field(default_factory=list)   # oldest first, since the last accepted run
    accepted: str = ""                                   # the accepted run the series starts at
    changes: list[int] = field(default_factory=list)     # indices of points where a new segment starts

    def segments(self) -> list[list[Point]]:
        return [self.points[a:b] for a, b in changepoint.segments(len(self.points), self.changes)]


def build_series(records: list[dict], metrics, accepted: set[str] = frozenset(),
                 whole: bool = False) -> list[Series]:
    """Series of the given metrics from a store's records (HistoryStore.records(): each has `_series`), change points
    detected. whole=True keeps the runs before the last accepted one (the report draws them; the gate does not
    judge them): change points are then found within each accepted stretch."""
    by_key: dict[tuple, list[dict]] = {}
    for r in records:
        by_key.setdefault(r["_series"], []).append(r)
    out = []
    for (case_id, dev, stack), rows in sorted(by_key.items()):
        rows.sort(key=lambda r: (r.get("timestamp") or 0, r["run_id"]))
        starts = [i for i, r in enumerate(rows) if r["run_id"] in accepted]
        for name in metrics:
            metric = METRICS[name]
            series = Series(case_id, dev, stack, name)
            cut = starts[-1] if starts and not whole else 0
            if starts and not whole:
                series.accepted = rows[cut]["run_id"]
            stretch_starts = {rows[i]["run_id"] for i in starts}
            stretch: list[Point] = []
            for r in rows[cut:]:
                value = metric.read(r) if r.get("status") == "passed" else None
                if r["run_id"] in stretch_starts and stretch:
                    _close_stretch(series, stretch)
                    stretch = []
                if value is not None:
                    stretch.append(Point(r["run_id"], r.get("timestamp") or 0.0,
                                         (r.get("git") or {}).get("commit") or "", float(value)))
            _close_stretch(series, stretch)
            if series.points:
                out.append(series)
    return out


def _close_stretch(series: Series, stretch: list[Point]) -> None:
    """Append a stretch between accepted runs to the series, with its change points (and one at its start)."""
    if not stretch:
        return
    offset = len(series.points)
    if offset:
        series.changes.append(offset)
    if len(stretch) >= MIN_RUNS:
        series.changes.extend(offset + i for i in changepoint.change_points([p.value for p in stretch]))
    series.points.extend(stretch)


# -- judging -------------------------------------------------------------------------------------------------------
@dataclass
class HistoryRow:
    series: Series
    verdict: str                 # REGRESSED | IMPROVED | PASS | SHORT (not enough history)
    change: str = ""
    culprit: Point | None = None
    note: str = ""

    def line(self) -> str:
        """The verdict and case on the first line; the culprit, the comparison and the stack indented below."""
        s = self.series
        if self.verdict == "SHORT":
            return f"not enough history ({len(s.points)} of {MIN_RUNS} runs): {s.metric} of {s.case_id} on " \
                   f"{s.device_class}"
        lines = [f"{self.verdict} {s.metric} {self.change + ' ' if self.change else ''}{s.case_id} on "
                 f"{s.device_class}"]
        if self.culprit is not None:
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.culprit.timestamp))
            lines.append(f"  first run after the change: {self.culprit.run_id} (commit "
                         f"{self.culprit.commit or 'unknown'}, {when})")
        if self.note:
            lines.append(f"  {self.note}")
        lines.append(f"  stack: {s.stack}" + (f"; series since the accepted run {s.accepted}" if s.accepted else ""))
        return "\n".join(lines)


@dataclass
class HistoryResult(Verdicts):
    rows: list[HistoryRow]
    thresholds: list[str]

    def text(self, all_rows: bool = False) -> str:
        shown = [r for r in self.rows if all_rows or r.verdict not in ("PASS",)]
        short = [r for r in shown if r.verdict == "SHORT"]
        if len(short) == len(self.rows) and len({len(r.series.points) for r in short}) == 1 and not all_rows:
            # nothing to judge anywhere: one line says it
            return f"not enough history ({len(short[0].series.points)} of {MIN_RUNS} runs)"
        counts = {v: sum(r.verdict == v for r in self.rows) for v in ("REGRESSED", "IMPROVED", "PASS", "SHORT")}
        summary = ", ".join(f"{n} {v.lower() if v != 'SHORT' else 'with not enough history'}"
                            for v, n in counts.items() if n)
        lines = [r.line() for r in shown]
        lines.append(f"gate --history: {'REGRESSED' if self.regressed else 'PASS'} ({summary or 'no series'}; "
                     f"thresholds: {', '.join(self.thresholds)})")
        return "\n".join(lines)


def history_thresholds(specs: list[str]) -> list[Threshold]:
    """The change thresholds a history gate judges; a bound is bad input (it needs no history: gate --baseline)."""
    parsed = parse_thresholds(list(specs) or DEFAULT_HISTORY_THRESHOLDS)
    bounds = [t.spec for t in parsed.values() if t.bound]
    if bounds:
        raise UserError(f"gate --history judges changes over runs; the bound {bounds[0]} is judged on one run: "
                        f"use gate --baseline, or run --threshold")
    return [t for t in parsed.values() if t.metric != "status"]


def judge(records: list[dict], accepted: set[str], specs: list[str]) -> HistoryResult:
    thresholds = history_thresholds(specs)
    rows = []
    for t in thresholds:
        for series in _current(build_series(records, [t.metric], accepted)):
            rows.append(_judge_series(series, t, METRICS[t.metric]))
    if not rows:
        raise UserError("the history store holds no passed run with the thresholds' metrics "
                        f"({', '.join(t.spec for t in thresholds)})")
    return HistoryResult(rows, [t.spec for t in thresholds])


def _current(series: list[Series]) -> list[Series]:
    """Per case and device class, the series of the stack measured last: after a stack change the old series is
    history, not a verdict on today's stack."""
    newest: dict[tuple[str, str], Series] = {}
    for s in series:
        key = (s.case_id, s.device_class)
        if key not in newest or s.points[-1].timestamp > newest[key].points[-1].timestamp:
            newest[key] = s
    return [s for s in series if newest[(s.case_id, s.device_class)] is s]


def _change(metric: Metric, base: float, value: float) -> float:
    """How much worse value is than base: percent for most metrics, dB for PSNR; positive = worse."""
    if metric.change_unit == "dB":
        return base - value
    if base == 0:
        return 0.0 if value == 0 else float("inf")
    pct = (value - base) / base * 100
    return -pct if metric.higher_is_better else pct


def _value(metric: Metric, value: float) -> str:
    shown, unit = (value * 1000, "ms") if metric.unit == "s" else (value, metric.unit)
    return f"{shown:.4g} {unit}" if abs(shown) < 1e4 else f"{shown:.0f} {unit}"


def _judge_series(series: Series, t: Threshold, metric: Metric) -> HistoryRow:
    n = len(series.points)
    if n < MIN_RUNS:
        return HistoryRow(series, "SHORT")
    segments = series.segments()
    base = statistics.median(p.value for p in segments[0])
    unit = metric.change_unit
    changes = [_change(metric, base, statistics.median(p.value for p in seg)) for seg in segments]
    last = changes[-1]
    newest = statistics.median(p.value for p in segments[-1])
    shown = (f"{newest - base:+.2f}dB" if unit == "dB" else f"{(newest - base) / base * 100:+.1f}%" if base else "")
    shown += f" ({_value(metric, base)} -> {_value(metric, newest)})"
    first = f"first segment: {len(segments[0])} run(s) from {segments[0][0].label}"
    if len(segments) == 1:
        return HistoryRow(series, "PASS", "", None, f"no change in {n} runs")
    if last > t.limit:
        crossing = next(i for i, c in enumerate(changes) if c > t.limit)
        return HistoryRow(series, "REGRESSED", shown, segments[crossing][0],
                          f"newest {len(segments[-1])} run(s) against the {first}; threshold {t.spec}")
    verdict = "IMPROVED" if -last > t.limit else "PASS"
    return HistoryRow(series, verdict, shown, None,
                      f"{len(segments) - 1} change point(s), newest segment within {t.spec} of the {first}"
                      if verdict == "PASS" else f"against the {first}")


# -- showing -------------------------------------------------------------------------------------------------------
def select(records: list[dict], models=None, backends=None, cases=None) -> list[dict]:
    """The records of the selected models, backend specs (backend+variant) and case-id globs."""
    import fnmatch
    out = []
    for r in records:
        spec = f"{r['backend']}+{r['variant']}" if r.get("variant") else r["backend"]
        if models and r["model"] not in models:
            continue
        if backends and spec not in backends:
            continue
        if cases and not any(fnmatch.fnmatchcase(r["case_id"], pattern) for pattern in cases):
            continue
        out.append(r)
    return out


def show(store, models=None, backends=None, cases=None, metric: str = "e2e.p50") -> str:
    """Every selected series of one metric, run by run, with its change points and accepted runs."""
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; e.g. {', '.join(TREND_METRICS)}")
    records = select(store.records(), models, backends, cases)
    accepted = store.accepted_runs()
    lines = []
    for series in build_series(records, [metric], accepted, whole=True):
        lines.append(f"{series.metric} of {series.case_id} on {series.device_class}\n  stack: {series.stack}")
        changes = set(series.changes)
        for i, p in enumerate(series.points):
            when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(p.timestamp))
            mark = "accepted" if p.run_id in accepted else "<- change" if i in changes else ""
            lines.append(f"  {when}  {p.run_id:<24} {p.commit[:10] or '-':<10} "
                         f"{_value(METRICS[metric], p.value):>12}  {mark}".rstrip())
    selected = len({r["_series"] for r in records})
    lines.append(f"{len(store.runs())} run(s) in {store.path}; {selected} series selected")
    return "\n".join(lines)
