"""The HTML report: sections from whatever the records hold, escaping, images, speedups, records.csv."""
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import reports
from harness.records import Record, RecordWriter, load_many
from harness.selection.cases import Case
from harness.verdict import gate
from harness.verdict.thresholds import DEFAULT_THRESHOLDS
from tests.synthetic_runs import H100_ENV, write_synthetic_run

SD3_ORT = "tiny-sd3/onnxruntime/fp32/b1/64x64/s4"


class _Page(HTMLParser):
    """Section ids, <img> srcs, title attributes and the text of the page."""

    def __init__(self, text: str):
        super().__init__()
        self.sections, self.imgs, self.titles, self.text, self.scripts = [], [], [], [], 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        if tag == "img":
            self.imgs.append(attrs["src"])
        if tag == "script":
            self.scripts += 1
        if "title" in attrs:
            self.titles.append(attrs["title"])

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> _Page:
    return _Page(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    cpu = write_synthetic_run(root / "cpu", seed=1, failed=(SD3_ORT,))
    gpu = write_synthetic_run(root / "gpu", env=H100_ENV, seed=2, run_id="gpu-run")
    records = load_many([cpu, gpu])
    slow = write_synthetic_run(root / "slow", seed=1, scale=1.3, failed=(SD3_ORT,))
    result = gate.compare(load_many([cpu]), load_many([slow]), DEFAULT_THRESHOLDS)
    html = reports.build_report(records, root / "out", gate_result=result, title="nightly")
    return {"records": records, "html": html, "page": parse(html), "gate": result}


def test_every_section_and_every_image_is_there(full):
    page, out = full["page"], full["html"].parent
    assert page.sections == ["summary", "gate", "latency", "cold", "memory", "compat", "correctness", "images",
                             "serving"]
    assert len(page.imgs) > 30
    for src in page.imgs:
        assert not src.startswith(("/", "http", "file:")), src     # relative: the folder can be moved or served
        assert (out / src).is_file() and (out / src).stat().st_size > 100, src
        with Image.open(out / src) as im:
            assert im.width > 0
    assert page.scripts == 0


def test_synthetic_records_get_a_banner_that_counts_them(full, tmp_path):
    """Every record of the synthetic fixture says so, and a report holding any says how many, before anything else."""
    assert full["records"] and all(r["synthetic"] is True for r in full["records"])
    n = len(full["records"])
    html = full["html"].read_text(encoding="utf-8")
    assert html.index('id="synthetic"') < html.index("<h1>")
    text = " ".join(" ".join(full["page"].text).split())
    assert f"Synthetic data, not measurements: {n} of the {n} records in this report are made up" in text
    assert "runs gpu-run, synthetic-run" in text
    assert pd.read_csv(full["html"].parent / "records.csv")["synthetic"].all()
    # one made-up record among real ones: counted as one; records of schema 1 (no flag) are real
    real = load_many([Path(__file__).parent / "fixtures" / "records-v1.jsonl"])
    one = load_many([write_synthetic_run(tmp_path / "one", images=False, models=("tiny-sd",),
                                         backends=("diffusers",), run_id="demo")])[:1]
    text = " ".join(" ".join(parse(reports.build_report(real + one, tmp_path / "mixed")).text).split())
    assert f"1 of the {len(real) + 1} records in this report is made up" in text and "run demo." in text
    assert 'id="synthetic"' not in reports.build_report(real, tmp_path / "real").read_text(encoding="utf-8")


def test_records_csv_is_the_merged_table(full):
    df = pd.read_csv(full["html"].parent / "records.csv")
    assert len(df) == len(full["records"])
    assert set(df["device_class"]) == {gate.device_class(r) for r in full["records"]}
    row = df[(df.case_id == "tiny-sd/diffusers/fp32/b1/64x64/s4") & df.device_class.str.startswith("CPU")].iloc[0]
    ref = next(r for r in full["records"] if r["case_id"] == row.case_id and not r["env"]["gpu"])
    assert row.e2e_p50_s == pytest.approx(ref["e2e"]["p50"])
    assert row.peak_mb == ref["memory"]["peak_mb"]


def test_speedup_is_reference_p50_over_backend_p50(full):
    text = " ".join(full["page"].text)
    cpu = {r["case_id"]: r for r in full["records"] if not r["env"]["gpu"]}
    ref = cpu["tiny-sd/diffusers/fp32/b1/64x64/s4"]["e2e"]["p50"]
    compiled = cpu["tiny-sd/torch_compile+max-autotune/fp32/b1/64x64/s4"]["e2e"]["p50"]
    assert f"×{ref / compiled:.2f}" in text
    assert f"×{ref / compiled:.2f}" != "×1.00"


def test_failed_cases_are_not_timed_in_the_latency_section(full):
    text = " ".join(full["page"].text)
    assert "not shown (not passed): onnxruntime (failed: ParityError)" in text


def test_gate_verdict_is_in_the_summary_and_table(full):
    assert full["gate"].regressed
    text = " ".join(full["page"].text)
    assert "Gate:" in text and "gate: REGRESSED" in text
    assert "REGRESSED" in text and "e2e.p50:+10%" in text


def test_compat_heatmap_has_device_columns_and_reason_hover(full):
    text = " ".join(full["page"].text)
    assert "NVIDIA H100 80GB HBM3 (sm 9.0)" in text
    assert any("tensorrt not installed" in t for t in full["page"].titles)
    assert any(SD3_ORT in t and "ParityError" in t for t in full["page"].titles)


def test_correctness_table_shows_identical_and_failed(full):
    text = " ".join(full["page"].text)
    assert "∞ (identical)" in text     # the reference against itself: PSNR inf, stored as null
    assert "PSNR" in text and "below 40.0 dB" in text


def test_difference_maps_are_computed_from_the_pngs(full):
    out = full["html"].parent
    page = full["page"]
    diffs = [src for src in page.imgs if "/diff_" in src]
    assert len(diffs) == 12  # 3 backends x 2 models x 2 devices
    # one colour scale per row: the failed backend's map is the brightest in its row
    text = " ".join(page.text)
    maxima = [float(m) for m in re.findall(r"\|Δ\| max ([0-9.]+)", text)]
    assert len(maxima) == 12 and max(maxima) > 0.5 and min(maxima) > 0
    bright = [np.asarray(Image.open(out / src), dtype=float).mean() for src in diffs]
    worst = maxima.index(max(maxima))
    row = range(worst - worst % 3, worst - worst % 3 + 3)   # the failed case's row of 3 backends
    assert all(bright[worst] > 10 * bright[i] for i in row if i != worst)


def test_record_text_is_escaped(tmp_path):
    evil = "<script>alert(1)</script>"
    path = write_synthetic_run(tmp_path / "run", prompt=evil, models=("tiny-sd",),
                               backends=("diffusers", "onnxruntime"))
    records = load_many([path])
    records[-1]["reason"] = 'tensorrt "missing" <img src=x onerror=alert(2)>'
    html = reports.build_report(records, tmp_path / "out", title=f"t {evil}").read_text()
    assert "<script" not in html.lower() and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(2)&gt;" in html
    page = _Page(html)
    assert page.scripts == 0
    assert evil in " ".join(page.text)  # shown to the reader as text


def test_only_unsupported_rows(tmp_path):
    path = tmp_path / "records.jsonl"
    with RecordWriter(path) as w:
        for backend in ("tensorrt", "triton"):
            w.write(Record.for_case(Case("sdxl", backend, dtype="fp16"), "r1", status="unsupported",
                                    reason=f"{backend} not installed"))
    html = reports.build_report(load_many([path]), tmp_path / "out")
    page = parse(html)
    assert page.sections == ["summary", "compat"]
    assert page.imgs == []
    assert "2 unsupported" in " ".join(page.text)
    assert "Synthetic data" not in " ".join(page.text)
    assert len(pd.read_csv(tmp_path / "out" / "records.csv")) == 2


def test_sparse_and_odd_records_do_not_crash(tmp_path):
    """No env, empty stats, a missing image file, an unreadable image, no reference image, odd serving data."""
    path = tmp_path / "records.jsonl"
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    with RecordWriter(path) as w:
        base = Case("m", "onnxruntime")
        w.write(Record.for_case(base, "r", e2e={"p50": 0.1, "n": 1}, image="images/absent.png"))
        w.write(Record.for_case(base.with_backend("triton"), "r", e2e={}, stages={"denoise": {"n": 0}},
                                image="images/broken.png", serving={"sweep": [{"concurrency": 1}], "note": "x"},
                                memory={"peak_mb": None}, parity={"verdict": "error", "image": {"error": "NaN"}}))
        w.write(Record.for_case(base.with_backend("torch_compile", "default"), "r", status="error",
                                error_class="RuntimeError", reason="boom", build={"compile": 3.0}, cold_s=None))
        w.write({**Record.for_case(base.with_backend("x"), "r").to_dict(), "stages": None, "memory": None,
                 "env": None, "build": None, "parity": None, "serving": None})
    html = reports.build_report(load_many([path]), tmp_path / "out")
    page = parse(html)
    assert {"summary", "compat", "latency", "images"} <= set(page.sections)
    text = " ".join(page.text)
    assert "no passed diffusers record for this shape" in text
    assert "absent.png unreadable" in text and "broken.png unreadable" in text
    for src in page.imgs:
        assert (html.parent / src).is_file()


def test_a_request_rate_sweep_is_charted_against_its_rate(tmp_path):
    """An http service swept in request-rate mode (open loop): its levels are requests/s, not concurrencies."""
    path = tmp_path / "records.jsonl"
    sweep = [{"request_rate": rate, "throughput_rps": 0.9 * rate, "stable": rate < 2,
              "latency": {"p50": 0.2 * rate, "p90": 0.3 * rate, "p99": 0.4 * rate}} for rate in (2.0, 0.5, 1.0)]
    with RecordWriter(path) as w:
        w.write(Record.for_case(Case("tiny-sd", "http"), "r", e2e={"p50": 0.2, "n": 1},
                                serving={"mode": "rate", "protocol": "openai", "sweep": sweep}))
    html = reports.build_report(load_many([path]), tmp_path / "out")
    page = parse(html)
    assert "serving" in page.sections
    text = " ".join(page.text)
    assert "request rate" in text and "mode: rate" in text
    assert any("serving" in src for src in page.imgs)


def test_rerun_records_supersede_older_ones(tmp_path):
    first = write_synthetic_run(tmp_path / "a", seed=1, images=False, models=("tiny-sd",), backends=("diffusers",))
    second = write_synthetic_run(tmp_path / "b", seed=2, images=False, models=("tiny-sd",), backends=("diffusers",))
    records = load_many([first, second])
    for r in records:
        if r["_source"].startswith(str(tmp_path / "b")):
            r["timestamp"] += 10
    html = reports.build_report(records, tmp_path / "out")
    df = pd.read_csv(tmp_path / "out" / "records.csv")
    assert len(df) == len(records) // 2
    assert set(df["source"]) == {str(second)}
    assert "older record(s) of re-run cases not shown" in html.read_text()


def test_rebuilding_into_the_same_folder_leaves_no_stale_charts(tmp_path, full):
    out = tmp_path / "out"
    reports.build_report(full["records"], out)
    many = {p.name for p in out.glob("*.png")}
    only_ref = [r for r in full["records"] if r["backend"] == "diffusers"]
    html = reports.build_report(only_ref, out)
    left = {p.name for p in out.glob("*.png")}
    assert left < many
    assert left == {Path(src).name for src in parse(html).imgs if "/" not in src}
    json.loads(json.dumps(full["gate"].to_dict()))


def test_integration_memory_phases_budget_and_compat_reasons(full):
    text = " ".join(" ".join(full["page"].text).split())
    # alone vs in pipeline, with the 1.5x warning and the finding
    assert "pipeline / alone" in text and "×1.80 ⚠" in text and "×1.05" in text
    assert "denoise_step: in-pipeline p50 is 1.80x the component alone" in text
    # memory per phase, the children of the process (the Triton server) counted
    assert "load peak MB" in text and "children MB" in text and "peak from" in text
    # how each figure was measured: its own worker (the GPU run) or a process shared with the cases before it
    assert "measured in" in text and "own worker process" in text and "shared process, after 3 case(s)" in text
    # over_budget is its own status, neither passed nor failed, with its budget
    assert "over_budget" in text and "budget MB" in text
    # the heatmap says why in the cell, and the stack per device class heads its column
    html = full["html"].read_text(encoding="utf-8")
    assert '<span class="why">tensorrt not installed (pip install tensorrt on a GPU runner)</span>' in html
    assert 'class="stack"' in html


def test_fit_section_shows_the_table_and_the_pareto_chart(tmp_path):
    from tests.synthetic_runs import write_synthetic_fit
    records, document = write_synthetic_fit(tmp_path / "fit")
    html = reports.build_report(load_many([tmp_path / "fit" / "records.jsonl"]), tmp_path / "out", fit=document)
    page = parse(html)
    assert "fit" in page.sections
    text = " ".join(" ".join(page.text).split())
    assert "520 MB nothing fits" in text                            # 500 MB before any image: one image is too much
    assert "2000 MB ★ diffusers 200" in text                        # the fastest at batch 1 heads its budget
    assert "★ diffusers+layerwise-fp8" not in text                  # smallest, but not the fastest
    assert any(src.startswith("fit_") for src in page.imgs)
