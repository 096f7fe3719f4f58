"""Shared by the backends that run a component outside torch (onnxruntime, tensorrt, triton): each component's
plain-tensor interface (components), its ONNX export cache (export), and one executor family parameterised by the
runner that computes it (executors). Not a backend itself: the registry does not list it."""
