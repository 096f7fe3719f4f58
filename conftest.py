"""pytest plugin: selection options, one diffbench Session per pytest session, the report and the gate at the end.

    pytest suites/                     CPU, embedded tiny matrix
    pytest suites/ --gpu               CUDA (stops at once when there is no CUDA device)
    pytest suites/ --baseline B        fail the session when the gate finds a regression
    pytest suites/ --shard 2/3         one CI job's share of the cases
    pytest suites/ --junitxml J -o junit_family=legacy   each case's figures as <property> elements
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from harness.errors import UserError

SUITE_ORDER = {"test_compat": 1, "test_performance": 2, "test_correctness": 3}


def pytest_addoption(parser):
    from harness.selection import options
    options.add_to_pytest(parser.getgroup("diffbench"))   # the same table `diffbench run` is built from


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (still part of the CPU suite)")
    if config.getoption("dist", "no") != "no" and _selects_suites(config):
        # same test as pytest-benchmark's, which turns itself off under xdist: the suites would time nothing
        raise pytest.UsageError("suites/ time every case and pytest-benchmark is off under pytest-xdist: run them "
                                "without -n (the unit tests in tests/ may use it)")
    from harness.selection import options
    try:
        settings = options.settings_from(lambda dest: config.getoption(dest))
    except UserError as exc:
        raise pytest.UsageError(str(exc))
    options.export_backend_settings(settings)
    config._diffbench_settings = settings
    config._diffbench_cases = settings.cases


def _selects_suites(config) -> bool:
    """Does this session collect anything under suites/ (an argument inside it, or a folder holding it)?"""
    suites = (config.rootpath / "suites").resolve()
    args = config.args or config.getini("testpaths") or ["."]
    for arg in args:
        path = (config.invocation_params.dir / arg.split("::")[0]).resolve()
        if path == suites or suites in path.parents or path in suites.parents:
            return True
    return False


def pytest_report_header(config):
    settings = getattr(config, "_diffbench_settings", None)
    if settings is not None and settings.shard is not None:
        return _shard_line(settings)


def _shard_line(settings) -> str:
    label, selected = settings.shard.label, settings.selected
    if not settings.cases:
        return (f"diffbench: shard {label} is empty: {selected} selected case(s) over {settings.shard.count} shards "
                f"leave it nothing to run")
    return f"diffbench: shard {label}: {len(settings.cases)} of {selected} selected case(s)"


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
    from harness.selection import options
    from harness.measure import progress
    from harness.measure.session import Session
    config = request.config
    settings = config._diffbench_settings
    session = Session(settings.results_dir, settings.run_options)
    session.env.update(options.session_env(settings))
    session.configure(settings.cases)
    config._diffbench_session = session
    # pytest draws its own progress; ours (the phase of the case in flight) only with -v, as plain lines
    lines = progress.Progress([c.id for c in settings.cases], settings.expected_s, write_line=_terminal_writer(config))
    with progress.reporting(lines) if config.option.verbose > 0 else contextlib.nullcontext():
        yield session
    session.close()


def _terminal_writer(config):
    """Lines to the terminal while a test runs: output capture suspended, as pytest's own live logging does."""
    capture = config.pluginmanager.getplugin("capturemanager")
    terminal = config.pluginmanager.getplugin("terminalreporter")

    def write(line: str) -> None:
        if terminal is None:
            return
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            terminal.write_line(line)
    return write


@pytest.fixture
def case_properties(record_property):
    """`case_properties(record)`: the case's figures as junit XML <property> elements (status, e2e p50/p99 ms,
    PSNR, peak memory...), for CI systems that read them."""
    from harness.verdict.run_end import junit_properties

    def add(record) -> None:
        for name, value in junit_properties(record):
            record_property(name, value)
    return add


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """Gate and report from this session's records; a regression fails the session."""
    config = session.config
    run = getattr(config, "_diffbench_session", None)
    if run is None or not run.records:
        return
    from harness.records import load_many
    from harness.verdict.run_end import gate_and_report
    settings = config._diffbench_settings
    result, report = gate_and_report(load_many([run.records_path]), run.run_dir, settings.baseline,
                                     settings.thresholds, write_report=settings.write_report)
    if result is not None and result.exit_code and session.exitstatus == 0:
        session.exitstatus = 1
    if settings.history:
        from harness.verdict.run_end import add_to_history
        config._diffbench_history = add_to_history(settings.history, [run.records_path])
    config._diffbench_gate, config._diffbench_report = result, report


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    settings = getattr(config, "_diffbench_settings", None)
    if settings is not None and settings.shard is not None and not settings.cases:
        terminalreporter.section("diffbench")
        terminalreporter.write_line(_shard_line(settings))
    run = getattr(config, "_diffbench_session", None)
    if run is None or not run.records:
        return
    from harness.verdict.run_end import summary_table
    tr = terminalreporter
    tr.section("diffbench")
    tr.write_line(summary_table(list(run.records.values())))
    tr.write_line(f"records: {run.records_path}")
    if getattr(config, "_diffbench_history", None):
        tr.write_line(config._diffbench_history)
    if getattr(config, "_diffbench_report", None):
        tr.write_line(f"report: {config._diffbench_report}")
    result = getattr(config, "_diffbench_gate", None)
    if result is not None:
        tr.section("diffbench gate")
        tr.write_line(result.table())
        if result.exit_code:
            tr.write_line("GATE: REGRESSED -- the session fails", red=True, bold=True)
