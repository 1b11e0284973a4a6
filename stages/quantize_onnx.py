"""quantize_onnx: INT8 ONNX graphs for the CPU, dynamic or static (QDQ), gated by SQNR against PyTorch.

Recipe steps::

    - id: onnx_int8                       # weights int8, activations quantized on the fly
      stage: quantize_onnx
      inputs: {onnx: onnx, model: fused}  # model: the PIPELINE the export came from
      params: {mode: dynamic}

    - id: onnx_int8_static                # QDQ with activation ranges calibrated on the recipe's prompts
      stage: quantize_onnx
      inputs: {onnx: onnx, model: fused}
      params:
        mode: static
        op_types: [MatMul, Gemm, Conv]
        calibration: {prompts: ["a house by a lake"], sketches: [sketches/house.png], steps: 2, size: 512}

Static calibration runs the reference denoising loop in PyTorch (diffusers) over the prompts (text to
image) and the sketches (ControlNet), and records what the text encoders, UNet, ControlNets and VAEs
actually receive, so activation ranges are those of the model at work rather than of random noise.

Defaults, and why: every op type with weights is quantized (``Conv`` included), because INT8 here is
first a size target (<= 0.3x the fp32 bytes); ``ConvInteger`` is slow in ONNX Runtime's CPU provider,
so for speed quantize ``[MatMul, Gemm]`` only (or use static QDQ, whose int8 convolutions are fast).
The VAE decoder stays fp32 by default: it is the most quantization-sensitive graph (its output is the
image) and its weights are a small share of the total. A graph that int8 does not make at least 2x smaller
(TAESD: a few thousand weights, mostly graph) keeps its fp32 graph, and the manifest says why.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from sdkiln.runtime.contract.errors import BuildError, UserError
from sdkiln.runtime.contract.layout import Kind
from sdkiln.stages.common.onnx.calibration import CalibrationParams, collect_calibration
from sdkiln.stages.common.onnx.parity import ParityParams
from sdkiln.stages.engine.core import Stage, StageContext, StageParams

logger = logging.getLogger(__name__)

OpType = Literal["MatMul", "Gemm", "Conv", "Gather"]
DEFAULT_COMPONENTS = ["text_encoder", "text_encoder_2", "unet", "controlnet", "vae_encoder"]


class QuantizeOnnxParams(StageParams):
    mode: Literal["dynamic", "static"] = "dynamic"
    op_types: list[OpType] = Field(default=["MatMul", "Gemm", "Conv", "Gather"], min_length=1)
    components: list[str] | None = Field(
        default=None,
        description="keys or kinds to quantize; default: text encoders, unet, controlnets, vae_encoder",
    )
    per_channel: bool = Field(default=False, description="per-output-channel weight scales")
    reduce_range: bool | Literal["auto"] = Field(
        default=False,
        description="7-bit weights, for CPUs without VNNI (their u8 x s8 multiply-add saturates in 16 bits); "
        "auto: when the building CPU has no VNNI",
    )
    activation_type: Literal["uint8", "int8", "uint16"] = Field(
        default="uint8", description="static: activation type (uint16 = A16W8 via QDQ contrib ops)"
    )
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    calibration: CalibrationParams | None = None
    exclude_nodes: list[str] = Field(default=[], description="node-name substrings left in float")
    compact_names: bool = Field(
        default=True, description="short names for intermediate tensors (graph I/O and weights keep theirs)"
    )
    keep_fp32_above: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="keep a graph fp32 when int8 shrinks it less than this (int8/fp32 bytes)",
    )
    below_floor: Literal["fail", "keep_fp32"] = Field(
        default="fail",
        description="a component below its int8 parity floor fails the build, or keeps its fp32 graph "
        "(what the int8 graph measured is recorded in details.quantization.below_floor)",
    )
    require_int8: bool = Field(
        default=False,
        description="fail the build when int8 components hold less than half the section's bytes "
        "(otherwise a warning in the log and the manifest)",
    )
    parity: ParityParams = ParityParams()

    @model_validator(mode="after")
    def _check(self) -> QuantizeOnnxParams:
        if self.mode == "static" and self.calibration is None:
            raise ValueError("calibration: static quantization needs calibration prompts/sketches")
        if self.mode == "dynamic" and self.calibration is not None:
            raise ValueError("calibration: only static quantization is calibrated (mode: static)")
        if self.mode == "dynamic" and self.activation_type != "uint8":
            raise ValueError("activation_type: dynamic quantization always uses uint8 activations")
        return self


def _reduce_range(p: QuantizeOnnxParams) -> bool:
    if p.reduce_range != "auto":
        return bool(p.reduce_range)
    from sdkiln.runtime.machine import has_vnni

    return not has_vnni()


def _key_facts(p: QuantizeOnnxParams) -> dict[str, str]:
    """``reduce_range: auto`` follows the building CPU's VNNI: it enters the cache key."""
    if p.reduce_range == "auto":
        from sdkiln.runtime.machine import has_vnni

        return {"cpu_vnni": str(has_vnni())}
    return {}


def _readable(src: Path, work: Path) -> Path:
    """``src``, or a private copy when its external data has several hard links (a bundle links the
    cache's files): onnx >= 1.21 refuses to read such data ("potential hardlink attack")."""
    import shutil

    from sdkiln.stages.common.onnx import io as ou

    files = ou.model_files(src)
    if all(f.stat().st_nlink == 1 for f in files[1:]):
        return src
    work.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, work / f.name)
    return work / src.name


def _check_files(params: QuantizeOnnxParams, recipe_dir: Path) -> list[str]:
    if params.calibration is None:
        return []
    return [
        f"params.calibration.sketches: {s} not found"
        for s in params.calibration.sketches
        if not (Path(recipe_dir) / s).is_file()
    ]


# --------------------------------------------------------------------------------------------------
# Quantization


class _QuantizerChatter(logging.Filter):
    """Drops the INFO lines onnxruntime's quantizer writes to the root logger (one per tensor it leaves
    alone: thousands on a UNet); its warnings and errors still pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or "onnxruntime" not in record.pathname


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    root = logging.getLogger()
    f = _QuantizerChatter()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


class _Reader:
    """An onnxruntime CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict[str, Any]]):
        self._feeds = feeds
        self._it = iter(feeds)

    def get_next(self) -> dict[str, Any] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def quantize_graph(src: Path, dst: Path, p: QuantizeOnnxParams, calib: list[dict[str, Any]] | None) -> Any:
    """Pre-process (ORT's recommended shape inference + basic graph cleanup), quantize, and return the
    quantized ModelProto (value_info stripped; intermediate names compacted if asked)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from sdkiln.stages.common.onnx import io as ou

    dst.parent.mkdir(parents=True, exist_ok=True)
    big = (src.parent / ou.EXTERNAL_DATA_FILE).is_file()
    src = _readable(src, dst.parent / "src")
    pre = dst.parent / "pre.onnx"
    # Symbolic shape inference is skipped: ORT's optimizer already folds the shapes it needs, and the
    # sympy pass costs minutes on a real UNet.
    quant_pre_process(
        str(src),
        str(pre),
        skip_symbolic_shape=True,
        save_as_external_data=big,
        all_tensors_to_one_file=True,
        external_data_location="pre.onnx_data" if big else None,
    )
    model = ou.load_model(pre)
    for name in p.exclude_nodes:
        if not any(name in n.name for n in model.graph.node):
            raise UserError(f"exclude_nodes: no node name contains {name!r}")
    excluded = sorted({n.name for n in model.graph.node for s in p.exclude_nodes if s in n.name})
    del model
    extra: dict[str, Any] = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    out = dst.parent / "quantized.onnx"
    with _quiet_quantizer():
        if p.mode == "dynamic":
            quantize_dynamic(
                str(pre),
                str(out),
                op_types_to_quantize=list(p.op_types),
                per_channel=p.per_channel,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=excluded,
                use_external_data_format=big,
                reduce_range=_reduce_range(p),
                extra_options=extra,
            )
        else:
            extra["MatMulConstBOnly"] = True  # Q·K^T and attn·V stay float: both inputs are activations
            act = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8, "uint16": QuantType.QUInt16}[
                p.activation_type
            ]
            if p.activation_type == "uint16":
                extra["UseQDQContribOps"] = True
            method = {
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }[p.calibration_method]
            cache = None
            if p.calibration_method == "minmax":
                # The same ranges as ORT's MinMax calibrator, without its memory (common/onnx/ranges.py).
                from sdkiln.stages.common.onnx.ranges import minmax_cache

                cache = minmax_cache(pre, calib or [], list(p.op_types))
            quantize_static(
                str(pre),
                str(out),
                None if cache else _Reader(calib or []),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(p.op_types),
                per_channel=p.per_channel,
                reduce_range=_reduce_range(p),
                activation_type=act,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=excluded,
                use_external_data_format=big,
                calibrate_method=method,
                extra_options=extra,
                calibration_cache_path=str(cache) if cache else None,
            )
    model = ou.load_model(out)
    del model.graph.value_info[:]  # shape annotations the quantizer leaves; ORT infers its own
    if p.compact_names:
        ou.compact_names(model)
    return model


def run(ctx: StageContext) -> None:
    from sdkiln.stages.common.onnx import io as ou
    from sdkiln.stages.common.onnx.transform import GraphTransform

    p: QuantizeOnnxParams = ctx.params
    t = GraphTransform(ctx, p.components, default=tuple(DEFAULT_COMPONENTS), require_fp32=True)
    if t.static and p.mode == "static":
        raise UserError(
            "static quantization calibrates on pipeline runs of any shape; quantize a dynamic-shape export"
        )
    calib: dict[str, list[dict[str, Any]]] = {}
    if p.mode == "static":
        with ctx.timed("calibration_s"):
            calib = collect_calibration(
                t.loaded, t.fam, t.selected, p.calibration, ctx.recipe_dir, lcm=t.src.model.lcm
            )
        empty = [c.key for c in t.selected if not calib.get(c.key)]
        if empty:
            hint = (
                " (ControlNets are calibrated on calibration.sketches)"
                if any("controlnet" in k for k in empty)
                else ""
            )
            raise UserError(f"calibration produced no inputs for {empty}{hint}")
        t._loaded = None  # freed while quantizing (real-size UNets need the memory); the gates reload it
        import gc

        gc.collect()

    sizes: dict[str, Any] = {}
    kept: dict[str, str] = {}
    below: dict[str, Any] = {}
    for comp in t.planned:
        if comp not in t.selected:
            t.copy(comp)
            continue
        in_path = t.in_path(comp)
        fp32_bytes = ou.files_bytes(ou.model_files(in_path))
        t0 = time.perf_counter()
        model = quantize_graph(in_path, ctx.work_dir / comp.folder, p, calib.get(comp.key))
        files = t.save(comp, model, wanted="int8")
        del model
        q_bytes = ou.files_bytes(files)
        if q_bytes > p.keep_fp32_above * fp32_bytes:
            # Too few weights for int8 to pay for its scales and extra nodes (TAESD): ship the fp32 graph.
            for f in files:
                f.unlink()
            t.copy(comp)
            kept[comp.key] = (
                f"int8 would be {q_bytes / fp32_bytes:.2f}x the fp32 bytes (> {p.keep_fp32_above})"
            )
            t.warnings.append(f"{comp.key}: kept fp32 ({kept[comp.key]})")
            continue
        sizes[comp.key] = {
            "fp32_bytes": fp32_bytes,
            "int8_bytes": q_bytes,
            "ratio": round(q_bytes / fp32_bytes, 4),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if p.mode == "static":
            sizes[comp.key]["calibration_samples"] = len(calib[comp.key])
        failures = t.check_parity(comp, p.parity)
        if failures and p.below_floor == "keep_fp32":
            below[comp.key] = {**t.below_floor(comp, failures), **sizes.pop(comp.key)}
            for f in files:
                f.unlink()
            t.copy(comp)
            t.check_parity(comp, p.parity)
            kept[comp.key] = f"below its int8 floor ({'; '.join(failures[:2])})"
            t.warnings.append(f"{comp.key}: kept fp32 ({kept[comp.key]})")

    # The whole section: every graph, quantized or not, against the fp32 graphs it came from.
    total_in = ou.files_bytes(f for c in t.planned for f in ou.model_files(t.in_path(c)))
    total_out = sum(t.bytes.values())
    int8 = sorted(k for k, v in ctx.components.items() if v["precision"] == "int8")
    ctx.metrics.update(
        {
            "sizes": sizes,
            "fp32_bytes": total_in,
            "size_ratio": round(total_out / total_in, 4) if total_in else None,
            "int8_components": int8,
            "sqnr_db": {k: v["worst"].get("sqnr_db") for k, v in t.report.metrics().items()},
        }
    )
    int8_share = sum(t.bytes[k] for k in int8) / total_out if total_out else 0.0
    if not int8 or int8_share < 0.5:
        msg = (
            f"the section is mostly not int8: int8 components {int8 or 'none'} hold {int8_share:.0%} of its "
            f"bytes ({', '.join(f'{k}: {v}' for k, v in sorted(kept.items())) or 'nothing was kept fp32'})"
        )
        if p.require_int8:
            raise BuildError(f"{ctx.step_id}: {msg}; require_int8 is set")
        t.warnings.append(msg)
        logger.warning("%s: %s", ctx.step_id, msg)
    t.finish(
        f"quantize_onnx ({p.mode})",
        details={
            "quantization": {
                "mode": p.mode,
                "op_types": list(p.op_types),
                "per_channel": p.per_channel,
                "reduce_range": _reduce_range(p),
                "weight_type": "int8 (7-bit range)" if _reduce_range(p) else "int8",
                "activation_type": p.activation_type if p.mode == "static" else "uint8 (dynamic)",
                "format": "QDQ" if p.mode == "static" else "integer ops",
                "kept_fp32": kept,
                "below_floor": below,
            }
        },
    )


STAGE = Stage(
    name="quantize_onnx",
    version="1",
    inputs={"onnx": (Kind.ONNX,), "model": (Kind.PIPELINE,)},
    output_kind=Kind.ONNX,
    params=QuantizeOnnxParams,
    run=run,
    description="INT8 for the CPU: dynamic or static QDQ (calibrated on the recipe's prompts/sketches)",
    env_packages=("torch", "diffusers", "onnx", "onnxruntime"),
    bundle_dir=lambda p: "onnx/int8" if p.mode == "dynamic" else "onnx/int8-static",
    check=_check_files,
    key_facts=_key_facts,
)
