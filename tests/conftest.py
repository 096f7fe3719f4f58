"""The unit tests' order: the heaviest files first.

CI runs tests/ on two pytest-xdist workers, one file per worker at a time (`--dist loadfile --no-loadscope-reorder`,
harness/bootstrap.py). A worker takes the next file when it is nearly done with its own, so the stage ends when the
last file handed out ends: with the long files first and the many short ones last, the two workers finish within
seconds of each other. (xdist's own order, most tests first, handed out the few-test, tens-of-seconds files last:
one worker ran them while the other had nothing left.)
"""
from pathlib import Path

# heaviest first: seconds on the 2-core CI VM with the other worker busy, from CI's --durations (2026-12-02) and
# per-file runs of 2026-12-04 (a loaded machine, scaled down); a file not named here takes seconds and runs after
# these, in name order. Only the order matters: a file that grows moves up.
HEAVY_FILES = (
    "test_torch_compile.py",        # ~130 on a fresh clone (two cold compiles of the default matrix), ~50 warm
    "test_triton_backend.py",       # ~110: a Triton server, SD3 served component by component, both protocols
    "test_http_service.py",         # ~75: the service started in both modes, a load sweep
    "test_faults.py",               # ~75: interrupt and resume (three runs), an isolated run, every fault
    "test_ab.py",                   # ~75: an A/B run with a crash and a slowdown, an interrupted A/B
    "test_triton_remote.py",        # ~55: an "external" Triton server, a run against it
    "test_bootstrap.py",            # ~55: a wheelhouse and an offline --use-env install
    "test_memory_scope.py",         # ~50: five fresh workers
    "test_ab_processes.py",         # ~50: two process pairs per side
    "test_embedding.py",            # ~50: every embedding adapter on real weights, a Triton server
    "test_full_models.py",          # ~50: a real sd15 on CPU, four models on meta
    "test_ci_workflow.py",          # ~35: the workflow's shell steps, two runs, a merge, two gates
    "test_quantization.py",         # ~30: a quantised compile, eager runs
    "test_onnx_export.py",          # ~28: every component exported
    "test_onnxruntime.py",          # ~22: image parity of both models
    "test_triton_server.py",        # ~22: servers started and killed
    "test_bad_input.py",            # ~20: bad command lines, some through a process
    "test_preflight.py",            # ~15
    "test_pytest_shard_junit.py",   # ~14: pytest sessions in a subprocess
    "test_compare.py",              # ~12
    "test_report.py",               # ~12: charts
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FILES)}
    here = Path(__file__).parent

    def order(item) -> int:
        path = Path(str(item.fspath))
        if path.parent != here:
            return len(rank) + 1          # not a unit test (suites/): the root conftest orders those
        return rank.get(path.name, len(rank))
    items.sort(key=order)                  # stable: inside a file, and among the light files, the order stays
