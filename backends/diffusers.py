"""The reference backend: eager diffusers pipelines. Its executors are the modules themselves."""
from __future__ import annotations

from backends.base import Backend, Prepared


class DiffusersBackend(Backend):
    name = "diffusers"
    description = "eager PyTorch diffusers pipeline (the reference)"

    def prepare(self, model, case, cache) -> Prepared:
        executors = {name: getattr(model.pipeline, name) for name in model.components}
        return Prepared(pipeline=model.pipeline, executors=executors,
                        info={"attention": "SDPA (torch default)"})
