"""One declaration of every run option: `diffbench run` and `pytest suites/` offer the same ones, with the same
names, defaults and help."""
import argparse
import json

import pytest

from harness.cli import build_parser
from harness.selection import options

# options that only make sense on one side: the CLI resumes a run folder and sets its exit code; pytest has its
# own session control and exit status
CLI_ONLY = {"--resume", "--allow-failures"}


def _cli_run_actions() -> dict[str, argparse.Action]:
    parser = build_parser()
    run = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
    return {a.option_strings[0]: a for a in run._actions if a.option_strings and a.option_strings[0] != "-h"}


def _pytest_options(pytestconfig) -> dict[str, object]:
    group = pytestconfig._parser.getgroup("diffbench")
    return {o.names()[0]: o for o in group.options}


def test_cli_and_pytest_offer_the_same_options(pytestconfig):
    cli, pyt = _cli_run_actions(), _pytest_options(pytestconfig)
    assert set(cli) - CLI_ONLY == set(pyt) == {o.flag for o in options.OPTIONS}
    for flag, action in cli.items():
        if flag in CLI_ONLY:
            continue
        theirs = pyt[flag].attrs()
        assert action.default == theirs.get("default"), flag
        assert action.help == theirs.get("help"), flag
        assert action.dest == theirs.get("dest"), flag


def test_the_per_case_timeout_has_one_name_and_pytest_timeout_keeps_its_own(pytestconfig):
    assert "--case-timeout" in _cli_run_actions()
    assert pytestconfig.getoption("--case-timeout") == options.DEFAULT_CASE_TIMEOUT_S
    assert "--timeout" not in _pytest_options(pytestconfig)    # pytest-timeout's


def test_settings_are_validated_once_for_both_sides():
    values = {o.dest: (list(o.default) if o.action == "append" and o.default is not None else o.default)
              for o in options.OPTIONS}
    values.update(model=["tiny-sd"], backend=["diffusers"], quick=True)
    settings = options.settings_from(values.get)
    assert [c.id for c in settings.cases] == ["tiny-sd/diffusers/fp32/b1/64x64/s4"]
    assert (settings.run_options.warmup, settings.run_options.repeats) == (options.QUICK_WARMUP,
                                                                           options.QUICK_REPEATS)
    with pytest.raises(Exception, match="--quick sets warm-up"):
        options.settings_from({**values, "repeats": 5}.get)


def test_run_exit_code_fails_on_failed_or_errored_cases_only():
    from harness.selection.cases import Case
    from harness.commands import run_exit_code
    from harness.records import Record

    def record(status):
        r = Record.for_case(Case("tiny-sd", "diffusers"), "run")
        r.status = status
        return r
    assert run_exit_code([record("passed"), record("unsupported")]) == 0
    assert run_exit_code([record("passed"), record("failed")]) == 1
    assert run_exit_code([record("error")]) == 1
    assert run_exit_code([record("error")], allow_failures=True) == 0


def test_quick_is_one_batch_and_one_shape_per_model_on_every_backend(capsys):
    from harness.cli import main

    def listed(*args):
        assert main(["list", "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)
    def backends(rows):
        return [r["backend"] + (f"+{r['variant']}" if r["variant"] else "") for r in rows]
    rows = listed("--model", "minilm-l6", "--quick")
    assert sorted(backends(rows)) == sorted(set(backends(listed("--model", "minilm-l6"))))   # one case each
    assert {(r["batch"], r["seq"]) for r in rows} == {(1, 16)}     # the matrix's smallest batch, shortest sequence
    # the smallest of the selection: batch, size and steps chosen separately, per model
    rows = listed("--model", "tiny-sd", "--model", "tiny-sd3", "--backend", "diffusers", "--backend", "onnxruntime",
                  "--batch", "4", "--batch", "2", "--size", "128x128", "--size", "64x96", "--steps", "8",
                  "--steps", "3", "--quick")
    assert [r["case_id"] for r in rows] == [f"{m}/{b}/fp32/b2/64x96/s3" for m in ("tiny-sd", "tiny-sd3")
                                            for b in ("diffusers", "onnxruntime")]
    assert len(listed("--model", "tiny-sd", "--batch", "1", "--batch", "2")) == 2 * len(listed("--model", "tiny-sd",
                                                                                              "--quick"))


def test_a_memory_budget_isolates_each_case_unless_told_not_to():
    values = {o.dest: (list(o.default) if o.action == "append" and o.default is not None else o.default)
              for o in options.OPTIONS}
    values.update(model=["tiny-sd"], backend=["diffusers"])
    assert not options.settings_from(values.get).run_options.isolate            # the CPU default: one process
    assert options.settings_from({**values, "memory_budget": "2GB"}.get).run_options.isolate
    assert not options.settings_from({**values, "memory_budget": "2GB", "isolate": False}.get).run_options.isolate
