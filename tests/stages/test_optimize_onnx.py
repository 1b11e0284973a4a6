"""optimize_onnx: CPU fusions that run on the CPU provider and beat the unfused graph; CUDA fusions."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from testkit import run_stage

from sdkiln.runtime.contract.errors import BuildError
from sdkiln.stages.engine.core import InputArtifact


def test_cpu_fusions_are_recorded_and_cpu_only(
    sd15_cpu_optimized: InputArtifact, sd15_onnx: InputArtifact
) -> None:
    from sdkiln.stages.common.onnx.io import load_model
    from sdkiln.stages.optimize_onnx import CUDA_ONLY_OPS

    m = sd15_cpu_optimized.metrics
    fusions = m["fusions"]["unet"]
    assert fusions["MultiHeadAttention"] > 0 and fusions["Attention->MultiHeadAttention"] > 0
    assert fusions["LayerNormalization"] + fusions.get("SkipLayerNormalization", 0) > 0
    nodes = m["nodes"]["unet"]
    assert nodes["after"] < nodes["before"]
    assert (
        nodes["ops_after"]["com.microsoft::MultiHeadAttention"]
        == fusions["MultiHeadAttention"] + fusions["Attention->MultiHeadAttention"]
    )
    model = load_model(sd15_cpu_optimized.path / "unet" / "model.onnx")
    assert not {n.op_type for n in model.graph.node} & set(CUDA_ONLY_OPS)
    # Parity on the CPU provider, every case of the grid (the gate would have raised otherwise).
    assert len(m["parity"]["unet"]["cases"]) == 5
    # Components not selected are carried over byte for byte, and the I/O spec is unchanged.
    te = "text_encoder/model.onnx"
    assert (sd15_cpu_optimized.path / te).read_bytes() == (sd15_onnx.path / te).read_bytes()
    assert sd15_cpu_optimized.components["unet"]["inputs"] == sd15_onnx.components["unet"]["inputs"]
    assert sd15_cpu_optimized.manifest.details["optimized_for"] == "cpu"


def test_cpu_optimized_unet_is_faster(sd15_cpu_optimized: InputArtifact) -> None:
    bench = sd15_cpu_optimized.metrics["benchmark"]["unet"]
    assert bench["shape"] == {"batch": 1, "height": 512, "width": 512}
    assert bench["optimized_ms"] < bench["input_ms"], bench


def test_cuda_target_needs_cuda_or_an_explicit_skip(
    tmp_path: Path, sd15_onnx: InputArtifact, tiny_sd15_artifact: InputArtifact
) -> None:
    import onnxruntime as ort

    from sdkiln.stages.optimize_onnx import STAGE

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA: the gpu-marked test covers the verified path")
    inputs = {"onnx": sd15_onnx, "model": tiny_sd15_artifact}
    params = {"target": "cuda", "components": ["vae_decoder"], "benchmark": None}
    with pytest.raises(BuildError, match="allow_unverified"):
        run_stage(STAGE, params, inputs, tmp_path / "a")
    ctx = run_stage(STAGE, {**params, "allow_unverified": True}, inputs, tmp_path / "b")
    # The full SD fusion set: GroupNorm (CUDA-only) is fused for a CUDA target.
    assert ctx.metrics["fusions"]["vae_decoder"]["GroupNorm"] > 0
    assert ctx.metrics["parity"] == {"skipped": "CUDAExecutionProvider not available"}


@pytest.mark.gpu
def test_cuda_fusions_at_parity_on_cuda(
    tmp_path: Path, sd15_onnx: InputArtifact, tiny_sd15_artifact: InputArtifact
) -> None:
    from sdkiln.stages.optimize_onnx import STAGE

    params = {"target": "cuda", "float16": True, "benchmark": None}
    ctx = run_stage(STAGE, params, {"onnx": sd15_onnx, "model": tiny_sd15_artifact}, tmp_path)
    assert ctx.metrics["fusions"]["unet"]["MultiHeadAttention"] > 0
    assert ctx.components["unet"]["precision"] == "fp16"
    assert ctx.components["vae_decoder"]["precision"] == "fp32"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"target": "cpu", "float16": True}, "float16"),
        ({"target": "cuda"}, "benchmark"),
        ({"target": "cpu", "allow_unverified": True}, "allow_unverified"),
        ({"disable_fusions": ["nhwc_conv"]}, "disable_fusions"),
    ],
)
def test_params_are_validated(params: dict, field: str) -> None:
    from sdkiln.stages.optimize_onnx import OptimizeOnnxParams

    with pytest.raises(ValidationError, match=field):
        OptimizeOnnxParams(**params)
