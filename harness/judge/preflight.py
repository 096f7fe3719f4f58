"""Compatibility preflight: does the user's stack fit the GPU in hand, and if not, what would?

Checked before any model loads. The rules are a table (RULES) of pure functions of the facts
harness.measure.device records in `env` (a Stack, harness/judge/facts.py): no torch import, no GPU needed, so they
are unit-tested on CPU with the real arch lists and versions of well-known builds. One verdict per backend x device
x dtype (x pipeline class): `supported`, or `unsupported: <what does not fit>: <what would fit>` -- every misfit
found, joined with "; ". support_of() is what a run asks for every case: the model rules, these rules, then the
backend's own answer. Failures at run time are classified in harness/judge/failures.py.

Every rule names its public source; docs/compatibility.md lists them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from packaging.version import Version

from backends import base as registry
from harness import models
from harness.judge.facts import (DRIVER_BRANCH, INTEGRATED, Misfit, MODEL_MIN_DIFFUSERS, ORT_TRT_BF16, ORT_TRT_MAJOR,
                                 PIPELINE_MIN_DIFFUSERS, PIPELINE_OF_KIND, SRC_ARCH_SPECIFIC, SRC_CUBIN_PTX,
                                 SRC_DIFFUSERS, SRC_MINOR_VERSION, SRC_ORT_CUDA, SRC_ORT_TRT, SRC_ORT_TRT_BF16,
                                 SRC_ORT_TRT_ELF, SRC_PROJECT, SRC_PTX_TOOLCHAIN, SRC_SD35, SRC_TE_MATRIX, SRC_TORCH_27,
                                 SRC_TORCH_BUILDS, SRC_TORCH_CC, SRC_TORCH_INSTALL, SRC_TRITON_SM121, SRC_TRT11,
                                 SRC_TRT11_JETPACK, SRC_TRT_104, SRC_TRT_108, SRC_TRT_GB300, Stack, Target,
                                 TRITON_MIN_FOR_ARCH, TRT_MIN_FOR_ARCH, TRT_MIN_FP4, TRT_STRONGLY_TYPED_ONLY,
                                 TRT_VOLTA_REMOVED, Verdict, arch_entry, arch_number, install_hint, major_version,
                                 parse_version, ptx_jits_on, sass_runs_on, sm)
from harness.selection.cases import Case


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
        hint = f"{install_hint(s.nvml_gpus[0][1])} of torch" if s.nvml_gpus else \
            "on a machine with an NVIDIA GPU, install a CUDA build of torch (cu128 or newer for Blackwell)"
        return Misfit("cuda-device", f"no CUDA device: torch {s.torch} is a CPU-only build and {where}", hint)
    if seen:
        return Misfit("cuda-device", f"torch {s.torch} sees no CUDA device although the driver sees {seen}",
                      "check CUDA_VISIBLE_DEVICES and that the driver supports torch's CUDA runtime")
    return Misfit("cuda-device", f"no CUDA device visible to torch {s.torch}",
                  "check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES")


def driver_text(s: Stack) -> str:
    return f"the NVIDIA driver {s.driver}" if s.driver else "the NVIDIA driver"


def rule_driver_cuda(s: Stack, t: Target) -> Misfit | None:
    runtime, driver = major_version(s.torch_cuda), major_version(s.cuda_driver)
    if not t.needs_cuda or runtime is None or driver is None or driver >= runtime:
        return None
    branch = DRIVER_BRANCH.get(runtime)
    need = f"an R{branch} or newer driver (CUDA {runtime}.x)" if branch else f"a driver for CUDA {runtime}.x"
    return Misfit("driver-cuda",
                  f"{driver_text(s)} supports CUDA {s.cuda_driver}, but torch {s.torch} was built with CUDA "
                  f"{s.torch_cuda} (minor-version compatibility holds only within one CUDA major)",
                  f"install {need}, or a torch build for CUDA {driver}.x")


def rule_torch_arch(s: Stack, t: Target) -> Misfit | None:
    if not t.needs_cuda or s.capability is None or not s.torch_cuda or not s.cuda_arch_list:
        return None
    cap = s.capability
    entries = [e for e in map(arch_entry, s.cuda_arch_list) if e]
    if any(kind == "sm" and sass_runs_on(code, suffix, cap) for kind, code, suffix in entries):
        return None
    ptx = [f"compute_{arch_number(code)}{suffix}" for kind, code, suffix in entries
           if kind == "compute" and ptx_jits_on(code, suffix, cap)]
    if ptx:
        runtime, driver = parse_version(s.torch_cuda), parse_version(s.cuda_driver)
        if runtime is None or driver is None or driver >= runtime:
            return None
        return Misfit("torch-arch",
                      f"torch {s.torch} has no SASS for {sm(cap)}, only PTX ({', '.join(ptx)}) generated by CUDA "
                      f"{s.torch_cuda}, which this driver (CUDA {s.cuda_driver}) cannot JIT ('unsupported PTX "
                      f"version')", f"update the driver to one for CUDA {s.torch_cuda} or newer, or "
                                    f"{install_hint(cap)} with SASS for {sm(cap)}")
    highest = max(code for _, code, _ in entries) if entries else None
    if highest is not None and highest < cap:
        listed = f"its arch list ends at sm_{arch_number(highest)}"
    else:
        listed = f"its arch list is {' '.join(s.cuda_arch_list)}"
    specific = [e for e, parsed in zip(s.cuda_arch_list, map(arch_entry, s.cuda_arch_list))
                if parsed and parsed[2] == "a" and parsed[1] <= cap]
    if specific:
        listed += f"; {', '.join(specific)} {'is' if len(specific) == 1 else 'are'} arch-specific and never runs " \
                  "on a later GPU"
    return Misfit("torch-arch", f"torch {s.torch} has no kernels for {sm(cap)} ({listed})", install_hint(cap))


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
    ort_major, driver, runtime = major_version(s.ort_cuda), major_version(s.cuda_driver), major_version(s.torch_cuda)
    if ort_major is not None and driver is not None and ort_major > driver:
        return Misfit("onnxruntime-cuda", f"{name} was built with CUDA {s.ort_cuda}, the driver supports only "
                                          f"CUDA {s.cuda_driver}",
                      f"install an R{DRIVER_BRANCH.get(ort_major, '?')}+ driver, or onnxruntime-gpu for CUDA {driver}")
    if ort_major is not None and runtime is not None and ort_major != runtime:
        return Misfit("onnxruntime-cuda", f"{name} was built with CUDA {s.ort_cuda} but torch {s.torch} uses CUDA "
                                          f"{s.torch_cuda} (the CUDA EP needs CUDA/cuDNN libraries of its own major)",
                      f"install the onnxruntime-gpu build for CUDA {runtime}, or torch for CUDA {ort_major}")
    if t.trt_ep and "TensorrtExecutionProvider" not in s.ort_providers:
        return Misfit("onnxruntime-cuda", f"{name} has no TensorrtExecutionProvider",
                      "install onnxruntime-gpu and the TensorRT libraries it was built against")
    return None


def ort_trt_major(s: Stack) -> int | None:
    """The libnvinfer major onnxruntime's TensorRT EP links: read from its library where the stack recorded it,
    else from the release table (ORT_TRT_MAJOR); None when neither knows."""
    if s.ort_trt_needs:
        return major_version(s.ort_trt_needs.rpartition(".so.")[2])
    version = parse_version(s.ort_version)
    if version is None:
        return None
    release = Version(f"{version.major}.{version.minor}")
    return next((major for (first, before), major in ORT_TRT_MAJOR if Version(first) <= release < Version(before)),
                None)


def rule_onnxruntime_tensorrt(s: Stack, t: Target) -> Misfit | None:
    """The TensorRT EP loads the libnvinfer major it was linked against, and knows only the options of its
    release: a TensorRT of another major fails every session (ORT logs the missing library and the session falls
    back, which names CUDA/cuDNN), and trt_bf16_enable before 1.23 is an unknown key."""
    if not t.trt_ep or t.device != "cuda" or "TensorrtExecutionProvider" not in s.ort_providers:
        return None
    name = f"{s.ort_package or 'onnxruntime'} {s.ort_version}"
    needs, installed = ort_trt_major(s), major_version(s.trt)
    if needs is not None and installed is not None and needs != installed:
        return Misfit("onnxruntime-tensorrt",
                      f"{name}'s TensorRT EP needs libnvinfer.so.{needs}; TensorRT {s.trt} is installed",
                      f"pip install 'tensorrt>={needs},<{needs + 1}' beside it (or an onnxruntime-gpu built against "
                      f"TensorRT {installed})")
    version = parse_version(s.ort_version)
    if t.dtype == "bf16" and version is not None and version < Version(ORT_TRT_BF16):
        return Misfit("onnxruntime-tensorrt", f"{name}'s TensorRT EP has no trt_bf16_enable option (added in "
                                              f"{ORT_TRT_BF16}.0; older releases reject the key)",
                      f"pip install 'onnxruntime-gpu>={ORT_TRT_BF16}'")
    return None


def rule_tensorrt_installed(s: Stack, t: Target) -> Misfit | None:
    if t.backend == "tensorrt" and not s.trt:
        return Misfit("tensorrt-installed", "tensorrt not installed",
                      "pip install tensorrt on the GPU runner (10.8 or newer for Blackwell)")
    return None


def rule_tensorrt_arch(s: Stack, t: Target) -> Misfit | None:
    if not t.uses_tensorrt or s.capability is None or not s.trt:
        return None
    version, cap = parse_version(s.trt), s.capability
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
    driver = major_version(s.cuda_driver)
    if s.trt_cuda_major and driver is not None and s.trt_cuda_major > driver:
        return Misfit("tensorrt-arch", f"TensorRT {s.trt} is the CUDA {s.trt_cuda_major} build, the driver "
                                       f"supports CUDA {s.cuda_driver}",
                      f"install tensorrt-cu{driver} or an R{DRIVER_BRANCH.get(s.trt_cuda_major, '?')}+ driver")
    return None


def rule_tensorrt_major(s: Stack, t: Target) -> Misfit | None:
    """TensorRT 11 is strongly typed only: the tensorrt backend (strongly typed since TensorRT 10) builds the
    same engines there; what differs by major is where TensorRT 11 is released at all (no JetPack)."""
    major = major_version(s.trt)
    if not t.uses_tensorrt or t.device != "cuda" or major is None or major < TRT_STRONGLY_TYPED_ONLY:
        return None
    if s.capability in INTEGRATED:
        return Misfit("tensorrt-major", f"TensorRT {s.trt} has no JetPack release ({sm(s.capability)} is a Jetson "
                                        "GPU; TensorRT 11 does not support JetPack)",
                      "use the TensorRT 10.x that JetPack ships (pip install 'tensorrt>=10,<11')")
    return None


def rule_triton_arch(s: Stack, t: Target) -> Misfit | None:
    if t.backend != "torch_compile" or t.device != "cuda" or s.capability is None:
        return None
    if not s.triton:
        return Misfit("triton-arch", "triton not installed (torch.compile generates its CUDA kernels with it)",
                      "install the triton release that matches torch (pip install torch pulls it in)")
    needed, version = TRITON_MIN_FOR_ARCH.get(s.capability), parse_version(s.triton)
    if needed and version is not None and version.release < Version(needed).release:
        return Misfit("triton-arch", f"triton {s.triton} cannot compile kernels for {sm(s.capability)} (needs "
                                     f"triton {needed}+)",
                      f"install a torch release that ships triton {needed} or newer (torch 2.7 ships 3.3)")
    return None


def rule_diffusers_pipeline(s: Stack, t: Target) -> Misfit | None:
    version = parse_version(s.diffusers)
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
    Rule("onnxruntime-tensorrt", rule_onnxruntime_tensorrt, "trt-ep: the installed TensorRT is the libnvinfer major "
         "onnxruntime-gpu's TensorRT EP links (10 for 1.18-1.31); bf16 needs onnxruntime-gpu 1.23+ (trt_bf16_enable)",
         (SRC_ORT_TRT, SRC_ORT_TRT_ELF, SRC_ORT_TRT_BF16)),
    Rule("tensorrt-installed", rule_tensorrt_installed, "TensorRT installed", (SRC_TRT_108,)),
    Rule("tensorrt-arch", rule_tensorrt_arch, "Blackwell sm_100/sm_120 need TensorRT 10.8+, sm_103 10.13+; fp4 "
         "10.8+; Volta dropped in 10.5; TensorRT's CUDA major <= the driver's",
         (SRC_TRT_108, SRC_TRT_104, SRC_TRT_GB300)),
    Rule("tensorrt-major", rule_tensorrt_major, "TensorRT 11 (strongly typed only) has no JetPack release",
         (SRC_TRT11, SRC_TRT11_JETPACK)),
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
    if t.trt_ep and t.device == "cuda" and s.ort_version and "TensorrtExecutionProvider" in s.ort_providers:
        if ort_trt_major(s) is None:
            notes.append(f"which libnvinfer onnxruntime-gpu {s.ort_version}'s TensorRT EP links is unknown (not "
                         "recorded, and newer than the release table): onnxruntime-tensorrt not checked")
        elif not s.trt:
            notes.append(f"tensorrt is not installed as a Python package: the TensorRT EP's libnvinfer.so."
                         f"{ort_trt_major(s)} must come from the system")
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
    """The target of a Case (harness.selection.cases) on `device`; `kind` is the model kind (sd, sdxl, sd3, flux)."""
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
def support_of(case: Case, env: dict) -> registry.Support:
    """Model-level rules first (cheap), then the stack-vs-GPU preflight (the rules above: why this stack does not
    fit this device, and what would), then the backend's own answer."""
    model_spec = models.spec(case.model)
    device = env["device"]
    if model_spec.full_size and device == "cpu":
        # named explicitly (the default matrix holds none): it runs, slowly, if its weights fit in RAM
        import psutil
        problem = models.cpu_memory_problem(case.model, case.dtype, psutil.virtual_memory().total)
        if problem:
            return registry.Support.no(problem)
    missing = model_spec.missing()
    if missing:
        return registry.Support.no(missing)
    verdict = check(Stack.from_env(env), target_for(case, device, model_spec.kind))
    if not verdict:
        return registry.Support.no(verdict.reason)
    return registry.get(case.backend).support(case, env)
