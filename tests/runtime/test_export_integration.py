"""The real export_onnx stage's output runs on the runtime at parity with the PyTorch reference (opt-in:
the stage's own parity gate makes this a minute-long test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdkiln.runtime.load import open_section
from sdkiln.runtime.parity import CASES, compare, floor_for, run_case
from sdkiln.stages.core import StageContext

pytest.importorskip("torch", reason="exporting needs the build extra")


@pytest.mark.slow
def test_export_onnx_stage_output_runs_at_parity(tmp_path: Path, tiny_sd15_artifact) -> None:
    from sdkiln.stages.export_onnx import STAGE, ExportOnnxParams
    from sdkiln.stages.onnx_utils import ParityParams

    out = tmp_path / "out"
    out.mkdir()
    params = ExportOnnxParams(parity=ParityParams(batch_sizes=[1], image_sizes=[64]))
    ctx = StageContext(
        step_id="onnx",
        stage=STAGE,
        params=params,
        inputs={"model": tiny_sd15_artifact},
        out_dir=out,
        recipe_dir=tmp_path,
        pins={},
        recipe={},
        work_dir=tmp_path / "work",
    )
    STAGE.run(ctx)
    entry = {"kind": "onnx", "params": {}, "components": ctx.components, "extra": ctx.extra}
    reference = open_section(tiny_sd15_artifact.path, tiny_sd15_artifact.manifest, "torch")
    onnx = open_section(out, entry, "onnx")
    for case in CASES:
        m = compare(run_case(reference, case, steps=2, size=64), run_case(onnx, case, steps=2, size=64))
        assert m["psnr_db"] >= floor_for("fp32"), (case.task, m)
