"""The parity stage records end-to-end PSNR/SSIM of ONNX artifacts vs the PyTorch reference, and gates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from sdkiln.runtime.parity import floor_for
from sdkiln.stages.core import InputArtifact, ParityError, StageContext
from sdkiln.stages.parity import STAGE, ParityParams

pytest.importorskip("torch", reason="the reference side runs diffusers models")


def _ctx(tmp_path: Path, bundle: Path, params: ParityParams, with_int8: bool = True) -> StageContext:
    manifest = json.loads((bundle / "manifest.json").read_text())

    def art(step: str, section: str) -> InputArtifact:
        return InputArtifact(step_id=step, path=bundle / section, manifest=manifest["sections"][section])

    inputs = {"reference": art("fused", "torch/fused"), "onnx": art("onnx", "onnx/fp32")}
    if with_int8:
        inputs["onnx_2"] = art("onnx_int8", "onnx/int8")
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
        int8 = ctx.metrics[f"{task}.onnx_int8.psnr_db"]
        assert fp32 >= floor_for("fp32") and ctx.metrics[f"{task}.onnx_fp32.ssim"] > 0.999
        assert floor_for("int8") <= int8 < fp32
        assert (ctx.out_dir / "images" / f"{task}-reference.png").is_file()
    report = json.loads((ctx.out_dir / "parity.json").read_text())
    assert report["steps"] == 2 and report["candidates"] == {"onnx_fp32": "fp32", "onnx_int8": "int8"}
    assert report["results"]["text"]["onnx_int8"]["floor_db"] == floor_for("int8")


def test_parity_collects_every_failure_then_raises(tmp_path: Path, tiny_lcm_bundle: Path) -> None:
    ctx = _ctx(
        tmp_path,
        tiny_lcm_bundle,
        ParityParams(size=64, steps=2, tasks=["text", "edit"], min_psnr_db={"int8": 99.0}),
    )
    with pytest.raises(ParityError) as err:
        STAGE.run(ctx)
    assert len(err.value.failures) == 2
    assert "text on onnx_int8: PSNR" in str(err.value) and "edit on onnx_int8" in str(err.value)
    assert (
        "text.onnx_int8.psnr_db" in ctx.metrics and "edit.onnx_fp32.psnr_db" in ctx.metrics
    )  # recorded anyway


def test_params_are_validated() -> None:
    with pytest.raises(ValidationError, match="multiple of 8"):
        ParityParams(size=100)
    with pytest.raises(ValidationError, match="tasks"):
        ParityParams(tasks=["paint"])
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ParityParams(stepz=2)
