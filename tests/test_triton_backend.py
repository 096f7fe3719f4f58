"""TritonBackend end to end on the tiny models: a real server serving torch components, executors in the real
diffusers pipeline, parity against the eager reference through the lead's runner. One server for the module."""
import os
import signal

import pytest
import torch

from backends import base
from backends.onnx.executors import DenoiserExecutor
from backends.triton import server as srv
from backends.triton.server import TritonServerError
from harness import models
from harness.selection.cases import Case

pytestmark = pytest.mark.skipif(bool(srv.missing_reason()), reason=srv.missing_reason() or "ok")


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    from harness.measure.run_options import RunOptions
    from harness.measure.session import Session
    s = Session(tmp_path_factory.mktemp("results"), RunOptions(warmup=0, repeats=2, save_images=False))
    yield s
    s.close()   # close_all() -> TritonBackend.close() stops the server


@pytest.mark.parametrize("variant", ["http", "grpc"])
def test_runner_case_passes_parity(session, variant):
    record = session.result(Case("tiny-sd", "triton", variant))
    assert record.status == "passed", (record.reason, record.info.get("traceback"))
    assert record.parity["verdict"] == "pass"
    assert record.parity["components"]["unet"]["max_abs"] < 1e-4
    assert {"repository", "server_start", "model_load"} <= set(record.build)
    info = record.info["triton"]
    assert info["protocol"] == variant and info["served"] == {"unet": "tiny-sd_fp32_unet_denoiser"}
    assert info["instances"] == {"unet": 1}
    assert info["threads"]["model_threads"] == info["threads"]["process_cores"] == len(os.sched_getaffinity(0))
    assert record.stages["denoise_step"]["n"] > 0
    # the server and its python-backend stubs are child processes: the case's memory counts them
    inference = record.memory["inference"]
    assert inference["children_mb"] > 50, inference
    assert record.memory["peak_mb"] >= inference["rss_mb"] + 50


def test_one_server_per_session(session):
    backend = base.get("triton")
    assert backend.server is not None and backend.server.alive()
    first = session.records["tiny-sd/triton+http/fp32/b1/64x64/s4"]
    second = session.records["tiny-sd/triton+grpc/fp32/b1/64x64/s4"]
    assert first.build["server_start"] > second.build["server_start"]   # reused: no second start
    assert second.build["model_load"] < first.build["model_load"]       # already loaded


def test_every_sd3_component_served_with_torch(session):
    """Both CLIP encoders (with hidden states), T5, the transformer and the VAE served as torch models, with the
    same interface as their ONNX exports."""
    record = session.result(Case("tiny-sd3", "triton", "grpc-all"))
    assert record.status == "passed", (record.reason, record.info.get("traceback"))
    components = record.parity["components"]
    assert set(components) == {"text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"}
    assert all(c["passed"] for c in components.values())


def test_a_case_of_another_backend_counts_no_triton_memory(session):
    """The shared server is the triton cases' alone: a diffusers case measured after them in the same process
    counts none of it (left out, sampled apart); a triton case counts the server and the stubs of its own models,
    not those of models earlier cases loaded."""
    session.result(Case("tiny-sd", "triton", "http"))          # the server is up, tiny-sd's denoiser loaded
    sd3 = session.result(Case("tiny-sd3", "triton", "grpc-all"))
    record = session.result(Case("tiny-sd", "diffusers"))
    assert record.status == "passed", record.reason
    for phase in ("load", "build", "inference"):
        figures = record.memory[phase]
        assert figures["children_mb"] < 20 and figures["left_out_mb"] > 50, (phase, figures)
        assert figures["left_out"] == ["tritonserver shared by the triton cases"]
    assert record.memory["peak_mb"] < record.memory["inference"]["rss_mb"] + 20
    own, other = sd3.memory["inference"]["children_mb"], sd3.memory["inference"]["left_out_mb"]
    assert own > 50 and other > 50, sd3.memory["inference"]     # its five stubs; tiny-sd's denoiser stub


def test_executor_contract(session):
    backend = base.get("triton")
    model = models.load("tiny-sd", "fp32")
    original = model.pipeline.unet
    prepared = backend.prepare(model, Case("tiny-sd", "triton", "http"), models.cache_root())
    try:
        unet = prepared.pipeline.unet
        assert isinstance(unet, DenoiserExecutor) and isinstance(unet, torch.nn.Module)
        assert unet.config is original.config and unet.dtype == torch.float32 and unet.device.type == "cpu"
        sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        text = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
        t = torch.tensor(500.0)                                # 0-d, as the pipeline passes it
        got = unet(sample, t, encoder_hidden_states=text, return_dict=False)
        assert isinstance(got, tuple) and got[0].shape == sample.shape
        with torch.inference_mode():
            want = original(sample, t, encoder_hidden_states=text).sample
        assert torch.allclose(got[0], want, atol=1e-5)
        assert torch.allclose(unet(sample, t, encoder_hidden_states=text).sample, want, atol=1e-5)
        with pytest.raises(NotImplementedError, match="timestep_cond"):
            unet(sample, t, encoder_hidden_states=text, timestep_cond=torch.zeros(2, 4))
        # the stand-in holds no weights of its own, yet answers structural reads from a weightless copy
        assert sum(p.numel() for p in unet.parameters()) == 0
        assert unet.conv_in.in_channels == 4 and unet.conv_in.weight.device.type == "meta"
    finally:
        prepared.close()


def test_dead_server_raises_with_log_tail(session):
    backend = base.get("triton")
    model = models.load("tiny-sd", "fp32")
    prepared = backend.prepare(model, Case("tiny-sd", "triton", "http"), models.cache_root())
    try:
        os.killpg(backend.server.proc.pid, signal.SIGKILL)
        backend.server.proc.wait(10)
        with pytest.raises(TritonServerError) as info:
            prepared.pipeline(**models.pipeline_inputs(model, Case("tiny-sd", "triton", "http")))
    finally:
        prepared.close()
    message = str(info.value)
    assert "tritonserver is gone" in message and "log tail" in message
    backend.close()
    assert backend.server is None


def test_onnx_variant_serves_every_component(session):
    """tiny-sd3: both CLIP encoders (with hidden states), T5, the transformer and the VAE as ONNX graphs run by
    ONNX Runtime in the python backend, backends.onnx's executors calling Triton."""
    record = session.result(Case("tiny-sd3", "triton", "grpc-onnx"))
    assert record.status == "passed", (record.reason, record.info.get("traceback"))
    components = record.parity["components"]
    assert set(components) == {"text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"}
    assert all(c["passed"] for c in components.values())
    assert record.info["triton"]["backend"] == "python (onnxruntime CPU)"
    assert record.info["triton"]["threads"]["ort_spinning"] is False
    assert "export" in record.build
    config = (base.get("triton").repository / record.info["triton"]["served"]["transformer"] / "config.pbtxt")
    assert 'key: "allow_spinning"\n  value: { string_value: "0" }' in config.read_text()
