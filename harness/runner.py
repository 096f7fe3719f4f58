"""Run cases: the one code path the CLI and the pytest suites share.

case -> backend.support -> model load -> backend.prepare -> cold first call -> warm-up -> timed repeats
     -> component + image parity against the reference -> Record -> store.
Every case is isolated: an exception, out-of-memory, NaN/blank output or timeout becomes a recorded row and the run
goes on. SIGINT/SIGTERM record the current case as interrupted and stop the run; the JSONL stays valid.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import os
import re
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from backends import base as registry
from harness import compare, device as devinfo, models, preflight, progress, workloads
from harness.models import embedding
from harness.models.sentences import texts_for
from harness.cases import Case
from harness.errors import UserError
from harness.memory import (Telemetry, cuda_memory_snapshot, energy_record, measured_in, release_torch_cache,
                            weights_mb)
from harness.records import Record, RecordWriter, git_info, new_run_id, recorded_case_ids, sanitize
from harness.timing import StageTimer, measure, stats


class CaseTimeout(Exception):
    """The case ran longer than its timeout."""


class Interrupted(BaseException):
    """SIGINT/SIGTERM arrived mid-run (a BaseException, so case isolation does not swallow it)."""


@dataclass
class RunOptions:
    device: str = "cpu"
    warmup: int = 2
    repeats: int = 10
    timeout_s: float | None = 900.0
    save_images: bool = True
    tolerance_overrides: dict | None = None
    isolate: bool = False          # each case in a fresh worker process (harness/worker.py)
    time_components: bool = True   # time every executor alone on the reference's inputs, beside the pipeline
    share_references: bool = False # keep each shape's reference in the run folder (isolated workers share it)
    memory_budget_mb: float | None = None  # over it a case is over_budget; on GPU also a real allocator cap


@dataclass
class Reference:
    """The reference backend's outputs for one model x dtype x shape: the pipeline's output (images, or one
    embedding per sentence), each component's first call, and for text-embedding the whole fixed sentence set's
    embeddings (the ranking check's yardstick)."""
    output: np.ndarray
    components: dict[str, tuple[tuple, dict, Any]]   # name -> (args, kwargs, output), on CPU
    sentence_set: np.ndarray | None = None


@dataclass
class Session:
    """One run: its folder and records file, the reference cache, the environment fingerprint."""
    results_dir: Path
    options: RunOptions = field(default_factory=RunOptions)
    run_id: str = ""
    resume: bool = False

    def __post_init__(self):
        self.results_dir = Path(self.results_dir).resolve()
        if not self.run_id:
            self.run_id = new_run_id()
        self.run_dir = self.results_dir if self.resume else self.results_dir / self.run_id
        self.records_path = self.run_dir / "records.jsonl"
        self.done = recorded_case_ids(self.records_path) if self.resume else set()
        self.writer = RecordWriter(self.records_path)
        # servers we start keep their logs beside the records
        os.environ.setdefault("DIFFBENCH_TRITON_LOG_DIR", str(self.run_dir / "triton"))
        self.env = devinfo.fingerprint(self.options.device)
        self.git = git_info(Path(__file__).resolve().parent.parent)
        self.records: dict[str, Record] = {}
        self._references: dict[tuple, Reference] = {}
        self.cache_dir = models.cache_root()
        self.telemetry = Telemetry(self.options.device == "cuda")   # its sampler starts with the first case
        self.telemetry.sample_idle()        # GPU: before any work in this process (energy subtracts it)
        self.cases: list[Case] = []
        self.measured_here = 0   # cases measured in this process so far: what a shared-process peak carries

    # -- records ---------------------------------------------------------------------------------------------
    def write(self, record: Record) -> None:
        """Store a record once per case id per run (a later suite asking for the same case reuses it)."""
        if record.case_id in self.records:
            return
        self.records[record.case_id] = record
        record.env, record.git = record.env or self.env, self.git
        record_dict = sanitize(record.to_dict())
        self.writer.write(record_dict)

    def append(self, record: Record) -> None:
        """Write a record even when its case id is already in this run (fit's repeated trials of one case)."""
        record.env, record.git = record.env or self.env, self.git
        self.writer.write(sanitize(record.to_dict()))

    def configure(self, cases: list[Case]) -> None:
        """Tell each backend the run's whole case list before any case runs."""
        self.cases = list(cases)
        for name in sorted({c.backend for c in cases}):
            try:
                registry.get(name).configure([c for c in cases if c.backend == name])
            except UserError:
                pass  # unknown backends become unsupported rows when their cases run

    def result(self, case: Case, loop=None) -> Record:
        """The case's record for this run: measured once, then shared by every suite that asks. With isolation,
        measured in a fresh worker process (which times its own loop: pytest-benchmark's `loop` stays here)."""
        if case.id not in self.records:
            progress.case_started(case.id)
            self.write(run_isolated(case, self) if self.options.isolate else run_case(case, self, loop=loop))
            progress.case_done()
        return self.records[case.id]

    def close(self) -> None:
        registry.close_all()
        self.telemetry.stop()
        self.writer.close()

    # -- reference -------------------------------------------------------------------------------------------
    def reference(self, case: Case) -> Reference:
        """The reference for the case's shape: computed once per run. Isolated workers share it through a file in
        the run folder, so it is computed by the first worker of its shape only."""
        key = case.shape_key
        if key not in self._references:
            path = self.run_dir / "references" / (re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(map(str, key))) + ".pt")
            if path.is_file():   # written by this run's own worker: captured calls hold plain Python values too
                self._references[key] = Reference(**torch.load(path, weights_only=False))
            else:
                self._references[key] = _compute_reference(case, self.options)
                if self.options.share_references:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(".tmp")
                    torch.save(vars(self._references[key]), tmp)
                    tmp.replace(path)
        return self._references[key]


# -- case isolation helpers -------------------------------------------------------------------------------------
@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise CaseTimeout in the main thread after `seconds` (SIGALRM). Elsewhere, no limit.
    A hang inside native code that never returns to Python is only caught when it returns."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(_sig, _frame):
        raise CaseTimeout(f"case exceeded its {seconds:g} s timeout")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def support_of(case: Case, env: dict) -> registry.Support:
    """Model-level rules first (cheap), then the stack-vs-GPU preflight (harness.preflight: why this stack does not
    fit this device, and what would), then the backend's own answer."""
    model_spec = models.spec(case.model)
    device = env["device"]
    if model_spec.full_size and device == "cpu":
        # named explicitly (the default matrix holds none): it runs, slowly, if its weights fit in RAM
        import psutil
        problem = models.cpu_memory_problem(case.model, case.dtype, psutil.virtual_memory().total)
        if problem:
            return registry.Support.no(problem)
    missing = model_spec.missing()
    if missing:
        return registry.Support.no(missing)
    verdict = preflight.check(preflight.Stack.from_env(env), preflight.target_for(case, device, model_spec.kind))
    if not verdict:
        return registry.Support.no(verdict.reason)
    return registry.get(case.backend).support(case, env)


# -- reference ----------------------------------------------------------------------------------------------------
def _detach(value):
    """A copy of a captured value with its tensors on the CPU: the reference's captured calls live through the
    whole case, and on the GPU they would count in every phase's memory."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict) and not hasattr(value, "to_tuple"):
        return {k: _detach(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_detach(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if hasattr(value, "to_tuple"):  # transformers/diffusers ModelOutput: positional view of its tensors
        return tuple(_detach(v) for v in value.to_tuple())
    return copy.deepcopy(value)


@contextlib.contextmanager
def capture_first_calls(model: models.LoadedModel):
    """Record (args, kwargs, output) of each component's first call during a pipeline run."""
    captured: dict[str, tuple] = {}
    undo = []
    pipeline = model.pipeline
    for name in model.stages:
        module = getattr(pipeline, name)
        if name in model.methods:
            method = model.methods[name]
            original = getattr(module, method)

            def wrapped(*args, _original=original, _name=name, **kwargs):
                output = _original(*args, **kwargs)
                captured.setdefault(_name, (_detach(args), _detach(kwargs), _detach(output)))
                return output
            setattr(module, method, wrapped)
            undo.append(lambda module=module, method=method: delattr(module, method))
            continue

        def hook(_m, args, kwargs, output, name=name):
            captured.setdefault(name, (_detach(args), _detach(kwargs), _detach(output)))
        undo.append(module.register_forward_hook(hook, with_kwargs=True).remove)
    try:
        yield captured
    finally:
        for fn in undo:
            fn()


def _compute_reference(case: Case, options: RunOptions) -> Reference:
    ref_case = case.with_backend(workloads.reference_backend(case.workload))
    progress.phase("reference")
    model = models.load(models.reference_model(case.model), case.dtype, options.device)
    prepared = registry.get(ref_case.backend).prepare(model, ref_case, models.cache_root())
    try:
        call = PipelineCall(prepared.pipeline, model, ref_case, cuda=False, timed=False)
        call.setup()
        with capture_first_calls(model) as captured:
            output = call()
        sentence_set = None
        if case.workload == workloads.TEXT_EMBEDDING:   # the ranking check's yardstick, not timed
            sentence_set = embedding.embed(prepared.pipeline, texts_for(case.seq), case.seq)
        return Reference(np.asarray(output, dtype=np.float32), dict(captured), sentence_set)
    finally:
        prepared.close()
        del model
        _free_memory()


def _to_device(value, device: str):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def component_parity(prepared: registry.Prepared, model: models.LoadedModel, reference: Reference,
                     dtype: str, device: str, overrides: dict | None = None) -> dict[str, dict]:
    """Feed each component the reference's captured inputs; compare every output tensor."""
    results = {}
    for name, (args, kwargs, ref_out) in reference.components.items():
        if name in prepared.unjudged_components:
            results[name] = {"passed": True, "skipped": prepared.unjudged_components[name]}
            continue
        executor = getattr(prepared.pipeline, name)
        call = getattr(executor, model.methods[name]) if name in model.methods else executor
        tol = compare.tolerance_for(name, dtype, overrides)
        try:
            with torch.inference_mode():
                out = call(*_to_device(args, device), **_to_device(kwargs, device))
        except Exception as exc:
            results[name] = {"passed": False, "error": f"executor raised {_one_line(exc)}"}
            continue
        ref_flat = compare.flatten_output(ref_out)
        out_flat = compare.flatten_output(_detach(out))
        outputs, passed = {}, True
        for key, ref_tensor in ref_flat.items():
            if key not in out_flat:
                outputs[key] = {"passed": False, "error": "output missing from the executor"}
            else:
                outputs[key] = compare.check_tensor(ref_tensor, out_flat[key], tol)
            passed = passed and outputs[key]["passed"]
        main = outputs.get("0", next(iter(outputs.values()), {}))
        results[name] = {"passed": passed, "outputs": outputs,
                         **{k: main.get(k) for k in ("max_abs", "rel_max_abs", "rel_l2", "cosine", "tolerance",
                                                     "error") if k in main}}
    return results


def vae_decode_precision(model: models.LoadedModel, pipeline, captured: dict) -> dict[str, str | None]:
    """Which precision each side's VAE decoded in: the reference's from its captured decode call (the latents it
    was fed, after the pipeline's own upcast), the backend's from its stand-in (the precision its session, engine
    or server runs) or, for a torch module, the pipeline's own rule (models.vae_decode_dtype)."""
    args = captured.get(model.vae, ((),))[0]
    latents = args[0] if args and isinstance(args[0], torch.Tensor) else None
    reference = models.DTYPE_NAMES.get(latents.dtype) if latents is not None else None
    backend = getattr(getattr(pipeline, model.vae), "compute_dtype", None) or models.vae_decode_dtype(pipeline,
                                                                                                        model.vae)
    return {"reference": reference, "backend": backend}


def parity_verdict(output_results: dict[str, dict], components: dict[str, dict],
                   what: str = "image") -> tuple[str, str, str]:
    """(verdict, error class, reason) from the output checks (first and last measured call, the ranking) and the
    component checks; `what` names the output (image, embedding)."""
    failures = [(name, r) for name, r in components.items() if not r["passed"]]
    for which, result in output_results.items():
        if not result.get("passed"):
            error = result.get("error", "")
            cls = "NaNError" if "NaN" in error or "Inf" in error else (
                "ConstantImageError" if "constant" in error else "ParityError")
            return "fail", cls, f"{what} parity ({which}): {error}"
    if failures:
        name, r = failures[0]
        error = r.get("error") or next((o.get("error") for o in r.get("outputs", {}).values()
                                        if not o.get("passed")), "")
        cls = "NaNError" if "NaN" in (error or "") else "ParityError"
        return "fail", cls, f"{name} parity: {error}"
    return "pass", "", ""


# -- precision --------------------------------------------------------------------------------------------------
def set_precision_defaults() -> None:
    """fp32 means fp32: TF32 off in matmuls and cuDNN convolutions before every case (a `+tf32` variant turns it on
    in its prepare and restores it at close)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def precision_facts() -> dict:
    """What decides float32 precision and kernel choice right now (recorded per case in env.precision)."""
    return {"float32_matmul_precision": torch.get_float32_matmul_precision(),
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_deterministic": torch.backends.cudnn.deterministic}


# -- one pipeline call as every case makes it -------------------------------------------------------------------
class PipelineCall:
    """The user's call: the pipeline with the fixed inputs of the case's workload (prompts, seed and latents; or
    the sentences). `setup` prepares a call before the clock starts (fresh latents: some schedulers modify them in
    place); the stage timer's hooks mark the stages inside the call. The result is a numpy array: images, or one
    embedding per sentence."""

    def __init__(self, pipeline, model: models.LoadedModel, case: Case, cuda: bool, timed: bool = True):
        self.pipeline, self.model, self.case = pipeline, model, case
        self.embedding = case.workload == workloads.TEXT_EMBEDDING
        self.inputs = {"texts": embedding.batch_texts(case)} if self.embedding else models.pipeline_inputs(model,
                                                                                                             case)
        self.timer = StageTimer(cuda=cuda)
        if timed:
            self.timer.attach(pipeline, model.stages, model.methods)

    @property
    def prompts(self) -> list[str]:
        return list(self.inputs["texts"] if self.embedding else self.inputs["prompt"])

    def setup(self) -> None:
        if not self.embedding:
            self.inputs["latents"] = models.initial_latents(self.model, self.case)

    def __call__(self):
        with torch.inference_mode():
            if self.embedding:
                return self.pipeline(self.inputs["texts"], self.case.seq).cpu().numpy()
            return self.pipeline(**self.inputs).images

    def detach(self) -> None:
        self.timer.detach()


def time_components_alone(prepared: registry.Prepared, model: models.LoadedModel, reference: Reference,
                          device: str, warmup: int, repeats: int) -> dict[str, dict]:
    """Each executor called alone on the reference's captured inputs (what component parity feeds it): its cost
    outside the pipeline, to set beside the in-pipeline stage. Same clock as the stages."""
    clock = StageTimer(cuda=device == "cuda").clock
    out = {}
    for name, (args, kwargs, _) in reference.components.items():
        executor = getattr(prepared.pipeline, name)
        call = getattr(executor, model.methods[name]) if name in model.methods else executor
        args, kwargs = _to_device(args, device), _to_device(kwargs, device)
        seconds = []
        with torch.inference_mode():
            for i in range(warmup + repeats):
                start = clock.mark()
                call(*args, **kwargs)
                end = clock.mark()
                clock.sync()
                if i >= warmup:
                    seconds.append(clock.seconds(start, end))
        out[name] = stats(seconds)
    return out


INTEGRATION_WARNING = 1.5   # in-pipeline p50 above this multiple of the component alone is a finding


def stages_alone(stages: dict, alone: dict[str, dict], model: models.LoadedModel,
                 calls_per_run: dict[str, int]) -> list[str]:
    """Put each component's alone figure beside its in-pipeline stage (stages[stage]["alone"], ["integration"] =
    in-pipeline p50 / alone p50) and return the findings: stages whose integration exceeds INTEGRATION_WARNING."""
    mapping: dict[str, list[str]] = {}
    for component, stage in model.stages.items():
        # a denoiser call is one step: its alone time stands beside denoise_step, not the whole denoise stage
        mapping.setdefault("denoise_step" if stage == "denoise" else stage, []).append(component)
    findings = []
    for stage, components in mapping.items():
        if stage not in stages or not all(c in alone and alone[c].get("n") for c in components):
            continue
        if len(components) > 1 or calls_per_run.get(components[0], 1) > 1 and stage != "denoise_step":
            # the stage sums every call of a pipeline call (e.g. prompt and negative prompt, several encoders)
            p50 = sum(alone[c]["p50"] * calls_per_run.get(c, 1) for c in components)
            stages[stage]["alone"] = {"p50": p50, "components": {c: alone[c] for c in components},
                                      "calls_per_pipeline_call": {c: calls_per_run.get(c, 1) for c in components}}
        else:
            stages[stage]["alone"] = dict(alone[components[0]])
            p50 = alone[components[0]]["p50"]
        ratio = stages[stage]["p50"] / p50 if p50 else None
        stages[stage]["integration"] = ratio
        if ratio is not None and ratio > INTEGRATION_WARNING:
            findings.append(f"{stage}: in-pipeline p50 {stages[stage]['p50'] * 1e3:.2f} ms is {ratio:.2f}x the "
                            f"component alone ({p50 * 1e3:.2f} ms): the pipeline around it slows it down")
    return findings


def _save_image(image: np.ndarray, run_dir: Path, case: Case) -> str:
    from PIL import Image
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", case.id)
    path = run_dir / "images" / f"{safe}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    first = np.nan_to_num(np.clip(image[0], 0, 1))
    Image.fromarray((first * 255).round().astype(np.uint8)).save(path)
    return str(path.relative_to(run_dir))


def interrupted_record(case: Case, session: Session, record: Record | None = None) -> Record:
    """The record of a case cut off by SIGINT/SIGTERM (keeps whatever it had measured)."""
    record = record or Record.for_case(case, session.run_id, device=session.options.device)
    record.status, record.error_class, record.reason = "interrupted", "Interrupted", "run interrupted by signal"
    return record


# -- one case -----------------------------------------------------------------------------------------------------
class NoSamples(Exception):
    """The case made no measured call (e.g. pytest-benchmark disabled): there is no latency to record."""


def run_case(case: Case, session: Session, loop: Callable | None = None) -> Record:
    """Measure one case and return its record (never raises for a failing case; Interrupted propagates)."""
    options = session.options
    record = Record.for_case(case, session.run_id, device=options.device,
                             timing={"warmup": options.warmup, "repeats": options.repeats,
                                     "clock": "cuda-events" if options.device == "cuda" else "perf_counter",
                                     "isolated": _is_worker()})
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
        record.status, record.error_class, record.reason = "error", "OutOfMemoryError", _one_line(exc)
        if options.device == "cuda":
            record.memory["at_failure"] = cuda_memory_snapshot()
        if options.memory_budget_mb:   # an honest out-of-memory under the cap: the answer to "does it fit"
            record.status, record.error_class = "over_budget", "OutOfMemoryError"
            record.reason = f"out of memory under the {options.memory_budget_mb:g} MB budget: {_one_line(exc)}"
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
        failure = preflight.classify_failure(exc, preflight.Stack.from_env(session.env),
                                             preflight.target_for(case, options.device))
        if failure is not None:
            record.status, record.error_class, record.reason = failure.status, failure.error_class, failure.reason
        else:
            record.status, record.error_class, record.reason = "error", type(exc).__name__, _one_line(exc)
        record.info["traceback"] = traceback.format_exc(limit=8)[-4000:]
    finally:
        _free_memory()
    return record


def prepare_for_measuring(backend: registry.Backend, model: models.LoadedModel, case: Case, cache_dir: Path,
                          cuda: bool) -> tuple[registry.Prepared, dict | None]:
    """backend.prepare; then, where the backend moved the weights out of torch (ONNX Runtime, TensorRT, Triton),
    torch's caching allocator is emptied: its cached copy of the swapped-out weights (GBs at full size) is not the
    backend's memory. Returns the prepared pipeline and what torch still holds after that (GPU), else None."""
    prepared = backend.prepare(model, case, cache_dir)
    return prepared, release_torch_cache(cuda) if prepared.weights_outside_torch else None


def _measure_case(case: Case, session: Session, record: Record, reference: Reference, loop) -> None:
    options = session.options
    cuda = options.device == "cuda"
    telemetry = session.telemetry.start()
    backend = registry.get(case.backend)
    set_precision_defaults()
    if cuda and options.memory_budget_mb:
        cap_cuda_memory(options.memory_budget_mb)
    memory: dict[str, dict] = {}
    scope = measured_in(_is_worker(), session.measured_here)
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
            "capped": options.device == "cuda", "isolated": _is_worker()}


# -- isolation: each case in a fresh worker process ----------------------------------------------------------------
ISOLATION_ENV = "DIFFBENCH_ISOLATED_WORKER"


def _is_worker() -> bool:
    return os.environ.get(ISOLATION_ENV) == "1"


def run_isolated(case: Case, session: Session) -> Record:
    """Measure the case in a fresh worker process of this build and return its record. A worker that dies (a crash
    in native code, the kernel's OOM killer) becomes an error record; Ctrl-C / SIGTERM stop it and record the case
    as interrupted."""
    from dataclasses import asdict

    from harness.worker import WorkerDied, WorkerProcess
    options = {**asdict(session.options), "isolate": False, "share_references": True}
    settings = {"results_dir": str(session.run_dir), "run_id": session.run_id, "in_run_dir": True,
                "device": session.options.device, "warmup": session.options.warmup,
                "repeats": session.options.repeats, "timeout_s": session.options.timeout_s, "options": options}
    worker = WorkerProcess(Path(__file__).resolve().parent.parent, settings, session.run_dir / "workers.log",
                           {ISOLATION_ENV: "1", **session.telemetry.idle_env()}, label=f"worker of {case.id}")
    try:
        worker.start()
        worker.send({"op": "configure", "cases": [c.id for c in session.cases or [case]]})
        worker.send({"op": "run", "case": case.id})
        message = worker.read()
        worker.stop()
        record = Record.from_dict(message["record"])
        record.env = {**session.env, **(record.env or {})}   # the run's own facts (its shard) + the worker's
        return record
    except WorkerDied as exc:
        record = Record.for_case(case, session.run_id, device=session.options.device)
        record.status, record.error_class, record.reason = "error", "WorkerDied", str(exc)
        return record
    except (Interrupted, KeyboardInterrupt):
        worker.kill()
        session.write(interrupted_record(case, session))
        raise
    finally:
        worker.kill()
