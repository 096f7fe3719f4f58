"""Judge a GPU stack without its GPU: `diffbench backends --stack FILE` and `--dump-stack FILE`.

A stack is a record's `env` (harness.measure.device.fingerprint: `gpu`, `stack`, `versions`), read from a
records.jsonl (the env of its first record) or from a JSON file holding one `env` object. Every backend and each of its options alone
is judged on the CPU and on CUDA in fp32, fp16 and bf16 by harness.judge.preflight.support_of -- the model rules,
the preflight's rules and the backend's own support() -- exactly as a run would judge its cases, with the env
marked as describing another machine (backends.base.DESCRIBED) so that what is installed is read from the stack,
never from this process.
"""
from __future__ import annotations

import json
from pathlib import Path

from harness.errors import UserError

DEVICES = ("cpu", "cuda")
DTYPES = ("fp32", "fp16", "bf16")
DEFAULT_MODEL = "tiny-sd"      # the text-to-image workload


def load_env(path: str | Path) -> dict:
    """The env a stack file describes: the first record's of a records.jsonl (or a run folder), else the `env` of a
    JSON object. UserError (one line) when the file cannot be read or holds no env."""
    from harness.records import read_records
    p = Path(path)
    if p.is_dir() or p.suffix == ".jsonl":
        env = read_records(p, strict_schema=False)[0].get("env")
    else:
        try:
            document = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"stack file {p} does not exist")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise UserError(f"cannot read stack file {p}: {exc}".splitlines()[0])
        env = document.get("env", document) if isinstance(document, dict) else None   # {"env": ...} or a bare env
    if not isinstance(env, dict) or not any(isinstance(env.get(key), dict) for key in ("gpu", "stack", "versions")):
        raise UserError(f"stack file {p} holds no env object (a record's env: gpu, stack, versions)")
    return env


def dump_env(path: str | Path, env: dict) -> Path:
    """Write `env` as a stack file ({"env": ...}) that load_env reads back."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"env": env}, indent=1, sort_keys=True, default=str) + "\n", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write stack file {p}: {exc.strerror or exc}")
    return p


def backend_specs() -> list[tuple[str, str]]:
    """(backend, variant) for every registered backend, plain and with each of its options alone."""
    from backends import base as registry
    specs = []
    for name in registry.names():
        specs.append((name, ""))
        specs.extend((name, option) for option in registry.get(name).options)
    return specs


def case_for(model: str, backend: str, variant: str, dtype: str):
    from harness import models
    from harness.selection import workloads
    from harness.selection.cases import Case
    if models.spec(model).workload == workloads.TEXT_EMBEDDING:
        return Case.embedding(model, backend, variant, dtype)
    return Case(model, backend, variant, dtype)


def judge(env: dict, model: str = DEFAULT_MODEL, described_by: str | None = None) -> list[dict]:
    """One row per backend x variant x device x dtype: {backend, variant, device, dtype, supported, reason}.
    `described_by` (the stack file) marks the env as another machine's; None judges this machine's env."""
    from backends.base import DESCRIBED, Support
    from harness import models
    from harness.judge.preflight import support_of
    models.spec(model)              # an unknown model is bad input (UserError), not a row per case
    rows = []
    for backend, variant in backend_specs():
        for device in DEVICES:
            judged = {**env, "device": device}
            if described_by:
                judged[DESCRIBED] = described_by
            for dtype in DTYPES:
                try:
                    support = support_of(case_for(model, backend, variant, dtype), judged)
                except UserError as exc:
                    support = Support.no(str(exc))
                rows.append({"backend": backend, "variant": variant, "device": device, "dtype": dtype,
                             "supported": support.supported, "reason": support.reason})
    return rows


def rows_text(rows: list[dict]) -> str:
    """The verdicts as aligned lines: backend[+option], device, dtype, verdict."""
    lines = []
    width = max(len(f"{r['backend']}+{r['variant']}") for r in rows) if rows else 0
    for r in rows:
        spec = f"{r['backend']}+{r['variant']}" if r["variant"] else r["backend"]
        verdict = "supported" if r["supported"] else f"unsupported: {r['reason']}"
        lines.append(f"{spec:<{width}}  {r['device']:<4}  {r['dtype']:<4}  {verdict}")
    return "\n".join(lines)
