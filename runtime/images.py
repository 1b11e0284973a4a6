"""Image pre- and post-processing with PIL and numpy (OpenCV only for Canny edges).

Every input image is fitted to the target size the same way: scaled to cover it, then center-cropped,
so nothing is stretched. Conditioning images are float32 NCHW; what the VAE takes is in [-1, 1], what a
ControlNet takes in [0, 1] (the contract's ``controlnet_cond``).

- ``scribble_condition``: what the scribble ControlNet was trained on: white strokes on black, binary.
  A drawing with black strokes on white paper (mostly light) is inverted first.
- ``canny_condition``: OpenCV Canny edges (white on black) with the two hysteresis thresholds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sdkiln.runtime.contract.errors import UserError

ImageLike = str | Path | Image.Image | np.ndarray


def open_image(src: ImageLike, what: str = "image") -> Image.Image:
    """An RGB PIL image from a path, a PIL image or an HxWx3 uint8 array; a UserError for anything else
    (missing file, a folder, unreadable or not an image)."""
    if isinstance(src, Image.Image):
        img = src
    elif isinstance(src, np.ndarray):
        if src.dtype != np.uint8 or src.ndim not in (2, 3):
            raise UserError(f"{what}: arrays must be HxW or HxWxC uint8 (got {src.dtype} {src.shape})")
        img = Image.fromarray(src)
    else:
        path = Path(src)
        if not path.exists():
            raise UserError(f"{what}: {path}: no such file")
        if not path.is_file():
            raise UserError(f"{what}: {path}: not a file")
        try:
            with Image.open(path) as opened:
                opened.load()
                img = opened.copy()
        except UnidentifiedImageError as e:
            raise UserError(f"{what}: {path}: not an image file PIL can read") from e
        except OSError as e:  # permissions, truncated files
            raise UserError(f"{what}: {path}: cannot read ({e.strerror or e})") from e
        # Camera photos carry their orientation in EXIF; apply it so "up" is up.
        img = ImageOps.exif_transpose(img)
    if img.width < 1 or img.height < 1:
        raise UserError(f"{what}: empty image")
    if img.mode in ("RGBA", "LA", "P"):
        # Transparent areas become white (paper) rather than black.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def fit(
    img: Image.Image, width: int, height: int, resample: Image.Resampling = Image.Resampling.LANCZOS
) -> Image.Image:
    """Scale to cover ``width`` x ``height`` keeping the aspect ratio, then crop the center."""
    scale = max(width / img.width, height / img.height)
    w, h = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    img = img.resize((w, h), resample)
    left, top = (w - width) // 2, (h - height) // 2
    return img.crop((left, top, left + width, top + height))


def to_vae_input(src: ImageLike, width: int, height: int) -> np.ndarray:
    """float32 (1, 3, height, width) in [-1, 1] for the VAE encoder."""
    arr = np.asarray(fit(open_image(src), width, height), dtype=np.float32) / 255.0
    return (arr.transpose(2, 0, 1)[None] * 2.0 - 1.0).astype(np.float32)


def scribble_condition(
    src: ImageLike, width: int, height: int, threshold: int = 128, invert: bool | None = None
) -> np.ndarray:
    """float32 (1, 3, height, width) in {0, 1}: white strokes on black, as the scribble ControlNet expects.

    ``invert=None`` decides from the drawing: a mostly light image (dark strokes on paper) is inverted.
    Thresholding after resizing keeps the strokes crisp and binary at the target size.
    """
    if not 0 < threshold < 256:
        raise UserError(f"scribble threshold must be in 1..255 (got {threshold})")
    gray = np.asarray(fit(open_image(src, "sketch"), width, height).convert("L"), dtype=np.float32)
    if invert is None:
        invert = float(gray.mean()) > 127.5
    if invert:
        gray = 255.0 - gray
    mask = (gray >= threshold).astype(np.float32)
    return np.repeat(mask[None, None], 3, axis=1)


def canny_condition(src: ImageLike, width: int, height: int, low: int = 100, high: int = 200) -> np.ndarray:
    """float32 (1, 3, height, width) in {0, 1}: OpenCV Canny edges of the fitted image."""
    if not 0 <= low < high <= 1000:
        raise UserError(f"canny thresholds must satisfy 0 <= low < high (got low={low}, high={high})")
    try:
        import cv2
    except ImportError as e:
        raise UserError(
            "canny edges need OpenCV: pip install 'sdkiln[runtime]' (opencv-python-headless)"
        ) from e
    rgb = np.asarray(fit(open_image(src), width, height))
    edges = cv2.Canny(rgb, low, high)
    return np.repeat((edges.astype(np.float32) / 255.0)[None, None], 3, axis=1)


def to_pixels(decoded: np.ndarray) -> np.ndarray:
    """VAE output (B, 3, H, W) in [-1, 1] to float32 (B, H, W, 3) in [0, 1]."""
    return np.clip(decoded.astype(np.float32) / 2.0 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)


def to_pil(pixels: np.ndarray) -> list[Image.Image]:
    """float (B, H, W, 3) in [0, 1] to PIL images, rounded as diffusers rounds them."""
    return [Image.fromarray(im) for im in (pixels * 255.0).round().astype(np.uint8)]


def condition_preview(cond: np.ndarray) -> Image.Image:
    """A conditioning tensor (1, 3, H, W) in [0, 1] as an image (what the ControlNet sees)."""
    return to_pil(cond.transpose(0, 2, 3, 1))[0]
