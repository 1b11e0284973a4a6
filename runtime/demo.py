"""``make demo``'s last step: render the example sketches with a bundle on every backend it has, and
write a contact sheet (sketch | PyTorch reference | ONNX | INT8, PSNR under each) and a Markdown report.

    report = render_demo(Path("artifacts/tiny"), Path("artifacts/demo"))
    # artifacts/demo/contact_sheet.png, artifacts/demo/report.md, artifacts/demo/<sketch>-<column>.png
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.floors import e2e_floor
from sdkiln.runtime.contract.layout import PREFERRED_SECTIONS
from sdkiln.runtime.contract.metrics import compare_images
from sdkiln.runtime.examples import SKETCHES
from sdkiln.runtime.load import load, read_bundle_manifest, resolve_source
from sdkiln.runtime.pipeline import Pipeline
from sdkiln.runtime.tasks import sketch_request

logger = logging.getLogger(__name__)

PROMPTS = {
    "house": "a cozy cottage with a red door, watercolor",
    "car": "a red sports car, studio light",
    "cat": "a ginger cat portrait, soft light",
}
TILE = 192
CAPTION = 34


@dataclass
class Column:
    title: str
    pipe: Pipeline
    precision: str
    images: dict[str, Image.Image] = field(default_factory=dict)
    pixels: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    components: dict[str, str] = field(default_factory=dict)  # component -> precision

    @property
    def slug(self) -> str:
        """The title as a file name part: ``onnx/int8 (mixed)`` -> ``onnx-int8``."""
        return self.title.split(" (")[0].lower().replace("/", "-").replace(" ", "_")


def _columns(bundle: Path) -> list[Column]:
    """The PyTorch reference, then every ONNX section (fp32 first), titled by what their files hold."""
    manifest = read_bundle_manifest(resolve_source(str(bundle)))
    sections = manifest.sections
    ref = PREFERRED_SECTIONS["torch"] if PREFERRED_SECTIONS["torch"] in sections else None
    cols = [Column("PyTorch reference", load(bundle, backend="torch", section=ref), "fp32")]
    onnx = sorted(n for n, s in sections.items() if s.kind == "onnx")
    if not onnx:
        raise UserError(f"{bundle}: no ONNX section to demo (sections: {', '.join(sorted(sections))})")
    first = PREFERRED_SECTIONS["onnx"]
    for name in sorted(onnx, key=lambda n: (n != first, n)):
        sec = sections[name]
        col = Column(f"{name} ({sec.precision})", load(bundle, backend="onnx", section=name), sec.precision)
        col.components = sec.component_precisions()
        cols.append(col)
    return cols


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _sheet(names: list[str], cols: list[Column], sketches: dict[str, Image.Image]) -> Image.Image:
    header = 28
    width = TILE * (len(cols) + 1)
    sheet = Image.new("RGB", (width, header + len(names) * (TILE + CAPTION)), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    font, small = _font(15), _font(13)
    for c, title in enumerate(["sketch", *(col.title for col in cols)]):
        d.text((c * TILE + 8, 6), title, fill=(0, 0, 0), font=font)
    for r, name in enumerate(names):
        y = header + r * (TILE + CAPTION)
        sheet.paste(sketches[name].convert("RGB").resize((TILE, TILE)), (0, y))
        d.text((8, y + TILE + 4), name, fill=(0, 0, 0), font=small)
        for c, col in enumerate(cols, start=1):
            sheet.paste(col.images[name].resize((TILE, TILE), Image.Resampling.NEAREST), (c * TILE, y))
            m = col.metrics[name]
            text = "reference" if c == 1 else f"PSNR {m['psnr_db']:.1f} dB  SSIM {m['ssim']:.3f}"
            d.text((c * TILE + 8, y + TILE + 4), text, fill=(0, 0, 0), font=small)
            d.text((c * TILE + 8, y + TILE + 18), f"{col.seconds[name]:.2f} s", fill=(90, 90, 90), font=small)
    return sheet


def render_demo(
    bundle: Path,
    out: Path,
    *,
    steps: int | None = None,
    size: int | None = None,
    seed: int = 42,
    sketches: list[str] | None = None,
) -> Path:
    """Render every example sketch with the bundle's PyTorch reference and ONNX sections (fp32, INT8 when
    present); write ``contact_sheet.png``, one PNG per image and ``report.md`` into ``out``.

    Returns the report's path. ``steps``/``size`` default to the bundle's family defaults; ``sketches``
    picks some of the examples (default: all).
    """
    names = list(sketches or SKETCHES)
    unknown = sorted(set(names) - set(SKETCHES))
    if unknown:
        raise UserError(f"unknown example sketch(es) {', '.join(unknown)}; examples: {', '.join(SKETCHES)}")
    cols = _columns(bundle)
    out.mkdir(parents=True, exist_ok=True)
    drawings = {n: SKETCHES[n]() for n in names}
    for name in names:
        for col in cols:
            t0 = time.perf_counter()
            req = sketch_request(
                col.pipe, drawings[name], PROMPTS[name], steps=steps, seed=seed, height=size, width=size
            )
            result = col.pipe.generate(req)
            col.seconds[name] = time.perf_counter() - t0
            col.images[name] = result.images[0]
            col.pixels[name] = result.pixels[0]
            col.metrics[name] = compare_images(cols[0].pixels[name], result.pixels[0])
            result.images[0].save(out / f"{name}-{col.slug}.png")
            logger.info("%s on %s: %.2f s", name, col.title, col.seconds[name])
    sheet_path = out / "contact_sheet.png"
    _sheet(names, cols, drawings).save(sheet_path)
    report = out / "report.md"
    report.write_text(_report(bundle, cols, names, sheet_path, steps, seed))
    return report


def _report(
    bundle: Path, cols: list[Column], names: list[str], sheet: Path, steps: int | None, seed: int
) -> str:
    ref = cols[0].pipe
    lines = [
        f"# sdkiln demo: `{bundle}`",
        "",
        f"Family `{ref.info.family}`{' (LCM)' if ref.info.lcm else ''}, "
        f"{steps or ref.default_steps} steps, guidance {ref.default_guidance:g}, seed {seed}. "
        "Every backend starts from the same initial latents; PSNR/SSIM are against the PyTorch reference "
        "(float images in [0, 1]).",
        "",
        f"![contact sheet]({sheet.name})",
        "",
        "| sketch | prompt | " + " | ".join(c.title for c in cols[1:]) + " |",
        "|---|---|" + "---|" * (len(cols) - 1),
    ]
    for n in names:
        cells = [f"{c.metrics[n]['psnr_db']:.1f} dB / {c.metrics[n]['ssim']:.4f}" for c in cols[1:]]
        lines.append(f"| {n} | {PROMPTS[n]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| column | backend | precision | PSNR floor | mean time per image |",
        "|---|---|---|---|---|",
    ]
    for c in cols:
        mean = sum(c.seconds.values()) / len(c.seconds)
        floor = "reference" if c is cols[0] else f"{e2e_floor(c.precision):.0f} dB"
        lines.append(f"| {c.title} | {c.pipe.backend.description} | {c.precision} | {floor} | {mean:.2f} s |")
    lines += ["", "Precision of each component, read from the files of its section:", ""]
    comps = sorted({k for c in cols[1:] for k in c.components})
    lines += [
        "| component | " + " | ".join(c.title for c in cols[1:]) + " |",
        "|---|" + "---|" * (len(cols) - 1),
    ]
    for k in comps:
        lines.append(f"| {k} | " + " | ".join(c.components.get(k, "—") for c in cols[1:]) + " |")
    return "\n".join(lines) + "\n"
