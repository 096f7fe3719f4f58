"""The http backend against the reference service (`diffbench service`): real uvicorn processes on loopback, one per
mode, started once for the module (when a test first asks for it) and stopped by pid; every load bounded in requests
and time (one measurement window per level unless a test is about windows).

- the correct service (pipeline in a worker thread) passes: image parity against diffbench's own reference, a load
  sweep and an unblocked health check in the record;
- the broken wrapper (`--blocking`: the pipeline inside the async route) is `failed`, naming the blocked health check;
- an endpoint that does not answer is an `error` row with one line;
- the ComfyUI protocol (against the service's ComfyUI stand-in routes) and a JSON template bring back the very
  images of the OpenAI protocol, and a ComfyUI case passes with parity; the request-rate mode sends open loop and
  a level stops once its windows are stable.
"""
import base64
import contextlib
import json
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


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """mode -> the URL of the reference service in that mode, started at the first ask, stopped at the module's end."""
    urls: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        def url(mode: str) -> str:
            if mode not in urls:
                flags = ("--blocking",) if mode == "blocking" else ()
                log = tmp_path_factory.mktemp("service") / f"{mode}.log"
                urls[mode] = stack.enter_context(service(log, *flags))
            return urls[mode]
        yield url


@pytest.fixture(params=["worker", "blocking"])
def served(request, services):
    return request.param, services(request.param)


def measure(session, monkeypatch, url: str, case: Case = CASE, levels: str = "1,2"):
    monkeypatch.setenv(http_backend.ENDPOINT_ENV, url)
    monkeypatch.setenv(http_backend.SWEEP_ENV, levels)
    monkeypatch.setenv(http_backend.WINDOWS_ENV, "1")   # one window per level: the cheapest sweep
    return run_case(case, session)


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
    assert all(len(level["windows"]) <= 1 and not level["stable"] for level in sweep)   # --sweep-windows 1
    assert all("stability needs 3" in level["stability"] for level in sweep)
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


# -- protocols ------------------------------------------------------------------------------------------------------
REQUEST = http_backend.ImageRequest("tiny-sd", "a red apple", "", 64, 64, 4, 7.5, seed=1234)
TEMPLATE = {"path": "/v1/images/generations",   # the reference service's OpenAI route, spelled by a user's template
            "body": {"prompt": "{prompt}", "negative_prompt": "{negative_prompt}", "seed": "{seed}",
                     "steps": "{steps}", "guidance": "{guidance}", "size": "{width}x{height}", "model": "{model}"},
            "images": "data.*.b64_json"}


def write_template(tmp_path) -> str:
    path = tmp_path / "template.json"
    path.write_text(json.dumps(TEMPLATE))
    return str(path)


def test_every_protocol_brings_back_the_same_images(services, tmp_path):
    """One request per protocol for the same seed: the ComfyUI stand-in and the template give the OpenAI route's
    PNG, byte for byte (3 generations)."""
    url = services("worker")
    protocols = [http_backend.OpenAIImages(), http_backend.ComfyUI(),
                 http_backend.Template.load(write_template(tmp_path))]
    with httpx.Client(base_url=url, timeout=120) as client:
        images = {p.name: http_backend.exchange_sync(client, p.exchange(REQUEST), 120)[0] for p in protocols}
    assert [len(v) for v in images.values()] == [1, 1, 1]
    assert images["comfyui"] == images["openai"] == images["template"]
    assert images["openai"][0].startswith(b"\x89PNG")


def test_comfyui_case_passes_with_parity(services, session, monkeypatch):
    """`--backend http+comfyui`: POST /prompt, GET /history/{id}, GET /view; parity against the eager reference and
    the liveness probe on /system_stats (ComfyUI has no /health)."""
    record = measure(session, monkeypatch, services("worker"), Case("tiny-sd", "http", "comfyui"), levels="1")
    assert record.status == "passed", record.reason
    assert record.parity["verdict"] == "pass" and record.parity["image"]["passed"]
    assert (record.info["http"]["protocol"], record.info["http"]["path"]) == ("comfyui", "/prompt")
    serving = record.serving
    assert serving["protocol"] == "comfyui" and serving["health"]["path"] == "/system_stats"
    level = serving["sweep"][0]
    assert level["ok"] == level["sent"] >= 3 and level["health"]["n"] > 0
    assert serving["liveness"]["blocked"] is False


def test_comfyui_stand_in_refuses_what_it_cannot_run(services):
    url = services("worker")
    workflow = http_backend.ComfyUI.workflow(REQUEST)
    other_model = {**workflow, "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl"}}}
    no_save = {k: v for k, v in workflow.items() if v["class_type"] != "SaveImage"}
    for graph, text in ((other_model, "serves 'tiny-sd'"), (no_save, "one SaveImage node")):
        answer = httpx.post(f"{url}/prompt", json={"prompt": graph}, timeout=30)
        assert answer.status_code == 400 and text in answer.json()["error"]["message"]
    assert httpx.get(f"{url}/history/no-such-prompt", timeout=30).json() == {}
    assert httpx.get(f"{url}/view", params={"filename": "nope.png"}, timeout=30).status_code == 404


def test_template_parses_images_where_the_file_says():
    template = http_backend.Template("/g", {"a": "{seed}", "b": "seed {seed} of {prompt}", "c": ["{guidance}"]},
                                     "out.images.*.png")
    assert template.body_for(REQUEST) == {"a": 1234, "b": "seed 1234 of a red apple", "c": [7.5]}
    png = base64.b64encode(b"img").decode()
    answer = {"out": {"images": [{"png": png}, {"png": f"data:image/png;base64,{png}"}]}}
    assert template.parse(answer) == ([b"img", b"img"], {})
    assert http_backend.Template("/g", {}, "out.images.1.png").parse(answer) == ([b"img"], {})
    with pytest.raises(http_backend.ServiceError, match="no images at out.images.\\*.png: nothing at out"):
        template.parse({"images": []})
    with pytest.raises(http_backend.ServiceError, match="is not base64"):
        template.parse({"out": {"images": [{"png": "not base64!"}]}})


# -- the sweep's modes and windows ------------------------------------------------------------------------------------
def test_request_rate_mode_is_open_loop_and_stops_once_stable(services):
    """Constant arrivals at about two thirds of the service's pace; windows of one answer, at most 5 of them, and a
    stability band no pair of windows misses: the level must stop after exactly 3 windows, stable (about 5
    generations)."""
    url = services("worker")
    protocol = http_backend.OpenAIImages()
    with httpx.Client(base_url=url, timeout=120) as client:
        start = time.perf_counter()
        http_backend.exchange_sync(client, protocol.exchange(REQUEST), 120)
        generation_s = time.perf_counter() - start
    rate = round(1 / (1.5 * generation_s), 3)
    load = http_backend.Load("rate", (rate,), "constant", max_windows=5, stability_pct=1e6, window_requests=1)
    serving = http_backend.load_sweep(url, protocol, REQUEST, load, budget_s=300)   # windows stop it, not time
    assert (serving["mode"], serving["distribution"], serving["levels"]) == ("rate", "constant", [rate])
    level = serving["sweep"][0]
    assert level["request_rate"] == rate and level["errors"] == 0 == level["timeouts"]
    assert len(level["windows"]) == 3 and level["stable"] and level["stability"] == "stable"
    assert all(w["answers"] == 1 for w in level["windows"])
    # every request sent before the third answer is in some window's sent rate; none twice
    sent_in_windows = sum(round(w["sent_rate_rps"] * w["wall_s"]) for w in level["windows"])
    assert 3 <= sent_in_windows <= level["sent"]
    assert level["sent"] >= 3 and level["latency"]["n"] == 3
    # the sender kept its schedule (absolute due times: a late send does not delay the next ones)
    assert 0.5 * rate < level["achieved_rate_rps"] < 1.5 * rate
    assert serving["liveness"]["blocked"] is False


def test_stability_rule_is_perf_analyzers():
    """The last three windows' requests/s and mean latency within the band (max / min), never fewer than three."""
    def window(rps, latency):
        return {"throughput_rps": rps, "latency_mean_s": latency}
    steady = [window(10.0, 0.5), window(2.0, 0.1), window(2.0, 0.1), window(2.1, 0.105), window(1.95, 0.1)]
    assert http_backend.stable(steady, 10)
    assert not http_backend.stable(steady[:2], 10)                          # two windows: not enough
    assert not http_backend.stable(steady + [window(2.5, 0.1)], 10)        # requests/s moved by 28 %
    assert not http_backend.stable(steady + [window(2.0, 0.12)], 10)       # latency moved by 20 %
    assert http_backend.stable(steady + [window(2.0, 0.12)], 25)
    assert not http_backend.stable(steady + [window(0.0, None)], 1e6)      # a window without an answer


def test_arrivals_constant_and_poisson():
    constant = http_backend.arrival_gaps(2.0, "constant", seed=1)
    assert [next(constant) for _ in range(3)] == [0.5, 0.5, 0.5]
    poisson = http_backend.arrival_gaps(2.0, "poisson", seed=1)
    gaps = [next(poisson) for _ in range(4000)]
    assert abs(sum(gaps) / len(gaps) - 0.5) < 0.03 and len(set(gaps)) == len(gaps)   # mean 1/rate, not constant
    again = http_backend.arrival_gaps(2.0, "poisson", seed=1)
    assert [next(again) for _ in range(5)] == gaps[:5]                                # seeded: the same schedule


def test_sweep_options_reach_the_backend(monkeypatch, tmp_path):
    """Declared once (harness/selection/options.py) for `diffbench run` and pytest; exported as the environment it reads."""
    from harness.selection import options
    values = {"request_rate": "0.5,1", "request_distribution": "poisson", "sweep_windows": 4, "stability": 5.0,
              "http_template": write_template(tmp_path), "backend": ["http+template"], "model": ["tiny-sd"]}
    settings = options.settings_from(lambda dest: values.get(dest, options.default_of(dest)))
    for variable, value in settings.http_env.items():
        monkeypatch.setenv(variable, value)
    assert http_backend.load_from_env() == http_backend.Load("rate", (0.5, 1.0), "poisson", 4, 5.0)
    assert http_backend.PROTOCOLS["template"]().body == TEMPLATE["body"]
    assert [c.id.split("/")[1] for c in settings.cases] == ["http+template"]
