"""A run's options and the limits every case runs under."""
from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading
from dataclasses import dataclass

import torch

from harness.records import Record
from harness.selection.cases import Case


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
    isolate: bool = False          # each case in a fresh worker process (harness/measure/worker_process.py)
    time_components: bool = True   # time every executor alone on the reference's inputs, beside the pipeline
    share_references: bool = False # keep each shape's reference in the run folder (isolated workers share it)
    memory_budget_mb: float | None = None  # over it a case is over_budget; on GPU also a real allocator cap


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


# -- isolation: each case in a fresh worker process ----------------------------------------------------------------
ISOLATION_ENV = "DIFFBENCH_ISOLATED_WORKER"


def is_worker() -> bool:
    return os.environ.get(ISOLATION_ENV) == "1"


def interrupted_record(case: Case, session, record: Record | None = None) -> Record:
    """The record of a case cut off by SIGINT/SIGTERM (keeps whatever it had measured)."""
    record = record or Record.for_case(case, session.run_id, device=session.options.device)
    record.status, record.error_class, record.reason = "interrupted", "Interrupted", "run interrupted by signal"
    return record


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
