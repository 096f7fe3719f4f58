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
    from harness import options
    options.add_to_pytest(parser.getgroup("diffbench"))   # the same table `diffbench run` is built from


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (still part of the CPU suite)")
    from harness import options
    try:
        settings = options.settings_from(lambda dest: config.getoption(dest))
    except UserError as exc:
        raise pytest.UsageError(str(exc))
    options.export_backend_settings(settings)
    config._diffbench_settings = settings
    config._diffbench_cases = settings.cases


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
    from harness.runner import Session
    config = request.config
    settings = config._diffbench_settings
    session = Session(settings.results_dir, settings.run_options)
    session.configure(settings.cases)
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
    from harness.records import load_many
    from harness.run_end import gate_and_report
    settings = config._diffbench_settings
    result, report = gate_and_report(load_many([run.records_path]), run.run_dir, settings.baseline,
                                     settings.thresholds, write_report=settings.write_report)
    if result is not None and result.exit_code and session.exitstatus == 0:
        session.exitstatus = 1
    config._diffbench_gate, config._diffbench_report = result, report


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    run = getattr(config, "_diffbench_session", None)
    if run is None or not run.records:
        return
    from harness.run_end import summary_table
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
