"""Install diffbench, then run the main job or the tests. Standard library only: it runs before any install.

    python3 harness/bootstrap.py run  [diffbench run options]   # benchmark the default matrix: records + report
    python3 harness/bootstrap.py test [pytest options]          # unit tests and suites (what CPU CI runs)
    python3 harness/bootstrap.py test --gpu                     # the suites on CUDA: no apt, no Chromium
    python3 harness/bootstrap.py wheelhouse DIR [--gpu] [--python-version 3.12 --platform manylinux_2_28_x86_64]

Where diffbench is installed:
  .venv      (default when the interpreter running this has no CUDA torch) a fresh virtual environment:
             torch==2.13.0 first, then everything pinned through constraints.txt. What CPU CI runs.
  --use-env  (default when it has a CUDA torch) that interpreter's own environment: its torch, and every library
             already inside pyproject.toml's ranges, stay as they are; only what is missing is installed
             (pinned by constraints.txt). No .venv.
Options of the bootstrap itself (everything else goes to `diffbench run` / pytest):
  --use-env | --venv    choose the place, overriding the CUDA-torch rule
  --extras a,b          the extras to install (default: dev,onnx,triton,embedding,lora,quant,service;
                        with a CUDA torch: dev,gpu,embedding,lora,quant,service)
  --wheelhouse DIR      install from DIR only, no index (the same as PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR)
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
STAMP = VENV / ".diffbench-installed"
TORCH = "2.13.0"                                   # the CPU path's torch, installed first from the local wheel
BUILD_REQUIRES = ["setuptools>=68"]                # pyproject.toml [build-system] requires (a test checks it)
CPU_EXTRAS = ("dev", "onnx", "triton", "embedding", "lora", "quant", "service")  # every extra that runs on CPU: what CI installs
GPU_EXTRAS = ("dev", "gpu", "embedding", "lora", "quant", "service")
# The repository's top-level packages, installed under these generic names (the layout is fixed): diffbench
# refuses an environment where another distribution already provides one of them.
TOP_LEVEL = ("harness", "backends", "reports")
REQUIRE_CHROMIUM = "DIFFBENCH_REQUIRE_CHROMIUM"    # set by CI: a missing browser is an error there, not a skip
BROWSER_TEST = "tests/test_report_browser.py"
CHROMIUM = Path("/usr/bin/chromium")               # where the browser test looks for it
UNIT_TEST_WORKERS = 4                              # pytest-xdist workers for tests/, at most (at least 2)
PYTEST_STOP_CODES = (2, 3, 4)                      # interrupted, internal error, usage error


class BootstrapError(Exception):
    """A one-line reason to stop, and the exit code."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


# -- small helpers ------------------------------------------------------------------------------------------------
def sh(cmd: list[str], what: str, env: dict | None = None, hint: str = "") -> None:
    print("+", " ".join(cmd), flush=True)
    try:
        rc = subprocess.run(cmd, env=env, cwd=ROOT).returncode
    except OSError as exc:
        raise BootstrapError(f"{what}: cannot start {cmd[0]}: {exc.strerror or exc}", 1)
    if rc:
        raise BootstrapError(f"{what} failed (exit {rc}){hint}", rc)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def version_key(version: str) -> tuple:
    """Enough of PEP 440 to compare torch versions with a range: release, then a/b/rc/dev before the release."""
    match = re.match(r"v?(\d+(?:\.\d+)*)(?:[._-]?(a|b|rc|c|alpha|beta|pre|preview|dev)[._-]?(\d*))?", version)
    if not match:
        return ((0,), 0, 0)
    release = tuple(int(x) for x in match.group(1).split("."))
    release += (0,) * (6 - len(release))
    rank = {"dev": -4, "a": -3, "alpha": -3, "b": -2, "beta": -2}.get(match.group(2) or "", -1 if match.group(2) else 0)
    return (release, rank, int(match.group(3) or 0))


def in_range(version: str, spec: str) -> bool:
    """`version` satisfies a comma-separated specifier such as '>=2.6,<3' (local labels ignored)."""
    key = version_key(version.split("+")[0])
    ops = {">=": lambda a, b: a >= b, "~=": lambda a, b: a >= b, "<=": lambda a, b: a <= b,
           ">": lambda a, b: a > b, "<": lambda a, b: a < b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        op = next((o for o in ops if clause.startswith(o)), None)
        if op is None:
            continue  # an operator this check does not know: pip will judge it
        if not ops[op](key, version_key(clause[len(op):].strip())):
            return False
    return True


def pyproject() -> dict:
    import tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_spec(name: str) -> str:
    """The version range pyproject.toml states for a core dependency, e.g. '>=2.6,<3' for torch."""
    for requirement in pyproject()["project"]["dependencies"]:
        match = re.match(r"([A-Za-z0-9._-]+)\s*(?:\[[^\]]*\])?\s*([^;]*)", requirement)
        if match and canonical(match.group(1)) == canonical(name):
            return match.group(2).strip()
    return ""


def constraint_pins() -> dict[str, str]:
    """constraints.txt as {canonical name: line}."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            pins[canonical(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0])] = line
    return pins


def fingerprint(*parts: str) -> str:
    h = hashlib.sha256()
    for name in ("pyproject.toml", "constraints.txt"):
        h.update((ROOT / name).read_bytes())
    for part in parts:
        h.update(part.encode())
    return h.hexdigest()


def torch_of(python: str) -> dict | None:
    """The torch an interpreter imports: version, CUDA version and file; None when it has none."""
    probe = ("import json, importlib.util\n"
             "if importlib.util.find_spec('torch') is None:\n    print('null')\nelse:\n"
             "    try:\n        import torch\n"
             "        print(json.dumps({'version': torch.__version__, 'cuda': torch.version.cuda,"
             " 'file': torch.__file__}))\n"
             "    except Exception as exc:\n"
             "        print(json.dumps({'error': f'{type(exc).__name__}: {exc}'.splitlines()[0]}))\n")
    try:
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=600)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def pip_env(wheelhouse: Path | None) -> dict:
    env = dict(os.environ)
    if wheelhouse is not None:
        env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheelhouse))
    return env


def offline_hint(env: dict) -> str:
    if env.get("PIP_NO_INDEX"):
        return f": a wheel is missing from the wheelhouse {env.get('PIP_FIND_LINKS', '')} (see the lines above)"
    return ("; without network, make a wheelhouse on a connected machine (python3 harness/bootstrap.py wheelhouse "
            "DIR) and pass --wheelhouse DIR")


# -- the packages' names ------------------------------------------------------------------------------------------
def top_level_names(dist: metadata.Distribution) -> set[str]:
    text = dist.read_text("top_level.txt")
    if text is not None:
        return {line.strip() for line in text.splitlines() if line.strip()}
    names = set()
    for file in dist.files or ():
        first = file.parts[0] if file.parts else ""
        if first.endswith(".py"):
            names.add(first[:-3])
        elif first and not first.endswith((".dist-info", ".egg-info", ".data", ".pth")) and len(file.parts) > 1 \
                and first not in ("..", "__pycache__"):
            names.add(first)
    return names


def foreign_owners() -> list[str]:
    """Installed distributions other than diffbench that provide harness/, backends/ or reports/."""
    found = []
    for dist in metadata.distributions():
        name = dist.metadata["Name"] or "?"
        if canonical(name) == "diffbench":
            continue
        for top in sorted(top_level_names(dist) & set(TOP_LEVEL)):
            found.append(f"{name} {dist.version} provides '{top}'")
    return sorted(set(found))


def check_top_level_names() -> None:
    owners = foreign_owners()
    if owners:
        raise BootstrapError(f"this environment already has a package named like diffbench's top-level packages "
                             f"({'; '.join(owners)}): installing would shadow it; run without --use-env to get "
                             f"a separate .venv")


# -- installing -----------------------------------------------------------------------------------------------------
def extras_arg(extras: tuple[str, ...]) -> str:
    return f"[{','.join(extras)}]" if extras else ""


def install_venv(extras: tuple[str, ...], wheelhouse: Path | None) -> str:
    """The CPU path: a fresh .venv, torch==2.13.0 first, everything pinned. Returns the interpreter."""
    env = pip_env(wheelhouse)
    stamp = fingerprint(*extras)
    if not PY.exists():
        # no --system-site-packages: made from a venv it would see the base interpreter, not the parent venv
        sh([sys.executable, "-m", "venv", str(VENV)], "creating .venv")
    if STAMP.exists() and STAMP.read_text() == stamp:
        return str(PY)
    # --no-compile: pip would byte-compile all ~18,000 modules (~50 s on two cores); the ~4,000 ever imported are
    # compiled on first import instead (see main: bytecode writing stays on for processes in .venv)
    pip = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "--no-compile"]
    sh([*pip, f"torch=={TORCH}"], f"installing torch=={TORCH}", env, offline_hint(env))
    sh([*pip, "-c", str(ROOT / "constraints.txt"), "-e", f"{ROOT}{extras_arg(extras)}"], "installing diffbench",
       env, offline_hint(env))
    STAMP.write_text(stamp)
    return str(PY)


def use_env_constraints(torch_version: str, folder: Path) -> Path:
    """constraints.txt without the libraries this environment already has, and its own torch pinned."""
    installed = {canonical(d.metadata["Name"] or "") for d in metadata.distributions()}
    lines = [line for name, line in constraint_pins().items() if name not in installed and name != "torch"]
    lines.append(f"torch=={torch_version}")
    path = folder / "constraints.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def check_onnxruntime(extras: tuple[str, ...]) -> None:
    """onnxruntime and onnxruntime-gpu install the same files: never both in one environment."""
    have = {canonical(d.metadata["Name"] or "") for d in metadata.distributions()}
    if "gpu" in extras and "onnx" in extras:
        raise BootstrapError("--extras: choose onnx (onnxruntime) or gpu (onnxruntime-gpu), not both")
    if "gpu" in extras and "onnxruntime" in have:
        raise BootstrapError("this environment has onnxruntime, and the gpu extra installs onnxruntime-gpu over "
                             "the same files: pip uninstall onnxruntime first, or use --extras without gpu")
    if "onnx" in extras and "onnxruntime-gpu" in have:
        raise BootstrapError("this environment has onnxruntime-gpu, and the onnx extra would install onnxruntime "
                             "over the same files: use --extras dev,gpu")


def diffbench_points_here() -> bool:
    """Is diffbench installed in this environment, editable from this checkout?"""
    for dist in metadata.distributions(name="diffbench"):
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
        if direct.get("url", "").rstrip("/") == ROOT.as_uri().rstrip("/"):
            return True
    return False


def install_env(extras: tuple[str, ...], wheelhouse: Path | None) -> str:
    """--use-env: install into this interpreter's environment, keeping its torch. Returns the interpreter."""
    python = sys.executable
    env = pip_env(wheelhouse)
    check_top_level_names()
    if importlib.util.find_spec("pip") is None:
        raise BootstrapError(f"{python} has no pip: install it (python3 -m ensurepip) or run without --use-env")
    check_onnxruntime(extras)
    torch = this_torch()
    if torch and "error" in torch:
        raise BootstrapError(f"this environment's torch does not import ({torch['error']})")
    if torch is None:
        print(f"bootstrap: this environment has no torch: installing torch=={TORCH}", flush=True)
        sh([python, "-m", "pip", "install", "--disable-pip-version-check", f"torch=={TORCH}"],
           f"installing torch=={TORCH}", env, offline_hint(env))
        torch = torch_of(python)
        if not torch or "error" in torch:
            raise BootstrapError(f"torch=={TORCH} was installed but does not import", 1)
    spec = requirement_spec("torch")
    if spec and not in_range(torch["version"], spec):
        raise BootstrapError(f"this environment's torch {torch['version']} is outside diffbench's supported range "
                             f"torch{spec}; run without --use-env to get a .venv with torch {TORCH}")
    print(f"bootstrap: keeping this environment's torch {torch['version']} (CUDA {torch['cuda'] or 'none'}) "
          f"at {Path(torch['file']).parent}", flush=True)
    stamp_file = ROOT / ".cache" / "bootstrap" / f"env-{hashlib.sha256(sys.prefix.encode()).hexdigest()[:16]}"
    stamp = fingerprint(*extras, torch["version"], torch["file"])
    if stamp_file.is_file() and stamp_file.read_text() == stamp and diffbench_points_here():
        return python
    with tempfile.TemporaryDirectory(prefix="diffbench-bootstrap-") as tmp:
        constraints = use_env_constraints(torch["version"], Path(tmp))
        sh([python, "-m", "pip", "install", "--disable-pip-version-check", "-c", str(constraints),
            "-e", f"{ROOT}{extras_arg(extras)}"], "installing diffbench into this environment", env,
           offline_hint(env))
    after = torch_of(python) or {}
    if (after.get("version"), after.get("file")) != (torch["version"], torch["file"]):
        raise BootstrapError(f"pip replaced this environment's torch {torch['version']} with "
                             f"{after.get('version')} at {after.get('file')}", 1)
    stamp_file.parent.mkdir(parents=True, exist_ok=True)
    stamp_file.write_text(stamp)
    return python


# -- Chromium, for the report's browser test --------------------------------------------------------------------------
def ensure_chromium() -> list[str]:
    """Debian's chromium for tests/test_report_browser.py. Returns extra pytest arguments: none, or the browser
    test left out (said on one line) where chromium is missing and cannot be installed here."""
    if CHROMIUM.exists():
        return []
    problem = None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        problem = "not root or no apt-get"
    else:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]):
            print("+", " ".join(cmd), flush=True)
            try:
                rc = subprocess.run(cmd, env=env).returncode
            except OSError as exc:
                rc, problem = None, f"{cmd[0]}: {exc.strerror or exc}"
            if rc:
                problem = f"`{' '.join(cmd[:2])}` failed (exit {rc}; offline?)"
            if problem:
                break
    if problem is None and CHROMIUM.exists():
        return []
    problem = problem or f"apt-get installed no {CHROMIUM}"
    if os.environ.get(REQUIRE_CHROMIUM):
        raise BootstrapError(f"chromium is missing and could not be installed ({problem}); {BROWSER_TEST} needs it",
                             1)
    print(f"bootstrap: chromium is missing and could not be installed ({problem}): leaving out {BROWSER_TEST}, "
          f"the report's browser test (install Debian's chromium to run it)", flush=True)
    return [f"--ignore={BROWSER_TEST}"]


# -- the wheelhouse -------------------------------------------------------------------------------------------------
def platform_tags(platform: str) -> list[str]:
    """pip matches --platform exactly: give every older manylinux tag a manylinux_2_X machine also runs."""
    match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not match:
        return [platform]
    minor, arch = int(match.group(1)), match.group(2)
    tags = [f"manylinux_2_{m}_{arch}" for m in range(minor, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags += [f"{name}_{arch}" for m, name in legacy.items() if m <= minor]
    return tags


def only_torch_needs(report: dict) -> set[str]:
    """Packages of a pip report reached from the requested requirements only through torch."""
    items = {canonical(i["metadata"]["name"]): i for i in report["install"]}
    keep, todo = set(), [n for n, i in items.items() if i.get("requested") and n != "torch"]
    while todo:
        name = todo.pop()
        if name in keep or name not in items or name == "torch":
            continue
        keep.add(name)
        for requirement in items[name]["metadata"].get("requires_dist") or ():
            match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
            if match:  # markers are ignored: this may keep a few extra wheels, never drop a needed one
                todo.append(canonical(match.group(0)))
    return set(items) - keep


def make_wheelhouse(argv: list[str]) -> int:
    """Download every wheel a later install needs into DIR (for this machine, or for --python-version/--platform)."""
    args, positional = take_options(argv, flags=("--gpu", "--use-env", "--venv"),
                                     values=("--python-version", "--platform", "--extras"))
    if len(positional) != 1:
        raise BootstrapError("usage: python3 harness/bootstrap.py wheelhouse DIR [--gpu] [--use-env] "
                             "[--extras a,b] [--python-version 3.12 --platform manylinux_2_28_x86_64]")
    target = Path(positional[0]).resolve()
    other_machine = bool(args.get("--python-version") or args.get("--platform"))
    use_env = not other_machine and not args.get("--venv") and (bool(args.get("--use-env")) or has_cuda_torch())
    gpu = bool(args.get("--gpu")) or (use_env and has_cuda_torch())
    extras = parse_extras(args.get("--extras"), gpu)
    report_file = Path(tempfile.mkdtemp(prefix="diffbench-wheelhouse-")) / "report.json"
    pip = [sys.executable, "-m", "pip"]
    select = ["--only-binary=:all:"]               # an offline install must never need to build a dependency
    if other_machine:
        if args.get("--python-version"):
            select += ["--python-version", args["--python-version"]]
        for tag in platform_tags(args.get("--platform") or ""):
            select += ["--platform", tag] if tag else []
    try:
        if use_env:
            # what an install into this environment would add: resolved against what it already has
            torch = this_torch()
            if not torch or "error" in torch:
                raise BootstrapError("--use-env: this environment has no working torch to keep")
            constraints = use_env_constraints(torch["version"], report_file.parent)
            resolve = [*pip, "install", "--dry-run", "--quiet", "--report", str(report_file), *select,
                       "-c", str(constraints)]
        else:
            resolve = [*pip, "install", "--dry-run", "--quiet", "--ignore-installed", "--report", str(report_file),
                       "-c", str(ROOT / "constraints.txt"), *select]
            if other_machine:  # pip takes --platform only with --target (nothing is written: --dry-run)
                resolve += ["--target", str(report_file.parent / "target")]
        sh([*resolve, f"{ROOT}{extras_arg(extras)}"], "resolving the wheels", hint=offline_hint(os.environ))
        report = json.loads(report_file.read_text())
        leave_out = {"diffbench"} | (only_torch_needs(report) if gpu and not use_env else set())
        urls = [i["download_info"]["url"] for i in report["install"]
                if canonical(i["metadata"]["name"]) not in leave_out]
        target.mkdir(parents=True, exist_ok=True)
        download = [*pip, "download", "--quiet", "--no-deps", "--dest", str(target), *select]
        if urls:
            sh([*download, *urls], "downloading the wheels", hint=offline_hint(os.environ))
        # the build backend, for the editable install of this checkout (pip builds it in an isolated env)
        sh([*download, *BUILD_REQUIRES], "downloading the build backend", hint=offline_hint(os.environ))
    finally:
        shutil.rmtree(report_file.parent, ignore_errors=True)
    not_wheels = sorted(p.name for p in target.iterdir() if p.is_file() and not p.name.endswith(".whl"))
    if not_wheels:
        raise BootstrapError(f"these downloads are not wheels and would need building offline: {', '.join(not_wheels)}",
                             1)
    wheels = sorted(target.glob("*.whl"))
    size = sum(p.stat().st_size for p in wheels) / 1e6
    kept = "this environment's torch kept" if use_env else ("no torch (the runner keeps its own)" if gpu
                                                            else "torch included")
    print(f"bootstrap: wheelhouse {target}: {len(wheels)} wheels, {size:.0f} MB, extras {','.join(extras)}, {kept}. "
          f"Install offline with: python3 harness/bootstrap.py run|test --wheelhouse {target}", flush=True)
    return 0


# -- the command line -------------------------------------------------------------------------------------------------
def take_options(argv: list[str], flags: tuple[str, ...], values: tuple[str, ...]) -> tuple[dict, list[str]]:
    """Split the bootstrap's own options from the rest (which goes on to diffbench / pytest)."""
    taken, rest, i = {}, [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if arg in flags:
            taken[arg] = True
        elif name in values:
            if not eq:
                if i + 1 >= len(argv):
                    raise BootstrapError(f"{name} needs a value")
                i, value = i + 1, argv[i + 1]
            taken[name] = value
        else:
            rest.append(arg)
        i += 1
    return taken, rest


_THIS_TORCH: list = []


def this_torch() -> dict | None:
    """torch_of(this interpreter) before anything is installed (importing torch takes seconds: asked once)."""
    if not _THIS_TORCH:
        _THIS_TORCH.append(torch_of(sys.executable))
    return _THIS_TORCH[0]


def has_cuda_torch() -> bool:
    torch = this_torch()
    return bool(torch and torch.get("cuda"))


def parse_extras(text: str | None, gpu: bool) -> tuple[str, ...]:
    if not text:
        return GPU_EXTRAS if gpu else CPU_EXTRAS
    extras = tuple(e.strip() for e in text.split(",") if e.strip())
    known = set(pyproject()["project"].get("optional-dependencies", {}))
    unknown = [e for e in extras if e not in known]
    if unknown:
        raise BootstrapError(f"--extras: unknown extra {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return extras


def choose_place(own: dict) -> tuple[bool, tuple[str, ...]]:
    """(install into this interpreter's environment?, extras): --use-env / --venv, else by the CUDA-torch rule."""
    use_env = bool(own.get("--use-env")) or (not own.get("--venv") and has_cuda_torch())
    return use_env, parse_extras(own.get("--extras"), gpu=use_env and has_cuda_torch())


def process_env(use_env: bool) -> dict:
    """The environment of the processes the bootstrap starts: this checkout first on the path and, in .venv,
    bytecode written on first import (.venv is installed without it: with PYTHONDONTWRITEBYTECODE every process
    would compile every module it imports again, 22 s instead of 8 s for diffusers' imports)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not use_env:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def run_command(python: str, rest: list[str]) -> list[str]:
    return [python, "-m", "harness.cli", "run", *rest]


def testing_stages(python: str, rest: list[str]) -> list[tuple[list[str], dict]]:
    """`test`: (pytest command, extra environment) for each stage, run one after the other.

    On CPU: the unit tests first, several at a time (pytest-xdist, one file per worker, one torch thread each: they
    check behaviour, not speed, and spend much of their time waiting on the processes they start), then the suites
    alone on the machine with its usual threads (they time every case; pytest-benchmark is off under xdist).
    With --gpu: the suites only."""
    if "--gpu" in rest:
        # the GPU-relevant suites: no apt, no Chromium (the unit tests and the browser test are CPU CI's)
        return [([python, "-m", "pytest", "suites", *rest], {})]
    workers = str(max(2, min(UNIT_TEST_WORKERS, os.cpu_count() or 1)))
    # one file per worker at a time, in tests/conftest.py's order (the heaviest files first), not xdist's own
    return [([python, "-m", "pytest", "tests", "-n", workers, "--dist", "loadfile", "--no-loadscope-reorder",
              *ensure_chromium(), *rest],
             {"OMP_NUM_THREADS": "1"}),
            ([python, "-m", "pytest", "suites", *rest], {})]


def combined_exit_code(codes: list[int]) -> int:
    """One exit code for the stages: the first failure's; pytest's 5 (nothing collected) only when every stage
    collected nothing (a -k that matches only unit tests leaves the suites empty, and that is fine)."""
    ran = [code for code in codes if code != 5]
    if not ran:
        return 5
    return next((code for code in ran if code), 0)


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 11):
        raise BootstrapError(f"diffbench needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    if not argv or argv[0] not in ("run", "test", "wheelhouse"):
        raise BootstrapError("usage: python3 harness/bootstrap.py run|test|wheelhouse [options]")
    if argv[0] == "wheelhouse":
        return make_wheelhouse(argv[1:])
    own, rest = take_options(argv[1:], flags=("--use-env", "--venv"), values=("--extras", "--wheelhouse"))
    if own.get("--use-env") and own.get("--venv"):
        raise BootstrapError("choose --use-env or --venv, not both")
    wheelhouse = None
    if own.get("--wheelhouse"):
        wheelhouse = Path(own["--wheelhouse"]).expanduser().resolve()
        if not wheelhouse.is_dir():
            raise BootstrapError(f"--wheelhouse {wheelhouse} is not a folder")
    use_env, extras = choose_place(own)
    if use_env and not own.get("--use-env"):
        print(f"bootstrap: {sys.executable} has a CUDA torch: installing into its environment (--use-env; "
              f"--venv for a separate .venv)", flush=True)
    python = install_env(extras, wheelhouse) if use_env else install_venv(extras, wheelhouse)
    env = process_env(use_env)
    if argv[0] == "run":
        cmd = run_command(python, rest)
        print("+", " ".join(cmd), flush=True)
        return subprocess.run(cmd, cwd=ROOT, env=env).returncode
    codes = []
    for cmd, stage_env in testing_stages(python, rest):
        print("+", " ".join([*(f"{k}={v}" for k, v in stage_env.items()), *cmd]), flush=True)
        codes.append(subprocess.run(cmd, cwd=ROOT, env={**env, **stage_env}).returncode)
        if codes[-1] in PYTEST_STOP_CODES:
            break       # interrupted, internal or usage error: the next stage would meet the same
    return combined_exit_code(codes)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BootstrapError as exc:
        print(f"bootstrap: error: {exc}", file=sys.stderr)
        sys.exit(exc.code)
    except KeyboardInterrupt:
        sys.exit(130)
