"""Live progress: case i/N, phase, elapsed and time left; a live line on a terminal, plain lines elsewhere.
(That a real run reports its phases -- load, export, session, first call, warm-up, parity -- through it is checked on
the output of the CI workflow test's `diffbench run` shards, tests/test_ci_workflow.py.)"""
import io

import pytest

from harness.measure import progress
from harness.measure.progress import Progress


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_carry_case_phase_elapsed_and_time_left_without_escape_codes():
    clock, out = Clock(), io.StringIO()
    p = Progress(["a", "b", "c"], expected={"a": 10.0, "b": 20.0}, stream=out, now=clock)
    try:
        p.case_started("a")
        clock.t += 4
        p.phase("export")
        # a: 10 - 4 spent; b: 20; c has no record: the mean of the expected ones, 15
        assert p.line() == "[1/3] a: export  (elapsed 0:04, ~0:41 left)"
    finally:
        p.close()
    lines = out.getvalue().splitlines()
    assert lines[-1] == "[1/3] a: export  (elapsed 0:04, ~0:41 left)"
    assert "\r" not in out.getvalue() and "\033" not in out.getvalue()


def test_time_left_unknown_until_a_case_is_done_then_the_mean_of_done_cases():
    clock = Clock()
    p = Progress(["a", "b", "c"], stream=io.StringIO(), now=clock)
    try:
        p.case_started("a")
        assert p.time_left() is None
        clock.t += 30
        p.case_done()
        p.case_started("b")
        clock.t += 10
        assert p.time_left() == pytest.approx(20 + 30)   # b: 30 expected - 10 spent; c: 30
        assert p.line().startswith("[2/3] b: start")
    finally:
        p.close()


def test_warm_up_and_measure_counts_follow_the_ticks():
    p = Progress(["a"], stream=io.StringIO(), now=Clock())
    try:
        p.case_started("a")
        p.calls(2, 3)
        assert p.phase_text() == "warm-up 1/2"
        for _ in range(2):
            p.tick()
        assert p.phase_text() == "measure 1/3"
        for _ in range(3):
            p.tick()
        assert p.phase_text() == "measure 3/3"
    finally:
        p.close()


def test_on_a_terminal_one_line_is_rewritten_and_cleared_at_the_end_of_a_case():
    out = Terminal()
    p = Progress(["a"], stream=out, now=Clock())
    try:
        p.case_started("a")
        p.phase("compile")
        p.case_done()
    finally:
        p.close()
    text = out.getvalue()
    assert text.count("\r") >= 3 and "\n" not in text
    assert "\r[1/1] a: compile" in text and text.endswith("\r\033[K")


def test_write_line_sends_plain_lines_and_no_terminal_tricks():
    got = []
    p = Progress(["a"], write_line=got.append, now=Clock())
    p.case_started("a")
    p.phase("load")
    p.close()
    assert [line.split(": ")[1].split("  ")[0] for line in got] == ["start", "load"]
    assert p._thread is None


def test_module_functions_do_nothing_without_an_active_reporter():
    progress.phase("export")
    progress.tick()
    got = []
    with progress.reporting(Progress(["x"], write_line=got.append, now=Clock())):
        progress.case_started("x")
        progress.phase("engine")
        progress.case_done()
    progress.phase("after")
    assert [line.split(": ")[1].split("  ")[0] for line in got] == ["start", "engine"]
