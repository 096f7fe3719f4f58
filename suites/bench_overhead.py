"""Benchmark: what does the harness add to a denoiser call? (goal: ratio <= 1.02)

Times the same tiny denoiser module with the same inputs, interleaved in blocks within one run:
  bare    -- a perf_counter loop around module(**inputs)
  harness -- StageTimer hooks attached and each call measured through StageTimer.run (what every case uses)
and prints median(harness) / median(bare).

    python -m suites.bench_overhead [--model tiny-sd] [--calls 200]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from harness import models
from harness.cases import Case
from harness.runner import capture_first_calls
from harness.timing import StageTimer


def denoiser_and_inputs(model_name: str):
    model = models.load(model_name, "fp32")
    case = Case(model_name, "diffusers")
    with torch.inference_mode(), capture_first_calls(model) as captured:
        model.pipeline(**models.pipeline_inputs(model, case))
    args, kwargs, _ = captured[model.denoiser]
    return model, getattr(model.pipeline, model.denoiser), args, kwargs


def overhead(model_name: str = "tiny-sd", calls: int = 200, blocks: int = 10) -> dict:
    model, module, args, kwargs = denoiser_and_inputs(model_name)
    timer = StageTimer(cuda=False)
    bare, harnessed = [], []
    per_block = max(1, calls // blocks)
    with torch.inference_mode():
        for _ in range(5):                                   # warm-up, discarded
            module(*args, **kwargs)
        for _ in range(blocks):                              # interleaved so drift hits both sides alike
            for _ in range(per_block):
                start = time.perf_counter()
                module(*args, **kwargs)
                bare.append(time.perf_counter() - start)
            timer.attach(model.pipeline, [], model.denoiser, model.vae)
            for _ in range(per_block):
                _, stages = timer.run(lambda: module(*args, **kwargs))
                harnessed.append(stages["e2e"])
            timer.detach()
    bare_p50, harness_p50 = statistics.median(bare), statistics.median(harnessed)
    return {"model": model_name, "calls": len(bare), "bare_p50_ms": bare_p50 * 1e3,
            "harness_p50_ms": harness_p50 * 1e3, "ratio": harness_p50 / bare_p50}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    r = overhead(args.model, args.calls)
    print(f"{r['model']} denoiser, {r['calls']} calls each: bare p50 {r['bare_p50_ms']:.3f} ms, "
          f"harness p50 {r['harness_p50_ms']:.3f} ms, ratio {r['ratio']:.4f} (goal <= 1.02)")


if __name__ == "__main__":
    main()
