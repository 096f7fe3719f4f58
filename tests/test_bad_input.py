"""Bad input: one line on stderr naming the problem, exit code 2, never a traceback."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main
from harness.records import Record
from harness.selection.cases import Case

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def files(tmp_path):
    good = Record.for_case(Case("tiny-sd", "diffusers"), "r1").to_dict()
    f = {}
    f["bad_toml"] = tmp_path / "bad.toml"
    f["bad_toml"].write_text("[matrix\nmodels = [")
    f["unknown_key_toml"] = tmp_path / "unknown.toml"
    f["unknown_key_toml"].write_text("[matrix]\nmodelz = ['tiny-sd']\n")
    f["bad_types_toml"] = tmp_path / "types.toml"
    f["bad_types_toml"].write_text("[matrix]\nbatches = ['one']\n")
    f["empty_records"] = tmp_path / "empty.jsonl"
    f["empty_records"].write_text("")
    f["garbage_records"] = tmp_path / "garbage.jsonl"
    f["garbage_records"].write_text("this is not json\n{\"also\": \"not a record\"}\n")
    f["not_records"] = tmp_path / "notrec.jsonl"
    f["not_records"].write_text(json.dumps({"hello": 1}) + "\n")
    f["other_schema"] = tmp_path / "schema.jsonl"
    f["other_schema"].write_text(json.dumps({**good, "schema": 42}) + "\n")
    f["good"] = tmp_path / "good.jsonl"
    f["good"].write_text(json.dumps(good) + "\n")
    f["not_diffusers"] = tmp_path / "plain_dir"
    f["not_diffusers"].mkdir()
    f["bad_index"] = tmp_path / "bad_index"
    f["bad_index"].mkdir()
    (f["bad_index"] / "model_index.json").write_text("{nope")
    f["wrong_pipeline"] = tmp_path / "wrong_pipeline"
    f["wrong_pipeline"].mkdir()
    (f["wrong_pipeline"] / "model_index.json").write_text(json.dumps({"_class_name": "AudioLDMPipeline"}))
    f["a_file"] = tmp_path / "a_file"
    f["a_file"].write_text("x")
    for name, template in (("template_placeholder", {"path": "/g", "body": {"p": "{promt}"}, "images": "data"}),
                           ("template_images_path", {"path": "/g", "body": {"p": "{prompt}"}, "images": "data..x"}),
                           ("template_no_path", {"body": {"p": "{prompt}"}, "images": "data"})):
        f[name] = tmp_path / f"{name}.json"
        f[name].write_text(json.dumps(template))
    return f


BAD = {
    "unknown backend": (["run", "--backend", "tensorflow"], "unknown backend 'tensorflow'; choose from"),
    "unknown model": (["run", "--model", "sd99"], "unknown model 'sd99'; choose from"),
    "unknown dtype": (["run", "--dtype", "fp64"], "unknown dtype 'fp64'; choose from fp32, fp16, bf16"),
    "unknown variant": (["run", "--backend", "diffusers+turbo"], "unknown variant option 'turbo'"),
    "conflicting variant options": (["run", "--backend", "torch_compile+max-autotune+reduce-overhead"],
                                    "conflicting options max-autotune and reduce-overhead"),
    "zero size": (["run", "--size", "0x64"], "height must be positive"),
    "negative size": (["run", "--size", "64x-8"], "width must be positive"),
    "not divisible by VAE factor": (["run", "--size", "60x64"], "not divisible by the VAE factor 8"),
    "malformed size": (["run", "--size", "big"], "bad size 'big'"),
    "zero batch": (["run", "--batch", "0"], "batch must be at least 1"),
    "zero steps": (["run", "--steps", "0"], "steps must be at least 1"),
    "malformed TOML": (["run", "--matrix", "{bad_toml}"], "malformed TOML matrix"),
    "unknown TOML key": (["run", "--matrix", "{unknown_key_toml}"], "unknown key(s) modelz"),
    "TOML wrong types": (["run", "--matrix", "{bad_types_toml}"], "batches must be a list of integers"),
    "missing matrix file": (["run", "--matrix", "/nonexistent/m.toml"], "does not exist"),
    "path: missing": (["run", "--model", "path:/nonexistent/model"], "does not exist"),
    "path: not diffusers": (["run", "--model", "path:{not_diffusers}"], "not a diffusers model folder"),
    "path: broken model_index": (["run", "--model", "path:{bad_index}"], "is not valid JSON"),
    "path: unsupported pipeline": (["run", "--model", "path:{wrong_pipeline}"], "is not supported"),
    "--gpu without a GPU": (["run", "--gpu"], "no CUDA device"),
    "unwritable results folder": (["run", "--results-dir", "/proc/diffbench-results"], "not writable"),
    "results folder is a file": (["run", "--results-dir", "{a_file}/sub"], "not writable"),
    "conflicting quick/repeats": (["run", "--quick", "--repeats", "5"], "conflicting options"),
    "threshold without baseline": (["run", "--threshold", "e2e.p50:+10%"], "needs --baseline"),
    "negative repeats": (["run", "--repeats", "0"], "--repeats must be >= 1"),
    "resume of a non-run": (["run", "--resume", "/nonexistent/run"], "no records.jsonl"),
    "unreachable triton url": (["run", "--triton-url", "127.0.0.1:1"], "unreachable"),
    "triton url without port": (["run", "--triton-url", "localhost"], "must be host:port"),
    "triton grpc url without triton url": (["run", "--triton-grpc-url", "127.0.0.1:1"], "need --triton-url"),
    "endpoint not a URL": (["run", "--endpoint", "localhost:8000"], "must be an http(s) URL"),
    "bad sweep levels": (["run", "--concurrency", "0,2"], "expected positive integers"),
    "bad request rate": (["run", "--request-rate", "fast"], "--request-rate 'fast': expected positive numbers"),
    "infinite request rate": (["run", "--request-rate", "1,inf"], "expected positive numbers"),
    "rate and concurrency": (["run", "--request-rate", "1", "--concurrency", "1"], "conflicting options"),
    "arrivals without a rate": (["run", "--request-distribution", "poisson"], "needs --request-rate"),
    "unknown arrivals": (["run", "--request-rate", "1", "--request-distribution", "bursty"], "constant or poisson"),
    "zero sweep windows": (["run", "--sweep-windows", "0"], "--sweep-windows must be >= 1"),
    "template not JSON": (["run", "--http-template", "{bad_toml}"], "is not JSON"),
    "template placeholder": (["run", "--http-template", "{template_placeholder}"], "unknown placeholder(s) {promt}"),
    "template images path": (["run", "--http-template", "{template_images_path}"], "must be a dotted path"),
    "template without path": (["run", "--http-template", "{template_no_path}"], "missing path"),
    "missing template": (["run", "--http-template", "/nonexistent/t.json"], "cannot read it"),
    "service of an unknown model": (["service", "--model", "sd99", "--port", "8000"], "unknown model 'sd99'"),
    "service on port 0": (["service", "--model", "tiny-sd", "--port", "0"], "--port 0: expected 1..65535"),
    "unknown option": (["run", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    "non-integer batch": (["run", "--batch", "two"], "invalid int value"),
    "no command": ([], "required: command"),
    "empty records file": (["report", "{empty_records}", "-o", "/tmp/x"], "holds no records"),
    "garbage records file": (["report", "{garbage_records}", "-o", "/tmp/x"], "not a JSON record"),
    "not a records file": (["gate", "--baseline", "{not_records}", "--current", "{good}"], "not a diffbench record"),
    "baseline of another schema": (["gate", "--baseline", "{other_schema}", "--current", "{good}"],
                                   "schema version 42"),
    "missing baseline": (["gate", "--baseline", "/nonexistent.jsonl", "--current", "{good}"], "does not exist"),
    "ab without a baseline build": (["ab", "--model", "tiny-sd"], "needs --baseline-dir DIR or --baseline-rev"),
    "ab baseline not a checkout": (["ab", "--baseline-dir", "/tmp"], "not a diffbench checkout"),
    "ab unknown revision": (["ab", "--baseline-rev", "no-such-rev-xyz"], "--baseline-rev no-such-rev-xyz"),
    "ab malformed env": (["ab", "--baseline-dir", ".", "--current-env", "NOEQUALS"], "malformed --current-env"),
    "ab both baselines": (["ab", "--baseline-dir", ".", "--baseline-rev", "HEAD"], "not allowed with argument"),
    "bad plugin": (["backends"], "DIFFBENCH_PLUGINS: cannot load 'no_such_plugin_module'"),
    "unknown gate metric": (["gate", "--baseline", "{good}", "--current", "{good}", "--threshold", "bogus.p50:+5%"],
                            "bogus"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_one_line_exit_2(name, files, capsys, monkeypatch):
    argv, expected = BAD[name]
    argv = [a.format(**files) for a in argv]
    if name == "bad plugin":
        monkeypatch.setenv("DIFFBENCH_PLUGINS", "no_such_plugin_module")
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (name, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"{name}: expected one line, got: {err!r}"
    assert lines[0].startswith("diffbench: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in err


def test_at_least_twenty_distinct_bad_inputs():
    assert len(BAD) >= 20


@pytest.mark.parametrize("argv", [["run", "--model", "sd99"], ["run", "--gpu"]])
def test_bad_input_from_the_real_console_script(argv):
    """The installed entry point, in a fresh process: exit 2, one line, no traceback."""
    exe = Path(sys.executable).parent / "diffbench"
    proc = subprocess.run([str(exe), *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_suites_under_pytest_xdist_stop_at_once():
    """pytest-benchmark turns itself off under xdist, so every suite case would time nothing: refused in one line."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "suites/test_compat.py", "-n", "2", "-q"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 4, proc.stdout + proc.stderr     # pytest's usage-error exit code
    assert "pytest-benchmark is off under pytest-xdist" in proc.stderr and "Traceback" not in proc.stderr


def test_pytest_gpu_without_gpu_stops_at_once():
    proc = subprocess.run([sys.executable, "-m", "pytest", "suites/test_compat.py", "--gpu", "-q"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 4, proc.stdout + proc.stderr     # pytest's usage-error exit code
    assert "no CUDA device" in proc.stderr and "Traceback" not in proc.stderr
