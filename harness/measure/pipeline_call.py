"""One pipeline call as every case makes it, and the precision it runs in."""
from __future__ import annotations


import torch

from harness import models
from harness.measure.timing import StageTimer
from harness.models import embedding
from harness.selection import workloads
from harness.selection.cases import Case


# -- precision --------------------------------------------------------------------------------------------------
def set_precision_defaults() -> None:
    """fp32 means fp32: TF32 off in matmuls and cuDNN convolutions before every case (a `+tf32` variant turns it on
    in its prepare and restores it at close)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def precision_facts() -> dict:
    """What decides float32 precision and kernel choice right now (recorded per case in env.precision)."""
    return {"float32_matmul_precision": torch.get_float32_matmul_precision(),
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_deterministic": torch.backends.cudnn.deterministic}


# -- one pipeline call as every case makes it -------------------------------------------------------------------
class PipelineCall:
    """The user's call: the pipeline with the fixed inputs of the case's workload (prompts, seed and latents; or
    the sentences). `setup` prepares a call before the clock starts (fresh latents: some schedulers modify them in
    place); the stage timer's hooks mark the stages inside the call. The result is a numpy array: images, or one
    embedding per sentence."""

    def __init__(self, pipeline, model: models.LoadedModel, case: Case, cuda: bool, timed: bool = True):
        self.pipeline, self.model, self.case = pipeline, model, case
        self.embedding = case.workload == workloads.TEXT_EMBEDDING
        self.inputs = {"texts": embedding.batch_texts(case)} if self.embedding else models.pipeline_inputs(model,
                                                                                                             case)
        self.timer = StageTimer(cuda=cuda)
        if timed:
            self.timer.attach(pipeline, model.stages, model.methods)

    @property
    def prompts(self) -> list[str]:
        return list(self.inputs["texts"] if self.embedding else self.inputs["prompt"])

    def setup(self) -> None:
        if not self.embedding:
            self.inputs["latents"] = models.initial_latents(self.model, self.case)

    def __call__(self):
        with torch.inference_mode():
            if self.embedding:
                return self.pipeline(self.inputs["texts"], self.case.seq).cpu().numpy()
            return self.pipeline(**self.inputs).images

    def detach(self) -> None:
        self.timer.detach()
