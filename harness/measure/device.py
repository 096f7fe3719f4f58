"""Environment fingerprint: GPU, compute capability and arch family, driver, CUDA, CPU, library versions, and the
software stack the compatibility preflight (harness.judge.preflight) judges against the GPU: torch's CUDA build and arch
list, cuDNN, the driver's CUDA version (NVML), onnxruntime's build and providers, TensorRT, triton, diffusers.

Everything here works without a GPU and without nvidia-ml-py: facts that cannot be read are None or empty."""
from __future__ import annotations

import functools
import os
import platform
from importlib import metadata

LIBRARIES = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt",
             "tritonclient", "nvidia-pytriton", "numpy", "torchao", "bitsandbytes")

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


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str | None]:
    return {name: _version(name) for name in LIBRARIES}


def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def nvml_facts() -> dict:
    """Driver version, the CUDA version the driver supports, and the GPUs the driver sees -- read through NVML
    (nvidia-ml-py), independently of torch, so a driver too old for torch's CUDA runtime is still visible."""
    facts: dict = {"nvml": "not installed", "driver": None, "cuda_driver": None, "gpus": []}
    try:
        import pynvml
    except ImportError:  # nvidia-ml-py not installed: the driver facts stay unknown
        return facts
    try:
        pynvml.nvmlInit()
    except Exception:  # no NVIDIA driver on this machine
        facts["nvml"] = "no driver"
        return facts
    facts["nvml"] = "ok"
    try:
        facts["driver"] = _text(pynvml.nvmlSystemGetDriverVersion())
        version = pynvml.nvmlSystemGetCudaDriverVersion()  # 1000 * major + 10 * minor, e.g. 12080
        facts["cuda_driver"] = f"{version // 1000}.{version % 1000 // 10}"
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            facts["gpus"].append({"name": _text(pynvml.nvmlDeviceGetName(handle)), "capability": f"{major}.{minor}"})
    except Exception:  # a partial answer is still worth recording
        pass
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return facts


def cudnn_version_text(version: int | None) -> str | None:
    """torch.backends.cudnn.version() as text: 90100 -> "9.1.0" (cuDNN 9+), 8902 -> "8.9.2" (cuDNN 8)."""
    if not version:
        return None
    if version >= 90000:
        return f"{version // 10000}.{version % 10000 // 100}.{version % 100}"
    return f"{version // 1000}.{version % 1000 // 100}.{version % 100}"


def torch_facts() -> dict:
    import torch
    cuda = torch.version.cuda
    cudnn = None
    if cuda:
        try:
            cudnn = cudnn_version_text(torch.backends.cudnn.version())
        except Exception:  # cuDNN library missing or broken: reported as absent
            cudnn = None
    return {"torch": torch.__version__, "torch_cuda": cuda,
            # empty on a CPU build; "sm_XY" entries are SASS, "compute_XY" entries PTX
            "cuda_arch_list": list(torch.cuda.get_arch_list()) if cuda else [],
            "cudnn": cudnn}


TRT_PROVIDER_LIBRARY = "libonnxruntime_providers_tensorrt.so"   # in onnxruntime/capi/ of onnxruntime-gpu on Linux


def needed_library(path, prefix: str) -> str | None:
    """The first NEEDED entry of an ELF shared library that starts with `prefix` ("libnvinfer.so." ->
    "libnvinfer.so.10"): the soname the dynamic loader will look for. None when the file is absent, is not ELF, or
    pyelftools (the ELF reader) is not installed."""
    try:
        from elftools.elf.dynamic import DynamicSection
        from elftools.elf.elffile import ELFFile
        with open(path, "rb") as fh:
            for section in ELFFile(fh).iter_sections():
                if isinstance(section, DynamicSection):
                    for tag in section.iter_tags("DT_NEEDED"):
                        if tag.needed.startswith(prefix):
                            return tag.needed
    except Exception:  # absent, unreadable, not ELF, no pyelftools: unknown
        return None
    return None


def onnxruntime_facts() -> dict | None:
    try:
        import onnxruntime as ort
        from onnxruntime.capi import build_and_package_info as build
    except Exception:
        return None
    return {"package": getattr(build, "package_name", "onnxruntime"), "version": ort.__version__,
            # the CUDA version the wheel was built with ("" / absent on a CPU build)
            "cuda": getattr(build, "cuda_version", "") or None,
            "providers": list(ort.get_available_providers()),
            # the TensorRT major its TensorRT EP was linked against (None without the provider library)
            "tensorrt_ep_needs": needed_library(os.path.join(os.path.dirname(ort.__file__), "capi",
                                                             TRT_PROVIDER_LIBRARY), "libnvinfer.so.")}


def tensorrt_facts() -> dict | None:
    try:
        import tensorrt
        version = tensorrt.__version__
    except Exception:  # not installed (or a stub that cannot import): absent
        return None
    cuda_major = next((major for major in ("13", "12", "11")
                       if _version(f"tensorrt-cu{major}") or _version(f"tensorrt-cu{major}-libs")), None)
    return {"version": version, "cuda_major": cuda_major}


def stack_facts() -> dict:
    """The software stack around the GPU, for the compatibility preflight."""
    nvml = nvml_facts()
    return {**torch_facts(),
            "nvml": nvml["nvml"], "driver": nvml["driver"], "cuda_driver": nvml["cuda_driver"],
            "nvml_gpus": nvml["gpus"],
            "onnxruntime": onnxruntime_facts(), "tensorrt": tensorrt_facts(),
            "triton": _version("triton") or _version("pytorch-triton"),   # torch.compile's GPU code generator
            "diffusers": _version("diffusers")}


def gpu_info(index: int | None = None, stack: dict | None = None) -> dict | None:
    """The GPU this process measures on (torch's current device, not always GPU 0) and its state."""
    import torch
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device() if index is None else index
    stack = stack if stack is not None else stack_facts()
    major, minor = torch.cuda.get_device_capability(index)
    props = torch.cuda.get_device_properties(index)
    return {"name": torch.cuda.get_device_name(index), "capability": f"{major}.{minor}",
            "sm": sm_name(major, minor), "arch": arch_family(major, minor),
            "memory_mb": props.total_memory // (1024 * 1024), "torch_index": index,
            "cuda": torch.version.cuda, "driver": stack["driver"], "cuda_driver": stack["cuda_driver"],
            "cudnn": stack.get("cudnn"), "state": gpu_state(props)}


def pci_bus_id(props) -> str | None:
    """NVML's name for the GPU torch sees as `props` (torch.cuda.get_device_properties): its PCI bus id. Indices
    differ between CUDA and NVML (CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER); the bus id does not."""
    bus = getattr(props, "pci_bus_id", None)
    if bus is None:
        return None
    return f"{getattr(props, 'pci_domain_id', 0):08x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"


def gpu_state(props) -> dict:
    """What changes a GPU's speed from one run to the next: clocks (current and max), power limit, persistence,
    MIG and ECC modes -- read through NVML for the device torch uses, found by its PCI bus id."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:   # nvidia-ml-py missing or no driver: the state is unknown, not guessed
        return {"nvml": "unavailable"}
    state: dict = {}
    try:
        bus = pci_bus_id(props)
        handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus) if bus else pynvml.nvmlDeviceGetHandleByIndex(0)
        state["uuid"] = _text(pynvml.nvmlDeviceGetUUID(handle))
        for name, query in (
                ("sm_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)),
                ("sm_clock_max_mhz", lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)),
                ("memory_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM)),
                ("memory_clock_max_mhz", lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)),
                ("power_limit_w", lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0),
                ("persistence_mode", lambda: bool(pynvml.nvmlDeviceGetPersistenceMode(handle))),
                ("mig_mode", lambda: bool(pynvml.nvmlDeviceGetMigMode(handle)[0])),
                ("ecc_mode", lambda: bool(pynvml.nvmlDeviceGetEccMode(handle)[0]))):
            try:
                state[name] = query()
            except Exception:   # not supported on this GPU (e.g. MIG or ECC on consumer cards)
                state[name] = None
    except Exception as exc:
        state["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return state


@functools.lru_cache(maxsize=None)
def _fingerprint(device: str) -> dict:
    import torch
    stack = stack_facts()
    return {
        "device": device,
        "gpu": gpu_info(stack=stack) if device == "cuda" else None,
        "stack": stack,
        # threads against the cores this process may use: oversubscription shows here
        "cpu": {"model": cpu_model(), "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
                "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads()},
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
