"""harness/bootstrap.py for real: --use-env keeps the environment's torch, an install from a wheelhouse works with
the index off, and the refusals (a package already named harness/backends/reports, an empty wheelhouse) are one
line and an exit code, never a traceback.

The environment under test is a virtual environment that sees this interpreter's packages -- torch among them --
through a .pth file pointing at a folder of symlinks (no copy, no reinstall: 0.3 s), minus diffbench itself and two
small dependencies (psutil, pytest-timeout) that only the wheelhouse can provide. Its checkout is a copy of this
one, so no .venv, stamp or egg-info lands in the real checkout.

Cost (2-core CI machine): the module's fixture takes ~50 s: the wheelhouse ~12 s (pip resolves ~100 installed
requirements and fetches three wheels, ~1 MB, from the configured index or pip's cache -- the only part that needs
an index), the offline install ~15 s (torch probes, pip, the editable build) and one tiny-sd case run through it
~15 s. Everything else here takes well under a second.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from harness import bootstrap

ROOT = Path(__file__).resolve().parent.parent
LEFT_OUT = ("psutil", "pytest-timeout")        # what only the wheelhouse provides to the test environment
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", ".cache", "results", "__pycache__", "*.egg-info", ".benchmarks")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def make_env(path: Path, leave_out=(), extra_site: Path | None = None) -> Path:
    """A venv whose interpreter sees this interpreter's installed packages (torch included) through a .pth file
    and a folder of symlinks, except diffbench and `leave_out`. Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    own_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
    lines = []
    if leave_out is not None:
        site = Path(sysconfig.get_paths()["purelib"])
        skip = {canonical(n) for n in leave_out} | {"diffbench"}
        owned = set()
        for dist in metadata.distributions(path=[str(site)]):
            if canonical(dist.metadata["Name"]) in skip:
                owned |= {f.parts[0] for f in dist.files or () if f.parts and f.parts[0] != ".."}
        shared = path / "shared"
        shared.mkdir()
        for entry in site.iterdir():
            if entry.name not in owned and entry.suffix != ".pth" and entry.name != "__pycache__":
                (shared / entry.name).symlink_to(entry)
        lines.append(str(shared))
    if extra_site is not None:
        lines.append(str(extra_site))
    (own_site / "shared.pth").write_text("\n".join(lines) + "\n")
    return python


def torch_facts(python: Path) -> dict:
    probe = ("import json, os, torch, importlib.metadata as m\n"
             "d = m.distribution('torch')\n"
             "print(json.dumps({'version': torch.__version__, 'file': torch.__file__,"
             " 'real': os.path.realpath(torch.__file__), 'record': d.read_text('RECORD')}))")
    return json.loads(subprocess.run([str(python), "-c", probe], capture_output=True, text=True,
                                     check=True).stdout)


def bootstrap_cmd(python: Path, checkout: Path, *args: str, env: dict | None = None, timeout: float = 600):
    """Run a checkout's bootstrap as a user would: no PYTHONPATH (ours would show this checkout's packages)."""
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(python), str(checkout / "harness" / "bootstrap.py"), *args], capture_output=True,
                          text=True, env={**clean, **(env or {})}, timeout=timeout, cwd=checkout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Env with torch -> empty wheelhouse (must fail) -> `wheelhouse --use-env` -> offline `run --use-env`."""
    tmp = tmp_path_factory.mktemp("bootstrap")
    checkout = tmp / "checkout"
    shutil.copytree(ROOT, checkout, ignore=NOT_COPIED)
    python = make_env(tmp / "env", leave_out=LEFT_OUT)
    facts = {"torch_before": torch_facts(python)}
    empty = tmp / "empty-wheelhouse"
    empty.mkdir()
    facts["empty"] = bootstrap_cmd(python, checkout, "test", "--use-env", "--wheelhouse", str(empty))
    wheelhouse = tmp / "wheelhouse"
    facts["wheelhouse"] = bootstrap_cmd(python, checkout, "wheelhouse", str(wheelhouse), "--use-env")
    assert facts["wheelhouse"].returncode == 0, facts["wheelhouse"].stdout[-3000:] + facts["wheelhouse"].stderr
    offline = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse), "DIFFBENCH_CACHE": str(ROOT / ".cache")}
    facts["run"] = bootstrap_cmd(python, checkout, "run", "--use-env", "--model", "tiny-sd", "--backend", "diffusers",
                                 "--warmup", "0", "--repeats", "1", "--no-report", "--results-dir",
                                 str(tmp / "results"), env=offline)
    assert facts["run"].returncode == 0, facts["run"].stdout[-3000:] + facts["run"].stderr
    facts["torch_after"] = torch_facts(python)
    records = [json.loads(line) for f in (tmp / "results").rglob("records.jsonl")
               for line in f.read_text().splitlines()]
    own_site = next((tmp / "env" / "lib").glob("python*/site-packages"))
    return dict(facts, python=python, checkout=checkout, wheelhouse=wheelhouse, records=records, own_site=own_site)


def test_use_env_keeps_the_environments_torch(installed):
    before, after = installed["torch_before"], installed["torch_after"]
    assert after == before                      # same version, same files (path, real path, RECORD of every file)
    assert not list(installed["own_site"].glob("torch*"))          # nothing torch-like was installed into the env
    assert f"keeping this environment's torch {before['version']}" in installed["run"].stdout
    (record,) = installed["records"]
    assert record["status"] == "passed"
    assert record["env"]["versions"]["torch"] == before["version"]   # the run records the kept torch
    assert not (installed["checkout"] / ".venv").exists()           # --use-env makes no .venv


def test_install_from_a_wheelhouse_with_the_index_off(installed):
    wheels = sorted(p.name for p in installed["wheelhouse"].iterdir())
    # exactly what the environment lacked, plus the build backend for the editable install of the checkout
    assert [w.split("-")[0] for w in wheels] == ["psutil", "pytest_timeout", "setuptools"], wheels
    own = {canonical(d.metadata["Name"]) for d in metadata.distributions(path=[str(installed["own_site"])])}
    assert own == {"diffbench", "psutil", "pytest-timeout"}         # installed from the wheelhouse, nothing else
    direct = json.loads(metadata.Distribution.at(next(installed["own_site"].glob("diffbench-*.dist-info")))
                        .read_text("direct_url.json"))
    assert direct["url"] == installed["checkout"].as_uri() and direct["dir_info"]["editable"]
    # and the index really was off: from an empty wheelhouse the same install fails, in one line, no traceback
    empty = installed["empty"]
    assert empty.returncode != 0
    assert "Traceback" not in empty.stderr + empty.stdout
    ours = [line for line in empty.stderr.splitlines() if line.startswith("bootstrap:")]
    assert len(ours) == 1 and "missing from the wheelhouse" in ours[0]


def test_second_run_uses_the_stamp(installed):
    """Installed once: the next bootstrap skips pip (no network needed, even without the wheelhouse)."""
    result = bootstrap_cmd(installed["python"], installed["checkout"], "run", "--use-env", "--help",
                           env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(installed["checkout"])})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert "pip install" not in result.stdout and "--results-dir" in result.stdout


def test_refuses_an_environment_where_another_package_is_named_reports(tmp_path):
    site = tmp_path / "site"
    (site / "reports").mkdir(parents=True)
    (site / "reports" / "__init__.py").write_text("")
    info = site / "reports_lib-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: reports-lib\nVersion: 1.0\n")
    (info / "top_level.txt").write_text("reports\n")
    (info / "RECORD").write_text("reports/__init__.py,,\n")
    python = make_env(tmp_path / "env", leave_out=None, extra_site=site)
    result = bootstrap_cmd(python, ROOT, "run", "--use-env", timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "reports-lib 1.0 provides 'reports'" in result.stderr


def test_constraints_pin_versions_inside_the_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = [Requirement(r) for r in project["project"]["dependencies"]]
    for extra, reqs in project["project"]["optional-dependencies"].items():
        requirements += [Requirement(r) for r in reqs]
    pins = bootstrap.constraint_pins()
    checked = 0
    for requirement in requirements:
        line = pins.get(canonical(requirement.name))
        if line:
            version = line.split("==")[1]
            assert requirement.specifier.contains(version, prereleases=True), f"{line} is outside {requirement}"
            checked += 1
    assert checked >= 15
    assert all("==" in line for line in pins.values())                    # constraints are exact pins
    assert not any(op in r for r in project["project"]["dependencies"] for op in ("==",))   # ranges only
    core = {canonical(Requirement(r).name) for r in project["project"]["dependencies"]}
    assert "onnxruntime" not in core and "onnxruntime-gpu" not in core      # they clash: extras choose one
    gpu = {canonical(Requirement(r).name) for r in project["project"]["optional-dependencies"]["gpu"]}
    assert "onnxruntime-gpu" in gpu and "onnxruntime" not in gpu
    assert bootstrap.BUILD_REQUIRES == project["build-system"]["requires"]
    assert set(bootstrap.CPU_EXTRAS) | set(bootstrap.GPU_EXTRAS) <= set(project["project"]["optional-dependencies"])


def test_every_backend_names_an_extra_that_exists(capsys):
    from backends import base as registry
    from harness.commands import cmd_backends
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = {name: registry.get(name).extra for name in registry.names()}
    assert named["onnxruntime"] == "onnx" and named["triton"] == "triton" and named["tensorrt"] == "tensorrt"
    assert named["diffusers"] == named["torch_compile"] == ""               # core
    assert all(extra in extras for extra in named.values() if extra)
    cmd_backends(argparse.Namespace(stack=None, dump_stack=None, json=False, model=None))
    out = capsys.readouterr().out
    # TensorRT cannot be installed here: its row says which extra provides it
    assert f"install: pip install -e '{ROOT}[tensorrt]'" in out


def test_version_ranges_accept_gpu_image_builds():
    assert bootstrap.in_range("2.13.0+cpu", ">=2.6,<3")
    assert bootstrap.in_range("2.7.0a0+79aa17489c.nv25.04", ">=2.6,<3")    # NGC containers ship pre-releases
    assert not bootstrap.in_range("2.6.0a0+ecf3bae40a", ">=2.6,<3")        # as pip sees it: before 2.6
    assert not bootstrap.in_range("3.0.0", ">=2.6,<3") and not bootstrap.in_range("2.5.1+cu124", ">=2.6,<3")


def test_wheelhouse_helpers():
    tags = bootstrap.platform_tags("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in tags and "manylinux2014_x86_64" in tags
    assert "manylinux_2_29_x86_64" not in tags
    assert bootstrap.platform_tags("macosx_14_0_arm64") == ["macosx_14_0_arm64"]
    report = {"install": [
        {"requested": True, "metadata": {"name": "diffbench", "requires_dist": ["torch>=2.6", "diffusers>=0.40"]}},
        {"metadata": {"name": "torch", "requires_dist": ["sympy", "networkx", "nvidia-cudnn-cu12; platform_system"]}},
        {"metadata": {"name": "diffusers", "requires_dist": ["networkx"]}},
        {"metadata": {"name": "sympy"}}, {"metadata": {"name": "networkx"}}, {"metadata": {"name": "nvidia-cudnn-cu12"}},
    ]}
    assert bootstrap.only_torch_needs(report) == {"torch", "sympy", "nvidia-cudnn-cu12"}


def test_missing_chromium_is_one_line_and_a_stated_skip(monkeypatch, capsys):
    monkeypatch.setattr(bootstrap, "CHROMIUM", Path("/nonexistent/chromium"))
    monkeypatch.setattr(bootstrap.os, "geteuid", lambda: 1000)
    monkeypatch.delenv(bootstrap.REQUIRE_CHROMIUM, raising=False)
    assert bootstrap.ensure_chromium() == [f"--ignore={bootstrap.BROWSER_TEST}"]
    assert "leaving out tests/test_report_browser.py" in capsys.readouterr().out
    monkeypatch.setenv(bootstrap.REQUIRE_CHROMIUM, "1")                    # CI: an error, not a skip
    with pytest.raises(bootstrap.BootstrapError, match="chromium is missing"):
        bootstrap.ensure_chromium()


def test_a_cuda_torch_selects_use_env_and_the_gpu_extras(monkeypatch):
    """No CUDA torch here: the probe's answer is set by hand; the rule and the commands are the real ones."""
    monkeypatch.setattr(bootstrap, "_THIS_TORCH", [{"version": "2.7.0a0+nv", "cuda": "12.8", "file": "/t.py"}])
    assert bootstrap.choose_place({}) == (True, bootstrap.GPU_EXTRAS)
    assert bootstrap.choose_place({"--venv": True}) == (False, bootstrap.CPU_EXTRAS)
    monkeypatch.setattr(bootstrap, "_THIS_TORCH", [{"version": "2.13.0+cpu", "cuda": None, "file": "/t.py"}])
    assert bootstrap.choose_place({}) == (False, bootstrap.CPU_EXTRAS)
    assert bootstrap.choose_place({"--use-env": True, "--extras": "dev,triton"}) == (True, ("dev", "triton"))
    with pytest.raises(bootstrap.BootstrapError, match="unknown extra"):
        bootstrap.choose_place({"--extras": "dev,cuda"})

    def no_browser():
        raise AssertionError("test --gpu must not look for Chromium")
    monkeypatch.setattr(bootstrap, "ensure_chromium", no_browser)
    assert bootstrap.testing_stages("py", ["--gpu", "-k", "x"]) == [(["py", "-m", "pytest", "suites", "--gpu",
                                                                      "-k", "x"], {})]
    assert bootstrap.run_command("py", ["--gpu"]) == ["py", "-m", "harness.cli", "run", "--gpu"]


def test_venv_processes_write_bytecode_and_use_env_keeps_its_settings(monkeypatch):
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    venv, own = bootstrap.process_env(use_env=False), bootstrap.process_env(use_env=True)
    assert "PYTHONDONTWRITEBYTECODE" not in venv and own["PYTHONDONTWRITEBYTECODE"] == "1"
    assert venv["PYTHONPATH"] == own["PYTHONPATH"] == str(bootstrap.ROOT)


def test_cpu_testing_runs_the_unit_tests_in_parallel_then_the_suites_alone(monkeypatch):
    monkeypatch.setattr(bootstrap, "ensure_chromium", lambda: [])
    monkeypatch.setattr(bootstrap.os, "cpu_count", lambda: 2)
    (units, unit_env), (suites, suite_env) = bootstrap.testing_stages("py", ["-k", "x"])
    assert units == ["py", "-m", "pytest", "tests", "-n", "2", "--dist", "loadfile", "--no-loadscope-reorder",
                     "-k", "x"]
    assert unit_env == {"OMP_NUM_THREADS": "1"}      # one torch thread per worker: no oversubscribed cores
    assert suites == ["py", "-m", "pytest", "suites", "-k", "x"] and suite_env == {}   # alone, usual threads
    monkeypatch.setattr(bootstrap.os, "cpu_count", lambda: 64)
    assert bootstrap.testing_stages("py", [])[0][0][5] == str(bootstrap.UNIT_TEST_WORKERS)
    # one exit code: a stage that collected nothing (5) is fine when the other ran; the first failure wins
    assert bootstrap.combined_exit_code([0, 5]) == bootstrap.combined_exit_code([5, 0]) == 0
    assert bootstrap.combined_exit_code([5, 5]) == 5
    assert bootstrap.combined_exit_code([1, 0]) == bootstrap.combined_exit_code([0, 1]) == 1
    assert bootstrap.combined_exit_code([5, 1]) == 1
