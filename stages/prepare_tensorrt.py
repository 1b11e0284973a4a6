"""prepare_tensorrt: the ONNX graphs a TensorRT builder should consume, plus their shape profiles.

Recipe step::

    - id: trt_onnx
      stage: prepare_tensorrt
      inputs: {onnx: onnx, model: fused}    # onnx: an export_onnx artifact (standard ops only)
      params:
        precision: fp16                     # weights and compute fp16, graph I/O fp32
        vae_precision: fp32                 # SD VAEs overflow in fp16 unless fp16-fixed
        batch: [1, 1, 4]                    # min, opt, max images per prompt
        height: [256, 512, 768]
        width: [256, 512, 768]
        cfg: true                           # text encoder/UNet/ControlNet run cond + uncond together

Per graph: constant folding and redundant-node removal with ONNX Runtime's *basic* optimization level
(provider-independent rewrites that emit only standard ONNX ops; fast even on a real UNet, where the
onnxscript optimizer takes minutes), opset imports trimmed to the domains actually used, fp16 where
wanted, then ONNX shape inference (with data propagation) on the saved file, which also works past the
2 GB protobuf limit. A graph that still holds non-standard ops (e.g. an ``optimize_onnx`` output) is
refused: TensorRT's ONNX parser cannot read ORT contrib ops. Optional inputs (the UNet's ControlNet
residuals, which ``export_onnx`` gives zero defaults) become required inputs with the contract's shapes
again: TensorRT's parser takes an input that has an initializer for a constant weight, which would bake
"no ControlNet" into the engine; the TensorRT runtime feeds zero residuals itself.

The min/opt/max shape of every graph input goes into the manifest (``extra.profiles``), ready for
``IOptimizationProfile.set_shape``. The engine build itself is a separate stage.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field, model_validator

from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.layout import Kind
from sdkiln.stages.common.onnx.parity import ParityParams
from sdkiln.stages.engine.core import Stage, StageContext, StageParams

logger = logging.getLogger(__name__)

# Graphs that see the classifier-free-guidance batch (cond + uncond in one run).
CFG_KINDS = ("text_encoder", "text_encoder_2", "unet", "controlnet")


class PrepareTensorrtParams(StageParams):
    precision: Literal["fp32", "fp16"] = "fp16"
    vae_precision: Literal["fp32", "fp16"] = "fp32"
    components: list[str] | None = Field(default=None, description="keys or kinds to prepare; default: all")
    batch: list[int] = Field(default=[1, 1, 4], min_length=3, max_length=3, description="min, opt, max")
    height: list[int] = Field(default=[256, 512, 768], min_length=3, max_length=3)
    width: list[int] = Field(default=[256, 512, 768], min_length=3, max_length=3)
    cfg: bool = Field(default=True, description="double the batch of text encoders, UNet and ControlNets")
    parity: ParityParams = ParityParams()

    @model_validator(mode="after")
    def _check(self) -> PrepareTensorrtParams:
        for name in ("batch", "height", "width"):
            v = getattr(self, name)
            if not v[0] <= v[1] <= v[2]:
                raise ValueError(f"{name}: needs min <= opt <= max (got {v})")
            if v[0] < 1:
                raise ValueError(f"{name}: must be >= 1 (got {v})")
        for name in ("height", "width"):
            bad = [x for x in getattr(self, name) if x % 8]
            if bad:
                raise ValueError(f"{name}: sizes must be multiples of 8 (got {bad})")
        if self.precision == "fp32" and self.vae_precision == "fp16":
            raise ValueError("vae_precision: fp16 applies only with precision: fp16")
        return self


def profiles(
    comp: Any, p: PrepareTensorrtParams, vae_scale_factor: int, static: dict[str, int] | None
) -> dict:
    """min/opt/max shape of each graph input of ``comp``: ``{input: {"min": [...], "opt": [...], "max": [...]}}``.
    A static graph's profile is its one fixed shape."""
    from sdkiln.runtime.contract.specs import resolve_shape
    from sdkiln.stages.common.onnx import components as oc

    factor = 2 if p.cfg and comp.kind in CFG_KINDS else 1
    out: dict[str, dict[str, list[int]]] = {}
    for t in comp.inputs:
        shapes = {}
        for i, level in enumerate(("min", "opt", "max")):
            if static:
                axes = static
            else:
                batch = p.batch[i] if level == "min" else p.batch[i] * factor
                axes = oc.bindings(batch, p.height[i], p.width[i], vae_scale_factor)
            shapes[level] = resolve_shape(t["shape"], axes)
        out[t["name"]] = shapes
    return out


def prepare_graph(
    src: Any, work: Any, fp16: bool, contract_inputs: list[dict[str, Any]] | None = None
) -> Any:
    """Constant-fold with ORT's basic level (standard ops only), trim opset imports, make optional inputs
    required again (with ``contract_inputs``' shapes), fp16 if asked."""
    import onnxruntime as ort

    from sdkiln.stages.common.onnx import defaults as od
    from sdkiln.stages.common.onnx import io as ou

    work.mkdir(parents=True, exist_ok=True)
    folded = work / "folded.onnx"
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(folded)
    if (src.parent / ou.EXTERNAL_DATA_FILE).is_file():
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "folded.onnx_data"
        )
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    model = ou.load_model(folded)
    custom = ou.custom_domain_ops(model)
    if custom:
        raise UserError(
            f"{src}: non-standard ops {custom} (TensorRT cannot parse them); prepare_tensorrt needs an "
            "export_onnx output, not an optimize_onnx one"
        )
    used = {n.domain or "" for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if (o.domain or "") in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    if od.default_values(model):
        if contract_inputs is None:
            raise UserError(f"{src}: optional graph inputs and no contract spec to make them required")
        od.strip_defaults(model, contract_inputs)
    if fp16:
        model = ou.to_fp16(model)
    return model


def run(ctx: StageContext) -> None:
    import onnx

    from sdkiln.stages.common.onnx import components as oc
    from sdkiln.stages.common.onnx import io as ou
    from sdkiln.stages.common.onnx.transform import GraphTransform
    from sdkiln.stages.common.torch.pipeline import read_configs

    p: PrepareTensorrtParams = ctx.params
    t = GraphTransform(ctx, p.components, require_fp32=True)
    if t.static is None:
        unet_cfg = read_configs(t.ref.path)["unet"]
        oc.check_sizes(t.fam, unet_cfg, sorted({*p.height, *p.width}), "height/width")
    profs: dict[str, Any] = {}
    nodes: dict[str, Any] = {}
    for comp in t.selected:
        in_path, out_path = t.in_path(comp), t.out_path(comp)
        prec = oc.component_precision(comp.kind, p.precision, p.vae_precision)
        entry = t.entry(comp)
        model = prepare_graph(in_path, ctx.work_dir / comp.folder, prec == "fp16", entry["inputs"])
        nodes[comp.key] = {
            "before": len(ou.load_model(in_path, with_data=False).graph.node),
            "after": len(model.graph.node),
        }
        required = [{k: v for k, v in i.items() if k not in ("optional", "default")} for i in entry["inputs"]]
        t.save(comp, model, wanted=prec, entry={**entry, "inputs": required})
        del model
        # On the saved file: works past the protobuf limit, external data stays where it is.
        onnx.shape_inference.infer_shapes_path(str(out_path), str(out_path), data_prop=True)
        t.bytes[comp.key] = ou.files_bytes(ou.model_files(out_path))
        profs[comp.key] = profiles(comp, p, t.fam.vae_scale_factor, t.static)
        t.check_parity(comp, p.parity)
    oc.write_layout(t.ref.path, ctx.out_dir, t.selected)
    ctx.metrics["nodes"] = nodes
    t.finish(
        f"prepare_tensorrt ({p.precision})",
        details={
            "profiles": profs,
            "profile_params": {"batch": p.batch, "height": p.height, "width": p.width, "cfg": p.cfg},
            "tensorrt_ready": True,
        },
    )


STAGE = Stage(
    name="prepare_tensorrt",
    version="2",  # 2: optional (defaulted) inputs become required again
    inputs={"onnx": (Kind.ONNX,), "model": (Kind.PIPELINE,)},
    output_kind=Kind.TENSORRT,
    params=PrepareTensorrtParams,
    run=run,
    description="TensorRT-ready ONNX (folded, shape-inferred, fp16 where wanted) with min/opt/max profiles",
    env_packages=("torch", "diffusers", "onnx", "onnxruntime"),
    # In the bundle, so a user's machine can build engines for its own GPU on first use.
    bundle_dir=lambda p: f"tensorrt/onnx-{p.precision}",
)
