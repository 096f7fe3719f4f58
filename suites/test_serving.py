"""Serving: a real tritonserver serving the whole pipeline and its denoiser, measured like perf_analyzer does.

Per selected triton model (tiny ones on CPU): health / ready / metadata; a concurrency sweep (1, 2, 4, 8) of whole
pipeline requests with asyncio clients -- throughput, client latency p50/p90/p99, the server's queue / compute
split, whether dynamic batching batched; /metrics; HTTP vs gRPC latency on the denoiser; and the serving overhead
(the same requests served vs run locally in this process). One record per model goes into the session's records
(case id <model>/triton+serving/...), written when the module's server is torn down, so a failed test still
leaves a record saying what is missing.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from backends.onnx.components import component_specs
from backends.triton import repository as repo, server as srv
from backends.triton.backend import load_model
from backends.triton.client import Client, pipeline_request
from backends.triton.serving import latency_stats, model_statistics, scrape_metrics, statistics_delta, sweep
from harness import models
from harness.records import Record
from harness.selection.cases import Case

LEVELS = (1, 2, 4, 8)
PARTS = ("health", "sweep", "protocols", "overhead")


def serving_cases(config) -> list[Case]:
    """One serving case per selected triton model x dtype (the first size and step count), supported ones only."""
    from backends import base
    seen, cases = set(), []
    for c in getattr(config, "_diffbench_cases", []):
        if c.backend != "triton" or c.workload != "text-to-image" or (c.model, c.dtype) in seen:
            continue   # text-embedding models: suites/test_serving_embedding.py
        seen.add((c.model, c.dtype))
        case = Case(c.model, "triton", "serving", c.dtype, 1, c.height, c.width, c.steps)
        if base.get("triton").support(c.with_backend("triton", ""), {"device": "cpu"}) and c.dtype != "fp16":
            cases.append(case)
    return cases


def pytest_generate_tests(metafunc):
    if "serving_case" in metafunc.fixturenames:
        cases = serving_cases(metafunc.config)
        metafunc.parametrize("serving_case", cases or [None], ids=[c.id for c in cases] or ["none"],
                             scope="module")


class Served:
    """The module's server, its model names and the record being filled."""

    def __init__(self, case, server, source, pipeline_name, denoiser_name, denoiser):
        self.case, self.server, self.source = case, server, source
        self.pipeline_name, self.denoiser_name, self.denoiser = pipeline_name, denoiser_name, denoiser
        self.serving: dict = {}
        self.build: dict = {}

    def request(self, i: int) -> dict:
        c = self.case
        return pipeline_request(models.PROMPTS[i % len(models.PROMPTS)], 1000 + i, c.steps, c.height, c.width,
                                negative_prompt="")


@pytest.fixture(scope="module")
def served(serving_case, diffbench_session):
    if serving_case is None:
        pytest.skip("no triton model selected (use --backend triton and a tiny model or path:DIR)")
    reason = srv.missing_reason()
    if reason:
        pytest.skip(reason)
    case = serving_case
    model = models.load(case.model, case.dtype, "cpu")
    root = Path(diffbench_session.run_dir) / "triton" / case.model
    repository = root / "repository"
    build = {}
    start = time.perf_counter()
    pipe = repo.pipeline_model(repo.safe_name(f"{case.model}_{case.dtype}_pipeline"), model.source, case.dtype)
    repo.write_model(repository, pipe)
    (interface,) = component_specs(model, case, [model.denoiser])
    den = repo.interface_model(repo.safe_name(f"{case.model}_{case.dtype}_{model.denoiser}_denoiser"), interface,
                               case.dtype, source=model.source, subfolder=model.denoiser)
    repo.write_model(repository, den)
    build["repository"] = time.perf_counter() - start
    server = srv.TritonServer(repository, root).start()
    build["server_start"] = server.start_s
    s = Served(case, server, model.source, pipe.name, den.name, getattr(model.pipeline, model.denoiser))
    s.build, s.model = build, model
    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:   # parallel: each python model imports torch in its own stub
            list(pool.map(lambda name: load_model(server, name), [pipe.name, den.name]))
        build["model_load"] = time.perf_counter() - start
        yield s
    finally:
        server.stop()
        _write_record(diffbench_session, s)


def _write_record(session, s: Served) -> None:
    record = Record.for_case(s.case, session.run_id, device="cpu", build=s.build, serving=s.serving)
    missing = [p for p in PARTS if p not in s.serving]
    if missing:
        record.status, record.error_class = "failed", "ServingIncomplete"
        record.reason = f"serving parts not measured: {', '.join(missing)} (see the test failures)"
    sweep_levels = s.serving.get("sweep", [])
    if sweep_levels:
        record.e2e = sweep_levels[0]["latency"]      # concurrency 1: the client's end-to-end latency
    overhead = s.serving.get("overhead", {})
    if overhead:
        record.parity = {"verdict": "pass" if overhead["image_max_abs"] < 1e-3 else "fail", "reference": "local",
                         "image": {"max_abs": overhead["image_max_abs"]}}
    record.info = {"triton": {"log": str(s.server.log_path), "models": [s.pipeline_name, s.denoiser_name],
                              "backend": "python (torch)"}}
    record.prompt, record.seed = [models.PROMPTS[0]], 1000
    session.write(record)


def test_health_ready_metadata(served):
    for protocol in ("http", "grpc"):
        client = Client(served.server, protocol)
        try:
            raw = client.raw
            assert raw.is_server_live() and raw.is_server_ready()
            assert raw.is_model_ready(served.pipeline_name) and raw.is_model_ready(served.denoiser_name)
            meta = raw.get_model_metadata(served.pipeline_name, as_json=True) if protocol == "grpc" else \
                raw.get_model_metadata(served.pipeline_name)
            assert {i["name"] for i in meta["inputs"]} >= {"PROMPT", "SEED", "STEPS", "HEIGHT", "WIDTH"}
            assert [o["name"] for o in meta["outputs"]] == ["IMAGE"]
        finally:
            client.close()
    client = Client(served.server, "http")
    server_meta = client.raw.get_server_metadata()
    client.close()
    assert "statistics" in server_meta["extensions"] and "model_repository" in server_meta["extensions"]
    served.serving["health"] = {"version": server_meta["version"], "live": True, "ready": True,
                                "server_start_s": served.server.start_s}


def test_concurrency_sweep_and_batching(served):
    levels = sweep(served.server, served.pipeline_name, served.request, ["IMAGE"], levels=LEVELS,
                   requests_per_level=lambda c: max(4, 2 * c), budget_s=60, timeout_s=120)
    metrics = scrape_metrics(served.server.metrics_url)
    served.serving["sweep"] = levels
    served.serving["metrics"] = {k: v for k, v in metrics.items() if k.startswith(
        ("nv_inference_", "nv_cpu_", "nv_pinned_", "nv_cache_"))}
    top = levels[-1]
    served.serving["batching"] = {"concurrency": top["concurrency"], "requests": top["server_requests"],
                                  "executions": top["executions"], "batch_sizes": top["batch_sizes"],
                                  "batched": top["executions"] < top["server_requests"]}
    for level in levels:
        assert level["requests"] >= max(4, 2 * level["concurrency"]), level
        assert level["latency"]["n"] == level["requests"] and level["throughput_rps"] > 0
        assert level["server"]["compute_infer_ms"] > 0
    assert levels[0]["executions"] == levels[0]["server_requests"]   # alone: nothing to batch
    assert top["executions"] < top["server_requests"], f"dynamic batching did not batch: {top}"
    assert any(served.pipeline_name in labels for labels in metrics["nv_inference_request_success"])


def test_http_vs_grpc_denoiser_latency(served):
    """Concurrency 1, the denoiser with the pipeline's shapes (CFG batch 2): client latency per protocol."""
    c = served.case
    f = served.model.vae_scale_factor
    cfg = served.denoiser.config
    generator = torch.Generator().manual_seed(0)
    if served.model.kind == "sd3":
        arrays = {"hidden_states": torch.randn(2, cfg.in_channels, c.height // f, c.width // f, generator=generator),
                  "encoder_hidden_states": torch.randn(2, 77 + 256, cfg.joint_attention_dim, generator=generator),
                  "pooled_projections": torch.randn(2, cfg.pooled_projection_dim, generator=generator)}
    else:
        arrays = {"sample": torch.randn(2, cfg.in_channels, c.height // f, c.width // f, generator=generator),
                  "encoder_hidden_states": torch.randn(2, 77, cfg.cross_attention_dim, generator=generator)}
    arrays = {k: v.numpy() for k, v in arrays.items()}
    arrays["timestep"] = np.full((2, 1), 500.0, dtype=np.float32)
    results, outputs = {}, {}
    for protocol in ("http", "grpc"):
        client = Client(served.server, protocol)
        try:
            for _ in range(3):   # warm-up
                client.infer(served.denoiser_name, arrays, ["out_sample"])
            samples = []
            for _ in range(20):
                start = time.perf_counter()
                outputs[protocol] = client.infer(served.denoiser_name, arrays, ["out_sample"])["out_sample"]
                samples.append(time.perf_counter() - start)
        finally:
            client.close()
        results[protocol] = latency_stats(samples)
    # the same inputs into the local module: the component-level serving overhead
    names = ("hidden_states", "encoder_hidden_states", "pooled_projections") if served.model.kind == "sd3" \
        else ("sample", "encoder_hidden_states")
    tensors = {k: torch.from_numpy(arrays[k]) for k in names}
    samples = []
    for i in range(23):
        start = time.perf_counter()
        with torch.inference_mode():
            local = served.denoiser(**tensors, timestep=torch.full((2,), 500.0), return_dict=False)[0]
        if i >= 3:
            samples.append(time.perf_counter() - start)
    results["local"] = latency_stats(samples)
    np.testing.assert_allclose(outputs["http"], local.numpy(), atol=1e-4)
    np.testing.assert_array_equal(outputs["http"], outputs["grpc"])
    served.serving["protocols"] = {"model": served.denoiser_name, "concurrency": 1, **results,
                                   "ratio_p50": {p: results[p]["p50"] / results["local"]["p50"]
                                                 for p in ("http", "grpc")}}
    assert all(r["n"] == 20 for r in results.values())


def test_serving_overhead(served):
    """The same requests served (pipeline model, HTTP) and run locally in this process: latency ratio, same image."""
    from diffusers import DiffusionPipeline
    c = served.case
    local = DiffusionPipeline.from_pretrained(served.source, torch_dtype=models.TORCH_DTYPES[c.dtype],
                                              local_files_only=True)
    local.set_progress_bar_config(disable=True)
    guidance = models.GUIDANCE[served.model.kind]
    client = Client(served.server, "http", timeout_s=120)
    n = 6
    served_s, local_s, images = [], [], []
    before = model_statistics(client.raw, served.pipeline_name)
    # in blocks, not interleaved: torch's idle OpenMP threads keep spinning for a while after each call and
    # would slow the other process down on a small machine
    try:
        for i in range(n):
            start = time.perf_counter()
            images.append(client.infer(served.pipeline_name, served.request(i), ["IMAGE"])["IMAGE"][0])
            served_s.append(time.perf_counter() - start)
        after = model_statistics(client.raw, served.pipeline_name)
    finally:
        client.close()
    diffs = []
    for i in range(n):
        start = time.perf_counter()
        with torch.inference_mode():
            want = local(prompt=[models.PROMPTS[i % len(models.PROMPTS)]], negative_prompt=[""],
                         num_inference_steps=c.steps, height=c.height, width=c.width, guidance_scale=guidance,
                         generator=[torch.Generator("cpu").manual_seed(1000 + i)], output_type="np").images[0]
        local_s.append(time.perf_counter() - start)
        diffs.append(float(np.abs(images[i] - want).max()))
    served_stats, local_stats = latency_stats(served_s[1:]), latency_stats(local_s[1:])   # first call: warm-up
    served.serving["overhead"] = {
        "requests": len(served_s) - 1, "served": served_stats, "local": local_stats,
        "ratio_p50": served_stats["p50"] / local_stats["p50"],
        "overhead_ms_p50": (served_stats["p50"] - local_stats["p50"]) * 1000, "image_max_abs": max(diffs),
        # what the server itself spent per request (the rest of the served latency is transport + client)
        "server": statistics_delta(before, after)["server"]}
    assert max(diffs) < 1e-3, f"served image differs from the local pipeline's by {max(diffs)}"
