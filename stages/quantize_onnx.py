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

from sdkiln.stages.core import BuildError, Kind, Stage, StageContext, StageParams, UserError
from sdkiln.stages.onnx_utils import ParityParams

logger = logging.getLogger(__name__)

OpType = Literal["MatMul", "Gemm", "Conv", "Gather"]
DEFAULT_COMPONENTS = ["text_encoder", "text_encoder_2", "unet", "controlnet", "vae_encoder"]
_DEFAULT_PROMPTS = ["a photograph of a house by a lake, morning light", "a pencil sketch of a cat"]


class CalibrationParams(StageParams):
    """What the static calibration runs through the reference pipeline."""

    prompts: list[str] = Field(default=_DEFAULT_PROMPTS, min_length=1)
    sketches: list[str] = Field(default=[], description="images (recipe-relative paths) for the ControlNets")
    steps: int = Field(default=2, ge=1, le=50)
    size: int = Field(default=512, ge=16, le=2048, multiple_of=8)
    guidance: float | None = Field(default=None, ge=0.0, le=30.0, description="default: the family's")
    seed: int = Field(default=0, ge=0)


class QuantizeOnnxParams(StageParams):
    mode: Literal["dynamic", "static"] = "dynamic"
    op_types: list[OpType] = Field(default=["MatMul", "Gemm", "Conv", "Gather"], min_length=1)
    components: list[str] | None = Field(
        default=None,
        description="keys or kinds to quantize; default: text encoders, unet, controlnets, vae_encoder",
    )
    per_channel: bool = Field(default=False, description="per-output-channel weight scales")
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


def _check_files(params: QuantizeOnnxParams, recipe_dir: Path) -> list[str]:
    if params.calibration is None:
        return []
    return [
        f"params.calibration.sketches: {s} not found"
        for s in params.calibration.sketches
        if not (Path(recipe_dir) / s).is_file()
    ]


# --------------------------------------------------------------------------------------------------
# Calibration data from the reference pipeline


def _np(t: Any) -> Any:
    return t.detach().float().cpu().numpy()


def collect_calibration(
    loaded: Any, fam: Any, comps: list[Any], cal: CalibrationParams, recipe_dir: Path, lcm: bool = False
) -> dict[str, list[dict[str, Any]]]:
    """Run the diffusers pipelines over the prompts and sketches; return, per component key, the graph
    feeds it received (UNet/ControlNet every step, text encoders per prompt, VAEs on the results)."""
    import numpy as np
    import torch
    from PIL import Image

    from sdkiln.stages.families import generation_defaults

    by_key = {c.key: c for c in comps}
    feeds: dict[str, list[dict[str, Any]]] = {k: [] for k in by_key}
    unet_comp = by_key.get("unet")
    guidance = cal.guidance if cal.guidance is not None else generation_defaults(fam, lcm=lcm).guidance

    def unet_hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if unet_comp is None:
            return
        x = _forward_args(("sample", "timestep", "encoder_hidden_states"), args, kwargs)
        feeds["unet"].append(_unet_feeds(unet_comp, x, kwargs))

    def cn_hook(key: str) -> Any:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if key in by_key:
                x = _forward_args(
                    ("sample", "timestep", "encoder_hidden_states", "controlnet_cond"), args, kwargs
                )
                feeds[key].append(_controlnet_feeds(by_key[key], x, kwargs))

        return hook

    def text_hook(key: str) -> Any:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if key in by_key:
                ids = args[0] if args else kwargs["input_ids"]
                feeds[key].append({"input_ids": ids.detach().cpu().numpy().astype(np.int32)})

        return hook

    handles = [loaded.pipe.unet.register_forward_pre_hook(unet_hook, with_kwargs=True)]
    for te in fam.text_encoders:
        handles.append(getattr(loaded.pipe, te).register_forward_pre_hook(text_hook(te), with_kwargs=True))
    for ctype, cn in loaded.controlnets.items():
        handles.append(cn.register_forward_pre_hook(cn_hook(f"controlnet.{ctype}"), with_kwargs=True))
    latents: list[Any] = []
    try:
        g = torch.Generator().manual_seed(cal.seed)
        common = {
            "num_inference_steps": cal.steps,
            "guidance_scale": guidance,
            "height": cal.size,
            "width": cal.size,
            "output_type": "latent",
            "generator": g,
        }
        text = loaded.task_pipeline("text")
        text.set_progress_bar_config(disable=True)
        for prompt in cal.prompts:
            with torch.inference_mode():
                latents.append(text(prompt=prompt, **common).images)
        # Every ControlNet being calibrated sees every sketch.
        for ctype in sorted(loaded.controlnets):
            if f"controlnet.{ctype}" not in by_key:
                continue
            pipe = loaded.task_pipeline("controlnet", ctype)
            pipe.set_progress_bar_config(disable=True)
            for i, path in enumerate(cal.sketches):
                image = Image.open(Path(recipe_dir) / path).convert("RGB").resize((cal.size, cal.size))
                prompt = cal.prompts[i % len(cal.prompts)]
                with torch.inference_mode():
                    latents.append(pipe(prompt=prompt, image=image, **common).images)
    finally:
        for h in handles:
            h.remove()
    # The VAEs see what the runtime gives them: final latents (unscaled) and decoded images.
    vae = loaded.pipe.vae
    sf = float(vae.config.scaling_factor)
    for lat in latents:
        z = lat / sf
        with torch.inference_mode():
            image = vae.decode(z).sample.clamp(-1, 1)
        for key, value in (
            ("vae_decoder", {"latent_sample": _np(z)}),
            ("vae_encoder", {"sample": _np(image)}),
        ):
            if key in feeds:
                feeds[key].append(value)
        if "taesd_encoder" in feeds:
            feeds["taesd_encoder"].append({"sample": _np(image)})
        if "taesd_decoder" in feeds:
            feeds["taesd_decoder"].append({"latent_sample": _np(z)})
    return feeds


def _forward_args(names: tuple[str, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    x = dict(zip(names, args, strict=False))
    for n in names:
        if n not in x and n in kwargs:
            x[n] = kwargs[n]
    return x


def _timestep(t: Any, batch: int) -> Any:
    import numpy as np

    arr = np.asarray(_np(t) if hasattr(t, "detach") else t, dtype=np.float32).reshape(-1)
    return np.broadcast_to(arr, (batch,)).copy()


def _added(kwargs: dict[str, Any], out: dict[str, Any], names: list[str]) -> None:
    added = kwargs.get("added_cond_kwargs") or {}
    for n in ("text_embeds", "time_ids"):
        if n in names:
            out[n] = _np(added[n])


def _unet_feeds(comp: Any, x: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from sdkiln.stages.families import resolve_shape

    sample = _np(x["sample"])
    b, _, h, w = sample.shape
    out = {
        "sample": sample,
        "timestep": _timestep(x["timestep"], b),
        "encoder_hidden_states": _np(x["encoder_hidden_states"]),
    }
    names = comp.input_names
    if "timestep_cond" in names:
        out["timestep_cond"] = _np(kwargs["timestep_cond"])
    _added(kwargs, out, names)
    downs = kwargs.get("down_block_additional_residuals")
    mid = kwargs.get("mid_block_additional_residual")
    axes = {"batch": b, "latent_height": h, "latent_width": w}
    for t in comp.inputs:
        n = t["name"]
        if n.startswith("down_block_additional_residual_"):
            i = int(n.rsplit("_", 1)[1])
            out[n] = (
                _np(downs[i]) if downs is not None else np.zeros(resolve_shape(t["shape"], axes), np.float32)
            )
        elif n == "mid_block_additional_residual":
            out[n] = _np(mid) if mid is not None else np.zeros(resolve_shape(t["shape"], axes), np.float32)
    return out


def _controlnet_feeds(comp: Any, x: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    sample = _np(x["sample"])
    scale = kwargs.get("conditioning_scale", 1.0)
    out = {
        "sample": sample,
        "timestep": _timestep(x["timestep"], sample.shape[0]),
        "encoder_hidden_states": _np(x["encoder_hidden_states"]),
        "controlnet_cond": _np(x["controlnet_cond"]),
        "conditioning_scale": np.asarray([float(scale)], dtype=np.float32),
    }
    _added(kwargs, out, comp.input_names)
    return out


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

    from sdkiln.stages import onnx_utils as ou

    dst.parent.mkdir(parents=True, exist_ok=True)
    big = (src.parent / ou.EXTERNAL_DATA_FILE).is_file()
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
            quantize_static(
                str(pre),
                str(out),
                _Reader(calib or []),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(p.op_types),
                per_channel=p.per_channel,
                activation_type=act,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=excluded,
                use_external_data_format=big,
                calibrate_method=method,
                extra_options=extra,
            )
    model = ou.load_model(out)
    del model.graph.value_info[:]  # shape annotations the quantizer leaves; ORT infers its own
    if p.compact_names:
        ou.compact_names(model)
    return model


def run(ctx: StageContext) -> None:
    from sdkiln.stages import onnx_components as oc
    from sdkiln.stages import onnx_utils as ou
    from sdkiln.stages.pipeline_io import open_pipeline

    p: QuantizeOnnxParams = ctx.params
    src = ctx.input("onnx")
    ref = ctx.input("model")
    extra = dict(src.manifest.get("extra", {}))
    comps_in = src.components
    fam, planned = oc.plan_exported(src, ref)
    if p.components is None:
        selected = [c for c in planned if c.key in DEFAULT_COMPONENTS or c.kind in DEFAULT_COMPONENTS]
    else:
        selected = oc.select(planned, p.components)
    not_fp32 = [c.key for c in selected if comps_in[c.key].get("precision", "fp32") != "fp32"]
    if not_fp32:
        raise UserError(f"quantize_onnx needs fp32 graphs; {not_fp32} are not fp32")
    static = extra.get("static")
    if static and p.mode == "static":
        raise UserError(
            "static quantization calibrates on pipeline runs of any shape; quantize a dynamic-shape export"
        )

    ou.copy_non_model_files(src.path, ctx.out_dir)
    loaded = open_pipeline(ref.path, family=fam.name)
    calib: dict[str, list[dict[str, Any]]] = {}
    if p.mode == "static":
        with ctx.timed("calibration_s"):
            calib = collect_calibration(
                loaded, fam, selected, p.calibration, ctx.recipe_dir, lcm=bool(extra.get("lcm", False))
            )
        empty = [c.key for c in selected if not calib.get(c.key)]
        if empty:
            hint = (
                " (ControlNets are calibrated on calibration.sketches)"
                if any("controlnet" in k for k in empty)
                else ""
            )
            raise UserError(f"calibration produced no inputs for {empty}{hint}")

    report = ou.ParityReport()
    sizes: dict[str, Any] = {}
    kept: dict[str, str] = {}
    fp32_total = int8_total = 0
    for comp in planned:
        entry = comps_in[comp.key]
        in_path = src.path / entry["path"]
        out_path = ctx.out_dir / entry["path"]
        fp32_bytes = ou.files_bytes(ou.model_files(in_path))
        if comp not in selected:
            ou.copy_model(in_path, out_path)
            ctx.components[comp.key] = dict(entry)
            continue
        t0 = time.perf_counter()
        model = quantize_graph(in_path, ctx.work_dir / comp.folder, p, calib.get(comp.key))
        files = ou.save_model(model, out_path, "auto", restore=False)
        spec = ou.io_spec(model)
        del model
        problems = ou.spec_mismatches(spec, {k: entry[k] for k in ("inputs", "outputs")}, comp.key)
        if problems:
            raise BuildError("quantized graph changed its I/O:\n  " + "\n  ".join(problems))
        q_bytes = ou.files_bytes(files)
        if q_bytes > p.keep_fp32_above * fp32_bytes:
            # Too few weights for int8 to pay for its scales and extra nodes (TAESD): ship the fp32 graph.
            for f in files:
                f.unlink()
            ou.copy_model(in_path, out_path)
            kept[comp.key] = (
                f"int8 would be {q_bytes / fp32_bytes:.2f}x the fp32 bytes (> {p.keep_fp32_above})"
            )
            ctx.components[comp.key] = dict(entry)
            continue
        fp32_total += fp32_bytes
        int8_total += q_bytes
        sizes[comp.key] = {
            "fp32_bytes": fp32_bytes,
            "int8_bytes": q_bytes,
            "ratio": round(q_bytes / fp32_bytes, 4),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if p.mode == "static":
            sizes[comp.key]["calibration_samples"] = len(calib[comp.key])
        ctx.components[comp.key] = {**entry, "precision": "int8"}
        module = oc.torch_graph(loaded, comp)
        cases = oc.parity_cases(
            module,
            comp,
            p.parity.batch_sizes,
            p.parity.image_sizes,
            p.parity.seed,
            fam.vae_scale_factor,
            static,
        )
        gate = ou.gate_for(fam.components[comp.kind].tolerance, "int8")
        report.check(comp.key, ou.cpu_session(out_path), cases, gate)
        del module, cases

    # Every graph of the folder, quantized or kept (tokenizer files excluded: they do not shrink).
    total_in = ou.files_bytes(f for e in comps_in.values() for f in ou.model_files(src.path / e["path"]))
    total_out = ou.files_bytes(
        f for e in ctx.components.values() for f in ou.model_files(ctx.out_dir / e["path"])
    )
    ctx.metrics.update(
        {
            "parity": report.metrics(),
            "sizes": sizes,
            "quantized_fp32_bytes": fp32_total,
            "quantized_int8_bytes": int8_total,
            "size_ratio": round(int8_total / fp32_total, 4) if fp32_total else None,
            "graphs_fp32_bytes": total_in,
            "graphs_bytes": total_out,
            "graphs_size_ratio": round(total_out / total_in, 4),
            "sqnr_db": {k: v["worst"].get("sqnr_db") for k, v in report.metrics().items()},
        }
    )
    extra.update(
        {
            "precision": "int8",
            "component_precision": {k: v.get("precision", "fp32") for k, v in ctx.components.items()},
            "quantization": {
                "mode": p.mode,
                "op_types": list(p.op_types),
                "per_channel": p.per_channel,
                "weight_type": "int8",
                "activation_type": p.activation_type if p.mode == "static" else "uint8 (dynamic)",
                "format": "QDQ" if p.mode == "static" else "integer ops",
                "kept_fp32": kept,
            },
        }
    )
    ctx.extra.update(extra)
    report.raise_if_failed(f"quantize_onnx ({p.mode})")


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
)
