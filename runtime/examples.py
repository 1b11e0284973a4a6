"""The bundled example inputs, drawn with PIL: line drawings for ``sketch`` and a small scene for ``edit``.

The PNGs in ``data/examples/`` are exactly what these functions draw (a test checks it); regenerate
them with ``python -m sdkiln.runtime.examples``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

EXAMPLES_DIR = Path(__file__).parent / "data" / "examples"
SIZE = 256
INK, PAPER, W = (0, 0, 0), (255, 255, 255), 6


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (SIZE, SIZE), PAPER)
    return img, ImageDraw.Draw(img)


def house() -> Image.Image:
    img, d = _canvas()
    d.rectangle((56, 120, 200, 220), outline=INK, width=W)  # walls
    d.line((44, 126, 128, 50, 212, 126), fill=INK, width=W, joint="curve")  # roof
    d.rectangle((112, 160, 144, 220), outline=INK, width=W)  # door
    d.rectangle((72, 140, 100, 166), outline=INK, width=W)  # window
    d.rectangle((160, 140, 188, 166), outline=INK, width=W)
    d.line((20, 222, 236, 222), fill=INK, width=W)  # ground
    return img


def car() -> Image.Image:
    img, d = _canvas()
    d.line(
        (30, 170, 30, 140, 70, 130, 100, 96, 170, 96, 196, 130, 226, 136, 226, 170),
        fill=INK,
        width=W,
        joint="curve",
    )  # body and cabin
    d.line((30, 170, 60, 170), fill=INK, width=W)
    d.line((104, 170, 166, 170), fill=INK, width=W)
    d.line((210, 170, 226, 170), fill=INK, width=W)
    d.ellipse((60, 148, 104, 192), outline=INK, width=W)  # wheels
    d.ellipse((166, 148, 210, 192), outline=INK, width=W)
    d.line((136, 100, 136, 130), fill=INK, width=W)  # door pillar
    d.line((76, 130, 190, 130), fill=INK, width=W)
    return img


def cat() -> Image.Image:
    img, d = _canvas()
    d.ellipse((48, 64, 208, 216), outline=INK, width=W)  # head
    d.line((62, 104, 70, 30, 112, 70), fill=INK, width=W, joint="curve")  # ears
    d.line((144, 70, 186, 30, 194, 104), fill=INK, width=W, joint="curve")
    d.ellipse((88, 120, 108, 140), fill=INK)  # eyes
    d.ellipse((148, 120, 168, 140), fill=INK)
    d.polygon((120, 160, 136, 160, 128, 170), fill=INK)  # nose
    d.arc((104, 160, 128, 186), 20, 160, fill=INK, width=4)  # mouth
    d.arc((128, 160, 152, 186), 20, 160, fill=INK, width=4)
    for dy in (-8, 4):  # whiskers
        d.line((40, 168 + dy, 96, 172), fill=INK, width=3)
        d.line((160, 172, 216, 168 + dy), fill=INK, width=3)
    return img


def scene() -> Image.Image:
    """A small 'photo' for edit: sky, sun, hills and a tree, in flat colours with clear edges."""
    img = Image.new("RGB", (SIZE, SIZE), (135, 190, 235))
    d = ImageDraw.Draw(img)
    d.ellipse((176, 24, 224, 72), fill=(250, 210, 60))
    d.polygon((0, 170, 70, 120, 150, 165, 256, 110, 256, 256, 0, 256), fill=(70, 150, 70))
    d.rectangle((60, 150, 76, 210), fill=(110, 70, 40))
    d.ellipse((36, 100, 100, 164), fill=(40, 110, 50))
    return img


SKETCHES: dict[str, Callable[[], Image.Image]] = {"house": house, "car": car, "cat": cat}
PHOTOS: dict[str, Callable[[], Image.Image]] = {"scene": scene}


def example_path(name: str) -> Path:
    return EXAMPLES_DIR / f"{name}.png"


def write_examples(folder: Path = EXAMPLES_DIR) -> list[Path]:
    """Draw every example into ``folder``; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in {**SKETCHES, **PHOTOS}.items():
        path = folder / f"{name}.png"
        draw().save(path, optimize=False)
        paths.append(path)
    return paths


if __name__ == "__main__":  # pragma: no cover
    for p in write_examples():
        print(p)
