"""The reference: the reference backend's outputs for a shape, and each component's first call captured."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from backends import base as registry
from harness import models
from harness.measure import progress
from harness.measure.pipeline_call import PipelineCall
from harness.measure.run_options import RunOptions, free_memory
from harness.models import embedding
from harness.models.sentences import texts_for
from harness.selection import workloads
from harness.selection.cases import Case


@dataclass
class Reference:
    """The reference backend's outputs for one model x dtype x shape: the pipeline's output (images, or one
    embedding per sentence), each component's first call, and for text-embedding the whole fixed sentence set's
    embeddings (the ranking check's yardstick)."""
    output: np.ndarray
    components: dict[str, tuple[tuple, dict, Any]]   # name -> (args, kwargs, output), on CPU
    sentence_set: np.ndarray | None = None


# -- reference ----------------------------------------------------------------------------------------------------
def detach(value):
    """A copy of a captured value with its tensors on the CPU: the reference's captured calls live through the
    whole case, and on the GPU they would count in every phase's memory."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict) and not hasattr(value, "to_tuple"):
        return {k: detach(v) for k, v in value.items()}
    if isinstance(value, list):
        return [detach(v) for v in value]
    if isinstance(value, tuple):
        return tuple(detach(v) for v in value)
    if hasattr(value, "to_tuple"):  # transformers/diffusers ModelOutput: positional view of its tensors
        return tuple(detach(v) for v in value.to_tuple())
    return copy.deepcopy(value)


@contextlib.contextmanager
def capture_first_calls(model: models.LoadedModel):
    """Record (args, kwargs, output) of each component's first call during a pipeline run."""
    captured: dict[str, tuple] = {}
    undo = []
    pipeline = model.pipeline
    for name in model.stages:
        module = getattr(pipeline, name)
        if name in model.methods:
            method = model.methods[name]
            original = getattr(module, method)

            def wrapped(*args, _original=original, _name=name, **kwargs):
                output = _original(*args, **kwargs)
                captured.setdefault(_name, (detach(args), detach(kwargs), detach(output)))
                return output
            setattr(module, method, wrapped)
            undo.append(lambda module=module, method=method: delattr(module, method))
            continue

        def hook(_m, args, kwargs, output, name=name):
            captured.setdefault(name, (detach(args), detach(kwargs), detach(output)))
        undo.append(module.register_forward_hook(hook, with_kwargs=True).remove)
    try:
        yield captured
    finally:
        for fn in undo:
            fn()


def compute_reference(case: Case, options: RunOptions) -> Reference:
    ref_case = case.with_backend(workloads.reference_backend(case.workload))
    progress.phase("reference")
    model = models.load(models.reference_model(case.model), case.dtype, options.device)
    prepared = registry.get(ref_case.backend).prepare(model, ref_case, models.cache_root())
    try:
        call = PipelineCall(prepared.pipeline, model, ref_case, cuda=False, timed=False)
        call.setup()
        with capture_first_calls(model) as captured:
            output = call()
        sentence_set = None
        if case.workload == workloads.TEXT_EMBEDDING:   # the ranking check's yardstick, not timed
            sentence_set = embedding.embed(prepared.pipeline, texts_for(case.seq), case.seq)
        return Reference(np.asarray(output, dtype=np.float32), dict(captured), sentence_set)
    finally:
        prepared.close()
        del model
        free_memory()


def to_device(value, device: str):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value
