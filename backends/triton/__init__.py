"""Triton Inference Server backend: a real tritonserver (bundled with nvidia-pytriton) serving pipeline
components and whole pipelines, called with tritonclient over HTTP or gRPC."""
from backends.triton.backend import TritonBackend
from backends.triton.server import ExternalServer, TritonServer, TritonServerError

__all__ = ["TritonBackend", "TritonServer", "ExternalServer", "TritonServerError"]
