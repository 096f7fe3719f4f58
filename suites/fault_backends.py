"""Test-only backends that misbehave on purpose (never registered in production code paths).

`faulty+<fault>` wraps the reference pipeline's denoiser with an executor that
  raise  -- raises RuntimeError            hang  -- sleeps far past any timeout
  nan    -- returns NaN                    oom   -- raises torch.OutOfMemoryError
  blank  -- makes the VAE return a constant image
  scaled -- scales the denoiser output by 1.01 (a subtly wrong executor that parity must catch)
  drift  -- right during the first pipeline call, scaled by 1.01 after it (reused buffers, stale state: a
            backend that parity on the first call alone would pass)
  slow   -- busy-waits DIFFBENCH_FAULT_SLEEP seconds (default 0.01) per denoiser call (a real slowdown for the gate)
  exit   -- ends the process at once, like a crash in native code (for the A/B worker's crash handling)

Also the signal tests' helper for the subprocesses they interrupt.
"""
from __future__ import annotations

import os
import signal
import time

import torch

from backends import base as registry
from backends.base import Backend, Executor, Prepared

FAULTS = ("raise", "hang", "nan", "oom", "blank", "scaled", "drift", "slow", "exit")


class _Wrapped(Executor):
    """Runs the original module, then misbehaves as asked."""

    def __init__(self, inner, fault: str, steps: int):
        super().__init__(inner)
        self.inner, self.fault, self.steps, self.calls = inner, fault, steps, 0

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, *args, **kwargs):
        if self.fault == "raise":
            raise RuntimeError("injected executor failure")
        if self.fault == "exit":
            os._exit(3)
        if self.fault == "hang":
            time.sleep(3600)
        if self.fault == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        if self.fault == "slow":  # spin, not sleep: time.sleep overshoots by ~0.1-1 ms, too coarse for a 10 % step
            end = time.perf_counter() + float(os.environ.get("DIFFBENCH_FAULT_SLEEP", "0.01"))
            while time.perf_counter() < end:
                pass
        out = self.inner(*args, **kwargs)
        self.calls += 1
        if self.fault == "drift" and self.calls > self.steps:
            return (out[0] * 1.01,)
        if self.fault == "nan":
            return (torch.full_like(out[0], float("nan")),)
        if self.fault == "scaled":
            return (out[0] * 1.01,)
        return out


class FaultyBackend(Backend):
    name = "faulty"
    options = FAULTS
    exclusive = (FAULTS,)
    description = "test-only fault injection"

    def prepare(self, model, case, cache) -> Prepared:
        pipeline = model.pipeline
        executors = {}
        if case.variant == "blank":
            vae = getattr(pipeline, model.vae)
            original = vae.decode
            vae.decode = lambda z, *a, **k: (torch.zeros_like(original(z, *a, **k)[0]),)
            executors[model.vae] = vae
        else:
            wrapped = _Wrapped(getattr(pipeline, model.denoiser), case.variant, case.steps)
            setattr(pipeline, model.denoiser, wrapped)
            executors[model.denoiser] = wrapped
        return Prepared(pipeline=pipeline, executors=executors, info={"fault": case.variant})


def register() -> None:
    registry.register("faulty", FaultyBackend)


def unregister() -> None:
    registry.unregister("faulty")


def sigint_as_at_a_terminal() -> None:
    """A test run started as a background job (`cmd &` in a script) inherits SIGINT ignored, and Python then never
    turns it into KeyboardInterrupt; the child under test should see SIGINT as it does at a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
