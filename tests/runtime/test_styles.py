"""Style presets are data: every shipped preset is valid and applies as documented."""

from __future__ import annotations

import pytest

from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.styles import apply_style, styles


def test_every_preset_has_one_prompt_slot() -> None:
    presets = styles()
    assert {"cyberpunk", "product render"} <= set(presets)
    for style in presets.values():
        assert style.prompt.count("{prompt}") == 1


def test_apply_style() -> None:
    prompt, negative = apply_style("a red car", "product render")
    assert prompt.startswith("a red car, product render") and negative
    assert apply_style("a red car", "cyberpunk", "blurry")[1] == "blurry"  # the caller's negative wins
    assert apply_style("a red car", None) == ("a red car", None)
    with pytest.raises(UserError, match="unknown style preset 'nope'"):
        apply_style("x", "nope")
