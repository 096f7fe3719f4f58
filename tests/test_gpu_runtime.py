"""GPU runtime behaviour of the harness that a CPU machine can check: where the reference's captured tensors live,
torch's caching allocator after a backend moved the weights out of torch, the idle power that energy figures
subtract, and which VAE precision each side of an SDXL fp16 comparison ran. Where the real behaviour needs a GPU,
a stand-in encodes the documented behaviour (cited beside it); fake CUDA tensors come from torch's own
FakeTensorMode (metadata only, no GPU)."""
from types import SimpleNamespace

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from harness.runner import _detach


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
