"""Parity metrics and tolerance specs.

Metrics: max abs, mean abs, relative L2, cosine, PSNR and SSIM (scikit-image). Guards: NaN/Inf and constant
images fail before any metric. Tolerances follow Polygraphy: atol/rtol plus a statistic; "elemwise" passes when
every element satisfies |out-ref| <= atol + rtol*|ref|, other statistics (max, mean, median, p99) pass when the
statistic of the absolute error is <= atol OR that of the relative error is <= rtol. A failure states the smallest
tolerance that would have passed.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

STATISTICS = ("elemwise", "max", "mean", "median", "p99")


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    statistic: str = "elemwise"

    def __post_init__(self):
        if self.statistic not in STATISTICS:
            raise ValueError(f"unknown statistic {self.statistic!r}; choose from {', '.join(STATISTICS)}")


@dataclass(frozen=True)
class ImageTolerance:
    min_psnr_db: float
    min_ssim: float


# Component defaults per dtype. Reduced precision accumulates differently per kernel, so it gets looser bounds
# and a robust statistic; fp32 must agree nearly bit for bit (ORT vs eager is ~1e-6 here).
COMPONENT_TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "fp32": {"text_encoder": Tolerance(1e-4, 1e-3, "max"), "denoiser": Tolerance(1e-4, 1e-3, "max"),
             "vae": Tolerance(1e-4, 1e-3, "max")},
    "fp16": {"text_encoder": Tolerance(1e-2, 1e-2, "p99"), "denoiser": Tolerance(1e-2, 1e-2, "p99"),
             "vae": Tolerance(2e-2, 2e-2, "p99")},
    "bf16": {"text_encoder": Tolerance(5e-2, 5e-2, "p99"), "denoiser": Tolerance(5e-2, 5e-2, "p99"),
             "vae": Tolerance(5e-2, 5e-2, "p99")},
}
IMAGE_TOLERANCES = {"fp32": ImageTolerance(40.0, 0.98), "fp16": ImageTolerance(30.0, 0.90),
                    "bf16": ImageTolerance(25.0, 0.85)}


@dataclass(frozen=True)
class EmbeddingTolerance:
    min_cosine: float          # every sentence's embedding against the reference's


# fp32 must agree to float rounding (ORT vs eager MiniLM: cosine 1 - 1e-7); reduced precision gets the bounds its
# mantissa allows; int8 (dynamic quantisation) sets its own, measured bound in the backend
EMBEDDING_TOLERANCES = {"fp32": EmbeddingTolerance(0.9999), "fp16": EmbeddingTolerance(0.999),
                        "bf16": EmbeddingTolerance(0.995)}


def default_tolerance(workload: str, dtype: str):
    from harness.workloads import TEXT_EMBEDDING
    return EMBEDDING_TOLERANCES[dtype] if workload == TEXT_EMBEDDING else IMAGE_TOLERANCES[dtype]
CONSTANT_STD = 1e-4  # an image with less spread than this is blank: its timings must never be published


def component_role(name: str) -> str:
    if name.startswith("text_encoder") or name == "encoder":   # an embedding model's encoder is a text encoder
        return "text_encoder"
    if name in ("unet", "transformer"):
        return "denoiser"
    return "vae"


def tolerance_for(component: str, dtype: str, overrides: dict | None = None) -> Tolerance:
    tol = COMPONENT_TOLERANCES[dtype][component_role(component)]
    for key in (component_role(component), component):
        if overrides and key in overrides:
            tol = replace(tol, **overrides[key])
    return tol


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


def check_tensor(ref, out, tol: Tolerance) -> dict:
    """Compare one output tensor; returns metrics, tolerance, passed, and on failure the smallest passing tol."""
    for who, x in (("reference", ref), ("output", out)):
        problem = finite_problem(x)
        if problem:
            return {"passed": False, "error": f"{who} has {problem}", "tolerance": asdict(tol)}
    r, o = _to_numpy(ref), _to_numpy(out)
    if r.shape != o.shape:
        return {"passed": False, "error": f"shape {o.shape} != reference {r.shape}", "tolerance": asdict(tol)}
    absdiff = np.abs(o - r)
    reldiff = absdiff / np.maximum(np.abs(r), np.finfo(np.float32).tiny)
    result = {**tensor_metrics(r, o), "tolerance": asdict(tol)}
    if tol.statistic == "elemwise":
        passed = bool(np.all(absdiff <= tol.atol + tol.rtol * np.abs(r)))
        needed_atol = float(np.max(absdiff - tol.rtol * np.abs(r), initial=0.0))
        needed_rtol = float(np.max((absdiff - tol.atol) / np.maximum(np.abs(r), 1e-12), initial=0.0))
    else:
        needed_atol, needed_rtol = _stat(absdiff, tol.statistic), _stat(reldiff, tol.statistic)
        passed = needed_atol <= tol.atol or needed_rtol <= tol.rtol
    result["passed"] = passed
    if not passed:
        result["needed"] = {"atol": needed_atol, "rtol": needed_rtol}
        result["error"] = (f"{tol.statistic} error exceeds atol={tol.atol:g}/rtol={tol.rtol:g} "
                           f"(max abs {result['max_abs']:.3g}); would pass with atol>={needed_atol:.3g} "
                           f"or rtol>={needed_rtol:.3g}")
    return result


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
