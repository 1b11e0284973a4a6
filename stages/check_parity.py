"""check_parity (stage ``parity``): end-to-end image parity of ONNX artifacts against the PyTorch reference, into the manifest.

Each task (sketch, text, edit) runs through the runtime's one denoising loop twice: over the PIPELINE
reference's diffusers models (torch backend) and over an ONNX artifact's graphs (ONNX Runtime, CPU),
with the same seed and therefore the same initial latents. The final images are compared (PSNR, SSIM)
and the numbers land in ``ctx.metrics`` as ``<task>.<label>.psnr_db`` / ``.ssim``; the bundle manifest
carries them in this step's section. Each candidate must stay above the PSNR floor of its precision
(``floors.E2E_PSNR_DB``, overridable per precision); all failures are collected and
raised together after the numbers are recorded.

Recipe example::

    - id: parity
      stage: parity
      inputs: {reference: fused, onnx: onnx, onnx_2: onnx_int8}
      params: {steps: 2, size: 64}
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Literal

from pydantic import Field, field_validator

from sdkiln.runtime.contract.errors import ParityError
from sdkiln.runtime.contract.layout import Kind
from sdkiln.stages.engine.core import Stage, StageContext, StageParams

logger = logging.getLogger(__name__)

Task = Literal["sketch", "text", "edit"]
CANDIDATES = ("onnx", "onnx_2", "onnx_3", "onnx_4")


class ParityParams(StageParams):
    tasks: list[Task] = Field(default_factory=lambda: ["sketch", "text", "edit"], min_length=1)
    steps: int | None = Field(default=None, ge=1, le=100, description="default: the family's (LCM: 4)")
    size: int | None = Field(
        default=None, ge=64, le=2048, description="image side in px; default: the model's"
    )
    seed: int = Field(default=42, ge=0)
    # Per-precision PSNR floors (dB) replacing the runtime's defaults for this check.
    min_psnr_db: dict[str, float] = Field(default_factory=dict)
    gate: bool = Field(default=True, description="false: record the numbers, never fail the build")

    @field_validator("size")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        if v is not None and v % 8:
            raise ValueError("must be a multiple of 8 (the VAE's scale factor)")
        return v


def run(ctx: StageContext) -> None:
    import gc

    from sdkiln.runtime.load import open_section
    from sdkiln.runtime.parity import CASES, available_cases, compare, floor_for, run_case

    p: ParityParams = ctx.params
    ref_in = ctx.inputs["reference"]
    candidates = {}
    for name in CANDIDATES:
        art = ctx.inputs.get(name)
        if art is None:
            continue
        precision = art.manifest.precision  # from what its components hold (``mixed`` if they differ)
        label = f"onnx_{precision}"
        if label in {c[0] for c in candidates.values()}:
            label = f"{label}_{art.step_id}"
        floor = p.min_psnr_db.get(
            precision, floor_for(precision, [c.precision for c in art.manifest.components.values()])
        )
        candidates[name] = (label, precision, floor, art)

    # One model in memory at a time (real-size pipelines are several GB each): the reference renders
    # every case first, then each candidate in turn, and is released before the next one loads.
    reference = open_section(ref_in.path, ref_in.manifest, "torch", source=f"reference {ref_in.step_id}")
    cases = [replace(c, seed=p.seed) for c in available_cases(reference, CASES) if c.task in p.tasks]
    skipped = sorted(set(p.tasks) - {c.task for c in cases})
    default_steps, default_size = reference.default_steps, reference.info.default_size[0]
    images = ctx.out_dir / "images"
    images.mkdir(parents=True)
    refs = {}
    for case in ctx.progress(cases, "reference", total=len(cases)):
        with ctx.timed(f"{case.task}.reference.seconds"):
            refs[case.task] = run_case(reference, case, steps=p.steps, size=p.size)
        refs[case.task].images[0].save(images / f"{case.task}-reference.png")
    del reference
    gc.collect()

    report: dict[str, dict[str, dict[str, float]]] = {}
    failures: list[str] = []
    for label, _precision, floor, art in candidates.values():
        pipe = open_section(art.path, art.manifest, "onnx", provider="cpu")
        for case in ctx.progress(cases, label, total=len(cases)):
            with ctx.timed(f"{case.task}.{label}.seconds"):
                got = run_case(pipe, case, steps=p.steps, size=p.size)
            got.images[0].save(images / f"{case.task}-{label}.png")
            m = compare(refs[case.task], got)
            report.setdefault(case.task, {})[label] = {**m, "floor_db": floor}
            ctx.metrics[f"{case.task}.{label}.psnr_db"] = m["psnr_db"]
            ctx.metrics[f"{case.task}.{label}.ssim"] = m["ssim"]
            if m["psnr_db"] < floor:
                failures.append(f"{case.task} on {label}: PSNR {m['psnr_db']:.2f} dB < floor {floor:.1f} dB")
        del pipe
        gc.collect()
    ctx.model = ref_in.model
    ctx.details.update(
        {
            "steps": p.steps or default_steps,
            "size": p.size or default_size,
            "seed": p.seed,
            "candidates": {label: precision for label, precision, _, _ in candidates.values()},
            "skipped_tasks": skipped,
        }
    )
    (ctx.out_dir / "parity.json").write_text(
        json.dumps({"results": report, **ctx.details}, indent=2, sort_keys=True)
    )
    if failures and p.gate:
        raise ParityError("end-to-end images", failures)


STAGE = Stage(
    name="parity",
    version="1",
    description="End-to-end PSNR/SSIM of ONNX artifacts vs the PyTorch reference for sketch, text and edit",
    inputs={"reference": (Kind.PIPELINE,), **{name: (Kind.ONNX,) for name in CANDIDATES}},
    optional_inputs=frozenset(CANDIDATES[1:]),
    output_kind=Kind.REPORT,
    params=ParityParams,
    run=run,
    env_packages=("torch", "diffusers", "transformers", "onnxruntime", "numpy"),
    bundle_dir=lambda p: "reports/parity",
)
