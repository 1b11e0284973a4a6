"""End-to-end parity: the same task, seed and initial latents on a backend and on the PyTorch reference,
compared as final images (PSNR, SSIM).

Used by the ``parity`` stage (numbers into the bundle manifest), ``make demo`` and the tests. Floors are
data (``PSNR_FLOORS_DB``), per precision of the candidate: an fp32 export must be near-identical, lossy
ones must stay above their floor. Random-weight tiny models are the worst case for quantization (no
outlier structure to preserve), so these floors hold on them and leave room on real weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sdkiln.runtime.examples import PHOTOS, SKETCHES
from sdkiln.runtime.metrics import psnr, ssim
from sdkiln.runtime.pipeline import Pipeline, Result

# End-to-end image PSNR floors (dB) against the PyTorch fp32 reference, by candidate precision.
PSNR_FLOORS_DB: dict[str, float] = {
    "fp32": 40.0,  # same graph, different kernels: differences at the 1e-6 level
    "fp16": 28.0,
    "int8": 18.0,  # dynamic INT8 MatMuls (ORT) or qint8 weights
    "6bit": 20.0,  # Core ML 6-bit palettization
    "palettized": 20.0,
}


@dataclass(frozen=True)
class Case:
    """One parity run: a task with fixed inputs and seed."""

    task: str  # sketch | text | edit
    prompt: str
    image: str | None = None  # an example name (SKETCHES / PHOTOS)
    seed: int = 42
    strength: float = 0.6
    control: str | None = None


CASES: tuple[Case, ...] = (
    Case("sketch", "a red sports car, studio light", image="car"),
    Case("text", "a lighthouse at dusk", seed=7),
    Case("edit", "a red bird on a branch", image="scene", control="canny"),
)


def floor_for(precision: str | None) -> float:
    """The PSNR floor for a candidate's precision (unknown precisions get the INT8 floor)."""
    return PSNR_FLOORS_DB.get(precision or "fp32", PSNR_FLOORS_DB["int8"])


def run_case(pipe: Pipeline, case: Case, steps: int | None = None, size: int | None = None) -> Result:
    """Run ``case`` on ``pipe`` (same seed, so the same initial latents on every backend)."""
    from sdkiln.runtime.tasks import edit_request, sketch_request, text_request

    common: dict[str, Any] = {"steps": steps, "seed": case.seed, "height": size, "width": size}
    if case.task == "text":
        req = text_request(pipe, case.prompt, **common)
    elif case.task == "sketch":
        req = sketch_request(pipe, SKETCHES[case.image or "car"](), case.prompt, **common)
    else:
        photo = PHOTOS[case.image or "scene"]()
        control = case.control if case.control and pipe.backend.has(f"controlnet.{case.control}") else None
        req = edit_request(pipe, photo, case.prompt, strength=case.strength, control=control, **common)
    return pipe.generate(req)


def available_cases(pipe: Pipeline, cases: tuple[Case, ...] = CASES) -> tuple[Case, ...]:
    """The cases this bundle can run (sketch needs the scribble ControlNet)."""
    return tuple(c for c in cases if c.task != "sketch" or pipe.backend.has("controlnet.scribble"))


def compare(reference: Result, candidate: Result) -> dict[str, float]:
    """PSNR (dB) and SSIM of a candidate's first image against the reference's."""
    a, b = reference.pixels[0], candidate.pixels[0]
    return {
        "psnr_db": round(psnr(a, b), 3),
        "ssim": round(ssim(a, b), 5),
        "max_abs": round(float(np.abs(a - b).max()), 6),
    }
