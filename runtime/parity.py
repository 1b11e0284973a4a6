"""End-to-end parity: the same task, seed and initial latents on a backend and on the PyTorch reference,
compared as final images (PSNR, SSIM).

Used by the ``parity`` stage (numbers into the bundle manifest), ``make demo`` and the tests. Floors are
the contract's (``floors.E2E_PSNR_DB``), per precision of the candidate: an fp32 export must be
near-identical, lossy ones must stay above their floor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdkiln.runtime.contract.floors import E2E_PSNR_DB, e2e_floor
from sdkiln.runtime.contract.metrics import compare_images
from sdkiln.runtime.examples import PHOTOS, SKETCHES
from sdkiln.runtime.pipeline import Pipeline
from sdkiln.runtime.tasks import edit_request, sketch_request, text_request
from sdkiln.runtime.types import Result

PSNR_FLOORS_DB = E2E_PSNR_DB


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


floor_for = e2e_floor


def run_case(pipe: Pipeline, case: Case, steps: int | None = None, size: int | None = None) -> Result:
    """Run ``case`` on ``pipe`` (same seed, so the same initial latents on every backend)."""
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
    """PSNR (dB), SSIM and max-abs of a candidate's first image against the reference's."""
    return compare_images(reference.pixels[0], candidate.pixels[0])
