"""Triton as users run it. A tritonserver of its own (a separate process, explicit model control, free non-default
ports) plays the remote server; its repository holds only the user's own model, an embedding service written the
way a team would (MiniLM encoder in the python backend, `input_ids` / `attention_mask` -> `embeddings`, dynamic
batching). diffbench sends its own models through Triton's model-load API (config and files, weights included),
runs the case and unloads them (--triton-url); and it benchmarks the user's model as it is served, judged against
the local reference (--triton-model)."""

import pytest

from backends.triton import repository as repo
from backends.triton import server as srv
from backends.triton.backend import load_model
from backends.triton.server import TritonServer, TritonServerError
from backends.base import Unsupported
from backends.triton.served import DoesNotFit, check_batch, fit_encoder
from harness.cli import main
from harness.models.embedding import minilm_folder
from harness.records import read_records

pytestmark = pytest.mark.skipif(bool(srv.missing_reason()), reason=srv.missing_reason() or "ok")

ECHO = '''
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy())])
                for r in requests]
'''


USER_MODEL = "text_embedding"
USER_CONFIG = """name: "text_embedding"
backend: "python"
max_batch_size: 64
input [
  { name: "input_ids", data_type: TYPE_INT64, dims: [ -1 ] },
  { name: "attention_mask", data_type: TYPE_INT64, dims: [ -1 ] }
]
output [
  { name: "embeddings", data_type: TYPE_FP32, dims: [ 384 ] }
]
dynamic_batching { preferred_batch_size: [ 8, 16, 32 ], max_queue_delay_microseconds: 1000 }
instance_group [ { count: 1, kind: KIND_CPU } ]
parameters { key: "model_dir", value: { string_value: "%s" } }
"""
USER_MODEL_PY = '''
import json
import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from transformers import AutoModel


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.encoder = AutoModel.from_pretrained(config["parameters"]["model_dir"]["string_value"]).eval()

    def execute(self, requests):
        responses = []
        for request in requests:
            ids = torch.from_numpy(pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy())
            mask = torch.from_numpy(pb_utils.get_input_tensor_by_name(request, "attention_mask").as_numpy())
            with torch.no_grad():
                hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            embeddings = torch.nn.functional.normalize(pooled, dim=-1).numpy().astype(np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("embeddings", embeddings)]))
        return responses
'''


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    if minilm_folder() is None:
        pytest.skip("the MiniLM package is not installed")
    repository = tmp_path_factory.mktemp("user-repository")
    (repository / USER_MODEL / "1").mkdir(parents=True)
    (repository / USER_MODEL / "config.pbtxt").write_text(USER_CONFIG % minilm_folder())
    (repository / USER_MODEL / "1" / "model.py").write_text(USER_MODEL_PY)
    server = TritonServer(repository, tmp_path_factory.mktemp("log"), load=[USER_MODEL]).start(timeout=300)
    yield server
    server.stop()
    assert [p.name for p in repository.iterdir()] == [USER_MODEL]   # diffbench never wrote where the server looks


def echo_request(tmp_path, name, backend="python"):
    model = repo.ServedModel(name=name, inputs=[repo.TensorSpec("X", "FP32", [-1])],
                             outputs=[repo.TensorSpec("Y", "FP32", [-1])])
    folder = tmp_path / name
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(repo.config_text(model).replace('backend: "python"',
                                                                         f'backend: "{backend}"'))
    (folder / "1" / "model.py").write_text(ECHO)
    return repo.load_request(folder)


def _unset_until_the_end(monkeypatch, *variables):
    """Unset now, and as before after the test, whatever main() exports meanwhile. (A removal of a variable that
    is not set records nothing to undo: --triton-model then leaked into the next test file of this process.)"""
    for variable in variables:
        monkeypatch.setenv(variable, "")
        monkeypatch.delenv(variable)


def test_run_sends_models_and_unloads_them(remote, tmp_path, monkeypatch):
    import tritonclient.grpc as grpcclient
    _unset_until_the_end(monkeypatch, "DIFFBENCH_TRITON_URL", "DIFFBENCH_TRITON_GRPC_URL",
                         "DIFFBENCH_TRITON_METRICS_URL")   # main() exports the options: restored afterwards
    code = main(["run", "--model", "tiny-sd", "--backend", "triton", "--triton-url", f"http://{remote.http_url}",
                 "--triton-grpc-url", remote.grpc_url, "--warmup", "0", "--repeats", "1",
                 "--results-dir", str(tmp_path)])
    (record,) = read_records(next(tmp_path.glob("*/records.jsonl")))
    assert code == 0 and record["status"] == "passed", (record.get("reason"), record["info"].get("traceback"))
    info = record["info"]["triton"]
    assert info["server"] == "external" and info["grpc_url"] == remote.grpc_url
    assert info["delivery"].startswith("model-load request") and info["server_version"].startswith("triton 2.")
    assert info["metrics_url"] == "http://127.0.0.1:8002/metrics"   # defaulted from --triton-url's host
    assert info["served_versions"] == ["1"]
    html = next(tmp_path.glob("*/report.html")).read_text()   # the latency table's `served by` column
    assert f"{info['served']['unet']} v1 on {info['server_version']} at {remote.http_url}" in html
    client = grpcclient.InferenceServerClient(remote.grpc_url)
    try:
        assert not client.is_model_ready(info["served"]["unet"])       # unloaded at the end of the run
        index = client.get_model_repository_index(as_json=True).get("models", [])
        assert [m["name"] for m in index if m.get("state") == "READY"] == [USER_MODEL], index
    finally:
        client.close()
    assert remote.alive()   # an external server is left running


def test_refusals_name_why(remote, tmp_path):
    with pytest.raises(TritonServerError, match="has no onnxruntime backend"):
        load_model(remote, "needs_ort", request=echo_request(tmp_path, "needs_ort", backend="onnxruntime"))

    class PollingServer(TritonServer):   # a server started without --model-control-mode=explicit
        def command(self, backend_dir):
            return [a.replace("--model-control-mode=explicit", "--model-control-mode=none")
                    for a in super().command(backend_dir)]

    (tmp_path / "repo").mkdir()
    with PollingServer(tmp_path / "repo", tmp_path / "log") as polling:
        external = srv.ExternalServer(f"http://{polling.http_url}", polling.grpc_url)
        with pytest.raises(TritonServerError) as info:
            load_model(external, "echo", request=echo_request(tmp_path, "echo"))
    message = str(info.value)
    assert "model control mode is not explicit" in message and "\n" not in message, message


def test_users_served_model_judged_against_local_reference(remote, tmp_path, monkeypatch):
    """Parity against the local reference; the serving sweep, the server's statistics and the model's metrics in
    the record; which server, model and version measured it, in the record and in the rendered report."""
    _unset_until_the_end(monkeypatch, "DIFFBENCH_TRITON_URL", "DIFFBENCH_TRITON_GRPC_URL", "DIFFBENCH_TRITON_MODEL",
                         "DIFFBENCH_TRITON_METRICS_URL", "DIFFBENCH_TRITON_SWEEP", "DIFFBENCH_HTTP_SWEEP")
    code = main(["run", "--model", "minilm-l6", "--backend", "triton+grpc", "--triton-url", remote.http_url,
                 "--triton-grpc-url", remote.grpc_url, "--triton-metrics-url", remote.metrics_url,
                 "--triton-model", USER_MODEL, "--batch", "4", "--seq", "16", "--concurrency", "1,4",
                 "--warmup", "0", "--repeats", "1", "--results-dir", str(tmp_path)])
    (record,) = read_records(next(tmp_path.glob("*/records.jsonl")))
    assert code == 0 and record["status"] == "passed", (record.get("reason"), record["info"].get("traceback"))
    parity = record["parity"]
    assert parity["verdict"] == "pass" and parity["embedding"]["min_cosine"] > 0.999, parity
    assert parity["ranking"]["same_nearest"] == parity["ranking"]["ranked"], parity["ranking"]
    assert "pooled embeddings" in parity["components"]["encoder"]["skipped"]
    info = record["info"]["triton"]
    assert info["served_model"] == USER_MODEL and info["served_versions"] == ["1"]
    assert info["measured_version"] == "1" and info["url"] == remote.http_url
    assert info["output"] == "embeddings FP32 [-1, 384] (pooled)" and info["max_batch_size"] == 64
    assert info["dynamic_batching"]["preferred_batch_size"] == [8, 16, 32]
    assert info["instance_group"] == [{"count": 1, "kind": "KIND_CPU"}]
    assert info["server_version"].startswith("triton 2.")

    serving = record["serving"]
    assert (serving["server"], serving["model"], serving["version"], serving["protocol"]) == \
        (remote.http_url, USER_MODEL, "1", "grpc")
    # the case's own calls (first + 1 measured), 4 sentences each, as the server counted them
    calls = serving["statistics"]["case_calls"]
    assert (calls["server_requests"], calls["inferences"]) == (2, 8), calls
    assert calls["server"]["compute_infer_ms"] > 0
    # the sweep: --concurrency levels, each request the case's 4 sentences at its length
    assert [level["concurrency"] for level in serving["sweep"]] == [1, 4]
    for level in serving["sweep"]:
        assert level["requests"] == level["server_requests"] == max(4, 2 * level["concurrency"]), level
        assert level["inferences"] == 4 * level["requests"] and level["executions"] <= level["requests"]
        assert level["server"]["compute_infer_ms"] > 0 and level["latency"]["n"] == level["requests"]
        assert level["embeddings_per_s"] == pytest.approx(4 * level["throughput_rps"])
    assert serving["batching"]["concurrency"] == 4 and "batched" in serving["batching"]
    # the model's own /metrics series, at least as many successes as the case and the sweep sent
    successes = serving["metrics"]["nv_inference_request_success"]
    (labels, count), = successes.items()
    assert f'model="{USER_MODEL}"' in labels and 'version="1"' in labels
    assert count >= 2 + sum(level["requests"] for level in serving["sweep"]), successes

    html = next(tmp_path.glob("*/report.html")).read_text()
    served_by = f"{USER_MODEL} v1 on {info['server_version']} at {remote.http_url}"
    assert served_by in html   # the embedding table's `served by` column
    assert f"model: {USER_MODEL}, version: 1" in html and f"server: {remote.http_url}" in html   # the serving section


def test_a_served_model_that_does_not_fit_says_why():
    def metadata(inputs, outputs):
        return {"name": "m", "inputs": [{"name": n, "datatype": t, "shape": s} for n, t, s in inputs],
                "outputs": [{"name": n, "datatype": t, "shape": s} for n, t, s in outputs]}
    wanted = ["input_ids", "attention_mask", "token_type_ids"]
    fits = metadata([("input_ids", "INT32", [-1, -1])], [("last_hidden_state", "FP16", [-1, -1, 384])])
    assert not fit_encoder(fits, {"max_batch_size": 8}, wanted).pooled
    check_batch(fit_encoder(fits, {"max_batch_size": 8}, wanted), 8)
    with pytest.raises(Unsupported, match="batch 16 > max_batch_size 8 of served model 'm'"):
        check_batch(fit_encoder(fits, {"max_batch_size": 8}, wanted), 16)
    cases = {"is not token ids": metadata([("pixel_values", "FP32", [-1, 3, 224, 224])], []),
             "is FP32, token tensors are": metadata([("input_ids", "FP32", [-1, -1])], []),
             "has no floating-point output": metadata([("input_ids", "INT64", [-1, -1])],
                                                      [("labels", "INT64", [-1])])}
    for why, described in cases.items():
        with pytest.raises(DoesNotFit, match=why):
            fit_encoder(described, {"max_batch_size": 8}, wanted)
