"""Pre/post-processing, metrics and the bundled examples (no models needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdkiln.runtime import examples
from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.metrics import EXACT_DB, psnr, ssim
from sdkiln.runtime.images import (
    canny_condition,
    fit,
    open_image,
    scribble_condition,
    to_pil,
    to_pixels,
    to_vae_input,
)


def test_scribble_is_white_strokes_on_black_binary_and_fitted() -> None:
    drawing = examples.car()  # black strokes on white, 256x256
    cond = scribble_condition(drawing, 96, 64)
    assert cond.shape == (1, 3, 64, 96) and cond.dtype == np.float32
    assert set(np.unique(cond)) == {0.0, 1.0}
    assert cond.mean() < 0.3  # mostly black background: the strokes were inverted to white
    # Already white-on-black input is kept as is (auto), and can be forced either way.
    inverted = Image.fromarray(255 - np.asarray(drawing))
    np.testing.assert_array_equal(scribble_condition(inverted, 96, 64), cond)
    np.testing.assert_array_equal(scribble_condition(drawing, 96, 64, invert=False), 1.0 - cond)


def test_fit_scales_to_cover_and_center_crops() -> None:
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 50, 100))  # a blue band on the left quarter: cropped away
    out = fit(img, 64, 64)
    assert out.size == (64, 64)
    assert np.asarray(out)[..., 2].max() < 30 and np.asarray(out)[..., 0].min() > 200


def test_canny_edges_and_vae_input_ranges() -> None:
    edges = canny_condition(examples.scene(), 64, 64, low=50, high=150)
    assert edges.shape == (1, 3, 64, 64) and set(np.unique(edges)) <= {0.0, 1.0} and edges.any()
    assert not canny_condition(Image.new("RGB", (64, 64), (9, 9, 9)), 64, 64).any()  # flat: no edges
    with pytest.raises(UserError, match="canny thresholds must satisfy 0 <= low < high"):
        canny_condition(examples.scene(), 64, 64, low=200, high=100)
    x = to_vae_input(examples.scene(), 64, 32)
    assert x.shape == (1, 3, 32, 64) and x.min() >= -1.0 and x.max() <= 1.0


def test_postprocess_round_trips_like_diffusers() -> None:
    decoded = np.linspace(-1.2, 1.2, 2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    px = to_pixels(decoded)
    assert px.shape == (2, 4, 4, 3) and px.min() == 0.0 and px.max() == 1.0
    imgs = to_pil(px)
    assert len(imgs) == 2 and imgs[0].size == (4, 4)
    np.testing.assert_array_equal(np.asarray(imgs[1]), (px[1] * 255).round().astype(np.uint8))


def test_open_image_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        open_image(tmp_path / "nope.png")
    with pytest.raises(UserError, match="not a file"):
        open_image(tmp_path)
    (tmp_path / "x.png").write_text("hello")
    with pytest.raises(UserError, match="not an image file"):
        open_image(tmp_path / "x.png")
    with pytest.raises(UserError, match="uint8"):
        open_image(np.zeros((4, 4, 3), np.float32))
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert open_image(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent is paper


def test_metrics() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((32, 32, 3))
    assert psnr(a, a) == EXACT_DB and ssim(a, a) == pytest.approx(1.0)
    noisy = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    assert 15 < psnr(a, noisy) < 25
    assert ssim(a, noisy) < ssim(a, np.clip(a + rng.normal(0, 0.01, a.shape), 0, 1)) < 1.0
    assert psnr(np.zeros((4, 4)), np.full((4, 4), 0.1)) == pytest.approx(20.0)


def test_bundled_examples_are_what_the_code_draws(tmp_path: Path) -> None:
    for path in examples.write_examples(tmp_path):
        shipped = examples.example_path(path.stem)
        assert shipped.is_file(), f"{shipped} is missing; run python -m sdkiln.runtime.examples"
        np.testing.assert_array_equal(np.asarray(Image.open(shipped)), np.asarray(Image.open(path)))
