"""A case's outputs and components judged against the reference."""
from __future__ import annotations


import torch

from backends import base as registry
from harness import models
from harness.errors import one_line
from harness.judge import compare
from harness.measure.reference import Reference, detach, to_device
from harness.measure.timing import StageTimer, stats


def component_parity(prepared: registry.Prepared, model: models.LoadedModel, reference: Reference,
                     dtype: str, device: str, overrides: dict | None = None) -> dict[str, dict]:
    """Feed each component the reference's captured inputs; compare every output tensor."""
    results = {}
    for name, (args, kwargs, ref_out) in reference.components.items():
        if name in prepared.unjudged_components:
            results[name] = {"passed": True, "skipped": prepared.unjudged_components[name]}
            continue
        executor = getattr(prepared.pipeline, name)
        call = getattr(executor, model.methods[name]) if name in model.methods else executor
        tol = compare.tolerance_for(name, dtype, overrides)
        try:
            with torch.inference_mode():
                out = call(*to_device(args, device), **to_device(kwargs, device))
        except Exception as exc:
            results[name] = {"passed": False, "error": f"executor raised {one_line(exc)}"}
            continue
        ref_flat = compare.flatten_output(ref_out)
        out_flat = compare.flatten_output(detach(out))
        outputs, passed = {}, True
        for key, ref_tensor in ref_flat.items():
            if key not in out_flat:
                outputs[key] = {"passed": False, "error": "output missing from the executor"}
            else:
                outputs[key] = compare.check_tensor(ref_tensor, out_flat[key], tol)
            passed = passed and outputs[key]["passed"]
        main = outputs.get("0", next(iter(outputs.values()), {}))
        results[name] = {"passed": passed, "outputs": outputs,
                         **{k: main.get(k) for k in ("max_abs", "rel_max_abs", "rel_l2", "cosine", "tolerance",
                                                     "error") if k in main}}
    return results


def vae_decode_precision(model: models.LoadedModel, pipeline, captured: dict) -> dict[str, str | None]:
    """Which precision each side's VAE decoded in: the reference's from its captured decode call (the latents it
    was fed, after the pipeline's own upcast), the backend's from its stand-in (the precision its session, engine
    or server runs) or, for a torch module, the pipeline's own rule (models.vae_decode_dtype)."""
    args = captured.get(model.vae, ((),))[0]
    latents = args[0] if args and isinstance(args[0], torch.Tensor) else None
    reference = models.DTYPE_NAMES.get(latents.dtype) if latents is not None else None
    backend = getattr(getattr(pipeline, model.vae), "compute_dtype", None) or models.vae_decode_dtype(pipeline,
                                                                                                        model.vae)
    return {"reference": reference, "backend": backend}


def parity_verdict(output_results: dict[str, dict], components: dict[str, dict],
                   what: str = "image") -> tuple[str, str, str]:
    """(verdict, error class, reason) from the output checks (first and last measured call, the ranking) and the
    component checks; `what` names the output (image, embedding)."""
    failures = [(name, r) for name, r in components.items() if not r["passed"]]
    for which, result in output_results.items():
        if not result.get("passed"):
            error = result.get("error", "")
            cls = "NaNError" if "NaN" in error or "Inf" in error else (
                "ConstantImageError" if "constant" in error else "ParityError")
            return "fail", cls, f"{what} parity ({which}): {error}"
    if failures:
        name, r = failures[0]
        error = r.get("error") or next((o.get("error") for o in r.get("outputs", {}).values()
                                        if not o.get("passed")), "")
        cls = "NaNError" if "NaN" in (error or "") else "ParityError"
        return "fail", cls, f"{name} parity: {error}"
    return "pass", "", ""


def time_components_alone(prepared: registry.Prepared, model: models.LoadedModel, reference: Reference,
                          device: str, warmup: int, repeats: int) -> dict[str, dict]:
    """Each executor called alone on the reference's captured inputs (what component parity feeds it): its cost
    outside the pipeline, to set beside the in-pipeline stage. Same clock as the stages."""
    clock = StageTimer(cuda=device == "cuda").clock
    out = {}
    for name, (args, kwargs, _) in reference.components.items():
        executor = getattr(prepared.pipeline, name)
        call = getattr(executor, model.methods[name]) if name in model.methods else executor
        args, kwargs = to_device(args, device), to_device(kwargs, device)
        seconds = []
        with torch.inference_mode():
            for i in range(warmup + repeats):
                start = clock.mark()
                call(*args, **kwargs)
                end = clock.mark()
                clock.sync()
                if i >= warmup:
                    seconds.append(clock.seconds(start, end))
        out[name] = stats(seconds)
    return out


INTEGRATION_WARNING = 1.5   # in-pipeline p50 above this multiple of the component alone is a finding


def stages_alone(stages: dict, alone: dict[str, dict], model: models.LoadedModel,
                 calls_per_run: dict[str, int]) -> list[str]:
    """Put each component's alone figure beside its in-pipeline stage (stages[stage]["alone"], ["integration"] =
    in-pipeline p50 / alone p50) and return the findings: stages whose integration exceeds INTEGRATION_WARNING."""
    mapping: dict[str, list[str]] = {}
    for component, stage in model.stages.items():
        # a denoiser call is one step: its alone time stands beside denoise_step, not the whole denoise stage
        mapping.setdefault("denoise_step" if stage == "denoise" else stage, []).append(component)
    findings = []
    for stage, components in mapping.items():
        if stage not in stages or not all(c in alone and alone[c].get("n") for c in components):
            continue
        if len(components) > 1 or calls_per_run.get(components[0], 1) > 1 and stage != "denoise_step":
            # the stage sums every call of a pipeline call (e.g. prompt and negative prompt, several encoders)
            p50 = sum(alone[c]["p50"] * calls_per_run.get(c, 1) for c in components)
            stages[stage]["alone"] = {"p50": p50, "components": {c: alone[c] for c in components},
                                      "calls_per_pipeline_call": {c: calls_per_run.get(c, 1) for c in components}}
        else:
            stages[stage]["alone"] = dict(alone[components[0]])
            p50 = alone[components[0]]["p50"]
        ratio = stages[stage]["p50"] / p50 if p50 else None
        stages[stage]["integration"] = ratio
        if ratio is not None and ratio > INTEGRATION_WARNING:
            findings.append(f"{stage}: in-pipeline p50 {stages[stage]['p50'] * 1e3:.2f} ms is {ratio:.2f}x the "
                            f"component alone ({p50 * 1e3:.2f} ms): the pipeline around it slows it down")
    return findings
