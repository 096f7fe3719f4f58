"""Serving measurements: concurrency sweeps with asyncio clients, the server's statistics split (queue, compute
input / infer / output), whether dynamic batching batched, and /metrics.

Each sweep level runs in its own event loop with an aio client (HTTP via aiohttp, or grpc.aio): N workers keep N
requests in flight, bounded by a request count and a time budget, every request under asyncio.wait_for.
"""
from __future__ import annotations

import asyncio
import time
import urllib.request
from typing import Callable


from backends.triton.client import AsyncClient
from harness.measure.timing import stats as latency_stats


# -- server-side statistics -----------------------------------------------------------------------------------------
def model_statistics(http_client, model: str, version: str = "") -> dict:
    """Cumulative counters of one model from the statistics extension (sync tritonclient.http client); `version`
    picks one of several served versions (default: the first the server lists)."""
    return _counters(http_client.get_inference_statistics(model, model_version=version)["model_stats"][0])


def statistics_by_version(http_client, model: str) -> dict[str, dict]:
    """model_statistics of every served version of a model: {version: counters}."""
    return {stats["version"]: _counters(stats)
            for stats in http_client.get_inference_statistics(model)["model_stats"]}


def _counters(stats: dict) -> dict:
    infer = stats["inference_stats"]
    return {"requests": int(infer["success"]["count"]), "failures": int(infer["fail"]["count"]),
            "executions": int(stats.get("execution_count", 0)), "inferences": int(stats.get("inference_count", 0)),
            **{f"{k}_ns": int(infer[k]["ns"]) for k in ("queue", "compute_input", "compute_infer", "compute_output")},
            "batch_sizes": {int(b["batch_size"]): int(b["compute_infer"]["count"])
                            for b in stats.get("batch_stats", [])}}


def statistics_delta(before: dict, after: dict) -> dict:
    """What one sweep level added: per-request server times in ms, executions vs requests, batch sizes seen."""
    requests = after["requests"] - before["requests"]
    per = max(requests, 1)
    split = {f"{k}_ms": (after[f"{k}_ns"] - before[f"{k}_ns"]) / per / 1e6
             for k in ("queue", "compute_input", "compute_infer", "compute_output")}
    sizes = {b: n - before["batch_sizes"].get(b, 0) for b, n in after["batch_sizes"].items()}
    return {"server": split, "server_requests": requests, "executions": after["executions"] - before["executions"],
            "inferences": after["inferences"] - before["inferences"],
            "batch_sizes": {str(b): n for b, n in sorted(sizes.items()) if n}}


def scrape_metrics(url: str, timeout: float = 10.0) -> dict[str, dict[str, float]]:
    """Prometheus text from /metrics -> {metric: {labels: value}} (nv_* series only)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    metrics: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if not line.startswith("nv_"):
            continue
        series, _, value = line.rpartition(" ")
        name, _, labels = series.partition("{")
        try:
            metrics.setdefault(name, {})[labels.rstrip("}")] = float(value)
        except ValueError:
            continue
    return metrics


def _settled_statistics(client, model: str, expected_requests: int, wait_s: float = 5.0, version: str = "") -> dict:
    """The server counts a request just after sending its response: wait until the counters caught up."""
    deadline = time.monotonic() + wait_s
    while True:
        stats = model_statistics(client, model, version)
        if stats["requests"] + stats["failures"] >= expected_requests or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


# -- load generation -------------------------------------------------------------------------------------------------
async def _level(server, protocol: str, model: str, request: Callable[[int], dict], outputs: list[str],
                 concurrency: int, requests: int, budget_s: float, timeout_s: float) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(requests))
    deadline = time.perf_counter() + budget_s
    async with AsyncClient(server, protocol, timeout_s=timeout_s) as client:
        async def worker():
            for i in counter:   # a shared iterator: each request index is taken once
                if time.perf_counter() > deadline:
                    return
                start = time.perf_counter()
                try:
                    await asyncio.wait_for(client.infer(model, request(i), outputs), timeout_s)
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                    return
                latencies.append(time.perf_counter() - start)
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"latencies": latencies, "wall": wall, "errors": errors}


def sweep(server, model: str, request: Callable[[int], dict], outputs: list[str], levels=(1, 2, 4, 8),
          requests_per_level: Callable[[int], int] = lambda c: max(4, 2 * c), protocol: str = "http",
          budget_s: float = 20.0, timeout_s: float = 60.0, stats_client=None, warmup: int = 1,
          version: str = "") -> list[dict]:
    """One entry per concurrency level: throughput, client latency stats, server split, executions vs requests
    (the statistics of `version` when the model serves several; requests go to the version the server picks).
    Raises on the first level with errors (the message is the client's, with the server log tail if it died)."""
    import tritonclient.http as httpclient
    own = stats_client is None
    stats_client = stats_client or httpclient.InferenceServerClient(server.http_url, network_timeout=timeout_s)
    from backends.triton.client import failure
    results = []
    try:
        before = model_statistics(stats_client, model, version)
        if warmup:   # the first requests pay for lazy initialisation in the model: not part of any level
            level = asyncio.run(_level(server, protocol, model, request, outputs, 1, warmup, budget_s, timeout_s))
            if level["errors"]:
                raise failure(server, "sweep warm-up", RuntimeError(level["errors"][0]))
            # counted just after its response: read before it is, the warm-up would land in the first level
            before = _settled_statistics(stats_client, model, before["requests"] + warmup, version=version)
        for concurrency in levels:
            n = requests_per_level(concurrency)
            level = asyncio.run(_level(server, protocol, model, request, outputs, concurrency, n, budget_s,
                                       timeout_s))
            if level["errors"]:
                raise failure(server, f"sweep at concurrency {concurrency}", RuntimeError(level["errors"][0]))
            done = len(level["latencies"])
            after = _settled_statistics(stats_client, model, before["requests"] + done, version=version)
            delta = statistics_delta(before, after)
            before = after   # settled: the next level counts from here
            results.append({"concurrency": concurrency, "requests": done, "protocol": protocol,
                            "throughput_rps": done / level["wall"] if level["wall"] else 0.0,
                            "latency": latency_stats(level["latencies"]), **delta})
    finally:
        if own:
            stats_client.close()
    return results
