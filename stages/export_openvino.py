"""export_openvino: an ONNX artifact -> OpenVINO IR for every component (the ONNX folder layout, one
``model.xml`` + ``model.bin`` per component), optionally INT8 with NNCF, gated by parity with PyTorch.

Recipe steps::

    - id: ov                              # -> openvino/fp32: the exact profile on OpenVINO
      stage: export_openvino
      inputs: {onnx: onnx, model: fused}  # model: the PIPELINE the export came from (the reference)

    - id: ov_int8                         # -> openvino/int8: static INT8 (weights and activations)
      stage: export_openvino
      inputs: {onnx: onnx, model: fused}
      params:
        quantization: static              # or weights (weight-only INT8), hybrid (optimum-intel's recipe)
        quantize: [unet, controlnet, vae_decoder]
        calibration: {prompts: ["a house by a lake"], sketches: [sketches/house.png], steps: 4, size: 512}

Each component is converted from its ONNX graph (so the UNet keeps the ControlNet residual inputs the
ONNX UNet has, and every graph keeps the contract's input and output names). The components listed in
``quantize`` are quantized the ``quantization`` way (see ``common/openvino/quantize.py``); the others
stay fp32. Precision labels come from what the saved IR holds (int8 constants vs fp32), never from the
params. The parity gate compiles each IR the way the runtime does, with ``INFERENCE_PRECISION_HINT``
f32 (OpenVINO would otherwise run bf16 on CPUs that have it), and compares it with the PyTorch
reference at the contract's floor for its precision.

``overflow_fix: auto`` (the default) turns NNCF's 7-bit weight fix on when the building CPU has no VNNI
(its int8 multiply-add saturates); the choice and the CPU flag are part of the step's cache key.
"""

from __future__ import annotations

import gc
import logging
import re
import time
from typing import Any, Literal

from pydantic import Field, model_validator

from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.layout import Kind, openvino_path
from sdkiln.stages.common.onnx.calibration import CalibrationParams, collect_calibration
from sdkiln.stages.common.onnx.parity import ParityParams
from sdkiln.stages.engine.core import Stage, StageContext, StageParams

logger = logging.getLogger(__name__)

BUNDLE_DIRS = {"none": "openvino/fp32", "weights": "openvino/int8-weights", "hybrid": "openvino/hybrid"}
_COMPONENT_NAME = re.compile(
    r"^(text_encoder|text_encoder_2|unet|controlnet|vae_encoder|vae_decoder|taesd_encoder|taesd_decoder)"
    r"(\.[a-z0-9_-]+)?$"
)


class ExportOpenvinoParams(StageParams):
    quantization: Literal["none", "weights", "hybrid", "static"] = "none"
    quantize: list[str] = Field(
        default=["unet", "controlnet"],
        min_length=1,
        description="keys or kinds the quantization applies to (the others stay fp32)",
    )
    components: list[str] | None = Field(default=None, description="convert only these; default: all")
    overflow_fix: Literal["auto", "enable", "disable"] = Field(
        default="auto", description="NNCF's 7-bit weights for CPUs without VNNI; auto: by the building CPU"
    )
    calibration: CalibrationParams | None = None
    below_floor: Literal["fail", "keep_fp32"] = Field(
        default="fail",
        description="a quantized component below its parity floor fails the build, or is replaced by its "
        "fp32 IR (what it measured is recorded in details.openvino.kept_fp32)",
    )
    parity: ParityParams = ParityParams()

    @model_validator(mode="after")
    def _check(self) -> ExportOpenvinoParams:
        for field_name in ("quantize", "components"):
            bad = [c for c in getattr(self, field_name) or [] if not _COMPONENT_NAME.match(c)]
            if bad:
                raise ValueError(f"{field_name}: unknown component names {bad}")
        calibrated = self.quantization in ("hybrid", "static")
        if calibrated and self.calibration is None:
            raise ValueError(
                f"calibration: {self.quantization} quantization needs calibration prompts/sketches"
            )
        if not calibrated and self.calibration is not None:
            raise ValueError("calibration: only hybrid and static quantization are calibrated")
        return self


def _overflow_fix(p: ExportOpenvinoParams) -> str:
    if p.overflow_fix != "auto":
        return p.overflow_fix
    from sdkiln.runtime.machine import has_vnni

    return "disable" if has_vnni() else "enable"


def _key_facts(p: ExportOpenvinoParams) -> dict[str, str]:
    """The building CPU's VNNI decides ``overflow_fix: auto``: it enters the cache key."""
    if p.quantization in ("hybrid", "static") and p.overflow_fix == "auto":
        from sdkiln.runtime.machine import has_vnni

        return {"cpu_vnni": str(has_vnni())}
    return {}


def _check_files(params: ExportOpenvinoParams, recipe_dir: Any) -> list[str]:
    from pathlib import Path

    if params.calibration is None:
        return []
    return [
        f"params.calibration.sketches: {s} not found"
        for s in params.calibration.sketches
        if not (Path(recipe_dir) / s).is_file()
    ]


def run(ctx: StageContext) -> None:
    import openvino as ov

    from sdkiln.stages.common.onnx import components as oc
    from sdkiln.stages.common.onnx.transform import GraphTransform
    from sdkiln.stages.common.openvino import io as oi
    from sdkiln.stages.common.openvino.quantize import quantize

    p: ExportOpenvinoParams = ctx.params
    t = GraphTransform(ctx, p.components, require_fp32=p.quantization != "none")
    quantized = [c for c in t.selected if c in oc.select(t.selected, _known(t.selected, p.quantize))]
    if p.quantization != "none" and not quantized:
        raise UserError(
            f"quantize: none of {p.quantize} is among the converted components {[c.key for c in t.selected]}"
        )
    fix = _overflow_fix(p)
    calib: dict[str, list[dict[str, Any]]] = {}
    if p.quantization in ("hybrid", "static"):
        if t.static:
            raise UserError("calibration runs the pipeline at any shape; quantize a dynamic-shape export")
        with ctx.timed("calibration_s"):
            calib = collect_calibration(
                t.loaded, t.fam, quantized, p.calibration, ctx.recipe_dir, lcm=t.src.model.lcm
            )
        empty = [c.key for c in quantized if not calib.get(c.key)]
        if empty:
            cn = any("controlnet" in k for k in empty)
            hint = " (ControlNets are calibrated on calibration.sketches)" if cn else ""
            raise UserError(f"calibration produced no inputs for {empty}{hint}")
        t._loaded = None  # the reference pipeline is reloaded for the gates: NNCF needs the memory
        gc.collect()

    records: dict[str, Any] = {}

    def convert_one(comp: Any, how: str) -> None:
        t0 = time.perf_counter()
        onnx_model = oi.convert(t.in_path(comp), t.entry(comp)["inputs"], ctx.work_dir / "onnx" / comp.key)
        model = quantize(onnx_model, how, calib.get(comp.key), fix)  # type: ignore[arg-type]
        rel = openvino_path(comp.key)
        files = oi.save(model, ctx.out_dir / rel)
        del model
        gc.collect()
        saved = oi.read(files[0])  # labels and I/O from what was written, not from the model in memory
        expected = {k: t.entry(comp)[k] for k in ("inputs", "outputs")}
        wanted = "int8" if how != "none" else t.entry(comp)["precision"]
        problems = oi.io_mismatches(saved, expected, comp.key)
        t.record(comp, files, problems, oi.weight_precision(saved), wanted, rel)
        records[comp.key] = {
            "quantization": how,
            "ops": {k: v for k, v in oi.op_histogram(saved).items() if k in _REPORTED_OPS},
            "seconds": round(time.perf_counter() - t0, 3),
            **({"calibration_samples": len(calib[comp.key])} if how != "none" and comp.key in calib else {}),
        }

    def gate(comp: Any) -> list[str]:
        sess = oi.Session(ctx.out_dir / openvino_path(comp.key))
        return t.check_parity(comp, p.parity, session=sess)

    for comp in ctx.progress(t.selected, "convert", total=len(t.selected)):
        convert_one(comp, p.quantization if comp in quantized else "none")
    kept: dict[str, Any] = {}
    for comp in t.selected:
        failures = gate(comp)
        if failures and comp in quantized and p.below_floor == "keep_fp32":
            kept[comp.key] = {"quantization": p.quantization, **t.below_floor(comp, failures)}
            logger.warning(
                "%s: %s is below its floor in %s INT8; keeping fp32", ctx.step_id, comp.key, p.quantization
            )
            convert_one(comp, "none")
            gate(comp)
    dropped = [c.key for c in t.planned if c not in t.selected]
    t.finish(
        f"export_openvino ({p.quantization})",
        details={
            "openvino": {
                "version": ov.get_version(),
                "quantization": p.quantization,
                "quantized": [c.key for c in quantized],
                "overflow_fix": fix if p.quantization in ("hybrid", "static") else None,
                "parity_inference_precision": "f32",
                "components": records,
                "kept_fp32": kept,
                **({"not_converted": dropped} if dropped else {}),
            }
        },
    )


# Op types worth showing in the manifest: what runs the compute and whether it is quantized.
_REPORTED_OPS = ("Convolution", "MatMul", "FakeQuantize", "Convert", "Gather", "GroupConvolution")


def _known(comps: list[Any], wanted: list[str]) -> list[str]:
    """``wanted`` keys/kinds that exist among ``comps`` (``controlnet`` on a section with none is fine)."""
    have = {c.key for c in comps} | {c.kind for c in comps}
    return [w for w in wanted if w in have]


STAGE = Stage(
    name="export_openvino",
    version="1",
    inputs={"onnx": (Kind.ONNX,), "model": (Kind.PIPELINE,)},
    output_kind=Kind.OPENVINO,
    params=ExportOpenvinoParams,
    run=run,
    description="OpenVINO IR for every component (optionally NNCF INT8), parity-gated against PyTorch",
    env_packages=("torch", "diffusers", "onnx", "openvino", "nncf"),
    bundle_dir=lambda p: BUNDLE_DIRS.get(p.quantization, "openvino/int8"),
    check=_check_files,
    key_facts=_key_facts,
)
