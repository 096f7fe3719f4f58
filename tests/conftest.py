"""The unit tests' order: the heaviest files first.

CI runs tests/ on two pytest-xdist workers, one file per worker at a time (`--dist loadfile --no-loadscope-reorder`,
harness/bootstrap.py). A worker takes the next file when it is nearly done with its own, so the stage ends when the
last file handed out ends: with the long files first and the many short ones last, the two workers finish within
seconds of each other. (xdist's own order, most tests first, handed out the few-test, tens-of-seconds files last:
one worker ran them while the other had nothing left.)
"""
from pathlib import Path

# heaviest first, seconds on the 2-core CI VM with the other worker busy (CI's --durations, 2026-12-02 and -04);
# a file not named here takes a few seconds and runs after these, in name order
HEAVY_FILES = (
    "test_triton_backend.py",       # ~110: a Triton server, SD3 served component by component, both protocols
    "test_torch_compile.py",        # ~100: the default matrix's torch.compile cases into the shared inductor cache
    "test_faults.py",               # ~75: interrupt and resume (three runs), an isolated run, every fault
    "test_ab.py",                   # ~75: an A/B run with a crash and a slowdown, an interrupted A/B
    "test_bootstrap.py",            # ~55: a wheelhouse and an offline --use-env install
    "test_memory_scope.py",         # ~50: five fresh workers
    "test_ab_processes.py",         # ~50: two process pairs per side
    "test_embedding.py",            # ~50: every embedding adapter on real weights, a Triton server
    "test_full_models.py",          # ~50: a real sd15 on CPU, four models on meta
    "test_ci_workflow.py",          # ~35: the workflow's shell steps, two runs, a merge, two gates
    "test_quantization.py",         # ~35: a quantised compile, eager runs
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
