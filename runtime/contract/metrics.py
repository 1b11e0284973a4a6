"""One way to compare an output with its reference, for tensors and for images.

``compare`` (tensors) gives max-abs and mean-abs difference, cosine similarity, SQNR (signal is the
reference's energy) and PSNR (peak is the reference's largest magnitude: the measure Apple's
ml-stable-diffusion gates Core ML conversions on). ``compare_images`` gives PSNR with a peak of 1
(images in [0, 1]), SSIM and max-abs.

One meaning of "identical": JSON has no infinity, so every dB metric is capped at ``EXACT_DB``, and
only a bit-identical pair reaches it (``identical``). Anything else reports its real number, however
high (an fp32 export that differs at the 1e-7 level measures ~130 dB, not the cap).

SSIM is Wang et al. (2004) on luma with an 11-tap Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03,
data range 1.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

EXACT_DB = 300.0
TENSOR_METRICS = ("max_abs", "mean_abs", "cosine", "sqnr_db", "psnr_db")
# For aggregating several cases: the worst value of each metric.
WORST = {"max_abs": max, "mean_abs": max, "cosine": min, "sqnr_db": min, "psnr_db": min, "ssim": min}


def _db(signal: float, noise: float) -> float:
    if noise <= 0.0:
        return EXACT_DB
    if signal <= 0.0:
        return -EXACT_DB
    return min(EXACT_DB, 10.0 * math.log10(signal / noise))


def compare(reference: Any, candidate: Any) -> dict[str, float]:
    """Max/mean abs diff, cosine, SQNR and PSNR (dB) of ``candidate`` against ``reference``.

    Arrays (numpy, or anything ``np.asarray`` takes: torch tensors on the CPU) of the same size; a
    non-finite candidate gives NaN for every metric (which fails every gate).
    """
    r = np.asarray(reference, dtype=np.float64).ravel()
    o = np.asarray(candidate, dtype=np.float64).ravel()
    if r.shape != o.shape:
        raise ValueError(
            f"shape mismatch: reference {np.shape(reference)} vs candidate {np.shape(candidate)}"
        )
    if not np.all(np.isfinite(o)):
        return dict.fromkeys(TENSOR_METRICS, float("nan"))
    if r.size == 0:
        return {"max_abs": 0.0, "mean_abs": 0.0, "cosine": 1.0, "sqnr_db": EXACT_DB, "psnr_db": EXACT_DB}
    diff = r - o
    err = float(np.dot(diff, diff))
    sig = float(np.dot(r, r))
    norm = math.sqrt(sig * float(np.dot(o, o)))
    cos = float(np.dot(r, o) / norm) if norm > 0 else (1.0 if err == 0 else 0.0)
    peak = float(np.max(np.abs(r)))
    return {
        "max_abs": float(np.max(np.abs(diff))),
        "mean_abs": float(np.mean(np.abs(diff))),
        "cosine": cos,
        "sqnr_db": _db(sig, err),
        "psnr_db": _db(peak * peak, err / r.size),
    }


def identical(metrics: dict[str, float]) -> bool:
    """Whether a comparison found the two bit-identical."""
    return metrics.get("max_abs") == 0.0


def psnr(reference: np.ndarray, image: np.ndarray, peak: float = 1.0) -> float:
    """PSNR in dB of two images in [0, 1] (or with another ``peak``); ``EXACT_DB`` when identical."""
    ref, img = np.asarray(reference, np.float64), np.asarray(image, np.float64)
    if ref.shape != img.shape:
        raise ValueError(f"shapes differ: {ref.shape} vs {img.shape}")
    return _db(peak * peak, float(np.mean((ref - img) ** 2)))


def _gaussian(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _blur(img: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Separable 'valid' convolution of a 2-D array with the 1-D kernel ``k``."""
    n = len(k)
    rows = sum(k[i] * img[i : img.shape[0] - n + 1 + i, :] for i in range(n))
    return sum(k[i] * rows[:, i : rows.shape[1] - n + 1 + i] for i in range(n))


def _luma(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img, np.float64)
    if img.ndim == 2:
        return img
    return img[..., 0] * 0.299 + img[..., 1] * 0.587 + img[..., 2] * 0.114


def ssim(reference: np.ndarray, image: np.ndarray) -> float:
    """Structural similarity (mean over the image) of two images in [0, 1], (H, W[, 3])."""
    a, b = _luma(reference), _luma(image)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    size = min(11, a.shape[0], a.shape[1])
    size -= 1 - size % 2  # odd
    k = _gaussian(size, 1.5 * size / 11)
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = _blur(a, k), _blur(b, k)
    saa = _blur(a * a, k) - mu_a**2
    sbb = _blur(b * b, k) - mu_b**2
    sab = _blur(a * b, k) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * sab + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2)
    return float(np.mean(num / den))


def compare_images(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """PSNR (dB, peak 1), SSIM and max-abs of two images in [0, 1], (H, W, 3)."""
    a, b = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    return {
        "psnr_db": round(psnr(a, b), 3),
        "ssim": round(ssim(a, b), 5),
        "max_abs": round(float(np.abs(a - b).max()), 6),
    }


def rounded(value: float) -> float | None:
    """A metric for a JSON manifest: 6 significant digits; NaN (a failed, non-finite output) as null."""
    if math.isnan(value):
        return None
    return value if value == 0 else float(f"{value:.6g}")


def worst(cases: list[dict[str, Any]]) -> dict[str, float | None]:
    """The worst value of each known metric over several comparisons (None wins: a failed output)."""
    vals: dict[str, list[Any]] = {}
    for m in cases:
        for k in WORST:
            if k in m:
                vals.setdefault(k, []).append(m[k])
    return {k: None if None in v else WORST[k](v) for k, v in vals.items()}
