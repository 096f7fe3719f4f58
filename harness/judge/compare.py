"""Parity metrics and tolerance specs.

Metrics: max abs, mean abs, relative L2, cosine, PSNR and SSIM (scikit-image). Guards: NaN/Inf and constant
images fail before any metric. Tolerances follow Polygraphy: atol/rtol plus a statistic; "elemwise" passes when
every element satisfies |out-ref| <= atol + rtol*|ref|, other statistics (max, mean, median, p99) pass when the
statistic of the absolute error is <= atol OR that of the relative error is <= rtol. A component tolerance may be
relative to the reference output (`relative_to`): the atol applied is atol x max|ref| ("max|ref|"), or atol x
max|ref| x sqrt(n) ("max|ref|*sqrt(n)", n = the output's elements per batch item), so one bound fits a VAE's image
and a text encoder's hidden states, at 64x64 and at 1024x1024. Every tolerance states its source; a failure states
the smallest tolerance that would have passed. The rule and its measurements: docs/measuring.md, "Parity
tolerances".
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

STATISTICS = ("elemwise", "max", "mean", "median", "p99")
RELATIVE_TO = (None, "max|ref|", "max|ref|*sqrt(n)")

# Unit roundoff u = 2^-p of each dtype, p its significand bits (the relative error of one rounding to nearest; Higham,
# Accuracy and Stability of Numerical Algorithms, 2nd ed., section 2.1). Component bounds are written in units of u.
UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    statistic: str = "elemwise"
    relative_to: str | None = None     # None (atol is absolute) or a scale of the reference output: RELATIVE_TO
    source: str = ""                   # why these numbers: a measurement, a derivation, who declared them

    def __post_init__(self):
        if self.statistic not in STATISTICS:
            raise ValueError(f"unknown statistic {self.statistic!r}; choose from {', '.join(STATISTICS)}")
        if self.relative_to not in RELATIVE_TO:
            raise ValueError(f"unknown relative_to {self.relative_to!r}; choose from {RELATIVE_TO}")


@dataclass(frozen=True)
class ImageTolerance:
    min_psnr_db: float
    min_ssim: float
    source: str = ""


def _relative(dtype: str, units: float, statistic: str, relative_to: str, why: str) -> Tolerance:
    """A bound of `units` x u(dtype) on the error relative to `relative_to`; rtol, the same number on the
    elementwise relative error, is the stricter of the two (passing it implies passing atol)."""
    bound = units * UNIT_ROUNDOFF[dtype]
    return Tolerance(bound, bound, statistic, relative_to, f"{dtype} default: {statistic} error <= {units:g}u x "
                     f"{relative_to} (u = {UNIT_ROUNDOFF[dtype]:.3g}); {why}")


# Component defaults per dtype and role.
# fp32: the same arithmetic in another order (VAE slicing, another batch size, ORT's or Inductor's kernels, GPU
# convolution algorithms) differs by rounding, and the rounding of a reduction grows with its length n: about
# sqrt(n) u for independent roundings (Higham & Mary, "A New Approach to Probabilistic Rounding Error Analysis",
# SIAM J. Sci. Comput. 41(5), 2019). Measured here, tiny-sd's VAE decoding a batch of 2 at once vs one image at a
# time: 42u x max|ref| at 64x64, 1065u at 512x512, 7031u at 1024x1024 (tiny-sd3's: 8199u), i.e. up to 4.6u x
# max|ref| x sqrt(n); every other correct variant far less. 16u x max|ref| x sqrt(n) holds them with a margin of 3.5x
# (1024x1024) to 13x (512x512), and a 1 % error (168,000u x max|ref|) fails it up to n = 110 million (5.9x below it
# at 1024x1024).
# fp16 / bf16: every intermediate is stored at u = 2^-11 / 2^-8 and kernels accumulate differently, so a robust
# statistic (p99) and a few tens of u; these are the former fixed bounds (1e-2, 2e-2, 5e-2 at magnitude 1) re-written
# relative to the output's size, not yet measured on a GPU.
_FP32_WHY = ("rounding of reordered sums grows like sqrt(n); correct fp32 variants measured <= 4.6u x max|ref| x "
             "sqrt(n), a 1 % error is 168,000u x max|ref| (docs/measuring.md)")
_REDUCED_WHY = "reduced precision stores every intermediate rounded: the former fixed bound, relative to max|ref|"
COMPONENT_TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "fp32": {role: _relative("fp32", 16, "max", "max|ref|*sqrt(n)", _FP32_WHY)
             for role in ("text_encoder", "denoiser", "vae")},
    "fp16": {"text_encoder": _relative("fp16", 20, "p99", "max|ref|", _REDUCED_WHY),
             "denoiser": _relative("fp16", 20, "p99", "max|ref|", _REDUCED_WHY),
             "vae": _relative("fp16", 40, "p99", "max|ref|", _REDUCED_WHY)},
    "bf16": {role: _relative("bf16", 12, "p99", "max|ref|", _REDUCED_WHY)
             for role in ("text_encoder", "denoiser", "vae")},
}
_IMAGE_WHY = ("the whole pipeline, every step's rounding carried through the scheduler; a correct fp32 reordering "
              "measured >= 100 dB, a blank or shifted image < 10 dB")
IMAGE_TOLERANCES = {"fp32": ImageTolerance(40.0, 0.98, f"fp32 default: {_IMAGE_WHY}"),
                    "fp16": ImageTolerance(30.0, 0.90, f"fp16 default: {_IMAGE_WHY}"),
                    "bf16": ImageTolerance(25.0, 0.85, f"bf16 default: {_IMAGE_WHY}")}


@dataclass(frozen=True)
class EmbeddingTolerance:
    min_cosine: float          # every sentence's embedding against the reference's
    source: str = ""


# fp32 must agree to float rounding (ORT vs eager MiniLM: cosine 1 - 1e-7); reduced precision gets the bounds its
# mantissa allows; int8 (dynamic quantisation) sets its own, measured bound in the backend
_EMBEDDING_WHY = "ORT vs eager MiniLM in fp32 measured cosine 1 - 1e-7; reduced precision by its mantissa"
EMBEDDING_TOLERANCES = {dtype: EmbeddingTolerance(bound, f"{dtype} default: {_EMBEDDING_WHY}")
                        for dtype, bound in (("fp32", 0.9999), ("fp16", 0.999), ("bf16", 0.995))}


def default_tolerance(workload: str, dtype: str):
    from harness.selection.workloads import TEXT_EMBEDDING
    return EMBEDDING_TOLERANCES[dtype] if workload == TEXT_EMBEDDING else IMAGE_TOLERANCES[dtype]
CONSTANT_STD = 1e-4  # an image with less spread than this is blank: its timings must never be published


def component_role(name: str) -> str:
    if name.startswith("text_encoder") or name == "encoder":   # an embedding model's encoder is a text encoder
        return "text_encoder"
    if name in ("unet", "transformer"):
        return "denoiser"
    return "vae"


def tolerance_for(component: str, dtype: str, overrides: dict | None = None) -> Tolerance:
    """The component's default for its role and dtype, or an override by role or by component name (the name wins).
    An override is a dict of Tolerance fields; an override that sets atol without relative_to is absolute."""
    tol = COMPONENT_TOLERANCES[dtype][component_role(component)]
    for key in (component_role(component), component):
        if overrides and key in overrides:
            override = dict(overrides[key])
            if "atol" in override:
                override.setdefault("relative_to", None)
            override.setdefault("source", "an override without a stated source")
            tol = replace(tol, **override)
    return tol


def declared(overrides: dict | None, who: str) -> dict:
    """Overrides as declared by `who` (a variant, the run's options): each source says who loosened the bound."""
    return {key: {**value, "source": f"declared by {who}: {value.get('source') or 'no reason given'}"}
            for key, value in (overrides or {}).items()}


def declared_output(tolerance, who: str):
    """An image/embedding tolerance a variant declared, its source naming the variant (never an unexplained pass)."""
    return replace(tolerance, source=f"declared by {who}: {tolerance.source or 'no reason given'}")


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _stat(values: np.ndarray, statistic: str) -> float:
    if statistic in ("elemwise", "max"):
        return float(values.max()) if values.size else 0.0
    if statistic == "mean":
        return float(values.mean())
    if statistic == "median":
        return float(np.median(values))
    return float(np.percentile(values, 99))


def finite_problem(x) -> str | None:
    a = _to_numpy(x)
    n_nan, n_inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
    if n_nan or n_inf:
        return f"{n_nan} NaN and {n_inf} Inf values in {a.size}"
    return None


def tensor_metrics(ref, out) -> dict[str, float]:
    r, o = _to_numpy(ref), _to_numpy(out)
    diff = np.abs(o - r)
    ref_norm = float(np.linalg.norm(r))
    denom = float(np.linalg.norm(r) * np.linalg.norm(o))
    return {"max_abs": float(diff.max()) if diff.size else 0.0, "mean_abs": float(diff.mean()) if diff.size else 0.0,
            "rel_l2": float(np.linalg.norm(o - r) / ref_norm) if ref_norm else float(np.linalg.norm(o - r)),
            "cosine": float((r * o).sum() / denom) if denom else (1.0 if not r.any() and not o.any() else 0.0)}


def reference_scale(ref: np.ndarray, relative_to: str | None) -> tuple[float, dict]:
    """The multiplier of a relative tolerance's atol for this reference output, and the facts behind it."""
    if relative_to is None:
        return 1.0, {}
    ref_max = float(np.abs(ref).max()) if ref.size else 0.0
    if relative_to == "max|ref|":
        return ref_max, {"max_ref": ref_max}
    n = ref.size // ref.shape[0] if ref.ndim >= 2 and ref.shape[0] else ref.size     # elements per batch item
    return ref_max * math.sqrt(n), {"max_ref": ref_max, "n": n}


def check_tensor(ref, out, tol: Tolerance) -> dict:
    """Compare one output tensor; returns metrics, the tolerance that judged it (`tolerance`: its fields with atol as
    applied, and for a relative tolerance `relative_atol` and the reference's `scale`), passed, and on failure the
    smallest passing tolerance (`needed`)."""
    for who, x in (("reference", ref), ("output", out)):
        problem = finite_problem(x)
        if problem:
            return {"passed": False, "error": f"{who} has {problem}", "tolerance": asdict(tol)}
    r, o = _to_numpy(ref), _to_numpy(out)
    if r.shape != o.shape:
        return {"passed": False, "error": f"shape {o.shape} != reference {r.shape}", "tolerance": asdict(tol)}
    scale, facts = reference_scale(r, tol.relative_to)
    atol = tol.atol * scale
    tolerance = asdict(tol)
    if tol.relative_to:
        tolerance.update(atol=atol, relative_atol=tol.atol, scale=scale, **facts)
    absdiff = np.abs(o - r)
    reldiff = absdiff / np.maximum(np.abs(r), np.finfo(np.float32).tiny)
    ref_max = float(np.abs(r).max()) if r.size else 0.0
    result = {**tensor_metrics(r, o), "ref_max_abs": ref_max,
              "rel_max_abs": _ratio(float(absdiff.max(initial=0.0)), ref_max), "tolerance": tolerance}
    if tol.statistic == "elemwise":
        passed = bool(np.all(absdiff <= atol + tol.rtol * np.abs(r)))
        needed_atol = float(np.max(absdiff - tol.rtol * np.abs(r), initial=0.0))
        needed_rtol = float(np.max((absdiff - atol) / np.maximum(np.abs(r), 1e-12), initial=0.0))
    else:
        needed_atol, needed_rtol = _stat(absdiff, tol.statistic), _stat(reldiff, tol.statistic)
        passed = needed_atol <= atol or needed_rtol <= tol.rtol
    result["passed"] = passed
    if not passed:
        result["needed"] = {"atol": needed_atol, "rtol": needed_rtol}
        bound, wanted = f"atol={atol:.3g}", f"atol>={needed_atol:.3g}"
        if tol.relative_to:
            result["needed"]["relative_atol"] = _ratio(needed_atol, scale)
            bound = f"atol={tol.atol:.3g} x {tol.relative_to} {scale:.3g} = {atol:.3g}"
            wanted += f" ({result['needed']['relative_atol']:.3g} x {tol.relative_to})"
        result["error"] = (f"{tol.statistic} error exceeds {bound}/rtol={tol.rtol:.3g} (max abs "
                           f"{result['max_abs']:.3g}); would pass with {wanted} or rtol>={needed_rtol:.3g}")
    return result


def _ratio(value: float, scale: float) -> float:
    """value / scale; inf where the scale is 0 and the value is not (0 / 0 = 0)."""
    return value / scale if scale else (0.0 if value == 0 else math.inf)


def psnr(ref: np.ndarray, out: np.ndarray) -> float:
    from skimage.metrics import peak_signal_noise_ratio
    if np.array_equal(ref, out):
        return math.inf
    return float(peak_signal_noise_ratio(ref, out, data_range=1.0))


def ssim(ref: np.ndarray, out: np.ndarray) -> float:
    """SSIM over HxWxC images in [0,1] (batch averaged), from scikit-image."""
    from skimage.metrics import structural_similarity
    refs, outs = (ref[None], out[None]) if ref.ndim == 3 else (ref, out)
    side = min(refs.shape[1], refs.shape[2])
    win = min(7, side if side % 2 else side - 1)
    return float(np.mean([structural_similarity(r, o, data_range=1.0, channel_axis=-1, win_size=win)
                          for r, o in zip(refs, outs)]))


def check_image(ref, out, tol: ImageTolerance) -> dict:
    """End-to-end image parity: images are float arrays in [0,1], (B,)H,W,C."""
    r, o = _to_numpy(ref), _to_numpy(out)
    for who, x in (("reference", r), ("output", o)):
        problem = finite_problem(x)
        if problem:
            return {"passed": False, "error": f"{who} image has {problem}", "tolerance": asdict(tol)}
        if float(x.std()) < CONSTANT_STD:
            return {"passed": False, "error": f"{who} image is constant (std {float(x.std()):.2g})",
                    "tolerance": asdict(tol)}
    if r.shape != o.shape:
        return {"passed": False, "error": f"image shape {o.shape} != reference {r.shape}", "tolerance": asdict(tol)}
    metrics = tensor_metrics(r, o)
    metrics["psnr"] = psnr(r, o)
    metrics["ssim"] = ssim(r, o)
    passed = metrics["psnr"] >= tol.min_psnr_db and metrics["ssim"] >= tol.min_ssim
    result = {**metrics, "tolerance": asdict(tol), "passed": passed}
    if not passed:
        result["error"] = (f"PSNR {metrics['psnr']:.2f} dB / SSIM {metrics['ssim']:.4f} below "
                           f"{tol.min_psnr_db} dB / {tol.min_ssim}; would pass with min_psnr<={metrics['psnr']:.2f} "
                           f"and min_ssim<={metrics['ssim']:.4f}")
    return result


def check_embeddings(ref, out, tol: EmbeddingTolerance) -> dict:
    """End-to-end embedding parity: (N, D) arrays of the same sentences; each row's cosine with the reference's."""
    r, o = _to_numpy(ref), _to_numpy(out)
    problem = finite_problem(o)
    if problem:
        return {"passed": False, "error": f"embeddings have {problem}", "tolerance": asdict(tol)}
    if r.shape != o.shape:
        return {"passed": False, "error": f"embedding shape {o.shape} != reference {r.shape}",
                "tolerance": asdict(tol)}
    norms = np.linalg.norm(r, axis=1) * np.linalg.norm(o, axis=1)
    cosines = np.sum(r * o, axis=1) / np.maximum(norms, 1e-12)
    worst = int(np.argmin(cosines))
    result = {"min_cosine": float(cosines.min()), "mean_cosine": float(cosines.mean()), "worst_sentence": worst,
              "max_abs": float(np.abs(r - o).max()), "tolerance": asdict(tol),
              "passed": bool(cosines.min() >= tol.min_cosine)}
    if not result["passed"]:
        result["error"] = (f"sentence {worst}: cosine {cosines.min():.6f} below {tol.min_cosine}; would pass with "
                           f"min_cosine<={cosines.min():.6f}")
    return result


# A nearest neighbour is only a ranking when it beats the runner-up clearly. The unrelated sentences of the fixed set
# have none (MiniLM: best cosine 0.09-0.24, ahead of the second by 0.003-0.028), and int8 weights flip such a near
# tie (sentence 30: 0.028 ahead) while every paraphrase keeps its pair; those sentences are counted apart.
RANKING_MIN_MARGIN = 0.05


def nearest_neighbours(embeddings) -> tuple[list[int], list[float]]:
    """For each row, the index of its most similar other row (cosine) and its margin over the runner-up."""
    e = _to_numpy(embeddings)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    similarity = e @ e.T
    np.fill_diagonal(similarity, -np.inf)
    order = np.argsort(-similarity, axis=1)
    rows = np.arange(len(e))
    margins = similarity[rows, order[:, 0]] - similarity[rows, order[:, 1]]
    return [int(i) for i in order[:, 0]], [float(m) for m in margins]


def check_ranking(ref_set, out_set, min_margin: float = RANKING_MIN_MARGIN) -> dict:
    """The search a sentence-embedding service exists for: every sentence of the fixed set whose nearest neighbour
    the reference decides clearly (by min_margin cosine) finds the same one with the backend's embeddings."""
    (want, margins), (got, _) = nearest_neighbours(ref_set), nearest_neighbours(out_set)
    ranked = [i for i, m in enumerate(margins) if m >= min_margin]
    moved = [i for i in ranked if want[i] != got[i]]
    result = {"sentences": len(want), "ranked": len(ranked), "same_nearest": len(ranked) - len(moved),
              "near_ties_moved": sum(want[i] != got[i] for i in range(len(want)) if i not in ranked),
              "min_margin": min_margin, "passed": not moved, "reference_nearest": want}
    if moved:
        i = moved[0]
        result["error"] = (f"{len(moved)} of {len(ranked)} ranked sentences changed nearest neighbour (sentence "
                           f"{i}: {want[i]} -> {got[i]})")
    return result


def flatten_output(output, prefix: str = "") -> dict[str, object]:
    """Tensors of a module output (tensor, tuple, ModelOutput/dict, nested) by path: "0", "hidden_states.3"..."""
    import torch
    if isinstance(output, torch.Tensor):
        return {prefix or "0": output}
    items = []
    if hasattr(output, "items"):
        items = [(str(k), v) for k, v in output.items()]
    elif isinstance(output, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(output)]
    flat = {}
    for key, value in items:
        flat.update(flatten_output(value, f"{prefix}.{key}" if prefix else key))
    return flat
