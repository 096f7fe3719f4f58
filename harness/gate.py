"""Regression gate: current records vs a baseline, per case id and device class.

Threshold grammar (one spec per string; later specs for the same metric win):

    e2e.p50:+10%        end-to-end latency statistic (p50 p90 p99 mean min max) may grow by at most 10 %
    denoise.p50:+10%    the same for a stage of record["stages"] (text_encode, denoise, denoise_step, vae_decode, other)
    memory.peak:+5%     record["memory"]["peak_mb"] may grow by at most 5 %
    parity.psnr:-1dB    record["parity"]["image"]["psnr"] may drop by at most 1 dB
    status              passed before and not passed now is a regression (always applied, listed for clarity)

Aliases from DESIGN.md: latency.<stat> = e2e.<stat>, vram.peak = memory.peak, psnr = parity.psnr.

Noise rule (latency only): records carry summary statistics of n repeats, not samples. A latency change counts only
when it exceeds the threshold AND k = 3 standard errors of the difference of the two runs -- the Welch-test bound
(a ~99.7 % band if the noise were normal). For the median the per-sample spread comes from the quartiles
(1.253 x IQR / 1.349, robust to one stray repeat; std for records without quartiles), for other statistics from the
std (for p99 that underestimates the noise, so tail gates stay the stricter ones). With n = 1 or no spread the
threshold alone decides. A change inside the noise band is PASS with a note that says so.

Between-run noise: on a shared machine whole runs drift (measured here: one unchanged build gave e2e p50 from 57.6
to 101.6 ms over six runs while each run's own std was 1-13 ms), which no within-run spread can see. A baseline that
holds several runs of a case (`diffbench baseline save RUN1 RUN2 ...`) gives the gate that drift: the baseline
value is then the median over its runs, and the noise band is the larger of the within-run bound above and
k x (sample std over the baseline runs) x sqrt(1 + 1/m) -- a prediction band for one new run around m old ones.

Paired rule (A/B runs, harness/ab.py): when the current record was measured call by call in alternation with this
baseline record (record["paired"]["with_run"] is the baseline's run id), e2e.p50 and e2e.mean are judged by the
median of the per-pair ratios current/baseline, with k standard errors of that median as the band: the machine's
drift is common to both calls of a pair and cancels.
"""
from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from harness.device import device_class as _env_device_class
from harness.errors import UserError
from harness.records import REQUIRED, check_schema, load_many, read_records, sanitize, upgrade

VERDICTS = ("PASS", "REGRESSED", "IMPROVED", "NEW", "MISSING")
LATENCY_STATS = ("p50", "p90", "p99", "mean", "min", "max")
STAGE_NAMES = ("e2e", "text_encode", "denoise", "denoise_step", "vae_decode", "other")
NOISE_K = 3.0
# the central statistics an A/B run's per-pair ratios speak for; tails and stages use the unpaired rule
PAIRED_METRICS = ("e2e.p50", "e2e.mean")
BOOTSTRAP_RESAMPLES = 4000
BOOTSTRAP_MIN_CALLS = 8
_STAT_FUNCTIONS = {
    "p50": lambda a: np.percentile(a, 50, axis=-1), "p90": lambda a: np.percentile(a, 90, axis=-1),
    "p99": lambda a: np.percentile(a, 99, axis=-1), "mean": lambda a: a.mean(axis=-1),
    "min": lambda a: a.min(axis=-1), "max": lambda a: a.max(axis=-1)}
# PSNR of identical images is infinite (stored as null); anything above this is "identical" for the gate.
PSNR_CAP_DB = 100.0
DEFAULT_THRESHOLDS = ["status", "e2e.p50:+10%", "e2e.p99:+15%", "memory.peak:+5%", "parity.psnr:-1dB"]
_ALIASES = {"latency": "e2e", "vram": "memory", "psnr": "parity.psnr", "vram.peak": "memory.peak"}


@dataclass(frozen=True)
class Threshold:
    metric: str          # canonical: "status", "e2e.p50", "denoise.p99", "memory.peak", "parity.psnr"
    limit: float = 0.0   # percent for latency/memory, dB for psnr (always positive)
    unit: str = ""       # "%", "dB" or "" (status)

    @property
    def spec(self) -> str:
        if self.metric == "status":
            return "status"
        sign = "-" if self.unit == "dB" else "+"
        return f"{self.metric}:{sign}{self.limit:g}{self.unit}"


_SPEC = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(?::\s*([+-]?)\s*(\d+(?:\.\d+)?)\s*(%|dB|db)\s*)?$")


def _canonical_metric(name: str, spec: str) -> str:
    name = _ALIASES.get(name, name)
    head, _, tail = name.partition(".")
    head = _ALIASES.get(head, head)
    name = f"{head}.{tail}" if tail else head
    if name in ("status", "memory.peak", "parity.psnr"):
        return name
    if head in STAGE_NAMES and tail in LATENCY_STATS:
        return name
    allowed = (f"status, memory.peak, parity.psnr, <stage>.<stat> with stage in {'/'.join(STAGE_NAMES)} "
               f"and stat in {'/'.join(LATENCY_STATS)}")
    raise UserError(f"unknown gate metric {name!r} in threshold {spec!r}; allowed: {allowed}")


def parse_thresholds(specs: list[str]) -> dict[str, Threshold]:
    """Parse threshold specs into {metric: Threshold}. The status rule is always included."""
    out: dict[str, Threshold] = {"status": Threshold("status")}
    for spec in specs:
        if not isinstance(spec, str):
            raise UserError(f"malformed threshold {spec!r}: expected a string such as e2e.p50:+10%")
        m = _SPEC.match(spec)
        if not m:
            raise UserError(f"malformed threshold {spec!r}: expected METRIC:+N% (latency, memory), "
                            f"parity.psnr:-NdB or status")
        name, sign, number, unit = m.groups()
        metric = _canonical_metric(name, spec)
        if metric == "status":
            if number is not None:
                raise UserError(f"malformed threshold {spec!r}: status takes no value")
            continue
        if number is None:
            raise UserError(f"malformed threshold {spec!r}: {metric} needs a limit, e.g. "
                            f"{'-1dB' if metric == 'parity.psnr' else '+10%'}")
        unit = "dB" if unit.lower() == "db" else unit
        want_unit, want_sign = ("dB", "-") if metric == "parity.psnr" else ("%", "+")
        if unit != want_unit or sign not in ("", want_sign):
            raise UserError(f"malformed threshold {spec!r}: {metric} takes {want_sign}N{want_unit} "
                            f"(the direction that is worse)")
        out[metric] = Threshold(metric, float(number), unit)
    return out


def load_thresholds_toml(path: str | Path) -> list[str]:
    """Threshold specs from a TOML file: either `thresholds = ["e2e.p50:+10%", ...]` or a table
    `[thresholds]` of `"e2e.p50" = "+10%"` (and `status = true`)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"cannot read thresholds file {p}: {exc.strerror or exc}")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"malformed thresholds file {p}: {exc}")
    section = data.get("gate", data)  # [gate] thresholds = ... or a top-level thresholds
    table = section.get("thresholds") if isinstance(section, dict) else None
    if isinstance(table, list) and all(isinstance(s, str) for s in table):
        return list(table)
    if isinstance(table, dict):
        specs = []
        for metric, value in table.items():
            if value is True and metric == "status":
                specs.append("status")
            elif isinstance(value, str):
                specs.append(f"{metric}:{value}")
            else:
                raise UserError(f"thresholds file {p}: {metric} = {value!r} must be a string such as \"+10%\"")
        return specs
    raise UserError(f"thresholds file {p}: expected `thresholds = [\"e2e.p50:+10%\", ...]` or a [thresholds] table")


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


def _between_runs(runs: list[dict], metric: str) -> tuple[float | None, float]:
    """Median of a latency metric over baseline runs and its k-sigma prediction band (0 with fewer than 2 runs)."""
    stat = metric.split(".")[1]
    values = [s[stat] for s in (_latency(r, metric) for r in runs) if s]
    if len(values) < 2:
        return None, 0.0
    values.sort()
    mid = len(values) // 2
    median = values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return median, NOISE_K * std * math.sqrt(1 + 1 / len(values))


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


def compare(baseline: list[dict], current: list[dict], thresholds) -> GateResult:
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
            rows.append(_relative_row(case_id, dev, t, bv, cv, noise=0.0, unit="MB"))
        elif metric == "parity.psnr":
            rows.append(_psnr_row(case_id, dev, t, _psnr(b), _psnr(c)))
        else:
            sb, sc = _latency(b, metric), _latency(c, metric)
            if sb is None and sc is None:
                continue  # stage not measured by this pipeline on either side
            stat = metric.split(".")[1]
            paired = _pairs(b, c)
            if paired and metric in PAIRED_METRICS and sb and sc:
                rows.append(_paired_row(case_id, dev, t, sb[stat], sc[stat], paired))
                continue
            noise = _noise(sb, sc, stat) if sb and sc else 0.0
            kind = f"{NOISE_K:g} standard errors of the difference"
            bootstrap = _bootstrap_noise(b, c, metric)
            if bootstrap is not None:
                noise, kind = bootstrap
            bv = sb and sb[stat]
            median, between = _between_runs(list(b_runs), metric)
            if median is not None:
                bv = median
                if between > noise:
                    noise, kind = between, f"{NOISE_K:g} sigma of {len(b_runs)} baseline runs"
            rows.append(_relative_row(case_id, dev, t, bv, sc and sc[stat], noise=noise, unit="s", noise_kind=kind))
    return rows


def _median_spread(stats: dict) -> float:
    """Per-sample spread for the standard error of a median: from the quartiles when the record has them
    (1.253 x IQR / 1.349 -- one slow outlier does not widen it), else 1.253 x std."""
    if stats.get("p25") is not None and stats.get("p75") is not None:
        return 1.253 * (stats["p75"] - stats["p25"]) / 1.349
    return 1.253 * (stats.get("std") or 0.0)


def _noise(sb: dict, sc: dict, stat: str = "p50") -> float:
    """k standard errors of the difference between the two runs (0 when a side has no spread)."""
    var = 0.0
    for s in (sb, sc):
        n = s.get("n") or 0
        spread = _median_spread(s) if stat == "p50" else (s.get("std") or 0.0)
        if n > 1:
            var += spread * spread / n
    return NOISE_K * math.sqrt(var)


def _bootstrap_noise(b: dict, c: dict, metric: str) -> tuple[float, str] | None:
    """For an e2e statistic when both records carry their per-call samples: the half-width, on the side of the
    observed change, of a 99.7 % bootstrap interval (the k = 3 equivalent) of the statistic's difference. Honest for
    tails, where std/sqrt(n) is not: a p99 of 50 calls is about their maximum and its interval shows it."""
    stage, stat = metric.split(".")
    xb = np.asarray(((b.get("samples") or {}).get(stage)) or [], dtype=float)
    xc = np.asarray(((c.get("samples") or {}).get(stage)) or [], dtype=float)
    if xb.size < BOOTSTRAP_MIN_CALLS or xc.size < BOOTSTRAP_MIN_CALLS:
        return None   # a handful of calls has too few distinct resamples for a 99.7 % interval
    rng = np.random.default_rng(0)   # a fixed seed: the same records always get the same verdict
    fb = _STAT_FUNCTIONS[stat](xb[rng.integers(0, xb.size, (BOOTSTRAP_RESAMPLES, xb.size))])
    fc = _STAT_FUNCTIONS[stat](xc[rng.integers(0, xc.size, (BOOTSTRAP_RESAMPLES, xc.size))])
    observed = _STAT_FUNCTIONS[stat](xc[None, :])[0] - _STAT_FUNCTIONS[stat](xb[None, :])[0]
    tail = (1 - math.erf(NOISE_K / math.sqrt(2))) / 2
    low, high = np.quantile(fc - fb, [tail, 1 - tail])
    half = observed - low if observed > 0 else high - observed
    return float(max(half, 0.0)), f"99.7 % bootstrap interval from {xb.size}+{xc.size} calls"


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
    pct = (ratio["p50"] - 1) * 100
    band = NOISE_K * _median_spread(ratio) / math.sqrt(ratio["n"]) * 100
    kind = f"{NOISE_K:g} standard errors of the median of {ratio['n']} interleaved call pairs"
    verdict, note = "PASS", f"paired A/B: median current/baseline call ratio; noise ±{band:.1f}% = {kind}"
    if abs(pct) > t.limit:
        if abs(pct) <= band:
            note = f"{pct:+.1f}% is within the paired noise (±{band:.1f}% = {kind}); not counted"
        else:
            verdict = "REGRESSED" if pct > 0 else "IMPROVED"
    return GateRow(case_id, dev, t.metric, bv, cv, f"{pct:+.1f}%", t.spec, verdict, note)


def _relative_row(case_id, dev, t: Threshold, bv, cv, noise: float, unit: str,
                  noise_kind: str = f"{NOISE_K:g} standard errors of the difference") -> GateRow:
    if bv is None or cv is None:
        side = "baseline" if bv is None else "current"
        return GateRow(case_id, dev, t.metric, bv, cv, "", t.spec, "PASS", f"not measured in the {side}; not compared")
    bv, cv = float(bv), float(cv)
    diff = cv - bv
    pct = diff / bv * 100 if bv > 0 else (0.0 if diff == 0 else math.inf)
    change = f"{pct:+.1f}%"
    verdict, note = "PASS", ""
    if abs(pct) > t.limit:
        if noise and abs(diff) <= noise:
            note = f"{change} is within run-to-run noise (±{noise:.4g} {unit} = {noise_kind}); not counted"
        else:
            verdict = "REGRESSED" if diff > 0 else "IMPROVED"
            if noise:
                note = f"beyond noise (±{noise:.4g} {unit} = {noise_kind})"
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


# -- baselines ---------------------------------------------------------------------------------------------------
def load_baseline(path: str | Path) -> list[dict]:
    """A baseline file (records JSONL); bad or foreign files are UserError."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"baseline {p} does not exist")
    try:
        return read_records(p)
    except UserError as exc:
        raise UserError(f"baseline: {exc}")


def save_baseline(records_paths, out_file: str | Path) -> Path:
    """Merge records files into one baseline JSONL: the latest record per (case id, device class, run id) -- so
    several runs give the gate their between-run spread -- without the image path (it is relative to the run
    folder and means nothing beside the baseline)."""
    if isinstance(records_paths, (str, Path)):
        records_paths = [records_paths]
    records = load_many(records_paths)
    out = Path(out_file)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as fh:
            latest = {(r["case_id"], device_class(r), r.get("run_id", "")): r
                      for r in sorted(records, key=lambda r: r.get("timestamp") or 0)}
            for r in latest.values():
                data = {k: v for k, v in r.items() if k != "_source"}
                data["image"] = ""
                fh.write(json.dumps(sanitize(data), allow_nan=False) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write baseline {out}: {exc.strerror or exc}")
    return out
