"""The history store (harness/verdict/history.py), change points (harness/verdict/changepoint.py) and `diffbench gate --history`
(harness/verdict/history_gate.py), on series built from the real records in tests/fixtures (a CPU run of tiny-sd): each run
of a series is those records with every latency scaled, its own run id, a day's step in time and its own commit."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness.cli import main
from harness.records import RecordWriter, read_records
from harness.verdict import changepoint, gate
from harness.verdict.history import HistoryStore, stack_of

FIXTURE = Path(__file__).parent / "fixtures" / "records-v1.jsonl"
ROOT = Path(__file__).resolve().parent.parent
DAY = 86400.0


def commit_of(i: int) -> str:
    return f"{i + 1:04d}" + "c0ffee" * 6   # 40 hex digits, run i's own


def _scaled(record: dict, factor: float) -> dict:
    """The record with every latency figure (e2e, stages, per-call samples) multiplied by factor."""
    r = copy.deepcopy(record)
    for stats in [r["e2e"], *r["stages"].values()]:
        for key, value in stats.items():
            if key != "n" and isinstance(value, float):
                stats[key] = value * factor
    r["samples"] = {k: [v * factor for v in values] for k, values in r["samples"].items()}
    return r


def write_series(tmp_path: Path, factors, versions: dict | None = None, start: int = 0,
                 backends=("diffusers", "onnxruntime")) -> list[Path]:
    """One run folder per factor (oldest first), from the fixture's real records (tiny-sd on two backends);
    returns the folders."""
    base = [r for r in read_records(FIXTURE) if r["backend"] in backends]
    dirs = []
    for i, factor in enumerate(factors, start):
        run_dir = tmp_path / f"run-{i:02d}"
        with RecordWriter(run_dir / "records.jsonl") as writer:
            for j, record in enumerate(base):
                r = {k: v for k, v in _scaled(record, factor).items() if k != "_source"}
                r["run_id"], r["git"] = f"run-{i:02d}", {"commit": commit_of(i), "dirty": False}
                r["timestamp"] = 1.8e9 + i * DAY + j
                if versions:
                    r["env"] = {**r["env"], "versions": {**r["env"]["versions"], **versions}}
                writer.write(r)
        dirs.append(run_dir)
    return dirs


def noisy(levels, seed: int = 0, noise: float = 0.01) -> list[float]:
    """Each level times (1 + uniform noise within +-noise)."""
    rng = np.random.default_rng(seed)
    return [level * (1 + rng.uniform(-noise, noise)) for level in levels]


def gate_history(store: Path, capsys, *extra: str) -> tuple[int, str]:
    code = main(["gate", "--history", str(store), *extra])
    return code, capsys.readouterr().out


def store_of(tmp_path: Path, factors, **kw) -> Path:
    store = tmp_path / "history.sqlite"
    with HistoryStore(store) as history:
        history.add(write_series(tmp_path, factors, **kw))
    return store


# -- the gate, as the issue asks -------------------------------------------------------------------------------
def test_creeping_series_fails_though_each_step_passes_the_two_run_gate(tmp_path, capsys):
    factors = noisy([1.02 ** i for i in range(8)], seed=1)
    store = store_of(tmp_path, factors)
    runs = [read_records(d) for d in sorted(tmp_path.glob("run-*"))]
    for before, after in zip(runs, runs[1:]):   # each deploy against the previous one: inside +5 %
        assert not gate.compare(before, after, ["e2e.p50:+5%"]).regressed
    code, out = gate_history(store, capsys)
    assert code == 1, out
    assert "REGRESSED e2e.p50" in out and "tiny-sd/diffusers/fp32/b1/64x64/s4" in out


def test_step_fails_naming_the_fifth_runs_commit(tmp_path, capsys):
    store = store_of(tmp_path, noisy([1.0] * 4 + [1.12] * 2, seed=2))
    code, out = gate_history(store, capsys)
    assert code == 1, out
    assert out.count("REGRESSED e2e.p50") == 2    # both cases of the run
    assert out.count(f"first run after the change: run-04 (commit {commit_of(4)}") == 2, out


@pytest.mark.parametrize("levels", [[1.0] * 10, [1.0] * 4 + [1.15] + [1.0] * 4],
                         ids=["flat +-1%", "one +15% run in the middle"])
def test_flat_noisy_series_passes(tmp_path, capsys, levels):
    store = store_of(tmp_path, noisy(levels, seed=3))
    code, out = gate_history(store, capsys)
    assert code == 0, out
    assert "gate --history: PASS" in out


def test_fewer_than_six_runs_is_one_line(tmp_path, capsys):
    store = store_of(tmp_path, [1.0, 1.0, 1.0, 1.3, 1.3])
    code, out = gate_history(store, capsys)
    assert (code, out) == (0, "not enough history (5 of 6 runs)\n")


def test_a_stack_change_starts_a_new_series(tmp_path, capsys):
    """torch 2.13: 4 flat runs, 2 at +20 % (that series alone fails); then torch 2.14 at the +20 % level, 6 runs:
    the new stack's series is flat and the one judged."""
    store = tmp_path / "history.sqlite"
    with HistoryStore(store) as history:
        history.add(write_series(tmp_path, noisy([1.0] * 4 + [1.2] * 2, seed=4)))
        assert gate_history(store, capsys)[0] == 1
        history.add(write_series(tmp_path, noisy([1.2] * 6, seed=5), versions={"torch": "2.14.0+cpu"}, start=6))
    code, out = gate_history(store, capsys, "--all")
    assert code == 0, out
    assert out.count("no change in 6 runs") == 2 and out.count("torch 2.14.0+cpu") == 2
    assert "torch 2.13.0+cpu" not in out


def test_accept_starts_the_series_again(tmp_path, capsys):
    store = store_of(tmp_path, noisy([1.0] * 4 + [1.12] * 6, seed=6))
    assert gate_history(store, capsys)[0] == 1
    assert main(["history", "accept", "--history", str(store), "run-04", "--note", "bigger VAE"]) == 0
    assert "accepted" in capsys.readouterr().out
    code, out = gate_history(store, capsys)
    assert code == 0, out
    assert main(["history", "show", "--history", str(store), "--backend", "diffusers"]) == 0
    shown = capsys.readouterr().out
    assert "tiny-sd/diffusers" in shown and "tiny-sd/onnxruntime" not in shown
    assert "run-04" in shown and "accepted" in shown


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main(["gate"]) == 2
    assert "--baseline FILE and --current RECORDS..., or --history STORE" in capsys.readouterr().err
    assert main(["gate", "--history", str(tmp_path / "missing.sqlite")]) == 2
    assert "does not exist" in capsys.readouterr().err
    store = store_of(tmp_path, [1.0] * 6)
    assert main(["gate", "--history", str(store), "--threshold", "e2e.p50:<10ms"]) == 2
    assert "gate --baseline" in capsys.readouterr().err
    assert main(["history", "accept", "--history", str(store), "no-such-run"]) == 2
    (tmp_path / "not-a-store").write_text("hello, I am not SQLite " * 100)
    assert main(["gate", "--history", str(tmp_path / "not-a-store")]) == 2
    assert "not a diffbench history store" in capsys.readouterr().err


# -- the store -------------------------------------------------------------------------------------------------
def test_store_keeps_records_whole_and_keys_them(tmp_path):
    store = store_of(tmp_path, [1.0, 1.1])
    with HistoryStore(store) as history:
        records = history.records()
        runs = history.runs()
        history.add([tmp_path / "run-01"])   # added again: replaced, not doubled
        assert len(history.records()) == 4
    assert [r.run_id for r in runs] == ["run-00", "run-01"] and runs[1].git_commit == commit_of(1)
    original = read_records(tmp_path / "run-01")[0]
    stored = next(r for r in records if r["run_id"] == "run-01" and r["case_id"] == original["case_id"])
    assert {k: v for k, v in stored.items() if k != "_series"} == {k: v for k, v in original.items()
                                                                    if k != "_source"}
    case_id, device, stack = stored["_series"]
    assert device.startswith("CPU ") and "torch 2.13.0+cpu" in stack and stack == stack_of(original)


_ADDER = """
import sys
from harness.verdict.history import HistoryStore
with HistoryStore(sys.argv[1]) as store:
    for run_dir in sys.argv[2:]:
        store.add([run_dir])     # one transaction per run, as one CI job per run would
"""


def test_two_processes_adding_at_once_lose_nothing(tmp_path):
    dirs = write_series(tmp_path, [1.0] * 24)
    store = tmp_path / "history.sqlite"
    procs = [subprocess.Popen([sys.executable, "-c", _ADDER, str(store), *map(str, half)], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for half in (dirs[::2], dirs[1::2])]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    with HistoryStore(store) as history:
        assert len(history.runs()) == 24 and len(history.records()) == 48
        assert history.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# -- change points alone ----------------------------------------------------------------------------------------
def test_change_points_find_a_step_and_ignore_one_run():
    assert changepoint.change_points(noisy([1.0] * 5 + [1.1] * 5, seed=7)) == [5]
    assert changepoint.change_points(noisy([1.0] * 12, seed=8)) == []
    assert changepoint.change_points(noisy([1.0] * 3 + [1.5] + [1.0] * 8, seed=9)) == []   # one run
    assert changepoint.change_points(noisy([1.0] * 11 + [1.5], seed=10)) == []             # the newest alone
    assert changepoint.change_points(noisy([1.0] * 6 + [1.2] * 6 + [0.9] * 6, seed=11)) == [6, 12]
    assert changepoint.segments(10, [4]) == [(0, 4), (4, 10)]
    with pytest.raises(ValueError):
        changepoint.change_points([1.0, float("nan"), 1.0, 1.0])


def test_history_add_cli_and_run_folder_errors(tmp_path, capsys):
    dirs = write_series(tmp_path, [1.0])
    store = tmp_path / "h.sqlite"
    assert main(["history", "add", "--history", str(store), str(dirs[0])]) == 0
    assert "run run-00: 2 record(s) added" in capsys.readouterr().out
    assert main(["history", "add", "--history", str(store), str(tmp_path / "nope")]) == 2
    assert main(["history", "add", "--history", str(tmp_path), str(dirs[0])]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_report_trend_section(tmp_path, capsys):
    store = store_of(tmp_path, noisy([1.0] * 4 + [1.12] * 3, seed=12), backends=("diffusers",))
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "run-06"), "-o", str(out), "--history", str(store)]) == 0
    html = (out / "report.html").read_text(encoding="utf-8")
    assert 'id="trend"' in html and 'href="#trend"' in html
    # one chart per metric the records carry: e2e, the three stages, peak memory, image PSNR
    assert len(list(out.glob("trend_*.png"))) == html.count('over runs">') == 6
    assert html.count(f"changes at {commit_of(4)[:10]} (run-04)") >= 2    # e2e.p50 and denoise.p50 at least
    assert "<h3>e2e.p50 — tiny-sd/diffusers/fp32/b1/64x64/s4 on CPU" in html
