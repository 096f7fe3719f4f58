"""`diffbench backends --stack`: any GPU stack judged without its GPU, by the code path a run uses; and the rules an
API review of onnxruntime-gpu 1.31.1 / TensorRT 11 found missing (each test cites its source)."""
import dataclasses
import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch

from backends import base as registry
from backends.base import Backend, Support
from backends.onnx.export import OPSET
from backends.onnxruntime import BF16_GRAPH_REASON, OnnxRuntimeBackend, trt_ep_options
from backends.tensorrt import build_settings
from harness.cli import main
from harness.judge import preflight, stacks
from harness.judge.facts import Stack, Target
from harness.judge.failures import classify_failure
from harness.judge.preflight import check
from harness.measure import device as devinfo
from harness.selection.cases import Case

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "stacks"

H100 = dict(gpu_name="NVIDIA H100 80GB HBM3", capability=(9, 0), torch="2.13.0+cu130", torch_cuda="13.0",
            cudnn="9.15.1", cuda_arch_list=("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"),
            driver="580.82.09", cuda_driver="13.0", diffusers="0.42.1")
PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
# onnxruntime-gpu 1.31.1 from PyPI: build_and_package_info.cuda_version "13.0"; its TensorRT provider library's
# NEEDED entries (readelf -d onnxruntime/capi/libonnxruntime_providers_tensorrt.so) hold libnvinfer.so.10
ORT_1311 = dict(ort_package="onnxruntime-gpu", ort_version="1.31.1", ort_cuda="13.0", ort_providers=PROVIDERS,
                ort_trt_needs="libnvinfer.so.10")
TRT_114 = dict(trt="11.4.0.106", trt_cuda_major=13)      # what `tensorrt>=10` resolves to since TensorRT 11
TRT_1016 = dict(trt="10.16.1.11", trt_cuda_major=13)     # the `tensorrt` metapackage 10.16.1.11 -> tensorrt_cu13


def row(rows, backend, variant, device, dtype) -> dict:
    return next(r for r in rows if (r["backend"], r["variant"], r["device"], r["dtype"]) == (backend, variant,
                                                                                               device, dtype))


# -- example stacks, judged by support_of ----------------------------------------------------------------------------
# (file, backend, variant, device, dtype) -> None (supported) or a part of the reason
EXPECTED = {
    "h100-sm90.json": [("onnxruntime", "trt-ep", "cuda", "fp16", None), ("tensorrt", "", "cuda", "bf16", None),
                       ("torch_compile", "", "cuda", "bf16", None), ("onnxruntime", "", "cuda", "fp16", None),
                       ("onnxruntime", "", "cuda", "bf16", "opset 22")],
    "l4-sm89.json": [("onnxruntime", "trt-ep", "cuda", "fp16",
                      "onnxruntime-gpu 1.23.0's TensorRT EP needs libnvinfer.so.10; TensorRT 11.4.0.106 is installed"),
                     ("tensorrt", "", "cuda", "fp16", None), ("tensorrt", "fp8", "cuda", "fp16", "Q/DQ")],
    "t4-sm75.json": [("diffusers", "", "cuda", "bf16", "bf16 needs compute capability 8.0+, this GPU is 7.5"),
                     ("diffusers", "", "cuda", "fp16", None), ("tensorrt", "", "cuda", "fp16", None),
                     ("onnxruntime", "trt-ep", "cuda", "bf16", "has no trt_bf16_enable option")],
    "rtx-pro-6000-sm120.json": [
        ("diffusers", "", "cuda", "fp16", "supports CUDA 12.9, but torch 2.11.0+cu130 was built with CUDA 13.0"),
        ("onnxruntime", "", "cuda", "fp16", "onnxruntime-gpu 1.22.0 was built with CUDA 12.2 but torch"),
        ("tensorrt", "", "cuda", "fp16", "TensorRT 10.7.0 does not support sm_120")],
    "b200-sm100.json": [("tensorrt", "", "cuda", "fp16", None), ("tensorrt", "", "cuda", "bf16", None),
                        ("tensorrt", "tf32", "cuda", "fp32", None), ("torch_compile", "", "cuda", "bf16", None),
                        ("onnxruntime", "trt-ep", "cuda", "fp16", "needs libnvinfer.so.10; TensorRT 11.4.0.106")],
    "gb300-sm103.json": [("diffusers", "", "cuda", "bf16", None),
                         ("onnxruntime", "", "cuda", "fp16", "has no CUDAExecutionProvider"),
                         ("tensorrt", "", "cuda", "fp16", "TensorRT 10.12.0.36 does not support sm_103")],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_example_stack_is_judged(name):
    path = EXAMPLES / name
    rows = stacks.judge(stacks.load_env(path), described_by=str(path))
    assert len(rows) == len(stacks.backend_specs()) * len(stacks.DEVICES) * len(stacks.DTYPES)
    assert all(r["supported"] != bool(r["reason"]) for r in rows)      # every "unsupported" says why
    for backend, variant, device, dtype, reason in EXPECTED[name]:
        verdict = row(rows, backend, variant, device, dtype)
        if reason is None:
            assert verdict["supported"], (backend, variant, dtype, verdict["reason"])
        else:
            assert not verdict["supported"] and reason in verdict["reason"], (backend, variant, dtype, verdict)


def test_example_stacks_cover_the_six_gpus():
    capabilities = {json.loads(p.read_text())["env"]["gpu"]["capability"] for p in EXAMPLES.glob("*.json")}
    assert capabilities == {"9.0", "8.9", "7.5", "12.0", "10.0", "10.3"} and set(EXPECTED) == {
        p.name for p in EXAMPLES.glob("*.json")}


class _Quantised(Backend):
    """A backend another change could add, with an option this module has never heard of."""
    name = "quantised"
    options = ("qscheme",)

    def support(self, case, env):
        return Support.no(f"asked about {case.variant or 'plain'} on {env['device']}")


def test_every_backend_and_option_comes_from_the_registry_and_its_support():
    registry.register("quantised", _Quantised)
    try:
        rows = stacks.judge(stacks.load_env(EXAMPLES / "h100-sm90.json"), described_by="h100")
    finally:
        registry.unregister("quantised")
    expected = {(name, option) for name in registry.names() for option in ("", *registry.get(name).options)}
    assert {(r["backend"], r["variant"]) for r in rows} == expected | {("quantised", ""), ("quantised", "qscheme")}
    assert row(rows, "quantised", "qscheme", "cuda", "fp16")["reason"] == "asked about qscheme on cuda"


def _cli(*argv) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["backends", *argv])
    return code, out.getvalue()


def test_cli_json_is_one_document_and_reads_records_files_and_dumped_stacks(tmp_path, capsys):
    code, text = _cli("--stack", str(EXAMPLES / "b200-sm100.json"), "--json")
    rows = json.loads(text)                               # the whole of stdout is one JSON document
    assert code == 0 and all(set(r) == {"backend", "variant", "device", "dtype", "supported", "reason"} for r in rows)
    assert not row(rows, "onnxruntime", "trt-ep", "cuda", "fp16")["supported"]
    # a records file: the stack its first record ran on (here a record of the first schema: no `stack` yet)
    code, text = _cli("--stack", str(ROOT / "tests" / "fixtures" / "records-v1.jsonl"), "--json")
    rows = json.loads(text)
    assert code == 0 and row(rows, "diffusers", "", "cpu", "fp32")["supported"]
    assert "no CUDA device" in row(rows, "diffusers", "", "cuda", "fp32")["reason"]
    # this machine's stack, dumped without a benchmark and judged back
    code, text = _cli("--dump-stack", str(tmp_path / "here.json"))
    assert code == 0 and "stack" in stacks.load_env(tmp_path / "here.json")
    code, text = _cli("--stack", str(tmp_path / "here.json"), "--model", "tiny-sd3")
    assert code == 0 and text.startswith("stack: ") and "onnxruntime+trt-ep" in text
    # bad input: one line, exit 2
    (tmp_path / "other.json").write_text('{"runs": []}')
    for bad in (tmp_path / "missing.json", tmp_path / "other.json"):
        capsys.readouterr()
        assert main(["backends", "--stack", str(bad)]) == 2
        assert capsys.readouterr().err.count("\n") == 1


# -- rule 1: onnxruntime + bf16 cannot load a text-to-image graph -----------------------------------------------------
def test_onnx_conv_takes_bfloat16_only_from_opset_22():
    """The ONNX operator spec (onnx/defs/nn/defs.cc, as the installed onnx reports it): Conv and
    InstanceNormalization gained tensor(bfloat16) in their opset-22 versions; the exports are opset 17 and 18."""
    def bf16(op, opset):
        schema = onnx.defs.get_schema(op, opset)
        return any("bfloat16" in t for c in schema.type_constraints for t in c.allowed_type_strs)
    for op in ("Conv", "InstanceNormalization"):
        assert not bf16(op, OPSET["legacy"]) and not bf16(op, OPSET["dynamo"]) and bf16(op, 22)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # the legacy exporter is the one the exports use
def test_a_bf16_export_does_not_load_in_onnxruntime(tmp_path):
    """The failure itself, on the CPU: session creation validates the graph before any provider sees it."""
    conv = torch.nn.Conv2d(4, 4, 3, padding=1).to(torch.bfloat16)
    path = tmp_path / "conv.onnx"
    torch.onnx.export(conv, (torch.zeros(1, 4, 8, 8, dtype=torch.bfloat16),), str(path), input_names=["latent"],
                      opset_version=OPSET["legacy"], dynamo=False)
    with pytest.raises(Exception, match=r"INVALID_GRAPH.*tensor\(bfloat16\).*\(Conv\)"):
        onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnxruntime_refuses_bf16_text_to_image_on_every_device():
    env = {"device": "cuda", "stack": {"onnxruntime": {"providers": list(PROVIDERS)}}}
    backend = OnnxRuntimeBackend()
    for variant in ("", "trt-ep"):
        refused = backend.support(Case("tiny-sd", "onnxruntime", variant, dtype="bf16"), env)
        assert not refused and refused.reason == BF16_GRAPH_REASON
    assert backend.support(Case("tiny-sd", "onnxruntime", dtype="fp16"), env)
    embedding = backend.support(Case.embedding("minilm", "onnxruntime", dtype="bf16"), env)
    assert embedding.reason != BF16_GRAPH_REASON          # no Conv in a text encoder


# -- rule 2: the TensorRT EP's libnvinfer major against the installed TensorRT -----------------------------------------
def test_trt_ep_needs_the_libnvinfer_major_it_links():
    eleven = check(Stack(**H100, **ORT_1311, **TRT_114), Target("onnxruntime", "trt-ep", "cuda", "fp16"))
    assert eleven.rules == ("onnxruntime-tensorrt",)
    assert eleven.reason.startswith("onnxruntime-gpu 1.31.1's TensorRT EP needs libnvinfer.so.10; TensorRT "
                                    "11.4.0.106 is installed: pip install 'tensorrt>=10,<11'")
    assert check(Stack(**H100, **ORT_1311, **TRT_1016), Target("onnxruntime", "trt-ep", "cuda", "fp16"))
    # plain tensorrt does not go through onnxruntime
    assert check(Stack(**H100, **ORT_1311, **TRT_114), Target("tensorrt", "", "cuda", "fp16"))


def test_trt_major_from_the_release_table_when_the_library_was_not_recorded():
    """The ORT TensorRT EP requirements table (1.15-1.17: TensorRT 8.6, 1.18-1.22: 10.x) and the NEEDED entries of
    the 1.23.0 and 1.31.1 wheels (libnvinfer.so.10)."""
    unrecorded = dict(ORT_1311, ort_trt_needs=None)
    for version, major in (("1.17.3", 8), ("1.22.0", 10), ("1.31.1", 10), ("1.40.0", None)):
        assert preflight.ort_trt_major(Stack(**dict(unrecorded, ort_version=version))) == major
    old = check(Stack(**H100, **dict(unrecorded, ort_version="1.17.3"), **TRT_1016),
                Target("onnxruntime", "trt-ep", "cuda", "fp16"))
    assert "needs libnvinfer.so.8; TensorRT 10.16.1.11 is installed" in old.reason
    newer = check(Stack(**H100, **dict(unrecorded, ort_version="1.40.0"), **TRT_114),
                  Target("onnxruntime", "trt-ep", "cuda", "fp16"))
    assert newer and any("onnxruntime-tensorrt not checked" in n for n in newer.notes)


def test_the_needed_libnvinfer_is_read_from_the_provider_library():
    shared = Path(onnxruntime.__file__).parent / "capi" / "libonnxruntime_providers_shared.so"
    assert devinfo.needed_library(shared, "libstdc++.so.") == "libstdc++.so.6"    # readelf -d of the same file
    assert devinfo.needed_library(shared, "libnvinfer.so.") is None
    assert devinfo.needed_library(Path(onnxruntime.__file__), "libc.") is None     # not ELF
    facts = devinfo.onnxruntime_facts()
    assert "tensorrt_ep_needs" in facts and facts["tensorrt_ep_needs"] is None      # the CPU package has no TRT EP
    assert Stack.from_env({"stack": {"onnxruntime": {"tensorrt_ep_needs": "libnvinfer.so.10"}}}).ort_trt_needs == \
        "libnvinfer.so.10"


def test_a_trt_ep_that_did_not_load_is_classified():
    message = ("ExecutionProviderError: ONNX Runtime session for unet runs on CUDAExecutionProvider, "
               "CPUExecutionProvider although the case is on cuda: TensorrtExecutionProvider did not load (check the "
               "onnxruntime-gpu install and its CUDA/cuDNN libraries)")
    failure = classify_failure(message, Stack(**H100, **ORT_1311, **TRT_114), Target("onnxruntime", "trt-ep"))
    assert failure.error_class == "TensorRTEPNotLoaded"
    assert failure.reason.startswith("onnxruntime-gpu 1.31.1's TensorRT EP needs libnvinfer.so.10")


# -- rule 3: options, not whole variant strings ----------------------------------------------------------------------
def test_rules_match_options_inside_combined_variants():
    t4 = Stack(**dict(H100, gpu_name="Tesla T4", capability=(7, 5)), **ORT_1311, **TRT_1016)
    assert "dtype-arch" in check(t4, Target("tensorrt", "static+fp8", "cuda", "fp16")).rules
    assert "cuda-device" in check(t4, Target("onnxruntime", "trt-ep+tf32", "cpu", "fp32")).rules
    assert "onnxruntime-tensorrt" in check(Stack(**H100, **ORT_1311, **TRT_114),
                                           Target("onnxruntime", "trt-ep+tf32", "cuda", "fp32")).rules
    no_trt_ep = Stack(**H100, **dict(ORT_1311, ort_providers=PROVIDERS[1:]), **TRT_1016)
    assert "onnxruntime-cuda" in check(no_trt_ep, Target("onnxruntime", "trt-ep+tf32", "cuda", "fp32")).rules


# -- rule 4: trt_bf16_enable only for bf16, and only where the release knows it --------------------------------------
def test_trt_bf16_enable_only_for_bf16(monkeypatch, tmp_path):
    """onnxruntime-gpu 1.22.0's libonnxruntime_providers_tensorrt.so has no "trt_bf16_enable" string and its option
    parser fails on unknown keys ("Unknown provider option"); 1.23.0's has it (microsoft/onnxruntime#24743)."""
    assert "trt_bf16_enable" not in trt_ep_options("fp16", tmp_path) and trt_ep_options("bf16", tmp_path)[
        "trt_bf16_enable"]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    trt, _ = OnnxRuntimeBackend().providers(Case("tiny-sd", "onnxruntime", "trt-ep+tf32"), "cuda", tmp_path)
    assert trt[0] == "TensorrtExecutionProvider" and "trt_bf16_enable" not in trt[1]
    old = Stack(**H100, **dict(ORT_1311, ort_version="1.22.0", ort_trt_needs=None), **TRT_1016)
    assert check(old, Target("onnxruntime", "trt-ep", "cuda", "fp16"))
    refused = check(old, Target("onnxruntime", "trt-ep", "cuda", "bf16"))
    assert refused.reason == ("onnxruntime-gpu 1.22.0's TensorRT EP has no trt_bf16_enable option (added in 1.23.0; "
                              "older releases reject the key): pip install 'onnxruntime-gpu>=1.23'")
    assert check(dataclasses.replace(old, ort_version="1.23.0"), Target("onnxruntime", "trt-ep", "cuda", "bf16"))


# -- rule 5: TensorRT 11 -----------------------------------------------------------------------------------------------
def test_tensorrt_11_builds_strongly_typed_engines_with_flags_it_still_has():
    """TensorRT 11 removed BuilderFlag FP16, BF16, INT8, FP8, INT4, FP4, OBEY/PREFER_PRECISION_CONSTRAINTS and the
    INT8 calibrator; STRONGLY_TYPED is kept (ignored: always on) and TF32 stays (preflight.SRC_TRT11)."""
    removed = {"FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
               "PREFER_PRECISION_CONSTRAINTS", "EXPLICIT_BATCH"}
    for precision in ("fp32", "fp16", "bf16"):
        for tf32 in (False, True):
            settings = build_settings(precision, tf32, "11.4.0.106")
            assert settings["network_flags"] == ["STRONGLY_TYPED"]
            assert not removed & {*settings["set_flags"], *settings["clear_flags"]}


def test_plain_tensorrt_runs_on_tensorrt_11_and_jetson_has_no_tensorrt_11():
    env = stacks.load_env(EXAMPLES / "b200-sm100.json")
    for dtype in ("fp16", "bf16"):
        case = Case("tiny-sd", "tensorrt", dtype=dtype)
        assert preflight.check(Stack.from_env(env), preflight.target_for(case, "cuda", "sd"))
    orin = Stack(**dict(H100, gpu_name="Jetson AGX Orin", capability=(8, 7), cuda_arch_list=("sm_87",)), **TRT_114)
    jetson = check(orin, Target("tensorrt", "", "cuda", "fp16"))
    assert jetson.rules == ("tensorrt-major",) and "TensorRT 11 does not support JetPack" in jetson.reason
    assert check(dataclasses.replace(orin, trt="10.16.1.11"), Target("tensorrt", "", "cuda", "fp16"))
