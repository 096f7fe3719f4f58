"""--triton-url against a server that never saw our files: a tritonserver of its own (a separate process, an empty
model repository, explicit model control, free non-default ports) plays the remote server. diffbench sends its
models through Triton's model-load API (config and files, weights included), runs the case and unloads them."""

import pytest

from backends.triton import repository as repo
from backends.triton import server as srv
from backends.triton.backend import load_model
from backends.triton.server import TritonServer, TritonServerError
from harness.cli import main
from harness.records import read_records

pytestmark = pytest.mark.skipif(bool(srv.missing_reason()), reason=srv.missing_reason() or "ok")

ECHO = '''
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy())])
                for r in requests]
'''


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty-repository")
    server = TritonServer(empty, tmp_path_factory.mktemp("log")).start(timeout=120)
    yield server
    server.stop()
    assert not list(empty.iterdir())   # nothing was ever written where the server looks


def echo_request(tmp_path, name, backend="python"):
    model = repo.ServedModel(name=name, inputs=[repo.TensorSpec("X", "FP32", [-1])],
                             outputs=[repo.TensorSpec("Y", "FP32", [-1])])
    folder = tmp_path / name
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(repo.config_text(model).replace('backend: "python"',
                                                                         f'backend: "{backend}"'))
    (folder / "1" / "model.py").write_text(ECHO)
    return repo.load_request(folder)


def test_run_sends_models_and_unloads_them(remote, tmp_path, monkeypatch):
    import tritonclient.grpc as grpcclient
    for variable in ("DIFFBENCH_TRITON_URL", "DIFFBENCH_TRITON_GRPC_URL", "DIFFBENCH_TRITON_METRICS_URL"):
        monkeypatch.delenv(variable, raising=False)   # main() exports the options: restored afterwards
    code = main(["run", "--model", "tiny-sd", "--backend", "triton", "--triton-url", f"http://{remote.http_url}",
                 "--triton-grpc-url", remote.grpc_url, "--warmup", "0", "--repeats", "1",
                 "--results-dir", str(tmp_path), "--no-report"])
    (record,) = read_records(next(tmp_path.glob("*/records.jsonl")))
    assert code == 0 and record["status"] == "passed", (record.get("reason"), record["info"].get("traceback"))
    info = record["info"]["triton"]
    assert info["server"] == "external" and info["grpc_url"] == remote.grpc_url
    assert info["delivery"].startswith("model-load request") and info["server_version"].startswith("triton 2.")
    assert info["metrics_url"] == "http://127.0.0.1:8002/metrics"   # defaulted from --triton-url's host
    client = grpcclient.InferenceServerClient(remote.grpc_url)
    try:
        assert not client.is_model_ready(info["served"]["unet"])       # unloaded at the end of the run
        index = client.get_model_repository_index(as_json=True).get("models", [])
        assert not [m for m in index if m.get("state") == "READY"], index
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
