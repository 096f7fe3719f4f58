"""http: an image-generation service as deployed, benchmarked over HTTP (`--backend http --endpoint URL`).

The service is a black box: prepare() returns a pipeline-like callable that sends the case's fixed inputs (prompt,
negative prompt, seed, steps, guidance, size) as one request and decodes the images it returns, so the harness
times it and judges its images against diffbench's own eager reference of the case's model like every backend.
Its components cannot be reached: component parity and component timing are skipped (Prepared.remote).

After the measured calls, after_measure() adds the record's `serving`: a load sweep (concurrency 1..N, each level
bounded in requests and time: latency percentiles, requests/s, images/s, errors and timeouts) with httpx and
asyncio on this machine, and a liveness probe: `GET /health` timed idle and during every level. A health check
that waits for generations (the event loop is blocked: the pipeline runs inside the async route) makes the row
`failed`.

Protocols are entries of PROTOCOLS; the default is the OpenAI images API (POST /v1/images/generations, base64
PNGs) with the extension fields seed, steps, guidance and negative_prompt.
"""
from __future__ import annotations

import asyncio
import base64
import io
import os
import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from backends.base import Backend, Prepared, Support, Unsupported, module_available, timed

ENDPOINT_ENV = "DIFFBENCH_HTTP_ENDPOINT"
SWEEP_ENV = "DIFFBENCH_HTTP_SWEEP"            # concurrency levels, e.g. "1,2,4"
DEFAULT_LEVELS = (1, 2, 4)
REQUEST_TIMEOUT_S = 120.0                      # one generation; a request past it is a timeout
CONNECT_TIMEOUT_S = 5.0
HEALTH_TIMEOUT_S = 30.0
HEALTH_INTERVAL_S = 0.05                       # pause between health probes during load (20/s at most)
IDLE_HEALTH_PROBES = 20
LEVEL_BUDGET_S = 60.0                          # a level stops sending new requests after this
# the liveness rule: under load, health p50 above this share of the median generation time AND above this
# multiple of its idle p50 means the health check waited for generations (the event loop is blocked)
BLOCKED_SHARE_OF_GENERATION = 0.5
BLOCKED_TIMES_IDLE = 10.0


def endpoint() -> str:
    return os.environ.get(ENDPOINT_ENV, "").rstrip("/")


def sweep_levels() -> tuple[int, ...]:
    text = os.environ.get(SWEEP_ENV, "")
    return tuple(int(v) for v in text.split(",") if v.strip()) if text else DEFAULT_LEVELS


def requests_per_level(concurrency: int) -> int:
    """Bounded: every client sends two requests (three at concurrency 1)."""
    return max(3, 2 * concurrency)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")


class ServiceError(Exception):
    """The service answered, but not with images."""


# -- protocols ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageRequest:
    """What one request asks for: the case's fixed inputs."""
    model: str
    prompt: str
    negative_prompt: str
    height: int
    width: int
    steps: int
    guidance: float
    seed: int
    n: int = 1


class OpenAIImages:
    """The OpenAI images API with diffbench's extension fields (seed, steps, guidance, negative_prompt)."""
    name = "openai"
    path = "/v1/images/generations"

    @staticmethod
    def body(r: ImageRequest) -> dict:
        return {"model": r.model, "prompt": r.prompt, "n": r.n, "size": f"{r.width}x{r.height}",
                "response_format": "b64_json", "seed": r.seed, "steps": r.steps, "guidance": r.guidance,
                "negative_prompt": r.negative_prompt}

    @staticmethod
    def parse(payload: dict) -> tuple[list[bytes], dict]:
        """(encoded images, the service's echo of the request: seed, steps... where it gives them)."""
        try:
            images = [base64.b64decode(item["b64_json"]) for item in payload["data"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ServiceError(f"response has no base64 images (data[].b64_json): {one_line(exc)}")
        echo = {k: payload[k] for k in ("seed", "steps", "guidance", "negative_prompt", "size", "model")
                if k in payload}
        return images, echo


PROTOCOLS = {OpenAIImages.name: OpenAIImages}


def decode(images: list[bytes]) -> np.ndarray:
    """PNG/JPEG bytes -> float32 (N, H, W, 3) in [0, 1], the pipeline's own output format."""
    from PIL import Image
    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float32) / 255.0
                     for b in images])


def _response_error(response) -> str:
    text = response.text.strip().splitlines()
    return f"HTTP {response.status_code}: {text[0][:200] if text else response.reason_phrase}"


# -- the pipeline-like callable the harness times ----------------------------------------------------------------------
class ServicePipeline:
    """Called with the harness's pipeline inputs (prompt, negative_prompt, steps, guidance, size; the seed is the
    case's): one request, the images decoded. A wrong image count or size is an error: it cannot be compared."""

    def __init__(self, client, protocol, request: ImageRequest, url: str):
        self.client, self.protocol, self.request, self.url = client, protocol, request, url
        self.echo: dict = {}

    def request_for(self, inputs: dict) -> ImageRequest:
        negative = inputs.get("negative_prompt") or [""]
        return ImageRequest(self.request.model, inputs["prompt"][0], negative[0], inputs["height"], inputs["width"],
                            inputs["num_inference_steps"], float(inputs["guidance_scale"]), self.request.seed,
                            len(inputs["prompt"]))

    def __call__(self, **inputs):
        import httpx
        request = self.request_for(inputs)
        try:
            response = self.client.post(self.protocol.path, json=self.protocol.body(request))
        except httpx.TimeoutException as exc:
            raise TimeoutError(f"no answer from {self.url}{self.protocol.path} within "
                               f"{self.client.timeout.read:g} s ({type(exc).__name__})") from exc
        if response.status_code != 200:
            raise ServiceError(f"{self.url}{self.protocol.path}: {_response_error(response)}")
        encoded, self.echo = self.protocol.parse(response.json())
        images = decode(encoded)
        if images.shape[:3] != (request.n, request.height, request.width):
            raise ServiceError(f"the service returned {images.shape[0]} image(s) of {images.shape[2]}x"
                               f"{images.shape[1]} for {request.n} of {request.width}x{request.height}: "
                               "they cannot be compared with the reference")
        return SimpleNamespace(images=images)


# -- load sweep and liveness probe --------------------------------------------------------------------------------------
def latency_stats(seconds: list[float]) -> dict:
    from harness.measure.timing import stats
    return stats(seconds)


async def _probe_health(client, stop: asyncio.Event, samples: list[float], failures: list[str]) -> None:
    """GET /health in a loop until stopped: each probe's latency (a probe that times out counts as its timeout)."""
    while not stop.is_set():
        start = time.perf_counter()
        try:
            response = await client.get("/health", timeout=HEALTH_TIMEOUT_S)
            if response.status_code != 200:
                failures.append(_response_error(response))
        except Exception as exc:  # a timed out or refused probe: the service did not answer its health check
            failures.append(one_line(exc))
        samples.append(time.perf_counter() - start)
        try:
            await asyncio.wait_for(stop.wait(), HEALTH_INTERVAL_S)
        except asyncio.TimeoutError:
            pass


async def _level(url: str, protocol, request: ImageRequest, concurrency: int, requests: int, budget_s: float,
                 timeout_s: float, probe: bool) -> dict:
    """`concurrency` clients keep that many requests in flight until `requests` were sent or the budget is spent;
    meanwhile one more client times GET /health."""
    import httpx
    latencies: list[float] = []
    errors: list[str] = []
    timeouts = 0
    health: list[float] = []
    health_failures: list[str] = []
    tickets = iter(range(requests))
    deadline = time.perf_counter() + budget_s
    limits = httpx.Limits(max_connections=concurrency + 1)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client, \
            httpx.AsyncClient(base_url=url, timeout=HEALTH_TIMEOUT_S) as health_client:
        async def user():
            nonlocal timeouts
            for _ in tickets:   # shared: each request is sent once
                if time.perf_counter() > deadline:
                    return
                start = time.perf_counter()
                try:
                    response = await client.post(protocol.path, json=protocol.body(request))
                    if response.status_code != 200:
                        errors.append(_response_error(response))
                        continue
                    protocol.parse(response.json())
                except httpx.TimeoutException:
                    timeouts += 1
                    continue
                except Exception as exc:
                    errors.append(one_line(exc))
                    continue
                latencies.append(time.perf_counter() - start)

        stop = asyncio.Event()
        prober = asyncio.create_task(_probe_health(health_client, stop, health, health_failures)) if probe else None
        start = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        stop.set()
        if prober is not None:
            await prober
    ok = len(latencies)
    return {"concurrency": concurrency, "sent": ok + len(errors) + timeouts, "ok": ok, "errors": len(errors),
            "timeouts": timeouts, "error_examples": sorted(set(errors))[:3], "wall_s": wall,
            "throughput_rps": ok / wall if wall else 0.0, "images_per_s": ok * request.n / wall if wall else 0.0,
            "latency": latency_stats(latencies),
            "health": {**latency_stats(health), "failures": len(health_failures),
                       "failure_examples": sorted(set(health_failures))[:3]} if probe else None}


def idle_health(client, probes: int = IDLE_HEALTH_PROBES) -> dict:
    """GET /health with nothing else running: the yardstick of the probe under load."""
    samples = []
    for _ in range(probes):
        start = time.perf_counter()
        client.get("/health").raise_for_status()
        samples.append(time.perf_counter() - start)
    return latency_stats(samples)


def liveness(idle: dict, levels: list[dict], generation_s: float | None) -> dict:
    """The verdict of the probe: blocked when, at some level, health p50 is above BLOCKED_SHARE_OF_GENERATION of
    the median generation time and above BLOCKED_TIMES_IDLE x its idle p50 (a health check that waits for
    generations), or when health checks failed or timed out under load."""
    verdict = {"idle_p50_s": idle.get("p50"), "generation_p50_s": generation_s, "blocked": False, "reason": "",
               "rule": f"health p50 under load > {BLOCKED_SHARE_OF_GENERATION:g} x median generation time and > "
                       f"{BLOCKED_TIMES_IDLE:g} x idle health p50"}
    for level in levels:
        health = level.get("health") or {}
        if health.get("failures"):
            example = health["failure_examples"][0]
            timed_out = "Timeout" in example
            verdict["blocked"] = True
            verdict["error_class"] = "BlockedHealthCheck" if timed_out else "FailedHealthCheck"
            verdict["reason"] = (f"health check {'blocked' if timed_out else 'failed'} under load at concurrency "
                                 f"{level['concurrency']}: {health['failures']} of {health.get('n', 0)} GET /health "
                                 f"{f'got no answer within {HEALTH_TIMEOUT_S:g} s' if timed_out else 'failed'} "
                                 f"({example})")
            return verdict
        p50 = health.get("p50")
        if p50 is None or not generation_s or not idle.get("p50"):
            continue
        if p50 > BLOCKED_SHARE_OF_GENERATION * generation_s and p50 > BLOCKED_TIMES_IDLE * idle["p50"]:
            verdict["blocked"], verdict["error_class"] = True, "BlockedHealthCheck"
            verdict["reason"] = (f"health check blocked under load: GET /health p50 {p50 * 1e3:.0f} ms at "
                                 f"concurrency {level['concurrency']} (idle {idle['p50'] * 1e3:.1f} ms, median "
                                 f"generation {generation_s * 1e3:.0f} ms): the event loop waits for generations")
            return verdict
    return verdict


def load_sweep(url: str, protocol, request: ImageRequest, levels=DEFAULT_LEVELS, probe: bool = True,
               timeout_s: float = REQUEST_TIMEOUT_S, budget_s: float = LEVEL_BUDGET_S,
               generation_s: float | None = None) -> dict:
    """The record's `serving`: idle health, one entry per concurrency level, the liveness verdict and, when the
    health check was blocked, `failure` (the row's status is then failed)."""
    import httpx

    from harness.measure import progress
    progress.phase("idle health")
    with httpx.Client(base_url=url, timeout=HEALTH_TIMEOUT_S) as client:
        idle = idle_health(client) if probe else {}
    results = []
    for c in levels:
        progress.phase(f"load sweep, concurrency {c}")
        results.append(asyncio.run(_level(url, protocol, request, c, requests_per_level(c), budget_s, timeout_s,
                                          probe)))
    # the service's own time for one generation: the median latency with one request in flight
    single = next((r["latency"].get("p50") for r in results if r["concurrency"] == 1 and r["ok"]), None)
    generation_s = single or generation_s
    serving = {"endpoint": url, "protocol": protocol.name, "load_generator": "httpx + asyncio (one machine)",
               "request": {"n": request.n, "size": f"{request.width}x{request.height}", "steps": request.steps,
                           "seed": request.seed},
               "requests_per_level": {str(c): requests_per_level(c) for c in levels},
               "timeout_s": timeout_s, "level_budget_s": budget_s, "sweep": results}
    if probe:
        serving["health"] = {"idle": idle, "interval_s": HEALTH_INTERVAL_S}
        serving["liveness"] = liveness(idle, results, generation_s)
        if serving["liveness"]["blocked"]:
            serving["failure"] = {"error_class": serving["liveness"]["error_class"],
                                  "reason": serving["liveness"]["reason"]}
    else:
        serving["liveness"] = {"blocked": None, "reason": "the service has no GET /health: liveness not probed"}
    return serving


# -- the backend -------------------------------------------------------------------------------------------------------
class HttpBackend(Backend):
    name = "http"
    options = tuple(PROTOCOLS)
    exclusive = (options,)
    extra = "service"
    description = "a deployed image-generation service over HTTP (OpenAI images API), with load sweep and liveness"

    def available(self) -> Support:
        return module_available("httpx")   # `diffbench backends` names the [service] extra

    def support(self, case, env) -> Support:
        basic = super().support(case, env)
        if not basic:
            return basic
        if not endpoint():
            return Support.no("no service endpoint: give --endpoint URL")
        if case.batch != 1:
            return Support.no("the OpenAI images API takes one prompt per request: batch 1 only "
                              "(load comes from the sweep's concurrency)")
        return Support.yes()

    def prepare(self, model, case, cache) -> Prepared:
        import httpx

        from harness import models
        url = endpoint()
        protocol = PROTOCOLS[case.variant or OpenAIImages.name]
        build: dict[str, float] = {}
        client = httpx.Client(base_url=url, timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))
        try:
            with timed(build, "connect"):
                health = client.get("/health", timeout=CONNECT_TIMEOUT_S)
        except httpx.HTTPError as exc:   # an endpoint that does not answer: an error row, the run goes on
            client.close()
            raise ConnectionError(f"endpoint {url} does not answer: {one_line(exc)}") from None
        served = {}
        if health.status_code == 200:
            try:
                served = health.json() if isinstance(health.json(), dict) else {}
            except ValueError:
                served = {}
        notes = [] if health.status_code == 200 else [f"GET {url}/health answered {_response_error(health)}: "
                                                      "liveness not probed"]
        # a service that says what it serves must serve the case's model and dtype, or the images mean nothing
        for key, wanted in (("model", case.model), ("dtype", case.dtype)):
            if served.get(key) and served[key] != wanted:
                client.close()
                raise Unsupported(f"the service at {url} serves {key} {served[key]}, not {wanted}: its images "
                                  f"cannot be judged against {case.model} {case.dtype}'s reference")
        request = ImageRequest(case.model, models.PROMPTS[0], "", case.height, case.width, case.steps,
                               models.GUIDANCE.get(model.kind, 7.5), models.seed_for(case))
        pipeline = ServicePipeline(client, protocol, request, url)
        probe = health.status_code == 200

        def after_measure() -> dict:
            serving = load_sweep(url, protocol, request, sweep_levels(), probe=probe)
            echoed = pipeline.echo.get("seed")
            if echoed is not None and echoed != request.seed:
                serving["seed_echo"] = f"asked for seed {request.seed}, the service says {echoed}"
            return {"serving": serving}

        info = {"http": {"endpoint": url, "protocol": protocol.name, "path": protocol.path,
                         "service": served or None, "request_timeout_s": REQUEST_TIMEOUT_S,
                         "sweep_levels": list(sweep_levels())},
                "notes": notes}
        return Prepared(pipeline, {}, build, info, on_close=[client.close], after_measure=after_measure,
                        remote=f"a service at {url}: only whole requests are visible")
