"""What each `diffbench` command does (harness/cli.py parses the command line)."""
from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from pathlib import Path

from harness.errors import UserError
from harness.measure import progress
from harness.selection import options
from harness.verdict.run_end import gate_and_report, summary_table
from harness.verdict.thresholds import DEFAULT_THRESHOLDS


ROOT = Path(__file__).resolve().parent.parent
# an A/B run's calls pair up; 30 pairs on the noisy 2-core CI VM gave a paired band (3 standard errors) of ±4-10 %;
# 40 pairs over 4 process pairs (a whole process lands well or badly on the cores: pyperf's answer) caught a 10 %
# step in every quiet round, unchanged builds passed (docs/gate.md). Paired medians hold half the stored step
AB_REPEATS, AB_PROCESSES, AB_E2E_P50 = 40, 4, "e2e.p50:+5%"
# an A/B run's few calls, split among processes, have a p99 about their maximum (one slow call from a false alarm):
# by default it judges the paired centre, status, memory and parity; tails stay with the stored gate's full runs
AB_THRESHOLDS = [AB_E2E_P50 if t.startswith("e2e.p50:") else t for t in DEFAULT_THRESHOLDS
                 if not t.startswith(("e2e.p90", "e2e.p99"))]


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
    from harness.measure.run_options import Interrupted, interrupted_record
    from harness.measure.session import Session

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
        session = Session(run_dir, settings.run_options, run_id=run_dir.name, resume=True)
    else:
        _check_writable(settings.results_dir)
        session = Session(settings.results_dir, settings.run_options)
    session.env.update(options.session_env(settings))
    session.configure(cases)
    sharded = f" (shard {settings.shard.label} of {settings.selected} selected)" if settings.shard else ""
    print(f"diffbench: {len(cases)} case(s){sharded} on {settings.device}; writing {session.records_path}",
          flush=True)

    def on_term(_sig, _frame):
        raise Interrupted()
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
    except (Interrupted, KeyboardInterrupt):
        if case is not None and case.id not in session.records and case.id not in session.done:
            # the signal landed outside the case's own handler (loading, cleanup, between calls)
            session.write(interrupted_record(case, session))
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
    from harness.verdict.history import HistoryStore
    if settings.history:   # added first, so the report's trend section shows this run too
        from harness.verdict.run_end import add_to_history
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
    from harness import models
    from harness.measure.case import run_case
    from harness.measure.run_options import RunOptions
    from harness.measure.session import Session
    from harness.measure.worker_process import run_isolated
    from harness.measure import fit
    from harness.selection.cases import DTYPES, parse_size, validate_shape

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
    from harness.selection import workloads
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
            run_options = RunOptions(**{**vars(base), "memory_budget_mb": budget_mb})
            folder = out / (f"budget-{budget_mb:g}MB" if budget_mb else "trials")
            sessions[budget_mb] = Session(folder, run_options)
        return sessions[budget_mb]

    def measure(case, budget_mb, _attempt):
        session = session_for(budget_mb)
        record = run_isolated(case, session) if session.options.isolate else run_case(case, session)
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
    from harness.measure.session import Session
    _check_writable(settings.results_dir)
    session = Session(settings.results_dir, settings.run_options)
    session.close()
    print(f"diffbench: shard {settings.shard.label} is empty: {settings.selected} selected case(s) over "
          f"{settings.shard.count} shards leave it nothing to run; wrote the empty run folder {session.run_dir}",
          flush=True)
    return 0


def cmd_list(args) -> int:
    from backends.base import Support
    from harness.measure.device import fingerprint
    from harness.judge.preflight import support_of
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
    from harness.verdict.merge import merge
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
    from harness.judge import preflight
    from harness.measure import device as devinfo
    from harness.judge import stacks
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
    # the stack-vs-GPU verdict of each backend on this machine, per device (harness/judge/preflight.py)
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
    from harness.verdict.history import HistoryStore
    with HistoryStore(args.history, create=False) if args.history else contextlib.nullcontext() as history:
        _, report = gate_and_report(records, out, args.baseline, args.threshold, history=history)
    print(f"report: {report}")
    return 0


def cmd_gate(args) -> int:
    if args.history:
        return _history_gate(args)
    if not (args.baseline and args.current):
        raise UserError("gate needs --baseline FILE and --current RECORDS..., or --history STORE")
    from harness.verdict import gate
    from harness.records import load_many
    from harness.verdict.thresholds import load_thresholds_toml, parse_thresholds
    specs = list(args.threshold)
    if args.thresholds:
        specs = load_thresholds_toml(args.thresholds) + specs
    thresholds = parse_thresholds(specs or DEFAULT_THRESHOLDS)
    result = gate.compare(load_many([args.baseline]), load_many(args.current), thresholds)
    print(result.markdown() if args.format == "markdown" else result.table(all_rows=args.all))
    return result.exit_code


def _history_gate(args) -> int:
    from harness.verdict.history import HistoryStore
    from harness.verdict.history_gate import judge
    from harness.verdict.thresholds import load_thresholds_toml
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
    from harness.verdict.history import HistoryStore
    with HistoryStore(args.history, create=args.history_command == "add") as store:
        if args.history_command == "add":
            for run_id, n in store.add(args.runs):
                print(f"history: run {run_id}: {n} record(s) added to {args.history}")
        elif args.history_command == "accept":
            run = store.accept(args.run_id, args.note)
            print(f"history: run {run.run_id} (commit {run.git_commit or 'unknown'}) accepted: the series it "
                  f"belongs to start again there")
        else:
            from harness.verdict.history_gate import show
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
    from harness.verdict import ab
    from harness.verdict.thresholds import parse_thresholds
    if not (args.baseline_dir or args.baseline_rev):
        raise UserError("ab needs --baseline-dir DIR or --baseline-rev REV")
    if args.processes < 1:
        raise UserError(f"--processes must be >= 1, got {args.processes}")
    device = options.resolve_device(args.gpu)
    run_options = options.build_run_options(device, False, args.warmup, args.repeats or AB_REPEATS, args.case_timeout)
    cases = options.select_cases(args.model, args.backend, args.dtype, args.batch, args.size, args.steps,
                                 args.matrix)
    thresholds = list(args.threshold) or AB_THRESHOLDS
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
        from harness.verdict.run_end import add_to_history
        print(add_to_history(args.history, [paths["current"]]))
    return result.exit_code


def cmd_baseline(args) -> int:
    from harness.verdict.baseline import save_baseline
    save_baseline(args.records, args.out)
    print(f"baseline: {args.out}")
    return 0
