"""Benchmark: what does the harness add to the user's call? (goal: ratio <= 1.02)

The same tiny pipeline, the same inputs, timed by an outside perf_counter clock, interleaved in blocks in one run:
  bare    -- fresh latents, then pipeline(**inputs): the user's call and nothing else; telemetry paused
  harness -- the runner's own path for a measured call (harness.measure.pipeline_call.PipelineCall: stage-timer hooks on the
             text encoders, denoiser and VAE, StageTimer.run with its setup outside its clock), with the
             telemetry sampler process running, as in `diffbench run`
and prints median(harness) / median(bare) on its last line: `overhead ratio: X.XXX`.

    python -m suites.bench_overhead [--model tiny-sd] [--calls 100] [--blocks 10]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from backends import base as registry
from harness import models
from harness.measure.memory import Telemetry
from harness.measure.pipeline_call import PipelineCall
from harness.selection.cases import Case


def overhead(model_name: str = "tiny-sd", calls: int = 100, blocks: int = 10) -> dict:
    case = Case(model_name, registry.REFERENCE, steps=4)
    model = models.load(model_name, "fp32")
    prepared = registry.get(registry.REFERENCE).prepare(model, case, models.cache_root())
    pipeline = prepared.pipeline
    inputs = models.pipeline_inputs(model, case)
    telemetry = Telemetry(cuda=False).start()
    telemetry.begin_phase()
    bare, harnessed = [], []
    per_block = max(1, calls // blocks)
    try:
        with torch.inference_mode():
            for _ in range(3):                                   # warm-up, discarded
                inputs["latents"] = models.initial_latents(model, case)
                pipeline(**inputs)
            for _ in range(blocks):                              # interleaved so drift hits both sides alike
                with telemetry.paused():
                    for _ in range(per_block):
                        inputs["latents"] = models.initial_latents(model, case)
                        start = time.perf_counter()
                        pipeline(**inputs)
                        bare.append(time.perf_counter() - start)
                call = PipelineCall(pipeline, model, case, cuda=False)
                for _ in range(per_block):
                    call.setup()
                    start = time.perf_counter()
                    call.timer.run(call)
                    harnessed.append(time.perf_counter() - start)
                call.detach()
    finally:
        telemetry.end_phase()
        telemetry.stop()
        prepared.close()
    bare_p50, harness_p50 = statistics.median(bare), statistics.median(harnessed)
    return {"model": model_name, "calls": len(bare), "bare_p50_ms": bare_p50 * 1e3,
            "harness_p50_ms": harness_p50 * 1e3, "ratio": harness_p50 / bare_p50}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--calls", type=int, default=100, help="pipeline calls per side")
    parser.add_argument("--blocks", type=int, default=10, help="alternating blocks per side")
    args = parser.parse_args(argv)
    r = overhead(args.model, args.calls, args.blocks)
    print(f"{r['model']} pipeline, {r['calls']} calls each: bare p50 {r['bare_p50_ms']:.3f} ms, "
          f"harness p50 {r['harness_p50_ms']:.3f} ms (goal: ratio <= 1.02)")
    print(f"overhead ratio: {r['ratio']:.3f}")


if __name__ == "__main__":
    main()
