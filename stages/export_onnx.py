"""export_onnx: a PIPELINE artifact -> an ONNX pipeline folder (optimum/diffusers layout), gated by
parity with PyTorch.

Recipe step::

    - id: onnx
      stage: export_onnx
      inputs: {model: fused}
      params:
        precision: fp32            # or fp16: weights and compute fp16, graph I/O fp32
        vae_precision: fp32        # with fp16: keep the VAEs fp32 (SD VAEs overflow in fp16)
        exporter: torchscript      # or dynamo
        opset: 17
        static: null               # or {batch: 2, height: 512, width: 512} for fixed shapes
        parity: {batch_sizes: [1, 2], image_sizes: [64, 128]}

Every component of the family is exported: text encoder(s), UNet (with the ControlNet residual inputs
when the pipeline has ControlNets; they are *optional*, with zero defaults that mean "no ControlNet"
(``common.onnx.defaults``), so one graph serves the ControlNet tasks and every standard ONNX pipeline
that feeds only ``sample``, ``timestep`` and ``encoder_hidden_states``), each
ControlNet (``conditioning_scale`` is a graph input), VAE encoder and decoder, TAESD encoder and
decoder when present. Graph I/O names and dynamic axis names are the contract's.

Why these defaults: the TorchScript exporter (deprecated in torch 2.x, still complete in 2.13) exports
the tiny UNet in ~3 s where the dynamo exporter takes ~50 s on this CPU, and ONNX Runtime's transformer
optimizer fuses attention only in TorchScript-exported graphs (see optimize_onnx). Opset 17 is the
newest opset with ``LayerNormalization`` that both TensorRT 8.6+ and ONNX Runtime's fusions handle; the
dynamo exporter needs opset >= 18.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any, Literal

from pydantic import Field, model_validator

from sdkiln.runtime.contract.errors import BuildError
from sdkiln.runtime.contract.layout import Kind
from sdkiln.stages.common.onnx.parity import ParityParams
from sdkiln.stages.common.onnx.pipeline_calls import PipelineParityParams
from sdkiln.stages.engine.core import Stage, StageContext, StageParams

logger = logging.getLogger(__name__)

_COMPONENT_NAME = r"^(text_encoder|text_encoder_2|unet|controlnet|vae_encoder|vae_decoder|taesd_encoder|taesd_decoder)(\.[a-z0-9_-]+)?$"


class StaticShape(StageParams):
    """Fixed graph shapes: the batch every graph sees and the image size in pixels."""

    batch: int = Field(default=1, ge=1, le=64)
    height: int = Field(default=512, ge=8, le=4096, multiple_of=8)
    width: int = Field(default=512, ge=8, le=4096, multiple_of=8)


class ExportOnnxParams(StageParams):
    precision: Literal["fp32", "fp16"] = "fp32"
    vae_precision: Literal["fp32", "fp16"] = Field(
        default="fp32", description="VAE/TAESD precision in an fp16 export (fp16 only for an fp16-safe VAE)"
    )
    exporter: Literal["torchscript", "dynamo"] = "torchscript"
    opset: int = Field(default=17, ge=14, le=23)
    static: StaticShape | None = Field(default=None, description="fixed shapes; default: dynamic axes")
    components: list[str] | None = Field(
        default=None, description="export only these (keys like unet, controlnet.scribble); default: all"
    )
    controlnet_residuals: bool | None = Field(
        default=None, description="UNet takes ControlNet residual inputs; default: when there are ControlNets"
    )
    external_data: Literal["auto", "always", "never"] = "auto"
    parity: ParityParams = ParityParams()
    # An independent reference: the calls diffusers' own pipelines make, at the model's resolution
    # (capped at 512 px on this CPU budget), batch 1 and 2 (common/onnx/pipeline_calls.py).
    pipeline_parity: PipelineParityParams = PipelineParityParams()

    @model_validator(mode="after")
    def _check(self) -> ExportOnnxParams:
        import re

        if self.exporter == "dynamo" and self.opset < 18:
            raise ValueError(f"opset: the dynamo exporter needs opset >= 18 (got {self.opset})")
        if self.exporter == "torchscript" and self.opset > 20:
            raise ValueError(f"opset: the TorchScript exporter supports opset <= 20 (got {self.opset})")
        if self.precision == "fp32" and self.vae_precision == "fp16":
            raise ValueError("vae_precision: fp16 applies only to an fp16 export (precision: fp16)")
        if self.components is not None:
            bad = [c for c in self.components if not re.match(_COMPONENT_NAME, c)]
            if bad:
                raise ValueError(f"components: unknown component names {bad}")
            if not self.components:
                raise ValueError("components: an empty list exports nothing")
        return self


def export_graph(
    module: Any, comp: Any, example: dict[str, Any], path: Any, params: ExportOnnxParams
) -> None:
    """Export one torch graph module to ``path`` with the exporter, opset and axes of ``params``.
    The graph's symbolic dims are renamed to the contract's afterwards (``set_io_shapes``)."""
    import torch

    args = tuple(torch.from_numpy(example[n]) for n in comp.input_names)
    dynamic = params.static is None
    with warnings.catch_warnings(), torch.no_grad():
        # Tracer and deprecation warnings flood the log and say nothing the parity gate would miss.
        warnings.simplefilter("ignore")
        if params.exporter == "torchscript":
            axes = {
                t["name"]: {i: d for i, d in enumerate(t["shape"]) if isinstance(d, str)}
                for t in (*comp.inputs, *comp.outputs)
            }
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=comp.input_names,
                output_names=comp.output_names,
                dynamic_axes={k: v for k, v in axes.items() if v} if dynamic else None,
                opset_version=params.opset,
                do_constant_folding=True,
                dynamo=False,
            )
        else:
            from torch.export import Dim

            shapes = (
                tuple(
                    {i: Dim.DYNAMIC for i, d in enumerate(t["shape"]) if isinstance(d, str)}
                    for t in comp.inputs
                )
                if dynamic
                else None
            )
            program = torch.onnx.export(
                module,
                args,
                input_names=comp.input_names,
                output_names=comp.output_names,
                dynamic_shapes=(shapes,) if shapes is not None else None,
                opset_version=params.opset,
                dynamo=True,
                verbose=False,
            )
            program.save(str(path), external_data=True)


def _reference_size(unet_cfg: dict[str, Any], fam: Any, cap: int = 512) -> int:
    """The model's own image size in pixels, capped (an SDXL UNet at 1024 px and batch 4 under CFG does not
    fit beside the export in this machine's memory)."""
    sample = unet_cfg.get("sample_size") or 64
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return min(int(sample) * fam.vae_scale_factor, cap)


def run(ctx: StageContext) -> None:
    import torch

    from sdkiln.runtime.contract.layout import EXTERNAL_DATA_FILE, MODEL_FILE
    from sdkiln.stages.common.onnx import components as oc
    from sdkiln.stages.common.onnx import defaults as od
    from sdkiln.stages.common.onnx import io as ou
    from sdkiln.stages.common.onnx.parity import ParityReport, gate_for
    from sdkiln.stages.common.torch.pipeline import open_pipeline, read_configs

    p: ExportOnnxParams = ctx.params
    src = ctx.input("model")
    fam, comps = oc.plan_components(src.path, src.model, p.controlnet_residuals)
    comps = oc.select(comps, p.components)
    unet_cfg = read_configs(src.path)["unet"]
    static_axes = None
    if p.static is not None:
        oc.check_sizes(fam, unet_cfg, [p.static.height, p.static.width], "static")
        static_axes = oc.bindings(p.static.batch, p.static.height, p.static.width, fam.vae_scale_factor)
    else:
        oc.check_sizes(fam, unet_cfg, p.parity.image_sizes, "parity.image_sizes")
    residuals = any("additional_residual" in n for c in comps if c.kind == "unet" for n in c.input_names)

    with ctx.timed("load_s"):
        loaded = open_pipeline(src.path, family=fam.name)
    report = ParityReport()
    sizes: dict[str, int] = {}
    nodes: dict[str, int] = {}
    export_s: dict[str, float] = {}
    external: list[str] = []
    optional_checks: dict[str, Any] = {}
    pipeline_cases: dict[str, list[Any]] = {}
    if p.pipeline_parity.enabled:
        from sdkiln.stages.common.onnx.pipeline_calls import pipeline_cases as run_pipelines

        pp = p.pipeline_parity
        size = p.static.height if p.static else (pp.size or _reference_size(unet_cfg, fam))
        with ctx.timed("pipeline_reference_s"):
            pipeline_cases = run_pipelines(
                loaded, comps, size=size, batch_sizes=pp.batch_sizes, steps=pp.steps, seed=pp.seed,
                static=static_axes,
            )  # fmt: skip
        ctx.details["pipeline_parity"] = {
            "size": size,
            "batch_sizes": pp.batch_sizes,
            "calls": {k: len(v) for k, v in pipeline_cases.items()},
        }
    example_size = p.static.height if p.static else max(p.parity.image_sizes)
    example_axes = static_axes or oc.bindings(2, example_size, example_size, fam.vae_scale_factor)

    for comp in ctx.progress(comps, "export", total=len(comps)):
        t0 = time.perf_counter()
        module = oc.torch_graph(loaded, comp)
        raw_dir = ctx.work_dir / comp.folder
        raw_dir.mkdir(parents=True, exist_ok=True)
        raw = raw_dir / MODEL_FILE
        try:
            export_graph(module, comp, oc.make_feeds(comp, example_axes, seed=p.parity.seed), raw, p)
        except Exception as e:
            raise BuildError(f"{comp.key}: {p.exporter} export failed: {type(e).__name__}: {e}") from e
        model = ou.load_model(raw)
        expected = comp.spec(static_axes)
        unused = ou.restore_unused_inputs(model, expected)
        if unused:
            logger.info("%s: the model reads none of %s; kept as unused graph inputs", comp.key, unused)
            ctx.details.setdefault("unused_inputs", {})[comp.key] = unused
        ou.set_io_shapes(model, expected)
        prec = oc.component_precision(comp.kind, p.precision, p.vae_precision)
        if prec == "fp16":
            model = ou.to_fp16(model)
        # After the fp16 pass: the defaults keep the graph inputs' own (fp32) type.
        optional = od.residual_inputs(model) if comp.kind == "unet" else []
        if optional:
            od.add_zero_defaults(model, optional)
            expected = od.optional_spec(expected, optional)
        out_path = ctx.out_dir / comp.path
        files = ou.save_model(model, out_path, p.external_data, restore=False)
        external += [f.relative_to(ctx.out_dir).as_posix() for f in files if f.name == EXTERNAL_DATA_FILE]
        oc.copy_config(src.path, comp, ctx.out_dir)
        spec = od.manifest_spec(ou.io_spec(model), expected)
        problems = ou.spec_mismatches(spec, expected, comp.key)
        if problems:
            raise BuildError("exported graph does not match the contract:\n  " + "\n  ".join(problems))
        nodes[comp.key] = len(model.graph.node)
        del model
        _rmtree(raw_dir)
        export_s[comp.key] = round(time.perf_counter() - t0, 3)
        sizes[comp.key] = ou.files_bytes(files)
        ctx.components[comp.key] = {"path": comp.path, "precision": prec, **spec}

        cases = oc.parity_cases(
            module,
            comp,
            p.parity.batch_sizes,
            p.parity.image_sizes,
            p.parity.seed,
            fam.vae_scale_factor,
            static_axes,
        )
        cases += pipeline_cases.pop(comp.key, [])
        session = ou.cpu_session(out_path)
        report.check(comp.key, session, cases, gate_for(comp.key, prec))
        if optional:
            optional_checks[comp.key] = od.check_unfed(session, cases[0].feeds, comp.key)
        del module, cases, session

    oc.write_layout(src.path, ctx.out_dir, comps)
    ctx.metrics.update(
        {
            "parity": report.metrics(),
            "bytes": sizes,
            "total_bytes": sum(sizes.values()),
            "nodes": nodes,
            "export_s": export_s,
            **({"optional_inputs": optional_checks} if optional_checks else {}),
        }
    )
    ctx.model = src.model.model_copy(
        update={
            "controlnets": [c.controlnet_type for c in comps if c.kind == "controlnet"],
            "taesd": any(c.kind.startswith("taesd") for c in comps),
            "unet_controlnet_residuals": residuals,
            "static": static_axes,
        }
    )
    ctx.details.update(
        {
            "exporter": p.exporter,
            "opset": p.opset,
            "torch": torch.__version__,
            "shapes": "static" if static_axes else "dynamic",
            "external_data": external,
        }
    )
    report.raise_if_failed(f"export_onnx ({p.precision})")
    logger.info("exported %d graphs, %.1f MB", len(comps), sum(sizes.values()) / 1e6)


def _rmtree(path: Any) -> None:
    """Free the raw export (large models keep gigabytes of per-tensor files there)."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)


STAGE = Stage(
    name="export_onnx",
    # 2: diffusers' pipeline calls replayed as a reference (issue 12); 3: the UNet's ControlNet residual
    # inputs are optional (zero defaults); 4: contract inputs a component ignores stay as unused inputs
    version="4",
    inputs={"model": (Kind.PIPELINE,)},
    output_kind=Kind.ONNX,
    params=ExportOnnxParams,
    run=run,
    description="Export every component to ONNX (optimum layout), parity-gated against PyTorch",
    env_packages=("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxscript"),
    bundle_dir=lambda p: f"onnx/{p.precision}",
)
