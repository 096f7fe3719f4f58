"""Every run option, declared once: `diffbench run` (argparse) and `pytest suites/` (pytest options) are both
generated from OPTIONS, with the same names, defaults and help, and read back into one Settings.

pytest-timeout owns pytest's `--timeout`, so the per-case timeout is `--case-timeout` on both sides.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness.errors import UserError

DEFAULT_WARMUP, DEFAULT_REPEATS = 2, 10
QUICK_WARMUP, QUICK_REPEATS = 1, 3
DEFAULT_CASE_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class Option:
    flag: str                  # "--case-timeout"
    help: str
    type: Callable | None = None
    default: Any = None
    action: str | None = None  # "append" | "store_true" | None (one value)
    metavar: str | None = None
    nargs: str | None = None   # "+": several values after one flag

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def kwargs(self) -> dict:
        """add_argument keywords: argparse and pytest take the same ones."""
        kw: dict[str, Any] = {"help": self.help.replace("%", "%%"), "dest": self.dest}
        if self.action:
            kw["action"] = self.action
        if self.type is not None:
            kw["type"] = self.type
        if self.action == "append":
            kw["default"] = None if self.default is None else list(self.default)
        elif self.action != "store_true":
            kw["default"] = self.default
        if self.metavar:
            kw["metavar"] = self.metavar
        if self.nargs:
            kw["nargs"] = self.nargs
        return kw


SELECTION = (
    Option("--model", "model (repeatable): tiny-sd, tiny-sd3, sd15, sdxl, sd35-large, flux-dev, path:DIR, "
           "ORG/NAME[@REVISION] (from the local Hugging Face cache)",
           action="append"),
    Option("--backend", "backend[+option...] (repeatable), e.g. torch_compile+max-autotune+fused-qkv",
           action="append"),
    Option("--dtype", "fp32, fp16, bf16 (repeatable)", action="append"),
    Option("--batch", "batch size (repeatable)", type=int, action="append"),
    Option("--size", "HxW (repeatable), e.g. 64x64 or 1024x1024", action="append"),
    Option("--steps", "denoising steps (repeatable)", type=int, action="append"),
    Option("--seq", "sequence length in tokens of a text-embedding model's cases (repeatable), e.g. 16 or 128",
           type=int, action="append"),
    Option("--lora", "LoRA adapter (repeatable) applied to every text-to-image case: a .safetensors file, a folder "
           "holding one, or ORG/NAME[@REVISION] from the local Hugging Face cache", action="append",
           metavar="PATH_OR_ORG/NAME"),
    Option("--lora-scale", "scale of the --lora adapters (default 1.0)", type=float, default=1.0, metavar="S"),
    Option("--lora-fuse", "fuse the --lora adapters into the weights (a build step) instead of running them "
           "beside every layer they touch", action="store_true"),
    Option("--matrix", "TOML matrix file (default: the embedded tiny matrix)", metavar="FILE"),
    Option("--gpu", "run on CUDA; stops at once when there is no CUDA device", action="store_true"),
)
SPLITTING = (   # one CI job per shard; `diffbench list` shows the split
    Option("--shard", "run only shard I of N of the selected cases (e.g. 2/3): deterministic, disjoint, complete",
           metavar="I/N"),
    Option("--durations-from", "earlier records (files or run folders) whose timings balance --shard and estimate "
           "the time left", action="append", nargs="+", metavar="RECORDS"),
)
MEASURING = (
    Option("--quick", f"a quick look: one batch and one shape per model (the smallest selected), "
           f"{QUICK_WARMUP} warm-up call, {QUICK_REPEATS} measured calls per case", action="store_true"),
    Option("--warmup", f"warm-up calls per case, discarded (default {DEFAULT_WARMUP})", type=int),
    Option("--repeats", f"measured calls per case (default {DEFAULT_REPEATS})", type=int),
    Option("--case-timeout", "per-case timeout in seconds (0: none)", type=float, default=DEFAULT_CASE_TIMEOUT_S,
           metavar="S"),
    Option("--triton-url", "use an existing Triton server (host:port) instead of starting one",
           metavar="HOST:PORT"),
    Option("--endpoint", "the http backend's service: its base URL, e.g. http://127.0.0.1:8000 (an endpoint that "
           "does not answer is an error row)", metavar="URL"),
    Option("--concurrency", "the load sweep of the http backend and of a --triton-model: concurrency levels, e.g. "
           "1,2,4 (default 1,2,4)",
           metavar="N,N,..."),
    Option("--request-rate", "the http backend's load sweep in request-rate mode (open loop, instead of "
           "--concurrency): requests per second at each level, e.g. 0.5,1,2", metavar="R,R,..."),
    Option("--request-distribution", "arrivals of --request-rate: constant or poisson (default constant)",
           metavar="constant|poisson"),
    Option("--sweep-windows", "the http backend's load sweep: at most N measurement windows per level (default "
           "10); a level stops when its last three windows agree within --stability", type=int, metavar="N"),
    Option("--stability", "the http backend's load sweep: the percentage within which the last three windows' "
           "requests/s and mean latency must agree (default 10)", type=float, metavar="PCT"),
    Option("--http-template", "the http backend's template protocol (--backend http+template): a JSON file with "
           "the request path, a body with {prompt}, {seed}... placeholders and the dotted path of the base64 images "
           "in the answer (docs/service.md)", metavar="FILE"),
    Option("--memory-budget", "hold each case to this much memory, e.g. 12GB: on GPU a real allocator cap in the "
           "case's worker, on CPU its measured inference peak (process tree); above it the case is over_budget; "
           "each case in its own worker unless --no-isolate",
           metavar="SIZE"),
    Option("--isolate", "measure each case in a fresh worker process, so allocator pools, compile caches, arenas "
           "and the peak RSS of one case cannot leak into the next (default: on with --gpu or --memory-budget, off "
           "on CPU: records say memory.isolated)",
           action=argparse.BooleanOptionalAction),
    Option("--triton-grpc-url", "gRPC endpoint of the --triton-url server (default: its host, port 8001)",
           metavar="HOST:PORT"),
    Option("--triton-metrics-url", "metrics endpoint of the --triton-url server (default: "
           "http://its host:8002/metrics)", metavar="URL"),
    Option("--triton-model", "benchmark NAME, a model the --triton-url server already serves, as the encoder of "
           "--model (a text-embedding model: its local reference judges the served outputs)", metavar="NAME"),
)
OUTPUT = (
    Option("--results-dir", "parent folder of results/<run-id>/", default="results", metavar="DIR"),
    Option("--no-report", "write records only, no HTML report", action="store_true"),
    Option("--baseline", "apply the regression gate against this baseline records file", metavar="FILE"),
    Option("--threshold", "gate threshold (repeatable), e.g. e2e.p50:+10%", action="append", default=()),
    Option("--history", "add the run's records to this history store (an SQLite file) when it is done; "
           "`diffbench gate --history STORE` judges the runs there", metavar="STORE"),
)
OPTIONS: tuple[Option, ...] = (*SELECTION, *SPLITTING, *MEASURING, *OUTPUT)
BY_FLAG = {o.flag: o for o in OPTIONS}


def add_to_argparse(parser, flags: list[str] | None = None) -> None:
    """Add the options (all, or the named ones) to an argparse parser."""
    for option in _chosen(flags):
        parser.add_argument(option.flag, **option.kwargs())


def add_to_pytest(group, flags: list[str] | None = None) -> None:
    """Add the options (all, or the named ones) to a pytest option group."""
    for option in _chosen(flags):
        group.addoption(option.flag, **option.kwargs())


def _chosen(flags):
    return OPTIONS if flags is None else tuple(BY_FLAG[f] for f in flags)


# -- reading them back ------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """What the options say, validated: the device, the cases, how to measure them, where results go."""
    device: str
    cases: list
    run_options: Any                        # harness.measure.run_options.RunOptions
    results_dir: Path = Path("results")
    write_report: bool = True
    baseline: str | None = None
    thresholds: list[str] = field(default_factory=list)
    triton_url: str | None = None
    shard: Any = None                       # harness.selection.shard.Shard, or None: every selected case
    selected: int = 0                       # cases selected before sharding
    expected_s: dict[str, float] = field(default_factory=dict)   # case id -> seconds, from --durations-from
    triton_grpc_url: str | None = None
    triton_metrics_url: str | None = None
    triton_model: str | None = None
    endpoint: str | None = None             # the http backend's service
    concurrency: str | None = None          # the http backend's and a --triton-model's sweep levels, "1,2,4"
    history: str | None = None              # --history STORE: the records are added there at the end
    http_env: dict[str, str] = field(default_factory=dict)   # the http backend's sweep and protocol options


def settings_from(get: Callable[[str], Any]) -> Settings:
    """Settings from option values; `get(dest)` reads one (argparse: getattr on the namespace; pytest:
    config.getoption). Raises UserError (one line, exit 2) on bad input."""
    device = resolve_device(get("gpu"))
    run_options = build_run_options(device, get("quick"), get("warmup"), get("repeats"), get("case_timeout"))
    isolate = get("isolate")
    # a budget asks whether a case fits: only a peak measured in the case's own process answers it
    run_options.isolate = (device == "cuda" or bool(get("memory_budget"))) if isolate is None else bool(isolate)
    if get("memory_budget"):
        run_options.memory_budget_mb = parse_memory_size(get("memory_budget"), "--memory-budget")
        if device == "cuda" and not run_options.isolate:
            raise UserError("conflicting options: a --memory-budget on GPU caps the case's own worker process; "
                            "drop --no-isolate")
    cases = select_cases(get("model"), get("backend"), get("dtype"), get("batch"), get("size"), get("steps"),
                         get("matrix"), get("seq"), get("lora"), get("lora_scale"), get("lora_fuse"),
                         quick=bool(get("quick")))
    thresholds = list(get("threshold") or [])
    baseline = get("baseline")
    if thresholds and not baseline:
        raise UserError("conflicting options: --threshold needs --baseline")
    if baseline:
        from harness.verdict.thresholds import DEFAULT_THRESHOLDS, parse_thresholds
        parse_thresholds(thresholds or DEFAULT_THRESHOLDS)
        if not Path(baseline).is_file():
            raise UserError(f"baseline {baseline} does not exist")
    if get("history") and Path(get("history")).is_dir():
        raise UserError(f"--history {get('history')} is a folder; give the store's file path (e.g. history.sqlite)")
    triton_url = get("triton_url")
    if triton_url:
        check_triton_url(triton_url)
    triton_grpc_url, triton_metrics_url = get("triton_grpc_url"), get("triton_metrics_url")
    triton_model = get("triton_model")
    if (triton_grpc_url or triton_metrics_url or triton_model) and not triton_url:
        raise UserError("conflicting options: --triton-grpc-url / --triton-metrics-url / --triton-model need "
                        "--triton-url")
    if triton_grpc_url:
        check_triton_url(triton_grpc_url, "--triton-grpc-url")
    if triton_metrics_url:
        check_triton_url(triton_metrics_url, "--triton-metrics-url")
    endpoint, concurrency = get("endpoint"), get("concurrency")
    if endpoint:
        check_endpoint(endpoint)
    if concurrency:
        check_concurrency(concurrency)
    http_env = http_settings(get)
    selected = len(cases)
    expected = expected_from(get("durations_from"), cases, run_options)
    shard = None
    if get("shard"):
        from harness.selection.shard import parse_shard, select
        shard = parse_shard(get("shard"))
        cases = select(cases, shard, expected)
    return Settings(device, cases, run_options, Path(get("results_dir")), not get("no_report"), baseline,
                    thresholds, triton_url, shard, selected, expected, triton_grpc_url=triton_grpc_url,
                    triton_metrics_url=triton_metrics_url, triton_model=triton_model, endpoint=endpoint,
                    concurrency=concurrency, history=get("history"), http_env=http_env)


def expected_from(paths, cases, run_options) -> dict[str, float]:
    """--durations-from (a list per flag: it is repeatable and takes several paths; records files, run folders or
    folders of run folders): case id -> expected seconds of this run's cases, at this run's warm-up and repeat
    counts. Empty records files (empty shards) are skipped."""
    given = [p for group in (paths or []) for p in ([group] if isinstance(group, str) else group)]
    if not given:
        return {}
    from harness.verdict.merge import is_empty, records_files
    from harness.records import read_records
    from harness.selection.shard import expected_durations
    records = [r for path in records_files(given) if not is_empty(path) for r in read_records(path)]
    return expected_durations(records, [c.id for c in cases], run_options.warmup, run_options.repeats)


def session_env(settings: Settings) -> dict:
    """What a run adds to every record's `env`: which shard it was (I/N) and, when set, CUDA_VISIBLE_DEVICES
    (one shard per GPU on a multi-GPU runner)."""
    import os
    extra = {}
    if settings.shard is not None:
        extra["shard"] = settings.shard.label
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        extra["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    return extra


def default_of(dest: str):
    """An option's default by its dest (for commands that offer only some of the options)."""
    option = next(o for o in OPTIONS if o.dest == dest)
    return False if option.action == "store_true" else option.default


_UNITS_MB = {"MB": 1.0, "MIB": 1.0, "GB": 1024.0, "GIB": 1024.0, "TB": 1024.0 * 1024.0}


def parse_memory_size(text: str, flag: str) -> float:
    """'12GB', '0.2GB', '512MB' (binary units: 1 GB = 1024 MB, as GPUs and RSS are counted) -> MB."""
    import re
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS_MB:
        raise UserError(f"{flag} {text!r}: expected a size such as 512MB or 12GB")
    mb = float(m.group(1)) * _UNITS_MB[m.group(2).upper()]
    if mb <= 0:
        raise UserError(f"{flag} {text!r} must be positive")
    return mb


def export_backend_settings(settings: Settings) -> None:
    """Settings that belong to a backend travel in the environment: harness/ never imports a backend by name, and
    A/B or isolated workers inherit it."""
    import os
    for variable, value in (("DIFFBENCH_TRITON_URL", settings.triton_url),
                            ("DIFFBENCH_TRITON_GRPC_URL", settings.triton_grpc_url),
                            ("DIFFBENCH_TRITON_METRICS_URL", settings.triton_metrics_url),
                            ("DIFFBENCH_TRITON_MODEL", settings.triton_model)):
        if value:
            os.environ[variable] = value
    if settings.endpoint:
        os.environ["DIFFBENCH_HTTP_ENDPOINT"] = settings.endpoint
    if settings.concurrency:
        os.environ["DIFFBENCH_HTTP_SWEEP"] = settings.concurrency
        os.environ["DIFFBENCH_TRITON_SWEEP"] = settings.concurrency
    os.environ.update(settings.http_env)


def select_cases(models=None, backends=None, dtypes=None, batches=None, sizes=None, steps=None, matrix=None,
                 seqs=None, loras=None, lora_scale=1.0, lora_fuse=False, quick=False):
    """The matrix (file or embedded default) with any explicit selection overriding its lists (for every
    workload: an explicit --backend, --dtype or --batch replaces the text-embedding table's too); validated.
    quick: only each model's smallest batch and shape (harness.selection.cases.quick_look)."""
    from backends import base as registry
    from harness import models as zoo
    from harness.selection import workloads
    from harness.selection.cases import load_matrix, parse_backend_spec, parse_size

    m = load_matrix(matrix)
    if models:
        m.models = list(models)
    for key, chosen in (("backends", backends), ("dtypes", dtypes), ("batches", batches)):
        if chosen:
            setattr(m, key, list(chosen))
            m.embedding.pop(key, None)
    if seqs:
        m.seqs = list(seqs)
    if sizes:
        m.sizes = [parse_size(s) for s in sizes]
    if steps:
        m.steps = list(steps)
    m.models = [zoo.case_model(name) for name in m.models]   # a hub id: resolved in the cache now, or exit 2
    if loras:   # a LoRA is part of the model: `tiny-sd+lora:pixel` (harness/models/lora.py)
        from harness.models import lora
        scale = 1.0 if lora_scale is None else float(lora_scale)
        labels = lora.choose(list(loras), scale, bool(lora_fuse))
        m.models = [zoo.case_model(lora.LoraChoice(name, labels, scale, bool(lora_fuse)).name)
                    if workloads.of_model(name) == workloads.TEXT_TO_IMAGE else name for name in m.models]
    def canonical(specs: list[str]) -> list[str]:
        out = []
        for spec in specs:
            backend, variant = parse_backend_spec(spec)
            variant = registry.get(backend).canonical_variant(variant)
            out.append(f"{backend}+{variant}" if variant else backend)
        return out
    m.backends = canonical(m.backends)
    if m.embedding.get("backends") and any(workloads.of_model(name) == workloads.TEXT_EMBEDDING for name in m.models):
        m.embedding["backends"] = canonical(m.embedding["backends"])
    if quick:
        from harness.selection.cases import quick_look
        return quick_look(m.expand())
    return m.expand()


def resolve_device(gpu: bool) -> str:
    if not gpu:
        return "cpu"
    import torch
    if not torch.cuda.is_available():
        raise UserError("--gpu was given but no CUDA device is visible (torch.cuda.is_available() is False)")
    return "cuda"


def build_run_options(device: str, quick: bool, warmup: int | None, repeats: int | None,
                      case_timeout: float | None):
    from harness.measure.run_options import RunOptions
    if quick and (warmup is not None or repeats is not None):
        raise UserError("conflicting options: --quick sets warm-up and repeats; drop --warmup/--repeats")
    for flag, value, least in (("--warmup", warmup, 0), ("--repeats", repeats, 1)):
        if value is not None and value < least:
            raise UserError(f"{flag} must be >= {least}, got {value}")
    if case_timeout is not None and case_timeout < 0:
        raise UserError(f"--case-timeout must be >= 0, got {case_timeout}")
    options = RunOptions(device=device, timeout_s=case_timeout or None)
    options.warmup, options.repeats = (QUICK_WARMUP, QUICK_REPEATS) if quick else (DEFAULT_WARMUP, DEFAULT_REPEATS)
    if warmup is not None:
        options.warmup = warmup
    if repeats is not None:
        options.repeats = repeats
    return options


def check_triton_url(url: str, flag: str = "--triton-url") -> None:
    import socket
    from urllib.parse import urlparse
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if not parsed.hostname or not parsed.port:
        raise UserError(f"{flag} {url!r} must be host:port")
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=3):
            pass
    except OSError as exc:
        raise UserError(f"{flag} {url} is unreachable: {exc.strerror or exc}")


def check_endpoint(url: str) -> None:
    """The form of --endpoint only: whether it answers is the case's question (a dead one is an error row)."""
    from urllib.parse import urlparse
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UserError(f"--endpoint {url!r} must be an http(s) URL, e.g. http://127.0.0.1:8000")


def check_concurrency(levels: str) -> None:
    try:
        values = [int(v) for v in levels.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserError(f"--concurrency {levels!r}: expected positive integers separated by commas, e.g. 1,2,4")


def http_settings(get) -> dict[str, str]:
    """The http backend's sweep mode, windows and template, checked (UserError: one line, exit 2), as the
    environment variables the backend reads."""
    env = {}
    rate, distribution = get("request_rate"), get("request_distribution")
    if rate:
        if get("concurrency"):
            raise UserError("conflicting options: --request-rate (open loop) and --concurrency (closed loop): "
                            "choose one")
        try:
            rates = [float(v) for v in rate.split(",")]
        except ValueError:
            rates = []
        if not rates or not all(0 < r < float("inf") for r in rates):   # nan and inf fail too
            raise UserError(f"--request-rate {rate!r}: expected positive numbers separated by commas, e.g. 0.5,1,2")
        env["DIFFBENCH_HTTP_RATE"] = rate
    if distribution:
        if distribution not in ("constant", "poisson"):
            raise UserError(f"--request-distribution {distribution!r}: expected constant or poisson")
        if not rate:
            raise UserError("conflicting options: --request-distribution needs --request-rate")
        env["DIFFBENCH_HTTP_DISTRIBUTION"] = distribution
    windows, stability = get("sweep_windows"), get("stability")
    if windows is not None:
        if windows < 1:
            raise UserError(f"--sweep-windows must be >= 1, got {windows}")
        env["DIFFBENCH_HTTP_WINDOWS"] = str(windows)
    if stability is not None:
        if not stability > 0:
            raise UserError(f"--stability must be a positive percentage, got {stability:g}")
        env["DIFFBENCH_HTTP_STABILITY"] = str(stability)
    template = get("http_template")
    if template:
        from backends.http import Template   # the backend's own reader: a bad file stops the run here
        Template.load(template)
        env["DIFFBENCH_HTTP_TEMPLATE"] = str(Path(template).resolve())
    return env
