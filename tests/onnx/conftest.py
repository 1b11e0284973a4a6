"""Shared ONNX exports of the tiny presets, made once per session (each export runs its own parity gate).

- ``sd15_onnx``: tiny SD 1.5 with scribble + canny ControlNets and TAESD, fp32, UNet with residual
  inputs, parity at batch 1 and 2 x 32 and 64 px.
- ``sdxl_onnx``: tiny SDXL with a canny ControlNet and TAESD, same parity grid.

Both are ``InputArtifact``s as a downstream stage receives them (manifest: kind, components, extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sdkiln.stages.core import InputArtifact, Stage, StageContext

pytest.importorskip("torch", reason="the ONNX stages need the build extra")

PARITY = {"batch_sizes": [1, 2], "image_sizes": [32, 64]}


def run_stage(
    stage: Stage,
    params: dict[str, Any],
    inputs: dict[str, InputArtifact],
    tmp: Path,
    recipe_dir: Path | None = None,
) -> StageContext:
    """Run ``stage`` the way the engine does: fresh out_dir and work_dir, params validated."""
    out = tmp / "out"
    out.mkdir(parents=True)
    ctx = StageContext(
        step_id=stage.name,
        stage=stage,
        params=stage.params(**params),
        inputs=inputs,
        out_dir=out,
        recipe_dir=recipe_dir or tmp,
        pins={},
        recipe={},
        work_dir=tmp / "work",
    )
    (tmp / "work").mkdir()
    stage.run(ctx)
    return ctx


def as_artifact(ctx: StageContext) -> InputArtifact:
    """A finished stage's output as the next stage's input."""
    manifest = {
        "kind": ctx.stage.output_kind,
        "params": ctx.params.model_dump(),
        "metrics": ctx.metrics,
        "components": ctx.components,
        "extra": ctx.extra,
    }
    return InputArtifact(ctx.step_id, ctx.out_dir, manifest)


def _export(factory: pytest.TempPathFactory, name: str, source: InputArtifact) -> InputArtifact:
    from sdkiln.stages.export_onnx import STAGE

    return as_artifact(run_stage(STAGE, {"parity": PARITY}, {"model": source}, factory.mktemp(name)))


@pytest.fixture(scope="session")
def sd15_onnx(tmp_path_factory: pytest.TempPathFactory, tiny_sd15_artifact: InputArtifact) -> InputArtifact:
    return _export(tmp_path_factory, "onnx-sd15", tiny_sd15_artifact)


@pytest.fixture(scope="session")
def sdxl_onnx(tmp_path_factory: pytest.TempPathFactory, tiny_sdxl_artifact: InputArtifact) -> InputArtifact:
    return _export(tmp_path_factory, "onnx-sdxl", tiny_sdxl_artifact)


@pytest.fixture(scope="session")
def sd15_cpu_optimized(
    tmp_path_factory: pytest.TempPathFactory, sd15_onnx: InputArtifact, tiny_sd15_artifact: InputArtifact
) -> InputArtifact:
    """The tiny SD 1.5 UNet fused for the CPU, benchmarked at 512 px on one thread (steadier than two
    threads on a shared 2-core machine)."""
    from sdkiln.stages.optimize_onnx import STAGE

    params = {
        "target": "cpu",
        "components": ["unet"],
        "parity": PARITY,
        "benchmark": {"components": ["unet"], "image_size": 512, "repeats": 5, "threads": 1},
    }
    inputs = {"onnx": sd15_onnx, "model": tiny_sd15_artifact}
    return as_artifact(run_stage(STAGE, params, inputs, tmp_path_factory.mktemp("onnx-sd15-cpu")))
