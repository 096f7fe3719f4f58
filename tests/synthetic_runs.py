"""Test fixture: synthetic but realistic runs (records.jsonl + PNG images) for the report and gate tests.

The records go through the real Record / RecordWriter / timing.stats / compare.check_image code, so they have the
shape a real run writes; only the numbers are made up (seeded), and every record says so (`synthetic: true`), which
the report shows as a banner. The H100 environment below is made up too: no GPU measured these.
"""
from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import numpy as np

from harness.judge import compare
from harness.measure.timing import stats
from harness.records import Record, RecordWriter, sanitize
from harness.selection.cases import Case

CPU_ENV = {"device": "cpu", "gpu": None, "cpu": {"model": "Intel(R) Xeon(R) CPU @ 2.20GHz", "cores": 2},
           "platform": "Linux-6.1-x86_64", "python": "3.11.2",
           "versions": {"torch": "2.13.0", "diffusers": "0.42.1", "onnxruntime": "1.32.0"}}
H100_ENV = {"device": "cuda", "gpu": {"name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "sm": "sm_90",
                                      "arch": "Hopper", "memory_mb": 81559, "cuda": "12.8", "driver": "570.1"},
            "cpu": {"model": "AMD EPYC 9454", "cores": 16}, "platform": "Linux-6.8-x86_64", "python": "3.11.2",
            "versions": {"torch": "2.13.0", "diffusers": "0.42.1"}}

# backend spec -> (speed factor vs eager, image noise, build steps)
_BACKENDS = {
    "diffusers": (1.0, 0.0, {"load": 0.4}),
    "torch_compile+max-autotune": (0.7, 0.002, {"load": 0.4, "compile": 46.0}),
    "onnxruntime": (0.85, 0.004, {"load": 0.4, "export": 1.1, "session": 0.3}),
    "triton": (1.1, 0.004, {"load": 0.4, "export": 1.1, "deploy": 3.2}),
}


def reference_image(seed: int, size: int = 64) -> np.ndarray:
    """A smooth, non-constant HxWx3 image in [0, 1]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x + 4 * y)], axis=-1)
    return np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1).astype(np.float32)


def _save_png(image: np.ndarray, run_dir: Path, case: Case) -> str:
    from PIL import Image
    path = run_dir / "images" / (re.sub(r"[^A-Za-z0-9._-]+", "_", case.id) + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(path)
    return str(path.relative_to(run_dir))


def _stage_stats(rng, base_s: float, steps: int, repeats: int, jitter: float) -> tuple[dict, dict]:
    parts = {"text_encode": 0.08, "denoise": 0.75, "vae_decode": 0.12}
    samples = {k: base_s * v * (1 + rng.normal(0, jitter, repeats)).clip(0.5) for k, v in parts.items()}
    samples["denoise_step"] = samples["denoise"] / steps
    samples["other"] = base_s * 0.05 * (1 + rng.normal(0, jitter, repeats)).clip(0.5)
    e2e = samples["text_encode"] + samples["denoise"] + samples["vae_decode"] + samples["other"]
    return {k: stats(v) for k, v in samples.items()}, stats(e2e)


def write_synthetic_run(run_dir: str | Path, *, env: dict | None = None, run_id: str = "synthetic-run", seed: int = 0,
                     scale: float = 1.0, jitter: float = 0.02, repeats: int = 10, images: bool = True,
                     models=("tiny-sd", "tiny-sd3"), backends=tuple(_BACKENDS), prompt: str = "a red fox",
                     failed: tuple[str, ...] = ()) -> Path:
    """Write run_dir/records.jsonl (+ images/) and return its path.

    scale multiplies every latency (scale=1.2: a 20 % slower run); case ids listed in `failed` are recorded as
    failed parity. A tensorrt row is always unsupported and a fp16 row on CPU is unsupported, as on a CPU runner.
    """
    run_dir = Path(run_dir)
    env = env or CPU_ENV
    rng = np.random.default_rng(seed)
    path = run_dir / "records.jsonl"
    on_gpu = bool(env.get("gpu"))
    measured = 0
    with RecordWriter(path) as writer:
        for model_i, model in enumerate(models):
            ref = reference_image(model_i)
            for spec in backends:
                backend, _, variant = spec.partition("+")
                case = Case(model, backend, variant, "fp32", 1, 64, 64, 4)
                speed, noise, build = _BACKENDS[spec]
                rec = Record.for_case(case, run_id, device=env.get("device", "cpu"), env=env, prompt=[prompt],
                                      seed=42, synthetic=True, timing={"warmup": 2, "repeats": repeats,
                                                       "clock": "cuda-events" if on_gpu else "perf_counter"})
                base = (0.2 if model == "tiny-sd" else 0.35) * speed * scale * (0.05 if on_gpu else 1.0)
                rec.stages, rec.e2e = _stage_stats(rng, base, case.steps, repeats, jitter)
                rec.build = dict(build)
                rec.cold_s = sum(build.values()) + 3 * base
                rec.first_call_s = 3 * base
                peak = round((900 if model == "tiny-sd" else 1400) * (1 + noise * 20), 1)
                children = 350.0 if backend == "triton" else 0.0
                rec.memory = {"load": {"peak_mb": peak * 0.8, "rss_mb": peak * 0.8, "children_mb": children},
                              "build": {"peak_mb": peak * 1.1, "rss_mb": peak * 1.1 - children,
                                        "children_mb": children},
                              "inference": {"peak_mb": peak, "rss_mb": peak - children, "children_mb": children,
                                            "peak_source": "process tree RSS", "samples": 40},
                              "peak_mb": peak, "sampler_interval_ms": 10.0,
                              # as measured: isolated on GPU, one shared process on CPU (the defaults)
                              "isolated": on_gpu, "cases_before": 0 if on_gpu else measured}
                measured += 1
                # the component alone: onnxruntime's step is made to look slowed down by the pipeline around it
                step = rec.stages["denoise_step"]
                slowed = 1.8 if backend == "onnxruntime" else 1.05
                step["alone"], step["integration"] = {**step, "p50": step["p50"] / slowed}, slowed
                if slowed > 1.5:
                    rec.findings = [f"denoise_step: in-pipeline p50 is {slowed:.2f}x the component alone"]
                if case.id in failed:
                    noise = 0.25
                out = np.clip(ref + rng.normal(0, noise, ref.shape), 0, 1).astype(np.float32) if noise else ref
                image = compare.check_image(ref[None], out[None], compare.IMAGE_TOLERANCES["fp32"])
                components = {name: {"max_abs": noise / 10, "rel_l2": noise / 20, "cosine": 1 - noise / 100,
                                     "passed": True} for name in ("text_encoder", "unet", "vae_decoder")}
                rec.parity = {"verdict": "pass", "reference": "diffusers", "image": image, "components": components}
                if case.id in failed:
                    rec.status, rec.error_class = "failed", "ParityError"
                    rec.reason = f"ParityError: image parity: {image.get('error', '')}"
                    rec.parity["verdict"] = "fail"
                    rec.parity["components"]["unet"]["passed"] = False
                if images:
                    rec.image = _save_png(out, run_dir, case)
                if backend == "triton":
                    rec.serving = _serving(rng, base)
                rec.parity = sanitize(rec.parity)  # identical images: PSNR inf -> null, as the runner does
                writer.write(rec)
            # rows that never ran on this runner
            trt = Case(model, "tensorrt", "", "fp16", 1, 64, 64, 4)
            writer.write(Record.for_case(trt, run_id, status="unsupported", env=env, synthetic=True,
                                         reason="tensorrt not installed (pip install tensorrt on a GPU runner)"))
            if not on_gpu:
                fp16 = Case(model, "diffusers", "", "fp16", 1, 64, 64, 4)
                writer.write(Record.for_case(fp16, run_id, status="unsupported", env=env, synthetic=True,
                                             reason="fp16 needs a CUDA device"))
            big = Case(model, "diffusers", "vae-slicing", "fp32", 8, 64, 64, 4)
            writer.write(Record.for_case(big, run_id, status="over_budget", env=env, synthetic=True,
                                         error_class="OverBudget", budget={"limit_mb": 1000.0, "peak_mb": 1800.0},
                                         memory={"peak_mb": 1800.0, "inference": {"peak_mb": 1800.0}},
                                         reason="inference peak 1800 MB is over the 1000 MB budget"))
    return path


def write_synthetic_fit(run_dir: str | Path, budgets_mb=(520.0, 2000.0), max_batch: int = 8) -> tuple[list[dict], dict]:
    """Made-up `diffbench fit` trials of three configurations (records) and the fit document they give."""
    from harness.measure import fit
    costs = {"diffusers": (100.0, 0.20), "diffusers+vae-slicing": (60.0, 0.24), "diffusers+layerwise-fp8": (40.0, 0.30)}
    run_dir = Path(run_dir)
    records = []
    with RecordWriter(run_dir / "records.jsonl") as writer:
        for spec, (per_image, latency) in costs.items():
            backend, _, variant = spec.partition("+")
            for batch in (1, 2, 4, 8):
                case = Case("tiny-sd", backend, variant, "fp32", batch, 64, 64, 4)
                rec = Record.for_case(case, "synthetic-fit", env=CPU_ENV, synthetic=True)
                rec.memory = {"peak_mb": 500.0 + batch * per_image}
                rec.e2e = stats([latency * batch * f for f in (0.98, 1.0, 1.02)])
                writer.write(rec)
                records.append(sanitize(rec.to_dict()))
    plan = fit.FitPlan("tiny-sd", list(costs), list(budgets_mb), max_batch=max_batch, confirm=0)
    document = {"plan": asdict(plan), "table": fit.table_from_records(records, plan.budgets_mb, max_batch),
                "searches": [], "elapsed_s": 1.0, "trials": len(records)}
    return records, document


def _serving(rng, base: float) -> dict:
    sweep = []
    for conc in (1, 2, 4, 8):
        queue = max(0.0, (conc - 2) * base * 400)
        infer = base * 1000 * (1 + 0.1 * conc)
        lat = queue + infer + 2.0
        sweep.append({"concurrency": conc, "throughput_rps": round(min(conc, 2) / (lat / 1000), 3),
                      "latency": {"p50": lat / 1000, "p90": lat * 1.1 / 1000,
                                  "p99": (lat * 1.3 + rng.uniform(0, 1)) / 1000},   # seconds, as the sweep records
                      "server": {"queue_ms": queue, "compute_input_ms": 0.4, "compute_infer_ms": infer,
                                 "compute_output_ms": 0.3}})
    return {"mode": "whole-request", "protocol": "http", "sweep": sweep}
