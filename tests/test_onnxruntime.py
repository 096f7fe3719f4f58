"""onnxruntime backend: support rules and options, session configuration (threads, spinning), IO binding (bf16),
provider checks, executor parity against eager (tiny-sd), export reuse, pipeline parity."""
import gc
import os
import weakref
from types import SimpleNamespace

import numpy as np
import onnxruntime
import pytest
import torch

from backends import onnxruntime as ortb
from backends.onnxruntime import OnnxRuntimeBackend
from harness.errors import UserError
from harness.models import load, pipeline_inputs
from harness.selection.cases import Case

CPU = {"device": "cpu"}


def test_support_rules():
    b = OnnxRuntimeBackend()
    assert b.support(Case("tiny-sd", "onnxruntime"), CPU)
    assert b.support(Case("tiny-sd", "onnxruntime", "dynamo"), CPU)
    fp16 = b.support(Case("tiny-sd", "onnxruntime", dtype="fp16"), CPU)
    assert not fp16 and "CPU EP" in fp16.reason
    trt = b.support(Case("tiny-sd", "onnxruntime", "trt-ep"), CPU)
    assert not trt and "CUDA GPU" in trt.reason
    assert "unknown variant" in b.support(Case("tiny-sd", "onnxruntime", "nope"), CPU).reason
    assert b.support(Case("tiny-sd", "onnxruntime", "spin"), CPU)
    tf32 = b.support(Case("tiny-sd", "onnxruntime", "tf32"), CPU)
    assert not tf32 and "CUDA math mode" in tf32.reason


def test_option_grammar():
    b = OnnxRuntimeBackend()
    assert b.canonical_variant("tf32+spin+dynamo") == "dynamo+spin+tf32"
    with pytest.raises(UserError, match="unknown variant option 'spinning'"):
        b.canonical_variant("spinning")


def test_trt_ep_fp32_needs_tf32_opt_in(monkeypatch):
    """ORT's TensorRT EP cannot clear TensorRT's TF32 flag: its fp32 is refused unless the case says +tf32."""
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    b, gpu = OnnxRuntimeBackend(), {"device": "cuda"}
    plain = b.support(Case("tiny-sd", "onnxruntime", "trt-ep"), gpu)
    assert not plain and "TF32" in plain.reason and "trt-ep+tf32" in plain.reason
    assert b.support(Case("tiny-sd", "onnxruntime", "trt-ep+tf32"), gpu)
    assert b.support(Case("tiny-sd", "onnxruntime", "trt-ep", dtype="fp16"), gpu)


def test_cuda_provider_options_tf32_off_by_default_and_own_stream(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    stream = SimpleNamespace(cuda_stream=140245)       # a CUDA stream's handle, as torch.cuda.Stream has it
    b = OnnxRuntimeBackend()
    (name, opts), = b.providers(Case("tiny-sd", "onnxruntime"), "cuda", tmp_path, stream)
    assert name == "CUDAExecutionProvider" and opts["use_tf32"] == 0 and opts["user_compute_stream"] == "140245"
    (_, opts), = b.providers(Case("tiny-sd", "onnxruntime", "tf32"), "cuda", tmp_path, stream)
    assert opts["use_tf32"] == 1
    trt, cuda = b.providers(Case("tiny-sd", "onnxruntime", "trt-ep+tf32", dtype="bf16"), "cuda", tmp_path, stream)
    assert trt[0] == "TensorrtExecutionProvider" and trt[1]["trt_bf16_enable"] and cuda[1]["use_tf32"] == 1
    assert b.providers(Case("tiny-sd", "onnxruntime"), "cpu", tmp_path) == ["CPUExecutionProvider"]
    assert OnnxRuntimeBackend.required_providers(Case("tiny-sd", "onnxruntime", "trt-ep"), "cuda") == \
        ["TensorrtExecutionProvider", "CUDAExecutionProvider"]


class _CudaSession:
    """onnxruntime.InferenceSession as OrtRunner uses it, for a CUDA session (no GPU here): it keeps the provider
    options it was made with."""

    def __init__(self, path, sess_options=None, providers=None):
        self.provider_options = dict(providers)

    def get_providers(self):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def get_inputs(self):
        return []

    get_outputs = get_inputs


@pytest.mark.parametrize("device,current", [("cuda:1", 0), ("cuda", 1)], ids=["named cuda:1", "current is 1"])
def test_the_session_and_its_io_binding_name_one_gpu(monkeypatch, tmp_path, device, current):
    """The CUDA EP computes on its `device_id` option (ONNX Runtime's CUDA EP docs: "device_id: the device ID",
    default 0), and IOBinding.bind_input/bind_output(name, device_type, device_id, ...) say on which device each
    buffer lives (ONNX Runtime Python API, IOBinding): both must be the GPU the tensors are on. The binding used
    `device.index or 0` and the session torch's current device: GPU 1 vs GPU 0."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(onnxruntime, "InferenceSession", _CudaSession)
    b, case = OnnxRuntimeBackend(), Case("tiny-sd", "onnxruntime")
    providers = b.providers(case, device, tmp_path)
    runner = ortb.OrtRunner(tmp_path / "unet.onnx", providers, ortb.session_options(), device, {},
                            required=b.required_providers(case, device))
    assert runner.session.provider_options["CUDAExecutionProvider"]["device_id"] == 1
    assert runner.device == torch.device("cuda", 1)          # what _bind gives bind_input/bind_output


def test_spinning_off_by_default_and_kept_with_spin():
    quiet, spinning = ortb.session_options(), ortb.session_options(spin=True)
    for key in ortb.SPINNING_KEYS:
        assert quiet.get_session_config_entry(key) == "0"
        with pytest.raises(RuntimeError):            # not set: ORT's own default (spinning) applies
            spinning.get_session_config_entry(key)
    assert ortb.describe_options(quiet)["intra_op_allow_spinning"] is False
    assert ortb.describe_options(spinning)["inter_op_allow_spinning"] is True
    assert quiet.intra_op_num_threads == torch.get_num_threads() and quiet.inter_op_num_threads == 1


def _bf16_graph(path):
    """x (bf16) -> cast to float -> x + x -> cast to bf16: a graph whose IO is bfloat16 and runs on the CPU EP."""
    import onnx
    from onnx import TensorProto, helper
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["xf", "xf"], ["yf"]),
             helper.make_node("Cast", ["yf"], ["y"], to=TensorProto.BFLOAT16)]
    graph = helper.make_graph(nodes, "double", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["n", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["n", 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def test_bf16_is_bound_as_bf16(tmp_path):
    """The element type IO binding gets for bf16 is bfloat16 itself (numpy has none: ONNX's enum is accepted);
    checked with a real session reading and writing torch's bf16 buffers in place."""
    from onnx import TensorProto
    assert ortb.element_type(torch.bfloat16) == TensorProto.BFLOAT16
    assert ortb.element_type(torch.float16) is np.float16 and ortb.element_type(torch.int64) is np.int64
    with pytest.raises(TypeError):
        ortb.element_type(torch.complex64)
    runner = ortb.OrtRunner(_bf16_graph(tmp_path / "double.onnx"), ["CPUExecutionProvider"],
                            ortb.session_options(), "cpu", {}, io_binding=True)
    x = torch.tensor([[1.5, -2.0, 3.25], [0.5, 8.0, -0.125]], dtype=torch.bfloat16)
    y, = runner({"x": x})
    assert y.dtype == torch.bfloat16 and torch.equal(y, x * 2)


def test_a_session_without_the_cuda_provider_is_refused(tmp_path):
    """A real CPU session stands in for a CUDA case whose CUDA EP failed to load: no silent CPU fallback."""
    with pytest.raises(ortb.ExecutionProviderError,
                       match="unet runs on CPUExecutionProvider although the case is on cuda: "
                             "CUDAExecutionProvider did not load"):
        ortb.OrtRunner(_bf16_graph(tmp_path / "double.onnx"), ["CPUExecutionProvider"], ortb.session_options(),
                       "cuda", {}, component="unet", required=["CUDAExecutionProvider"])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(eager model, ORT-prepared model, Prepared, cache folder) for tiny-sd."""
    cache = tmp_path_factory.mktemp("ort-cache")
    eager, model = load("tiny-sd", "fp32"), load("tiny-sd", "fp32")
    prepared = OnnxRuntimeBackend().prepare(model, Case("tiny-sd", "onnxruntime"), cache)
    return eager, model, prepared, cache


def test_executors_replace_the_components(pair):
    eager, model, prepared, _ = pair
    assert set(prepared.executors) == {"text_encoder", "unet", "vae"}
    for name, executor in prepared.executors.items():
        assert getattr(model.pipeline, name) is executor and isinstance(executor, torch.nn.Module)
        assert executor.config == getattr(eager.pipeline, name).config
        assert executor.dtype == torch.float32 and executor.device.type == "cpu"
    info = prepared.info
    assert info["exporter"] == "legacy" and info["providers"]["unet"] == ["CPUExecutionProvider"]
    assert info["session_options"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert info["session_options"]["intra_op_allow_spinning"] is False
    threads = info["threads"]
    assert threads["ort_intra_op_threads"] == threads["torch_threads"] == torch.get_num_threads()
    assert threads["ort_inter_op_threads"] == 1 and threads["ort_spinning"] is False
    assert threads["process_cores"] == len(os.sched_getaffinity(0))
    assert threads["oversubscribed"] == (torch.get_num_threads() > len(os.sched_getaffinity(0)))
    assert {"export", "session"} <= set(prepared.build)


def test_the_swapped_out_torch_weights_are_freed(pair):
    """weights_outside_torch: after prepare nothing holds the torch components, so the runner's emptying of torch's
    caching allocator gives their GPU memory back (else NVML counts it as ONNX Runtime's)."""
    _, _, prepared, cache = pair
    assert prepared.weights_outside_torch
    model = load("tiny-sd", "fp32")
    originals = [weakref.ref(getattr(model.pipeline, name)) for name in prepared.executors]
    OnnxRuntimeBackend().prepare(model, Case("tiny-sd", "onnxruntime"), cache)     # exports reused
    gc.collect()
    assert [ref() for ref in originals] == [None] * len(originals)


def test_text_encoder_parity(pair):
    eager, model, _, _ = pair
    ids = torch.randint(0, 1000, (2, 77))
    with torch.no_grad():
        ref = eager.pipeline.text_encoder(ids, output_hidden_states=True)
        out = model.pipeline.text_encoder(ids, output_hidden_states=True)
    assert type(out) is type(ref)
    assert (out[0] - ref[0]).abs().max() < 1e-5
    assert (out.pooler_output - ref.pooler_output).abs().max() < 1e-5
    assert (out.hidden_states[-2] - ref.hidden_states[-2]).abs().max() < 1e-5
    assert model.pipeline.text_encoder(ids).hidden_states is None


def test_unet_parity_with_0d_timestep_and_tuple_output(pair):
    eager, model, _, _ = pair
    torch.manual_seed(1)
    sample, ehs, t = torch.randn(2, 4, 9, 9), torch.randn(2, 77, 32), torch.tensor(981.0)
    with torch.no_grad():
        ref = eager.pipeline.unet(sample, t, encoder_hidden_states=ehs, return_dict=False)[0]
        out = model.pipeline.unet(sample, t, encoder_hidden_states=ehs, cross_attention_kwargs=None,
                                  return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == ref.shape
    assert (out[0] - ref).abs().max() < 1e-5


def test_vae_decode_parity(pair):
    eager, model, _, _ = pair
    z = torch.randn(1, 4, 8, 10)
    with torch.no_grad():
        ref = eager.pipeline.vae.decode(z, return_dict=False)[0]
        out = model.pipeline.vae.decode(z, return_dict=False, generator=None)
    assert isinstance(out, tuple) and out[0].shape == ref.shape == (1, 3, 64, 80)
    assert (out[0] - ref).abs().max() < 1e-5
    assert model.pipeline.vae.decode(z).sample.shape == ref.shape


def test_second_prepare_reuses_exports_and_corruption_is_noted(pair):
    _, _, _, cache = pair
    case = Case("tiny-sd", "onnxruntime")
    again = OnnxRuntimeBackend().prepare(load("tiny-sd", "fp32"), case, cache)
    assert all(again.info["export_reused"].values()) and "notes" not in again.info
    data = next((cache / "onnx" / "tiny-sd").glob("vae-*")) / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-10])
    third = OnnxRuntimeBackend().prepare(load("tiny-sd", "fp32"), case, cache)
    assert third.info["export_reused"] == {"text_encoder": True, "unet": True, "vae": False}
    assert third.info["notes"] == ["onnx export cache vae re-exported: model.onnx.data truncated "
                                   f"({data.stat().st_size - 10} of {data.stat().st_size} bytes)"]


@pytest.mark.parametrize("which,size", [("tiny-sd", 72), ("tiny-sd3", 96)])
def test_pipeline_image_parity(which, size, tmp_path):
    """Whole pipeline with ORT executors vs eager: same latents, same prompt; odd latent size for tiny-sd."""
    case = Case(which, "onnxruntime", height=size, width=size, steps=2)
    eager = load(which, "fp32")
    with torch.no_grad():
        ref = eager.pipeline(**pipeline_inputs(eager, case)).images
    model = load(which, "fp32")
    OnnxRuntimeBackend().prepare(model, case, tmp_path)
    with torch.no_grad():
        out = model.pipeline(**pipeline_inputs(model, case)).images
    mse = float(np.mean((out - ref) ** 2))
    assert out.shape == ref.shape == (1, size, size, 3)
    assert 10 * np.log10(1.0 / max(mse, 1e-20)) > 80
