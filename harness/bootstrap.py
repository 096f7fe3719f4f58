"""Set up .venv if needed, then run the main job or the tests. Standard library only (runs before any install).

    python3 harness/bootstrap.py run  [diffbench run options]   # benchmark the default matrix, write records+report
    python3 harness/bootstrap.py test [pytest options]          # the test suites

torch==2.13.0 is installed FIRST and pinned through constraints.txt, so no other package can pull a CUDA build
on a CPU machine. On a GPU runner whose python already has a CUDA torch, the venv sees it and keeps it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
STAMP = VENV / ".diffbench-installed"
TORCH = "2.13.0"


def sh(*cmd: str, **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def system_cuda_torch() -> str | None:
    """The version of an already-installed CUDA torch in the interpreter running us, if any."""
    probe = "import torch; print(torch.__version__ if torch.version.cuda else '')"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    return out.stdout.strip() or None if out.returncode == 0 else None


def install_fingerprint() -> str:
    h = hashlib.sha256()
    for name in ("pyproject.toml", "constraints.txt"):
        h.update((ROOT / name).read_bytes())
    return h.hexdigest()


def ensure_venv() -> None:
    cuda_torch = system_cuda_torch()
    if not PY.exists():
        args = [sys.executable, "-m", "venv", str(VENV)]
        if cuda_torch:
            args.insert(3, "--system-site-packages")
        sh(*args)
    if STAMP.exists() and STAMP.read_text() == install_fingerprint():
        return
    pip = [str(PY), "-m", "pip", "install", "--disable-pip-version-check"]
    constraints = ROOT / "constraints.txt"
    if cuda_torch:
        # keep the runner's CUDA torch: pin the constraint to it instead of the CPU wheel
        text = constraints.read_text().replace(f"torch=={TORCH}", f"torch=={cuda_torch}")
        tmp = Path(tempfile.mkdtemp()) / "constraints.txt"
        tmp.write_text(text)
        constraints = tmp
        extras = "[dev,gpu]"
    else:
        sh(*pip, f"torch=={TORCH}")
        extras = "[dev]"
    sh(*pip, "-c", str(constraints), "-e", f"{ROOT}{extras}", cwd=ROOT)
    STAMP.write_text(install_fingerprint())


def ensure_chromium() -> None:
    """The report test renders the page in Debian's headless Chromium."""
    if shutil.which("chromium") or Path("/usr/bin/chromium").exists():
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        sh("apt-get", "update", "-q", env=env)
        sh("apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium", env=env)
    else:
        print("bootstrap: chromium is missing; install Debian's 'chromium' package for the report test",
              file=sys.stderr)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("run", "test"):
        print("usage: python3 harness/bootstrap.py run|test [options]", file=sys.stderr)
        return 2
    ensure_venv()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if argv[0] == "run":
        cmd = [str(VENV / "bin" / "diffbench"), "run", *argv[1:]]
    else:
        ensure_chromium()
        cmd = [str(PY), "-m", "pytest", "tests", "suites", *argv[1:]]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
