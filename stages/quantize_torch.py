"""quantize_torch: optimum-quanto weight quantization (qint8, qint4, qfloat8) of the UNet and ControlNets.

Recipe example::

    - id: int8
      stage: quantize_torch
      inputs: {model: fused}
      params: {weights: qint8}

The output is the input PIPELINE folder with the quantized components replaced: each of ``unet/`` and
``controlnet/<type>/`` holds ``config.json``, ``quanto_weights.safetensors`` (the frozen quantized
state dict) and ``quanto_qmap.json`` (the quantization map). Different file names from a plain diffusers
folder on purpose: ``from_pretrained`` must not half-load them; use ``load_quantized`` (or
``open_quantized_pipeline``), which rebuilds the module on the meta device and calls quanto's
``requantize``.

The manifest records bytes before/after per component and the SQNR of the UNet output (and each
ControlNet's residuals) against the unquantized model on fixed inputs; below the family's floor for
the scheme (``Tolerance.min_sqnr_db``) the step fails.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from sdkiln.runtime.contract.errors import ParityError
from sdkiln.runtime.contract.layout import Kind
from sdkiln.stages.engine.core import Stage, StageContext, StageParams

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "quanto_weights.safetensors"
QMAP_FILE = "quanto_qmap.json"
SCHEMES = ("qint8", "qint4", "qfloat8")


class QuantizeTorchParams(StageParams):
    """Weight scheme, which components, module name patterns kept in float, optional SQNR floor."""

    weights: Literal["qint8", "qint4", "qfloat8"] = "qint8"
    components: list[Literal["unet", "controlnet"]] = Field(default=["unet", "controlnet"], min_length=1)
    exclude: list[str] = Field(default_factory=list)  # fnmatch patterns of module names (quanto's)
    min_sqnr_db: float | None = None  # default: the family's floor for the scheme
    parity_latent_size: int = Field(default=32, ge=8, le=128, multiple_of=8)


def _quanto_type(name: str) -> Any:
    from optimum import quanto

    return getattr(quanto, name)


def save_quantized(module: Any, folder: Path) -> int:
    """Write a frozen quanto-quantized diffusers model: config, weights, quantization map. Returns bytes."""
    from optimum.quanto import quantization_map
    from safetensors.torch import save_file

    from sdkiln.stages.common.torch.pipeline import drop_local_paths

    folder.mkdir(parents=True, exist_ok=True)
    module.save_config(str(folder))
    drop_local_paths(folder)
    save_file(module.state_dict(), str(folder / WEIGHTS_FILE))
    (folder / QMAP_FILE).write_text(json.dumps(quantization_map(module), indent=1, sort_keys=True))
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def load_quantized(folder: Path, model_class: str | None = None) -> Any:
    """Reload a component written by ``save_quantized`` (``requantize`` on a meta-device skeleton).

    ``model_class`` defaults to the config's ``_class_name`` (a diffusers class).
    """
    import diffusers
    import torch
    from optimum.quanto import requantize
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    cls = getattr(diffusers, model_class or config["_class_name"])
    with torch.device("meta"):
        module = cls.from_config(config)
    qmap = json.loads((folder / QMAP_FILE).read_text())
    requantize(module, load_file(str(folder / WEIGHTS_FILE)), qmap, device=torch.device("cpu"))
    return module.eval()


def open_quantized_pipeline(folder: Path, family: str) -> Any:
    """A ``pipeline_io.LoadedPipeline`` over a quantize_torch output: quantized UNet and ControlNets,
    everything else loaded as usual."""
    import diffusers

    from sdkiln.runtime.contract.families import get_family
    from sdkiln.runtime.contract.layout import CONTROLNET_DIR, VAE_TINY_DIR
    from sdkiln.stages.common.torch.pipeline import LoadedPipeline, pipeline_class

    folder = Path(folder)
    fam = get_family(family)
    kwargs: dict[str, Any] = {}
    if (folder / "unet" / QMAP_FILE).is_file():
        kwargs["unet"] = load_quantized(folder / "unet")
    pipe = getattr(diffusers, pipeline_class(folder)).from_pretrained(
        str(folder), use_safetensors=True, **kwargs
    )
    controlnets = {}
    for sub in sorted((folder / CONTROLNET_DIR).glob("*/config.json")):
        d = sub.parent
        controlnets[d.name] = (
            load_quantized(d)
            if (d / QMAP_FILE).is_file()
            else diffusers.ControlNetModel.from_pretrained(str(d))
        )
    vae_tiny = None
    if (folder / VAE_TINY_DIR / "config.json").is_file():
        vae_tiny = diffusers.AutoencoderTiny.from_pretrained(str(folder / VAE_TINY_DIR))
    return LoadedPipeline(family=fam, pipe=pipe, controlnets=controlnets, vae_tiny=vae_tiny)


def _dir_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def run(ctx: StageContext) -> None:
    """Quantize, freeze, measure SQNR against the float model, save, reload-check."""
    import torch
    from optimum.quanto import freeze, quantize

    from sdkiln.runtime.contract.floors import tolerance
    from sdkiln.runtime.contract.layout import CONTROLNET_DIR
    from sdkiln.runtime.contract.metrics import compare
    from sdkiln.stages.common.torch.pipeline import controlnet_inputs, open_pipeline, unet_inputs

    p: QuantizeTorchParams = ctx.params
    model = ctx.input("model")
    family = model.model.family
    loaded = open_pipeline(model.path, family=family)
    tol = tolerance("unet")
    floor = p.min_sqnr_db if p.min_sqnr_db is not None else tol.min_sqnr_db[p.weights]

    targets: dict[str, tuple[Any, str]] = {}  # key -> (module, folder relative to the artifact)
    if "unet" in p.components:
        targets["unet"] = (loaded.pipe.unet, "unet")
    if "controlnet" in p.components:
        for ctype, cn in loaded.controlnets.items():
            targets[f"controlnet.{ctype}"] = (cn, f"{CONTROLNET_DIR}/{ctype}")

    u_in = unet_inputs(loaded.pipe.unet.config, family, latent_size=p.parity_latent_size, seed=0)
    c_in = controlnet_inputs(u_in, loaded.family.vae_scale_factor)

    def outputs(key: str, module: Any) -> Any:
        with torch.no_grad():
            if key == "unet":
                return module(**u_in).sample
            downs, mid = module(**c_in, return_dict=False)
            return torch.cat([t.flatten() for t in [*downs, mid]])

    # Copy everything, then replace the quantized components' folders.
    shutil.copytree(model.path, ctx.out_dir, dirs_exist_ok=True)
    failures = []
    qtype = _quanto_type(p.weights)
    with ctx.timed("quantize_s"):
        for key, (module, rel) in ctx.progress(list(targets.items()), "quantize", total=len(targets)):
            ref = outputs(key, module)
            before = _dir_bytes(model.path / rel)
            quantize(module, weights=qtype, exclude=p.exclude or None)
            freeze(module)
            out = outputs(key, module)
            shutil.rmtree(ctx.out_dir / rel)
            after = save_quantized(module, ctx.out_dir / rel)
            reloaded = outputs(key, load_quantized(ctx.out_dir / rel))
            m, rt = compare(ref.detach(), out.detach()), compare(out.detach(), reloaded.detach())
            ctx.metrics[f"{key}.bytes_before"] = before
            ctx.metrics[f"{key}.bytes_after"] = after
            ctx.metrics[f"{key}.sqnr_db"] = round(m["sqnr_db"], 3)
            ctx.metrics[f"{key}.cosine"] = m["cosine"]
            ctx.metrics[f"{key}.reload_max_abs"] = rt["max_abs"]
            if m["sqnr_db"] < floor:
                failures.append(f"{key}: SQNR {m['sqnr_db']:.2f} dB < {floor} dB ({p.weights})")
            if rt["max_abs"] > 0:
                failures.append(
                    f"{key}: reloaded weights differ from the frozen model (max_abs {rt['max_abs']:.3g})"
                )
    ctx.metrics["bytes_before"] = _dir_bytes(model.path)
    ctx.metrics["bytes_after"] = _dir_bytes(ctx.out_dir)
    if failures:
        raise ParityError(f"quantize_torch {p.weights} ({family})", failures)

    ctx.components.update(model.components)
    for key, (_, rel) in targets.items():
        if key in ctx.components:
            ctx.components[key]["precision"] = p.weights
            ctx.components[key]["path"] = rel
    ctx.model = model.model
    ctx.details["quantized"] = sorted(targets)
    ctx.details["quantization"] = {"library": "optimum-quanto", "weights": p.weights, "exclude": p.exclude}


STAGE = Stage(
    name="quantize_torch",
    version="2",  # 2: configs carry no _name_or_path (a path of the machine that built it)
    inputs={"model": (Kind.PIPELINE,)},
    output_kind=Kind.TORCH_QUANTIZED,
    params=QuantizeTorchParams,
    run=run,
    description="optimum-quanto weight quantization of the UNet and ControlNets, SQNR-gated",
    env_packages=("torch", "diffusers", "optimum-quanto", "safetensors"),
    bundle_dir=lambda p: f"torch/{p.weights}",
)
