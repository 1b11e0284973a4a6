"""Core ML fixtures: the tiny SD 1.5 preset exported once per session in each attention mode, and its
UNet palettized once. Conversions dominate the run time (each UNet takes tens of seconds on this
machine), so every test reads these shared, read-only artifacts instead of converting again.

Sizes: 64x64 images (8x8 latents), one ControlNet (scribble); batch 2 (the tiny preset is not LCM).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sdkiln.stages.core import InputArtifact, Stage, StageContext

SIZE = 64


@dataclass
class Built:
    """A stage run: its context (metrics, components, extra) and output folder."""

    ctx: StageContext
    out: Path

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest fields a downstream stage sees."""
        return {
            "kind": self.ctx.stage.output_kind,
            "params": self.ctx.params.model_dump(mode="json"),
            "metrics": self.ctx.metrics,
            "components": self.ctx.components,
            "extra": self.ctx.extra,
        }

    def artifact(self, step_id: str) -> InputArtifact:
        # A JSON round trip, as the engine stores manifests.
        return InputArtifact(step_id, self.out, json.loads(json.dumps(self.manifest)))


def run_stage(stage: Stage, params: Any, inputs: dict[str, InputArtifact], root: Path) -> Built:
    """Run ``stage`` the way the engine does: a fresh output folder and scratch folder."""
    out, work = root / "out", root / "work"
    out.mkdir(parents=True)
    work.mkdir()
    ctx = StageContext(
        step_id=root.name,
        stage=stage,
        params=params,
        inputs=inputs,
        out_dir=out,
        recipe_dir=root,
        pins={},
        recipe={},
        work_dir=work,
    )
    stage.run(ctx)
    return Built(ctx, out)


@pytest.fixture(scope="session")
def coreml_split(tiny_sd15_artifact: InputArtifact, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Every component of the tiny SD 1.5 preset (ControlledUnet + scribble ControlNet) with the
    Neural-Engine attention, for iOS 18."""
    from sdkiln.stages.export_coreml import STAGE, ExportCoremlParams

    params = ExportCoremlParams(
        attention="split_einsum",
        height=SIZE,
        width=SIZE,
        controlnets=("scribble",),
        minimum_deployment_target="iOS18",  # lets the per-grouped-channel palettes run on it
    )
    return run_stage(STAGE, params, {"model": tiny_sd15_artifact}, tmp_path_factory.mktemp("coreml-split"))


@pytest.fixture(scope="session")
def coreml_original(tiny_sd15_artifact: InputArtifact, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The attention-dependent components (UNet, ControlNet) with diffusers' original attention, for
    iOS 17 (the default). The text encoder and VAE do not depend on the attention mode
    (``test_attention_free_components_ignore_mode``)."""
    from sdkiln.stages.export_coreml import STAGE, ExportCoremlParams

    params = ExportCoremlParams(
        attention="original",
        height=SIZE,
        width=SIZE,
        controlnets=("scribble",),
        components=("unet", "controlnet"),
    )
    return run_stage(STAGE, params, {"model": tiny_sd15_artifact}, tmp_path_factory.mktemp("coreml-original"))


@pytest.fixture(scope="session")
def palettized_unet(
    coreml_original: Built, tiny_sd15_artifact: InputArtifact, tmp_path_factory: pytest.TempPathFactory
) -> Built:
    """The ControlledUnet (original attention, iOS 17 lookup-table ops) palettized to 6 bits per tensor,
    then chunked in two."""
    from sdkiln.stages.palettize_coreml import STAGE, PalettizeCoremlParams

    params = PalettizeCoremlParams(nbits=6, components=("unet",), chunk_unet=True)
    inputs = {"coreml": coreml_original.artifact("coreml"), "model": tiny_sd15_artifact}
    return run_stage(STAGE, params, inputs, tmp_path_factory.mktemp("coreml-6bit"))
