"""http: an image-generation service as deployed, benchmarked over HTTP (`--backend http --endpoint URL`).

The service is a black box: prepare() returns a pipeline-like callable that sends the case's fixed inputs (prompt,
negative prompt, seed, steps, guidance, size) as one request and decodes the images it returns, so the harness
times it and judges its images against diffbench's own eager reference of the case's model like every backend.
Its components cannot be reached: component parity and component timing are skipped (Prepared.remote).

After the measured calls, after_measure() adds the record's `serving`: a load sweep with httpx and asyncio on this
machine, in closed loop (concurrency levels: that many requests in flight) or open loop (request-rate levels:
arrivals at a fixed rate, constant or Poisson, whatever the answers), each level measured in windows repeated until
the last three agree within a stability percentage (as Triton's perf_analyzer does), bounded in windows and time;
and a liveness probe: the health endpoint timed idle and during every level. A health check that waits for
generations (the event loop is blocked: the pipeline runs inside the async route) makes the row `failed`.

Protocols are entries of PROTOCOLS, chosen as the backend's option (`http+comfyui`, `http+template`):
  - openai (default): POST /v1/images/generations, base64 PNGs, with the extension fields seed, steps, guidance and
    negative_prompt;
  - comfyui: ComfyUI's prompt API: POST /prompt (an API-format workflow), poll GET /history/{prompt_id}, fetch each
    output image with GET /view?filename=&subfolder=&type= (ComfyUI's server.py routes);
  - template: any JSON API, described by a file (--http-template): the request path, a body with placeholders and
    the dotted path of the base64 images in the answer.
A protocol's exchange() is a generator of HTTP calls (and pauses, for polling) that returns the images: the same
exchange runs on the harness's blocking client (the timed calls) and on the sweep's asyncio clients.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import os
import random
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Generator, Iterator, Union

import numpy as np

from backends.base import Backend, Prepared, Support, Unsupported, module_available, timed
from harness.errors import UserError, one_line

ENDPOINT_ENV = "DIFFBENCH_HTTP_ENDPOINT"
SWEEP_ENV = "DIFFBENCH_HTTP_SWEEP"            # concurrency levels, e.g. "1,2,4"
RATE_ENV = "DIFFBENCH_HTTP_RATE"              # request-rate levels (requests/s), e.g. "0.5,1,2": open loop
DISTRIBUTION_ENV = "DIFFBENCH_HTTP_DISTRIBUTION"   # arrivals of the rate mode: constant | poisson
WINDOWS_ENV = "DIFFBENCH_HTTP_WINDOWS"        # most measurement windows per level
STABILITY_ENV = "DIFFBENCH_HTTP_STABILITY"    # percent: the last three windows agree within it
TEMPLATE_ENV = "DIFFBENCH_HTTP_TEMPLATE"      # the template protocol's file
DEFAULT_LEVELS = (1, 2, 4)
DISTRIBUTIONS = ("constant", "poisson")
DEFAULT_MAX_WINDOWS = 10                       # perf_analyzer's --max-trials default
DEFAULT_STABILITY_PCT = 10.0                   # perf_analyzer's --stability-percentage default
STABLE_WINDOWS = 3                             # perf_analyzer judges the last three measurements
REQUEST_TIMEOUT_S = 120.0                      # one generation; a request past it is a timeout
CONNECT_TIMEOUT_S = 5.0
HEALTH_TIMEOUT_S = 30.0
HEALTH_INTERVAL_S = 0.05                       # pause between health probes during load (20/s at most)
IDLE_HEALTH_PROBES = 20
LEVEL_BUDGET_S = 60.0                          # a level stops sending new requests after this
COMFYUI_POLL_S = 0.02                          # pause between GET /history polls (adds up to this to a latency)
# the liveness rule: under load, health p50 above this share of the median generation time AND above this
# multiple of its idle p50 means the health check waited for generations (the event loop is blocked)
BLOCKED_SHARE_OF_GENERATION = 0.5
BLOCKED_TIMES_IDLE = 10.0


def endpoint() -> str:
    return os.environ.get(ENDPOINT_ENV, "").rstrip("/")


def sweep_levels() -> tuple[int, ...]:
    text = os.environ.get(SWEEP_ENV, "")
    return tuple(int(v) for v in text.split(",") if v.strip()) if text else DEFAULT_LEVELS


def requests_per_window(concurrency: int) -> int:
    """A window closes after this many answers: every client's two requests (three at concurrency 1)."""
    return max(3, 2 * concurrency)


def requests_per_rate_window(rate: float) -> int:
    """A window of the rate mode: two seconds of arrivals, three requests at least."""
    return max(3, math.ceil(2 * rate))


class ServiceError(Exception):
    """The service answered, but not with images."""


# -- the load: its mode, levels and windows, from the run's options ------------------------------------------------
@dataclass(frozen=True)
class Load:
    mode: str = "concurrency"                  # "concurrency" (closed loop) | "rate" (open loop)
    levels: tuple = DEFAULT_LEVELS             # clients in flight, or requests per second
    distribution: str = "constant"             # the rate mode's arrivals
    max_windows: int = DEFAULT_MAX_WINDOWS
    stability_pct: float = DEFAULT_STABILITY_PCT
    window_requests: int | None = None         # answers per window; None: by level (requests_per_window...)

    def window_size(self, level) -> int:
        if self.window_requests:
            return self.window_requests
        return requests_per_window(level) if self.mode == "concurrency" else requests_per_rate_window(level)

    def label(self, level) -> str:
        return f"concurrency {level}" if self.mode == "concurrency" else f"request rate {level:g}/s"


def parse_levels(text: str, flag: str, kind=int) -> tuple:
    """'1,2,4' -> (1, 2, 4); UserError (one line, exit 2) unless positive numbers separated by commas."""
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(0 < v < float("inf") for v in values):   # nan and inf fail too
        example = "1,2,4" if kind is int else "0.5,1,2"
        raise UserError(f"{flag} {text!r}: expected positive numbers separated by commas, e.g. {example}")
    return values


def load_from_env() -> Load:
    """The sweep the run's options asked for (they travel in the environment: harness/selection/options.py)."""
    rates = os.environ.get(RATE_ENV, "")
    distribution = os.environ.get(DISTRIBUTION_ENV, "") or "constant"
    if distribution not in DISTRIBUTIONS:
        raise UserError(f"--request-distribution {distribution!r}: expected one of {', '.join(DISTRIBUTIONS)}")
    windows = os.environ.get(WINDOWS_ENV, "")
    stability = os.environ.get(STABILITY_ENV, "")
    try:
        max_windows = int(windows) if windows else DEFAULT_MAX_WINDOWS
        stability_pct = float(stability) if stability else DEFAULT_STABILITY_PCT
    except ValueError:
        max_windows = stability_pct = 0
    if max_windows < 1 or stability_pct <= 0:
        raise UserError(f"--sweep-windows {windows!r} / --stability {stability!r}: expected a positive whole number "
                        "of windows and a positive percentage")
    if rates:
        return Load("rate", parse_levels(rates, "--request-rate", float), distribution, max_windows, stability_pct)
    return Load("concurrency", sweep_levels(), distribution, max_windows, stability_pct)


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


@dataclass(frozen=True)
class Call:
    """One HTTP call of an exchange."""
    method: str
    path: str
    json: object = None
    params: dict | None = None


# an exchange yields Calls (and receives their responses) or pauses in seconds (and receives None); it returns
# (encoded images, the service's echo of the request where it gives one)
Exchange = Generator[Union[Call, float], object, tuple[list[bytes], dict]]


def expect_ok(call: Call, response) -> object:
    if response.status_code != 200:
        raise ServiceError(f"{call.method} {call.path}: {_response_error(response)}")
    return response


def exchange_sync(client, exchange: Exchange, timeout_s: float) -> tuple[list[bytes], dict]:
    """Run an exchange on a blocking httpx client; polling past timeout_s is a TimeoutError."""
    deadline = time.monotonic() + timeout_s
    step = next(exchange)
    while True:
        if isinstance(step, Call):
            reply = expect_ok(step, client.request(step.method, step.path, json=step.json, params=step.params))
        else:
            if time.monotonic() + step > deadline:
                raise TimeoutError(f"no images within {timeout_s:g} s")
            time.sleep(step)
            reply = None
        try:
            step = exchange.send(reply)
        except StopIteration as done:
            return done.value


async def exchange_async(client, exchange: Exchange, timeout_s: float) -> tuple[list[bytes], dict]:
    """The same on an asyncio httpx client."""
    deadline = time.monotonic() + timeout_s
    step = next(exchange)
    while True:
        if isinstance(step, Call):
            reply = expect_ok(step, await client.request(step.method, step.path, json=step.json,
                                                         params=step.params))
        else:
            if time.monotonic() + step > deadline:
                raise TimeoutError(f"no images within {timeout_s:g} s")
            await asyncio.sleep(step)
            reply = None
        try:
            step = exchange.send(reply)
        except StopIteration as done:
            return done.value


class OpenAIImages:
    """The OpenAI images API with diffbench's extension fields (seed, steps, guidance, negative_prompt)."""
    name = "openai"
    path = "/v1/images/generations"
    health_path = "/health"

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

    def exchange(self, r: ImageRequest) -> Exchange:
        response = yield Call("POST", self.path, self.body(r))
        return self.parse(response.json())


class ComfyUI:
    """ComfyUI's prompt API (server.py of comfyanonymous/ComfyUI): POST /prompt {"prompt": workflow, "client_id"}
    answers {"prompt_id", "number", "node_errors"}; GET /history/{prompt_id} answers {} until the prompt ran, then
    {prompt_id: {"prompt", "outputs": {node_id: {"images": [{"filename", "subfolder", "type"}]}}, "status":
    {"status_str", "completed", "messages"}}} (status in newer versions); GET /view?filename=&subfolder=&type= serves
    an image's bytes. ComfyUI has no /health: GET /system_stats is the liveness probe.

    The workflow is ComfyUI's default text-to-image graph in API format (script_examples/basic_api_example.py):
    CheckpointLoaderSimple (ckpt_name = the case's model) -> two CLIPTextEncode -> EmptyLatentImage -> KSampler
    (seed, steps, cfg) -> VAEDecode -> SaveImage."""
    name = "comfyui"
    path = "/prompt"
    health_path = "/system_stats"

    def __init__(self):
        self.client_id = uuid.uuid4().hex   # ComfyUI ties a prompt's websocket events to it; sent as its UI does

    @staticmethod
    def workflow(r: ImageRequest) -> dict:
        return {
            "3": {"class_type": "KSampler",
                  "inputs": {"seed": r.seed, "steps": r.steps, "cfg": r.guidance, "sampler_name": "euler",
                             "scheduler": "normal", "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0],
                             "negative": ["7", 0], "latent_image": ["5", 0]}},
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": r.model}},
            "5": {"class_type": "EmptyLatentImage",
                  "inputs": {"width": r.width, "height": r.height, "batch_size": r.n}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": r.prompt, "clip": ["4", 1]}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"text": r.negative_prompt, "clip": ["4", 1]}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
            "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "diffbench", "images": ["8", 0]}},
        }

    def exchange(self, r: ImageRequest) -> Exchange:
        queued = (yield Call("POST", "/prompt", {"prompt": self.workflow(r), "client_id": self.client_id})).json()
        prompt_id = queued.get("prompt_id") if isinstance(queued, dict) else None
        if not prompt_id:
            raise ServiceError(f"POST /prompt answered no prompt_id: {json.dumps(queued)[:200]}")
        if queued.get("node_errors"):
            raise ServiceError(f"POST /prompt: node errors {json.dumps(queued['node_errors'])[:200]}")
        while True:
            history = (yield Call("GET", f"/history/{prompt_id}")).json()
            entry = history.get(prompt_id) if isinstance(history, dict) else None
            if entry:
                status = entry.get("status") or {}
                if status.get("status_str") == "error":
                    raise ServiceError(f"prompt {prompt_id} failed: {json.dumps(status.get('messages'))[:200]}")
                if status.get("completed", True):
                    break
            yield COMFYUI_POLL_S
        # SaveImage's outputs are type "output"; previews ("temp") are not the result
        files = [image for _node, output in sorted((entry.get("outputs") or {}).items())
                 for image in (output.get("images") or []) if image.get("type", "output") == "output"]
        if not files:
            raise ServiceError(f"prompt {prompt_id} ran but saved no images (no SaveImage output in its history)")
        images = []
        for image in files:
            params = {"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                      "type": image.get("type", "output")}
            images.append((yield Call("GET", "/view", params=params)).content)
        return images, {}


PLACEHOLDERS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "height", "width", "n", "model")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_]+)\}")
TEMPLATE_KEYS = {"path": "the POST path, e.g. /generate", "body": "the request body, with {placeholders}",
                 "images": "the dotted path of the base64 image(s) in the answer, e.g. data.*.b64_json",
                 "health": "the liveness probe's GET path (default /health)"}


@dataclass(frozen=True)
class Template:
    """A JSON API described by a file: {"path": "/generate", "body": {... "{prompt}" ...}, "images": "data.*.b64_json",
    "health": "/health"}. A string that is exactly one placeholder becomes the value itself (a number stays a number);
    placeholders inside longer strings are replaced by their text. In the images path, a number indexes a list and
    `*` takes every item; each image is base64 (a `data:image/...;base64,` prefix is allowed)."""
    path: str
    body: object
    images: str
    health_path: str = "/health"
    source: str = ""
    name: str = field(default="template", init=False)

    @classmethod
    def load(cls, file: str) -> "Template":
        """The file, checked: UserError (one line, exit 2) naming what is wrong."""
        where = f"--http-template {file}"
        try:
            spec = json.loads(Path(file).read_text())
        except OSError as exc:
            raise UserError(f"{where}: cannot read it ({exc.strerror or exc})")
        except ValueError as exc:
            raise UserError(f"{where} is not JSON: {one_line(exc)}")
        if not isinstance(spec, dict):
            raise UserError(f"{where}: expected a JSON object with keys {', '.join(TEMPLATE_KEYS)}")
        unknown = sorted(set(spec) - set(TEMPLATE_KEYS))
        missing = [k for k in ("path", "body", "images") if k not in spec]
        if unknown or missing:
            problem = f"unknown key(s) {', '.join(unknown)}" if unknown else f"missing {', '.join(missing)}"
            raise UserError(f"{where}: {problem}; expected " + "; ".join(f"{k}: {v}" for k, v in TEMPLATE_KEYS.items()))
        for key in ("path", "health"):
            if key in spec and not (isinstance(spec[key], str) and spec[key].startswith("/")):
                raise UserError(f"{where}: {key} {spec[key]!r} must be a path starting with /")
        names = set()
        _walk_strings(spec["body"], lambda text: names.update(_PLACEHOLDER.findall(text)) or text)
        unknown = sorted(names - set(PLACEHOLDERS))
        if unknown:
            raise UserError(f"{where}: unknown placeholder(s) {', '.join('{%s}' % n for n in unknown)} in body; "
                            f"known: {', '.join('{%s}' % n for n in PLACEHOLDERS)}")
        if not names & {"prompt", "seed"}:
            raise UserError(f"{where}: the body has neither {{prompt}} nor {{seed}}: the case's inputs would not reach "
                            "the service")
        images = spec["images"]
        if not isinstance(images, str) or not re.fullmatch(r"[^.\s]+(\.[^.\s]+)*", images):
            raise UserError(f"{where}: images {images!r} must be a dotted path such as data.*.b64_json")
        return cls(spec["path"], spec["body"], images, spec.get("health", "/health"), str(file))

    @classmethod
    def from_env(cls) -> "Template":
        file = os.environ.get(TEMPLATE_ENV, "")
        if not file:
            raise UserError("the template protocol (http+template) needs --http-template FILE")
        return cls.load(file)

    def body_for(self, r: ImageRequest) -> object:
        values = {"prompt": r.prompt, "negative_prompt": r.negative_prompt, "seed": r.seed, "steps": r.steps,
                  "guidance": r.guidance, "height": r.height, "width": r.width, "n": r.n, "model": r.model}

        def fill(text: str):
            whole = _PLACEHOLDER.fullmatch(text)
            if whole:
                return values[whole.group(1)]
            return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)
        return _walk_strings(self.body, fill)

    def parse(self, payload) -> tuple[list[bytes], dict]:
        found = [payload]
        walked = []
        for key in self.images.split("."):
            walked.append(key)
            step = []
            for item in found:
                if key == "*" and isinstance(item, list):
                    step.extend(item)
                elif isinstance(item, list) and re.fullmatch(r"-?\d+", key) and -len(item) <= int(key) < len(item):
                    step.append(item[int(key)])
                elif isinstance(item, dict) and key in item:
                    step.append(item[key])
                else:
                    raise ServiceError(f"the answer has no images at {self.images}: nothing at {'.'.join(walked)}")
            found = step
        found = [x for item in found for x in (item if isinstance(item, list) else [item])]
        if not found or not all(isinstance(x, str) for x in found):
            raise ServiceError(f"the answer's {self.images} holds no base64 strings")
        try:
            return [base64.b64decode(x.split(",", 1)[1] if x.startswith("data:") else x, validate=True)
                    for x in found], {}
        except ValueError as exc:
            raise ServiceError(f"the answer's {self.images} is not base64: {one_line(exc)}")

    def exchange(self, r: ImageRequest) -> Exchange:
        response = yield Call("POST", self.path, self.body_for(r))
        return self.parse(response.json())


def _walk_strings(value, change):
    """A copy of a JSON value with change() applied to every string in it."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, list):
        return [_walk_strings(v, change) for v in value]
    if isinstance(value, dict):
        return {k: _walk_strings(v, change) for k, v in value.items()}
    return value


# name -> a factory of the protocol (the template's reads its file from the run's options)
PROTOCOLS = {OpenAIImages.name: OpenAIImages, ComfyUI.name: ComfyUI, "template": Template.from_env}


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
        self.seconds: list[float] = []   # every answered call, one at a time: the service's time for one request

    def request_for(self, inputs: dict) -> ImageRequest:
        negative = inputs.get("negative_prompt") or [""]
        return ImageRequest(self.request.model, inputs["prompt"][0], negative[0], inputs["height"], inputs["width"],
                            inputs["num_inference_steps"], float(inputs["guidance_scale"]), self.request.seed,
                            len(inputs["prompt"]))

    def __call__(self, **inputs):
        import httpx
        request = self.request_for(inputs)
        start = time.perf_counter()
        try:
            encoded, self.echo = exchange_sync(self.client, self.protocol.exchange(request), REQUEST_TIMEOUT_S)
        except httpx.TimeoutException as exc:
            raise TimeoutError(f"no answer from {self.url}{self.protocol.path} within "
                               f"{self.client.timeout.read:g} s ({type(exc).__name__})") from exc
        except ServiceError as exc:
            raise ServiceError(f"{self.url}: {exc}") from None
        self.seconds.append(time.perf_counter() - start)
        images = decode(encoded)
        if images.shape[:3] != (request.n, request.height, request.width):
            raise ServiceError(f"the service returned {images.shape[0]} image(s) of {images.shape[2]}x"
                               f"{images.shape[1]} for {request.n} of {request.width}x{request.height}: "
                               "they cannot be compared with the reference")
        return SimpleNamespace(images=images)


# -- load sweep and liveness probe -------------------------------------------------------------------------------------
def latency_stats(seconds: list[float]) -> dict:
    from harness.measure.timing import stats
    return stats(seconds)


def stable(windows: list[dict], stability_pct: float) -> bool:
    """perf_analyzer's rule: the last three windows' throughput and mean latency each vary by at most
    stability_pct (max / min <= 1 + pct/100); a window without an answered request is never stable."""
    if len(windows) < STABLE_WINDOWS:
        return False
    last = windows[-STABLE_WINDOWS:]
    for key in ("throughput_rps", "latency_mean_s"):
        values = [w[key] for w in last]
        if any(v is None or v <= 0 for v in values) or max(values) / min(values) > 1 + stability_pct / 100:
            return False
    return True


def arrival_gaps(rate: float, distribution: str, seed: int) -> Iterator[float]:
    """Seconds between the rate mode's sends: 1/rate (constant), or exponential with mean 1/rate (Poisson arrivals;
    seeded: the same schedule every run)."""
    rng = random.Random(seed)
    while True:
        yield rng.expovariate(rate) if distribution == "poisson" else 1.0 / rate


@dataclass
class _Answer:
    sent_at: float
    done_at: float
    outcome: str                 # ok | error | timeout
    latency: float
    error: str = ""


async def _probe_health(client, path: str, stop: asyncio.Event, samples: list[float], failures: list[str]) -> None:
    """GET the health path in a loop until stopped: each probe's latency (a probe that times out counts as its
    timeout)."""
    while not stop.is_set():
        start = time.perf_counter()
        try:
            response = await client.get(path, timeout=HEALTH_TIMEOUT_S)
            if response.status_code != 200:
                failures.append(_response_error(response))
        except Exception as exc:  # a timed out or refused probe: the service did not answer its health check
            failures.append(one_line(exc))
        samples.append(time.perf_counter() - start)
        try:
            await asyncio.wait_for(stop.wait(), HEALTH_INTERVAL_S)
        except asyncio.TimeoutError:
            pass


def _window(answers: list[_Answer], opened: float, n: int, load: Load, sends: list[float]) -> dict:
    """One measurement window: the answers that closed it, from the previous window's close to its last answer
    (`sends`: every request's send time, answered or not)."""
    closed = answers[-1].done_at
    wall = max(closed - opened, 1e-9)
    ok = [a.latency for a in answers if a.outcome == "ok"]
    window = {"answers": len(answers), "ok": len(ok), "errors": sum(a.outcome == "error" for a in answers),
              "timeouts": sum(a.outcome == "timeout" for a in answers), "wall_s": wall,
              "throughput_rps": len(ok) / wall, "images_per_s": len(ok) * n / wall,
              "latency_mean_s": sum(ok) / len(ok) if ok else None,
              "latency_p50_s": float(np.median(ok)) if ok else None}
    if load.mode == "rate":
        window["sent_rate_rps"] = sum(opened < t <= closed for t in sends) / wall
    return window


async def _level(url: str, protocol, request: ImageRequest, load: Load, level, budget_s: float, timeout_s: float,
                 probe: bool, seed: int = 0) -> dict:
    """One level of the sweep, measured in windows of `load.window_size(level)` answers until the last three agree
    (stable), `load.max_windows` were measured or the budget is spent; meanwhile one more client times the health
    path. Concurrency mode: `level` clients, each sends its next request when its last one is answered (closed
    loop). Rate mode: a request every 1/level s (constant) or after exponential gaps of that mean (Poisson, seeded),
    whatever the answers (open loop)."""
    import httpx
    per_window = load.window_size(level)
    answers: list[_Answer] = []
    sends: list[float] = []
    windows: list[dict] = []
    window_answers: list[list[_Answer]] = []
    opened = [0.0]
    health: list[float] = []
    health_failures: list[str] = []
    done = asyncio.Event()   # stop sending: stable, enough windows or out of time
    start = time.perf_counter()
    deadline = start + budget_s
    opened[0] = start
    limits = httpx.Limits(max_connections=level + 1 if load.mode == "concurrency" else None)

    def answered(answer: _Answer) -> None:
        answers.append(answer)
        if done.is_set() or len(answers) % per_window:
            return
        closing = answers[-per_window:]
        windows.append(_window(closing, opened[0], request.n, load, sends))
        window_answers.append(closing)
        opened[0] = closing[-1].done_at
        if stable(windows, load.stability_pct) or len(windows) >= load.max_windows:
            done.set()

    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client, \
            httpx.AsyncClient(base_url=url, timeout=HEALTH_TIMEOUT_S) as health_client:
        async def one() -> None:
            sent = time.perf_counter()
            sends.append(sent)
            outcome, error = "ok", ""
            try:
                await exchange_async(client, protocol.exchange(request), timeout_s)
            except (httpx.TimeoutException, TimeoutError):
                outcome = "timeout"
            except Exception as exc:
                outcome, error = "error", one_line(exc)
            now = time.perf_counter()
            answered(_Answer(sent, now, outcome, now - sent, error))

        async def user() -> None:
            while not done.is_set() and time.perf_counter() < deadline:
                await one()

        async def arrivals() -> None:
            gaps = arrival_gaps(level, load.distribution, seed)
            in_flight = set()
            due = time.perf_counter()
            while not done.is_set() and due < deadline:
                delay = due - time.perf_counter()
                if delay > 0:
                    try:   # wait for the next arrival, unless the level ends first
                        await asyncio.wait_for(done.wait(), delay)
                        break
                    except asyncio.TimeoutError:
                        pass
                task = asyncio.create_task(one())
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                due += next(gaps)
            if in_flight:   # the requests already sent are answered (each bounded by the request timeout)
                await asyncio.gather(*in_flight)

        stop = asyncio.Event()
        prober = asyncio.create_task(_probe_health(health_client, protocol.health_path, stop, health,
                                                   health_failures)) if probe else None
        if load.mode == "concurrency":
            await asyncio.gather(*(user() for _ in range(level)))
        else:
            await arrivals()
        wall = time.perf_counter() - start
        stop.set()
        if prober is not None:
            await prober
    # the level's figures come from its last windows (the stable ones when it stabilised), as perf_analyzer's do
    judged = [a for group in window_answers[-STABLE_WINDOWS:] for a in group]
    judged_wall = sum(w["wall_s"] for w in windows[-STABLE_WINDOWS:])
    if not windows:   # the budget ran out before one window closed: what did come back, over the whole level
        judged, judged_wall = answers, wall
    ok = [a.latency for a in judged if a.outcome == "ok"]
    errors = [a.error for a in answers if a.outcome == "error"]
    is_stable = stable(windows, load.stability_pct)
    why = ("stable" if is_stable else
           f"{len(windows)} window(s) measured: stability needs {STABLE_WINDOWS}" if len(windows) < STABLE_WINDOWS
           else f"the last {STABLE_WINDOWS} windows differ by more than {load.stability_pct:g} %")
    if not is_stable and len(windows) < load.max_windows:
        why += f"; stopped by the level's {budget_s:g} s budget"
    result = {("concurrency" if load.mode == "concurrency" else "request_rate"): level,
              "sent": len(answers), "ok": sum(a.outcome == "ok" for a in answers), "errors": len(errors),
              "timeouts": sum(a.outcome == "timeout" for a in answers), "error_examples": sorted(set(errors))[:3],
              "wall_s": wall, "window_requests": per_window, "windows": windows, "stable": is_stable,
              "stability": why,
              "throughput_rps": len(ok) / judged_wall if judged_wall else 0.0,
              "images_per_s": len(ok) * request.n / judged_wall if judged_wall else 0.0,
              "latency": latency_stats(ok),
              "health": {**latency_stats(health), "failures": len(health_failures),
                         "failure_examples": sorted(set(health_failures))[:3]} if probe else None}
    if load.mode == "rate":
        result["distribution"] = load.distribution
        # the rate the sender kept: arrivals between the first and the last request it sent
        sent_at = sorted(sends)
        result["achieved_rate_rps"] = ((len(sent_at) - 1) / (sent_at[-1] - sent_at[0])
                                       if len(sent_at) > 1 and sent_at[-1] > sent_at[0] else None)
    return result


def idle_health(client, path: str = "/health", probes: int = IDLE_HEALTH_PROBES) -> dict:
    """The health path with nothing else running: the yardstick of the probe under load."""
    samples = []
    for _ in range(probes):
        start = time.perf_counter()
        client.get(path).raise_for_status()
        samples.append(time.perf_counter() - start)
    return latency_stats(samples)


def _level_label(level: dict) -> str:
    return (f"concurrency {level['concurrency']}" if "concurrency" in level
            else f"request rate {level['request_rate']:g}/s")


def liveness(idle: dict, levels: list[dict], generation_s: float | None, path: str = "/health") -> dict:
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
            verdict["reason"] = (f"health check {'blocked' if timed_out else 'failed'} under load at "
                                 f"{_level_label(level)}: {health['failures']} of {health.get('n', 0)} GET {path} "
                                 f"{f'got no answer within {HEALTH_TIMEOUT_S:g} s' if timed_out else 'failed'} "
                                 f"({example})")
            return verdict
        p50 = health.get("p50")
        if p50 is None or not generation_s or not idle.get("p50"):
            continue
        if p50 > BLOCKED_SHARE_OF_GENERATION * generation_s and p50 > BLOCKED_TIMES_IDLE * idle["p50"]:
            verdict["blocked"], verdict["error_class"] = True, "BlockedHealthCheck"
            verdict["reason"] = (f"health check blocked under load: GET {path} p50 {p50 * 1e3:.0f} ms at "
                                 f"{_level_label(level)} (idle {idle['p50'] * 1e3:.1f} ms, median "
                                 f"generation {generation_s * 1e3:.0f} ms): the event loop waits for generations")
            return verdict
    return verdict


def load_sweep(url: str, protocol, request: ImageRequest, load: Load | tuple = DEFAULT_LEVELS, probe: bool = True,
               timeout_s: float = REQUEST_TIMEOUT_S, budget_s: float = LEVEL_BUDGET_S,
               generation_s: float | None = None) -> dict:
    """The record's `serving`: idle health, one entry per level, the liveness verdict and, when the health check
    was blocked, `failure` (the row's status is then failed). `load`: a Load, or concurrency levels;
    `generation_s`: one request's time alone, when no level has one request in flight."""
    import httpx

    from harness.measure import progress
    if not isinstance(load, Load):
        load = Load("concurrency", tuple(load))
    health_path = protocol.health_path
    progress.phase("idle health")
    with httpx.Client(base_url=url, timeout=HEALTH_TIMEOUT_S) as client:
        idle = idle_health(client, health_path) if probe else {}
    results = []
    for level in load.levels:
        progress.phase(f"load sweep, {load.label(level)}")
        results.append(asyncio.run(_level(url, protocol, request, load, level, budget_s, timeout_s, probe,
                                          seed=request.seed)))
    # the service's own time for one generation: the median latency with one request in flight (concurrency 1);
    # else `generation_s`, the timed calls' median (one at a time): an open loop's latencies hold queueing
    single = next((r["latency"]["p50"] for r in results if r.get("concurrency") == 1 and r["ok"]), None)
    generation_s = single or generation_s
    serving = {"endpoint": url, "protocol": protocol.name, "load_generator": "httpx + asyncio (one machine)",
               "mode": load.mode, "request": {"n": request.n, "size": f"{request.width}x{request.height}",
                                              "steps": request.steps, "seed": request.seed},
               "levels": list(load.levels),
               "window_requests": {f"{v:g}": load.window_size(v) for v in load.levels},
               "max_windows": load.max_windows, "stability_pct": load.stability_pct,
               "timeout_s": timeout_s, "level_budget_s": budget_s, "sweep": results}
    if load.mode == "rate":
        serving["distribution"] = load.distribution
    if probe:
        serving["health"] = {"idle": idle, "interval_s": HEALTH_INTERVAL_S, "path": health_path}
        serving["liveness"] = liveness(idle, results, generation_s, health_path)
        if serving["liveness"]["blocked"]:
            serving["failure"] = {"error_class": serving["liveness"]["error_class"],
                                  "reason": serving["liveness"]["reason"]}
    else:
        serving["liveness"] = {"blocked": None,
                               "reason": f"the service has no GET {health_path}: liveness not probed"}
    return serving


# -- the backend -------------------------------------------------------------------------------------------------------
class HttpBackend(Backend):
    name = "http"
    options = tuple(PROTOCOLS)
    exclusive = (options,)
    extra = "service"
    description = ("a deployed image-generation service over HTTP (OpenAI images API, ComfyUI or a JSON template), "
                   "with load sweep and liveness")

    def available(self) -> Support:
        return module_available("httpx")   # `diffbench backends` names the [service] extra

    def support(self, case, env) -> Support:
        basic = super().support(case, env)
        if not basic:
            return basic
        if not endpoint():
            return Support.no("no service endpoint: give --endpoint URL")
        if case.variant == "template" and not os.environ.get(TEMPLATE_ENV):
            return Support.no("the template protocol (http+template) needs --http-template FILE")
        if case.batch != 1:
            return Support.no("one prompt per request: batch 1 only (load comes from the sweep's concurrency)")
        return Support.yes()

    def prepare(self, model, case, cache) -> Prepared:
        import httpx

        from harness import models
        url = endpoint()
        protocol = PROTOCOLS[case.variant or OpenAIImages.name]()
        load = load_from_env()
        build: dict[str, float] = {}
        client = httpx.Client(base_url=url, timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))
        health_url = f"{url}{protocol.health_path}"
        try:
            with timed(build, "connect"):
                health = client.get(protocol.health_path, timeout=CONNECT_TIMEOUT_S)
        except httpx.HTTPError as exc:   # an endpoint that does not answer: an error row, the run goes on
            client.close()
            raise ConnectionError(f"endpoint {url} does not answer: {one_line(exc)}") from None
        served = {}
        if health.status_code == 200:
            try:
                served = health.json() if isinstance(health.json(), dict) else {}
            except ValueError:
                served = {}
        notes = [] if health.status_code == 200 else [f"GET {health_url} answered {_response_error(health)}: "
                                                      "liveness not probed"]
        # a service that says what it serves must serve the case's model and dtype, or the images mean nothing
        for key, wanted in (("model", case.model), ("dtype", case.dtype)):
            if isinstance(served.get(key), str) and served[key] != wanted:
                client.close()
                raise Unsupported(f"the service at {url} serves {key} {served[key]}, not {wanted}: its images "
                                  f"cannot be judged against {case.model} {case.dtype}'s reference")
        request = ImageRequest(case.model, models.PROMPTS[0], "", case.height, case.width, case.steps,
                               models.GUIDANCE.get(model.kind, 7.5), models.seed_for(case))
        pipeline = ServicePipeline(client, protocol, request, url)
        probe = health.status_code == 200

        def after_measure() -> dict:
            alone = float(np.median(pipeline.seconds)) if pipeline.seconds else None
            serving = load_sweep(url, protocol, request, load, probe=probe, generation_s=alone)
            echoed = pipeline.echo.get("seed")
            if echoed is not None and echoed != request.seed:
                serving["seed_echo"] = f"asked for seed {request.seed}, the service says {echoed}"
            return {"serving": serving}

        info = {"http": {"endpoint": url, "protocol": protocol.name, "path": protocol.path,
                         "health_path": protocol.health_path, "service": served or None,
                         "request_timeout_s": REQUEST_TIMEOUT_S, "sweep_mode": load.mode,
                         "sweep_levels": list(load.levels)},
                "notes": notes}
        if isinstance(protocol, Template):
            info["http"]["template"] = protocol.source
        return Prepared(pipeline, {}, build, info, on_close=[client.close], after_measure=after_measure,
                        remote=f"a service at {url}: only whole requests are visible")
