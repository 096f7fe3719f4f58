"""`diffbench run | ab | backends | models | report | gate | baseline save` -- thin; calls what the suites call."""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path

from harness.errors import UserError


ROOT = Path(__file__).resolve().parent.parent
# an A/B run's calls pair up; measured on the noisy 2-core CI VM, 30 pairs gave a paired noise band (3 standard
# errors) of ±4-10 %, too close to a 10 % step; 50 pairs narrow it by sqrt(50/30)
AB_REPEATS = 50
# paired medians are steady enough to hold half the stored-baseline step (unchanged builds measured -2.4..+4.6 %
# over eleven rounds on that VM), so an A/B run catches a 10 % slowdown with its defaults
AB_E2E_P50 = "e2e.p50:+5%"


class _Parser(argparse.ArgumentParser):
    """argparse prints usage + error on two lines; our contract is one line and exit 2."""

    def error(self, message):
        raise UserError(message)


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", help="tiny-sd, tiny-sd3, sd15, sdxl, sd35-large, flux-dev, path:DIR")
    p.add_argument("--backend", action="append", help="backend[+variant], e.g. torch_compile+max-autotune")
    p.add_argument("--dtype", action="append", help="fp32, fp16, bf16")
    p.add_argument("--batch", action="append", type=int)
    p.add_argument("--size", action="append", help="HxW, e.g. 64x64 or 1024x1024")
    p.add_argument("--steps", action="append", type=int)
    p.add_argument("--matrix", help="TOML matrix file (default: the embedded tiny matrix)")
    p.add_argument("--gpu", action="store_true", help="run on CUDA; stops at once when there is no CUDA device")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffbench", description="Benchmark and compatibility harness for diffusion backends")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="benchmark a matrix of cases and write records (+ report)")
    _add_selection(run)
    run.add_argument("--results-dir", default="results", help="parent folder of results/<run-id>/")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a run: skip the cases already recorded there")
    run.add_argument("--quick", action="store_true", help="1 warm-up, 3 repeats")
    run.add_argument("--warmup", type=int)
    run.add_argument("--repeats", type=int)
    run.add_argument("--timeout", type=float, default=900.0, help="per-case timeout in seconds (0: none)")
    run.add_argument("--triton-url", help="use an existing Triton server (host:port) instead of starting one")
    run.add_argument("--no-report", action="store_true", help="write records only")
    run.add_argument("--baseline", help="apply the regression gate against this baseline records file")
    run.add_argument("--threshold", action="append", default=[], help="gate threshold, e.g. e2e.p50:+10%%")

    ab = sub.add_parser("ab", help="measure two builds call by call in alternation and gate current vs baseline")
    _add_selection(ab)
    side = ab.add_mutually_exclusive_group()
    side.add_argument("--baseline-dir", help="checkout of the baseline build")
    side.add_argument("--baseline-rev", help="git revision of this repository to use as the baseline build")
    ab.add_argument("--current-dir", help="checkout of the current build (default: this one)")
    ab.add_argument("--baseline-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment for the baseline side only")
    ab.add_argument("--current-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment for the current side only")
    ab.add_argument("--results-dir", default="results", help="parent folder of results/ab-<time>/")
    ab.add_argument("--warmup", type=int)
    ab.add_argument("--repeats", type=int, help=f"measured call pairs per case (default {AB_REPEATS})")
    ab.add_argument("--timeout", type=float, default=900.0, help="per-case timeout in seconds (0: none)")
    ab.add_argument("--threshold", action="append", default=[],
                    help=f"gate threshold (default: the gate's defaults with {AB_E2E_P50.replace('%', '%%')})")
    ab.add_argument("--no-report", action="store_true", help="write records and the gate table only")
    ab.add_argument("--all", action="store_true", help="print every gate row, PASS included")

    sub.add_parser("backends", help="list backends, whether each is available here, and why not")
    sub.add_parser("models", help="list the model zoo")

    report = sub.add_parser("report", help="render records (one or many files) as one HTML page with PNGs")
    report.add_argument("records", nargs="+")
    report.add_argument("-o", "--out", required=True)
    report.add_argument("--baseline", help="include the gate table against this baseline")
    report.add_argument("--threshold", action="append", default=[])

    gate = sub.add_parser("gate", help="compare current records with a baseline; exit 1 on a regression")
    gate.add_argument("--baseline", required=True)
    gate.add_argument("--current", required=True, nargs="+")
    gate.add_argument("--threshold", action="append", default=[], help="e.g. e2e.p50:+10%%, status")
    gate.add_argument("--thresholds", help="TOML file of thresholds")
    gate.add_argument("--all", action="store_true", help="print every row, PASS included")

    baseline = sub.add_parser("baseline", help="manage baselines")
    bsub = baseline.add_subparsers(dest="baseline_command", required=True, parser_class=_Parser)
    save = bsub.add_parser("save", help="store records as a baseline file")
    save.add_argument("records", nargs="+")
    save.add_argument("-o", "--out", required=True)
    return parser


# -- selection --------------------------------------------------------------------------------------------------
def select_cases(models=None, backends=None, dtypes=None, batches=None, sizes=None, steps=None, matrix=None):
    """The matrix (file or embedded default) with any explicit selection overriding its lists; validated."""
    from backends import base as registry
    from harness import models as zoo
    from harness.cases import load_matrix, parse_backend_spec, parse_size

    m = load_matrix(matrix)
    if models:
        m.models = list(models)
    if backends:
        m.backends = list(backends)
    if dtypes:
        m.dtypes = list(dtypes)
    if batches:
        m.batches = list(batches)
    if sizes:
        m.sizes = [parse_size(s) for s in sizes]
    if steps:
        m.steps = list(steps)
    for name in m.models:
        zoo.spec(name)
    for spec in m.backends:
        backend, variant = parse_backend_spec(spec)
        impl = registry.get(backend)
        if variant not in impl.variants:
            known = ", ".join(v for v in impl.variants if v) or "(none)"
            raise UserError(f"unknown variant {variant!r} for backend {backend}; choose from {known}")
    return m.expand()


def resolve_device(gpu: bool) -> str:
    if not gpu:
        return "cpu"
    import torch
    if not torch.cuda.is_available():
        raise UserError("--gpu was given but no CUDA device is visible (torch.cuda.is_available() is False)")
    return "cuda"


def run_options(device: str, quick: bool, warmup: int | None, repeats: int | None, timeout: float | None):
    from harness.runner import RunOptions
    if quick and (warmup is not None or repeats is not None):
        raise UserError("conflicting options: --quick sets warm-up and repeats; drop --warmup/--repeats")
    for name, value in (("--warmup", warmup), ("--repeats", repeats)):
        if value is not None and value < (0 if name == "--warmup" else 1):
            raise UserError(f"{name} must be {'>= 0' if name == '--warmup' else '>= 1'}, got {value}")
    if timeout is not None and timeout < 0:
        raise UserError(f"--timeout must be >= 0, got {timeout}")
    options = RunOptions(device=device, timeout_s=timeout or None)
    if quick:
        options.warmup, options.repeats = 1, 3
    if warmup is not None:
        options.warmup = warmup
    if repeats is not None:
        options.repeats = repeats
    return options


def summary_table(records) -> str:
    """One line per case: status, e2e p50, speed-up vs the reference measured in the same run, PSNR, reason."""
    from backends.base import REFERENCE
    reference_p50 = {(r.model, r.dtype, r.batch, r.height, r.width, r.steps): r.e2e.get("p50")
                     for r in records if r.backend == REFERENCE and r.status == "passed"}
    rows = [("case", "status", "e2e p50 ms", "vs eager", "psnr dB", "reason")]
    for r in records:
        p50 = r.e2e.get("p50")
        ref = reference_p50.get((r.model, r.dtype, r.batch, r.height, r.width, r.steps))
        psnr = (r.parity.get("image") or {}).get("psnr") if r.parity else None
        rows.append((r.case_id, r.status, f"{p50 * 1000:.1f}" if p50 else "-",
                     f"{ref / p50:.2f}x" if p50 and ref else "-",
                     ("inf" if psnr in (None, float("inf")) and r.parity.get("image", {}).get("passed")
                      else f"{psnr:.1f}" if psnr is not None else "-"),
                     (r.reason or "")[:70]))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


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
    if args.triton_url:
        _check_triton_url(args.triton_url)
        os.environ["DIFFBENCH_TRITON_URL"] = args.triton_url
    device = resolve_device(args.gpu)
    options = run_options(device, args.quick, args.warmup, args.repeats, args.timeout)
    cases = select_cases(args.model, args.backend, args.dtype, args.batch, args.size, args.steps, args.matrix)
    if args.threshold and not args.baseline:
        raise UserError("conflicting options: --threshold needs --baseline")
    if args.baseline:
        from harness import gate
        gate.parse_thresholds(args.threshold or gate.DEFAULT_THRESHOLDS)
        if not Path(args.baseline).is_file():
            raise UserError(f"baseline {args.baseline} does not exist")
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "records.jsonl").is_file():
            raise UserError(f"--resume {run_dir}: no records.jsonl there")
        session = runner.Session(run_dir, options, run_id=run_dir.name, resume=True)
    else:
        _check_writable(Path(args.results_dir))
        session = runner.Session(Path(args.results_dir), options)
    session.configure(cases)
    print(f"diffbench: {len(cases)} case(s) on {device}; writing {session.records_path}", flush=True)

    def on_term(_sig, _frame):
        raise runner.Interrupted()
    previous = signal.signal(signal.SIGTERM, on_term)
    done, case = [], None
    try:
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
    result, report = gate_and_report(load_many([session.records_path]), session.run_dir, args.baseline,
                                     args.threshold, write_report=not args.no_report)
    if result is not None:
        print(result.table())
    if report is not None:
        print(f"report: {report}")
    return result.exit_code if result is not None else 0


def gate_and_report(records: list[dict], out_dir: Path, baseline=None, thresholds=(), write_report=True):
    """The end of every run (CLI and pytest): the gate against a baseline if one is given, then the report.
    Returns (gate result or None, report path or None)."""
    from harness.records import load_many
    result = None
    if baseline:
        from harness import gate
        result = gate.compare(load_many([baseline]), records,
                              gate.parse_thresholds(list(thresholds) or gate.DEFAULT_THRESHOLDS))
    report = None
    if write_report:
        import reports
        report = reports.build_report(records, out_dir, gate_result=result)
    return result, report


def _check_triton_url(url: str) -> None:
    import socket
    from urllib.parse import urlparse
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if not parsed.hostname or not parsed.port:
        raise UserError(f"--triton-url {url!r} must be host:port")
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=3):
            pass
    except OSError as exc:
        raise UserError(f"--triton-url {url} is unreachable: {exc.strerror or exc}")


def cmd_backends(_args) -> int:
    import torch

    from backends import base as registry
    root = Path(__file__).resolve().parent.parent
    # from a checkout, name the checkout: diffbench is not on PyPI, and a bare name would fetch whatever is there
    target = f"-e '{root}[{{}}]'" if (root / "pyproject.toml").is_file() else "'diffbench[{}]'"
    gpu = torch.cuda.is_available()
    for name in registry.names():
        backend = registry.get(name)
        support = backend.available()
        variants = ", ".join(v for v in backend.variants if v) or "-"
        status = "available" if support else f"unavailable: {support.reason}"
        print(f"{name:<14} {status}  [variants: {variants}]")
        extra = getattr(backend, "extra", "")
        if not support and extra:
            extra = "gpu" if gpu and extra == "onnx" else extra  # onnxruntime-gpu instead of onnxruntime
            print(f"{'':<14} install: pip install {target.format(extra)}")
    return 0


def cmd_models(_args) -> int:
    from harness.models import MODELS
    for spec in MODELS.values():
        where = "GPU; CPU slow" if spec.full_size else "CPU and GPU"
        print(f"{spec.name:<11} {spec.kind:<5} {where:<13} {spec.description}")
    print("path:DIR    a diffusers checkpoint folder on disk")
    return 0


def cmd_report(args) -> int:
    from harness.records import load_many
    records = load_many(args.records)
    out = Path(args.out)
    _check_writable(out)
    _, report = gate_and_report(records, out, args.baseline, args.threshold)
    print(f"report: {report}")
    return 0


def cmd_gate(args) -> int:
    from harness import gate
    from harness.records import load_many
    specs = list(args.threshold)
    if args.thresholds:
        specs = gate.load_thresholds_toml(args.thresholds) + specs
    thresholds = gate.parse_thresholds(specs or gate.DEFAULT_THRESHOLDS)
    result = gate.compare(load_many([args.baseline]), load_many(args.current), thresholds)
    print(result.table(all_rows=args.all))
    return result.exit_code


def _env_pairs(items: list[str], flag: str) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not key.replace("_", "a").isalnum():
            raise UserError(f"malformed {flag} {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def cmd_ab(args) -> int:
    from harness import ab, gate
    if not (args.baseline_dir or args.baseline_rev):
        raise UserError("ab needs --baseline-dir DIR or --baseline-rev REV")
    device = resolve_device(args.gpu)
    options = run_options(device, False, args.warmup, args.repeats or AB_REPEATS, args.timeout)
    cases = select_cases(args.model, args.backend, args.dtype, args.batch, args.size, args.steps, args.matrix)
    thresholds = list(args.threshold) or [*gate.DEFAULT_THRESHOLDS, AB_E2E_P50]   # later specs win
    gate.parse_thresholds(thresholds)
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
        print(f"diffbench ab: {len(cases)} case(s) on {device}, {options.repeats} call pairs each; baseline "
              f"{args.baseline_rev or baseline}, current {current}; writing {out}", flush=True)
        def on_term(_sig, _frame):
            raise KeyboardInterrupt
        previous = signal.signal(signal.SIGTERM, on_term)
        try:
            paths = ab.run_ab(cases, baseline, current, out, device, options.warmup, options.repeats,
                              options.timeout_s, env)
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
    return result.exit_code


def cmd_baseline(args) -> int:
    from harness import gate
    gate.save_baseline(args.records, args.out)
    print(f"baseline: {args.out}")
    return 0


COMMANDS = {"run": cmd_run, "ab": cmd_ab, "backends": cmd_backends, "models": cmd_models, "report": cmd_report,
            "gate": cmd_gate, "baseline": cmd_baseline}


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
