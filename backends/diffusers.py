"""The reference backend: eager diffusers pipelines. Its executors are the modules themselves.

Option "tf32": the same eager pipeline with TF32 matmuls and convolutions (the runner sets strict fp32 before every
case; prepare turns TF32 on, close restores what was there). The reference itself never takes it.
"""
from __future__ import annotations

from typing import Callable

import torch

from backends.base import Backend, Prepared, Support, variant_options


def enable_tf32() -> Callable[[], None]:
    """TF32 for float32 matmuls (cuBLAS) and convolutions (cuDNN); returns the function that restores the previous
    settings. Only set_float32_matmul_precision and cudnn.allow_tf32 are used: they read back consistently whether
    the caller set strict fp32 through them or through torch's newer fp32_precision attributes."""
    cudnn = torch.backends.cudnn
    precision = torch.get_float32_matmul_precision()
    try:
        cudnn_tf32 = cudnn.allow_tf32
    except RuntimeError:          # strict fp32 was set through cudnn.conv.fp32_precision
        cudnn_tf32 = cudnn.conv.fp32_precision == "tf32"
    torch.set_float32_matmul_precision("high")
    cudnn.allow_tf32 = True

    def restore() -> None:
        torch.set_float32_matmul_precision(precision)
        cudnn.allow_tf32 = cudnn_tf32
    return restore


class DiffusersBackend(Backend):
    name = "diffusers"
    options = ("tf32",)
    description = "eager PyTorch diffusers pipeline (the reference); option tf32"

    def support(self, case, env) -> Support:
        base = super().support(case, env)
        if not base:
            return base
        device = env.get("device", "cpu") if isinstance(env, dict) else "cpu"
        if "tf32" in variant_options(case.variant) and device != "cuda":
            return Support.no(f"tf32 is a CUDA math mode: on {device} this case would repeat the one without +tf32")
        return Support.yes()

    def prepare(self, model, case, cache) -> Prepared:
        executors = {name: getattr(model.pipeline, name) for name in model.components}
        tf32 = "tf32" in variant_options(case.variant)
        on_close = [enable_tf32()] if tf32 else []
        return Prepared(pipeline=model.pipeline, executors=executors,
                        info={"attention": "SDPA (torch default)", "tf32": tf32}, on_close=on_close)
