"""`pytest suites/ --shard I/N`: only the shard's cases are parametrised, the junit XML carries each case's figures
as <property> elements, and an empty shard (more shards than cases) says so and exits 0, not pytest's 5.

Runs pytest in a subprocess (the suites' plugin is per session): two sessions, one tiny diffusers case --quick;
~10-20 s on the 2-core CI VM.
"""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from harness.selection import shard
from harness.selection.options import select_cases

ROOT = Path(__file__).resolve().parent.parent
SELECTION = ["--model", "tiny-sd", "--backend", "diffusers", "--backend", "onnxruntime", "--quick"]
TESTS = ["suites/test_performance.py", "suites/test_correctness.py", "-k", "test_latency or test_output_parity and not last"]


def own_session_env() -> dict:
    """The environment for a pytest of its own: when this test runs in a pytest-xdist worker, the child must not
    inherit the worker's PYTEST_XDIST_* variables (pytest-benchmark reads them and would disable itself)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}


def _pytest(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[ET.Element]]:
    junit = tmp_path / "junit.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", *TESTS, *args, "--no-report",
                           "--results-dir", str(tmp_path / "results"),
                           "--junitxml", str(junit), "-o", "junit_family=legacy", "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=own_session_env())
    return proc, list(ET.parse(junit).iter("testcase")) if junit.exists() else []


def test_a_shard_runs_only_its_cases_and_junit_carries_their_figures(tmp_path):
    cases = select_cases(["tiny-sd"], ["diffusers", "onnxruntime"])
    parts = shard.assign(cases, 2)
    index = next(i for i, part in enumerate(parts, 1) if part[0].backend == "diffusers")   # the cheaper one
    proc, testcases = _pytest(tmp_path, *SELECTION, "--shard", f"{index}/2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert f"diffbench: shard {index}/2: 1 of 2 selected case(s)" in proc.stdout
    case_id = "tiny-sd/diffusers/fp32/b1/64x64/s4"
    assert {tc.get("name") for tc in testcases} == {f"test_latency[{case_id}]", f"test_output_parity[{case_id}]"}
    for tc in testcases:
        props = {p.get("name"): p.get("value") for p in tc.iter("property")}
        assert props["case_id"] == case_id and props["status"] == "passed" and props["parity"] == "pass"
        assert float(props["e2e_p99_ms"]) >= float(props["e2e_p50_ms"]) > 0
        assert props["psnr_db"] == "inf"            # the reference backend: identical images
        assert float(props["peak_mb"]) > 0 and props["shard"] == f"{index}/2"
        assert props["device_class"].startswith("CPU")


def test_an_empty_shard_says_so_and_exits_0(tmp_path):
    proc, testcases = _pytest(tmp_path, "--model", "tiny-sd", "--backend", "diffusers", "--shard", "2/2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "diffbench: shard 2/2 is empty: 1 selected case(s) over 2 shards leave it nothing to run" in proc.stdout
    assert testcases and all(tc.find("skipped") is not None for tc in testcases)
    assert not (tmp_path / "results").exists()      # nothing ran, nothing written
