"""The user's own served model (--triton-model NAME): read from the server's metadata and config, fitted to the
workload component it stands in for, and called with diffbench's interface names.

Today one component can be stood in for: a text-embedding encoder, i.e. token ids (+ attention mask, + token type
ids) in, the last hidden state [batch, seq, dim] or already pooled embeddings [batch, dim] out. Pooled embeddings are
handed to the pipeline repeated along the sequence: its mean pooling over the attention mask gives them back
unchanged, so the served model's own pooling and normalisation are what is judged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from backends.triton import repository as repo

MODEL_ENV = "DIFFBENCH_TRITON_MODEL"   # --triton-model
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


class RenamingRunner:
    """Wraps a TritonRunner of the served names: diffbench's input names in, the last hidden state out (pooled
    embeddings repeated along the sequence; see the module doc)."""

    def __init__(self, runner, fitted: FittedModel):
        self.runner, self.fitted = runner, fitted

    def __call__(self, feeds):
        served = {self.fitted.renames[n]: t for n, t in feeds.items() if n in self.fitted.renames}
        (out,) = self.runner(served)
        if self.fitted.pooled:
            ids = feeds["input_ids"]
            out = out[:, None, :].expand(ids.shape[0], ids.shape[1], out.shape[-1])
        return [out]
