"""Memory and energy of a case, per phase (load, build, inference), over the whole process tree.

A sampler (harness/measure/sampler.py) runs in its own process (so it never holds the GIL of the timed code)
and every 10 ms (GPU) or 100 ms (CPU, see SAMPLE_INTERVAL_S) reads:
  - RSS of the harness process and of every child process (a Triton server is a child), via psutil; a process
    another backend keeps for its own cases (a shared Triton server, while a diffusers case runs) is left out
    and sampled apart (`left_out_mb`): backends name theirs (Backend.foreign_processes);
  - on GPU, NVML per-process GPU memory of the same process tree, and the device's used memory.
In this process, at each phase boundary (never inside the timed region), the meter also reads what only this
process can know exactly: the peak RSS (VmHWM, reset per phase through /proc/self/clear_refs) and torch's
allocator peaks (max_memory_allocated / max_memory_reserved, reset per phase). Energy comes from NVML's
total-energy counter read just before and after the measured calls, with the device's idle power subtracted: measured
once per process before any work in it, once the reading has settled, from NVML's instantaneous power field where the
driver has it (isolated workers take their run's figure).

Per phase: {peak_mb, rss_mb, children_mb, left_out_mb, gpu_process_mb, gpu_device_mb, torch_allocated_mb,
torch_reserved_mb, torch_reserved_unallocated_mb}.
`peak_mb` is the phase's peak of the whole process tree: on CPU the larger of the sampled tree RSS and this
process's exact high-water mark; on GPU the process tree's NVML memory (falling back to the device's used memory
above its idle level where NVML cannot attribute memory to processes, e.g. inside some containers, and to torch's
reserved memory without NVML). `memory.peak_mb` of a record is the inference phase's.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path


from harness.measure.sampler import MB, Nvml, SAMPLE_INTERVAL_S


PHASES = ("load", "build", "inference")


# idle power: read every IDLE_INTERVAL_S until the means of two consecutive IDLE_WINDOW_S windows agree within
# IDLE_TOLERANCE (relative, or IDLE_TOLERANCE_W absolute); given up after IDLE_TIMEOUT_S (then settled: False)
IDLE_WINDOW_S, IDLE_INTERVAL_S, IDLE_TIMEOUT_S, IDLE_TOLERANCE, IDLE_TOLERANCE_W = 1.0, 0.05, 20.0, 0.02, 1.0
IDLE_POWER_ENV = "DIFFBENCH_IDLE_POWER"     # a run's idle power, handed to its isolated workers
_process_idle: dict | None = None           # measured once per process (later sessions of it reuse it)


# -- idle power -----------------------------------------------------------------------------------------------------
def settled_power(read, clock=time.monotonic, sleep=time.sleep, window_s: float = IDLE_WINDOW_S,
                  interval_s: float = IDLE_INTERVAL_S, timeout_s: float = IDLE_TIMEOUT_S) -> dict:
    """The device's power once the reading has settled: `read()` (watts, or None) every `interval_s` until the
    means of the last two `window_s` windows agree. A GPU that just worked draws more for seconds (clocks and
    fans come down), and an averaged reading lags by its own window. {watts, settled, seconds}."""
    start = clock()
    readings: list[tuple[float, float]] = []
    while True:
        now = clock()
        watts = read()
        if watts is not None:
            readings.append((now, watts))
        elapsed = now - start
        if elapsed >= 2 * window_s and readings:
            last = [w for t, w in readings if t > now - window_s]
            before = [w for t, w in readings if now - 2 * window_s < t <= now - window_s]
            if last and before:
                mean, previous = sum(last) / len(last), sum(before) / len(before)
                if abs(mean - previous) <= max(IDLE_TOLERANCE * mean, IDLE_TOLERANCE_W):
                    return {"watts": mean, "settled": True, "seconds": round(elapsed, 2)}
            if elapsed >= timeout_s:
                return {"watts": sum(last) / len(last) if last else readings[-1][1], "settled": False,
                        "seconds": round(elapsed, 2)}
        elif elapsed >= 2 * window_s:             # no reading at all: nothing to wait for
            return {"watts": None, "settled": False, "seconds": round(elapsed, 2)}
        sleep(interval_s)


def idle_power(nvml: Nvml, **settle) -> dict:
    """Idle power from NVML_FI_DEV_POWER_INSTANT where the driver has it, else nvmlDeviceGetPowerUsage (a 1 s
    average on Ampere and newer, GA100 excepted: NVML's nvmlDeviceGetPowerUsage documentation), after settling."""
    instant = nvml.instant_power_w() is not None
    read = nvml.instant_power_w if instant else nvml.power_w
    source = "NVML_FI_DEV_POWER_INSTANT" if instant else "nvmlDeviceGetPowerUsage"
    return {**settled_power(read, **settle), "source": source}


# -- this process -------------------------------------------------------------------------------------------------
def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS), so each phase gets its own exact peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


class Telemetry:
    """One sampler process per harness process (started on first use), phases marked by the runner."""

    def __init__(self, cuda: bool, interval_s: float | None = None):
        self.cuda = cuda
        self.interval_s = interval_s or SAMPLE_INTERVAL_S["cuda" if cuda else "cpu"]
        self.gpu: str | None = None      # PCI bus id of the GPU in use
        self.conn = self.proc = None
        self.idle_watts: float | None = None
        self.idle: dict | None = None      # how idle_watts was measured: {watts, settled, seconds, source, by}
        self.idle_device_mb: float | None = None
        self._nvml: Nvml | None = None
        self._nvml_opened = False
        self._hwm_resettable = False
        self.left_out: dict[int, str] = {}

    def _open_nvml(self) -> Nvml | None:
        if not self._nvml_opened:
            self._nvml_opened = True
            try:
                import torch

                from harness.measure.device import pci_bus_id
                self.gpu = pci_bus_id(torch.cuda.get_device_properties(torch.cuda.current_device()))
                self._nvml = Nvml(self.gpu)
            except Exception:   # nvidia-ml-py missing, no NVML, or no bus id: torch's figures still stand
                self._nvml = None
        return self._nvml

    def sample_idle(self) -> dict | None:
        """The device's idle power, measured once per process before any work in it (the session does this
        first), after the reading settles. An isolated worker takes its run's figure (IDLE_POWER_ENV): the GPU
        it starts on was just warmed by the worker before it."""
        global _process_idle
        if not self.cuda or self.idle is not None:
            return self.idle
        inherited = os.environ.get(IDLE_POWER_ENV)
        if inherited:
            self.idle = {**json.loads(inherited), "by": "the run's main process, before any work"}
        elif _process_idle is not None:
            self.idle = _process_idle
        else:
            nvml = self._open_nvml()
            if nvml is None:
                return None
            self.idle = _process_idle = {**idle_power(nvml), "by": "this process, before any work"}
        self.idle_watts = self.idle.get("watts")
        return self.idle

    def idle_env(self) -> dict[str, str]:
        """The environment that hands this run's idle power to a worker process."""
        keep = ("watts", "settled", "seconds", "source")
        return {IDLE_POWER_ENV: json.dumps({k: self.idle[k] for k in keep if k in self.idle})} if self.idle else {}

    def start(self) -> "Telemetry":
        if self.proc is not None:
            return self
        if self.cuda:
            self.sample_idle()        # unless the session did (it does, before any work)
            if self._open_nvml() is not None:
                self.idle_device_mb = self._nvml.device_used_mb()
        # a fresh interpreter running this module (not a fork of a process that holds CUDA or threads, and not
        # multiprocessing's spawn, which would re-import the caller's __main__)
        settings = json.dumps({"pid": os.getpid(), "gpu": self.gpu if self._nvml else None,
                               "interval_s": self.interval_s})
        self.proc = subprocess.Popen([sys.executable, "-m", "harness.measure.sampler", settings], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.conn = _Parent(self.proc)
        self.conn.send(("phase",))         # discard what was sampled while starting
        self.conn.recv()
        return self

    def stop(self) -> None:
        if self.proc is not None:
            try:
                self.conn.send(("stop",))
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
            self.proc = self.conn = None

    def begin_phase(self, leave_out: dict[int, str] | None = None) -> None:
        """Start a phase: the sampler's peaks, VmHWM and torch's peaks all start afresh. leave_out: pid -> what it
        is, processes (with their children) that are not the case's own -- a server another backend keeps for its
        own cases -- sampled apart (`left_out_mb`) and not counted in the phase's figures."""
        self.left_out = dict(leave_out or {})
        if self.proc is not None and self.proc.poll() is None:
            self.conn.send(("leave_out", sorted(self.left_out)))
        self._end_sampler_phase()
        self._hwm_resettable = _reset_peak_rss()
        if self.cuda:
            import torch
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def end_phase(self) -> dict:
        """The peaks of the phase begun last."""
        sampled = self._end_sampler_phase()
        hwm = _peak_rss_mb() if self._hwm_resettable else None
        rss = max(filter(None, (hwm, sampled.get("rss_mb"))), default=None)
        out = {"rss_mb": rss, "children_mb": sampled.get("children_mb"),
               "samples": sampled.get("samples", 0), "left_out_mb": sampled.get("left_out_mb")}
        if self.left_out:
            out["left_out"] = sorted(set(self.left_out.values()))
        tree = max(filter(None, (sampled.get("tree_mb"), hwm)), default=None)
        if self.cuda:
            import torch
            torch.cuda.synchronize()
            out["torch_allocated_mb"] = torch.cuda.max_memory_allocated() / MB
            out["torch_reserved_mb"] = torch.cuda.max_memory_reserved() / MB
            # held by torch's caching allocator but by no tensor, at the phase's end: NVML counts it as ours
            out["torch_reserved_unallocated_mb"] = (torch.cuda.memory_reserved() - torch.cuda.memory_allocated()) / MB
            out["gpu_process_mb"] = sampled.get("gpu_process_mb")
            out["gpu_device_mb"] = sampled.get("gpu_device_mb") if sampled.get("nvml") else None
            if out["gpu_process_mb"]:
                out["peak_mb"], out["peak_source"] = out["gpu_process_mb"], "nvml per-process (process tree)"
            elif out["gpu_device_mb"] and self.idle_device_mb is not None:
                out["peak_mb"] = out["gpu_device_mb"] - self.idle_device_mb
                out["peak_source"] = "nvml device used above idle"
            else:
                out["peak_mb"], out["peak_source"] = out["torch_reserved_mb"], "torch reserved"
        else:
            out["peak_mb"], out["peak_source"] = tree, "process tree RSS"
        return out

    def _end_sampler_phase(self) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            return {}
        self.conn.send(("phase",))
        return self.conn.recv()

    @contextlib.contextmanager
    def paused(self):
        """No sampling inside the block (the overhead benchmark's bare side runs without telemetry)."""
        if self.proc is None:
            yield
            return
        self.conn.send(("pause",))
        self.conn.recv()
        try:
            yield
        finally:
            self.conn.send(("resume",))

    def energy_j(self) -> float | None:
        return self._nvml.energy_j() if self._nvml is not None else None


class _Parent:
    """The harness's end of the sampler's pipes."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    def send(self, message) -> None:
        self.proc.stdin.write(json.dumps(list(message)) + "\n")
        self.proc.stdin.flush()

    def recv(self):
        line = self.proc.stdout.readline()
        if not line:
            raise OSError("the memory sampler exited")
        return json.loads(line)


def energy_record(telemetry: Telemetry, joules: float | None, seconds: float, calls: int) -> dict:
    """joules_per_call (idle power subtracted), watts_mean over the measured calls, idle_watts; or the reason."""
    if not telemetry.cuda:
        return {"unsupported": "no energy counter on CPU (NVML's total-energy counter is GPU-only)"}
    if joules is None or calls == 0 or seconds <= 0:
        return {"unsupported": "NVML total-energy counter not available on this GPU/driver"}
    idle = telemetry.idle_watts or 0.0
    return {"joules_per_call": max(joules - idle * seconds, 0.0) / calls, "watts_mean": joules / seconds,
            "idle_watts": telemetry.idle_watts, "idle": telemetry.idle, "calls": calls, "seconds": seconds}


def release_torch_cache(cuda: bool) -> dict | None:
    """After a backend moved the components' weights out of torch (ONNX Runtime, TensorRT, Triton): collect the
    dropped modules and hand torch's cached, now unused blocks back to the driver (torch.cuda.empty_cache), so
    NVML's figures hold the backend's memory, not torch's cached copy of the weights. On GPU, what torch still
    holds afterwards."""
    import gc
    gc.collect()
    if not cuda:
        return None
    import torch
    torch.cuda.empty_cache()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    return {"torch_cache_emptied": True, "torch_allocated_mb": allocated / MB, "torch_reserved_mb": reserved / MB,
            "torch_reserved_unallocated_mb": (reserved - allocated) / MB}


def measured_in(isolated: bool, cases_before: int) -> dict:
    """How a case's memory figures were measured (the record's memory.isolated, cases_before, includes)."""
    if isolated:
        includes = ("this case alone: a fresh worker process (the interpreter, its imports, the model, the case's "
                    "work; the first worker of a shape also computes the reference there) and the child processes "
                    "the case uses")
    elif cases_before == 0:
        includes = ("the first case of a process the run's later cases share: the interpreter, its imports, the "
                    "reference of its shape, the model, the case's work; child processes only where the case uses "
                    "them")
    else:
        includes = (f"a process shared with the {cases_before} case(s) measured before it: what they left in it "
                    "(memory freed but kept in its RSS, allocator pools, compiled code, imports) counts too; "
                    "child processes only where the case uses them")
    return {"isolated": isolated, "cases_before": cases_before, "includes": includes}


def isolated(record: dict) -> bool | None:
    """Whether a record's memory was measured in its own worker process (memory.isolated; records written before
    it existed say so in timing.isolated); None when the record does not say."""
    for section in ("memory", "timing"):
        value = (record.get(section) or {}).get("isolated")
        if isinstance(value, bool):
            return value
    return None


def scope_mismatch(baseline: dict, current: dict) -> str:
    """Why two records' peaks cannot be compared ('' when they can): one measured in its own worker process, the
    other in a process shared with earlier cases."""
    b, c = isolated(baseline), isolated(current)
    if b is None or c is None or b == c:
        return ""
    where = {True: "an isolated worker", False: "a process shared with earlier cases"}
    return (f"not compared: the baseline's peak was measured in {where[b]}, the current one in {where[c]}; "
            "measure both the same way (--isolate or --no-isolate)")


def cuda_memory_snapshot() -> dict:
    """What the allocator holds right now (recorded with an out-of-memory failure)."""
    import torch
    return {"allocated_mb": torch.cuda.memory_allocated() / MB, "reserved_mb": torch.cuda.memory_reserved() / MB,
            "peak_allocated_mb": torch.cuda.max_memory_allocated() / MB}


# -- weights as stored ------------------------------------------------------------------------------------------
def stored_bytes(tensors, seen: set | None = None) -> int:
    """Bytes of storage actually held by these tensors, each storage once. A tensor subclass that wraps others (a
    torchao quantised weight reports its original dtype's element size and shape) is counted through its inner
    tensors (`__tensor_flatten__`, PyTorch's protocol for wrapper subclasses): int8 data plus its scales."""
    seen = set() if seen is None else seen
    total = 0
    for tensor in tensors:
        if tensor is None:
            continue
        if hasattr(tensor, "__tensor_flatten__"):
            names, _ = tensor.__tensor_flatten__()
            total += stored_bytes([getattr(tensor, name) for name in names], seen)
            continue
        if getattr(tensor, "is_meta", False):
            continue
        storage = tensor.untyped_storage()
        key = (tensor.device.type, storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def weights_mb(pipeline, components: list[str]) -> dict[str, float]:
    """{total, <component>: MB}: the parameters and buffers each torch component holds, as stored (quantised
    weights at their real size). Components that hold no torch tensors (an ONNX Runtime session, a TensorRT engine,
    a Triton client) are left out rather than counted as 0."""
    import torch
    seen: set = set()
    out: dict[str, float] = {}
    for name in components:
        module = getattr(pipeline, name, None)
        if not isinstance(module, torch.nn.Module):
            continue
        tensors = [*module.parameters(), *module.buffers()]
        if tensors:
            out[name] = round(stored_bytes(tensors, seen) / MB, 3)
    out["total"] = round(sum(out.values()), 3)
    return out
