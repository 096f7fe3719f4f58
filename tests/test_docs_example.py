"""docs/adapter.md's "backend in one file" is run as written: registered through DIFFBENCH_PLUGINS' mechanism and
measured on the tiny model, so the example cannot rot."""
import re
import sys
import types
from pathlib import Path

from backends import base
from harness.measure.run_options import RunOptions
from harness.measure.session import Session
from harness.selection.cases import Case

DOC = Path(__file__).resolve().parent.parent / "docs" / "adapter.md"


def test_the_one_file_backend_of_the_docs_runs_and_passes_parity(tmp_path):
    code = re.search(r"```python\n(\"\"\"sdpa_math.*?)```", DOC.read_text(), re.S).group(1)
    module = types.ModuleType("docs_sdpa_math")
    exec(compile(code, str(DOC), "exec"), module.__dict__)
    sys.modules["docs_sdpa_math"] = module
    try:
        base.load_plugins("docs_sdpa_math")
        session = Session(tmp_path, RunOptions(warmup=0, repeats=1, time_components=False))
        try:
            record = session.result(Case("tiny-sd", "sdpa_math", steps=2))
        finally:
            session.close()
    finally:
        base.unregister("sdpa_math")
        sys.modules.pop("docs_sdpa_math", None)
    assert record.status == "passed", (record.reason, record.info.get("traceback"))
    assert record.info["attention"] == "SDPA, math kernel"
    assert record.parity["image"]["passed"] and record.parity["components"]["unet"]["passed"]
