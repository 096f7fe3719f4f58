"""Run cases: the one code path the CLI and the pytest suites share.

case -> backend.support -> model load -> backend.prepare -> cold first call -> warm-up -> timed repeats
     -> component + image parity against the reference -> Record -> store.
Every case is isolated: an exception, out-of-memory, NaN/blank output or timeout becomes a recorded row and the run
goes on. SIGINT/SIGTERM record the current case as interrupted and stop the run; the JSONL stays valid.
"""
from __future__ import annotations

import contextlib
import os
import re
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from backends import base as registry
from harness import models
from harness.errors import UserError, one_line
from harness.judge import compare, preflight
from harness.judge.failures import classify_failure
from harness.judge.preflight import support_of
from harness.measure import progress
from harness.measure.memory import cuda_memory_snapshot, energy_record, measured_in, release_torch_cache, weights_mb
from harness.measure.parity import (component_parity, parity_verdict, stages_alone, time_components_alone,
                                    vae_decode_precision)
from harness.measure.pipeline_call import PipelineCall, precision_facts, set_precision_defaults
from harness.measure.reference import Reference
from harness.measure.run_options import (CaseTimeout, Interrupted, RunOptions, free_memory, interrupted_record,
                                         is_worker, time_limit)
from harness.measure.timing import measure
from harness.models import embedding
from harness.models.sentences import texts_for
from harness.records import Record
from harness.selection import workloads
from harness.selection.cases import Case


def _save_image(image: np.ndarray, run_dir: Path, case: Case) -> str:
    from PIL import Image
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", case.id)
    path = run_dir / "images" / f"{safe}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    first = np.nan_to_num(np.clip(image[0], 0, 1))
    Image.fromarray((first * 255).round().astype(np.uint8)).save(path)
    return str(path.relative_to(run_dir))


# -- one case -----------------------------------------------------------------------------------------------------
class NoSamples(Exception):
    """The case made no measured call (e.g. pytest-benchmark disabled): there is no latency to record."""


def run_case(case: Case, session, loop: Callable | None = None) -> Record:
    """Measure one case and return its record (never raises for a failing case; Interrupted propagates)."""
    options = session.options
    record = Record.for_case(case, session.run_id, device=options.device,
                             timing={"warmup": options.warmup, "repeats": options.repeats,
                                     "clock": "cuda-events" if options.device == "cuda" else "perf_counter",
                                     "isolated": is_worker()})
    try:
        support = support_of(case, session.env)
    except UserError as exc:
        support = registry.Support.no(str(exc))
    if not support:
        record.status, record.reason = "unsupported", support.reason
        return record
    try:
        with time_limit(options.timeout_s):   # the reference has its own budget: it is computed once per shape
            reference = session.reference(case)
        with time_limit(options.timeout_s):
            _measure_case(case, session, record, reference, loop)
    except (Interrupted, KeyboardInterrupt):
        session.write(interrupted_record(case, session, record))
        raise
    except torch.OutOfMemoryError as exc:
        record.status, record.error_class, record.reason = "error", "OutOfMemoryError", one_line(exc)
        if options.device == "cuda":
            record.memory["at_failure"] = cuda_memory_snapshot()
        if options.memory_budget_mb:   # an honest out-of-memory under the cap: the answer to "does it fit"
            record.status, record.error_class = "over_budget", "OutOfMemoryError"
            record.reason = f"out of memory under the {options.memory_budget_mb:g} MB budget: {one_line(exc)}"
            record.budget = budget_facts(options)
    except CaseTimeout as exc:
        record.status, record.error_class, record.reason = "error", "TimeoutError", str(exc)
    except NoSamples as exc:
        record.status, record.error_class, record.reason = "error", "NoSamples", str(exc)
    except registry.Unsupported as exc:
        record.status, record.reason = "unsupported", str(exc)
    except Exception as exc:
        # a known incompatibility (no kernel image, unsupported PTX, TensorRT refusing the GPU...) gets the
        # preflight's wording; anything else stays an error with its own message
        failure = classify_failure(exc, preflight.Stack.from_env(session.env),
                                   preflight.target_for(case, options.device))
        if failure is not None:
            record.status, record.error_class, record.reason = failure.status, failure.error_class, failure.reason
        else:
            record.status, record.error_class, record.reason = "error", type(exc).__name__, one_line(exc)
        record.info["traceback"] = traceback.format_exc(limit=8)[-4000:]
    finally:
        free_memory()
    return record


def prepare_for_measuring(backend: registry.Backend, model: models.LoadedModel, case: Case, cache_dir: Path,
                          cuda: bool) -> tuple[registry.Prepared, dict | None]:
    """backend.prepare; then, where the backend moved the weights out of torch (ONNX Runtime, TensorRT, Triton),
    torch's caching allocator is emptied: its cached copy of the swapped-out weights (GBs at full size) is not the
    backend's memory. Returns the prepared pipeline and what torch still holds after that (GPU), else None."""
    prepared = backend.prepare(model, case, cache_dir)
    return prepared, release_torch_cache(cuda) if prepared.weights_outside_torch else None


def _measure_case(case: Case, session, record: Record, reference: Reference, loop) -> None:
    options = session.options
    cuda = options.device == "cuda"
    telemetry = session.telemetry.start()
    backend = registry.get(case.backend)
    set_precision_defaults()
    if cuda and options.memory_budget_mb:
        cap_cuda_memory(options.memory_budget_mb)
    memory: dict[str, dict] = {}
    scope = measured_in(is_worker(), session.measured_here)
    session.measured_here += 1
    cold_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        build: dict[str, float] = {}
        telemetry.begin_phase(registry.foreign_processes(case))
        with registry.timed(build, "load"):
            model = models.load(case.model, case.dtype, backend.load_device(case, options.device))
        memory["load"] = telemetry.end_phase()
        record.notes.extend(model.notes)
        record.weights = model.weights
        telemetry.begin_phase(registry.foreign_processes(case))
        prepared, after_prepare = prepare_for_measuring(backend, model, case, session.cache_dir, cuda)
        stack.callback(prepared.close)
        if after_prepare:
            memory["after_prepare"] = after_prepare
        record.build = {**build, **model.build, **prepared.build}
        weights = {} if model.encoder else {"weights_mb": weights_mb(prepared.pipeline, model.components)}
        record.env = {**session.env, "precision": precision_facts(), "pid": os.getpid()}
        call = PipelineCall(prepared.pipeline, model, case, cuda, timed=not prepared.remote)
        stack.callback(call.detach)
        record.prompt, record.seed = call.prompts, models.seed_for(case)

        progress.phase("first call")
        first_start = time.perf_counter()
        first_image, _ = call.timer.run(call, keep=False, setup=call.setup)
        record.first_call_s = time.perf_counter() - first_start
        record.cold_s = time.perf_counter() - cold_start
        memory["build"] = telemetry.end_phase()

        # energy over the measured calls only: the counter is read in the setup of the first measured call
        calls = {"n": 0}
        energy = {}

        def setup():
            calls["n"] += 1
            if calls["n"] == options.warmup + 1:
                energy["start_j"], energy["start_s"] = telemetry.energy_j(), time.perf_counter()
            progress.tick()   # counts calls only: outside the clock, like the rest of setup
            call.setup()
        progress.calls(options.warmup, options.repeats)
        telemetry.begin_phase(registry.foreign_processes(case))
        last_image = measure(call.timer, call, options.warmup, options.repeats, loop, setup)
        seconds = time.perf_counter() - energy.get("start_s", time.perf_counter())
        end_j = telemetry.energy_j()
        memory["inference"] = telemetry.end_phase()
        if not call.timer.samples["e2e"]:
            raise NoSamples(f"no measured call ({calls['n']} call(s), all warm-up): nothing to time -- was the "
                            "benchmark loop disabled (pytest --benchmark-disable)?")
        record.stages, record.e2e = call.timer.summary()
        record.samples = {"e2e": list(call.timer.samples["e2e"])}
        joules = end_j - energy["start_j"] if end_j is not None and energy.get("start_j") is not None else None
        record.energy = energy_record(telemetry, joules, seconds, record.e2e["n"])
        record.memory = {**memory, **weights, "peak_mb": memory["inference"]["peak_mb"],
                         "sampler_interval_ms": telemetry.interval_s * 1000, **scope}
        call.detach()
        record.info.update(prepared.info)
        if prepared.after_measure is not None:
            record.info.update(prepared.after_measure())
        record.notes.extend(record.info.pop("notes", []) or [])
        if "serving" in record.info:   # from info, or counted by after_measure (an http service's load sweep)
            record.serving = record.info.pop("serving")

        progress.phase("parity")
        outputs = {"first call": np.asarray(first_image, dtype=np.float32),
                   "last measured call": np.asarray(last_image, dtype=np.float32)}
        # a variant's own bounds (tiling, quantisation) are recorded as declared by it, with its reason
        tolerance = (compare.declared_output(prepared.output_tolerance, case.backend_spec) if prepared.output_tolerance
                     else compare.default_tolerance(case.workload, case.dtype))
        embeddings = case.workload == workloads.TEXT_EMBEDDING
        check = compare.check_embeddings if embeddings else compare.check_image
        results = {which: check(reference.output, output, tolerance) for which, output in outputs.items()}
        overrides = {**compare.declared(prepared.tolerance_overrides, case.backend_spec),
                     **compare.declared(options.tolerance_overrides, "the run's options")}
        components = {} if prepared.remote else component_parity(prepared, model, reference, case.dtype,
                                                                   options.device, overrides or None)
        what = "embedding" if embeddings else "image"
        record.parity = {"reference": workloads.reference_backend(case.workload), what: results["first call"],
                         f"{what}_last": results["last measured call"], "components": components}
        if embeddings:   # the search the embeddings exist for: every sentence's nearest neighbour in the set
            record.parity["ranking"] = results["ranking"] = compare.check_ranking(
                reference.sentence_set, embedding.embed(prepared.pipeline, texts_for(case.seq), case.seq))
            record.throughput = {"per_s": case.batch / record.e2e["p50"], "batch": case.batch}
        if model.vae and not prepared.remote:   # like with like: which precision each side's VAE decoded in
            record.parity["vae_decode"] = vae_decode_precision(model, prepared.pipeline, reference.components)
            if record.parity["vae_decode"]["reference"] != record.parity["vae_decode"]["backend"]:
                record.notes.append(f"VAE decoded in {record.parity['vae_decode']['backend']} by the backend, in "
                                    f"{record.parity['vae_decode']['reference']} by the reference")
        if prepared.remote:
            record.parity["components_skipped"] = f"{prepared.remote}: components cannot be reached"
        verdict, error_class, reason = parity_verdict(results, components, what)
        record.parity["verdict"] = verdict
        if options.save_images and not embeddings:
            record.image = _save_image(outputs["last measured call"], session.run_dir, case)
        serving_failure = record.serving.get("failure") if record.serving else None
        if verdict != "pass":
            record.status, record.error_class, record.reason = "failed", error_class, reason
        elif serving_failure:   # right images from a service that fails its users otherwise (a blocked health check)
            record.status, record.error_class, record.reason = ("failed", serving_failure["error_class"],
                                                                serving_failure["reason"])
        elif options.memory_budget_mb:
            record.budget = budget_facts(options, record.memory["peak_mb"])
            if record.budget["peak_mb"] is not None and record.budget["peak_mb"] > options.memory_budget_mb:
                record.status, record.error_class = "over_budget", "OverBudget"
                record.reason = (f"inference peak {record.budget['peak_mb']:.0f} MB is over the "
                                 f"{options.memory_budget_mb:g} MB budget")
                if not record.memory["isolated"]:
                    record.reason += (f" (measured in a process shared with {record.memory['cases_before']} "
                                      "earlier case(s): what they left counts too; --isolate for its own peak)")
        if record.status == "passed" and options.time_components and not prepared.remote:
            alone = time_components_alone(prepared, model, reference, options.device, options.warmup,
                                          options.repeats)
            record.findings.extend(stages_alone(record.stages, alone, model, call.timer.calls_per_run))


# -- memory budgets -------------------------------------------------------------------------------------------------
def cap_cuda_memory(budget_mb: float) -> None:
    """A real cap: torch's caching allocator refuses to grow this process past the budget (an isolated worker, so
    the cap dies with the case). Memory outside torch's allocator (ONNX Runtime arenas, TensorRT engines) is not
    capped: it is held to the budget by its measured NVML peak instead."""
    device = torch.cuda.current_device()
    total_mb = torch.cuda.get_device_properties(device).total_memory / (1024 * 1024)
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_mb / total_mb), device)


def budget_facts(options: RunOptions, peak_mb: float | None = None) -> dict:
    enforced = ("cuda allocator cap (set_per_process_memory_fraction) + measured peak"
                if options.device == "cuda" else "measured inference peak of the process tree")
    return {"limit_mb": options.memory_budget_mb, "peak_mb": peak_mb, "enforced": enforced,
            "capped": options.device == "cuda", "isolated": is_worker()}
