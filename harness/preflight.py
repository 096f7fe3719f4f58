"""Compatibility preflight: does the user's stack fit the GPU in hand, and if not, what would?

Checked before any model loads. The rules are a table (RULES) of pure functions of the facts harness.device records
in `env` (a Stack): no torch import, no GPU needed, so they are unit-tested on CPU with the real arch lists and
versions of well-known builds. One verdict per backend x device x dtype (x pipeline class):
`supported`, or `unsupported: <what does not fit>: <what would fit>` -- every misfit found, joined with "; ".

A case that still fails at run time with a known incompatibility (no kernel image, unsupported PTX, a cuDNN/cuBLAS
"not supported", a TensorRT build refusing the GPU...) is classified by ERROR_PATTERNS into the same wording
(classify_failure), so a record says why instead of carrying a raw traceback.

Every rule names its public source; docs/compatibility.md lists them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from packaging.version import InvalidVersion, Version

# -- sources ------------------------------------------------------------------------------------------------------
SRC_CUBIN_PTX = "https://docs.nvidia.com/cuda/blackwell-compatibility-guide"
SRC_ARCH_SPECIFIC = ("https://developer.nvidia.com/blog/"
                     "nvidia-blackwell-and-nvidia-cuda-12-9-introduce-family-specific-architecture-features")
SRC_MINOR_VERSION = "https://docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html"
SRC_PTX_TOOLCHAIN = ("https://docs.nvidia.com/cuda/cuda-runtime-api/group__CUDART__TYPES.html "
                     "(cudaErrorUnsupportedPtxVersion)")
SRC_TORCH_BUILDS = ("https://github.com/pytorch/pytorch/blob/main/.ci/manywheel/build_cuda.sh and "
                    "PYTORCH_RELEASES_CODE_CC in torch/cuda/__init__.py")
SRC_TORCH_27 = "https://pytorch.org/blog/pytorch-2-7/"
SRC_ORT_CUDA = "https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html#requirements"
SRC_TRT_108 = "https://docs.nvidia.com/deeplearning/tensorrt/latest/getting-started/release-notes-10/10.8.0.html"
SRC_TRT_104 = "https://docs.nvidia.com/deeplearning/tensorrt/latest/getting-started/release-notes-10/10.4.0.html"
SRC_TRT_GB300 = "https://docs.nvidia.com/dgx/dgxgb300nvl72-release-notes/system-libraries-tools-drivers.html"
SRC_TE_MATRIX = "https://nvidia.github.io/TransformerEngine/support_matrix.html"
SRC_TRITON_SM121 = "https://github.com/triton-lang/triton/issues/10331"
SRC_DIFFUSERS = "https://github.com/huggingface/diffusers/releases/tag/v{version}"
SRC_SD35 = "https://huggingface.co/blog/sd3-5"
SRC_PROJECT = "diffbench policy (measured on CPU runners)"
SRC_TORCH_INSTALL = "https://pytorch.org/get-started/locally/"
SRC_TORCH_CC = "DEVICE_REQUIREMENT in torch/cuda/__init__.py (integrated GPUs run only their own cubins)"

# The archs of the official x86_64 torch wheels per CUDA tag (SASS only), newest tags last. cu124: pytorch/builder
# release/2.5 manywheel/build_cuda.sh (TORCH_CUDA_ARCH_LIST 5.0;6.0;7.0;7.5;8.0;8.6;9.0); the others:
# PYTORCH_RELEASES_CODE_CC of torch 2.13 and the get_arch_list() outputs in pytorch/pytorch#182250.
OFFICIAL_TORCH_ARCHS = {
    "cu124": (50, 60, 70, 75, 80, 86, 90),
    "cu126": (50, 60, 70, 75, 80, 86, 90),
    "cu128": (75, 80, 86, 90, 100, 120),
    "cu129": (75, 80, 86, 90, 100, 120),
    "cu130": (75, 80, 86, 90, 100, 120),
}
# CUDA major -> the oldest driver branch of its minor-version-compatibility range (SRC_MINOR_VERSION, table 1)
DRIVER_BRANCH = {11: "450", 12: "525", 13: "580"}
# Blackwell compute capabilities and the first TensorRT release that builds for them
TRT_MIN_FOR_ARCH = {(10, 0): "10.8", (12, 0): "10.8", (10, 3): "10.13"}
TRT_MIN_FP4 = "10.8"
TRT_VOLTA_REMOVED = "10.5"
# integrated GPUs (Jetson, Thor) are not binary compatible with the discrete GPUs of their major (SRC_TORCH_CC)
INTEGRATED = {(5, 3), (6, 2), (7, 2), (8, 7), (10, 1)}
TRITON_MIN_FOR_ARCH = {(10, 0): "3.3", (10, 3): "3.3", (12, 0): "3.3", (12, 1): "3.6"}
# pipeline class -> (first diffusers release that has it); checked against the release tags of huggingface/diffusers
PIPELINE_MIN_DIFFUSERS = {"StableDiffusionPipeline": "0.2.0", "StableDiffusionXLPipeline": "0.18.0",
                          "StableDiffusion3Pipeline": "0.29.0", "FluxPipeline": "0.30.0"}
PIPELINE_OF_KIND = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                    "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
# models whose weights need more than their pipeline class: SD3.5's transformer has qk_norm (diffusers 0.31.0)
MODEL_MIN_DIFFUSERS = {"sd35-large": ("0.31.0", "SD3.5's transformer (qk_norm)")}


# -- facts ----------------------------------------------------------------------------------------------------------
def _parse(text: str | None) -> Version | None:
    if not text:
        return None
    try:
        return Version(str(text))
    except InvalidVersion:
        return None


def _major(text: str | None) -> int | None:
    version = _parse(text)
    return version.major if version else None


def _capability(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    major, _, minor = str(text).partition(".")
    try:
        return int(major), int(minor or 0)
    except ValueError:
        return None


def sm(capability: tuple[int, int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"


@dataclass(frozen=True)
class Stack:
    """The facts the rules read (see harness.device.stack_facts). None / empty = unknown or absent."""
    gpu_name: str | None = None
    capability: tuple[int, int] | None = None      # of the GPU this run uses (None: no CUDA device in use)
    torch: str | None = None
    torch_cuda: str | None = None                  # CUDA runtime torch was built with; None on a CPU build
    cuda_arch_list: tuple[str, ...] = ()
    cudnn: str | None = None
    nvml: str | None = None                        # "ok", "no driver", "not installed" (nvidia-ml-py)
    driver: str | None = None
    cuda_driver: str | None = None                 # the newest CUDA version the driver supports (NVML)
    nvml_gpus: tuple[tuple[str, tuple[int, int]], ...] = ()   # GPUs the driver sees, even if torch cannot use them
    ort_package: str | None = None
    ort_version: str | None = None
    ort_cuda: str | None = None
    ort_providers: tuple[str, ...] = ()
    trt: str | None = None
    trt_cuda_major: int | None = None
    triton: str | None = None
    diffusers: str | None = None

    @classmethod
    def from_env(cls, env: dict) -> "Stack":
        """From a record's `env` (harness.device.fingerprint); older records without `stack` give what they can."""
        env = env or {}
        gpu = env.get("gpu") or {}
        stack = env.get("stack") or {}
        versions = env.get("versions") or {}
        ort = stack.get("onnxruntime") or {}
        trt = stack.get("tensorrt") or {}
        gpus = []
        for g in stack.get("nvml_gpus") or ():
            cap = _capability(g.get("capability"))
            if cap:
                gpus.append((g.get("name") or "GPU", cap))
        return cls(
            gpu_name=gpu.get("name"),
            capability=_capability(gpu.get("capability")),
            torch=stack.get("torch") or versions.get("torch"),
            torch_cuda=stack.get("torch_cuda") if "torch_cuda" in stack else gpu.get("cuda"),
            cuda_arch_list=tuple(stack.get("cuda_arch_list") or ()),
            cudnn=stack.get("cudnn"),
            nvml=stack.get("nvml"),
            driver=stack.get("driver") or gpu.get("driver"),
            cuda_driver=stack.get("cuda_driver") or gpu.get("cuda_driver"),
            nvml_gpus=tuple(gpus),
            ort_package=ort.get("package"),
            ort_version=ort.get("version") or versions.get("onnxruntime-gpu") or versions.get("onnxruntime"),
            ort_cuda=ort.get("cuda"),
            ort_providers=tuple(ort.get("providers") or ()),
            trt=trt.get("version") or versions.get("tensorrt"),
            trt_cuda_major=int(trt["cuda_major"]) if trt.get("cuda_major") else None,
            triton=stack.get("triton"),
            diffusers=stack.get("diffusers") or versions.get("diffusers"),
        )


@dataclass(frozen=True)
class Target:
    """What is asked of the stack: a backend (+variant) on a device in a dtype, for a pipeline class."""
    backend: str
    variant: str = ""
    device: str = "cuda"
    dtype: str = "fp32"
    pipeline: str | None = None      # diffusers pipeline class name
    model: str | None = None

    @property
    def precision(self) -> str:
        """fp8/fp4 are TensorRT variants; otherwise the case dtype."""
        return self.variant if self.variant in ("fp8", "fp4") else self.dtype

    @property
    def needs_cuda(self) -> bool:
        return self.device == "cuda" or self.backend == "tensorrt" or (
            self.backend == "onnxruntime" and self.variant == "trt-ep")

    @property
    def uses_tensorrt(self) -> bool:
        return self.backend == "tensorrt" or (self.backend == "onnxruntime" and self.variant == "trt-ep")


@dataclass(frozen=True)
class Misfit:
    rule: str
    problem: str        # what does not fit
    fix: str            # what would

    @property
    def text(self) -> str:
        return f"{self.problem}: {self.fix}"


@dataclass(frozen=True)
class Verdict:
    misfits: tuple[Misfit, ...] = ()
    notes: tuple[str, ...] = ()      # facts that were unknown, so a rule could not be checked

    @property
    def supported(self) -> bool:
        return not self.misfits

    def __bool__(self) -> bool:
        return self.supported

    @property
    def reason(self) -> str:
        return "; ".join(m.text for m in self.misfits)

    @property
    def rules(self) -> tuple[str, ...]:
        return tuple(m.rule for m in self.misfits)

    def __str__(self) -> str:
        return "supported" if self.supported else f"unsupported: {self.reason}"


# -- the arch list --------------------------------------------------------------------------------------------------
_ARCH_ENTRY = re.compile(r"^(sm|compute)_(\d+)([af]?)$")


def _arch_entry(entry: str) -> tuple[str, tuple[int, int], str] | None:
    """'sm_120' -> ('sm', (12, 0), ''); 'compute_90a' -> ('compute', (9, 0), 'a'). The last digit is the minor."""
    match = _ARCH_ENTRY.match(entry.strip())
    if not match:
        return None
    kind, digits, suffix = match.groups()
    return kind, (int(digits[:-1]), int(digits[-1])), suffix


def sass_runs_on(code: tuple[int, int], suffix: str, device: tuple[int, int]) -> bool:
    """A cubin runs on the same major and an equal or higher minor; 'a' (arch-specific) cubins only on exactly
    their arch; 'f' (family) cubins on the same major with an equal or higher minor (SRC_CUBIN_PTX,
    SRC_ARCH_SPECIFIC)."""
    if suffix == "a" or device in INTEGRATED:
        return code == device
    return code[0] == device[0] and code[1] <= device[1]


def ptx_jits_on(code: tuple[int, int], suffix: str, device: tuple[int, int]) -> bool:
    """Plain compute_XY PTX JIT-compiles forward to every equal or newer arch; compute_XYa does not leave its arch,
    compute_XYf does not leave its major (SRC_CUBIN_PTX, SRC_ARCH_SPECIFIC)."""
    if suffix == "a":
        return code == device
    if suffix == "f":
        return code[0] == device[0] and code[1] <= device[1]
    return code <= device


def _arch_number(capability: tuple[int, int]) -> int:
    return capability[0] * 10 + capability[1]


def official_builds_for(capability: tuple[int, int]) -> list[str]:
    """The official torch CUDA tags whose SASS runs on this GPU."""
    return [tag for tag, archs in OFFICIAL_TORCH_ARCHS.items()
            if any(sass_runs_on((a // 10, a % 10), "", capability) for a in archs)]


def _install_hint(capability: tuple[int, int]) -> str:
    tags = official_builds_for(capability)
    if not tags:
        return f"build torch from source with TORCH_CUDA_ARCH_LIST including {capability[0]}.{capability[1]}"
    newest = list(OFFICIAL_TORCH_ARCHS)
    if tags == newest[newest.index(tags[0]):]:
        return f"install a {tags[0]} or newer build"
    return f"install a {' or '.join(tags)} build"


# -- the rules -----------------------------------------------------------------------------------------------------
def rule_cuda_device(s: Stack, t: Target) -> Misfit | None:
    if not t.needs_cuda:
        return None
    if t.device != "cuda":
        what = "TensorRT" if t.uses_tensorrt else t.backend
        return Misfit("cuda-device", f"{what} needs a CUDA GPU and this run is on the {t.device}",
                      "run with --gpu on an NVIDIA GPU runner")
    if s.capability is not None:
        return None
    seen = ", ".join(f"{name} ({sm(cap)})" for name, cap in s.nvml_gpus)
    if not s.torch_cuda:
        where = f"the driver sees {seen}" if seen else {
            "no driver": "NVML found no NVIDIA driver", "not installed": "the driver was not queried (no nvidia-ml-py)",
        }.get(s.nvml or "", "no GPU is known")
        hint = f"{_install_hint(s.nvml_gpus[0][1])} of torch" if s.nvml_gpus else \
            "on a machine with an NVIDIA GPU, install a CUDA build of torch (cu128 or newer for Blackwell)"
        return Misfit("cuda-device", f"no CUDA device: torch {s.torch} is a CPU-only build and {where}", hint)
    if seen:
        return Misfit("cuda-device", f"torch {s.torch} sees no CUDA device although the driver sees {seen}",
                      "check CUDA_VISIBLE_DEVICES and that the driver supports torch's CUDA runtime")
    return Misfit("cuda-device", f"no CUDA device visible to torch {s.torch}",
                  "check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES")


def _driver_text(s: Stack) -> str:
    return f"the NVIDIA driver {s.driver}" if s.driver else "the NVIDIA driver"


def rule_driver_cuda(s: Stack, t: Target) -> Misfit | None:
    runtime, driver = _major(s.torch_cuda), _major(s.cuda_driver)
    if not t.needs_cuda or runtime is None or driver is None or driver >= runtime:
        return None
    branch = DRIVER_BRANCH.get(runtime)
    need = f"an R{branch} or newer driver (CUDA {runtime}.x)" if branch else f"a driver for CUDA {runtime}.x"
    return Misfit("driver-cuda",
                  f"{_driver_text(s)} supports CUDA {s.cuda_driver}, but torch {s.torch} was built with CUDA "
                  f"{s.torch_cuda} (minor-version compatibility holds only within one CUDA major)",
                  f"install {need}, or a torch build for CUDA {driver}.x")


def rule_torch_arch(s: Stack, t: Target) -> Misfit | None:
    if not t.needs_cuda or s.capability is None or not s.torch_cuda or not s.cuda_arch_list:
        return None
    cap = s.capability
    entries = [e for e in map(_arch_entry, s.cuda_arch_list) if e]
    if any(kind == "sm" and sass_runs_on(code, suffix, cap) for kind, code, suffix in entries):
        return None
    ptx = [f"compute_{_arch_number(code)}{suffix}" for kind, code, suffix in entries
           if kind == "compute" and ptx_jits_on(code, suffix, cap)]
    if ptx:
        runtime, driver = _parse(s.torch_cuda), _parse(s.cuda_driver)
        if runtime is None or driver is None or driver >= runtime:
            return None
        return Misfit("torch-arch",
                      f"torch {s.torch} has no SASS for {sm(cap)}, only PTX ({', '.join(ptx)}) generated by CUDA "
                      f"{s.torch_cuda}, which this driver (CUDA {s.cuda_driver}) cannot JIT ('unsupported PTX "
                      f"version')", f"update the driver to one for CUDA {s.torch_cuda} or newer, or "
                                    f"{_install_hint(cap)} with SASS for {sm(cap)}")
    highest = max(code for _, code, _ in entries) if entries else None
    if highest is not None and highest < cap:
        listed = f"its arch list ends at sm_{_arch_number(highest)}"
    else:
        listed = f"its arch list is {' '.join(s.cuda_arch_list)}"
    specific = [e for e, parsed in zip(s.cuda_arch_list, map(_arch_entry, s.cuda_arch_list))
                if parsed and parsed[2] == "a" and parsed[1] <= cap]
    if specific:
        listed += f"; {', '.join(specific)} {'is' if len(specific) == 1 else 'are'} arch-specific and never runs " \
                  "on a later GPU"
    return Misfit("torch-arch", f"torch {s.torch} has no kernels for {sm(cap)} ({listed})", _install_hint(cap))


def rule_cudnn(s: Stack, t: Target) -> Misfit | None:
    if t.device != "cuda" or not s.torch_cuda or s.capability is None or s.cudnn:
        return None
    return Misfit("cudnn", f"torch {s.torch} reports no cuDNN (its convolutions would fall back to slow kernels)",
                  "install the torch CUDA wheel with its nvidia-cudnn dependency (cuDNN 9 for torch 2.4+)")


def rule_dtype_cpu(s: Stack, t: Target) -> Misfit | None:
    if t.device == "cpu" and t.dtype == "fp16":
        return Misfit("dtype-cpu", "fp16 on CPU: PyTorch's CPU kernels for half precision are incomplete/slow",
                      "use fp32 or bf16")
    return None


def rule_dtype_arch(s: Stack, t: Target) -> Misfit | None:
    if t.device != "cuda" or s.capability is None:
        return None
    cap, precision = s.capability, t.precision
    if precision == "bf16" and cap < (8, 0):
        return Misfit("dtype-arch", f"bf16 needs compute capability 8.0+, this GPU is {cap[0]}.{cap[1]}",
                      "use fp16 or fp32 here, or an Ampere (sm_80) or newer GPU")
    if precision == "fp8" and cap < (8, 9):
        return Misfit("dtype-arch", f"fp8 needs compute capability 8.9+ (Ada, Hopper, Blackwell), this GPU is "
                                    f"{cap[0]}.{cap[1]}", "use fp16/bf16 here, or an sm_89 or newer GPU")
    if precision == "fp4" and cap[0] not in (10, 12):
        return Misfit("dtype-arch", f"fp4 needs a Blackwell GPU (sm_100/sm_103/sm_120), this GPU is {sm(cap)}",
                      "use fp8/fp16 here, or a Blackwell GPU")
    return None


def rule_onnxruntime(s: Stack, t: Target) -> Misfit | None:
    if t.backend != "onnxruntime" or t.device != "cuda" or s.ort_version is None:
        return None
    name = f"{s.ort_package or 'onnxruntime'} {s.ort_version}"
    if "CUDAExecutionProvider" not in s.ort_providers:
        return Misfit("onnxruntime-cuda", f"{name} has no CUDAExecutionProvider (providers: "
                                          f"{', '.join(s.ort_providers) or 'none'})",
                      "pip uninstall onnxruntime and pip install onnxruntime-gpu")
    ort_major, driver, runtime = _major(s.ort_cuda), _major(s.cuda_driver), _major(s.torch_cuda)
    if ort_major is not None and driver is not None and ort_major > driver:
        return Misfit("onnxruntime-cuda", f"{name} was built with CUDA {s.ort_cuda}, the driver supports only "
                                          f"CUDA {s.cuda_driver}",
                      f"install an R{DRIVER_BRANCH.get(ort_major, '?')}+ driver, or onnxruntime-gpu for CUDA {driver}")
    if ort_major is not None and runtime is not None and ort_major != runtime:
        return Misfit("onnxruntime-cuda", f"{name} was built with CUDA {s.ort_cuda} but torch {s.torch} uses CUDA "
                                          f"{s.torch_cuda} (the CUDA EP needs CUDA/cuDNN libraries of its own major)",
                      f"install the onnxruntime-gpu build for CUDA {runtime}, or torch for CUDA {ort_major}")
    if t.variant == "trt-ep" and "TensorrtExecutionProvider" not in s.ort_providers:
        return Misfit("onnxruntime-cuda", f"{name} has no TensorrtExecutionProvider",
                      "install onnxruntime-gpu and the TensorRT libraries it was built against")
    return None


def rule_tensorrt_installed(s: Stack, t: Target) -> Misfit | None:
    if t.backend == "tensorrt" and not s.trt:
        return Misfit("tensorrt-installed", "tensorrt not installed",
                      "pip install tensorrt on the GPU runner (10.8 or newer for Blackwell)")
    return None


def rule_tensorrt_arch(s: Stack, t: Target) -> Misfit | None:
    if not t.uses_tensorrt or s.capability is None or not s.trt:
        return None
    version, cap = _parse(s.trt), s.capability
    if version is None:
        return None
    needed = TRT_MIN_FOR_ARCH.get(cap)
    if needed and version < Version(needed):
        return Misfit("tensorrt-arch", f"TensorRT {s.trt} does not support {sm(cap)} (Blackwell needs TensorRT "
                                       f"{needed}+)", f"pip install 'tensorrt>={needed}'")
    if cap < (7, 5) and version >= Version(TRT_VOLTA_REMOVED):
        return Misfit("tensorrt-arch", f"TensorRT {s.trt} dropped {sm(cap)} (Volta support ended with 10.4)",
                      "use TensorRT 10.4 or older, or a Turing (sm_75) or newer GPU")
    if t.precision == "fp4" and version < Version(TRT_MIN_FP4):
        return Misfit("tensorrt-arch", f"fp4 engines need TensorRT {TRT_MIN_FP4}+, this is {s.trt}",
                      f"pip install 'tensorrt>={TRT_MIN_FP4}'")
    driver = _major(s.cuda_driver)
    if s.trt_cuda_major and driver is not None and s.trt_cuda_major > driver:
        return Misfit("tensorrt-arch", f"TensorRT {s.trt} is the CUDA {s.trt_cuda_major} build, the driver "
                                       f"supports CUDA {s.cuda_driver}",
                      f"install tensorrt-cu{driver} or an R{DRIVER_BRANCH.get(s.trt_cuda_major, '?')}+ driver")
    return None


def rule_triton_arch(s: Stack, t: Target) -> Misfit | None:
    if t.backend != "torch_compile" or t.device != "cuda" or s.capability is None:
        return None
    if not s.triton:
        return Misfit("triton-arch", "triton not installed (torch.compile generates its CUDA kernels with it)",
                      "install the triton release that matches torch (pip install torch pulls it in)")
    needed, version = TRITON_MIN_FOR_ARCH.get(s.capability), _parse(s.triton)
    if needed and version is not None and version.release < Version(needed).release:
        return Misfit("triton-arch", f"triton {s.triton} cannot compile kernels for {sm(s.capability)} (needs "
                                     f"triton {needed}+)",
                      f"install a torch release that ships triton {needed} or newer (torch 2.7 ships 3.3)")
    return None


def rule_diffusers_pipeline(s: Stack, t: Target) -> Misfit | None:
    version = _parse(s.diffusers)
    if version is None:
        return None
    needed = PIPELINE_MIN_DIFFUSERS.get(t.pipeline or "")
    if needed and version < Version(needed):
        return Misfit("diffusers-pipeline", f"diffusers {s.diffusers} has no {t.pipeline} (added in {needed})",
                      f"pip install 'diffusers>={needed}'")
    if t.model in MODEL_MIN_DIFFUSERS:
        needed, what = MODEL_MIN_DIFFUSERS[t.model]
        if version < Version(needed):
            return Misfit("diffusers-pipeline", f"diffusers {s.diffusers} cannot load {what}",
                          f"pip install 'diffusers>={needed}'")
    return None


@dataclass(frozen=True)
class Rule:
    name: str
    check: Callable[[Stack, Target], Misfit | None]
    summary: str
    sources: tuple[str, ...] = field(default_factory=tuple)


# Bottom of the stack first: the device, the driver, torch's kernels, libraries, dtypes, backends, the pipeline.
RULES: tuple[Rule, ...] = (
    Rule("cuda-device", rule_cuda_device, "a CUDA case needs a CUDA device visible to torch", (SRC_TORCH_INSTALL,)),
    Rule("driver-cuda", rule_driver_cuda, "driver's CUDA major >= torch's CUDA major (minor-version compatibility)",
         (SRC_MINOR_VERSION,)),
    Rule("torch-arch", rule_torch_arch, "torch has SASS for this sm (same major, minor <=), or plain PTX <= this sm "
         "that the driver can JIT (driver CUDA >= torch CUDA); 'a' variants never leave their arch",
         (SRC_CUBIN_PTX, SRC_ARCH_SPECIFIC, SRC_PTX_TOOLCHAIN, SRC_TORCH_BUILDS, SRC_TORCH_CC)),
    Rule("cudnn", rule_cudnn, "a CUDA torch reports a cuDNN", (SRC_ORT_CUDA,)),
    Rule("dtype-cpu", rule_dtype_cpu, "no fp16 on CPU", (SRC_PROJECT,)),
    Rule("dtype-arch", rule_dtype_arch, "bf16 sm_80+, fp8 sm_89+, fp4 Blackwell", (SRC_TE_MATRIX, SRC_TRT_108)),
    Rule("onnxruntime-cuda", rule_onnxruntime, "onnxruntime-gpu with the CUDA EP; its CUDA major <= the driver's "
         "and == torch's; the TensorRT EP present for trt-ep", (SRC_ORT_CUDA,)),
    Rule("tensorrt-installed", rule_tensorrt_installed, "TensorRT installed", (SRC_TRT_108,)),
    Rule("tensorrt-arch", rule_tensorrt_arch, "Blackwell sm_100/sm_120 need TensorRT 10.8+, sm_103 10.13+; fp4 "
         "10.8+; Volta dropped in 10.5; TensorRT's CUDA major <= the driver's",
         (SRC_TRT_108, SRC_TRT_104, SRC_TRT_GB300)),
    Rule("triton-arch", rule_triton_arch, "torch.compile on Blackwell needs triton 3.3+ (3.6+ for sm_121)",
         (SRC_TORCH_27, SRC_TRITON_SM121)),
    Rule("diffusers-pipeline", rule_diffusers_pipeline, "diffusers has the pipeline class (SD3 0.29.0, Flux 0.30.0, "
         "SD3.5 0.31.0)", (SRC_DIFFUSERS.format(version="0.29.0"), SRC_DIFFUSERS.format(version="0.30.0"),
                           SRC_DIFFUSERS.format(version="0.31.0"), SRC_SD35)),
)
RULES_BY_NAME = {rule.name: rule for rule in RULES}


def _unknowns(s: Stack, t: Target) -> tuple[str, ...]:
    notes = []
    if t.device == "cuda" and s.capability is not None and s.cuda_driver is None:
        notes.append("driver CUDA version unknown (install nvidia-ml-py): driver and PTX-JIT rules not checked")
    return tuple(notes)


def check(stack: Stack, target: Target) -> Verdict:
    """Every rule against the facts; all misfits are reported, so one round of fixes covers the whole stack."""
    misfits = []
    for rule in RULES:
        misfit = rule.check(stack, target)
        if misfit is not None:
            misfits.append(misfit)
    return Verdict(tuple(misfits), _unknowns(stack, target))


def target_for(case, device: str, kind: str | None = None) -> Target:
    """The target of a Case (harness.cases) on `device`; `kind` is the model kind (sd, sdxl, sd3, flux)."""
    return Target(case.backend, case.variant, device, case.dtype, PIPELINE_OF_KIND.get(kind or ""), case.model)


def backend_listing(stack: Stack, backend: str) -> list[str]:
    """Lines for `diffbench backends`: the verdict of the backend's default variant in fp32 on the CPU and on CUDA
    here, plus the GPU dtypes whose verdict differs when this machine's GPU is in the facts."""
    lines = [f"cpu: {check(stack, Target(backend, '', 'cpu', 'fp32'))}"]
    on_gpu = check(stack, Target(backend, "", "cuda", "fp32"))
    lines.append(f"cuda: {on_gpu}")
    if stack.capability is not None:
        for dtype in ("fp16", "bf16"):
            other = check(stack, Target(backend, "", "cuda", dtype))
            if other.reason != on_gpu.reason:
                lines.append(f"cuda {dtype}: {other}")
    lines.extend(f"cuda: note: {note}" for note in on_gpu.notes)
    return lines


# -- run-time failures ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Failure:
    status: str
    error_class: str
    reason: str


@dataclass(frozen=True)
class ErrorPattern:
    error_class: str
    pattern: re.Pattern
    rules: tuple[str, ...]                        # the preflight rules that explain this failure
    fallback: Callable[[Stack, Target], Misfit]   # the wording when no rule explains it from the recorded facts


def _sm_text(s: Stack) -> str:
    return sm(s.capability) if s.capability else "this GPU"


def _no_kernel(s: Stack, t: Target) -> Misfit:
    if t.backend == "onnxruntime":
        return Misfit("torch-arch", f"{s.ort_package or 'onnxruntime'} {s.ort_version} has no CUDA kernels for "
                                    f"{_sm_text(s)}", f"install an onnxruntime-gpu build compiled for {_sm_text(s)}")
    return Misfit("torch-arch", f"a CUDA library in this stack has no kernels for {_sm_text(s)} (torch's arch list "
                                f"covers it)", f"upgrade the extension or library that launched the kernel to a "
                                               f"build that includes {_sm_text(s)}")


def _ptx_toolchain(s: Stack, t: Target) -> Misfit:
    driver = f"the driver (CUDA {s.cuda_driver})" if s.cuda_driver else "the driver"
    return Misfit("torch-arch", f"PTX in this stack was generated by a newer CUDA toolkit than {driver} can JIT",
                  "update the NVIDIA driver, or use builds with SASS for " + _sm_text(s))


def _driver_old(s: Stack, t: Target) -> Misfit:
    return Misfit("driver-cuda", f"{_driver_text(s)} is older than the CUDA runtime of torch {s.torch} "
                                 f"(CUDA {s.torch_cuda})",
                  "update the driver, or install a torch build for the driver's CUDA version")


def _ptxas_arch(s: Stack, t: Target) -> Misfit:
    return Misfit("triton-arch", f"the ptxas bundled with triton {s.triton} does not know {_sm_text(s)}",
                  "install a torch release whose triton supports this GPU, or point TRITON_PTXAS_PATH at a newer "
                  "CUDA toolkit's ptxas")


def _trt_gpu(s: Stack, t: Target) -> Misfit:
    return Misfit("tensorrt-arch", f"TensorRT {s.trt} does not support {_sm_text(s)}",
                  "install a TensorRT release whose support matrix lists this GPU")


def _cudnn(s: Stack, t: Target) -> Misfit:
    return Misfit("cudnn", f"cuDNN {s.cudnn} has no engine for this operation on {_sm_text(s)} in {t.dtype}",
                  "upgrade torch (and its nvidia-cudnn wheel), or run in another dtype")


def _cublas(s: Stack, t: Target) -> Misfit:
    return Misfit("dtype-arch", f"cuBLAS has no {t.dtype} GEMM for {_sm_text(s)}",
                  "use fp16 or fp32 on this GPU, or upgrade torch (and its cuBLAS)")


def _engine_build(s: Stack, t: Target) -> Misfit:
    return Misfit("tensorrt-arch", f"TensorRT {s.trt} could not build the engine",
                  "read the builder log in info.traceback; try the static variant or another TensorRT release")


# First match wins: the TensorRT GPU refusal before the generic engine-build failure.
ERROR_PATTERNS: tuple[ErrorPattern, ...] = (
    ErrorPattern("NoKernelImage", re.compile(r"no kernel image is available for execution on the device|"
                                             r"cudaErrorNoKernelImageForDevice", re.I), ("torch-arch",), _no_kernel),
    ErrorPattern("UnsupportedPTX", re.compile(r"PTX was compiled with an unsupported toolchain|unsupported PTX "
                                              r"version|cudaErrorUnsupportedPtxVersion", re.I),
                 ("torch-arch", "driver-cuda"), _ptx_toolchain),
    ErrorPattern("DriverTooOld", re.compile(r"NVIDIA driver on your system is too old|driver version is "
                                            r"insufficient for CUDA runtime version|cudaErrorInsufficientDriver",
                                            re.I), ("driver-cuda",), _driver_old),
    ErrorPattern("PTXASUnknownArch", re.compile(r"Value 'sm_\w+' is not defined for option 'gpu-name'", re.I),
                 ("triton-arch",), _ptxas_arch),
    ErrorPattern("TensorRTUnsupportedGPU", re.compile(r"Target GPU SM \d+ is not supported by this TensorRT release|"
                                                      r"Unsupported SM", re.I), ("tensorrt-arch",), _trt_gpu),
    ErrorPattern("CuDNNNotSupported", re.compile(r"CUDNN_STATUS_NOT_SUPPORTED|CUDNN_STATUS_ARCH_MISMATCH", re.I),
                 ("cudnn", "dtype-arch"), _cudnn),
    ErrorPattern("CuBLASNotSupported", re.compile(r"CUBLAS_STATUS_NOT_SUPPORTED|CUBLAS_STATUS_ARCH_MISMATCH", re.I),
                 ("dtype-arch",), _cublas),
    ErrorPattern("EngineBuildError", re.compile(r"^EngineBuildError:|IBuilder::buildSerializedNetwork", re.M),
                 ("tensorrt-arch", "dtype-arch"), _engine_build),
)


def _exception_text(exc: BaseException) -> str:
    """The messages of the exception and the ones it was raised from (inductor wraps triton's ptxas error)."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def classify_failure(error: BaseException | str, stack: Stack, target: Target) -> Failure | None:
    """A run-time failure that is a known incompatibility -> the preflight's wording and an error class, or None."""
    text = error if isinstance(error, str) else _exception_text(error)
    for known in ERROR_PATTERNS:
        match = known.pattern.search(text)
        if not match:
            continue
        misfits = [m for m in (RULES_BY_NAME[r].check(stack, target) for r in known.rules) if m is not None]
        reason = "; ".join(m.text for m in misfits or [known.fallback(stack, target)])
        line = next((ln.strip() for ln in text.splitlines() if known.pattern.search(ln)), match.group(0))
        return Failure("failed", known.error_class, f"{reason} [{line[:240]}]")
    return None
