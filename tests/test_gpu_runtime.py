"""GPU runtime behaviour of the harness that a CPU machine can check: where the reference's captured tensors live,
torch's caching allocator after a backend moved the weights out of torch, the idle power that energy figures
subtract, and which VAE precision each side of an SDXL fp16 comparison ran. Where the real behaviour needs a GPU,
a stand-in encodes the documented behaviour (cited beside it); fake CUDA tensors come from torch's own
FakeTensorMode (metadata only, no GPU)."""
import json
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from backends import base as registry
from harness.measure import case as case_steps, memory, parity, reference
from harness.measure.reference import detach
from harness.measure.run_options import RunOptions
from harness.measure.session import Session
from harness.selection.cases import Case


def test_the_references_captured_tensors_are_kept_on_the_cpu():
    """A captured call (args, kwargs, output) of a component on cuda:1 is copied to the CPU: the reference
    lives through the whole case and must not count in its GPU memory."""
    with FakeTensorMode():
        sample = torch.empty(2, 4, 8, 8, device="cuda:1")
        cond = {"text_embeds": torch.empty(2, 32, device="cuda:1"), "time_ids": torch.empty(2, 6, device="cuda:1")}
        captured = detach(((sample, 981), {"added_cond_kwargs": cond, "scale": 1.0}, [sample]))
    (args, kwargs, output) = captured
    tensors = [args[0], *kwargs["added_cond_kwargs"].values(), output[0]]
    assert [t.device.type for t in tensors] == ["cpu"] * 4
    assert args[1] == 981 and kwargs["scale"] == 1.0 and args[0].shape == (2, 4, 8, 8)
    cpu = torch.ones(3)
    copy = detach(cpu)
    assert copy.data_ptr() != cpu.data_ptr()          # still a copy on the CPU: the pipeline may reuse its buffer


# -- torch's caching allocator after the weights moved out of torch -------------------------------------------------

class _Backend(registry.Backend):
    name = "stand-in"

    def __init__(self, weights_outside_torch):
        self.weights_outside_torch = weights_outside_torch

    def prepare(self, model, case, cache):
        return registry.Prepared(pipeline=model, executors={}, weights_outside_torch=self.weights_outside_torch)


def test_torch_cache_is_released_after_prepare_when_the_weights_left_torch(monkeypatch):
    """onnxruntime, tensorrt and triton declare weights_outside_torch (tests/test_onnxruntime.py checks that the
    torch modules are then really unreferenced); the runner empties torch's cache for them only."""
    released = []

    def release(cuda):
        released.append(cuda)
        return {"torch_cache_emptied": True}
    monkeypatch.setattr(case_steps, "release_torch_cache", release)
    case = Case("tiny-sd", "stand-in")
    prepared, after = case_steps.prepare_for_measuring(_Backend(True), "model", case, "cache", cuda=True)
    assert prepared.pipeline == "model" and after == {"torch_cache_emptied": True} and released == [True]
    assert case_steps.prepare_for_measuring(_Backend(False), "model", case, "cache", cuda=True)[1] is None
    assert released == [True]


class _CachingAllocator:
    """torch.cuda's allocator counters as torch documents them: memory_reserved = what the caching allocator holds,
    memory_allocated = what tensors occupy; empty_cache "releases all unoccupied cached memory currently held by
    the caching allocator" (torch.cuda.empty_cache docs)."""

    def __init__(self, allocated, reserved):
        self.allocated, self.reserved, self.emptied = allocated, reserved, 0

    def install(self, monkeypatch):
        for name, fn in {"memory_allocated": lambda *a: self.allocated, "memory_reserved": lambda *a: self.reserved,
                         "max_memory_allocated": lambda *a: self.allocated, "max_memory_reserved": lambda *a:
                         self.reserved, "empty_cache": self.empty_cache, "synchronize": lambda *a: None}.items():
            monkeypatch.setattr(torch.cuda, name, fn)

    def empty_cache(self):
        self.emptied += 1
        self.reserved = self.allocated


def test_torch_reserved_but_unallocated_memory_is_recorded(monkeypatch):
    """What the caching allocator keeps without a tensor in it counts in NVML's per-process figure: each phase
    records it, and releasing after prepare hands it back (SDXL fp16's UNet: ~5 GB)."""
    gb = 1024 * memory.MB
    allocator = _CachingAllocator(allocated=1 * gb, reserved=6 * gb)
    allocator.install(monkeypatch)
    phase = memory.Telemetry(cuda=True).end_phase()
    assert phase["torch_reserved_unallocated_mb"] == 5 * 1024 and phase["torch_reserved_mb"] == 6 * 1024
    after = memory.release_torch_cache(cuda=True)
    assert allocator.emptied == 1
    assert after == {"torch_cache_emptied": True, "torch_allocated_mb": 1024.0, "torch_reserved_mb": 1024.0,
                     "torch_reserved_unallocated_mb": 0.0}
    assert memory.release_torch_cache(cuda=False) is None and allocator.emptied == 1


# -- idle power ------------------------------------------------------------------------------------------------------

class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def _cooling_gpu(clock, idle=70.0, warm=400.0, tau=1.5, averaged=True):
    """A GPU that just worked: power decays from `warm` towards `idle` (clocks and fans come down). `averaged`
    reads it as nvmlDeviceGetPowerUsage does on Ampere and newer: "power averaged over 1 sec interval" (NVML API
    reference, nvmlDeviceGetPowerUsage)."""
    import math

    def instant(t):
        return idle + (warm - idle) * math.exp(-t / tau)

    def read():
        t = clock()
        if not averaged:
            return instant(t)
        return sum(instant(t - i / 20) for i in range(20)) / 20      # the last second, 50 ms apart
    return read


def test_idle_power_waits_for_the_reading_to_settle():
    """Sampled for 1 s right after the reference ran, idle read ~300 W for a 70 W idle GPU, and joules per call
    came out low (or 0). Settled, it reads the idle power (within what the settling criterion leaves)."""
    clock = _Clock()
    result = memory.settled_power(_cooling_gpu(clock), clock=clock, sleep=clock.sleep)
    assert result["settled"] and abs(result["watts"] - 70.0) < 3.5 and result["seconds"] > 5
    clock, first_second = _Clock(), []
    read = _cooling_gpu(clock)
    for _ in range(20):                                          # what one second of sampling would have said
        first_second.append(read())
        clock.sleep(0.05)
    assert sum(first_second) / 20 > 250
    clock = _Clock()
    idle = memory.settled_power(lambda: 70.0, clock=clock, sleep=clock.sleep)
    assert idle == {"watts": 70.0, "settled": True, "seconds": 2.0}   # an idle GPU costs two windows
    clock = _Clock()
    assert memory.settled_power(lambda: None, clock=clock, sleep=clock.sleep)["watts"] is None


def _pynvml(instant_mw=None, status=0):
    """The nvidia-ml-py calls idle power uses, as pynvml.py defines them: NVML_FI_DEV_POWER_INSTANT = 186,
    nvmlDeviceGetFieldValues(handle, [ids]) -> c_nvmlFieldValue_t array with a per-field nvmlReturn (0 =
    NVML_SUCCESS, 3 = NVML_ERROR_NOT_SUPPORTED) and a c_nvmlValue_t union read by valueType (1 =
    NVML_VALUE_TYPE_UNSIGNED_INT: uiVal); nvmlDeviceGetPowerUsage -> milliwatts."""
    def field_values(handle, ids):
        assert ids == [186]
        return [SimpleNamespace(fieldId=186, nvmlReturn=status, valueType=1, value=SimpleNamespace(uiVal=instant_mw))]
    return SimpleNamespace(NVML_FI_DEV_POWER_INSTANT=186, NVML_SUCCESS=0, NVMLError=RuntimeError,
                           nvmlDeviceGetFieldValues=field_values, nvmlDeviceGetPowerUsage=lambda handle: 95000)


def _nvml(module):
    nvml = memory.Nvml.__new__(memory.Nvml)            # without nvmlInit: no driver here
    nvml.nvml, nvml.handle = module, "gpu"
    return nvml


def test_idle_power_reads_the_instantaneous_field_where_the_driver_has_it():
    clock = _Clock()
    instant = memory.idle_power(_nvml(_pynvml(instant_mw=68500)), clock=clock, sleep=clock.sleep)
    assert instant["source"] == "NVML_FI_DEV_POWER_INSTANT" and instant["watts"] == 68.5
    clock = _Clock()
    unsupported = memory.idle_power(_nvml(_pynvml(status=3)), clock=clock, sleep=clock.sleep)
    assert unsupported["source"] == "nvmlDeviceGetPowerUsage" and unsupported["watts"] == 95.0


def test_idle_power_is_sampled_before_any_work_and_handed_to_isolated_workers(tmp_path, monkeypatch):
    sampled = []
    monkeypatch.setattr(memory.Telemetry, "sample_idle", lambda self: sampled.append(self))
    monkeypatch.setenv("DIFFBENCH_TRITON_LOG_DIR", str(tmp_path / "triton"))     # a session sets it otherwise
    session = Session(tmp_path, RunOptions())
    session.writer.close()
    assert sampled == [session.telemetry]            # when the session is made: nothing has run in this process
    monkeypatch.undo()
    telemetry = memory.Telemetry(cuda=True)
    telemetry.idle = {"watts": 70.0, "settled": True, "seconds": 2.0, "source": "NVML_FI_DEV_POWER_INSTANT",
                      "by": "this process, before any work"}
    env = telemetry.idle_env()
    monkeypatch.setenv(memory.IDLE_POWER_ENV, env[memory.IDLE_POWER_ENV])
    worker = memory.Telemetry(cuda=True)             # a worker: its GPU was just warmed by the worker before it
    assert worker.sample_idle() == {**json.loads(env[memory.IDLE_POWER_ENV]),
                                    "by": "the run's main process, before any work"}
    assert worker.idle_watts == 70.0 and worker._nvml is None          # NVML never asked
    monkeypatch.delenv(memory.IDLE_POWER_ENV)
    monkeypatch.setattr(memory, "_process_idle", telemetry.idle)        # measured by this process's first session
    assert memory.Telemetry(cuda=True).sample_idle() is telemetry.idle  # a later session (fit's) reuses it
    record = memory.energy_record(worker, joules=100.0, seconds=1.0, calls=2)
    assert record["joules_per_call"] == 15.0 and record["idle"]["source"] == "NVML_FI_DEV_POWER_INSTANT"


# -- SDXL fp16: the VAE decodes in fp32 on both sides ------------------------------------------------------------

def _tiny_sdxl():
    """A real StableDiffusionXLPipeline with the sizes of diffusers' own SDXL tests (two CLIP encoders, a
    text_time UNet), the VAE of the zoo's tiny models (scale factor 8; force_upcast True, diffusers' default)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from harness.models.tiny import _VAE_BLOCKS, _VAE_DOWN, _VAE_UP
    from harness.models.tokenizers import clip_tokenizer
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=_VAE_BLOCKS, down_block_types=_VAE_DOWN,
                        up_block_types=_VAE_UP, layers_per_block=1, latent_channels=4, sample_size=64)
    clip = CLIPTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=5, vocab_size=1000, hidden_act="gelu",
                          projection_dim=32, max_position_embeddings=77)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(clip),
                                     text_encoder_2=CLIPTextModelWithProjection(clip), tokenizer=clip_tokenizer(77),
                                     tokenizer_2=clip_tokenizer(77), unet=unet, scheduler=scheduler)


@pytest.fixture(scope="module")
def sdxl_fp16():
    """The tiny SDXL pipeline in fp16 and what its components were called with in one real call (CPU: ~1 s)."""
    from harness.models import LoadedModel
    pipeline = _tiny_sdxl().to(torch.float16)
    model = LoadedModel("tiny-sdxl", "sdxl", pipeline, "fp16", "cpu", ["text_encoder", "text_encoder_2"], "unet",
                        "vae")
    with reference.capture_first_calls(model) as captured:
        pipeline("a cat", num_inference_steps=1, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0))
    return model, dict(captured)


def test_sdxl_fp16_decodes_in_fp32_as_the_rule_says(sdxl_fp16):
    """diffusers 0.42.1's StableDiffusionXLPipeline: `needs_upcasting = self.vae.dtype == torch.float16 and
    self.vae.config.force_upcast` -> upcast_vae() (the VAE in float32), decode, back to float16."""
    model, captured = sdxl_fp16
    latents = captured["vae"][0][0]
    assert latents.dtype == torch.float32 and model.pipeline.vae.dtype == torch.float16
    assert model.vae_decode_dtype == "fp32"
    model.pipeline.vae.register_to_config(force_upcast=False)
    try:
        assert model.vae_decode_dtype == "fp16"
    finally:
        model.pipeline.vae.register_to_config(force_upcast=True)


def test_the_backends_vae_decodes_in_fp32_like_the_reference(sdxl_fp16, tmp_path):
    """The VAE exported for ONNX Runtime / TensorRT / Triton is the fp32 decoder the reference ran (an fp16 graph
    compared against an fp32 decode before), and the record says what each side ran."""
    import onnx

    from backends.onnx.executors import make_executor, output_symbols
    from backends.onnx.export import export_model
    from backends.onnxruntime import OrtRunner, session_options
    model, captured = sdxl_fp16
    export = export_model(model, Case("tiny-sdxl", "onnxruntime", dtype="fp16"), tmp_path,
                          components=["vae"]).components["vae"]
    assert export.folder.name.startswith("vae-fp32-") and model.pipeline.vae.dtype == torch.float16
    graph_input = onnx.load(str(export.path), load_external_data=False).graph.input[0]
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    session = OrtRunner(export.path, ["CPUExecutionProvider"], session_options(), "cpu", output_symbols(export))
    executor = make_executor(export, model.pipeline.vae, session)
    (latents,), _, (reference_image,) = captured["vae"]
    image = executor.decode(latents, return_dict=False)[0]
    assert image.dtype == torch.float32 and (image - reference_image).abs().max() < 1e-4
    stand_in = SimpleNamespace(vae=executor)
    assert parity.vae_decode_precision(model, stand_in, captured) == {"reference": "fp32", "backend": "fp32"}
    assert parity.vae_decode_precision(model, model.pipeline, captured) == {"reference": "fp32", "backend": "fp32"}
