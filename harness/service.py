"""`diffbench service`: a correct reference image-generation service (FastAPI + uvicorn on 127.0.0.1).

It speaks the OpenAI images API (`POST /v1/images/generations`, images as base64 PNGs) with the extension fields
`seed`, `steps`, `guidance` and `negative_prompt`, and answers `GET /health` (200 once the model is loaded). It
does what a service must and what wrappers often miss:
  - the pipeline runs off the event loop, in a bounded worker pool with a bounded queue (503 when it is full), so
    health checks and new requests are answered while images are generated;
  - every request gets its own pipeline object with a fresh scheduler (`from_pipe`, the weights shared): a
    scheduler keeps per-call state (its step index, timesteps) and breaks when calls share it;
  - the seed is honoured: the initial latents are drawn exactly as diffbench's own runs draw them
    (harness.models.initial_latents), so the images can be judged against diffbench's reference.
`--blocking` reproduces the common broken wrapper: the pipeline called inside the `async def` route, which blocks
the event loop (health checks wait for generations). It exists so the http backend's liveness probe can be tested.

It also speaks the part of ComfyUI's prompt API that the http backend's `comfyui` protocol uses (a stand-in for a
ComfyUI server, with diffbench's own pipeline behind it): POST /prompt (an API-format text-to-image workflow: its
KSampler's seed, steps and cfg, its two CLIPTextEncode texts, its EmptyLatentImage size), GET /history/{prompt_id},
GET /view?filename=&subfolder=&type=output and GET /system_stats, shaped as ComfyUI's server.py answers them.
"""

import asyncio
import base64
import contextlib
import io
import itertools
import os
import secrets
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from harness.errors import UserError

DEFAULT_STEPS = 4
MAX_IMAGES = 4
KEPT_PROMPTS = 256    # ComfyUI-style history and image files kept in memory (the oldest are dropped)


class Generator:
    """The loaded model and the one way images are made from a request (used by both modes)."""

    def __init__(self, model_name: str, dtype: str = "fp32"):
        from harness import models
        self.model = models.load(model_name, dtype, "cpu")
        if self.model.encoder:
            raise UserError(f"{model_name} is a text-embedding model: the service generates images")
        self.name, self.dtype = model_name, dtype

    def __call__(self, prompt: str, negative_prompt: str, n: int, height: int, width: int, steps: int,
                 guidance: float, seed: int) -> list[bytes]:
        import numpy as np
        import torch
        from PIL import Image

        from harness import models
        from harness.selection.cases import Case
        base = self.model.pipeline
        # a fresh scheduler per request, the weights shared: scheduler state is per call
        scheduler = type(base.scheduler).from_config(base.scheduler.config)
        pipeline = type(base).from_pipe(base, scheduler=scheduler)
        pipeline.set_progress_bar_config(disable=True)
        shape = Case(self.name, "service", "", self.dtype, n, height, width, steps)
        kwargs = dict(prompt=[prompt] * n, num_inference_steps=steps, height=height, width=width,
                      guidance_scale=guidance, output_type="np",
                      latents=models.initial_latents(self.model, shape, seed=seed),
                      generator=torch.Generator("cpu").manual_seed(seed))
        if self.model.kind in ("sd", "sdxl", "sd3"):
            kwargs["negative_prompt"] = [negative_prompt] * n
        if self.model.kind == "flux":
            kwargs["max_sequence_length"] = 512
        with torch.inference_mode():
            images = pipeline(**kwargs).images
        pngs = []
        for image in images:
            buffer = io.BytesIO()
            Image.fromarray((np.clip(np.nan_to_num(image), 0, 1) * 255).round().astype(np.uint8)).save(buffer, "PNG")
            pngs.append(buffer.getvalue())
        return pngs


def parse_size(size: str) -> tuple[int, int]:
    """OpenAI's "WIDTHxHEIGHT" -> (height, width)."""
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"size {size!r}: expected WIDTHxHEIGHT, e.g. 512x512")
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise ValueError(f"size {size!r}: width and height must be positive multiples of 8")
    return height, width


def read_workflow(graph) -> tuple[str, dict, str, str]:
    """A ComfyUI API-format text-to-image workflow -> (ckpt_name, the generation's inputs, the SaveImage node's id,
    its filename_prefix). ValueError naming what is missing: the stand-in runs one KSampler into one SaveImage."""
    if not isinstance(graph, dict):
        raise ValueError("prompt: expected an API-format workflow (an object of nodes)")
    nodes = {str(k): v for k, v in graph.items() if isinstance(v, dict)}

    def only(kind: str) -> tuple[str, dict]:
        found = [(k, n.get("inputs") or {}) for k, n in nodes.items() if n.get("class_type") == kind]
        if len(found) != 1:
            raise ValueError(f"the stand-in runs workflows with one {kind} node, this one has {len(found)}")
        return found[0]

    def linked(ref, kind: str) -> dict:
        node = nodes.get(str(ref[0])) if isinstance(ref, list) and ref else None
        if node is None or node.get("class_type") != kind:
            raise ValueError(f"the KSampler input {ref!r} must link to a {kind} node")
        return node.get("inputs") or {}

    _, sampler = only("KSampler")
    save_id, save = only("SaveImage")
    try:
        latent = linked(sampler["latent_image"], "EmptyLatentImage")
        inputs = {"prompt": str(linked(sampler["positive"], "CLIPTextEncode")["text"]),
                  "negative_prompt": str(linked(sampler["negative"], "CLIPTextEncode")["text"]),
                  "n": int(latent.get("batch_size", 1)), "height": int(latent["height"]),
                  "width": int(latent["width"]), "steps": int(sampler["steps"]), "guidance": float(sampler["cfg"]),
                  "seed": int(sampler["seed"])}
        ckpt = str(linked(sampler["model"], "CheckpointLoaderSimple")["ckpt_name"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"the workflow lacks an input: {exc}")
    if not 1 <= inputs["n"] <= MAX_IMAGES or inputs["seed"] < 0 or inputs["steps"] < 1:
        raise ValueError(f"batch_size 1..{MAX_IMAGES}, seed >= 0 and steps >= 1 expected")
    parse_size(f"{inputs['width']}x{inputs['height']}")
    return ckpt, inputs, save_id, str(save.get("filename_prefix", "ComfyUI"))


def create_app(generate, blocking: bool = False, workers: int = 1, max_queue: int = 8):
    """The FastAPI app around `generate` (a Generator, or any callable with its signature)."""
    from fastapi import FastAPI, HTTPException
    from pydantic import BaseModel, Field

    from harness import models

    class ImageRequest(BaseModel):
        prompt: str
        model: str | None = None
        n: int = Field(1, ge=1, le=MAX_IMAGES)
        size: str = "512x512"
        response_format: str = "b64_json"
        # extensions
        seed: int | None = Field(None, ge=0, le=2**63 - 1)
        steps: int = Field(DEFAULT_STEPS, ge=1, le=1000)
        guidance: float | None = None
        negative_prompt: str = ""

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pipeline")

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        pool.shutdown(wait=False, cancel_futures=True)   # queued generations are dropped at shutdown

    app = FastAPI(title="diffbench reference image service", lifespan=lifespan)
    slots = threading.BoundedSemaphore(workers + max_queue)   # in flight + waiting: a full queue answers 503
    served = {"model": getattr(generate, "name", None), "dtype": getattr(generate, "dtype", None),
              "mode": "blocking" if blocking else "worker", "workers": workers, "max_queue": max_queue}

    @app.get("/health")
    async def health():
        return {"status": "ok", **served}

    @app.post("/v1/images/generations")
    async def generations(request: ImageRequest):
        if request.response_format != "b64_json":
            raise HTTPException(400, f"response_format {request.response_format!r}: only b64_json is served")
        if request.model and served["model"] and request.model != served["model"]:
            raise HTTPException(400, f"model {request.model!r}: this service serves {served['model']!r}")
        try:
            height, width = parse_size(request.size)
        except ValueError as exc:
            raise HTTPException(400, str(exc))
        seed = secrets.randbelow(2**31) if request.seed is None else request.seed
        kind = getattr(getattr(generate, "model", None), "kind", "sd")
        guidance = models.GUIDANCE.get(kind, 7.5) if request.guidance is None else request.guidance
        args = (request.prompt, request.negative_prompt, request.n, height, width, request.steps, guidance, seed)
        if not slots.acquire(blocking=False):
            raise HTTPException(503, "queue full: try again later")
        start = time.perf_counter()
        try:
            if blocking:   # the broken wrapper: the event loop runs the pipeline and answers nothing else meanwhile
                pngs = generate(*args)
            else:
                pngs = await asyncio.get_running_loop().run_in_executor(pool, generate, *args)
        finally:
            slots.release()
        return {"created": int(time.time()),
                "data": [{"b64_json": base64.b64encode(png).decode("ascii")} for png in pngs],
                "model": served["model"], "size": f"{width}x{height}", "seed": seed, "steps": request.steps,
                "guidance": guidance, "negative_prompt": request.negative_prompt,
                "server_s": time.perf_counter() - start}   # queue + generation

    # -- ComfyUI's prompt API (the subset the http backend's comfyui protocol uses) ----------------------------------
    from fastapi.responses import JSONResponse, Response

    history: dict = {}                 # prompt_id -> ComfyUI's history entry
    files: dict = {}                   # filename -> PNG bytes, served by /view
    numbers, names = itertools.count(), itertools.count(1)
    running: set = set()               # the queued executions (a reference keeps each task alive)

    def keep(store: dict, key, value) -> None:
        store[key] = value
        while len(store) > KEPT_PROMPTS * MAX_IMAGES:
            store.pop(next(iter(store)))

    def finished(prompt_id, number, graph, save_id, prefix, pngs, error=None) -> None:
        images = []
        for png in pngs:
            name = f"{prefix}_{next(names):05}_.png"   # SaveImage's file naming
            keep(files, name, png)
            images.append({"filename": name, "subfolder": "", "type": "output"})
        status = ({"status_str": "success", "completed": True, "messages": []} if error is None else
                  {"status_str": "error", "completed": False,
                   "messages": [["execution_error", {"exception_message": error}]]})
        keep(history, prompt_id, {"prompt": [number, prompt_id, graph, {}, [save_id]],
                                  "outputs": {save_id: {"images": images}} if images else {}, "status": status})

    @app.post("/prompt")
    async def prompt(body: dict):
        graph = body.get("prompt")
        try:
            ckpt, inputs, save_id, prefix = read_workflow(graph)
            if served["model"] and ckpt != served["model"]:
                raise ValueError(f"ckpt_name {ckpt!r}: this service serves {served['model']!r}")
        except ValueError as exc:   # ComfyUI's answer to an invalid prompt
            return JSONResponse({"error": {"type": "prompt_outputs_failed_validation", "message": str(exc),
                                           "details": "", "extra_info": {}}, "node_errors": {}}, status_code=400)
        args = (inputs["prompt"], inputs["negative_prompt"], inputs["n"], inputs["height"], inputs["width"],
                inputs["steps"], inputs["guidance"], inputs["seed"])
        if not slots.acquire(blocking=False):
            raise HTTPException(503, "queue full: try again later")
        prompt_id, number = str(uuid.uuid4()), next(numbers)
        if blocking:   # the broken wrapper again: the prompt runs inside the route
            try:
                finished(prompt_id, number, graph, save_id, prefix, generate(*args))
            except Exception as exc:
                finished(prompt_id, number, graph, save_id, prefix, [], str(exc))
            finally:
                slots.release()
        else:          # queued, as ComfyUI does: the answer comes at once, the history when the prompt ran
            async def execute():
                try:
                    pngs = await asyncio.get_running_loop().run_in_executor(pool, generate, *args)
                    finished(prompt_id, number, graph, save_id, prefix, pngs)
                except Exception as exc:
                    finished(prompt_id, number, graph, save_id, prefix, [], str(exc))
                finally:
                    slots.release()
            task = asyncio.create_task(execute())
            running.add(task)
            task.add_done_callback(running.discard)
        return {"prompt_id": prompt_id, "number": number, "node_errors": {}}

    @app.get("/history/{prompt_id}")
    async def prompt_history(prompt_id: str):
        return {prompt_id: history[prompt_id]} if prompt_id in history else {}

    @app.get("/view")
    async def view(filename: str, subfolder: str = "", type: str = "output"):
        if type != "output" or subfolder or filename not in files:
            return Response(status_code=404)
        return Response(files[filename], media_type="image/png")

    @app.get("/system_stats")
    async def system_stats():
        return {"system": {"os": os.name, "python_version": sys.version, "comfyui_version": "diffbench stand-in",
                           "embedded_python": False},
                "devices": [{"name": "cpu", "type": "cpu", "index": None}]}

    return app


def serve(model: str, port: int, dtype: str = "fp32", blocking: bool = False, workers: int = 1,
          max_queue: int = 8, host: str = "127.0.0.1") -> None:
    """Load the model, then serve until SIGINT/SIGTERM (uvicorn's own handling)."""
    for name in ("fastapi", "uvicorn"):
        try:
            __import__(name)
        except ImportError:
            raise UserError(f"{name} is not installed: pip install 'diffbench[service]'")
    import uvicorn
    if not 0 < port < 65536:
        raise UserError(f"--port {port}: expected 1..65535")
    generate = Generator(model, dtype)   # before the socket opens: /health answers only when ready
    app = create_app(generate, blocking=blocking, workers=workers, max_queue=max_queue)
    print(f"diffbench service: {model} ({dtype}, {'blocking' if blocking else f'{workers} worker(s)'}) on "
          f"http://{host}:{port}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
