"""pytest plugin: selection options, one diffbench Session per pytest session, the report and the gate at the end.

    pytest suites/                     CPU, embedded tiny matrix
    pytest suites/ --gpu               CUDA (stops at once when there is no CUDA device)
    pytest suites/ --baseline B        fail the session when the gate finds a regression
"""
from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import UserError

SUITE_ORDER = {"test_compat": 1, "test_performance": 2, "test_correctness": 3}


def pytest_addoption(parser):
    group = parser.getgroup("diffbench")
    group.addoption("--gpu", action="store_true", help="run cases on CUDA; stop if there is no CUDA device")
    group.addoption("--backend", action="append", help="backend[+variant] (repeatable)")
    group.addoption("--model", action="append", help="model name or path:DIR (repeatable)")
    group.addoption("--dtype", action="append", help="fp32 / fp16 / bf16 (repeatable)")
    group.addoption("--size", action="append", help="HxW (repeatable)")
    group.addoption("--steps", action="append", type=int)
    group.addoption("--matrix", help="TOML matrix file")
    group.addoption("--results-dir", default="results", help="parent folder of results/<run-id>/")
    group.addoption("--quick", action="store_true", help="1 warm-up, 3 repeats per case")
    group.addoption("--case-timeout", type=float, default=900.0, help="per-case timeout in seconds")
    group.addoption("--baseline", help="gate this session's records against a baseline records file")
    group.addoption("--threshold", action="append", default=[], help="gate threshold, e.g. e2e.p50:+10%%")
    group.addoption("--no-report", action="store_true", help="do not write the HTML report at the end")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (still part of the CPU suite)")
    try:
        from harness.cli import resolve_device, select_cases
        config._diffbench_device = resolve_device(config.getoption("--gpu"))
        o = config.getoption
        config._diffbench_cases = select_cases(o("--model"), o("--backend"), o("--dtype"), None, o("--size"),
                                               o("--steps"), o("--matrix"))
        if o("--baseline"):
            from harness.thresholds import DEFAULT_THRESHOLDS, parse_thresholds
            parse_thresholds(o("--threshold") or DEFAULT_THRESHOLDS)
            if not Path(o("--baseline")).is_file():
                raise UserError(f"baseline {o('--baseline')} does not exist")
    except UserError as exc:
        raise pytest.UsageError(str(exc))


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = metafunc.config._diffbench_cases
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])
    if "model_name" in metafunc.fixturenames:
        names = sorted({c.model for c in metafunc.config._diffbench_cases})
        metafunc.parametrize("model_name", names)


def pytest_collection_modifyitems(config, items):
    # compat first, then performance (pytest-benchmark drives the timed loop), then correctness reads the same
    # records; unit tests (tests/) run before all of them.
    items.sort(key=lambda item: SUITE_ORDER.get(Path(str(item.fspath)).stem, 0))


@pytest.fixture(scope="session")
def diffbench_session(request):
    from harness.cli import run_options
    from harness.runner import Session
    config = request.config
    options = run_options(config._diffbench_device, config.getoption("--quick"), None, None,
                          config.getoption("--case-timeout"))
    session = Session(Path(config.getoption("--results-dir")), options)
    session.configure(config._diffbench_cases)
    config._diffbench_session = session
    yield session
    session.close()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """Gate and report from this session's records; a regression fails the session."""
    config = session.config
    run = getattr(config, "_diffbench_session", None)
    if run is None or not run.records:
        return
    from harness.cli import gate_and_report
    from harness.records import load_many
    result, report = gate_and_report(load_many([run.records_path]), run.run_dir, config.getoption("--baseline"),
                                     config.getoption("--threshold"),
                                     write_report=not config.getoption("--no-report"))
    if result is not None and result.exit_code and session.exitstatus == 0:
        session.exitstatus = 1
    config._diffbench_gate, config._diffbench_report = result, report


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    run = getattr(config, "_diffbench_session", None)
    if run is None or not run.records:
        return
    from harness.cli import summary_table
    tr = terminalreporter
    tr.section("diffbench")
    tr.write_line(summary_table(list(run.records.values())))
    tr.write_line(f"records: {run.records_path}")
    if getattr(config, "_diffbench_report", None):
        tr.write_line(f"report: {config._diffbench_report}")
    result = getattr(config, "_diffbench_gate", None)
    if result is not None:
        tr.section("diffbench gate")
        tr.write_line(result.table())
        if result.exit_code:
            tr.write_line("GATE: REGRESSED -- the session fails", red=True, bold=True)
