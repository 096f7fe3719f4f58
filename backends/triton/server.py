"""Lifecycle of a local tritonserver process (the binary bundled in nvidia-pytriton), or an external server by URL.

The bundled server has only the python backend. Like PyTriton, we give it a backend directory holding the python
backend plus the stub built for this interpreter's version, and run the stub with this interpreter's environment:
its own lib dir first in LD_LIBRARY_PATH (Debian's system libpython crashes the stub) and its bin dir
first in PATH (the embedded interpreter finds the venv's site-packages from there).

Never an orphan: the server runs in its own session (process group); stop() sends SIGTERM to the group, then
SIGKILL after a timeout, and every started server is stopped at interpreter exit.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Iterable

HOST = "127.0.0.1"
LOG_TAIL_LINES = 25


class TritonServerError(RuntimeError):
    """The server failed (start, load, crash). The message's first line is a summary with the server's own key
    error line; the tail of the server log follows."""


def pytriton_dir() -> Path | None:
    try:
        import importlib.util
        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def server_binary() -> Path | None:
    """The bundled tritonserver, or $DIFFBENCH_TRITONSERVER (e.g. a full build)."""
    override = os.environ.get("DIFFBENCH_TRITONSERVER")
    if override:
        return Path(override) if Path(override).is_file() else None
    root = pytriton_dir()
    if root is None:
        return None
    binary = root / "tritonserver" / "bin" / "tritonserver"
    return binary if binary.is_file() else None


def stub_path() -> Path | None:
    root = pytriton_dir()
    if root is None:
        return None
    stub = root / "tritonserver" / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" \
        / "triton_python_backend_stub"
    return stub if stub.is_file() else None


def libs_dir() -> Path | None:
    """The shared libraries PyTriton's wheel vendors for the server (auditwheel's '<dist>.libs')."""
    root = pytriton_dir()
    if root is None:
        return None
    libs = root.parent / "nvidia_pytriton.libs"
    return libs if libs.is_dir() else None


def missing_reason() -> str:
    """Why no local server can be started here ('' when one can)."""
    if server_binary() is None:
        return "tritonserver binary not found (install nvidia-pytriton or set DIFFBENCH_TRITONSERVER)"
    if stub_path() is None:
        return f"no python backend stub for Python {sys.version_info[0]}.{sys.version_info[1]} in nvidia-pytriton"
    return ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def server_env() -> dict[str, str]:
    env = os.environ.copy()
    libdirs = [sysconfig.get_config_var("LIBDIR") or ""]
    if libs_dir():
        libdirs.append(str(libs_dir()))
    if env.get("LD_LIBRARY_PATH"):
        libdirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(d for d in libdirs if d)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    # the stub runs torch: the models' own thread settings come from the config; keep tokenizers quiet
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _prepare_backend_dir(work: Path) -> Path:
    """<work>/backends/python = the bundled python backend + the stub for this interpreter (what PyTriton does)."""
    src = pytriton_dir() / "tritonserver" / "backends" / "python"
    dst = work / "backends" / "python"
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file():
            shutil.copy2(item, dst / item.name)
    shutil.copy2(stub_path(), dst / "triton_python_backend_stub")
    return work / "backends"


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no server log)"
    return "\n".join(text[-lines:])


def key_error_line(log_text: str) -> str:
    """The server's most telling line: the last error (E...) line, else the last line."""
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln[:1] == "E" and ln[1:5].isdigit() or "error" in ln.lower()]
    return (errors or lines or [""])[-1][:400]


def _die_with_parent():
    """atexit does not run when we are killed (SIGTERM/SIGKILL from a CI timeout): ask Linux to SIGTERM the server
    when its parent dies. The signal fires when the *thread* that started it ends, so only from the main thread."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec():
        libc.prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    return preexec


_LIVE: "weakref.WeakSet[TritonServer]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop(timeout=5)


class TritonServer:
    """A local tritonserver subprocess in explicit model-control mode, bound to 127.0.0.1."""

    external = False

    def __init__(self, repository: str | Path, log_dir: str | Path, *, http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None, load: Iterable[str] = (),
                 shm_bytes: int = 16 * 1024 * 1024, verbose: int = 0):
        self.repository = Path(repository).resolve()   # the server runs in its own working directory
        self.log_dir = Path(log_dir).resolve()
        self.fixed_ports = (http_port, grpc_port, metrics_port)
        self.load = list(load)
        self.shm_bytes = shm_bytes
        self.verbose = verbose
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self.log_path = self.log_dir / "tritonserver.log"
        self.start_s: float | None = None
        self._work: Path | None = None
        self._lock = threading.Lock()

    # -- endpoints --------------------------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"{HOST}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.ports['metrics']}/metrics"

    def alive(self, grace_s: float = 0.0) -> bool:
        """Whether tritonserver is running; with grace_s, wait up to that long for a dying one to exit."""
        if self.proc is None:
            return False
        if grace_s > 0:
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                return True
        return self.proc.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return tail(self.log_path, lines)

    def stubs(self) -> dict[int, str]:
        """pid -> model name of the python backend's stub processes (one per model instance, children of the
        server): a stub is started with its model's file, <repository>/<model>/<version>/model.py."""
        import psutil
        out = {}
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except (psutil.Error, AttributeError):
            return out
        for child in children:
            try:
                args = child.cmdline()
            except psutil.Error:
                continue
            for arg in args[1:]:
                path = Path(arg)
                if path.is_absolute() and path.is_relative_to(self.repository):
                    out[child.pid] = path.relative_to(self.repository).parts[0]
                    break
        return out

    def error(self, summary: str) -> TritonServerError:
        """An exception carrying the server's key error line and its log tail."""
        log = self.log_tail()
        state = "" if self.alive() or self.proc is None else f" (tritonserver exit code {self.proc.returncode})"
        return TritonServerError(f"{summary}{state}: {key_error_line(log)}\n--- tritonserver log tail "
                                 f"({self.log_path}) ---\n{log}")

    # -- lifecycle --------------------------------------------------------------------------------------------
    def command(self, backend_dir: Path) -> list[str]:
        http, grpc, metrics = (self.ports[k] for k in ("http", "grpc", "metrics"))
        # a unique shm prefix: two servers on one machine must not share the python backend's regions
        shm_prefix = f"diffbench{os.getpid()}_{http}_"
        cmd = [str(server_binary()), f"--model-repository={self.repository}",
               "--model-control-mode=explicit", "--strict-readiness=true", "--exit-on-error=true",
               f"--backend-directory={backend_dir}",
               f"--backend-config=python,shm-default-byte-size={self.shm_bytes}",
               f"--backend-config=python,shm-growth-byte-size={self.shm_bytes}",
               f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
               f"--http-address={HOST}", f"--http-port={http}",
               f"--grpc-address={HOST}", f"--grpc-port={grpc}",
               f"--metrics-address={HOST}", f"--metrics-port={metrics}",
               "--allow-metrics=true", "--allow-cpu-metrics=true", "--allow-gpu-metrics=false",
               "--exit-timeout-secs=10", f"--log-verbose={self.verbose}"]
        cmd += [f"--load-model={name}" for name in self.load]
        return cmd

    def start(self, timeout: float = 120.0, attempts: int = 3) -> "TritonServer":
        """Start and wait until ready. Free ports are picked and retried on collision (triton has no port 0)."""
        reason = missing_reason()
        if reason:
            raise TritonServerError(reason)
        if not self.repository.is_dir():
            raise TritonServerError(f"model repository {self.repository} does not exist")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._work = Path(tempfile.mkdtemp(prefix="tritonserver-", dir=self.log_dir))
        backend_dir = _prepare_backend_dir(self._work)
        fixed = any(p is not None for p in self.fixed_ports)
        t0 = time.perf_counter()
        for attempt in range(1 if fixed else attempts):
            self.ports = dict(zip(("http", "grpc", "metrics"),
                                  (p if p is not None else free_port() for p in self.fixed_ports)))
            try:
                self._launch(backend_dir, timeout)
                self.start_s = time.perf_counter() - t0
                return self
            except TritonServerError as exc:
                collision = "already in use" in str(exc).lower()   # triton: "Socket '...' already in use"
                if fixed or not collision or attempt == attempts - 1:
                    raise
                os.replace(self.log_path, self.log_dir / f"tritonserver.attempt{attempt}.log")
        raise AssertionError("unreachable")

    def _launch(self, backend_dir: Path, timeout: float) -> None:
        with open(self.log_path, "wb") as log:
            # argument list, no shell; own session so stop() can signal the whole group (server + stubs)
            self.proc = subprocess.Popen(self.command(backend_dir), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=server_env(), start_new_session=True,
                                         cwd=self._work, preexec_fn=_die_with_parent())
        _LIVE.add(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self.error("tritonserver failed to start")
            if self._ready():
                return
            time.sleep(0.1)
        self.stop()
        raise self.error(f"tritonserver not ready after {timeout:g} s")

    def _ready(self) -> bool:
        import http.client
        conn = http.client.HTTPConnection(HOST, self.ports["http"], timeout=1.0)
        try:
            conn.request("GET", "/v2/health/ready")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM to the process group, SIGKILL after `timeout`; returns the exit code."""
        with self._lock:
            proc = self.proc
            if proc is None:
                return None
            if proc.poll() is None:
                self._signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._signal(signal.SIGKILL)
                    proc.wait(10)
            # stubs left behind by a crashed server are in the same group: kill them and wait until they are gone
            self._signal(signal.SIGKILL)
            deadline = time.monotonic() + 10
            while self._signal(0) and time.monotonic() < deadline:
                time.sleep(0.05)
            _LIVE.discard(self)
            if self._work is not None:
                shutil.rmtree(self._work, ignore_errors=True)
                self._work = None
            return proc.returncode

    def _signal(self, sig: int) -> bool:
        """Signal the server's process group; False when the group is empty."""
        try:
            os.killpg(self.proc.pid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        self.stop()


class ExternalServer:
    """A server someone else runs (--triton-url): nothing to start or stop, no log of ours. Its gRPC and metrics
    endpoints default to Triton's ports 8001 and 8002 on the same host."""

    external = True

    def __init__(self, url: str, grpc_url: str | None = None, metrics_url: str | None = None):
        self.http_url = _host_port(url)
        host = self.http_url.rsplit(":", 1)[0]
        self.grpc_url = _host_port(grpc_url) if grpc_url else f"{host}:8001"
        self.metrics_url = metrics_url or f"http://{host}:8002/metrics"
        self.start_s = 0.0
        self.proc = None
        self.log_path = None

    def alive(self, grace_s: float = 0.0) -> bool:
        return True

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "(external server: its log is not ours)"

    def error(self, summary: str) -> TritonServerError:
        return TritonServerError(f"{summary} (external server {self.http_url})")

    def stop(self, timeout: float = 0) -> None:
        return None


def _host_port(url: str) -> str:
    """host:port, as tritonclient takes it, from a URL with or without a scheme."""
    url = url.strip().rstrip("/")
    for prefix in ("http://", "https://", "grpc://"):
        url = url.removeprefix(prefix)
    return url
