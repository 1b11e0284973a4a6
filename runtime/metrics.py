"""Image similarity in numpy: PSNR and SSIM of two float images in [0, 1] (H, W, 3).

PSNR is capped at ``PSNR_CAP`` dB so that identical images give a finite number a JSON manifest can
hold; anything at the cap means "identical to float precision". SSIM is Wang et al. (2004) on luma
with an 11-tap Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, data range 1.
"""

from __future__ import annotations

import math

import numpy as np

PSNR_CAP = 100.0


def psnr(reference: np.ndarray, image: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1]."""
    ref, img = np.asarray(reference, np.float64), np.asarray(image, np.float64)
    if ref.shape != img.shape:
        raise ValueError(f"shapes differ: {ref.shape} vs {img.shape}")
    mse = float(np.mean((ref - img) ** 2))
    if mse <= 10 ** (-PSNR_CAP / 10):
        return PSNR_CAP
    return min(PSNR_CAP, 10.0 * math.log10(1.0 / mse))


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
    """Structural similarity (mean over the image) of two images in [0, 1]."""
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
