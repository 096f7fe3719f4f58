"""Peak memory per case: torch allocator peaks and NVML device memory on GPU, peak RSS of this process on CPU."""
from __future__ import annotations

import os
from pathlib import Path

import psutil

MB = 1024 * 1024


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) so each case gets its own peak."""
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


class _Nvml:
    def __init__(self, device_index: int):
        import pynvml
        pynvml.nvmlInit()
        self.pynvml = pynvml
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)

    def used_mb(self) -> float:
        return self.pynvml.nvmlDeviceGetMemoryInfo(self.handle).used / MB


class MemoryMeter:
    """start() before a case, sample() during it (e.g. after each pipeline call), result() at the end."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.nvml = None
        self.nvml_peak = None
        self.rss_resettable = False

    def start(self) -> None:
        if self.cuda:
            import torch
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            try:
                self.nvml = _Nvml(torch.cuda.current_device())
                self.nvml_peak = self.nvml.used_mb()
            except Exception:  # nvidia-ml-py missing or no NVML: torch figures still stand
                self.nvml = None
        self.rss_resettable = _reset_peak_rss()
        self.rss_start = psutil.Process().memory_info().rss / MB

    def sample(self) -> None:
        if self.nvml is not None:
            self.nvml_peak = max(self.nvml_peak or 0.0, self.nvml.used_mb())

    def result(self) -> dict:
        self.sample()
        out: dict = {"rss_peak_mb": _peak_rss_mb(), "rss_peak_resettable": self.rss_resettable}
        if self.cuda:
            import torch
            out["torch_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / MB
            out["torch_peak_reserved_mb"] = torch.cuda.max_memory_reserved() / MB
            out["nvml_used_peak_mb"] = self.nvml_peak
            out["peak_mb"] = out["torch_peak_reserved_mb"]
        else:
            out["peak_mb"] = out["rss_peak_mb"]
        return out


def cuda_memory_snapshot() -> dict:
    """What the allocator holds right now (recorded with an out-of-memory failure)."""
    import torch
    return {"allocated_mb": torch.cuda.memory_allocated() / MB, "reserved_mb": torch.cuda.memory_reserved() / MB,
            "peak_allocated_mb": torch.cuda.max_memory_allocated() / MB}
