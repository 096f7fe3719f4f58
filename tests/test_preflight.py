"""The compatibility preflight: the rules against the real arch lists and versions of well-known builds and GPUs
(on CPU: the rules are pure functions of recorded facts), the run-time classification of real error texts, and the
wiring into support_of / run_case / `diffbench backends`."""
import io
from contextlib import redirect_stdout

import pytest
import torch

from backends import base as registry
from backends.base import Backend
from harness.cli import main
from harness.judge import facts, preflight
from harness.judge.facts import Stack, Target
from harness.judge.failures import classify_failure
from harness.judge.preflight import check, support_of
from harness.measure import device as devinfo
from harness.measure.run_options import RunOptions
from harness.measure.session import Session
from harness.selection.cases import Case

# -- real builds: torch version, its CUDA runtime, torch.cuda.get_arch_list() ----------------------------------------
# pytorch/builder release/2.5 manywheel/build_cuda.sh: TORCH_CUDA_ARCH_LIST="5.0;6.0;7.0;7.5;8.0;8.6" plus "9.0" for
# CUDA 12.4 (the "9.0+PTX" of pytorch/builder#1932 was reverted for the release, fa48aaf5); the same list appears in
# torch's own warning on RTX 50 GPUs, e.g. FlyMyAI/flymyai-lora-trainer#47: "supports CUDA capabilities sm_50 sm_60
# sm_70 sm_75 sm_80 sm_86 sm_90".
CU124 = dict(torch="2.5.1+cu124", torch_cuda="12.4", cudnn="9.1.0",
             cuda_arch_list=("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"))
# The 2.4/2.5 nightlies built with "9.0+PTX" (pytorch/builder#1932) carry PTX for compute_90 as well.
CU124_PTX = dict(CU124, torch="2.5.0.dev20240801+cu124", cuda_arch_list=CU124["cuda_arch_list"] + ("compute_90",))
# torch.cuda.get_arch_list() outputs quoted in pytorch/pytorch#182250.
CU126_211 = dict(torch="2.11.0+cu126", torch_cuda="12.6", cudnn="9.10.2",
                 cuda_arch_list=("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"))
CU128_210 = dict(torch="2.10.0+cu128", torch_cuda="12.8", cudnn="9.10.2",
                 cuda_arch_list=("sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"))
CU128_211 = dict(torch="2.11.0+cu128", torch_cuda="12.8", cudnn="9.10.2",
                 cuda_arch_list=("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"))
# PYTORCH_RELEASES_CODE_CC["13.0"]["x86_64"] in torch 2.13's torch/cuda/__init__.py (checked below against the
# installed torch): {75, 80, 86, 90, 100, 120}.
CU130 = dict(torch="2.13.0+cu130", torch_cuda="13.0", cudnn="9.15.1",
             cuda_arch_list=("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"))

# -- real GPUs: name, compute capability (https://developer.nvidia.com/cuda-gpus) -------------------------------------
RTX_PRO_6000 = dict(gpu_name="NVIDIA RTX PRO 6000 Blackwell Workstation Edition", capability=(12, 0))
B200 = dict(gpu_name="NVIDIA B200", capability=(10, 0))
B300 = dict(gpu_name="NVIDIA B300", capability=(10, 3))
DGX_SPARK = dict(gpu_name="NVIDIA GB10", capability=(12, 1))
H100 = dict(gpu_name="NVIDIA H100 80GB HBM3", capability=(9, 0))
RTX_4090 = dict(gpu_name="NVIDIA GeForce RTX 4090", capability=(8, 9))
A100 = dict(gpu_name="NVIDIA A100-SXM4-80GB", capability=(8, 0))
T4 = dict(gpu_name="Tesla T4", capability=(7, 5))
V100 = dict(gpu_name="Tesla V100-SXM2-16GB", capability=(7, 0))

# drivers and the CUDA version each supports, as nvidia-smi printed them: Frogging-Family/nvidia-all#212 (550.40.07,
# 12.4), livepeer/ai-runner#679 (575.57.08, 12.9), aikitoria/open-gpu-kernel-modules#5 (580.82.09, 13.0), the
# TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF discussion #26 on Hugging Face (535.129.03, 12.2), lllyasviel/Fooocus#1313
# (470.86, 11.4)
DRIVER_550 = dict(driver="550.40.07", cuda_driver="12.4")
DRIVER_575 = dict(driver="575.57.08", cuda_driver="12.9")
DRIVER_580 = dict(driver="580.82.09", cuda_driver="13.0")
DRIVER_535 = dict(driver="535.129.03", cuda_driver="12.2")
DRIVER_470 = dict(driver="470.86", cuda_driver="11.4")

def stack(*parts, **extra) -> Stack:
    facts = {"diffusers": "0.42.1"}
    for part in parts:
        facts.update(part)
    facts.update(extra)
    return Stack(**facts)


def rules_of(verdict) -> set[str]:
    return set(verdict.rules)


# -- torch's kernels against the GPU ---------------------------------------------------------------------------------
def test_cu124_has_no_kernels_for_blackwell_and_says_what_would():
    verdict = check(stack(CU124, RTX_PRO_6000, DRIVER_575), Target("diffusers", dtype="bf16"))
    assert not verdict
    assert ("torch 2.5.1+cu124 has no kernels for sm_120 (its arch list ends at sm_90): install a cu128 or newer "
            "build") in verdict.reason
    assert str(verdict).startswith("unsupported: ")
    assert not check(stack(CU124, B200, DRIVER_575), Target("diffusers"))


@pytest.mark.parametrize("gpu", [H100, A100, RTX_4090, T4, V100])
def test_cu124_runs_on_hopper_and_older(gpu):
    # sm_89 (RTX 4090) has no cubin of its own: the sm_86 cubin runs on it (same major, higher minor)
    assert check(stack(CU124, gpu, DRIVER_550), Target("diffusers")).supported


@pytest.mark.parametrize("build", [CU128_210, CU128_211, CU130])
@pytest.mark.parametrize("gpu", [RTX_PRO_6000, B200, B300, DGX_SPARK, H100, A100, RTX_4090, T4])
def test_cu128_and_cu130_builds_cover_blackwell(build, gpu):
    driver = DRIVER_580 if build is CU130 else DRIVER_575
    verdict = check(stack(build, gpu, driver), Target("diffusers"))
    assert verdict.supported, verdict.reason


def test_torch_211_cu128_dropped_volta():
    verdict = check(stack(CU128_211, V100, DRIVER_575), Target("diffusers"))
    assert verdict.rules == ("torch-arch",)
    assert "torch 2.11.0+cu128 has no kernels for sm_70 (its arch list is sm_75 sm_80" in verdict.reason
    assert verdict.reason.endswith("install a cu124 or cu126 build")
    assert check(stack(CU128_210, V100, DRIVER_575), Target("diffusers")).supported
    assert check(stack(CU126_211, V100, DRIVER_575), Target("diffusers")).supported


def test_cpu_build_has_no_cuda_device_on_this_machine():
    here = Stack.from_env(devinfo.fingerprint("cpu"))
    assert here.torch == torch.__version__ and here.cuda_arch_list == tuple(torch.cuda.get_arch_list())
    if torch.version.cuda is None:     # the CPU wheel of CI and of this repository's constraints
        assert here.cuda_arch_list == () and here.torch_cuda is None and here.capability is None
        verdict = check(here, Target("diffusers", device="cuda"))
        assert verdict.rules == ("cuda-device",)
        assert f"no CUDA device: torch {torch.__version__} is a CPU-only build" in verdict.reason
    assert check(here, Target("diffusers", device="cpu")).supported


def test_cpu_build_on_a_machine_whose_driver_sees_a_blackwell_gpu():
    facts = stack(torch="2.13.0+cpu", nvml="ok", nvml_gpus=(("NVIDIA GeForce RTX 5090", (12, 0)),), **DRIVER_575)
    verdict = check(facts, Target("diffusers", device="cuda"))
    assert "torch 2.13.0+cpu is a CPU-only build and the driver sees NVIDIA GeForce RTX 5090 (sm_120)" in verdict.reason
    assert "install a cu128 or newer build of torch" in verdict.reason


# -- PTX: forward JIT, arch-specific variants, the driver --------------------------------------------------------------
def test_binary_and_ptx_compatibility_follow_nvidias_rules():
    # the examples of the Blackwell compatibility guide, section 1.2
    assert preflight.sass_runs_on((8, 0), "", (8, 6))
    assert not preflight.sass_runs_on((8, 6), "", (8, 0))
    assert not preflight.sass_runs_on((8, 6), "", (9, 0))
    assert preflight.ptx_jits_on((9, 0), "", (12, 0))          # plain PTX JITs forward to any newer arch
    assert not preflight.ptx_jits_on((12, 0), "", (10, 0))
    assert not preflight.sass_runs_on((10, 0), "a", (10, 3))    # 'a': only on exactly its arch
    assert preflight.sass_runs_on((10, 0), "", (10, 3))
    assert not preflight.ptx_jits_on((9, 0), "a", (10, 0))
    assert preflight.ptx_jits_on((10, 0), "a", (10, 0))
    assert preflight.sass_runs_on((10, 0), "f", (10, 3))        # 'f': the family, same major
    assert not preflight.sass_runs_on((10, 0), "f", (12, 0))
    assert not preflight.sass_runs_on((8, 0), "", (8, 7))       # an integrated GPU runs only its own cubins


def test_ptx_runs_on_blackwell_only_if_the_driver_can_jit_it():
    assert check(stack(CU124_PTX, RTX_PRO_6000, DRIVER_575), Target("diffusers")).supported
    # the 535 driver (CUDA 12.2) is older than the CUDA 12.4 that wrote the PTX
    verdict = check(stack(CU124_PTX, RTX_PRO_6000, DRIVER_535), Target("diffusers"))
    assert verdict.rules == ("torch-arch",)
    assert "only PTX (compute_90) generated by CUDA 12.4" in verdict.reason and "unsupported PTX" in verdict.reason
    assert "update the driver to one for CUDA 12.4 or newer" in verdict.reason


def test_arch_specific_builds_do_not_run_on_later_gpus():
    hopper_only = dict(torch="2.6.0+cu126", torch_cuda="12.6", cudnn="9.5.1", cuda_arch_list=("sm_90a", "compute_90a"))
    assert check(stack(hopper_only, H100, DRIVER_575), Target("diffusers")).supported
    verdict = check(stack(hopper_only, B200, DRIVER_575), Target("diffusers"))
    assert "sm_90a, compute_90a are arch-specific and never runs on a later GPU" in verdict.reason
    b200_only = dict(hopper_only, cuda_arch_list=("sm_100a",))
    assert check(stack(b200_only, B200, DRIVER_575), Target("diffusers")).supported
    assert not check(stack(b200_only, B300, DRIVER_575), Target("diffusers"))
    assert check(stack(dict(hopper_only, cuda_arch_list=("sm_100f",)), B300, DRIVER_575), Target("diffusers"))


# -- the driver against torch's CUDA runtime ----------------------------------------------------------------------
def test_driver_too_old_for_torchs_cuda_major():
    verdict = check(stack(CU130, H100, DRIVER_550), Target("diffusers"))
    assert verdict.rules == ("driver-cuda",)
    assert ("the NVIDIA driver 550.40.07 supports CUDA 12.4, but torch 2.13.0+cu130 was built with CUDA 13.0"
            in verdict.reason)
    assert "install an R580 or newer driver (CUDA 13.x), or a torch build for CUDA 12.x" in verdict.reason


def test_minor_version_compatibility_within_a_major():
    # a CUDA 12.8 runtime on a CUDA 12.4 driver: fine for SASS (minor-version compatibility)
    assert check(stack(CU128_211, H100, DRIVER_550), Target("diffusers")).supported


def test_unknown_driver_is_a_note_not_a_verdict():
    verdict = check(stack(CU128_211, H100), Target("diffusers"))
    assert verdict.supported and any("nvidia-ml-py" in note for note in verdict.notes)


def test_cuda_torch_without_cudnn():
    verdict = check(stack(CU128_211, H100, DRIVER_575, cudnn=None), Target("diffusers"))
    assert verdict.rules == ("cudnn",)


# -- dtypes against the arch ------------------------------------------------------------------------------------------
def test_bf16_on_t4_and_fp8_on_a100():
    bf16 = check(stack(CU124, T4, DRIVER_550), Target("diffusers", dtype="bf16"))
    assert bf16.reason.startswith("bf16 needs compute capability 8.0+, this GPU is 7.5")
    assert check(stack(CU124, A100, DRIVER_550), Target("diffusers", dtype="bf16")).supported
    fp8 = check(stack(CU124, A100, DRIVER_550, trt="10.7.0"), Target("tensorrt", "fp8", dtype="fp16"))
    assert fp8.rules == ("dtype-arch",) and "fp8 needs compute capability 8.9+" in fp8.reason
    assert check(stack(CU124, RTX_4090, DRIVER_550, trt="10.7.0"), Target("tensorrt", "fp8", dtype="fp16")).supported


def test_fp4_needs_blackwell():
    verdict = check(stack(CU128_211, H100, DRIVER_575, trt="10.8.0.43"), Target("tensorrt", "fp4", dtype="fp16"))
    assert verdict.rules == ("dtype-arch",) and "fp4 needs a Blackwell GPU" in verdict.reason
    assert check(stack(CU128_211, RTX_PRO_6000, DRIVER_575, trt="10.8.0.43"),
                 Target("tensorrt", "fp4", dtype="fp16")).supported


def test_fp16_on_cpu_keeps_its_reason():
    verdict = check(stack(torch="2.13.0+cpu"), Target("diffusers", device="cpu", dtype="fp16"))
    assert verdict.reason.startswith("fp16 on CPU: PyTorch's CPU kernels for half precision are incomplete/slow")


# -- TensorRT against the arch -----------------------------------------------------------------------------------------
def test_tensorrt_107_refuses_blackwell_108_builds_for_it():
    verdict = check(stack(CU128_211, RTX_PRO_6000, DRIVER_575, trt="10.7.0"), Target("tensorrt", dtype="fp16"))
    assert verdict.rules == ("tensorrt-arch",)
    assert "TensorRT 10.7.0 does not support sm_120 (Blackwell needs TensorRT 10.8+)" in verdict.reason
    assert check(stack(CU128_211, RTX_PRO_6000, DRIVER_575, trt="10.8.0.43"), Target("tensorrt", dtype="fp16"))
    assert not check(stack(CU128_211, B300, DRIVER_575, trt="10.8.0.43"), Target("tensorrt", dtype="fp16"))
    assert check(stack(CU128_211, B300, DRIVER_575, trt="10.13.2.6"), Target("tensorrt", dtype="fp16"))


def test_tensorrt_dropped_volta_in_105_and_is_missing_here():
    assert not check(stack(CU126_211, V100, DRIVER_575, trt="10.5.0.18"), Target("tensorrt", dtype="fp16"))
    assert check(stack(CU126_211, V100, DRIVER_575, trt="10.4.0.26"), Target("tensorrt", dtype="fp16"))
    missing = check(stack(CU128_211, H100, DRIVER_575), Target("tensorrt", dtype="fp16"))
    assert missing.rules == ("tensorrt-installed",)


def test_tensorrt_cuda13_build_on_a_cuda12_driver():
    verdict = check(stack(CU128_211, H100, DRIVER_575, trt="10.13.2.6", trt_cuda_major=13),
                    Target("tensorrt", dtype="fp16"))
    assert verdict.rules == ("tensorrt-arch",) and "the CUDA 13 build" in verdict.reason


# -- onnxruntime -------------------------------------------------------------------------------------------------------
ORT_CPU = dict(ort_package="onnxruntime", ort_version="1.31.1", ort_providers=("AzureExecutionProvider",
                                                                                "CPUExecutionProvider"))
# the conda build onnxruntime-1.20.1-gpu_cuda124 (anaconda.org main channel) and the CUDA 13 nightly of
# microsoft/onnxruntime#27944 ("built with CUDA 13.1.1")
ORT_GPU_CU12 = dict(ort_package="onnxruntime-gpu", ort_version="1.20.1", ort_cuda="12.4",
                    ort_providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"))
ORT_GPU_CU13 = dict(ort_package="onnxruntime-gpu", ort_version="1.25.0.dev20260331005", ort_cuda="13.1",
                    ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"))


def test_onnxruntime_cpu_package_has_no_cuda_ep():
    verdict = check(stack(CU128_211, H100, DRIVER_575, ORT_CPU), Target("onnxruntime"))
    assert verdict.rules == ("onnxruntime-cuda",) and "pip install onnxruntime-gpu" in verdict.reason
    assert check(stack(CU128_211, H100, DRIVER_575, ORT_CPU), Target("onnxruntime", device="cpu")).supported


def test_onnxruntime_gpu_cuda_major_against_driver_and_torch():
    assert check(stack(CU128_211, H100, DRIVER_575, ORT_GPU_CU12), Target("onnxruntime")).supported
    too_new = check(stack(CU128_211, H100, DRIVER_575, ORT_GPU_CU13), Target("onnxruntime"))
    assert "built with CUDA 13.1, the driver supports only CUDA 12.9" in too_new.reason
    mixed = check(stack(CU130, H100, DRIVER_580, ORT_GPU_CU12), Target("onnxruntime"))
    assert "built with CUDA 12.4 but torch 2.13.0+cu130 uses CUDA 13.0" in mixed.reason
    no_trt = check(stack(CU130, H100, DRIVER_580, ORT_GPU_CU13), Target("onnxruntime", "trt-ep"))
    assert "no TensorrtExecutionProvider" in no_trt.reason


# -- torch.compile's triton --------------------------------------------------------------------------------------------
def test_triton_must_know_blackwell():
    # torch 2.6 shipped triton 3.2, torch 2.7 triton 3.3 (the first with Blackwell, pytorch.org/blog/pytorch-2-7)
    old = check(stack(CU128_211, RTX_PRO_6000, DRIVER_575, triton="3.2.0"), Target("torch_compile"))
    assert old.rules == ("triton-arch",) and "triton 3.2.0 cannot compile kernels for sm_120" in old.reason
    assert check(stack(CU128_211, RTX_PRO_6000, DRIVER_575, triton="3.3.0"), Target("torch_compile")).supported
    assert check(stack(CU128_211, RTX_PRO_6000, DRIVER_575, triton="3.2.0"), Target("diffusers")).supported
    spark = check(stack(CU130, DGX_SPARK, DRIVER_580, triton="3.5.0+git7416ffcb"), Target("torch_compile"))
    assert "needs triton 3.6+" in spark.reason


# -- diffusers against the pipeline class ------------------------------------------------------------------------------
@pytest.mark.parametrize("model, too_old, first", [("tiny-sd3", "0.28.2", "0.29.0"), ("flux-dev", "0.29.2", "0.30.0"),
                                                   ("sd35-large", "0.30.3", "0.31.0"), ("sdxl", "0.17.1", "0.18.0")])
def test_diffusers_release_that_brought_the_pipeline(model, too_old, first):
    from harness import models
    target = preflight.target_for(Case(model, "diffusers"), "cuda", models.spec(model).kind)
    verdict = check(stack(CU128_211, H100, DRIVER_575, diffusers=too_old), target)
    assert verdict.rules == ("diffusers-pipeline",) and f"pip install 'diffusers>={first}'" in verdict.reason
    assert check(stack(CU128_211, H100, DRIVER_575, diffusers=first), target).supported


def test_every_rule_cites_a_source():
    assert len({rule.name for rule in preflight.RULES}) == len(preflight.RULES)
    for rule in preflight.RULES:
        assert rule.sources and all(src.strip() for src in rule.sources), rule.name


def test_official_arch_table_matches_the_installed_torch():
    releases = torch.cuda.PYTORCH_RELEASES_CODE_CC       # torch 2.13's own table of its release builds
    for cuda, tag in (("12.6", "cu126"), ("12.9", "cu129"), ("13.0", "cu130")):
        assert set(facts.OFFICIAL_TORCH_ARCHS[tag]) == releases[cuda]["x86_64"], tag


# -- facts from env ----------------------------------------------------------------------------------------------------
def test_facts_from_this_machine_and_from_an_older_record():
    env = devinfo.fingerprint("cpu")
    facts = env["stack"]
    assert facts["torch"] == torch.__version__ and facts["diffusers"]
    assert env["gpu"] is None
    if not torch.cuda.is_available():
        assert facts["cuda_driver"] is None and facts["nvml_gpus"] == [] and facts["nvml"] in ("not installed",
                                                                                             "no driver")
    ort = facts["onnxruntime"]
    assert ort["version"] and "CPUExecutionProvider" in ort["providers"]
    old = {"device": "cuda", "gpu": {"name": "NVIDIA H100", "capability": "9.0", "cuda": "12.4", "driver": "550.40.07"},
           "versions": {"torch": "2.5.1+cu124", "diffusers": "0.30.0", "tensorrt": "10.7.0"}}
    s = Stack.from_env(old)
    assert (s.capability, s.torch, s.torch_cuda, s.trt, s.diffusers) == ((9, 0), "2.5.1+cu124", "12.4", "10.7.0",
                                                                           "0.30.0")


def test_stack_summary_names_what_the_verdicts_were_judged_against():
    line = stack(CU124, RTX_PRO_6000, DRIVER_575, ORT_GPU_CU12, trt="10.7.0", triton="3.1.0").summary()
    assert line == ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition (sm_120); driver 575.57.08 (CUDA 12.9); "
                    "torch 2.5.1+cu124 (CUDA 12.4, sm_50..sm_90); cuDNN 9.1.0; onnxruntime-gpu 1.20.1 (CUDA 12.4); "
                    "TensorRT 10.7.0; triton 3.1.0; diffusers 0.42.1")
    assert Stack.from_env(devinfo.fingerprint("cpu")).summary().startswith(f"torch {torch.__version__}")


def test_cudnn_version_text():
    assert devinfo.cudnn_version_text(90100) == "9.1.0"
    assert devinfo.cudnn_version_text(91002) == "9.10.2"
    assert devinfo.cudnn_version_text(8902) == "8.9.2"
    assert devinfo.cudnn_version_text(None) is None


# -- run-time failures, with the texts torch / onnxruntime / TensorRT / triton print -----------------------------------
TORCH_NO_KERNEL = ("CUDA error: no kernel image is available for execution on the device\n"
                   "CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace "
                   "below might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1\n"
                   "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n")
# RVC-Boss/GPT-SoVITS#2625 (RTX 5090, torch 2.8.0+cu128)
ORT_NO_KERNEL = ("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Slice node. "
                 "Name:'Slice_12' Status Message: CUDA error cudaErrorNoKernelImageForDevice:no kernel image is "
                 "available for execution on the device")
# cudaErrorUnsupportedPtxVersion as printed (NVIDIA/nvbandwidth#61)
PTX_TOOLCHAIN = "CUDA error: the provided PTX was compiled with an unsupported toolchain."
# DDTRobot/tita_rl_sim2sim2real#7 (RTX 5070 Ti, TensorRT 10.7)
TRT_SM120 = ("IBuilder::buildSerializedNetwork: Error Code 9: API Usage Error (Target GPU SM 120 is not supported "
             "by this TensorRT release.)")
# NVIDIA/TensorRT#2660 (a UNet engine, TensorRT 8.5)
TRT_NO_IMPL = ("[optimizer.cpp::computeCosts::3728] Error Code 10: Internal Error (Could not find any implementation "
               "for node {ForeignNode[onnx::MatMul_9665 + (Unnamed Layer* 387) [Shuffle]]}.)")
# triton-lang/triton#8539 (DGX Spark, torch 2.10.0.dev+cu130, pytorch-triton 3.5.0)
PTXAS_SM121 = ("PTXAS error: Internal Triton PTX codegen error\n`ptxas` stderr:\n"
               "ptxas fatal   : Value 'sm_121a' is not defined for option 'gpu-name'\n")
# opendatalab/MinerU#1508 (bf16 on a GPU without bf16 tensor cores)
CUBLAS_BF16 = ("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasGemmStridedBatchedEx(handle, opa, opb, "
               "(int)m, (int)n, (int)k, (void*)&falpha, a, CUDA_R_16BF, (int)lda, stridea, b, CUDA_R_16BF, (int)ldb, "
               "strideb, (void*)&fbeta, c, CUDA_R_16BF, (int)ldc, stridec, (int)num_batches, compute_type, "
               "CUBLAS_GEMM_DEFAULT_TENSOR_OP)`")
CUDNN_NOT_SUPPORTED = ("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
                       "non-contiguous input.")
DRIVER_TOO_OLD = ("The NVIDIA driver on your system is too old (found version 11040). Please update your GPU driver "
                  "by downloading and installing a new version from the URL: http://www.nvidia.com/Download/index.aspx"
                  " Alternatively, go to: https://pytorch.org to install a PyTorch version that has been compiled with "
                  "your version of the CUDA driver.")


def test_no_kernel_image_gets_the_preflight_wording():
    facts = stack(CU124, RTX_PRO_6000, DRIVER_575)
    failure = classify_failure(RuntimeError(TORCH_NO_KERNEL), facts, Target("diffusers"))
    expected = check(facts, Target("diffusers")).misfits[0].text
    assert (failure.status, failure.error_class) == ("failed", "NoKernelImage")
    assert failure.reason.startswith(expected)
    assert failure.reason.endswith("[RuntimeError: CUDA error: no kernel image is available for execution on the "
                                   "device]")


def test_no_kernel_image_from_onnxruntime_when_torch_covers_the_gpu():
    facts = stack(CU128_211, RTX_PRO_6000, DRIVER_575, ORT_GPU_CU12)
    failure = classify_failure(RuntimeError(ORT_NO_KERNEL), facts, Target("onnxruntime"))
    assert failure.error_class == "NoKernelImage"
    assert failure.reason.startswith("onnxruntime-gpu 1.20.1 has no CUDA kernels for sm_120: install an "
                                     "onnxruntime-gpu build compiled for sm_120")


def test_unsupported_ptx_and_old_driver():
    facts = stack(CU124_PTX, RTX_PRO_6000, DRIVER_535)
    failure = classify_failure(RuntimeError(PTX_TOOLCHAIN), facts, Target("diffusers"))
    assert failure.error_class == "UnsupportedPTX" and "cannot JIT" in failure.reason
    old = classify_failure(RuntimeError(DRIVER_TOO_OLD), stack(CU124, DRIVER_470), Target("diffusers"))
    assert old.error_class == "DriverTooOld"
    assert old.reason.startswith("the NVIDIA driver 470.86 supports CUDA 11.4, but torch 2.5.1+cu124 was built with "
                                 "CUDA 12.4")


def test_tensorrt_engine_build_errors():
    from backends.tensorrt import EngineBuildError
    facts = stack(CU128_211, RTX_PRO_6000, DRIVER_575, trt="10.7.0")
    refused = classify_failure(EngineBuildError(f"TensorRT engine build failed for unet (fp16): ERROR: {TRT_SM120}"),
                               facts, Target("tensorrt", dtype="fp16"))
    assert refused.error_class == "TensorRTUnsupportedGPU"
    assert refused.reason.startswith("TensorRT 10.7.0 does not support sm_120 (Blackwell needs TensorRT 10.8+): "
                                     "pip install 'tensorrt>=10.8'")
    other = classify_failure(EngineBuildError(f"TensorRT engine build failed for unet (fp16): ERROR: {TRT_NO_IMPL}"),
                             stack(CU128_211, H100, DRIVER_575, trt="10.8.0.43"), Target("tensorrt", dtype="fp16"))
    assert (other.status, other.error_class) == ("failed", "EngineBuildError")
    assert other.reason.startswith("TensorRT 10.8.0.43 could not build the engine")


def test_ptxas_error_wrapped_by_inductor():
    class PTXASError(RuntimeError):
        pass
    try:
        try:
            raise PTXASError(PTXAS_SM121)
        except PTXASError as inner:
            raise RuntimeError("backend='inductor' raised: compilation failed") from inner
    except RuntimeError as exc:
        wrapped = exc
    facts = stack(CU130, DGX_SPARK, DRIVER_580, triton="3.5.0+git7416ffcb")
    failure = classify_failure(wrapped, facts, Target("torch_compile"))
    assert failure.error_class == "PTXASUnknownArch" and "needs triton 3.6+" in failure.reason
    assert "ptxas fatal   : Value 'sm_121a' is not defined" in failure.reason


def test_cublas_and_cudnn_not_supported():
    cublas = classify_failure(RuntimeError(CUBLAS_BF16), stack(CU124, T4, DRIVER_550),
                              Target("diffusers", dtype="bf16"))
    assert cublas.error_class == "CuBLASNotSupported"
    assert cublas.reason.startswith("bf16 needs compute capability 8.0+, this GPU is 7.5")
    cudnn = classify_failure(RuntimeError(CUDNN_NOT_SUPPORTED), stack(CU128_211, RTX_PRO_6000, DRIVER_575),
                             Target("diffusers", dtype="fp16"))
    assert cudnn.error_class == "CuDNNNotSupported" and cudnn.reason.startswith("cuDNN 9.10.2 has no engine")


def test_other_failures_are_not_classified():
    assert classify_failure(RuntimeError("injected executor failure"), stack(CU128_211, H100), Target("x")) is None


# -- wiring ------------------------------------------------------------------------------------------------------------
def _gpu_env(**facts) -> dict:
    env = dict(devinfo.fingerprint("cpu"))
    env["device"] = "cuda"
    env["gpu"] = {"name": "Tesla T4", "capability": "7.5", "cuda": "12.4", "driver": "550.40.07"}
    env["stack"] = {**env["stack"], "torch": "2.5.1+cu124", "torch_cuda": "12.4", "cudnn": "9.1.0",
                    "cuda_arch_list": list(CU124["cuda_arch_list"]), "cuda_driver": "12.4", **facts}
    return env


def test_support_of_asks_the_preflight_first():
    bf16 = support_of(Case("tiny-sd", "diffusers", dtype="bf16"), _gpu_env())
    assert not bf16 and bf16.reason.startswith("bf16 needs compute capability 8.0+, this GPU is 7.5")
    sd3 = support_of(Case("tiny-sd3", "diffusers"), _gpu_env(diffusers="0.28.2"))
    assert not sd3 and "diffusers 0.28.2 has no StableDiffusion3Pipeline (added in 0.29.0)" in sd3.reason
    cpu = support_of(Case("tiny-sd", "diffusers", dtype="fp16"), devinfo.fingerprint("cpu"))
    assert not cpu and cpu.reason.startswith("fp16 on CPU")


class _NoKernelImageBackend(Backend):
    """Fails in prepare as torch does when a kernel of the stack has no image for the GPU."""
    name = "no-kernel-image"

    def prepare(self, model, case, cache):
        raise RuntimeError(TORCH_NO_KERNEL)


def test_run_case_records_a_classified_failure(tmp_path):
    registry.register("no-kernel-image", _NoKernelImageBackend)
    session = Session(tmp_path, RunOptions(warmup=0, repeats=1, save_images=False))
    session.reference = lambda case: None   # never read: prepare raises first (computing it costs ~9 s on 2 cores)
    try:
        record = session.result(Case("tiny-sd", "no-kernel-image", steps=2))
    finally:
        session.close()
        registry.unregister("no-kernel-image")
    assert (record.status, record.error_class) == ("failed", "NoKernelImage")
    assert record.reason.startswith("a CUDA library in this stack has no kernels for this GPU")
    assert "no kernel image is available" in record.reason and "Traceback" in record.info["traceback"]


def test_diffbench_backends_gives_each_backend_a_verdict_per_device():
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["backends"]) == 0
    text = out.getvalue()
    for name in registry.names():
        block = text.split(name, 1)[1]
        assert "\n" + " " * 15 + "cpu: " in block and "\n" + " " * 15 + "cuda: " in block, name
    if not torch.cuda.is_available():
        assert text.count("cuda: unsupported: no CUDA device") >= len(registry.names())
        assert "cpu: supported" in text.split("diffusers", 1)[1].split("\n")[1]
