"""diffbench merge: shards and runners into one records file (each record once, provenance kept, images along) and
one report; the heatmap gets a column group per device class and the gate compares each device class with its own
baseline. Also summary.md."""
import json
import shutil
from pathlib import Path

import pytest

from harness.cli import main
from harness.errors import UserError
from harness.records import read_records
from harness.verdict import gate
from harness.verdict.merge import merge
from tests.synthetic_runs import CPU_ENV, H100_ENV, write_synthetic_run
from reports.summary_markdown import summary_markdown

A100_ENV = {**H100_ENV, "gpu": {**H100_ENV["gpu"], "name": "NVIDIA A100-SXM4-80GB", "capability": "8.0",
                                 "sm": "sm_80", "arch": "Ampere"}}


# two backends keep the report (matplotlib, ~0.5 s per chart here) to a few seconds
BACKENDS = ("diffusers", "onnxruntime")


def shards(root: Path, *, gpu_scale: float = 1.0, gpu_env=H100_ENV) -> Path:
    """What CI downloads: per runner label, per shard, a run folder (one empty: more shards than cases)."""
    write_synthetic_run(root / "cpu" / "shard-1" / "run-c1", env={**CPU_ENV, "shard": "1/3"}, run_id="c1",
                     models=("tiny-sd",), backends=BACKENDS, seed=1)
    write_synthetic_run(root / "cpu" / "shard-2" / "run-c2", env={**CPU_ENV, "shard": "2/3"}, run_id="c2",
                     models=("tiny-sd3",), backends=BACKENDS, seed=2)
    empty = root / "cpu" / "shard-3" / "run-c3"
    empty.mkdir(parents=True)
    (empty / "records.jsonl").write_text("")
    write_synthetic_run(root / "gpu" / "shard-1" / "run-g1", env={**gpu_env, "shard": "1/1"}, run_id="g1",
                     models=("tiny-sd",), backends=BACKENDS, seed=3, scale=gpu_scale)
    return root


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    shards(root / "in")
    # the same artifact downloaded twice: identical duplicates
    shutil.copytree(root / "in" / "cpu" / "shard-1", root / "again" / "shard-1")
    assert main(["merge", str(root / "in"), str(root / "again"), "-o", str(root / "out")]) == 0
    return {"root": root, "out": root / "out", "records": read_records(root / "out" / "records.jsonl")}


def test_every_record_is_kept_once_with_its_provenance(merged):
    sources = [read_records(p) for p in sorted((merged["root"] / "in").rglob("records.jsonl")) if p.stat().st_size]
    expected = {(r["run_id"], r["case_id"], gate.device_class(r)) for rs in sources for r in rs}
    got = [(r["run_id"], r["case_id"], gate.device_class(r)) for r in merged["records"]]
    assert sorted(got) == sorted(expected) and len(got) == len(set(got))
    for r in merged["records"]:
        origin = r["merged_from"]
        assert origin["shard"] == r["env"]["shard"]
        assert f"run-{r['run_id']}" in origin["file"] and origin["file"].endswith("records.jsonl")


def test_images_travel_with_the_merged_records_and_the_report_shows_them(merged):
    out = merged["out"]
    with_image = [r for r in merged["records"] if r["image"]]
    assert with_image and all((out / r["image"]).is_file() for r in with_image)
    html = (out / "report.html").read_text()
    assert "unreadable" not in html
    assert len(list((out / "report_images").glob("img_*.png"))) == len(with_image)


def test_report_has_a_heatmap_column_group_per_device_class(merged):
    html = (merged["out"] / "report.html").read_text()
    compat = html[html.index('id="compat"'):]
    compat = compat[:compat.index("</section>")]
    for dev in ("CPU Intel(R) Xeon(R) CPU @ 2.20GHz", "NVIDIA H100 80GB HBM3 (sm 9.0)"):
        assert dev in compat, dev
    csv = (merged["out"] / "records.csv").read_text()
    assert "NVIDIA H100 80GB HBM3 (sm 9.0)" in csv and "CPU Intel" in csv


def test_merge_counts_duplicates_empty_shards_and_later_versions(tmp_path, capsys):
    root = shards(tmp_path / "in")
    first = root / "cpu" / "shard-1" / "run-c1" / "records.jsonl"
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    # a resumed run: an interrupted record, then the real one of the same case in the same run
    rows.insert(0, {**rows[0], "status": "interrupted", "timestamp": rows[0]["timestamp"] - 5})
    first.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = merge([root, root / "cpu" / "shard-1"], tmp_path / "out")
    assert result.superseded == 1 and len(result.empty) == 1 and result.duplicates == 0
    assert result.remeasured == 0
    kept = {r["case_id"]: r for r in read_records(result.path) if r["run_id"] == "c1"}
    assert kept[rows[0]["case_id"]]["status"] == rows[1]["status"]          # the later version won
    # the same case measured by two runs on one device class (overlapping shards): both kept, and said
    write_synthetic_run(tmp_path / "in" / "cpu" / "rerun" / "run-c9", env=CPU_ENV, run_id="c9", models=("tiny-sd",),
                     backends=BACKENDS)
    result = merge([tmp_path / "in"], tmp_path / "out")
    assert result.remeasured > 0 and "more than one run on the same device class" in result.summary()


def test_merge_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty-shard"
    empty.mkdir()
    (empty / "records.jsonl").write_text("")
    for args, message in ((["merge", str(tmp_path / "nope"), "-o", str(tmp_path / "o")], "does not exist"),
                          (["merge", str(empty), "-o", str(tmp_path / "o")], "every shard was empty"),
                          (["merge", str(tmp_path / "o2"), "-o", str(tmp_path / "o3")], "does not exist")):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    (tmp_path / "no-records").mkdir()
    with pytest.raises(UserError, match="no records.jsonl under"):
        merge([tmp_path / "no-records"], tmp_path / "o4")


def test_gate_on_merged_records_compares_each_device_class_with_its_own_baseline(merged, tmp_path, capsys):
    """Baseline: the merged CPU + H100 run. Current: CPU unchanged, H100 30 % slower, plus an A100 runner that the
    baseline never saw. Only H100 rows regress; the A100 cases are NEW (never compared with the H100 ones)."""
    current = shards(tmp_path / "in", gpu_scale=1.3)
    write_synthetic_run(current / "a100" / "shard-1" / "run-a1", env=A100_ENV, run_id="a1", seed=4,
                     models=("tiny-sd",), backends=BACKENDS)
    assert main(["merge", str(current), "-o", str(tmp_path / "current"), "--no-report"]) == 0
    capsys.readouterr()
    code = main(["gate", "--baseline", str(merged["out"] / "records.jsonl"),
                 "--current", str(tmp_path / "current" / "records.jsonl")])
    out = capsys.readouterr().out
    assert code == 1 and "REGRESSED" in out
    result = gate.compare(read_records(merged["out"] / "records.jsonl"),
                          read_records(tmp_path / "current" / "records.jsonl"), gate.DEFAULT_THRESHOLDS)
    regressed = {r.device_class for r in result.rows if r.verdict == "REGRESSED"}
    assert regressed == {"NVIDIA H100 80GB HBM3 (sm 9.0)"}
    assert {r.device_class for r in result.rows if r.verdict == "NEW"} == {"NVIDIA A100-SXM4-80GB (sm 8.0)"}
    cpu = [r for r in result.rows if r.device_class.startswith("CPU")]
    assert cpu and all(r.verdict == "PASS" for r in cpu)
    # summary.md of the gated merge names the verdict and the regressed device class
    text = summary_markdown(read_records(tmp_path / "current" / "records.jsonl"), result)
    assert "**Gate: REGRESSED**" in text and "on NVIDIA H100 80GB HBM3 (sm 9.0): e2e.p50" in text


def test_summary_markdown_counts_and_fastest_slowest_per_shape(merged):
    text = (merged["out"] / "summary.md").read_text()
    records = merged["records"]
    assert text.startswith(f"## diffbench: {len(records)} case(s) on 2 device class(es)")
    lines = text.splitlines()
    statuses = [s.strip() for s in lines[2].strip("|").split("|")][1:]
    cpu_row = next(line for line in lines[4:] if line.startswith("| CPU") and "tiny" not in line)
    counts = dict(zip(statuses, (int(c) for c in cpu_row.strip("|").split("|")[1:])))
    cpu = [r for r in records if r["env"]["gpu"] is None]
    assert counts == {s: sum(r["status"] == s for r in cpu) for s in statuses}
    # fastest / slowest with the speed-up against diffusers, computed from the records themselves
    shape = [r for r in cpu if r["model"] == "tiny-sd" and r["status"] == "passed" and r["dtype"] == "fp32"]
    fastest = min(shape, key=lambda r: r["e2e"]["p50"])
    slowest = max(shape, key=lambda r: r["e2e"]["p50"])
    ref = next(r for r in shape if r["backend"] == "diffusers")
    row = next(line for line in text.splitlines() if "| tiny-sd fp32 b1 64x64 s4 |" in line and "CPU" in line)
    name = lambda r: f"{r['backend']}+{r['variant']}" if r["variant"] else r["backend"]
    assert (f"{name(fastest)} {fastest['e2e']['p50'] * 1000:.1f} ms "
            f"({ref['e2e']['p50'] / fastest['e2e']['p50']:.2f}x vs diffusers)") in row
    assert f"{name(slowest)} {slowest['e2e']['p50'] * 1000:.1f} ms" in row
    assert row.endswith(f"| {slowest['e2e']['p50'] / fastest['e2e']['p50']:.2f}x |")
    assert "Gate" not in text      # no baseline given
