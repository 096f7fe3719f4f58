"""The memory sampler: a process of its own (so it never holds the GIL of the timed code) that reads the RSS of the
harness process tree every SAMPLE_INTERVAL_S, and on GPU NVML's per-process and device memory, per phase; a process
left out (a server another backend keeps) is sampled apart. harness/measure/memory.py starts it and reads its peaks.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import psutil


MB = 1024 * 1024
# GPU: 10 ms, NVML's own update rate for memory. CPU: 100 ms -- this process's peak RSS is exact anyway (VmHWM),
# and on a 2-core machine a 10 ms sampler preempting torch's OpenMP threads slowed the measured pipeline by ~5 %
# (tiny-sd, 50 interleaved calls: +5.2 % at 10 ms, +3.8 % at 50 ms, -0.5 % at 100 ms)
SAMPLE_INTERVAL_S = {"cuda": 0.01, "cpu": 0.1}
CHILDREN_REFRESH_S = 0.5      # listing the process tree costs far more than reading a few RSS values


# nvmlValue_t's union member per nvmlValueType_t (nvidia-ml-py's pynvml.py: NVML_VALUE_TYPE_*, c_nvmlValue_t)
_NVML_VALUE_MEMBERS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}


# -- the sampler process ----------------------------------------------------------------------------------------
class Nvml:
    def __init__(self, gpu: str):
        """gpu: the PCI bus id of the GPU (NVML's indices need not be torch's)."""
        import pynvml
        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByPciBusId(gpu)

    def device_used_mb(self) -> float:
        return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / MB

    def process_mb(self, pids: set[int]) -> float | None:
        """GPU memory NVML attributes to these processes; None where it attributes none to anyone (containers
        without the host's PID namespace see an empty list)."""
        try:
            running = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except self.nvml.NVMLError:
            return None
        if not running:
            return None
        return sum((p.usedGpuMemory or 0) for p in running if p.pid in pids) / MB

    def power_w(self) -> float | None:
        try:
            return self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0
        except self.nvml.NVMLError:
            return None

    def instant_power_w(self) -> float | None:
        """NVML_FI_DEV_POWER_INSTANT (milliwatts) through nvmlDeviceGetFieldValues; None where the driver or
        nvidia-ml-py lacks it (then nvmlDeviceGetPowerUsage: a 1 s average on Ampere and newer, except GA100)."""
        field = getattr(self.nvml, "NVML_FI_DEV_POWER_INSTANT", None)
        if field is None:
            return None
        try:
            value = self.nvml.nvmlDeviceGetFieldValues(self.handle, [field])[0]
        except self.nvml.NVMLError:
            return None
        if value.nvmlReturn != self.nvml.NVML_SUCCESS:     # per-field status, e.g. NVML_ERROR_NOT_SUPPORTED
            return None
        member = _NVML_VALUE_MEMBERS.get(value.valueType)
        return getattr(value.value, member) / 1000.0 if member else None

    def energy_j(self) -> float | None:
        try:
            return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0
        except self.nvml.NVMLError:
            return None


class _Pipe:
    """The sampler's end of its pipes: one JSON command per stdin line, one JSON answer per stdout line. Reads the
    raw descriptor into its own buffer: a buffered readline could swallow a second command that select() would
    then never report."""

    def __init__(self):
        import selectors
        self.fd = sys.stdin.fileno()
        self.pending = b""
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.fd, selectors.EVENT_READ)

    def poll(self, timeout: float) -> bool:
        return b"\n" in self.pending or bool(self.selector.select(timeout))

    def recv(self):
        while b"\n" not in self.pending:
            chunk = os.read(self.fd, 4096)
            if not chunk:
                return ["stop"]                             # EOF: the harness process went away
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return json.loads(line)

    def send(self, message) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()


def _sampler_main(pid: int, conn, gpu: str | None, interval_s: float) -> None:
    """Sample the process tree of `pid` until told to stop. Commands: ["phase"] starts new peaks and answers the
    finished phase's peaks; ["pause"] samples nothing until the next command; ["leave_out", [pid, ...]] (no
    answer): from now on those processes and their children are not the case's (a shared server another backend
    keeps), sampled apart."""
    root = psutil.Process(pid)
    me = os.getpid()              # the sampler is a child of the harness too: never count it
    leave_out: set[int] = set()
    others: list[psutil.Process] = []
    nvml = None
    if gpu is not None:
        try:
            nvml = Nvml(gpu)
        except Exception:   # nvidia-ml-py missing or no NVML: the in-process torch figures still stand
            nvml = None
    tree, listed_at = [root], 0.0
    peaks, samples = {}, 0

    def reset():
        nonlocal peaks, samples
        peaks, samples = {"rss_mb": 0.0, "children_mb": 0.0, "tree_mb": 0.0, "left_out_mb": 0.0}, 0
        if nvml is not None:
            peaks.update(gpu_process_mb=None, gpu_device_mb=0.0)

    def sample() -> bool:
        nonlocal tree, others, listed_at, samples
        now = time.monotonic()
        if now - listed_at > CHILDREN_REFRESH_S:
            try:
                children = [p for p in root.children(recursive=True) if p.pid != me]
            except psutil.Error:
                return False   # the harness process is gone
            left = _with_descendants(leave_out)
            tree = [root, *(p for p in children if p.pid not in left)]
            others = [p for p in children if p.pid in left]
            listed_at = now
        main, children = 0.0, 0.0
        for p in tree:
            try:
                rss = p.memory_info().rss / MB
            except psutil.Error:
                continue
            if p.pid == pid:
                main = rss
            else:
                children += rss
        left_out = 0.0
        for p in others:
            with contextlib.suppress(psutil.Error):
                left_out += p.memory_info().rss / MB
        samples += 1
        peaks["left_out_mb"] = max(peaks["left_out_mb"], left_out)
        peaks["rss_mb"] = max(peaks["rss_mb"], main)
        peaks["children_mb"] = max(peaks["children_mb"], children)
        peaks["tree_mb"] = max(peaks["tree_mb"], main + children)
        if nvml is not None:
            attributed = nvml.process_mb({p.pid for p in tree})
            if attributed is not None:
                peaks["gpu_process_mb"] = max(peaks["gpu_process_mb"] or 0.0, attributed)
            peaks["gpu_device_mb"] = max(peaks["gpu_device_mb"], nvml.device_used_mb())
        return True

    reset()
    while True:
        if conn.poll(interval_s):
            command = conn.recv()
            if command[0] == "stop":
                return
            if command[0] == "pause":            # sample nothing until the next command
                conn.send("paused")
                command = conn.recv()
                if command[0] == "stop":
                    return
            if command[0] == "phase":
                if samples == 0 and not sample():   # a phase shorter than the interval still gets one sample
                    return
                conn.send({**peaks, "samples": samples, "nvml": nvml is not None})
                reset()
            elif command[0] == "leave_out":
                leave_out, listed_at = set(command[1]), 0.0     # list the tree afresh at the next sample
            continue
        if not sample():
            return


def _with_descendants(pids: set[int]) -> set[int]:
    out = set(pids)
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            out.update(p.pid for p in psutil.Process(pid).children(recursive=True))
    return out


if __name__ == "__main__":
    settings = json.loads(sys.argv[1])
    _sampler_main(settings["pid"], _Pipe(), settings["gpu"], settings["interval_s"])
