"""NNCF quantization of an OpenVINO model, three ways (``export_openvino``'s ``quantization``):

- ``weights``: INT8 weight compression (``nncf.compress_weights``, INT8_ASYM): int8 weights, float
  compute; no calibration.
- ``hybrid``: optimum-intel's recipe for diffusion UNets: MatMul and embedding weights compressed to
  INT8 (weight-only), then ``nncf.quantize`` of the rest: convolutions get int8 weights and activations,
  weightless MatMuls (attention) int8 activations; SmoothQuant off.
- ``static``: ``nncf.quantize`` of everything (``ModelType.TRANSFORMER``, MIXED preset: symmetric
  weights, asymmetric activations), calibrated on the recipe's own pipeline runs.

``overflow_fix`` is NNCF's 7-bit weight fix for CPUs without VNNI (their u8 x s8 multiply-add saturates
in 16 bits): ``enable`` there, ``disable`` where VNNI accumulates in 32 bits (measured on the real SD
1.5 UNet with VNNI: static INT8 29.4 dB SQNR vs fp32 without the fix; research notes, FACTS).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

Quantization = Literal["none", "weights", "hybrid", "static"]
OverflowFix = Literal["enable", "disable", "first_layer"]
# Ops whose constant inputs pass through these on the way from a (possibly compressed) Constant.
_DECOMPRESSION = ("Convert", "Reshape", "Transpose", "Subtract", "Multiply", "FakeConvert")


def _quiet() -> Any:
    import nncf

    nncf.set_log_level(logging.ERROR)
    return nncf


def _from_constant(op: Any, port: int) -> bool:
    node = op.input_value(port).get_node()
    for _ in range(6):
        if node.get_type_name() == "Constant":
            return True
        if node.get_type_name() not in _DECOMPRESSION:
            return False
        node = node.input_value(0).get_node()
    return False


def weighted_matmuls(model: Any) -> list[str]:
    """MatMuls with a constant operand and Gathers of a constant table (embeddings), by name."""
    names = []
    for op in model.get_ops():
        kind = op.get_type_name()
        if (
            kind == "MatMul"
            and (_from_constant(op, 0) or _from_constant(op, 1))
            or kind == "Gather"
            and _from_constant(op, 0)
        ):
            names.append(op.get_friendly_name())
    return names


def compress_weights(model: Any, ignore_convolutions: bool = False) -> Any:
    nncf = _quiet()
    kw: dict[str, Any] = {}
    if ignore_convolutions:
        kw["ignored_scope"] = nncf.IgnoredScope(types=["Convolution"])
    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM, **kw)


def quantize_static(
    model: Any,
    data: list[dict[str, Any]],
    overflow_fix: OverflowFix = "disable",
    smooth_quant: bool = True,
    ignored_names: list[str] | None = None,
) -> Any:
    nncf = _quiet()
    adv = nncf.AdvancedQuantizationParameters(overflow_fix=nncf.OverflowFix[overflow_fix.upper()])
    if not smooth_quant:
        adv.smooth_quant_alphas.matmul = -1
    kw: dict[str, Any] = {}
    if ignored_names:
        kw["ignored_scope"] = nncf.IgnoredScope(names=ignored_names, validate=False)
    return nncf.quantize(
        model,
        nncf.Dataset(data),
        preset=nncf.QuantizationPreset.MIXED,
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(data),
        fast_bias_correction=True,
        advanced_parameters=adv,
        **kw,
    )


def quantize(
    model: Any, how: Quantization, data: list[dict[str, Any]] | None, overflow_fix: OverflowFix
) -> Any:
    """``model`` quantized the ``how`` way (``none`` returns it unchanged)."""
    if how == "none":
        return model
    if how == "weights":
        return compress_weights(model)
    if not data:
        raise ValueError(f"{how} quantization needs calibration feeds")
    if how == "hybrid":
        names = weighted_matmuls(model)
        compressed = compress_weights(model, ignore_convolutions=True)
        return quantize_static(compressed, data, overflow_fix, smooth_quant=False, ignored_names=names)
    return quantize_static(model, data, overflow_fix)
