"""examples/ci/github-gpu-benchmarks.yml: valid against GitHub's workflow schema, and its shell steps run for real.

The shell steps are read from the YAML (never copied here, so they cannot drift) and run with bash the way GitHub
runs `shell: bash` (`bash --noprofile --norc -eo pipefail`), on CPU: the benchmark job with 2 GPUs' worth of shards
in parallel (tiny-sd, diffusers + onnxruntime, --quick), the artifact hand-over done by copying folders, then the
merge job and the gate job (against an unchanged baseline: pass; against one with half the peak memory: the step
fails, as it fails the workflow). Only the steps that need GitHub itself (installing on a fresh runner, fetching
main's artifact with `gh`) are not run; the test names them, so a new step cannot slip through untested.
Cost: ~40-60 s on the 2-core CI VM (two `diffbench run` processes, one merge with its report, two gates).
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from ruamel.yaml import YAML     # check-jsonschema's own YAML reader (the dev extra)

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "examples" / "ci" / "github-gpu-benchmarks.yml"
# shell steps that need GitHub or a fresh runner: the install (already done: this venv) and gh run download
NOT_RUN = {("benchmark", "install"), ("merge", "install"), ("gate", "install"), ("gate", "baseline")}
CASES = {"tiny-sd/diffusers/fp32/b1/64x64/s4", "tiny-sd/onnxruntime/fp32/b1/64x64/s4"}


def _load(path: Path) -> dict:
    return YAML(typ="safe").load(path.read_text())


def _schema_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
                           str(path)], capture_output=True, text=True)


def test_the_workflow_validates_against_the_github_workflow_schema(tmp_path):
    proc = _schema_check(WORKFLOW)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # and the check can fail: a job without runs-on is not a workflow GitHub accepts
    broken = _load(WORKFLOW)
    del broken["jobs"]["merge"]["runs-on"]
    with open(tmp_path / "broken.yml", "w") as fh:
        YAML(typ="safe").dump(broken, fh)
    assert _schema_check(tmp_path / "broken.yml").returncode != 0


class Runner:
    """Runs a job's shell steps like GitHub does: env of workflow, job and step, ${{ }} from a table."""

    def __init__(self, workflow: dict, workdir: Path, overrides: dict, expressions: dict):
        self.workflow, self.workdir, self.overrides, self.expressions = workflow, workdir, overrides, expressions
        self.files = {name: workdir / f"{name.lower()}.txt" for name in ("GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY",
                                                                          "GITHUB_PATH")}

    def _resolve(self, value) -> str:
        def lookup(match):
            key = match.group(1).strip()
            assert key in self.expressions, f"the test has no value for ${{{{ {key} }}}}"
            return str(self.expressions[key])
        return re.sub(r"\$\{\{(.*?)\}\}", lookup, str(value))

    def env(self, job: str, step: dict) -> dict:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               "DIFFBENCH_CACHE": str(ROOT / ".cache"), "GITHUB_REPOSITORY": "example/diffbench"}
        for scope in (self.workflow.get("env", {}), self.workflow["jobs"][job].get("env", {}), step.get("env", {})):
            env.update({k: self._resolve(v) for k, v in scope.items()})
        env.update(self.overrides)
        env.update({name: str(path) for name, path in self.files.items()})
        env.pop("CUDA_VISIBLE_DEVICES", None)
        return env

    def step(self, job: str, step_id: str) -> subprocess.CompletedProcess:
        step = next(s for s in self.workflow["jobs"][job]["steps"] if s.get("id") == step_id)
        script = self.workdir / f"{job}-{step_id}.sh"
        script.write_text(step["run"])
        # in the checkout, as on GitHub; everything the steps write goes under $OUT (a temp folder here)
        return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], cwd=ROOT,
                              env=self.env(job, step), capture_output=True, text=True, timeout=600)


def test_every_shell_step_is_run_here_or_named_as_not_runnable():
    workflow = _load(WORKFLOW)
    assert workflow["defaults"]["run"]["shell"] == "bash"
    shell_steps = {(job, s["id"]) for job, spec in workflow["jobs"].items() for s in spec["steps"] if "run" in s}
    assert shell_steps - NOT_RUN == {("benchmark", "device"), ("benchmark", "benchmark"), ("merge", "merge"),
                                     ("gate", "gate")}


def test_the_workflow_shell_steps_shard_merge_and_gate_for_real_on_cpu(tmp_path):
    workflow = _load(WORKFLOW)
    out = tmp_path / "out"
    overrides = {  # CPU instead of GPUs; one job slot with two GPUs' worth of shards; the tiny selection
        "OUT": str(out), "DIFFBENCH_DEVICE": "", "DIFFBENCH_RUN_FLAGS": "--quick",
        "DIFFBENCH_SELECTION": "--model tiny-sd --backend diffusers --backend onnxruntime",
        "JOBS": "1", "GPUS": "2"}
    expressions = {"matrix.job": 1, "matrix.runner": "cpu-runner", "env.OUT": out}
    gh = Runner(workflow, tmp_path, overrides, expressions)

    device = gh.step("benchmark", "device")
    assert device.returncode == 0, device.stderr
    assert re.fullmatch(r"key=diffbench-\S+-[0-9a-f]{16}\n", gh.files["GITHUB_OUTPUT"].read_text())

    bench = gh.step("benchmark", "benchmark")
    assert bench.returncode == 0, bench.stdout[-3000:] + bench.stderr[-3000:]
    log = bench.stdout
    assert "\033" not in log and "\r" not in log, "escape codes in a CI log"
    # live progress reached the log as plain lines, phases included (the onnxruntime shard exports)
    for phase in ("reference", "load", "export", "first call", "warm-up 1/1", "parity"):
        assert re.search(rf"^\[shard [12]/2\] \[1/1\] tiny-sd/\S+: {re.escape(phase)}  \(elapsed ", log, re.M), phase

    # upload-artifact + download-artifact (pattern diffbench-records-*): one folder per artifact
    shutil.copytree(out / "records", out / "shards" / "diffbench-records-cpu-runner-1")
    merged = gh.step("merge", "merge")
    assert merged.returncode == 0, merged.stdout[-3000:] + merged.stderr[-3000:]
    records = [json.loads(line) for line in (out / "merged" / "records.jsonl").read_text().splitlines()]
    assert {r["case_id"] for r in records} == CASES and len(records) == 2
    assert sorted(r["env"]["shard"] for r in records) == ["1/2", "2/2"]
    assert sorted(r["env"]["cuda_visible_devices"] for r in records) == ["0", "1"]     # one shard per GPU
    assert (out / "merged" / "report.html").is_file()
    summary = gh.files["GITHUB_STEP_SUMMARY"].read_text()
    assert summary == (out / "merged" / "summary.md").read_text() and "| tiny-sd fp32 b1 64x64 s4 |" in summary

    # the gate job: main's merged records as the baseline (download-artifact of this run's merge is out/merged)
    (out / "baseline").mkdir()
    shutil.copy(out / "merged" / "records.jsonl", out / "baseline" / "records.jsonl")
    passed = gh.step("gate", "gate")
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "gate: PASS" in passed.stdout
    assert "### diffbench gate against main" in gh.files["GITHUB_STEP_SUMMARY"].read_text()
    halved = [{**r, "memory": {**r["memory"], "peak_mb": r["memory"]["peak_mb"] / 2}} for r in records]
    (out / "baseline" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in halved))
    regressed = gh.step("gate", "gate")
    assert regressed.returncode == 1, regressed.stdout + regressed.stderr
    assert "memory.peak" in regressed.stdout and "gate: REGRESSED" in regressed.stdout
