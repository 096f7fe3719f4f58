"""`diffbench run | list | merge | ab | backends | models | report | gate | baseline save | service` -- thin; calls what the
suites call."""
from __future__ import annotations

import argparse
import sys

from harness.commands import (AB_PROCESSES, AB_REPEATS, AB_THRESHOLDS, cmd_ab, cmd_backends, cmd_baseline, cmd_fit,
                              cmd_gate, cmd_history, cmd_list, cmd_merge, cmd_models, cmd_report, cmd_run, cmd_service)
from harness.errors import UserError
from harness.measure import fit as fit_defaults
from harness.selection import options


class _Parser(argparse.ArgumentParser):
    """argparse prints usage + error on two lines; our contract is one line and exit 2."""

    def error(self, message):
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffbench", description="Benchmark and compatibility harness for diffusion backends")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="benchmark a matrix of cases and write records (+ report)")
    options.add_to_argparse(run)     # the same table pytest's options come from
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a run: skip the cases already recorded there")
    run.add_argument("--allow-failures", action="store_true",
                     help="exit 0 even when a case failed or errored (default: exit 1, like pytest)")

    listing = sub.add_parser("list", help="the selected cases (a dry run): support here, expected time, shard")
    options.add_to_argparse(listing, [o.flag for o in (*options.SELECTION, *options.SPLITTING)]
                            + ["--quick", "--warmup", "--repeats"])
    listing.add_argument("--json", action="store_true", help="one JSON document: a list of objects, one per case")

    merge = sub.add_parser("merge", help="merge runs (shards, runners) into one records file and one report")
    merge.add_argument("runs", nargs="+", metavar="RUN_DIR",
                       help="run folders, records files, or folders holding run folders (CI artifacts)")
    merge.add_argument("-o", "--out", required=True, help="folder for records.jsonl, report.html, summary.md")
    merge.add_argument("--no-report", action="store_true", help="write the merged records only")

    ab = sub.add_parser("ab", help="measure two builds call by call in alternation and gate current vs baseline")
    options.add_to_argparse(ab, [o.flag for o in options.SELECTION] + ["--warmup", "--case-timeout", "--no-report",
                                                                        "--history"])
    side = ab.add_mutually_exclusive_group()
    side.add_argument("--baseline-dir", help="checkout of the baseline build")
    side.add_argument("--baseline-rev", help="git revision of this repository to use as the baseline build")
    ab.add_argument("--current-dir", help="checkout of the current build (default: this one)")
    ab.add_argument("--baseline-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment for the baseline side only")
    ab.add_argument("--current-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment for the current side only")
    ab.add_argument("--results-dir", default="results", help="parent folder of results/ab-<time>/")
    ab.add_argument("--repeats", type=int, help=f"measured call pairs per case (default {AB_REPEATS})")
    ab.add_argument("--processes", type=int, default=AB_PROCESSES,
                    help="fresh worker pairs per case, alternating which side starts first; the call pairs are "
                         f"shared among them and the spread between them is in the noise (default {AB_PROCESSES})")
    ab.add_argument("--threshold", action="append", default=[],
                    help=f"gate threshold (default: {', '.join(AB_THRESHOLDS).replace('%', '%%')}; the "
                         "tails of an A/B run's few calls are not judged unless asked for)")
    ab.add_argument("--all", action="store_true", help="print every gate row, PASS included")

    fit = sub.add_parser("fit", help="what fits in N GB: the fastest correct configuration and largest batch per "
                                     "memory budget")
    fit.add_argument("--model", required=True, help="model name or path:DIR")
    fit.add_argument("--budget", action="append", required=True, metavar="SIZE",
                     help="memory budget (repeatable), e.g. 4GB, 512MB")
    fit.add_argument("--variants", nargs="+", metavar="BACKEND_SPEC",
                     help="configurations to try (default: the reference and each of its memory options that "
                          "applies here)")
    fit.add_argument("--size", default="64x64", help="HxW (default 64x64)")
    fit.add_argument("--dtype", default="fp32")
    fit.add_argument("--steps", type=int, default=4)
    fit.add_argument("--max-batch", type=int, default=fit_defaults.DEFAULT_MAX_BATCH,
                     help=f"largest batch tried (default {fit_defaults.DEFAULT_MAX_BATCH})")
    fit.add_argument("--time-cap", type=float, default=fit_defaults.DEFAULT_TIME_CAP_S, metavar="S",
                     help=f"stop searching after this many seconds (default {fit_defaults.DEFAULT_TIME_CAP_S:g})")
    fit.add_argument("--confirm", type=int, default=fit_defaults.DEFAULT_CONFIRM,
                     help="extra runs of each largest fitting batch: its success rate "
                          f"(default {fit_defaults.DEFAULT_CONFIRM})")
    fit.add_argument("--warmup", type=int, default=1)
    fit.add_argument("--repeats", type=int, default=3)
    options.add_to_argparse(fit, ["--gpu", "--results-dir", "--case-timeout"])

    service = sub.add_parser("service", help="serve a model as the reference image service (OpenAI images API and "
                                             "a ComfyUI stand-in, FastAPI + uvicorn on 127.0.0.1): what "
                                             "`--backend http` measures")
    service.add_argument("--model", required=True, help="model name or path:DIR")
    service.add_argument("--port", type=int, required=True)
    service.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    service.add_argument("--workers", type=int, default=1, help="pipeline worker threads (default 1)")
    service.add_argument("--max-queue", type=int, default=8,
                         help="requests that may wait for a worker; beyond it the service answers 503 (default 8)")
    service.add_argument("--blocking", action="store_true",
                         help="the broken wrapper: run the pipeline inside the async route (blocks the event loop)")

    backends = sub.add_parser("backends", help="list backends, whether each is available here, and why not; "
                                                "--stack judges another machine's stack without its GPU")
    backends.add_argument("--stack", metavar="FILE",
                          help="judge the stack FILE describes (a records.jsonl, or a JSON file holding one env)")
    backends.add_argument("--dump-stack", metavar="FILE", help="write this machine's stack to FILE and exit")
    backends.add_argument("--json", action="store_true",
                          help="one JSON document: a list of {backend, variant, device, dtype, supported, reason}")
    backends.add_argument("--model", help="judge this model's workload (default: the text-to-image tiny-sd)")
    sub.add_parser("models", help="list the model zoo")

    report = sub.add_parser("report", help="render records (one or many files) as one HTML page with PNGs")
    report.add_argument("records", nargs="+")
    report.add_argument("-o", "--out", required=True)
    report.add_argument("--baseline", help="include the gate table against this baseline")
    report.add_argument("--threshold", action="append", default=[])
    report.add_argument("--history", metavar="STORE", help="add a trend section: every run of this history store")

    gate = sub.add_parser("gate", help="compare current records with a baseline, or judge the runs of a history "
                                       "store; exit 1 on a regression")
    gate.add_argument("--baseline")
    gate.add_argument("--current", nargs="+")
    gate.add_argument("--history", metavar="STORE",
                      help="judge the newest runs of every series in this history store against the series' first "
                           "segment since the last accepted change (default threshold e2e.p50:+5%%)")
    gate.add_argument("--threshold", action="append", default=[],
                      help="e.g. e2e.p50:+10%%, e2e.p50:<10ms, memory.peak:<8GB, throughput:>500/s, status")
    gate.add_argument("--thresholds", help="TOML file of thresholds")
    gate.add_argument("--all", action="store_true", help="print every row, PASS included")
    gate.add_argument("--format", choices=("text", "markdown"), default="text",
                      help="text: a terminal table; markdown: every case with its verdict, for a CI job summary")

    history = sub.add_parser("history", help="the history store: every run in one SQLite file (gate --history)")
    hsub = history.add_subparsers(dest="history_command", required=True, parser_class=_Parser)
    hadd = hsub.add_parser("add", help="add runs (run folders or records files) to the store")
    hadd.add_argument("runs", nargs="+", metavar="RUN_DIR")
    hshow = hsub.add_parser("show", help="the runs of each series, change points marked")
    hshow.add_argument("--model", action="append", help="only these models (repeatable)")
    hshow.add_argument("--backend", action="append", help="only these backend specs (repeatable)")
    hshow.add_argument("--case", action="append", metavar="GLOB", help="only case ids matching (repeatable)")
    hshow.add_argument("--metric", default="e2e.p50", help="the metric shown (default e2e.p50)")
    haccept = hsub.add_parser("accept", help="record an intended change at a run: its series start again there")
    haccept.add_argument("run_id", metavar="RUN_ID")
    haccept.add_argument("--note", default="", help="why the change is intended")
    for p in (hadd, hshow, haccept):
        p.add_argument("--history", required=True, metavar="STORE", help="the store's file (SQLite)")

    baseline = sub.add_parser("baseline", help="manage baselines")
    bsub = baseline.add_subparsers(dest="baseline_command", required=True, parser_class=_Parser)
    save = bsub.add_parser("save", help="store records as a baseline file")
    save.add_argument("records", nargs="+")
    save.add_argument("-o", "--out", required=True)
    return parser


COMMANDS = {"run": cmd_run, "list": cmd_list, "merge": cmd_merge, "ab": cmd_ab, "fit": cmd_fit,
            "backends": cmd_backends, "models": cmd_models, "report": cmd_report, "gate": cmd_gate,
            "baseline": cmd_baseline, "service": cmd_service, "history": cmd_history}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        from backends.base import load_plugins
        load_plugins()
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"diffbench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
