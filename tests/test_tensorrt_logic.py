"""tensorrt backend logic that needs no TensorRT: precision/arch rules, profiles (T5 lengths included), builder
flags, cache keys, ONNX preparation, engine builds in their own process (with a stand-in builder: a real one needs
a GPU), name-based binding (with an engine stand-in that has the real API's method names)."""
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch

from backends import tensorrt as trtb
from harness.selection.cases import Case


def test_precision_rules():
    ok = trtb.precision_support
    assert ok("fp16", (7, 5), "10.0.1")
    assert not ok("bf16", (7, 5), "10.0.1") and "sm_75" in ok("bf16", (7, 5), "10.0.1").reason
    assert ok("bf16", (8, 0), "10.0.1") and not ok("bf16", (8, 0), "8.6.1")
    assert not ok("fp8", (8, 6), "10.3.0") and ok("fp8", (8, 9), "10.3.0") and ok("fp8", (9, 0), "10.3.0")
    assert not ok("fp8", (9, 0), "9.2.0")
    for cc in ((10, 0), (10, 3), (12, 0)):
        assert ok("fp4", cc, "10.8.0")
    assert not ok("fp4", (9, 0), "10.8.0") and "Blackwell" in ok("fp4", (9, 0), "10.8.0").reason
    assert not ok("fp4", (10, 0), "10.7.0")
    assert not ok("fp16", (6, 1), "10.0.0")
    assert not trtb.quantization_support("fp8") and trtb.quantization_support("fp16")
    assert trtb.precision_for(Case("m", "tensorrt", "fp8", "fp16")) == "fp8"
    assert trtb.precision_for(Case("m", "tensorrt", "static", "bf16")) == "bf16"


def _cases(*shapes):
    return [Case("sdxl", "tensorrt", "", "fp16", b, h, w) for b, h, w in shapes]


def test_axis_ranges_from_the_matrix():
    cases = _cases((1, 1024, 1024), (1, 1024, 1024), (4, 768, 1344))
    r = trtb.axis_ranges(cases, "sdxl", "denoiser")
    assert r["batch"] == (2, 2, 8)                      # classifier-free guidance doubles the denoiser batch
    assert r["latent_height"] == (96, 128, 128) and r["latent_width"] == (128, 128, 168)
    assert trtb.axis_ranges(cases, "sdxl", "vae")["batch"] == (1, 1, 4)
    assert trtb.axis_ranges(cases, "flux", "denoiser")["batch"] == (1, 1, 4)
    assert trtb.axis_ranges(cases, "flux", "denoiser")["image_sequence"] == (48 * 84, 64 * 64, 64 * 64)
    static = trtb.axis_ranges(cases, "sdxl", "vae", static=True)
    assert all(lo == opt == hi for lo, opt, hi in static.values())
    with pytest.raises(ValueError):
        trtb.axis_ranges([], "sd", "vae")


def test_input_profile_and_outside_check():
    shapes = {"sample": ["batch", 4, "latent_height", "latent_width"], "timestep": ["batch"],
              "encoder_hidden_states": ["batch", "text_sequence", 2048]}
    example = {"sample": [2, 4, 129, 129], "timestep": [2], "encoder_hidden_states": [2, 77, 2048]}
    ranges = trtb.axis_ranges(_cases((1, 512, 512), (2, 1024, 1024)), "sdxl", "denoiser")
    profile = trtb.input_profile(shapes, ranges, example)
    assert profile["sample"] == ((2, 4, 64, 64), (2, 4, 64, 64), (4, 4, 128, 128))
    assert profile["encoder_hidden_states"] == ((2, 77, 2048), (2, 77, 2048), (4, 77, 2048))   # text length fixed
    assert trtb.outside_profile(profile, {"sample": (2, 4, 96, 96)}) is None
    assert "outside the engine profile [64, 128]" in trtb.outside_profile(profile, {"sample": (2, 4, 160, 96)})
    need = trtb.case_shapes(Case("sdxl", "tensorrt", "", "fp16", 1, 768, 512), "sdxl", "denoiser", shapes, example)
    assert need["sample"] == (2, 4, 96, 64) and need["encoder_hidden_states"] == (2, 77, 2048)
    # a T5 encoder exported from a 512-token example gets the length the pipeline sends
    t5 = {"input_ids": ["batch", "sequence"]}
    fixed = {"sequence": (256, 256, 256)}
    ranges = {**trtb.axis_ranges(_cases((1, 1024, 1024)), "sd3", "text_encoder"), **fixed}
    assert trtb.input_profile(t5, ranges, {"input_ids": [2, 512]})["input_ids"] == ((1, 256), (1, 256), (1, 256))
    assert trtb.case_shapes(_cases((1, 1024, 1024))[0], "sd3", "text_encoder", t5, {"input_ids": [2, 512]},
                            fixed) == {"input_ids": (1, 256)}


def test_engine_key_changes_with_every_ingredient():
    profile = {"x": ((1, 4), (1, 4), (2, 4))}
    flags = trtb.build_settings("fp16", False, "10.3.0")
    base = trtb.engine_key("10.3.0", (9, 0), "onnxkey", profile, "fp16", False, flags)
    assert base == trtb.engine_key("10.3.0", (9, 0), "onnxkey", profile, "fp16", False, dict(flags))
    others = [trtb.engine_key("10.4.0", (9, 0), "onnxkey", profile, "fp16", False, flags),
              trtb.engine_key("10.3.0", (8, 9), "onnxkey", profile, "fp16", False, flags),
              trtb.engine_key("10.3.0", (9, 0), "other", profile, "fp16", False, flags),
              trtb.engine_key("10.3.0", (9, 0), "onnxkey", {"x": ((1, 4), (2, 4), (2, 4))}, "fp16", False, flags),
              trtb.engine_key("10.3.0", (9, 0), "onnxkey", profile, "bf16", False, flags),
              trtb.engine_key("10.3.0", (9, 0), "onnxkey", profile, "fp16", True, flags),
              trtb.engine_key("10.3.0", (9, 0), "onnxkey", profile, "fp16", False,
                              trtb.build_settings("fp16", True, "10.3.0")),           # +tf32
              trtb.engine_key("10.3.0", (9, 0), "onnxkey", profile, "fp16", False,
                              trtb.build_settings("fp16", False, "9.3.0"))]           # weakly typed
    assert len({base, *others}) == 9


def test_builder_flags_per_precision_version_and_tf32():
    strongly = trtb.build_settings("fp16", False, "10.3.0")
    assert strongly == {"network_flags": ["STRONGLY_TYPED"], "set_flags": [], "clear_flags": ["TF32"]}
    assert trtb.build_settings("bf16", False, "11.1.0")["set_flags"] == []      # the graph's types rule
    assert trtb.build_settings("fp32", False, "10.3.0")["clear_flags"] == ["TF32"]   # fp32 means fp32
    tf32 = trtb.build_settings("fp32", True, "10.3.0")
    assert tf32["set_flags"] == ["TF32"] and tf32["clear_flags"] == []
    legacy = trtb.build_settings("fp16", False, "9.3.0")
    assert legacy["network_flags"] == ["EXPLICIT_BATCH"] and legacy["set_flags"] == ["FP16"]
    assert trtb.build_settings("fp32", True, "8.6.1")["set_flags"] == ["TF32"]


def test_t5_sequence_length_is_what_each_pipeline_sends():
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from harness.models import LoadedModel, pipeline_inputs

    # SD3.5-large's tokenizer_3 says model_max_length 512, but StableDiffusion3Pipeline sends 256 tokens
    assert trtb.sent_sequence_length("t5", 512, StableDiffusion3Pipeline, {}) == 256
    assert trtb.sent_sequence_length("t5", 512, StableDiffusion3Pipeline, {"max_sequence_length": 128}) == 128
    assert trtb.sent_sequence_length("clip_text_model", 77, StableDiffusion3Pipeline, {}) == 77
    flux = LoadedModel("flux-dev", "flux", SimpleNamespace(transformer=SimpleNamespace(
        config=SimpleNamespace(in_channels=64)), vae_scale_factor=8), "bf16", "cpu", ["text_encoder", "text_encoder_2"],
        "transformer")
    kwargs = pipeline_inputs(flux, Case("flux-dev", "tensorrt", "", "bf16", 1, 64, 64, 1))
    assert trtb.sent_sequence_length("t5", 512, FluxPipeline, kwargs) == 512
    assert trtb.sent_sequence_length("t5", 256, FluxPipeline, {}) == 512         # FluxPipeline's own default


def test_text_sequence_lengths_match_the_real_sd3_pipeline_call():
    """tiny-sd3 with SD3.5-large's tokenizer_3 length: the profile length is what the real pipeline sends."""
    from harness.models import load, pipeline_inputs

    model = load("tiny-sd3", "fp32")
    model.pipeline.tokenizer_3.model_max_length = 512
    case = Case("tiny-sd3", "tensorrt", "", "fp32", 1, 64, 64, 1)
    lengths = trtb.text_sequence_lengths(model, case)
    sent = {}

    def record(name):
        def hook(_module, args):
            sent.setdefault(name, args[0].shape[1])
        return hook
    hooks = [getattr(model.pipeline, n).register_forward_pre_hook(record(n)) for n in model.text_encoders]
    with torch.no_grad():
        model.pipeline(**pipeline_inputs(model, case))
    for h in hooks:
        h.remove()
    assert lengths == sent == {"text_encoder": 77, "text_encoder_2": 77, "text_encoder_3": 256}


def test_onnx_preparation_reads_axes_and_fixes_dims(tmp_path):
    import onnx
    from backends.onnx import export as ox
    from backends.onnx.components import ComponentSpec
    conv = torch.nn.Conv2d(4, 3, 3, padding=1)
    spec = ComponentSpec("vae", "vae", conv, {"latent": torch.randn(2, 4, 8, 8)}, ["image"],
                         {"latent": {0: "batch", 2: "latent_height", 3: "latent_width"},
                          "image": {0: "batch", 2: "height", 3: "width"}}, {"image": [2, 3, 8, 8]})
    folder = tmp_path / "entry"
    folder.mkdir()
    ox._export_to(spec, folder, "legacy", 17)
    shapes = trtb.io_shapes(folder / ox.ONNX_FILE)
    assert shapes == {"latent": ["batch", 4, "latent_height", "latent_width"]}
    fixed = trtb.fix_input_dims(folder / ox.ONNX_FILE, {"latent": (1, 4, 12, 10)}, tmp_path / "static")
    assert trtb.io_shapes(fixed) == {"latent": [1, 4, 12, 10]}
    onnx.checker.check_model(str(fixed))      # the copy still finds its weights beside it


def test_unsupported_here_with_reasons(monkeypatch):
    b = trtb.TensorRTBackend()
    case = Case("tiny-sd", "tensorrt")
    monkeypatch.setattr(trtb, "_trt_version", lambda: None)
    reason = b.support(case, {"device": "cpu"}).reason
    assert "tensorrt not installed" in reason
    monkeypatch.setattr(trtb, "_trt_version", lambda: "10.8.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 6))
    assert "needs a CUDA GPU" in b.support(case, {"device": "cpu"}).reason
    gpu = {"device": "cuda"}
    assert b.support(case, gpu)
    assert "fp8 needs Ada" in b.support(Case("tiny-sd", "tensorrt", "fp8", "fp16"), gpu).reason
    big = Case("tiny-sd", "tensorrt", "", "fp32", 1, 256, 256)
    assert "outside the engine profile" in b.support(big, gpu).reason
    assert b.support(Case("tiny-sd", "tensorrt", "static", "fp32", 1, 256, 256), gpu)
    b.configure([big, Case("tiny-sd", "tensorrt")])       # the matrix widens the profile
    assert b.support(big, gpu)
    assert "unknown variant" in b.support(Case("tiny-sd", "tensorrt", "int3"), gpu).reason
    assert b.support(Case("tiny-sd", "tensorrt", "static+tf32"), gpu)
    assert b.canonical_variant("tf32+static") == "static+tf32"
    assert "conflicting options fp8 and fp4" in b.support(Case("tiny-sd", "tensorrt", "fp8+fp4"), gpu).reason


# -- engine builds in their own process ---------------------------------------------------------------------------

def _job(tmp_path, timeout_s=60.0):
    return trtb.BuildJob(onnx=str(tmp_path / "unet" / "model.onnx"), engine=str(tmp_path / "unet-fp16-abc.engine"),
                         profile={"sample": ((2, 4, 8, 8), (2, 4, 8, 8), (2, 4, 16, 16))}, precision="fp16",
                         settings=trtb.build_settings("fp16", False, "10.8.0"), timing_cache=str(tmp_path / "t.cache"),
                         timeout_s=timeout_s)


def _stand_in_builder(job, seconds=0.0, fail=False):
    """A builder process with the real one's contract (reads the job file named on its command line, writes the
    engine, removes its lock), for the orchestration tests: the real builder needs TensorRT and a GPU."""
    code = ("import json, pathlib, sys, time\n"
            "job = json.loads(pathlib.Path(sys.argv[1]).read_text())\n"
            f"time.sleep({seconds})\n"
            + ("sys.exit('builder: out of workspace memory')\n" if fail else
               "pathlib.Path(job['engine']).write_bytes(b'serialized engine')\n")
            + "pathlib.Path(job['engine'] + '.building').unlink(missing_ok=True)\n")
    return [sys.executable, "-c", code, str(job.job_path)]


def test_job_round_trips_and_build_timeout_from_env(tmp_path, monkeypatch):
    job = _job(tmp_path)
    job.write()
    assert trtb.BuildJob.read(job.job_path) == job
    monkeypatch.delenv(trtb.BUILD_TIMEOUT_ENV, raising=False)
    assert trtb.build_timeout_s() == trtb.DEFAULT_BUILD_TIMEOUT_S
    monkeypatch.setenv(trtb.BUILD_TIMEOUT_ENV, "7200")
    assert trtb.build_timeout_s() == 7200.0
    monkeypatch.setenv(trtb.BUILD_TIMEOUT_ENV, "an hour")
    with pytest.raises(ValueError, match="not a number of seconds"):
        trtb.build_timeout_s()


def test_build_then_reuse_and_a_stale_lock_is_ignored(tmp_path):
    job = _job(tmp_path)
    job.lock_path.write_text(str(os.getpid()))      # a live pid that is not a builder of this job
    assert trtb.build_plan(job) == "build"
    assert trtb.ensure_engine(job, _stand_in_builder(job)) == "build"
    assert job.engine_path.read_bytes() == b"serialized engine"
    assert trtb.ensure_engine(job, _stand_in_builder(job, fail=True)) == "reuse"


def test_a_failed_build_says_why(tmp_path):
    job = _job(tmp_path)
    with pytest.raises(trtb.EngineBuildError, match="build failed for unet .fp16.: .*out of workspace memory"):
        trtb.ensure_engine(job, _stand_in_builder(job, fail=True))
    assert not job.engine_path.exists()


def test_the_case_timeout_leaves_the_build_running_and_it_is_cached(tmp_path):
    """The case's timeout (the runner's own SIGALRM limit) fires while the engine builds: the case fails with a
    message saying so, the build goes on, a later prepare joins or reuses it. (~2 s: a builder that takes 1.5 s.)"""
    from harness.measure.run_options import CaseTimeout, time_limit

    job = _job(tmp_path)
    with pytest.raises(CaseTimeout, match=r"case exceeded its 0.3 s timeout; the TensorRT engine build \(pid \d+, "
                                          r"own limit 60 s\) goes on and will be cached as unet-fp16-abc.engine"):
        with time_limit(0.3):
            trtb.ensure_engine(job, _stand_in_builder(job, seconds=1.5))
    assert not job.engine_path.exists() and trtb.build_plan(job) == "join"
    assert trtb.ensure_engine(job) == "join"            # the next case waits for the same builder
    assert job.engine_path.read_bytes() == b"serialized engine" and trtb.build_plan(job) == "reuse"


def test_an_interrupted_run_stops_its_builder(tmp_path):
    job = _job(tmp_path)

    def interrupt(_sig, _frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with pytest.raises(KeyboardInterrupt):
            trtb.ensure_engine(job, _stand_in_builder(job, seconds=30))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    try:    # the builder ends on the interrupt: it may be gone already, or must be within seconds
        psutil.Process(int(job.lock_path.read_text())).wait(timeout=10)
    except psutil.NoSuchProcess:
        pass
    assert not job.engine_path.exists()


def test_the_real_builder_entry_point_reports_a_missing_tensorrt(tmp_path):
    """python -m backends.tensorrt build JOB runs from any working directory (~3 s: it imports torch)."""
    job = _job(tmp_path)
    with pytest.raises(trtb.EngineBuildError, match="tensorrt"):
        trtb.ensure_engine(job)


# -- the timing cache: keyed by TensorRT version and GPU, never the cause of a lost engine -------------------------

class _TimingCache:
    def __init__(self, data: bytes):
        self.data = data

    def serialize(self):
        return self.data + b"+timings"


class _BuilderConfig:
    """IBuilderConfig's timing-cache calls as TensorRT's Python API documents them (python/docstrings/infer/
    pyCoreDoc.h, IBuilderConfigDoc): create_timing_cache(b"") makes a new cache; set_timing_cache returns a bool,
    False when the cache's verification header names another CUDA device (here: a cache not made on `device`);
    get_timing_cache returns None when no timing cache is set."""

    def __init__(self, device: bytes):
        self.device, self.cache = device, None

    def set_flag(self, flag):
        pass

    clear_flag = set_flag

    def add_optimization_profile(self, profile):
        pass

    def create_timing_cache(self, data):
        return _TimingCache(bytes(data) or self.device)

    def set_timing_cache(self, cache, ignore_mismatch):
        if not (ignore_mismatch or cache.data.startswith(self.device)):
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


def _tensorrt_stand_in(device: bytes):
    """The parts of the tensorrt module build_engine calls, with the real names (no GPU, no TensorRT here)."""
    class ILogger:
        Severity = SimpleNamespace(WARNING=2)

        def __init__(self):
            pass

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return "network"

        def create_builder_config(self):
            return _BuilderConfig(device)

        def create_optimization_profile(self):
            return SimpleNamespace(set_shape=lambda *a: None)

        def build_serialized_network(self, network, config):
            return b"serialized engine"

    class OnnxParser:
        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            return True
    return SimpleNamespace(ILogger=ILogger, Builder=Builder, OnnxParser=OnnxParser, __version__="10.8.0",
                           NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=0),
                           BuilderFlag=SimpleNamespace(TF32="TF32"))


def test_timing_cache_is_keyed_by_tensorrt_version_and_gpu(tmp_path):
    h100 = trtb.timing_cache_path(tmp_path, "10.8.0", (9, 0), "NVIDIA H100 80GB HBM3")
    assert h100 == tmp_path / "tensorrt" / "timing-trt10.8.0-sm90-nvidia-h100-80gb-hbm3.cache"
    assert len({h100, trtb.timing_cache_path(tmp_path, "10.9.0", (9, 0), "NVIDIA H100 80GB HBM3"),
                trtb.timing_cache_path(tmp_path, "10.8.0", (9, 0), "NVIDIA H200")}) == 3


@pytest.mark.parametrize("stored", [b"cache made on another GPU", b""], ids=["refused", "unreadable"])
def test_a_refused_timing_cache_falls_back_to_a_fresh_one_and_the_engine_is_kept(tmp_path, monkeypatch, stored):
    """A timing cache TensorRT refuses (another device: set_timing_cache returns False) or cannot read
    (create_timing_cache raises) costs a slower build, never the engine: the real builder entry point, in this
    process, with the tensorrt stand-in."""
    trt = _tensorrt_stand_in(b"H100")
    if not stored:
        class Unreadable(_BuilderConfig):
            def create_timing_cache(self, data):
                if data.startswith(b"truncated"):
                    raise RuntimeError("truncated timing cache")
                return super().create_timing_cache(data)
        monkeypatch.setattr(trt.Builder, "create_builder_config", lambda self: Unreadable(b"H100"))
        stored = b"truncated"
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    job = _job(tmp_path)
    Path(job.timing_cache).write_bytes(stored)
    job.write()
    try:
        assert trtb.build_main(str(job.job_path)) == 0
    finally:
        signal.alarm(0)                      # build_main's own deadline, for a builder process
    assert job.engine_path.read_bytes() == b"serialized engine"
    assert Path(job.timing_cache).read_bytes() == b"H100+timings"     # the fresh cache replaced it
    assert trtb.attach_timing_cache(_BuilderConfig(b"H100"), Path(job.timing_cache))[1] == "reused"


def test_a_timing_cache_that_cannot_be_saved_loses_nothing(tmp_path):
    config = _BuilderConfig(b"H100")
    assert trtb.save_timing_cache(config, tmp_path / "t.cache") == "not saved: no timing cache was attached to the build"
    config.cache = SimpleNamespace(serialize=lambda: (_ for _ in ()).throw(RuntimeError("out of host memory")))
    assert trtb.save_timing_cache(config, tmp_path / "t.cache") == "not saved: RuntimeError: out of host memory"
    assert not (tmp_path / "t.cache").exists()


# -- execution: bindings by name ------------------------------------------------------------------------------------

class _Enum(SimpleNamespace):
    pass


class _Engine:
    """Stands in for tensorrt.ICudaEngine (same method names) -- a real engine needs a GPU. A text encoder whose
    engine lists its outputs in another order than the ONNX interface does."""
    io = [("input_ids", "INPUT", "INT32"), ("pooler_output", "OUTPUT", "FLOAT"),
          ("last_hidden_state", "OUTPUT", "FLOAT")]
    num_io_tensors = len(io)

    def get_tensor_name(self, i):
        return self.io[i][0]

    def get_tensor_mode(self, name):
        return _Enum(name=next(m for n, m, _ in self.io if n == name))

    def get_tensor_dtype(self, name):
        return _Enum(name=next(t for n, _, t in self.io if n == name))

    def get_tensor_profile_shape(self, name, profile):
        return [(1, 77), (2, 77), (4, 77)]

    def create_execution_context(self):
        return _Context()


class _Context:
    def __init__(self):
        self.shapes, self.addresses = {}, {}

    def set_input_shape(self, name, shape):
        if not 1 <= shape[0] <= 4 or shape[1] != 77:
            return False
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def infer_shapes(self):
        return [] if "input_ids" in self.shapes else ["input_ids"]

    def get_tensor_shape(self, name):
        batch = self.shapes["input_ids"][0]
        return (batch, 32) if name == "pooler_output" else (batch, 77, 32)


def test_outputs_are_bound_and_returned_by_name():
    runner = trtb.TrtRunner(_Engine(), "cpu", ["last_hidden_state", "pooler_output"])
    ids = torch.ones(2, 77, dtype=torch.int64)
    inputs, outputs = runner.bind({"input_ids": ids, "unused": torch.zeros(1)})
    assert inputs[0].dtype == torch.int32                            # converted to the engine's input type
    assert list(outputs) == ["last_hidden_state", "pooler_output"]
    assert outputs["last_hidden_state"].shape == (2, 77, 32) and outputs["pooler_output"].shape == (2, 32)
    for name, tensor in [("input_ids", inputs[0]), *outputs.items()]:
        assert runner.context.addresses[name] == tensor.data_ptr()
    with pytest.raises(RuntimeError, match=r"rejected shape \(8, 77\) for input input_ids: outside the engine's "
                                           r"profile \[\(1, 77\) .. \(4, 77\)\]"):
        runner.bind({"input_ids": torch.ones(8, 77, dtype=torch.int64)})
    with pytest.raises(ValueError, match="input_ids not fed"):
        runner.bind({})
    with pytest.raises(trtb.EngineBuildError, match="no output.s. hidden_states.0"):
        trtb.TrtRunner(_Engine(), "cpu", ["last_hidden_state", "hidden_states.0"])
