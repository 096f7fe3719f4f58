"""`diffbench run | list | merge | ab | backends | models | report | gate | baseline save | service` -- thin; calls what the
suites call."""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
from pathlib import Path

from harness import fit as fit_defaults
from harness import options, progress
from harness.errors import UserError
from harness.run_end import gate_and_report, summary_table


ROOT = Path(__file__).resolve().parent.parent
# an A/B run's calls pair up; measured on the noisy 2-core CI VM, 30 pairs gave a paired noise band (3 standard
# errors) of ±4-10 %, too close to a 10 % step; 50 pairs narrow it by sqrt(50/30)
AB_REPEATS = 50
# paired medians are steady enough to hold half the stored-baseline step (unchanged builds measured -2.4..+4.6 %
# over eleven rounds on that VM), so an A/B run catches a 10 % slowdown with its defaults
AB_E2E_P50 = "e2e.p50:+5%"
# one process pair per case let a +9.6 % slowdown through once in four rounds on that VM (a whole process lands
# well or badly on the cores); three pairs put that spread into the noise band at three worker starts per side
AB_PROCESSES = 1   # --processes 3 missed a 10 % slowdown in its first measured round (docs/gate.md)


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
                    help=f"gate threshold (default: the gate's defaults with {AB_E2E_P50.replace('%', '%%')})")
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


def _check_writable(folder: Path) -> None:
    """Create the folder and a probe file in it: permission bits alone lie for root and read-only mounts."""
    import tempfile
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UserError(f"results folder {folder} is not writable: {exc.strerror or exc}")


def cmd_run(args) -> int:
    from harness import runner

    if args.resume and args.results_dir != "results":
        raise UserError("conflicting options: --resume RUN_DIR already names the results folder")
    settings = options.settings_from(lambda dest: getattr(args, dest))
    options.export_backend_settings(settings)
    cases = settings.cases
    if settings.shard is not None and not cases:
        return _empty_shard(settings)
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "records.jsonl").is_file():
            raise UserError(f"--resume {run_dir}: no records.jsonl there")
        session = runner.Session(run_dir, settings.run_options, run_id=run_dir.name, resume=True)
    else:
        _check_writable(settings.results_dir)
        session = runner.Session(settings.results_dir, settings.run_options)
    session.env.update(options.session_env(settings))
    session.configure(cases)
    sharded = f" (shard {settings.shard.label} of {settings.selected} selected)" if settings.shard else ""
    print(f"diffbench: {len(cases)} case(s){sharded} on {settings.device}; writing {session.records_path}",
          flush=True)

    def on_term(_sig, _frame):
        raise runner.Interrupted()
    previous = signal.signal(signal.SIGTERM, on_term)
    done, case = [], None
    reporter = progress.Progress([c.id for c in cases if c.id not in session.done], settings.expected_s)
    try:
        with progress.reporting(reporter):
            for case in cases:
                if case.id in session.done:
                    print(f"  skip {case.id} (already recorded)", flush=True)
                    continue
                record = session.result(case)
                done.append(record)
                print(f"  {record.status:<11} {case.id}" + (f"  ({record.reason[:90]})" if record.reason else ""),
                      flush=True)
    except (runner.Interrupted, KeyboardInterrupt):
        if case is not None and case.id not in session.records and case.id not in session.done:
            # the signal landed outside the case's own handler (loading, cleanup, between calls)
            session.write(runner.interrupted_record(case, session))
        session.close()
        print(f"diffbench: interrupted; {len(done)} case(s) recorded in {session.records_path}; "
              f"continue with --resume {session.run_dir}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    session.close()
    print(summary_table(done))
    print(f"records: {session.records_path}")
    from harness.records import load_many
    from harness.history import HistoryStore
    if settings.history:   # added first, so the report's trend section shows this run too
        from harness.run_end import add_to_history
        print(add_to_history(settings.history, [session.records_path]))
    with HistoryStore(settings.history) if settings.history else contextlib.nullcontext() as history:
        result, report = gate_and_report(load_many([session.records_path]), session.run_dir, settings.baseline,
                                         settings.thresholds, write_report=settings.write_report, history=history)
    if result is not None:
        print(result.table())
    if report is not None:
        print(f"report: {report}")
    if result is not None and result.exit_code:
        return result.exit_code
    return run_exit_code(done, args.allow_failures)


def run_exit_code(records, allow_failures: bool = False) -> int:
    """1 when any case failed or errored (unsupported and over-budget are answers, not failures), like pytest."""
    bad = [r for r in records if r.status in ("failed", "error")]
    if bad and not allow_failures:
        print(f"diffbench: {len(bad)} case(s) failed or errored (exit 1; --allow-failures to exit 0)",
              file=sys.stderr)
        return 1
    return 0


def cmd_fit(args) -> int:
    from backends import base as registry
    from harness import fit, models, runner
    from harness.cases import DTYPES, parse_size, validate_shape

    device = options.resolve_device(args.gpu)
    if models.spec(args.model).workload != "text-to-image":
        raise UserError(f"fit searches text-to-image configurations; {args.model} is a text-embedding model "
                        "(measure its batches with diffbench run --batch ... --memory-budget SIZE)")
    if args.dtype not in DTYPES:
        raise UserError(f"unknown dtype {args.dtype!r}; choose from {', '.join(DTYPES)}")
    height, width = parse_size(args.size)
    validate_shape(1, height, width, args.steps)
    if args.max_batch < 1 or args.confirm < 0 or args.time_cap <= 0:
        raise UserError("--max-batch must be >= 1, --confirm >= 0 and --time-cap > 0")
    budgets = [options.parse_memory_size(b, "--budget") for b in args.budget]
    from harness import workloads
    name = workloads.reference_backend(models.spec(args.model).workload)
    specs = args.variants or [name] + [f"{name}+{o}" for o in registry.get(name).options]
    variants = options.select_cases([args.model], specs)   # validated, canonical
    variants = list(dict.fromkeys(c.backend_spec for c in variants))
    plan = fit.FitPlan(args.model, variants, budgets, args.dtype, height, width, args.steps, args.max_batch,
                       args.time_cap, args.confirm)
    _check_writable(Path(args.results_dir))
    out = Path(args.results_dir).resolve() / time.strftime("fit-%Y%m%d-%H%M%S")
    base = options.build_run_options(device, False, args.warmup, args.repeats, args.case_timeout)
    base.isolate, base.save_images = True, False
    sessions: dict = {}

    def session_for(budget_mb):
        if budget_mb not in sessions:
            run_options = runner.RunOptions(**{**vars(base), "memory_budget_mb": budget_mb})
            folder = out / (f"budget-{budget_mb:g}MB" if budget_mb else "trials")
            sessions[budget_mb] = runner.Session(folder, run_options)
        return sessions[budget_mb]

    def measure(case, budget_mb, _attempt):
        session = session_for(budget_mb)
        record = runner.run_isolated(case, session) if session.options.isolate else runner.run_case(case, session)
        session.append(record)
        return sanitize(record.to_dict())

    from harness.records import sanitize
    print(f"diffbench fit: {args.model} {height}x{width} {args.dtype} s{args.steps} on {device}; "
          f"{len(variants)} configuration(s) x {len(budgets)} budget(s); writing {out}", flush=True)
    try:
        result = fit.run_fit(plan, measure, device)
    finally:
        for session in sessions.values():
            session.close()
    document = fit.write_outputs(out, plan, result["records"], result["searches"], result["elapsed_s"])
    print(fit_table_text(document["table"]))
    if result["time_cap_reached"]:
        print(f"diffbench fit: the {args.time_cap:g} s time cap ended the search; the table says what was found")
    import reports
    report = reports.build_report(result["records"], out, fit=document) if result["records"] else None
    print(f"fit: {out / 'fit.csv'}, {out / 'fit.json'}" + (f"\nreport: {report}" if report else ""))
    return 0


def fit_table_text(table: list[dict]) -> str:
    rows = [("budget", "configuration", "e2e p50 ms (b1)", "largest batch", "peak MB", "success")]
    for r in table:
        rows.append((f"{r['budget_mb']:g} MB", ("* " if r.get("fastest") else "  ") + r["configuration"],
                     f"{r['e2e_p50_ms']:.1f}" if r["e2e_p50_ms"] is not None else "-", r["largest_batch"],
                     f"{r['peak_mb_at_largest']:.0f}" if r["peak_mb_at_largest"] is not None else "-",
                     f"{r['success_rate']:.0%}" if r["success_rate"] is not None else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines + ["* the fastest configuration that fits the budget"])


def _empty_shard(settings) -> int:
    """More shards than cases: this one runs nothing, says so, and leaves an empty run folder (records.jsonl with
    no records) so that every shard of a CI matrix uploads the same shape of artifact."""
    from harness.runner import Session
    _check_writable(settings.results_dir)
    session = Session(settings.results_dir, settings.run_options)
    session.close()
    print(f"diffbench: shard {settings.shard.label} is empty: {settings.selected} selected case(s) over "
          f"{settings.shard.count} shards leave it nothing to run; wrote the empty run folder {session.run_dir}",
          flush=True)
    return 0


def cmd_list(args) -> int:
    from backends.base import Support
    from harness.device import fingerprint
    from harness.runner import support_of
    settings = options.settings_from(lambda dest: getattr(args, dest, options.default_of(dest)))
    env = fingerprint(settings.device)
    rows = []
    for case in settings.cases:
        try:
            support = support_of(case, env)
        except UserError as exc:
            support = Support.no(str(exc))
        rows.append({"case_id": case.id, **case.as_dict(), "supported": support.supported, "reason": support.reason,
                     "expected_s": settings.expected_s.get(case.id),
                     "shard": settings.shard.label if settings.shard else None})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    table = [("case", "expected", "here")]
    for row in rows:
        seconds = row["expected_s"]
        expected = "-" if seconds is None else f"{seconds:.1f} s" if seconds < 60 else progress.clock(seconds)
        table.append((row["case_id"], expected,
                       "supported" if row["supported"] else f"unsupported: {row['reason'][:100]}"))
    widths = [max(len(r[i]) for r in table) for i in range(2)]
    for r in table:
        print(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]}")
    sharded = f" in shard {settings.shard.label} of {settings.selected} selected" if settings.shard else ""
    known = [row["expected_s"] for row in rows if row["expected_s"] is not None]
    expected = (f"; expected {progress.clock(sum(known))} for the {len(known)} with earlier records"
                if known else "")
    print(f"{len(rows)} case(s){sharded} on {settings.device}, "
          f"{sum(row['supported'] for row in rows)} supported here{expected}")
    return 0


def cmd_merge(args) -> int:
    from harness.merge import merge
    from harness.records import load_many
    out = Path(args.out)
    _check_writable(out)
    result = merge(args.runs, out)
    print(result.summary())
    print(f"records: {result.path}")
    if not args.no_report:
        _, report = gate_and_report(load_many([result.path]), out)
        print(f"report: {report}")
        print(f"summary: {out / 'summary.md'}")
    return 0


def cmd_service(args) -> int:
    from harness import models, service
    models.spec(args.model)
    if args.workers < 1 or args.max_queue < 0:
        raise UserError("--workers must be >= 1 and --max-queue >= 0")
    service.serve(args.model, args.port, args.dtype, blocking=args.blocking, workers=args.workers,
                  max_queue=args.max_queue)
    return 0


def cmd_backends(args) -> int:
    from backends import base as registry
    from harness import device as devinfo, preflight, stacks
    if args.dump_stack:
        # the env a run would record, on the GPU when there is one, without loading a model
        env = devinfo.fingerprint("cuda" if devinfo.cuda_available() else "cpu")
        print(f"stack: {stacks.dump_env(args.dump_stack, env)}")
        return 0
    if args.stack or args.json or args.model:
        env = stacks.load_env(args.stack) if args.stack else devinfo.fingerprint(
            "cuda" if devinfo.cuda_available() else "cpu")
        rows = stacks.judge(env, args.model or stacks.DEFAULT_MODEL, described_by=args.stack)
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            summary = preflight.Stack.from_env(env).summary()
            print(f"stack: {summary or 'no facts recorded'}" + (f" ({args.stack})" if args.stack else ""))
            print(stacks.rows_text(rows))
        return 0
    root = Path(__file__).resolve().parent.parent
    # from a checkout, name the checkout: diffbench is not on PyPI, and a bare name would fetch whatever is there
    target = f"-e '{root}[{{}}]'" if (root / "pyproject.toml").is_file() else "'diffbench[{}]'"
    gpu = devinfo.cuda_available()
    # the stack-vs-GPU verdict of each backend on this machine, per device (harness/preflight.py)
    stack = preflight.Stack.from_env(devinfo.fingerprint("cuda" if gpu else "cpu"))
    for name in registry.names():
        backend = registry.get(name)
        support = backend.available()
        combine = "; ".join(" | ".join(group) + " do not combine" for group in backend.exclusive)
        variants = ", ".join(backend.options) or "-"
        status = "available" if support else f"unavailable: {support.reason}"
        print(f"{name:<14} {status}  [options: {variants}{'; ' + combine if combine else ''}]")
        extra = getattr(backend, "extra", "")
        if not support and extra:
            extra = "gpu" if gpu and extra == "onnx" else extra  # onnxruntime-gpu instead of onnxruntime
            print(f"{'':<14} install: pip install {target.format(extra)}")
        for line in preflight.backend_listing(stack, name):
            print(f"{'':<14} {line}")
    return 0


def cmd_models(_args) -> int:
    from harness.models import MODELS
    for spec in MODELS.values():
        where = "GPU; CPU slow" if spec.full_size else "CPU and GPU"
        print(f"{spec.name:<11} {spec.kind:<5} {where:<13} {spec.description}")
    print("path:DIR    a diffusers checkpoint folder on disk")
    print("ORG/NAME[@REVISION]  a diffusers repository in the local Hugging Face cache (never downloaded)")
    return 0


def cmd_report(args) -> int:
    from harness.records import load_many
    records = load_many(args.records)
    out = Path(args.out)
    _check_writable(out)
    from harness.history import HistoryStore
    with HistoryStore(args.history, create=False) if args.history else contextlib.nullcontext() as history:
        _, report = gate_and_report(records, out, args.baseline, args.threshold, history=history)
    print(f"report: {report}")
    return 0


def cmd_gate(args) -> int:
    if args.history:
        return _history_gate(args)
    if not (args.baseline and args.current):
        raise UserError("gate needs --baseline FILE and --current RECORDS..., or --history STORE")
    from harness import gate
    from harness.records import load_many
    from harness.thresholds import DEFAULT_THRESHOLDS, load_thresholds_toml, parse_thresholds
    specs = list(args.threshold)
    if args.thresholds:
        specs = load_thresholds_toml(args.thresholds) + specs
    thresholds = parse_thresholds(specs or DEFAULT_THRESHOLDS)
    result = gate.compare(load_many([args.baseline]), load_many(args.current), thresholds)
    print(result.markdown() if args.format == "markdown" else result.table(all_rows=args.all))
    return result.exit_code


def _history_gate(args) -> int:
    from harness.history import HistoryStore
    from harness.history_gate import judge
    from harness.thresholds import load_thresholds_toml
    if args.baseline or args.current:
        raise UserError("conflicting options: gate --history judges the store's runs; drop --baseline/--current")
    specs = list(args.threshold)
    if args.thresholds:
        specs = load_thresholds_toml(args.thresholds) + specs
    with HistoryStore(args.history, create=False) as store:
        result = judge(store.records(), store.accepted_runs(), specs)
    print(result.text(all_rows=args.all))
    return result.exit_code


def cmd_history(args) -> int:
    from harness.history import HistoryStore
    with HistoryStore(args.history, create=args.history_command == "add") as store:
        if args.history_command == "add":
            for run_id, n in store.add(args.runs):
                print(f"history: run {run_id}: {n} record(s) added to {args.history}")
        elif args.history_command == "accept":
            run = store.accept(args.run_id, args.note)
            print(f"history: run {run.run_id} (commit {run.git_commit or 'unknown'}) accepted: the series it "
                  f"belongs to start again there")
        else:
            from harness.history_gate import show
            print(show(store, args.model, args.backend, args.case, args.metric))
    return 0


def _env_pairs(items: list[str], flag: str) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not key.replace("_", "a").isalnum():
            raise UserError(f"malformed {flag} {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def cmd_ab(args) -> int:
    from harness import ab
    from harness.thresholds import DEFAULT_THRESHOLDS, parse_thresholds
    if not (args.baseline_dir or args.baseline_rev):
        raise UserError("ab needs --baseline-dir DIR or --baseline-rev REV")
    if args.processes < 1:
        raise UserError(f"--processes must be >= 1, got {args.processes}")
    device = options.resolve_device(args.gpu)
    run_options = options.build_run_options(device, False, args.warmup, args.repeats or AB_REPEATS, args.case_timeout)
    cases = options.select_cases(args.model, args.backend, args.dtype, args.batch, args.size, args.steps,
                                 args.matrix)
    thresholds = list(args.threshold) or [*DEFAULT_THRESHOLDS, AB_E2E_P50]   # later specs win
    parse_thresholds(thresholds)
    env = {"baseline": _env_pairs(args.baseline_env, "--baseline-env"),
           "current": _env_pairs(args.current_env, "--current-env")}
    current = ab.check_build(args.current_dir or ROOT, "--current-dir")
    worktree = ab.Worktree(ROOT, args.baseline_rev) if args.baseline_rev else None
    baseline = None if worktree else ab.check_build(args.baseline_dir, "--baseline-dir")
    _check_writable(Path(args.results_dir))
    out = ab.new_ab_dir(Path(args.results_dir))
    with contextlib.ExitStack() as stack:
        if worktree:
            baseline = stack.enter_context(worktree)
        print(f"diffbench ab: {len(cases)} case(s) on {device}, {run_options.repeats} call pairs each in "
              f"{args.processes} process pair(s); baseline "
              f"{args.baseline_rev or baseline}, current {current}; writing {out}", flush=True)
        def on_term(_sig, _frame):
            raise KeyboardInterrupt
        previous = signal.signal(signal.SIGTERM, on_term)
        try:
            paths = ab.run_ab(cases, baseline, current, out, device, run_options.warmup, run_options.repeats,
                              run_options.timeout_s, env, processes=args.processes)
        except KeyboardInterrupt:
            print(f"diffbench ab: interrupted; the case in flight is recorded as interrupted under {out}",
                  file=sys.stderr)
            return 130
        finally:
            signal.signal(signal.SIGTERM, previous)
    from harness.records import load_many
    result, report = gate_and_report(load_many([paths["current"]]), out, paths["baseline"], thresholds,
                                     write_report=not args.no_report)
    print(f"records: {paths['baseline']} (baseline), {paths['current']} (current)")
    print(result.table(all_rows=args.all))
    if report is not None:
        print(f"report: {report}")
    if args.history:
        from harness.run_end import add_to_history
        print(add_to_history(args.history, [paths["current"]]))
    return result.exit_code


def cmd_baseline(args) -> int:
    from harness.baseline import save_baseline
    save_baseline(args.records, args.out)
    print(f"baseline: {args.out}")
    return 0


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
