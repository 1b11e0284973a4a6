"""Stage fixtures, made once per session and read-only: the tiny presets' ONNX exports (each runs its
own parity gate), the CPU-optimized tiny UNet, Core ML exports in both attention modes and a palettized
UNet. Conversions dominate the run time, so every test reads these instead of converting again.

ONNX parity grid: batch 1 and 2 at 32 and 64 px. Core ML: 64x64 images (8x8 latents), one ControlNet
(scribble), batch 2 (the tiny preset is not LCM).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from testkit import Built, run_stage

from sdkiln.stages.engine.core import StageContext

pytest.importorskip("torch", reason="the stages need the build extra")

PARITY = {"batch_sizes": [1, 2], "image_sizes": [32, 64]}
SIZE = 64


@pytest.fixture
def make_ctx(tmp_path: Path):
    """``make_ctx(stage, params_dict, inputs={...}, pins={...}, recipe_dir=...)`` -> a StageContext writing
    under ``tmp_path``, not yet run (call ``stage.run(ctx)``)."""
    counter = iter(range(1000))

    def make(
        stage: Any,
        params: dict[str, Any],
        inputs: dict[str, Any] | None = None,
        pins: dict[str, str] | None = None,
        recipe_dir: Path | None = None,
    ) -> StageContext:
        n = next(counter)
        out, work = tmp_path / f"out{n}", tmp_path / f"work{n}"
        out.mkdir()
        work.mkdir()
        return StageContext(
            step_id=f"{stage.name}{n}",
            stage=stage,
            params=stage.params.model_validate(params),
            inputs=inputs or {},
            out_dir=out,
            recipe_dir=recipe_dir or tmp_path,
            pins=pins or {},
            recipe={},
            work_dir=work,
        )

    return make


@pytest.fixture
def to_input():
    """``to_input(ctx)``: a finished context's output as the next stage's input."""
    from sdkiln.stages.engine import artifact_of

    return artifact_of


def _export(factory: pytest.TempPathFactory, name: str, source: Any) -> Any:
    from sdkiln.stages.export_onnx import STAGE

    return run_stage(STAGE, {"parity": PARITY}, {"model": source}, factory.mktemp(name)).artifact(name)


@pytest.fixture(scope="session")
def sd15_onnx(tmp_path_factory: pytest.TempPathFactory, tiny_sd15_artifact: Any) -> Any:
    """Tiny SD 1.5 with scribble + canny ControlNets and TAESD, fp32, UNet with residual inputs."""
    return _export(tmp_path_factory, "onnx-sd15", tiny_sd15_artifact)


@pytest.fixture(scope="session")
def sdxl_onnx(tmp_path_factory: pytest.TempPathFactory, tiny_sdxl_artifact: Any) -> Any:
    """Tiny SDXL with a canny ControlNet and TAESD, fp32."""
    return _export(tmp_path_factory, "onnx-sdxl", tiny_sdxl_artifact)


@pytest.fixture(scope="session")
def sd15_cpu_optimized(
    tmp_path_factory: pytest.TempPathFactory, sd15_onnx: Any, tiny_sd15_artifact: Any
) -> Any:
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
    return run_stage(STAGE, params, inputs, tmp_path_factory.mktemp("onnx-sd15-cpu")).artifact("cpu")


@pytest.fixture(scope="session")
def coreml_split(tiny_sd15_artifact: Any, tmp_path_factory: pytest.TempPathFactory) -> Built:
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
def coreml_original(tiny_sd15_artifact: Any, tmp_path_factory: pytest.TempPathFactory) -> Built:
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
    coreml_original: Built, tiny_sd15_artifact: Any, tmp_path_factory: pytest.TempPathFactory
) -> Built:
    """The ControlledUnet (original attention, iOS 17 lookup-table ops) palettized to 6 bits per tensor,
    then chunked in two."""
    from sdkiln.stages.palettize_coreml import STAGE, PalettizeCoremlParams

    params = PalettizeCoremlParams(nbits=6, components=("unet",), chunk_unet=True)
    inputs = {"coreml": coreml_original.artifact("coreml"), "model": tiny_sd15_artifact}
    return run_stage(STAGE, params, inputs, tmp_path_factory.mktemp("coreml-6bit"))
