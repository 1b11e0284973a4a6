"""Real-size exports (opt-in: ``-m slow``; minutes and ~10 GB of memory)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from testkit import run_stage

from sdkiln.runtime.contract.floors import tolerance
from sdkiln.stages.engine.core import InputArtifact


@pytest.mark.slow
def test_real_size_sd15_unet_exports_with_external_data(tmp_path: Path) -> None:
    """The SD 1.5 UNet (860M parameters, 3.4 GB fp32) goes over the protobuf limit: one
    ``model.onnx_data`` beside a small ``model.onnx``, loadable by ONNX Runtime, at parity."""
    from sdkiln.stages.common.onnx import components as oc
    from sdkiln.stages.common.onnx.io import EXTERNAL_DATA_FILE, cpu_session
    from sdkiln.stages.common.torch.presets import save_preset
    from sdkiln.stages.export_onnx import STAGE

    src = tmp_path / "sd15"
    art = InputArtifact("sd15", src, save_preset("sd15", src, seed=0))
    params = {"components": ["unet"], "parity": {"batch_sizes": [1, 2], "image_sizes": [64, 128]}}
    ctx = run_stage(STAGE, params, {"model": art}, tmp_path / "export")

    unet_dir = ctx.out_dir / "unet"
    assert sorted(p.name for p in unet_dir.iterdir()) == ["config.json", "model.onnx", EXTERNAL_DATA_FILE]
    assert (unet_dir / EXTERNAL_DATA_FILE).stat().st_size > 2 * 1024**3
    assert (unet_dir / "model.onnx").stat().st_size < 64 * 1024**2
    assert ctx.details["external_data"] == ["unet/model.onnx_data"]
    tol = tolerance("unet")
    worst = ctx.metrics["parity"]["unet"]["worst"]
    assert worst["max_abs"] <= tol.fp32_max_abs and worst["cosine"] >= tol.fp32_min_cosine, worst

    entry = ctx.components["unet"]
    comp = oc.Component("unet", "unet", "unet", "unet", tuple(entry["inputs"]), tuple(entry["outputs"]))
    out = cpu_session(unet_dir / "model.onnx").run(None, oc.make_feeds(comp, oc.bindings(1, 64, 64), seed=5))[
        0
    ]
    assert out.shape == (1, 4, 8, 8) and np.isfinite(out).all()
