"""The http backend against the reference service (`diffbench service`): real uvicorn processes on loopback, one per
mode, started once for the module and stopped by pid; every load bounded in requests and time.

- the correct service (pipeline in a worker thread) passes: image parity against diffbench's own reference, a load
  sweep and an unblocked health check in the record;
- the broken wrapper (`--blocking`: the pipeline inside the async route) is `failed`, naming the blocked health check;
- an endpoint that does not answer is an `error` row with one line.
"""
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from backends import http as http_backend
from harness.measure.case import run_case
from harness.measure.run_options import RunOptions
from harness.measure.session import Session
from harness.selection.cases import Case

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 300.0   # torch + diffusers import and the tiny model's build, on a loaded 2-core machine
CASE = Case("tiny-sd", "http")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """In the child: SIGTERM when the test process dies, so a killed test run leaves no service behind (Linux)."""
    import ctypes
    import signal
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG


@contextlib.contextmanager
def service(log: Path, *flags: str):
    """`diffbench service --model tiny-sd` in its own process until /health answers; stopped by its pid."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "service", "--model", "tiny-sd", "--port",
                                 str(port), *flags], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the service exited with {proc.returncode}: {log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"the service did not answer /health within {START_TIMEOUT_S:g} s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """One session: the eager reference of tiny-sd is computed once for every case of the module."""
    session = Session(tmp_path_factory.mktemp("runs"),
                      RunOptions(warmup=0, repeats=1, timeout_s=900.0, save_images=False, time_components=False))
    yield session
    session.close()


@pytest.fixture(scope="module", params=["worker", "blocking"])
def served(request, tmp_path_factory):
    flags = ("--blocking",) if request.param == "blocking" else ()
    with service(tmp_path_factory.mktemp("service") / "service.log", *flags) as url:
        yield request.param, url


def measure(session, monkeypatch, url: str):
    monkeypatch.setenv(http_backend.ENDPOINT_ENV, url)
    monkeypatch.setenv(http_backend.SWEEP_ENV, "1,2")
    return run_case(CASE, session)


def test_service_modes(served, session, monkeypatch):
    mode, url = served
    record = measure(session, monkeypatch, url)
    # the images are right in both modes: the same pipeline, the same seeded latents as the reference's
    assert record.parity["verdict"] == "pass", record.reason
    assert record.parity["image"]["passed"] and record.parity["image_last"]["passed"]
    assert record.parity["components_skipped"]
    sweep = record.serving["sweep"]
    assert [level["concurrency"] for level in sweep] == [1, 2]
    assert all(level["ok"] == level["sent"] and level["errors"] == 0 == level["timeouts"] for level in sweep)
    assert all(level["health"]["n"] > 0 for level in sweep)
    liveness = record.serving["liveness"]
    if mode == "worker":
        assert record.status == "passed", record.reason
        assert liveness["blocked"] is False
    else:
        assert (record.status, record.error_class) == ("failed", "BlockedHealthCheck"), record.reason
        assert "health check blocked" in record.reason and "\n" not in record.reason


def test_service_refuses_bad_requests_and_reports_what_it_serves(served):
    mode, url = served
    health = httpx.get(f"{url}/health", timeout=30).json()
    assert (health["model"], health["dtype"], health["mode"]) == ("tiny-sd", "fp32", mode)
    path = f"{url}{http_backend.OpenAIImages.path}"
    for body, text in (({"prompt": "x", "size": "60x64"}, "multiples of 8"),
                       ({"prompt": "x", "response_format": "url"}, "only b64_json"),
                       ({"prompt": "x", "model": "sdxl"}, "serves 'tiny-sd'")):
        response = httpx.post(path, json=body, timeout=30)
        assert response.status_code == 400 and text in response.text


def test_dead_endpoint_is_an_error_row(session, monkeypatch):
    record = measure(session, monkeypatch, f"http://127.0.0.1:{free_port()}")   # nothing listens there
    assert (record.status, record.error_class) == ("error", "ConnectionError")
    assert "does not answer" in record.reason and "\n" not in record.reason


def test_liveness_rule():
    """Blocked only when health p50 under load is above half the generation time AND 10x its idle p50."""
    idle = {"p50": 0.002}

    def level(p50, failures=0, example="ReadTimeout: timed out"):
        return {"concurrency": 2, "health": {"p50": p50, "n": 10, "failures": failures,
                                             "failure_examples": [example] if failures else []}}
    assert not http_backend.liveness(idle, [level(0.01)], generation_s=0.4)["blocked"]    # fast health
    assert not http_backend.liveness(idle, [level(0.3)], generation_s=1.0)["blocked"]     # slow, not blocked
    assert not http_backend.liveness({"p50": 0.1}, [level(0.3)], generation_s=0.4)["blocked"]   # slow at idle too
    verdict = http_backend.liveness(idle, [level(0.35)], generation_s=0.4)
    assert verdict["blocked"] and "GET /health p50 350 ms at concurrency 2" in verdict["reason"]
    timed_out = http_backend.liveness(idle, [level(0.01, failures=1)], generation_s=0.4)   # a probe never answered
    assert timed_out["blocked"] and timed_out["error_class"] == "BlockedHealthCheck"
    assert timed_out["reason"].startswith("health check blocked under load at concurrency 2: 1 of 10 GET /health")
    refused = http_backend.liveness(idle, [level(0.01, 1, "HTTP 500: boom")], generation_s=0.4)
    assert refused["blocked"] and refused["error_class"] == "FailedHealthCheck"
