"""harness/ by stage: the folders read like the data flow (docs/architecture.md), no module is a hub that every
path returns to, no import cycle, and a non-editable install carries every module and data file."""
import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "harness"
STAGES = {"selection", "measure", "judge", "verdict", "models"}
MAX_TOP_LEVEL_MODULES = 12
MAX_LINES = 450
STDLIB_ONLY_EXCEPTION = "bootstrap.py"       # runs before any install: one stdlib-only file by design


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in HARNESS.rglob("*.py")}


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The harness modules a module imports anywhere in it (inside functions too)."""
    out = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
    return {m for m in out if m in known}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None
    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_harness_reads_like_the_data_flow():
    top = sorted(p.name for p in HARNESS.glob("*.py"))
    folders = {p.name for p in HARNESS.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    assert folders == STAGES, folders
    too_long = {str(p.relative_to(ROOT)): n for p in HARNESS.rglob("*.py")
                if p.name != STDLIB_ONLY_EXCEPTION and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not too_long, too_long


def test_no_import_cycle_in_harness_counting_imports_inside_functions():
    known = modules()
    graph = {name: imports_of(path, known) - {name} for name, path in known.items()}
    assert graph["harness.measure.case"] >= {"harness.measure.reference", "harness.judge.preflight"}  # it sees
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]   # the search finds one
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_new_stage_folders_do_not_import_their_own_modules_from_init():
    for stage in STAGES - {"models"}:
        init = HARNESS / stage / "__init__.py"
        assert not imports_of(init, modules()), init


def test_a_non_editable_install_carries_every_module_and_data_file(tmp_path):
    """The wheel pip builds from pyproject.toml holds every package's modules and data, and the installed copy
    (not this checkout) loads the embedded default matrix. Cost: ~10 s (one wheel build, no dependencies)."""
    source = tmp_path / "source"           # a copy: a build writes build/ and *.egg-info beside pyproject.toml
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "__pycache__", "results", "build", "*.egg-info",
                                                                "tests", "suites", "docs", "examples"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(tmp_path), str(source)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("diffbench-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {str(p.relative_to(ROOT)) for top in ("harness", "backends", "reports") for p in (ROOT / top).rglob("*")
              if p.is_file() and "__pycache__" not in p.parts and (p.suffix in (".py", ".toml", ".json", ".html")
                                                                    or p.parent.name == "model_templates")}
    assert wanted - names == set()
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)      # a wheel's purelib is its root: what pip install puts in site-packages
    code = ("import harness, harness.cli; from harness.selection.cases import load_matrix; "
            "print(harness.__file__); print(len(load_matrix(None).models))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    where, cases = out.stdout.split()
    assert Path(where).is_relative_to(site) and int(cases) > 0
