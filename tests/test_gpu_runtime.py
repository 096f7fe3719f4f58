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
from backends.diffusers import DiffusersBackend
from harness import memory, runner
from harness.cases import Case
from harness.runner import RunOptions, Session, _detach


def test_the_references_captured_tensors_are_kept_on_the_cpu():
    """A captured call (args, kwargs, ModelOutput) of a component on cuda:1 is copied to the CPU: the reference
    lives through the whole case and must not count in its GPU memory."""
    with FakeTensorMode():
        sample = torch.empty(2, 4, 8, 8, device="cuda:1")
        cond = {"text_embeds": torch.empty(2, 32, device="cuda:1"), "time_ids": torch.empty(2, 6, device="cuda:1")}
        captured = _detach(((sample, 981), {"added_cond_kwargs": cond, "scale": 1.0}, [sample]))
    (args, kwargs, output) = captured
    tensors = [args[0], *kwargs["added_cond_kwargs"].values(), output[0]]
    assert [t.device.type for t in tensors] == ["cpu"] * 4
    assert args[1] == 981 and kwargs["scale"] == 1.0 and args[0].shape == (2, 4, 8, 8)
    cpu = torch.ones(3)
    copy = _detach(cpu)
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
    monkeypatch.setattr(runner, "release_torch_cache", release)
    case = Case("tiny-sd", "stand-in")
    prepared, after = runner.prepare_for_measuring(_Backend(True), "model", case, "cache", cuda=True)
    assert prepared.pipeline == "model" and after == {"torch_cache_emptied": True} and released == [True]
    assert runner.prepare_for_measuring(_Backend(False), "model", case, "cache", cuda=True)[1] is None
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
    nvml = memory._Nvml.__new__(memory._Nvml)            # without nvmlInit: no driver here
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
    session = Session(tmp_path, RunOptions())
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
    record = memory.energy_record(worker, joules=100.0, seconds=1.0, calls=2)
    assert record["joules_per_call"] == 15.0 and record["idle"]["source"] == "NVML_FI_DEV_POWER_INSTANT"
