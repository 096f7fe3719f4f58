"""A real tritonserver process: lifecycle, failures with the server's own message, asyncio client, batching.

Uses a numpy-only python-backend model (fast to load); the torch components are tested in test_triton_backend.py.
One server is shared by the module; failure tests start their own short-lived ones.
"""
import asyncio
import os
import signal
import socket
import threading
import time

import numpy as np
import psutil
import pytest

from backends.triton import repository as repo
from backends.triton import server as srv
from backends.triton.client import AsyncClient, Client
from backends.triton.serving import model_statistics, scrape_metrics, sweep
from backends.triton.server import TritonServer, TritonServerError

pytestmark = pytest.mark.skipif(bool(srv.missing_reason()), reason=srv.missing_reason() or "ok")

ECHO = '''
import json, time
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        if params.get("fail"):
            raise RuntimeError(params["fail"])
        self.delay = float(params.get("delay_s", "0"))

    def execute(self, requests):
        time.sleep(self.delay)  # once per execution: batched requests share it
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy() * 2)])
                for r in requests]
'''


def write_echo(root, name, **params):
    model = repo.ServedModel(name=name, inputs=[repo.TensorSpec("X", "FP32", [-1])],
                             outputs=[repo.TensorSpec("Y", "FP32", [-1])], max_batch_size=8,
                             preferred_batch_sizes=[4, 8], max_queue_delay_us=20000,
                             parameters={k: str(v) for k, v in params.items()})
    folder = root / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(repo.config_text(model))
    (folder / "1" / "model.py").write_text(ECHO)
    return name


def group_processes(pgid):
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid:
                found.append(p.pid)
        except (ProcessLookupError, PermissionError):
            pass
    return found


def load(server, name):
    client = Client(server, "http")
    try:
        client.raw.load_model(name)
    finally:
        client.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    write_echo(root, "echo")
    write_echo(root, "slow", delay_s=0.05)
    s = TritonServer(root, tmp_path_factory.mktemp("log"), load=["echo", "slow"]).start(timeout=120)
    yield s
    s.stop()


def x(i=1.0):
    return {"X": np.full((1, 3), i, dtype=np.float32)}


def test_health_metadata_and_both_protocols(server):
    assert server.start_s and server.start_s < 120
    for protocol in ("http", "grpc"):
        client = Client(server, protocol)
        try:
            assert client.raw.is_server_live() and client.raw.is_server_ready()
            assert client.raw.is_model_ready("echo")
            meta = client.raw.get_server_metadata()
            meta = meta if isinstance(meta, dict) else {"version": meta.version}
            assert meta["version"].startswith("2.")
            np.testing.assert_array_equal(client.infer("echo", x(3.0), ["Y"])["Y"], np.full((1, 3), 6.0))
        finally:
            client.close()
    # bound to loopback only
    conns = [c for c in psutil.Process(server.proc.pid).net_connections("tcp") if c.status == "LISTEN"]
    assert conns and all(c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1") for c in conns), conns


def test_async_equals_sync_under_concurrency(server):
    sync = Client(server, "http")
    try:
        expected = [sync.infer("echo", x(i), ["Y"])["Y"] for i in range(16)]
    finally:
        sync.close()

    async def main(protocol):
        ticks = 0
        stop = asyncio.Event()

        async def heartbeat():  # keeps ticking only if nothing blocks the event loop
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.005)
        beat = asyncio.create_task(heartbeat())
        async with AsyncClient(server, protocol) as client:
            calls = [asyncio.wait_for(client.infer("slow", x(i), ["Y"]), 30) for i in range(16)]
            results = await asyncio.wait_for(asyncio.gather(*calls), 60)
        stop.set()
        await beat
        return [r["Y"] for r in results], ticks

    for protocol in ("http", "grpc"):
        results, ticks = asyncio.run(main(protocol))
        for got, want in zip(results, expected):
            np.testing.assert_array_equal(got, want)
        assert ticks >= 5, f"{protocol}: event loop was blocked ({ticks} heartbeats)"


def test_async_timeout_is_enforced(server):
    async def main():
        async with AsyncClient(server, "grpc") as client:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.infer("slow", x(), ["Y"]), 0.001)
            # the client still works after a cancelled request
            return (await asyncio.wait_for(client.infer("echo", x(), ["Y"]), 30))["Y"]
    np.testing.assert_array_equal(asyncio.run(main()), np.full((1, 3), 2.0))


def test_dynamic_batching_batches_and_stats(server):
    levels = sweep(server, "slow", lambda i: x(i), ["Y"], levels=(1, 8), requests_per_level=lambda c: 4 * c)
    one, eight = levels
    assert one["requests"] == 4 and eight["requests"] == 32
    assert one["executions"] == 4                     # alone, one request per execution
    assert eight["executions"] < eight["requests"], eight   # under load the dynamic batcher merged requests
    assert any(int(b) > 1 for b in eight["batch_sizes"])
    assert eight["throughput_rps"] > one["throughput_rps"]
    for level in levels:
        assert set(level["server"]) == {"queue_ms", "compute_input_ms", "compute_infer_ms", "compute_output_ms"}
        assert level["server"]["compute_infer_ms"] > 0
        assert {"p50", "p90", "p99", "mean", "std", "min", "max", "n"} <= set(level["latency"])
    metrics = scrape_metrics(server.metrics_url)
    assert any("slow" in labels for labels in metrics["nv_inference_request_success"])


def test_statistics_counters(server):
    client = Client(server, "http")
    try:
        before = model_statistics(client.raw, "echo")
        client.infer("echo", x(), ["Y"])
        after = model_statistics(client.raw, "echo")
    finally:
        client.close()
    assert after["requests"] == before["requests"] + 1


def test_model_load_failure_carries_server_message(server):
    write_echo(server.repository, "broken", fail="boom-from-initialize")
    with pytest.raises(Exception) as info:
        load(server, "broken")
    assert "boom-from-initialize" in str(info.value)
    assert server.alive()


def test_port_taken(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        (tmp_path / "repo").mkdir()
        server = TritonServer(tmp_path / "repo", tmp_path / "log", http_port=port)
        with pytest.raises(TritonServerError) as info:
            server.start(timeout=60)
    message = str(info.value)
    assert "failed to start" in message and "log tail" in message
    assert str(port) in message or "in use" in message.lower()
    assert not server.alive() and not group_processes(server.proc.pid)


def test_port_collision_is_retried(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        ports = iter([taken])
        real = srv.free_port
        monkeypatch.setattr(srv, "free_port", lambda: next(ports, None) or real())
        (tmp_path / "repo").mkdir()
        server = TritonServer(tmp_path / "repo", tmp_path / "log").start(timeout=60)
    try:
        assert server.alive() and server.ports["http"] != taken
        assert list((tmp_path / "log").glob("tritonserver.attempt0.log"))
    finally:
        server.stop()


def test_bad_repository(tmp_path):
    root = tmp_path / "repo"
    (root / "garbled" / "1").mkdir(parents=True)
    (root / "garbled" / "config.pbtxt").write_text("this is { not a model config")
    server = TritonServer(root, tmp_path / "log", load=["garbled"])
    with pytest.raises(TritonServerError) as info:
        server.start(timeout=60)
    assert "garbled" in str(info.value) and "log tail" in str(info.value)
    assert not group_processes(server.proc.pid)
    with pytest.raises(TritonServerError, match="does not exist"):
        TritonServer(tmp_path / "nowhere", tmp_path / "log").start()


def test_killed_mid_sweep_raises_with_log_tail(tmp_path):
    root = tmp_path / "repo"
    write_echo(root, "slow", delay_s=0.05)
    server = TritonServer(root, tmp_path / "log", load=["slow"]).start(timeout=120)
    pgid = server.proc.pid
    killer = threading.Timer(1.0, lambda: os.killpg(pgid, signal.SIGKILL))
    killer.start()
    start = time.perf_counter()
    try:
        with pytest.raises(TritonServerError) as info:
            sweep(server, "slow", lambda i: x(i), ["Y"], levels=(4,), requests_per_level=lambda c: 10_000,
                  budget_s=60, timeout_s=10)
    finally:
        killer.cancel()
        server.stop()
    assert time.perf_counter() - start < 30
    message = str(info.value)
    assert "gone" in message and "log tail" in message and "exit code" in message
    # and a sync call on the dead server fails fast with the same kind of message
    with pytest.raises(TritonServerError, match="gone"):
        Client(server, "http", timeout_s=5).infer("slow", x(), ["Y"])
    assert not group_processes(pgid)


def test_stop_leaves_no_process(tmp_path):
    (tmp_path / "repo").mkdir()
    server = TritonServer(tmp_path / "repo", tmp_path / "log").start(timeout=60)
    pgid = server.proc.pid
    assert group_processes(pgid)
    start = time.perf_counter()
    server.stop()
    assert time.perf_counter() - start < 20
    assert not group_processes(pgid) and not server.alive()
    assert server not in srv._LIVE


def test_no_orphan_when_parent_is_killed(tmp_path):
    """atexit cannot run under SIGKILL: the server must still go (PR_SET_PDEATHSIG)."""
    import subprocess
    import sys
    (tmp_path / "repo").mkdir()
    script = ("import sys, time\n"
              "from backends.triton.server import TritonServer\n"
              "s = TritonServer(sys.argv[1], sys.argv[2]).start(timeout=60)\n"
              "print(s.proc.pid, flush=True)\n"
              "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "repo"), str(tmp_path / "log")],
                              stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        pgid = int(parent.stdout.readline())
        assert group_processes(pgid)
    finally:
        parent.kill()
        parent.wait(10)
    deadline = time.monotonic() + 20
    while group_processes(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_processes(pgid), "tritonserver outlived its killed parent"
