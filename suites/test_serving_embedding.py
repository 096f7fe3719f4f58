"""Serving a sentence-embedding model: its encoder in a real tritonserver, dynamic batching doing the batching.

The system this judges is a text-embedding service moved onto Triton, with its own targets: a single request under
10 ms, more than 500 embeddings/s batched. Per selected text-embedding model on the triton backend: health and
metadata; a concurrency sweep of single-sentence requests (1..64 in flight, asyncio clients, each level bounded in
requests and time) with throughput, client latency, the server's queue / compute split and the batch sizes dynamic
batching formed; the served embeddings against the local encoder's (cosine per sentence); HTTP vs gRPC at one
request in flight. One record per model (<model>/triton+serving/<dtype>/b1/seqN) carries it all: e2e = the
latency of one request alone, throughput = the best embeddings/s of the sweep -- what `diffbench gate
--threshold "e2e.p50:<10ms" --threshold "throughput:>500/s"` judges.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from backends.onnx.components import component_specs
from backends.triton import repository as repo, server as srv
from backends.triton.backend import load_model
from backends.triton.client import Client
from backends.triton.serving import latency_stats, scrape_metrics, sweep
from harness import models
from harness.models.embedding import embed
from harness.models.sentences import texts_for
from harness.records import Record
from harness.selection.cases import Case

LEVELS = (1, 2, 4, 8, 16, 32, 64)
PARTS = ("health", "sweep", "parity", "protocols")
QUEUE_DELAY_US = 1000   # what dynamic batching may wait for company: 1 ms of a 10 ms budget


def serving_cases(config) -> list[Case]:
    """One serving case per selected triton text-embedding model x dtype (its first sequence length)."""
    seen, cases = set(), []
    for c in getattr(config, "_diffbench_cases", []):
        if c.backend != "triton" or c.workload != "text-embedding" or (c.model, c.dtype) in seen:
            continue
        seen.add((c.model, c.dtype))
        if c.dtype == "fp32":   # numpy carries fp32 and fp16; a CPU server runs fp32
            cases.append(Case.embedding(c.model, "triton", "serving", c.dtype, 1, c.seq))
    return cases


def pytest_generate_tests(metafunc):
    if "embedding_case" in metafunc.fixturenames:
        cases = serving_cases(metafunc.config)
        metafunc.parametrize("embedding_case", cases or [None], ids=[c.id for c in cases] or ["none"],
                             scope="module")


class Served:
    def __init__(self, case, model, server, name, inputs):
        self.case, self.model, self.server, self.name, self.inputs = case, model, server, name, inputs
        self.serving: dict = {}
        self.build: dict = {}
        self.parity: dict = {}
        self.texts = texts_for(case.seq)

    def tokens(self, texts) -> dict[str, np.ndarray]:
        tokens = self.model.pipeline.tokenize(texts, self.case.seq)
        return {n: tokens[n].numpy().astype(np.int64) for n in self.inputs}

    def request(self, i: int) -> dict[str, np.ndarray]:
        """One sentence per request: what a service's clients send."""
        return self.tokens([self.texts[i % len(self.texts)]])


@pytest.fixture(scope="module")
def served(embedding_case, diffbench_session):
    if embedding_case is None:
        pytest.skip("no text-embedding model on the triton backend selected (e.g. --model minilm-l6 --backend triton)")
    reason = srv.missing_reason() or models.spec(embedding_case.model).missing()
    if reason:
        pytest.skip(reason)
    case = embedding_case
    model = models.load(case.model, case.dtype, "cpu")
    root = Path(diffbench_session.run_dir) / "triton" / case.model
    build, start = {}, time.perf_counter()
    (interface,) = component_specs(model, case)
    spec = repo.interface_model(repo.safe_name(f"{case.model}_{case.dtype}_encoder"), interface, case.dtype,
                                source=model.source, subfolder=model.encoder, max_batch_size=128,
                                max_queue_delay_us=QUEUE_DELAY_US)
    repo.write_model(root / "repository", spec)
    build["repository"] = time.perf_counter() - start
    server = srv.TritonServer(root / "repository", root).start()
    build["server_start"] = server.start_s
    s = Served(case, model, server, spec.name, list(interface.inputs))
    s.build = build
    try:
        start = time.perf_counter()
        load_model(server, spec.name)
        build["model_load"] = time.perf_counter() - start
        yield s
    finally:
        server.stop()
        _write_record(diffbench_session, s, spec)


def _write_record(session, s: Served, spec) -> None:
    record = Record.for_case(s.case, session.run_id, device="cpu", build=s.build, serving=s.serving)
    missing = [p for p in PARTS if p not in s.serving]
    if missing:
        record.status, record.error_class = "failed", "ServingIncomplete"
        record.reason = f"serving parts not measured: {', '.join(missing)} (see the test failures)"
    levels = s.serving.get("sweep", [])
    if levels:
        record.e2e = levels[0]["latency"]   # one request alone: what a single caller waits
        best = max(levels, key=lambda level: level["throughput_rps"])
        record.throughput = {"per_s": best["throughput_rps"], "concurrency": best["concurrency"],
                             "unit": "embeddings/s (one sentence per request)"}
    if s.parity:
        record.parity = s.parity
        if not s.parity["embedding"]["passed"]:
            record.status, record.error_class, record.reason = "failed", "ParityError", s.parity["embedding"]["error"]
    record.info = {"triton": {"log": str(s.server.log_path), "models": [s.name], "backend": "python (torch)",
                              "max_batch_size": spec.max_batch_size,
                              "preferred_batch_sizes": spec.preferred_batch_sizes,
                              "max_queue_delay_us": spec.max_queue_delay_us}}
    record.prompt = list(s.texts[:2])
    session.write(record)


def test_health_ready_metadata(served):
    for protocol in ("http", "grpc"):
        client = Client(served.server, protocol)
        try:
            assert client.raw.is_server_live() and client.raw.is_model_ready(served.name)
            meta = client.raw.get_model_metadata(served.name, as_json=True) if protocol == "grpc" else \
                client.raw.get_model_metadata(served.name)
            assert [i["name"] for i in meta["inputs"]] == served.inputs
            assert [o["name"] for o in meta["outputs"]] == ["last_hidden_state"]
        finally:
            client.close()
    served.serving["health"] = {"live": True, "ready": True, "server_start_s": served.server.start_s}


def test_concurrency_sweep_and_dynamic_batching(served):
    """Single-sentence requests, 1 to 64 in flight: dynamic batching must gather them (executions < requests)."""
    levels = sweep(served.server, served.name, served.request, ["last_hidden_state"], levels=LEVELS,
                   requests_per_level=lambda c: max(16, 4 * c), budget_s=20, timeout_s=60, warmup=4)
    served.serving["sweep"] = levels
    metrics = scrape_metrics(served.server.metrics_url)
    served.serving["metrics"] = {k: v for k, v in metrics.items() if k.startswith("nv_inference_")}
    top = levels[-1]
    served.serving["batching"] = {"concurrency": top["concurrency"], "requests": top["server_requests"],
                                  "executions": top["executions"], "batch_sizes": top["batch_sizes"],
                                  "batched": top["executions"] < top["server_requests"]}
    for level in levels:
        assert level["requests"] > 0 and level["latency"]["n"] == level["requests"]
        assert level["server"]["compute_infer_ms"] > 0
    assert levels[0]["executions"] == levels[0]["server_requests"]      # alone: nothing to batch
    assert top["executions"] < top["server_requests"], f"dynamic batching did not batch: {top}"
    assert max(int(b) for b in top["batch_sizes"]) > 1


def test_served_embeddings_match_the_local_encoder(served):
    """The fixed set through the served encoder (mean pooling and L2 normalisation here, as the pipeline does)
    against the local pipeline: cosine per sentence >= 0.9999 (fp32)."""
    from harness.judge import compare
    client = Client(served.server, "http")
    try:
        tokens = served.tokens(served.texts)
        hidden = client.infer(served.name, tokens, ["last_hidden_state"])["last_hidden_state"]
    finally:
        client.close()
    mask = tokens["attention_mask"][..., None].astype(np.float32)
    pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
    got = torch.nn.functional.normalize(torch.from_numpy(pooled), dim=-1).numpy()
    want = embed(served.model.pipeline, served.texts, served.case.seq)
    result = compare.check_embeddings(want, got, compare.EMBEDDING_TOLERANCES[served.case.dtype])
    served.parity = {"verdict": "pass" if result["passed"] else "fail", "reference": "local encoder",
                     "embedding": result}
    served.serving["parity"] = {"min_cosine": result["min_cosine"]}
    assert result["passed"], result.get("error")


def test_http_vs_grpc_single_request(served):
    results = {}
    for protocol in ("http", "grpc"):
        client = Client(served.server, protocol)
        try:
            for i in range(3):
                client.infer(served.name, served.request(i), ["last_hidden_state"])
            samples = []
            for i in range(20):
                start = time.perf_counter()
                client.infer(served.name, served.request(i), ["last_hidden_state"])
                samples.append(time.perf_counter() - start)
        finally:
            client.close()
        results[protocol] = latency_stats(samples)
    served.serving["protocols"] = {"model": served.name, "concurrency": 1, **results}
    assert all(r["n"] == 20 for r in results.values())
