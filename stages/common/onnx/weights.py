"""Weight fidelity: a lossy graph's weights against the fp32 graph they were made from.

Output floors cannot see everything: on the tiny UNet an fp16 graph measures 56.6 dB SQNR whether or not
one of its layers is 2 % off (56.5 dB), because fp16 rounding of the activations dominates; an INT8
graph with one weight scale off by 2x still measures 29.8 dB against a correct 31.5 dB. The weights
themselves tell: an fp16 weight must be its fp32 source rounded (relative RMS error <= 2^-11), an INT8
weight dequantized (``(q - zero_point) * scale``) must be its source within the quantization step.

``weight_drift(candidate, source)`` compares every fp16 or quantized initializer of ``candidate`` with
the same-named fp32 initializer of ``source`` (names survive fp16 conversion and ORT quantization:
``W`` -> ``W`` or ``W_quantized`` + ``W_scale`` + ``W_zero_point``; a Gemm weight becomes
``W_Transposed_quantized``) and returns the relative RMS error
of each, plus how much of the candidate's lossy weights it could match (``coverage``). External data is
read tensor by tensor (memory-mapped), so a real-size UNet never sits in memory twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Relative RMS error a correct weight stays under, by storage: fp16 rounding is <= 2^-11 per element
# (RMS ~2.8e-4 measured on the tiny UNet); symmetric per-tensor int8 of Gaussian-like weights measured
# 0.6-2.7 % of the tensor's RMS on the tiny UNet (7-bit reduce_range doubles it). A layer 1 % off gives
# 1e-2 (fp16 fails), a scale 2x off gives ~1.0 (int8 fails).
MAX_REL_RMS = {"fp16": 2e-3, "int8": 0.1}


@dataclass
class Drift:
    """Per-weight relative RMS error against the source, and what could not be matched."""

    errors: dict[str, tuple[str, float]] = field(default_factory=dict)  # name -> (storage, rel RMS)
    matched: int = 0  # lossy weight elements compared
    lossy: int = 0  # lossy weight elements in the candidate
    unmatched: list[str] = field(default_factory=list)  # lossy weights with no fp32 source of that name

    @property
    def coverage(self) -> float:
        return self.matched / self.lossy if self.lossy else 1.0

    def failures(self, limits: dict[str, float] | None = None) -> list[str]:
        limits = limits or MAX_REL_RMS
        bad = [
            (name, kind, err)
            for name, (kind, err) in self.errors.items()
            if not err <= limits[kind]  # NaN fails
        ]
        return [
            f"weight {name} ({kind}) is {err:.3g} (relative RMS) from its fp32 source, over {limits[kind]:g}"
            for name, kind, err in sorted(bad, key=lambda b: -b[2] if math.isfinite(b[2]) else -math.inf)
        ]

    def worst(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind, err in self.errors.values():
            out[kind] = max(out.get(kind, 0.0), err)
        return out


def _initializers(path: Path) -> tuple[Any, dict[str, Any]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return model, {t.name: t for t in model.graph.initializer}


def _array(t: Any, base: Path) -> np.ndarray:
    """One initializer as numpy, reading external data from its file at its offset (memory-mapped)."""
    import onnx
    from onnx import numpy_helper

    if t.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    info = {e.key: e.value for e in t.external_data}
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    count = int(np.prod(t.dims)) if t.dims else 1
    mm = np.memmap(base / info["location"], dtype=np.uint8, mode="r")
    offset = int(info.get("offset", 0))
    raw = mm[offset : offset + count * np.dtype(dtype).itemsize]
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(t.dims))


def _dq_axes(model: Any) -> dict[str, int]:
    axes = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            axes[node.input[0]] = axis
    return axes


def _dequantize(q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int | None) -> np.ndarray:
    qf = q.astype(np.float32)
    zpf = np.zeros_like(scale, dtype=np.float32) if zp is None else zp.astype(np.float32)
    if scale.size == 1:
        return (qf - zpf.reshape(())) * scale.astype(np.float32).reshape(())
    shape = [1] * q.ndim
    shape[axis if axis is not None else 0] = scale.size
    return (qf - zpf.reshape(shape)) * scale.astype(np.float32).reshape(shape)


def _rel_rms(candidate: np.ndarray, source: np.ndarray) -> float:
    c = candidate.astype(np.float64).ravel()
    s = source.astype(np.float64).ravel()
    denom = float(np.sqrt(np.mean(s * s)))
    if not np.all(np.isfinite(c)):
        return float("nan")
    if denom == 0.0:
        return 0.0 if not np.any(c) else float("inf")
    return float(np.sqrt(np.mean((c - s) ** 2)) / denom)


def weight_drift(candidate: Path, source: Path, min_elements: int = 64) -> Drift:
    """Compare ``candidate``'s fp16 and quantized weights with ``source``'s fp32 ones (see module doc).
    Tensors under ``min_elements`` (biases, norms, shapes) are left out."""
    cand_model, cand = _initializers(candidate)
    _, src = _initializers(source)
    cbase, sbase = Path(candidate).parent, Path(source).parent
    axes = _dq_axes(cand_model)
    drift = Drift()
    import onnx

    fp32 = onnx.TensorProto.FLOAT
    for name, t in cand.items():
        n = int(np.prod(t.dims)) if t.dims else 1
        if n < min_elements:
            continue
        if t.data_type == onnx.TensorProto.FLOAT16:
            drift.lossy += n
            s = src.get(name)
            if s is None or s.data_type != fp32 or list(s.dims) != list(t.dims):
                drift.unmatched.append(name)
                continue
            drift.errors[name] = ("fp16", _rel_rms(_array(t, cbase), _array(s, sbase)))
            drift.matched += n
        elif t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and name.endswith("_quantized"):
            drift.lossy += n
            base = name.removesuffix("_quantized")
            # ORT turns Gemm(transB) weights into MatMul ones: W_Transposed is W.T
            transposed = base.endswith("_Transposed") and base not in src
            s, sc = (
                src.get(base.removesuffix("_Transposed") if transposed else base),
                cand.get(f"{base}_scale"),
            )
            dims = list(reversed(s.dims)) if transposed and s is not None else (list(s.dims) if s else None)
            if s is None or sc is None or s.data_type != fp32 or dims != list(t.dims):
                drift.unmatched.append(name)
                continue
            zp_t = cand.get(f"{base}_zero_point")
            q, scale = _array(t, cbase), _array(sc, cbase)
            zp = _array(zp_t, cbase) if zp_t is not None else None
            ref = _array(s, sbase).T if transposed else _array(s, sbase)
            if scale.size == 1 or name in axes:
                err = _rel_rms(_dequantize(q, scale, zp, axes.get(name)), ref)
            else:  # per-channel without a DequantizeLinear (dynamic quantization): the axis of that size
                err = min(
                    (
                        _rel_rms(_dequantize(q, scale, zp, ax), ref)
                        for ax, d in enumerate(q.shape)
                        if d == scale.size
                    ),
                    default=float("inf"),
                )
            drift.errors[name] = ("int8", err)
            drift.matched += n
    return drift
