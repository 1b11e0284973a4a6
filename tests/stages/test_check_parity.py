"""The parity stage records end-to-end PSNR/SSIM of ONNX artifacts vs the PyTorch reference, and gates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError
from testkit import step_artifacts

from sdkiln.runtime.contract.errors import ParityError
from sdkiln.runtime.parity import floor_for
from sdkiln.stages.check_parity import STAGE, ParityParams
from sdkiln.stages.engine.core import StageContext

pytest.importorskip("torch", reason="the reference side runs diffusers models")


def _ctx(tmp_path: Path, bundle: Path, params: ParityParams, with_int8: bool = True) -> StageContext:
    steps = step_artifacts(bundle)
    inputs = {"reference": steps["fused"], "onnx": steps["onnx"]}
    if with_int8:
        inputs["onnx_2"] = steps["onnx_int8"]
    out = tmp_path / "out"
    out.mkdir()
    return StageContext(
        step_id="parity",
        stage=STAGE,
        params=params,
        inputs=inputs,
        out_dir=out,
        recipe_dir=tmp_path,
        pins={},
        recipe={},
        work_dir=tmp_path / "work",
    )


def test_parity_metrics_land_in_the_manifest_fields(tmp_path: Path, tiny_lcm_bundle: Path) -> None:
    ctx = _ctx(tmp_path, tiny_lcm_bundle, ParityParams(size=64, steps=2))
    STAGE.run(ctx)
    for task in ("sketch", "text", "edit"):
        fp32 = ctx.metrics[f"{task}.onnx_fp32.psnr_db"]
        # The INT8 section keeps its VAEs fp32: its label says "mixed", from what its files hold.
        int8 = ctx.metrics[f"{task}.onnx_mixed.psnr_db"]
        assert fp32 >= floor_for("fp32") and ctx.metrics[f"{task}.onnx_fp32.ssim"] > 0.999
        assert floor_for("int8") <= int8 < fp32
        assert (ctx.out_dir / "images" / f"{task}-reference.png").is_file()
    report = json.loads((ctx.out_dir / "parity.json").read_text())
    assert report["steps"] == 2 and report["candidates"] == {"onnx_fp32": "fp32", "onnx_mixed": "mixed"}
    # A mixed candidate gets the lowest floor of its components' precisions (int8's).
    assert report["results"]["text"]["onnx_mixed"]["floor_db"] == floor_for("int8")


def test_parity_collects_every_failure_then_raises(tmp_path: Path, tiny_lcm_bundle: Path) -> None:
    ctx = _ctx(
        tmp_path,
        tiny_lcm_bundle,
        ParityParams(size=64, steps=2, tasks=["text", "edit"], min_psnr_db={"mixed": 99.0}),
    )
    with pytest.raises(ParityError) as err:
        STAGE.run(ctx)
    assert len(err.value.failures) == 2
    assert "text on onnx_mixed: PSNR" in str(err.value) and "edit on onnx_mixed" in str(err.value)
    assert (
        "text.onnx_mixed.psnr_db" in ctx.metrics and "edit.onnx_fp32.psnr_db" in ctx.metrics
    )  # recorded anyway


def test_params_are_validated() -> None:
    with pytest.raises(ValidationError, match="multiple of 8"):
        ParityParams(size=100)
    with pytest.raises(ValidationError, match="tasks"):
        ParityParams(tasks=["paint"])
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ParityParams(stepz=2)
