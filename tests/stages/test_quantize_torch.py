"""quantize_torch: quanto weights, SQNR against the float UNet, saved + reloadable with requantize."""

from __future__ import annotations

import pytest
import torch

from sdkiln.runtime.contract.errors import ParityError
from sdkiln.runtime.contract.floors import tolerance
from sdkiln.stages.common.torch.pipeline import open_pipeline, unet_inputs
from sdkiln.stages.quantize_torch import (
    QMAP_FILE,
    STAGE,
    WEIGHTS_FILE,
    load_quantized,
    open_quantized_pipeline,
)


def test_qint8_unet_and_controlnets(make_ctx, tiny_sd15_artifact):
    ctx = make_ctx(STAGE, {"weights": "qint8"}, inputs={"model": tiny_sd15_artifact})
    STAGE.run(ctx)
    m = ctx.metrics
    floor = tolerance("unet").min_sqnr_db["qint8"]
    for key in ("unet", "controlnet.scribble", "controlnet.canny"):
        assert m[f"{key}.sqnr_db"] >= floor
        assert m[f"{key}.bytes_after"] < 0.5 * m[f"{key}.bytes_before"]
        assert m[f"{key}.reload_max_abs"] == 0
        assert ctx.components[key]["precision"] == "qint8"
    for sub in ("unet", "controlnet/scribble"):
        assert {p.name for p in (ctx.out_dir / sub).iterdir()} == {"config.json", WEIGHTS_FILE, QMAP_FILE}
    assert ctx.model.family == "sd15" and ctx.details["quantized"] == [
        "controlnet.canny",
        "controlnet.scribble",
        "unet",
    ]

    # reloadable with requantize; runs a 2-step pipeline with the quantized UNet and ControlNet
    loaded = open_quantized_pipeline(ctx.out_dir, "sd15")
    out = loaded.task_pipeline("controlnet", "scribble")(
        prompt="a house",
        image=torch.rand(1, 3, 64, 64),
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
    ).images
    assert out.shape == (1, 64, 64, 3)


def test_qfloat8_sdxl_unet_only(make_ctx, tiny_sdxl_artifact):
    scheme = "qfloat8"
    ctx = make_ctx(STAGE, {"weights": scheme, "components": ["unet"]}, inputs={"model": tiny_sdxl_artifact})
    STAGE.run(ctx)
    assert ctx.metrics["unet.sqnr_db"] >= tolerance("unet").min_sqnr_db[scheme]
    assert "controlnet.canny.sqnr_db" not in ctx.metrics
    # reloaded weights reproduce the recorded SQNR against the float model
    ref_unet = open_pipeline(tiny_sdxl_artifact.path, "sdxl").pipe.unet
    q = load_quantized(ctx.out_dir / "unet")
    inputs = unet_inputs(ref_unet.config, "sdxl", latent_size=32)
    with torch.no_grad():
        ref, out = ref_unet(**inputs).sample, q(**inputs).sample
    sqnr = float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))
    assert sqnr == pytest.approx(ctx.metrics["unet.sqnr_db"], abs=0.01)


def test_qint4_and_the_sqnr_gate(make_ctx, tiny_sd15_artifact):
    """qint4 clears the family floor but not a 60 dB one: the gate raises, the numbers are recorded."""
    ctx = make_ctx(
        STAGE,
        {"weights": "qint4", "components": ["unet"], "min_sqnr_db": 60.0},
        inputs={"model": tiny_sd15_artifact},
    )
    with pytest.raises(ParityError, match=r"unet: SQNR .* < 60.0 dB \(qint4\)"):
        STAGE.run(ctx)
    assert ctx.metrics["unet.sqnr_db"] >= tolerance("unet").min_sqnr_db["qint4"]
    assert ctx.metrics["unet.bytes_after"] < 0.3 * ctx.metrics["unet.bytes_before"]
