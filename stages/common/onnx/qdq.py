"""Explicit INT8 / FP8 quantization of TensorRT-ready graphs: symmetric Q/DQ pairs, calibrated on the
recipe's own pipeline runs.

TensorRT 11 builds only strongly typed networks (its INT8/FP8 builder flags and calibrators are gone;
TensorRT 10 deprecated them), so low precision has to be written into the graph: a QuantizeLinear /
DequantizeLinear pair in front of each quantized operator's activation and weight, with zero points 0
(TensorRT's only mode) and per-output-channel weight scales. The operators TensorRT then fuses into INT8
or FP8 kernels are convolutions and matrix products with constant weights (``MatMulConstBOnly``: the
attention products Q·Kᵀ and attn·V stay in fp16, where their softmax range lives), except the timestep
embeddings and the first and last convolutions (``KEEP_FLOAT``): on the tiny test UNet that exclusion
took INT8 from 17.9 to 25.9 dB SQNR against fp32, at no cost in quantized compute worth having.

The graph is quantized in fp32 (ONNX Runtime's static quantizer, calibration ranges from the feeds the
reference pipeline really gave each component), then everything that is still float becomes fp16 with
fp32 graph I/O, exactly like the fp16 TensorRT-ready graphs. The result runs in ONNX Runtime's CPU
provider too, which is how its accuracy is checked here without a GPU.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

LowPrecision = Literal["int8", "fp8"]
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
# Left in fp16: the timestep/added-conditioning embeddings (Gemms on one vector per image: no compute to
# save, and their error reaches every block) and the first and last convolutions (image in, noise out).
KEEP_FLOAT = ("time_embedding", "time_emb_proj", "add_embedding", "conv_in/", "conv_out/", "cond_embedding")


class _Reader:
    """An onnxruntime CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict[str, Any]]):
        self._feeds = feeds
        self._it = iter(feeds)

    def get_next(self) -> dict[str, Any] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def quantize_for_tensorrt(
    src: Path, dst: Path, precision: LowPrecision, calib: list[dict[str, Any]], fp16: bool = True
) -> list[Path]:
    """Write a Q/DQ-quantized copy of the fp32 graph ``src`` to ``dst``; returns the files written."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from sdkiln.runtime.contract.errors import UserError
    from sdkiln.stages.common.onnx import io as ou

    if not calib:
        raise UserError(f"{src}: no calibration feeds for {precision} quantization")
    work = dst.parent / ".quant"
    work.mkdir(parents=True, exist_ok=True)
    big = (src.parent / ou.EXTERNAL_DATA_FILE).is_file()
    pre = work / "pre.onnx"
    quant_pre_process(
        str(src),
        str(pre),
        skip_symbolic_shape=True,
        save_as_external_data=big,
        all_tensors_to_one_file=True,
        external_data_location="pre.onnx_data" if big else None,
    )
    qtype = QuantType.QInt8 if precision == "int8" else QuantType.QFLOAT8E4M3FN
    graph = ou.load_model(pre, with_data=False).graph
    keep = [n.name for n in graph.node if n.op_type in QUANTIZED_OPS and any(k in n.name for k in KEEP_FLOAT)]
    out = work / "quantized.onnx"
    quantize_static(
        str(pre),
        str(out),
        _Reader(calib),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTIZED_OPS),
        nodes_to_exclude=keep,
        per_channel=True,
        activation_type=qtype,
        weight_type=qtype,
        use_external_data_format=big,
        # FP8 scales come from the activation distribution (ORT's only FP8 method); INT8 from min/max.
        calibrate_method=CalibrationMethod.Distribution if precision == "fp8" else CalibrationMethod.MinMax,
        extra_options={
            "ActivationSymmetric": True,  # TensorRT takes zero points of 0 only
            "WeightSymmetric": True,
            "MatMulConstBOnly": True,
            "DedicatedQDQPair": True,  # one Q/DQ pair per consumer: TensorRT fuses each with its op
            "QuantizeBias": False,  # TensorRT adds biases in float after the quantized product
        },
    )
    model = _opset_19(out) if fp16 else ou.load_model(out)
    del model.graph.value_info[:]
    if fp16:
        # Scales become fp16 too, so each DequantizeLinear feeds its operator in fp16 directly (a Cast
        # between them would stop TensorRT from fusing the pair into a low-precision kernel).
        model = ou.to_fp16(model, op_block_list=[])
    files = ou.save_model(model, dst, "auto", restore=False)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return files


def _opset_19(path: Path) -> Any:
    """The graph at opset 19 or newer, where Q/DQ take fp16 scales (opset 17's take only fp32).

    The version converter sees the structure only (weights stay external while it runs, so graphs past
    protobuf's 2 GB limit convert too); the weights are loaded back afterwards.
    """
    import onnx
    from onnx import version_converter

    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 19:
        model = version_converter.convert_version(model, 19)
    onnx.load_external_data_for_model(model, str(path.parent))
    return model


def qdq_summary(path: Path) -> dict[str, Any]:
    """What a quantized graph holds: Q/DQ counts, quantized operators, and whether every zero point is 0."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    q = [n for n in g.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
    produced_by_dq = {o for n in dq for o in n.output}
    feeds_op = {i for n in g.node if n.op_type in QUANTIZED_OPS for i in n.input}
    # A Cast between a DequantizeLinear and its operator hides the pair from TensorRT's fusion.
    casts = [
        n.name
        for n in g.node
        if n.op_type == "Cast" and any(i in produced_by_dq for i in n.input) and n.output[0] in feeds_op
    ]
    quantized = sorted(
        n.name or n.op_type
        for n in g.node
        if n.op_type in QUANTIZED_OPS and any(i in produced_by_dq for i in n.input)
    )
    nonzero = []
    types = set()
    for n in q + dq:
        if len(n.input) > 2 and n.input[2] in inits:
            t = inits[n.input[2]]
            types.add(onnx.TensorProto.DataType.Name(t.data_type))
            arr = numpy_helper.to_array(t)
            if np.asarray(arr, dtype=np.float32).any():
                nonzero.append(n.name)
    return {
        "quantize_linear": len(q),
        "dequantize_linear": len(dq),
        "quantized_ops": len(quantized),
        "zero_point_types": sorted(types),
        "nonzero_zero_points": nonzero,
        "casts_after_dequantize": casts,
    }
