"""prepare_tensorrt: standard-op, shape-inferred, fp16 graphs with min/opt/max profiles."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from testkit import run_stage

from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.floors import tolerance
from sdkiln.stages.engine.core import InputArtifact


def test_fp16_graphs_with_profiles(
    tmp_path: Path, sd15_onnx: InputArtifact, tiny_sd15_artifact: InputArtifact
) -> None:
    import onnx

    from sdkiln.stages.common.onnx.io import custom_domain_ops
    from sdkiln.stages.prepare_tensorrt import STAGE

    params = {
        "components": ["unet", "vae_decoder"],
        "batch": [1, 1, 2],
        "height": [32, 64, 128],
        "width": [32, 64, 96],
        "parity": {"batch_sizes": [1, 2], "image_sizes": [32, 64]},
    }
    ctx = run_stage(STAGE, params, {"onnx": sd15_onnx, "model": tiny_sd15_artifact}, tmp_path)
    assert ctx.components["unet"]["precision"] == "fp16"
    assert ctx.components["vae_decoder"]["precision"] == "fp32"  # SD VAEs overflow in fp16
    for key in ("unet", "vae_decoder"):
        model = onnx.load(str(ctx.out_dir / key / "model.onnx"))
        assert custom_domain_ops(model) == []
        assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
        assert len(model.graph.value_info) > 0  # shape inference ran
        assert ctx.metrics["nodes"][key]["after"] < ctx.metrics["nodes"][key]["before"]  # constants folded
    floor = tolerance("unet").min_sqnr_db["fp16"]
    assert ctx.metrics["parity"]["unet"]["worst"]["sqnr_db"] >= floor
    prof = ctx.details["profiles"]
    # cfg: the UNet's opt/max batch is doubled (cond + uncond); the VAE's is not.
    assert prof["unet"]["sample"] == {"min": [1, 4, 4, 4], "opt": [2, 4, 8, 8], "max": [4, 4, 16, 12]}
    assert prof["unet"]["mid_block_additional_residual"]["max"] == [4, 64, 8, 6]
    assert prof["unet"]["timestep"] == {"min": [1], "opt": [2], "max": [4]}
    assert prof["vae_decoder"]["latent_sample"]["max"] == [2, 4, 16, 12]
    assert set(prof["unet"]) == {t["name"] for t in ctx.components["unet"]["inputs"]}
    # TensorRT's parser takes an input with an initializer for a constant: the export's optional ControlNet
    # residuals are required inputs again, with the contract's shapes.
    unet = onnx.load(str(ctx.out_dir / "unet" / "model.onnx"), load_external_data=False)
    assert not {v.name for v in unet.graph.input} & {t.name for t in unet.graph.initializer}
    residuals = [t for t in ctx.components["unet"]["inputs"] if "additional_residual" in t["name"]]
    assert residuals and not any(t.get("optional") for t in residuals)
    assert [d.dim_param or d.dim_value for d in unet.graph.input[-1].type.tensor_type.shape.dim] == residuals[
        -1
    ]["shape"]
    assert ctx.stage.output_kind == "tensorrt"


def test_refuses_graphs_with_ort_contrib_ops(
    tmp_path: Path, sd15_cpu_optimized: InputArtifact, tiny_sd15_artifact: InputArtifact
) -> None:
    from sdkiln.stages.prepare_tensorrt import STAGE

    inputs = {"onnx": sd15_cpu_optimized, "model": tiny_sd15_artifact}
    with pytest.raises(UserError, match="MultiHeadAttention"):
        run_stage(STAGE, {"components": ["unet"], "precision": "fp32"}, inputs, tmp_path)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"batch": [2, 1, 4]}, "batch"),
        ({"height": [256, 500, 768]}, "height"),
        ({"width": [256, 512]}, "width"),
        ({"precision": "fp32", "vae_precision": "fp16"}, "vae_precision"),
    ],
)
def test_params_are_validated(params: dict, field: str) -> None:
    from sdkiln.stages.prepare_tensorrt import PrepareTensorrtParams

    with pytest.raises(ValidationError, match=field):
        PrepareTensorrtParams(**params)
