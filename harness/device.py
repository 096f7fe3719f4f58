"""Environment fingerprint: GPU, compute capability and arch family, driver, CUDA, CPU, library versions."""
from __future__ import annotations

import functools
import os
import platform
from importlib import metadata

LIBRARIES = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt",
             "tritonclient", "nvidia-pytriton", "numpy")

# (major, minor) -> family. Blackwell has two families: datacenter (sm_100/sm_103) and workstation/consumer (sm_120).
_ARCH = {
    (7, 5): "Turing", (8, 0): "Ampere", (8, 6): "Ampere", (8, 7): "Ampere", (8, 9): "Ada",
    (9, 0): "Hopper", (10, 0): "Blackwell (datacenter)", (10, 3): "Blackwell (datacenter)",
    (12, 0): "Blackwell (workstation/consumer)", (12, 1): "Blackwell (workstation/consumer)",
}


def arch_family(major: int, minor: int) -> str:
    return _ARCH.get((major, minor), f"unknown sm_{major}{minor}")


def sm_name(major: int, minor: int) -> str:
    return f"sm_{major}{minor}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def gpu_info(index: int = 0) -> dict | None:
    import torch
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(index)
    info = {"name": torch.cuda.get_device_name(index), "capability": f"{major}.{minor}",
            "sm": sm_name(major, minor), "arch": arch_family(major, minor),
            "memory_mb": torch.cuda.get_device_properties(index).total_memory // (1024 * 1024),
            "cuda": torch.version.cuda, "driver": None}
    try:
        import pynvml
        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        info["driver"] = driver.decode() if isinstance(driver, bytes) else driver
    except Exception:  # nvidia-ml-py not installed: driver stays unknown
        pass
    return info


@functools.lru_cache(maxsize=None)
def _fingerprint(device: str) -> dict:
    import torch
    return {
        "device": device,
        "gpu": gpu_info() if device == "cuda" else None,
        "cpu": {"model": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": library_versions(),
    }


def fingerprint(device: str = "cpu") -> dict:
    return dict(_fingerprint(device))


def device_class(env: dict) -> str:
    """What the gate compares within: GPU name + compute capability, or the CPU model."""
    gpu = env.get("gpu")
    if gpu:
        return f"{gpu['name']} (sm {gpu['capability']})"
    return f"CPU {env.get('cpu', {}).get('model', 'unknown')}"
