"""The user's own served model (--triton-model NAME): read from the server's metadata and config, fitted to the
workload component it stands in for, and called with diffbench's interface names.

Today one component can be stood in for: a text-embedding encoder, i.e. token ids (+ attention mask, + token type
ids) in, the last hidden state [batch, seq, dim] or already pooled embeddings [batch, dim] out. Pooled embeddings are
handed to the pipeline repeated along the sequence: its mean pooling over the attention mask gives them back
unchanged, so the served model's own pooling and normalisation are what is judged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

from backends.triton import repository as repo

MODEL_ENV = "DIFFBENCH_TRITON_MODEL"   # --triton-model
SWEEP_ENV = "DIFFBENCH_TRITON_SWEEP"   # --concurrency: the served model's sweep levels, e.g. "1,2,4"
DEFAULT_LEVELS = (1, 2, 4)
LEVEL_BUDGET_S = 30.0                  # a level stops sending new requests after this
# diffbench's encoder inputs and the names services commonly give them
INPUT_NAMES = {"input_ids": ("input_ids", "ids", "token_ids", "tokens", "input"),
               "attention_mask": ("attention_mask", "mask", "input_mask"),
               "token_type_ids": ("token_type_ids", "segment_ids", "type_ids")}
OUTPUT_NAMES = ("last_hidden_state", "hidden_state", "embeddings", "embedding", "sentence_embedding", "output")
TOKEN_TYPES = ("INT64", "INT32")
FLOAT_TYPES = ("FP32", "FP16")


class DoesNotFit(ValueError):
    """The served model's interface cannot stand in for the component: the message says why."""


@dataclass
class FittedModel:
    served: repo.ServedModel                   # the served names and datatypes, as TritonRunner takes them
    renames: dict[str, str]                    # diffbench's input name -> the served input's
    output: str
    pooled: bool                               # output [batch, dim] rather than [batch, seq, dim]
    description: dict = field(default_factory=dict)   # what the record says about it

    def arrays(self, tokens: dict) -> dict:
        """The tokenizer's tensors as the served model takes them: its names, its integer type."""
        inputs = {t.name: t for t in self.served.inputs}
        return {served: tokens[ours].numpy().astype(repo.NUMPY_DTYPE[inputs[served].dtype])
                for ours, served in self.renames.items()}


def describe(server, name: str) -> tuple[dict, dict]:
    """The served model's metadata and config, over HTTP (the JSON forms of the model repository API)."""
    import tritonclient.http as httpclient
    from backends.triton.client import failure
    client = httpclient.InferenceServerClient(server.http_url, connection_timeout=30, network_timeout=30)
    try:
        if not client.is_model_ready(name):
            raise DoesNotFit(f"served model {name!r} is not ready on {server.http_url} (load it there first)")
        return client.get_model_metadata(name), client.get_model_config(name)
    except DoesNotFit:
        raise
    except Exception as exc:
        raise failure(server, f"reading served model {name!r}", exc) from exc
    finally:
        client.close()


def fit_encoder(metadata: dict, config: dict, wanted: list[str]) -> FittedModel:
    """Fit a served model to the text-embedding encoder whose inputs are `wanted` (the local tokenizer's names)."""
    name = metadata["name"]
    # metadata shapes are whole (a batched model's start with -1); config dims leave the batch dimension out
    skip = 1 if int(config.get("max_batch_size", 0)) > 0 else 0
    renames, inputs = {}, []
    for tensor in metadata["inputs"]:
        ours = next((k for k, aliases in INPUT_NAMES.items() if tensor["name"].lower() in aliases), None)
        if ours is None:
            raise DoesNotFit(f"served model {name!r}: input {tensor['name']!r} is not token ids, an attention mask "
                             f"or token type ids (a text-embedding encoder takes {', '.join(INPUT_NAMES)})")
        if tensor["datatype"] not in TOKEN_TYPES:
            raise DoesNotFit(f"served model {name!r}: input {tensor['name']!r} is {tensor['datatype']}, token "
                             f"tensors are {' or '.join(TOKEN_TYPES)}")
        if len(tensor["shape"]) != 2:
            raise DoesNotFit(f"served model {name!r}: input {tensor['name']!r} has shape {tensor['shape']}, not "
                             "[batch, sequence]")
        if ours not in wanted:
            raise DoesNotFit(f"served model {name!r}: input {tensor['name']!r} ({ours}) is not produced by the "
                             f"tokenizer of the reference model (it gives {', '.join(wanted)})")
        renames[ours] = tensor["name"]
        inputs.append(repo.TensorSpec(tensor["name"], tensor["datatype"], tensor["shape"][skip:]))
    if "input_ids" not in renames:
        raise DoesNotFit(f"served model {name!r} takes no token ids (inputs: "
                         f"{', '.join(t['name'] for t in metadata['inputs'])})")
    floats = [t for t in metadata["outputs"] if t["datatype"] in FLOAT_TYPES and len(t["shape"]) in (2, 3)]
    floats.sort(key=lambda t: OUTPUT_NAMES.index(t["name"].lower()) if t["name"].lower() in OUTPUT_NAMES
                else len(OUTPUT_NAMES))
    if not floats:
        raise DoesNotFit(f"served model {name!r} has no floating-point output shaped [batch, sequence, dim] (last "
                         f"hidden state) or [batch, dim] (embeddings); outputs: "
                         + ", ".join(f"{t['name']} {t['datatype']} {t['shape']}" for t in metadata["outputs"]))
    output = floats[0]
    pooled = len(output["shape"]) == 2
    served = repo.ServedModel(name=name, inputs=inputs,
                              outputs=[repo.TensorSpec(output["name"], output["datatype"], output["shape"][skip:])],
                              max_batch_size=int(config.get("max_batch_size", 0)))
    description = {
        "served_model": name, "served_versions": metadata.get("versions", []),
        "platform": metadata.get("platform") or config.get("backend"),
        "inputs": {t["name"]: f"{t['datatype']} {t['shape']}" for t in metadata["inputs"]},
        "output": f"{output['name']} {output['datatype']} {output['shape']}" + (" (pooled)" if pooled else ""),
        "max_batch_size": served.max_batch_size,
        "dynamic_batching": config.get("dynamic_batching"),
        "instance_group": [{k: g[k] for k in ("count", "kind", "gpus") if g.get(k)}
                           for g in config.get("instance_group", [])],
    }
    return FittedModel(served, renames, output["name"], pooled, description)


def check_batch(fitted: FittedModel, batch: int) -> None:
    """A case's batch travels as one request: a batched model takes at most its max_batch_size sentences."""
    from backends.base import Unsupported
    limit = fitted.served.max_batch_size
    if 0 < limit < batch:
        raise Unsupported(f"batch {batch} > max_batch_size {limit} of served model {fitted.served.name!r} (a case's "
                          "batch is one request)")


class RenamingRunner:
    """Wraps a TritonRunner of the served names: diffbench's input names in, the last hidden state out (pooled
    embeddings repeated along the sequence; see the module doc)."""

    def __init__(self, runner, fitted: FittedModel):
        self.runner, self.fitted = runner, fitted
        self.requests = 0   # sent, so the server's statistics of the case's calls can be waited for

    def __call__(self, feeds):
        served = {self.fitted.renames[n]: t for n, t in feeds.items() if n in self.fitted.renames}
        self.requests += 1
        (out,) = self.runner(served)
        if self.fitted.pooled:
            ids = feeds["input_ids"]
            out = out[:, None, :].expand(ids.shape[0], ids.shape[1], out.shape[-1])
        return [out]


# -- serving: the sweep, the server's statistics and metrics, as the serving suites record them ---------------------
def sweep_levels() -> tuple[int, ...]:
    text = os.environ.get(SWEEP_ENV, "")
    return tuple(int(v) for v in text.split(",") if v.strip()) if text else DEFAULT_LEVELS


def requests_per_level(concurrency: int) -> int:
    """Bounded: every client sends two requests (four at concurrency 1)."""
    return max(4, 2 * concurrency)


def statistics(server, name: str, before: dict[str, dict] | None = None, sent: int = 0,
               wait_s: float = 5.0) -> dict[str, dict]:
    """The served model's counters per version (statistics extension, over HTTP). With `before` and `sent`: once
    they count the `sent` requests since `before` (the server counts a request just after its response)."""
    import time

    import tritonclient.http as httpclient
    from backends.triton.serving import statistics_by_version
    client = httpclient.InferenceServerClient(server.http_url, connection_timeout=30, network_timeout=30)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            counters = statistics_by_version(client, name)
            if _answered(counters) - _answered(before or {}) >= sent or time.monotonic() > deadline:
                return counters
            time.sleep(0.02)
    finally:
        client.close()


def _answered(counters: dict[str, dict]) -> int:
    return sum(c["requests"] + c["failures"] for c in counters.values())


def model_metrics(url: str, name: str) -> dict[str, dict[str, float]]:
    """The served model's nv_inference_* series from the server's /metrics (other models' left out)."""
    from backends.triton.serving import scrape_metrics
    label = f'model="{name}"'
    return {metric: {labels: value for labels, value in series.items() if label in labels.split(",")}
            for metric, series in scrape_metrics(url).items()
            if metric.startswith("nv_inference_") and any(label in labels.split(",") for labels in series)}


def serving(server, fitted: FittedModel, request: Callable[[int], dict], protocol: str, batch: int,
            before: dict[str, dict], sent: int, levels: tuple[int, ...]) -> dict:
    """The record's `serving` for the user's model, after the case's measured calls: the version the case's calls
    reached (the one whose request count grew since `before`, read at prepare), the server's statistics of those
    calls (`sent` requests), a concurrency sweep of the case's own requests (`batch` sentences each) and the
    model's /metrics."""
    from backends.triton.client import failure
    from backends.triton.serving import statistics_delta, sweep
    from backends.triton.server import TritonServerError
    name = fitted.served.name
    after = statistics(server, name, before, sent)
    grown = [v for v, counters in after.items()
             if counters["requests"] > before.get(v, {}).get("requests", 0)]
    version = grown[0] if len(grown) == 1 else ""
    record = {"server": server.http_url, "model": name, "version": "/".join(grown) or None, "protocol": protocol,
              "load_generator": "tritonclient asyncio (one machine)",
              "request": {"batch": batch, "inputs": sorted(fitted.renames.values()), "output": fitted.output},
              "requests_per_level": {str(c): requests_per_level(c) for c in levels},
              "level_budget_s": LEVEL_BUDGET_S}
    if version in before:   # the case's first, warm-up and measured calls on the server (others' traffic counts too)
        record["statistics"] = {"case_calls": statistics_delta(before[version], after[version])}
    try:
        levels_out = sweep(server, name, request, [fitted.output], levels=levels,
                           requests_per_level=requests_per_level, protocol=protocol, budget_s=LEVEL_BUDGET_S,
                           version=version)
    except Exception as exc:   # the sweep's own failure, or a statistics call the server refused: one line
        error = exc if isinstance(exc, TritonServerError) else failure(server, "serving sweep", exc)
        record["failure"] = {"error_class": "ServingError", "reason": str(error).splitlines()[0]}
        return record
    for level in levels_out:
        level["embeddings_per_s"] = level["throughput_rps"] * batch
    record["sweep"] = levels_out
    top = levels_out[-1]
    record["batching"] = {"concurrency": top["concurrency"], "requests": top["server_requests"],
                          "executions": top["executions"], "batch_sizes": top["batch_sizes"],
                          "batched": top["executions"] < top["server_requests"]}
    try:
        record["metrics"] = model_metrics(server.metrics_url, name)
    except OSError as exc:   # a metrics port that is not published: the rest stands
        record["metrics_error"] = f"{server.metrics_url}: {exc}"
    return record
