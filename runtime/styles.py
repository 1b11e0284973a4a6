"""Style presets: named prompt templates (and negative prompts), kept as data in ``data/styles.json``.

    prompt, negative = apply_style("a red sports car", "product render")

A template has one ``{prompt}`` slot; the negative prompt is used only where classifier-free guidance
runs (a family without CFG ignores it).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from sdkiln.runtime.contract.errors import UserError

STYLES_PATH = Path(__file__).parent / "data" / "styles.json"


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str  # a template with exactly one "{prompt}"
    negative: str = ""


@functools.cache
def styles() -> dict[str, Style]:
    """Every preset by name, from ``data/styles.json`` (checked: one ``{prompt}`` slot each)."""
    raw = json.loads(STYLES_PATH.read_text(encoding="utf-8"))
    out: dict[str, Style] = {}
    for name, entry in raw.items():
        template = entry["prompt"]
        if template.count("{prompt}") != 1:
            raise ValueError(f"{STYLES_PATH}: style {name!r} must contain '{{prompt}}' exactly once")
        out[name] = Style(name=name, prompt=template, negative=entry.get("negative", ""))
    return out


def apply_style(prompt: str, style: str | None, negative: str | None = None) -> tuple[str, str | None]:
    """``(prompt, negative)`` with the preset applied; an unknown preset is a UserError listing the known ones.

    A negative prompt given by the caller wins over the preset's.
    """
    if style is None:
        return prompt, negative
    preset = styles().get(style)
    if preset is None:
        known = ", ".join(repr(s) for s in sorted(styles()))
        raise UserError(f"unknown style preset {style!r}; known presets: {known}")
    return preset.prompt.replace("{prompt}", prompt), negative if negative is not None else (
        preset.negative or None
    )
