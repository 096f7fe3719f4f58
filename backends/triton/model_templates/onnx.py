"""Triton python-backend model: an exported ONNX graph (1/model.onnx beside this file) run by ONNX Runtime on CPU
-- what the onnxruntime backend of a full Triton build does, for the bundled server that has only the python
backend. Copied verbatim by backends/triton/repository.py; the config's inputs/outputs come from the graph.
Session: `threads` intra-op threads, one inter-op thread (sequential execution), and thread pools that do not
busy-wait after a run unless `allow_spinning` is "1" (the client's own torch work shares the cores between
requests: spinning threads would steal them).

Dynamic batching: requests whose inputs have the same shapes beyond the batch axis run as one session call.
Per-sample scalars travel as [batch, 1] (Triton needs a dim) and are flattened to the graph's (batch,).
"""
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(double)": np.float64}


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        threads = int(params.get("threads") or 0)
        if threads > 0:
            options.intra_op_num_threads = threads
        if params.get("allow_spinning", "0") != "1":
            for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
                options.add_session_config_entry(key, "0")
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.rank = {i.name: len(i.shape) for i in self.session.get_inputs()}
        self.types = {i.name: ORT_TO_NUMPY[i.type] for i in self.session.get_inputs()}
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]]
        self.batching = int(config.get("max_batch_size", 0)) > 0

    def execute(self, requests):
        groups = {}
        for index, request in enumerate(requests):
            arrays = {}
            for name in self.inputs:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    arrays[name] = tensor.as_numpy()
            key = tuple((n, a.shape[1:]) for n, a in sorted(arrays.items())) if self.batching else index
            groups.setdefault(key, []).append((index, arrays))
        responses = [None] * len(requests)
        for members in groups.values():
            try:
                if len(members) == 1:
                    batched = members[0][1]
                else:
                    batched = {n: np.concatenate([a[n] for _, a in members]) for n in members[0][1]}
                outputs = self.run(batched)
                start = 0
                for index, arrays in members:
                    size = next(iter(arrays.values())).shape[0] if self.batching else None
                    picked = [out[start:start + size] if size is not None else out for out in outputs]
                    tensors = [pb_utils.Tensor(name, np.ascontiguousarray(out).astype(np_dtype))
                               for (name, np_dtype), out in zip(self.outputs, picked)]
                    responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
                    start += size or 0
            except Exception as exc:  # the client gets the error message, the server keeps serving
                error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
                for index, _ in members:
                    responses[index] = pb_utils.InferenceResponse(output_tensors=[], error=error)
        return responses

    def run(self, arrays):
        feeds = {}
        for name, array in arrays.items():
            if self.rank[name] == 1 and array.ndim == 2:
                array = array.reshape(-1)
            feeds[name] = array.astype(self.types[name], copy=False)
        return self.session.run([name for name, _ in self.outputs], feeds)
