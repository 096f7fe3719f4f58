"""Per-stage timers around a real pipeline call.

Stages: text_encode (all text-encoder calls of one pipeline call), denoise (all denoiser calls), denoise_step
(each denoiser call), vae_decode -- or, for a text-embedding pipeline, encode (the encoder call) -- then other
(scheduler, guidance, tokenising, pooling, pre/post-processing = e2e minus the stages) and e2e.
GPU: CUDA events on the current stream and ONE synchronise at the end of each pipeline call. CPU: perf_counter.
Warm-up calls are run and discarded; the cold first call is measured by the runner separately. Whatever prepares
a call (fresh inputs) runs before the clock starts: the timed region holds the user's call and the hooks' clock
marks, nothing else.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

STAGES = ("text_encode", "denoise", "denoise_step", "vae_decode", "encode", "other")


def stats(samples) -> dict[str, float]:
    """p25/p50/p75/p90/p99 (linear interpolation), mean, sample std, min, max and n of a list of seconds."""
    a = np.asarray(list(samples), dtype=float)
    if a.size == 0:
        return {"n": 0}
    p25, p50, p75, p90, p99 = np.percentile(a, [25, 50, 75, 90, 99])
    return {"p25": float(p25), "p50": float(p50), "p75": float(p75), "p90": float(p90), "p99": float(p99),
            "mean": float(a.mean()),
            "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "min": float(a.min()), "max": float(a.max()),
            "n": int(a.size)}


class _Clock:
    """Marks on the CPU clock or on the CUDA stream; resolved to seconds after one synchronise."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        if cuda:
            import torch
            self._torch = torch

    def mark(self):
        if self.cuda:
            event = self._torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            self._torch.cuda.synchronize()

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1000.0 if self.cuda else end - start


@dataclass
class _Call:
    stage: str
    start: Any
    end: Any = None
    component: str = ""


@dataclass
class StageTimer:
    """Attach to a pipeline's components, then wrap each pipeline call in run()."""
    cuda: bool = False
    samples: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in (*STAGES, "e2e")})
    _calls: list[_Call] = field(default_factory=list)
    _undo: list[Callable[[], None]] = field(default_factory=list)
    calls_per_run: dict[str, int] = field(default_factory=dict)   # component -> calls in the last pipeline call

    def __post_init__(self):
        self.clock = _Clock(self.cuda)

    # -- instrumentation -------------------------------------------------------------------------------------
    def attach(self, pipeline, stages: dict[str, str], methods: dict[str, str] | None = None) -> "StageTimer":
        """stages: component -> stage; methods: component -> the method the pipeline calls instead of forward
        (vae -> decode). A LoadedModel gives both (`model.stages`, `model.methods`)."""
        methods = methods or {}
        for component, stage in stages.items():
            if component in methods:
                self._wrap_method(getattr(pipeline, component), methods[component], stage, component)
            else:
                self._hook_module(getattr(pipeline, component), stage, component)
        return self

    def detach(self) -> None:
        while self._undo:
            self._undo.pop()()

    def _hook_module(self, module, stage: str, component: str) -> None:
        def pre(_mod, _args, _kwargs=None):
            self._calls.append(_Call(stage, self.clock.mark(), component=component))

        def post(_mod, _args, *_rest):
            self._close(stage)
        handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        self._undo.append(lambda: [h.remove() for h in handles])

    def _wrap_method(self, obj, method: str, stage: str, component: str) -> None:
        original = getattr(obj, method)
        had_instance_attr = method in vars(obj)

        def timed(*args, **kwargs):
            self._calls.append(_Call(stage, self.clock.mark(), component=component))
            try:
                return original(*args, **kwargs)
            finally:
                self._close(stage)
        setattr(obj, method, timed)

        def undo():
            if had_instance_attr:
                setattr(obj, method, original)
            else:
                delattr(obj, method)
        self._undo.append(undo)

    def _close(self, stage: str) -> None:
        for call in reversed(self._calls):
            if call.stage == stage and call.end is None:
                call.end = self.clock.mark()
                return

    # -- measuring -------------------------------------------------------------------------------------------
    def run(self, fn: Callable[[], Any], keep: bool = True,
            setup: Callable[[], Any] | None = None) -> tuple[Any, dict[str, float]]:
        """Call fn once; return its result and this call's per-stage seconds (recorded when keep). `setup` runs
        first, outside the clock."""
        if setup is not None:
            setup()
        self._calls.clear()
        start = self.clock.mark()
        result = fn()
        end = self.clock.mark()
        self.clock.sync()
        e2e = self.clock.seconds(start, end)
        per_call = {stage: 0.0 for stage in {call.stage for call in self._calls}}
        steps = []
        self.calls_per_run = {}
        for call in self._calls:
            self.calls_per_run[call.component] = self.calls_per_run.get(call.component, 0) + 1
            if call.end is None:
                continue
            seconds = self.clock.seconds(call.start, call.end)
            per_call[call.stage] += seconds
            if call.stage == "denoise":
                steps.append(seconds)
        per_call["other"] = max(0.0, e2e - sum(per_call.values()))
        per_call["e2e"] = e2e
        if keep:
            for stage, seconds in per_call.items():
                self.samples[stage].append(seconds)
            self.samples["denoise_step"].extend(steps)
        self._calls.clear()
        return result, per_call

    def summary(self) -> tuple[dict[str, dict], dict]:
        stages = {s: stats(self.samples[s]) for s in STAGES if self.samples[s]}
        return stages, stats(self.samples["e2e"])


def measure(timer: StageTimer, fn: Callable[[], Any], warmup: int, repeats: int,
            loop: Callable[..., Any] | None = None, setup: Callable[[], Any] | None = None) -> Any:
    """Run warm-up calls (discarded) then `repeats` measured calls; `setup` prepares each call outside the clock.
    `loop(call, warmup, repeats, setup)` may drive the calls instead (pytest-benchmark's pedantic mode, which
    runs `setup` before each round outside its own clock); our timer still tells warm-up from measured calls.
    Returns the last call's result (the image parity judges beside the first call's)."""
    count = {"n": 0}
    last = {}

    def call():
        count["n"] += 1
        result, _ = timer.run(fn, keep=count["n"] > warmup)
        last["result"] = result
        return result

    if loop is None:
        for _ in range(warmup + repeats):
            if setup is not None:
                setup()
            call()
    else:
        loop(call, warmup, repeats, setup)
    return last.get("result")
