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
from harness import compare, device as devinfo, models
from harness.cases import Case
from harness.errors import UserError
from harness.memory import MemoryMeter, cuda_memory_snapshot
from harness.records import Record, RecordWriter, git_info, new_run_id, recorded_case_ids, sanitize
from harness.timing import StageTimer, measure


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


@dataclass
class Reference:
    """The reference backend's outputs for one model x dtype x shape: the image and each component's first call."""
    image: np.ndarray
    components: dict[str, tuple[tuple, dict, Any]]   # name -> (args, kwargs, output), on CPU


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

    # -- records ---------------------------------------------------------------------------------------------
    def write(self, record: Record) -> None:
        """Store a record once per case id per run (a later suite asking for the same case reuses it)."""
        if record.case_id in self.records:
            return
        self.records[record.case_id] = record
        record.env, record.git = self.env, self.git
        record_dict = sanitize(record.to_dict())
        self.writer.write(record_dict)

    def configure(self, cases: list[Case]) -> None:
        """Tell each backend the run's whole case list before any case runs."""
        for name in sorted({c.backend for c in cases}):
            try:
                registry.get(name).configure([c for c in cases if c.backend == name])
            except UserError:
                pass  # unknown backends become unsupported rows when their cases run

    def result(self, case: Case, loop=None) -> Record:
        """The case's record for this run: measured once, then shared by every suite that asks."""
        if case.id not in self.records:
            self.write(run_case(case, self, loop=loop))
        return self.records[case.id]

    def close(self) -> None:
        registry.close_all()
        self.writer.close()

    # -- reference -------------------------------------------------------------------------------------------
    def reference(self, case: Case) -> Reference:
        key = case.shape_key
        if key not in self._references:
            self._references[key] = _compute_reference(case, self.options)
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
    """Model-level rules first (cheap), then the backend's own answer."""
    model_spec = models.spec(case.model)
    device = env["device"]
    if model_spec.full_size and device == "cpu":
        # named explicitly (the default matrix holds none): it runs, slowly, if its weights fit in RAM
        import psutil
        problem = models.cpu_memory_problem(case.model, case.dtype, psutil.virtual_memory().total)
        if problem:
            return registry.Support.no(problem)
    if device == "cpu" and case.dtype == "fp16":
        return registry.Support.no("fp16 on CPU: PyTorch's CPU kernels for half precision are incomplete/slow; "
                                   "use fp32 or bf16")
    if device == "cuda" and case.dtype == "bf16" and env.get("gpu") and float(env["gpu"]["capability"]) < 8.0:
        return registry.Support.no(f"bf16 needs compute capability 8.0+, this GPU is {env['gpu']['capability']}")
    return registry.get(case.backend).support(case, env)


# -- reference ----------------------------------------------------------------------------------------------------
def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
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
    for name in [*model.text_encoders, model.denoiser]:
        module = getattr(pipeline, name)

        def hook(_m, args, kwargs, output, name=name):
            captured.setdefault(name, (_detach(args), _detach(kwargs), _detach(output)))
        undo.append(module.register_forward_hook(hook, with_kwargs=True).remove)
    vae = getattr(pipeline, model.vae)
    original = vae.decode

    def decode(*args, **kwargs):
        output = original(*args, **kwargs)
        captured.setdefault(model.vae, (_detach(args), _detach(kwargs), _detach(output)))
        return output
    vae.decode = decode
    undo.append(lambda: delattr(vae, "decode"))
    try:
        yield captured
    finally:
        for fn in undo:
            fn()


def _compute_reference(case: Case, options: RunOptions) -> Reference:
    ref_case = case.with_backend(registry.REFERENCE)
    model = models.load(case.model, case.dtype, options.device)
    prepared = registry.get(registry.REFERENCE).prepare(model, ref_case, models.cache_root())
    try:
        with torch.inference_mode(), capture_first_calls(model) as captured:
            image = model.pipeline(**models.pipeline_inputs(model, ref_case)).images
        return Reference(image=np.asarray(image, dtype=np.float32), components=dict(captured))
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
        executor = getattr(prepared.pipeline, name)
        call = executor.decode if name == model.vae else executor
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
                         **{k: main.get(k) for k in ("max_abs", "rel_l2", "cosine", "error") if k in main}}
    return results


def parity_verdict(image_result: dict, components: dict[str, dict]) -> tuple[str, str, str]:
    """(verdict, error class, reason) from the image and component checks."""
    failures = [(name, r) for name, r in components.items() if not r["passed"]]
    if not image_result.get("passed"):
        error = image_result.get("error", "")
        cls = "NaNError" if "NaN" in error or "Inf" in error else (
            "ConstantImageError" if "constant" in error else "ParityError")
        return "fail", cls, f"image parity: {error}"
    if failures:
        name, r = failures[0]
        error = r.get("error") or next((o.get("error") for o in r.get("outputs", {}).values()
                                        if not o.get("passed")), "")
        cls = "NaNError" if "NaN" in (error or "") else "ParityError"
        return "fail", cls, f"{name} parity: {error}"
    return "pass", "", ""


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
def run_case(case: Case, session: Session, loop: Callable | None = None) -> Record:
    """Measure one case and return its record (never raises for a failing case; Interrupted propagates)."""
    options = session.options
    record = Record.for_case(case, session.run_id, device=options.device,
                             timing={"warmup": options.warmup, "repeats": options.repeats,
                                     "clock": "cuda-events" if options.device == "cuda" else "perf_counter"})
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
    except CaseTimeout as exc:
        record.status, record.error_class, record.reason = "error", "TimeoutError", str(exc)
    except Exception as exc:
        record.status, record.error_class, record.reason = "error", type(exc).__name__, _one_line(exc)
        record.info["traceback"] = traceback.format_exc(limit=8)[-4000:]
    finally:
        _free_memory()
    return record


def _measure_case(case: Case, session: Session, record: Record, reference: Reference, loop) -> None:
    options = session.options
    cuda = options.device == "cuda"
    meter = MemoryMeter(cuda)
    meter.start()
    backend = registry.get(case.backend)
    cold_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        build: dict[str, float] = {}
        with registry.timed(build, "load"):
            model = models.load(case.model, case.dtype, options.device)
        record.notes.extend(model.notes)
        prepared = backend.prepare(model, case, session.cache_dir)
        stack.callback(prepared.close)
        record.build = {**build, **prepared.build}
        inputs = models.pipeline_inputs(model, case)
        record.prompt, record.seed = list(inputs["prompt"]), models.seed_for(case)
        timer = StageTimer(cuda=cuda).attach(prepared.pipeline, model.text_encoders, model.denoiser, model.vae)
        stack.callback(timer.detach)

        def call():
            with torch.inference_mode():
                # fresh latents each call: some schedulers modify them in place
                inputs["latents"] = models.initial_latents(model, case)
                return prepared.pipeline(**inputs).images

        first_start = time.perf_counter()
        image, _ = timer.run(call, keep=False)
        record.first_call_s = time.perf_counter() - first_start
        record.cold_s = time.perf_counter() - cold_start
        meter.sample()
        measure(timer, lambda: (call(), meter.sample()), options.warmup, options.repeats, loop)
        record.stages, record.e2e = timer.summary()
        record.samples = {"e2e": list(timer.samples["e2e"])}
        timer.detach()
        record.memory = meter.result()
        record.info.update(prepared.info)
        record.notes.extend(record.info.pop("notes", []) or [])
        if "serving" in prepared.info:
            record.serving = record.info.pop("serving")

        image = np.asarray(image, dtype=np.float32)
        image_result = compare.check_image(reference.image, image, compare.IMAGE_TOLERANCES[case.dtype])
        components = component_parity(prepared, model, reference, case.dtype, options.device,
                                      options.tolerance_overrides)
        verdict, error_class, reason = parity_verdict(image_result, components)
        record.parity = {"verdict": verdict, "reference": registry.REFERENCE, "image": image_result,
                         "components": components}
        if options.save_images:
            record.image = _save_image(image, session.run_dir, case)
        if verdict != "pass":
            record.status, record.error_class, record.reason = "failed", error_class, reason
