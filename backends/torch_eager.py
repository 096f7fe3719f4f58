"""The eager reference of the text-embedding workload: the transformers encoder as PyTorch runs it, no compiler, no
export. Its executor is the module itself (as diffusers' modules are for text-to-image, whose reference is the
`diffusers` backend)."""
from __future__ import annotations

from backends.base import Backend, Prepared


class TorchEagerBackend(Backend):
    name = "torch"
    workloads = ("text-embedding",)
    description = "eager PyTorch (the text-embedding reference)"

    def prepare(self, model, case, cache) -> Prepared:
        executors = {name: getattr(model.pipeline, name) for name in model.components}
        encoder = executors[model.encoder]
        return Prepared(pipeline=model.pipeline, executors=executors,
                        info={"attention": getattr(encoder.config, "_attn_implementation", None) or "eager"})
