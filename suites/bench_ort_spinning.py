"""Benchmark: what does ONNX Runtime's thread-pool spinning cost when torch works between ORT calls?

The tiny denoiser (tiny-sd's UNet, tiny-sd3's transformer) exported through backends.onnx.export runs in two bare
InferenceSessions built by backends.onnxruntime.session_options: ORT's default (pools spin after each run) and the
backend's default (spinning off). Each is timed on the pipeline's own denoiser inputs, alone (calls back to back)
and with a little torch work between calls (an elementwise op on 1M floats: torch's own thread pool, as the
pipeline's scheduler, guidance and hooks use it), interleaved in blocks within one run so drift hits every side
alike. Only session.run is inside the clock. Prints p50 per model x spinning x scenario.

--triton: the same graph served twice by a real tritonserver's python backend (model_templates/onnx.py, spinning
on and off, one instance with every core, as backends/triton configures it), called over gRPC by this process,
which does the torch work between requests: only the infer call is inside the clock.

    python -m suites.bench_ort_spinning [--model tiny-sd3] [--calls 200] [--triton [--threads N]]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from backends.onnx.components import capture_denoiser_call
from backends.onnx.export import export_model
from backends.onnxruntime import session_options
from harness import models
from harness.selection.cases import Case


def denoiser_session_inputs(model_name: str):
    """The exported denoiser's path and its feeds (numpy) from the pipeline's first denoiser call."""
    model = models.load(model_name, "fp32")
    case = Case(model_name, "onnxruntime")
    export = export_model(model, case, models.cache_root(), components=[model.denoiser]).components[model.denoiser]
    call = capture_denoiser_call(model, case)
    batch = next(iter(call.values())).shape[0]
    feeds = {}
    for name in export.inputs:
        group, _, key = name.partition(".")
        value = call[group][key] if key else call[name]
        if name == "timestep" and value.ndim == 0:
            value = value.expand(batch)
        feeds[name] = value.detach().contiguous().numpy()
    return export.path, feeds


def torch_work(x: torch.Tensor) -> None:
    torch.nn.functional.silu(x).mul_(0.5)


def torch_work_ms(x: torch.Tensor, calls: int = 20) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        torch_work(x)
    return (time.perf_counter() - start) / calls * 1e3


def spinning_cost(model_name: str, calls: int = 200, blocks: int = 10) -> dict:
    import onnxruntime as ort

    path, feeds = denoiser_session_inputs(model_name)
    sessions = {spin: ort.InferenceSession(str(path), sess_options=session_options(spin=spin),
                                           providers=["CPUExecutionProvider"]) for spin in (True, False)}
    work = torch.randn(1 << 20)
    times: dict[tuple[bool, str], list[float]] = {(s, w): [] for s in sessions for w in ("alone", "torch")}
    per_block = max(1, calls // blocks)
    with torch.inference_mode():
        for session in sessions.values():              # warm-up, discarded
            for _ in range(5):
                session.run(None, feeds)
        for _ in range(blocks):
            for (spin, scenario), samples in times.items():
                session = sessions[spin]
                for _ in range(per_block):
                    if scenario == "torch":
                        torch_work(work)
                    start = time.perf_counter()
                    session.run(None, feeds)
                    samples.append(time.perf_counter() - start)
        work_ms = torch_work_ms(work)
    p50 = {key: statistics.median(v) * 1e3 for key, v in times.items()}
    return {"model": model_name, "calls": len(times[(True, "alone")]), "torch_work_ms": work_ms,
            "torch_threads": torch.get_num_threads(), "p50_ms": p50}


def triton_spinning_cost(model_name: str, calls: int = 200, blocks: int = 10, threads: int | None = None) -> dict:
    from backends.triton import repository as repo
    from backends.triton.backend import load_model
    from backends.triton.client import Client
    from backends.triton.server import TritonServer

    path, feeds = denoiser_session_inputs(model_name)
    work = torch.randn(1 << 20)
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp) / "repository"
        served = {}
        for spin in (True, False):
            served[spin] = repo.onnx_model(f"denoiser_spin{int(spin)}", path, mode="python", spinning=spin,
                                           threads=threads)
            repo.write_model(repository, served[spin], path)
        server = TritonServer(repository, Path(tmp)).start()
        try:
            for model in served.values():
                load_model(server, model.name)
            client = Client(server, "grpc")
            batched = served[False].max_batch_size > 0
            arrays = {n: a.reshape(-1, 1) if batched and a.ndim == 1 else a for n, a in feeds.items()}
            outputs = [t.name for t in served[False].outputs]
            times: dict[tuple[bool, str], list[float]] = {(s, w): [] for s in served for w in ("alone", "torch")}
            per_block = max(1, calls // blocks)
            for model in served.values():                  # warm-up, discarded
                for _ in range(5):
                    client.infer(model.name, arrays, outputs)
            for _ in range(blocks):
                for (spin, scenario), samples in times.items():
                    for _ in range(per_block):
                        if scenario == "torch":
                            torch_work(work)
                        start = time.perf_counter()
                        client.infer(served[spin].name, arrays, outputs)
                        samples.append(time.perf_counter() - start)
            client.close()
        finally:
            server.stop()
    p50 = {key: statistics.median(v) * 1e3 for key, v in times.items()}
    return {"model": model_name, "calls": len(times[(True, "alone")]), "torch_work_ms": torch_work_ms(work),
            "torch_threads": torch.get_num_threads(), "server_threads": repo.model_threads(threads), "p50_ms": p50}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="tiny-sd and/or tiny-sd3 (default both)")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--triton", action="store_true", help="served by tritonserver's python backend")
    parser.add_argument("--threads", type=int, help="--triton: the served model's ORT threads (default: every core)")
    args = parser.parse_args()
    for name in args.model or ["tiny-sd", "tiny-sd3"]:
        if args.triton:
            r = triton_spinning_cost(name, args.calls, threads=args.threads)
            where = f"triton (python backend, gRPC, {r['server_threads']} server threads)"
        else:
            r = spinning_cost(name, args.calls)
            where = "bare session"
        p = r["p50_ms"]
        print(f"{name} denoiser, {where}, {r['calls']} calls per cell, torch threads {r['torch_threads']}, torch work "
              f"{r['torch_work_ms']:.2f} ms: p50 ms  spinning on: alone {p[(True, 'alone')]:.2f}, with torch "
              f"{p[(True, 'torch')]:.2f}  |  spinning off: alone {p[(False, 'alone')]:.2f}, with torch "
              f"{p[(False, 'torch')]:.2f}")


if __name__ == "__main__":
    main()
