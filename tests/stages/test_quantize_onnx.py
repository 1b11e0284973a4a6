"""quantize_onnx: dynamic INT8 (size and SQNR), static QDQ calibrated through the reference pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from testkit import run_stage

from sdkiln.runtime.contract.floors import tolerance
from sdkiln.stages.engine.core import InputArtifact


def test_dynamic_int8_is_small_and_gated_by_sqnr(
    tmp_path: Path, sd15_onnx: InputArtifact, tiny_sd15_artifact: InputArtifact
) -> None:
    import onnx

    from sdkiln.stages.common.onnx.io import cpu_session
    from sdkiln.stages.quantize_onnx import STAGE

    params = {
        "mode": "dynamic",
        "components": ["text_encoder", "unet", "taesd_decoder"],
        "parity": {"batch_sizes": [1, 2], "image_sizes": [64]},
    }
    ctx = run_stage(STAGE, params, {"onnx": sd15_onnx, "model": tiny_sd15_artifact}, tmp_path)
    m = ctx.metrics
    # The section's size ratio covers every graph, quantized or not, against the fp32 export.
    assert m["size_ratio"] == round(m["total_bytes"] / m["fp32_bytes"], 4) < 0.8
    assert m["int8_components"] == ["text_encoder", "unet"]
    for key in ("text_encoder", "unet"):
        assert ctx.components[key]["precision"] == "int8"
        assert m["sizes"][key]["int8_bytes"] <= 0.3 * m["sizes"][key]["fp32_bytes"]
        floor = tolerance(key).min_sqnr_db["int8"]
        assert floor <= m["sqnr_db"][key] < 60, key  # lossy, but above the family's floor
        ops = {n.op_type for n in onnx.load(str(ctx.out_dir / key / "model.onnx")).graph.node}
        assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    # TAESD is too small for int8 to pay off: its fp32 graph is kept, and the manifest says why.
    assert "taesd_decoder" in ctx.details["quantization"]["kept_fp32"]
    assert ctx.components["taesd_decoder"]["precision"] == "fp32"
    # Unselected graphs are copied; the folder stays a complete pipeline.
    assert (ctx.out_dir / "vae_decoder" / "model.onnx").read_bytes() == (
        sd15_onnx.path / "vae_decoder" / "model.onnx"
    ).read_bytes()
    assert (ctx.out_dir / "model_index.json").is_file() and (ctx.out_dir / "tokenizer").is_dir()
    sess = cpu_session(ctx.out_dir / "unet" / "model.onnx")
    # The quantized UNet keeps its ControlNet residuals optional (zero defaults ORT lists apart).
    inputs = ctx.components["unet"]["inputs"]
    assert [i.name for i in sess.get_inputs()] == [t["name"] for t in inputs if not t.get("optional")]
    assert [i.name for i in sess.get_overridable_initializers()] == [
        t["name"] for t in inputs if t.get("optional")
    ]
    assert ctx.metrics["optional_inputs"]["unet"]["unfed_vs_zero_max_abs"] == 0.0


def _sketch(path: Path) -> Path:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(img)
    draw.ellipse((10, 8, 54, 58), outline="black", width=3)
    draw.line((0, 44, 64, 20), fill="black", width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def test_static_qdq_is_calibrated_on_the_recipe_prompts(
    tmp_path: Path, sd15_onnx: InputArtifact, tiny_sd15_artifact: InputArtifact
) -> None:
    import onnx

    from sdkiln.stages.quantize_onnx import STAGE

    params = {
        "mode": "static",
        "components": ["text_encoder"],
        "op_types": ["MatMul", "Gemm", "Gather"],
        "activation_type": "int8",
        "per_channel": True,
        "calibration": {"prompts": ["a red house", "a cat on a sofa", "mountains"], "steps": 2, "size": 32},
        "parity": {"batch_sizes": [1, 2], "image_sizes": [32]},
    }
    ctx = run_stage(STAGE, params, {"onnx": sd15_onnx, "model": tiny_sd15_artifact}, tmp_path)
    # Three prompts, each encoded with its negative prompt: what the pipeline fed the text encoder.
    assert ctx.metrics["sizes"]["text_encoder"]["calibration_samples"] >= 3
    ops = {n.op_type for n in onnx.load(str(ctx.out_dir / "text_encoder" / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    floor = tolerance("text_encoder").min_sqnr_db["int8"]
    assert ctx.metrics["sqnr_db"]["text_encoder"] >= floor
    assert ctx.details["quantization"]["format"] == "QDQ"
    assert ctx.metrics["sizes"]["text_encoder"]["ratio"] <= 0.3
    # Only the text encoder is int8: the section says so instead of calling itself INT8.
    assert (
        ctx.components["text_encoder"]["precision"] == "int8"
        and ctx.components["unet"]["precision"] == "fp32"
    )
    assert ctx.metrics["size_ratio"] > 0.5
    assert any("mostly not int8" in w for w in ctx.details["precision_warnings"])


def test_calibration_collects_controlnet_and_unet_inputs_from_sketches(
    tmp_path: Path, tiny_sd15_artifact: InputArtifact
) -> None:
    from sdkiln.stages.common.onnx import components as oc
    from sdkiln.stages.common.torch.pipeline import open_pipeline
    from sdkiln.stages.quantize_onnx import CalibrationParams, collect_calibration

    fam, comps = oc.plan_components(tiny_sd15_artifact.path, tiny_sd15_artifact.model)
    comps = [c for c in comps if c.key in ("unet", "controlnet.scribble", "vae_decoder")]
    sketch = _sketch(tmp_path / "sketches" / "s.png")
    cal = CalibrationParams(prompts=["a house"], sketches=["sketches/s.png"], steps=2, size=32)
    loaded = open_pipeline(tiny_sd15_artifact.path, family="sd15")
    feeds = collect_calibration(loaded, fam, comps, cal, sketch.parent.parent)
    assert len(feeds["controlnet.scribble"]) == 2  # one per step
    cn = feeds["controlnet.scribble"][0]
    assert cn["controlnet_cond"].shape == (2, 3, 32, 32) and cn["conditioning_scale"].shape == (1,)
    assert set(cn) == set(next(c for c in comps if c.key == "controlnet.scribble").input_names)
    unet = feeds["unet"]
    assert len(unet) == 4  # two text steps, two sketch steps
    residual = "down_block_additional_residual_0"
    assert not unet[0][residual].any() and unet[-1][residual].any()  # zeros for text, real for sketch
    assert feeds["vae_decoder"][0]["latent_sample"].shape == (1, 4, 4, 4)
    assert np.isfinite(unet[-1]["sample"]).all()


def test_static_calibration_files_are_checked_at_plan_time(tmp_path: Path) -> None:
    from sdkiln.stages.quantize_onnx import STAGE

    params = STAGE.params(mode="static", calibration={"sketches": ["missing.png"]})
    assert STAGE.check(params, tmp_path) == ["params.calibration.sketches: missing.png not found"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"mode": "static"}, "calibration"),
        ({"mode": "dynamic", "calibration": {}}, "calibration"),
        ({"mode": "dynamic", "activation_type": "int8"}, "activation_type"),
        ({"op_types": ["Softmax"]}, "op_types"),
        ({"mode": "static", "calibration": {"steps": 0}}, "steps"),
    ],
)
def test_params_are_validated(params: dict, field: str) -> None:
    from sdkiln.stages.quantize_onnx import QuantizeOnnxParams

    with pytest.raises(ValidationError, match=field):
        QuantizeOnnxParams(**params)


def test_below_floor_keeps_the_fp32_graph_when_asked(
    tmp_path: Path,
    sd15_onnx: InputArtifact,
    tiny_sd15_artifact: InputArtifact,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sdkiln.runtime.contract.floors import Gate
    from sdkiln.stages.common.onnx import transform
    from sdkiln.stages.quantize_onnx import STAGE

    real = transform.gate_for
    monkeypatch.setattr(
        transform, "gate_for", lambda c, prec: Gate(min_sqnr_db=200.0) if prec == "int8" else real(c, prec)
    )
    params = {
        "mode": "dynamic",
        "components": ["text_encoder"],
        "below_floor": "keep_fp32",
        "parity": {"batch_sizes": [1], "image_sizes": [64]},
    }
    ctx = run_stage(STAGE, params, {"onnx": sd15_onnx, "model": tiny_sd15_artifact}, tmp_path)
    q = ctx.details["quantization"]
    assert ctx.components["text_encoder"]["precision"] == "fp32" and "text_encoder" in q["kept_fp32"]
    tried = q["below_floor"]["text_encoder"]
    assert tried["gate"] == {"min_sqnr_db": 200.0} and tried["int8_bytes"] < tried["fp32_bytes"]
    assert (ctx.out_dir / "text_encoder" / "model.onnx").read_bytes() == (
        sd15_onnx.path / "text_encoder" / "model.onnx"
    ).read_bytes()
