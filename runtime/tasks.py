"""The three tasks as ``Request`` builders: what each one feeds the one denoising loop.

- ``sketch``: txt2img guided by the scribble ControlNet (the drawing becomes white strokes on black).
- ``text``: plain txt2img, a batch of prompts; family defaults for steps and guidance (LCM 4 steps,
  SD-Turbo 1 step and no classifier-free guidance).
- ``edit``: img2img at ``strength`` (SDEdit), optionally keeping the photo's structure with the canny
  ControlNet (OpenCV Canny, thresholds as parameters), as in fast LCM + ControlNet editing.

Style presets (``style="cyberpunk"``) rewrite the prompt before anything runs.
"""

from __future__ import annotations

from typing import Any, Protocol

from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.images import canny_condition, scribble_condition, to_vae_input
from sdkiln.runtime.styles import apply_style
from sdkiln.runtime.types import Control, Request


class Sized(Protocol):
    """What a request builder needs of a pipeline: the image size it generates."""

    def size(self, height: int | None, width: int | None) -> tuple[int, int]: ...


TASKS = ("sketch", "text", "edit")
CONTROLS = ("canny",)


def _prompts(prompt: str | list[str], negative: str | list[str] | None, style: str | None):
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or any(not isinstance(p, str) for p in prompts):
        raise UserError("prompt must be a string or a non-empty list of strings")
    negatives = [negative] * len(prompts) if isinstance(negative, str) or negative is None else list(negative)
    styled = [apply_style(p, style, n) for p, n in zip(prompts, negatives, strict=True)]
    out_neg = [n for _, n in styled]
    return [p for p, _ in styled], (None if all(n is None for n in out_neg) else [n or "" for n in out_neg])


def _control_end(pipe: Any, control_end: float | None) -> float:
    return float(getattr(pipe, "default_control_end", 1.0)) if control_end is None else control_end


def text_request(
    pipe: Sized,
    prompt: str | list[str],
    *,
    negative_prompt: str | list[str] | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    style: str | None = None,
) -> Request:
    """txt2img for one prompt or a batch."""
    prompts, negatives = _prompts(prompt, negative_prompt, style)
    h, w = pipe.size(height, width)
    return Request(prompts, negatives, steps, guidance, seed, h, w)


def sketch_request(
    pipe: Sized,
    sketch: Any,
    prompt: str,
    *,
    negative_prompt: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    style: str | None = None,
    conditioning_scale: float = 1.0,
    control_start: float = 0.0,
    control_end: float | None = None,
    threshold: int = 128,
    invert: bool | None = None,
) -> Request:
    """ControlNet-scribble txt2img from a drawing (path, PIL image or uint8 array). ``control_end``
    defaults to the pipeline's (1.0; a fast configuration chosen by ``backend="auto"`` may stop the
    ControlNet earlier)."""
    prompts, negatives = _prompts(prompt, negative_prompt, style)
    h, w = pipe.size(height, width)
    cond = scribble_condition(sketch, w, h, threshold=threshold, invert=invert)
    end = _control_end(pipe, control_end)
    control = Control("scribble", cond, conditioning_scale, control_start, end)
    return Request(prompts, negatives, steps, guidance, seed, h, w, control=control)


def edit_request(
    pipe: Sized,
    image: Any,
    prompt: str,
    *,
    strength: float = 0.6,
    control: str | None = None,
    canny_low: int = 100,
    canny_high: int = 200,
    conditioning_scale: float = 1.0,
    control_start: float = 0.0,
    control_end: float | None = None,
    negative_prompt: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    style: str | None = None,
) -> Request:
    """img2img at ``strength`` in (0, 1]; ``control="canny"`` adds canny-ControlNet guidance from the photo."""
    if not 0.0 < strength <= 1.0:
        raise UserError(f"strength must be in (0, 1] (got {strength})")
    if control is not None and control not in CONTROLS:
        raise UserError(f"unknown edit control {control!r}; choose from: {', '.join(CONTROLS)} (or none)")
    prompts, negatives = _prompts(prompt, negative_prompt, style)
    h, w = pipe.size(height, width)
    init = to_vae_input(image, w, h)
    ctrl = None
    if control == "canny":
        cond = canny_condition(image, w, h, low=canny_low, high=canny_high)
        ctrl = Control("canny", cond, conditioning_scale, control_start, _control_end(pipe, control_end))
    return Request(
        prompts, negatives, steps, guidance, seed, h, w, init_image=init, strength=strength, control=ctrl
    )
