"""The graphs an ONNX export is made of, and their PyTorch references.

For a PIPELINE artifact, ``plan_components`` lists one ``Component`` per graph (text encoders, UNet,
each ControlNet, VAE encoder/decoder, TAESD encoder/decoder) with its contract I/O spec from
``families.component_specs``. ``torch_graph`` wraps the matching diffusers module with the runtime's one
PyTorch reference (``runtime.backends.torch_io``) so that its forward takes the graph inputs
positionally and returns the graph outputs: what gets exported, and what every ONNX stage re-runs as
the PyTorch reference for its parity gate. ``make_feeds`` builds fixed,
seeded inputs for any batch size and image size.

The output folder follows the optimum/diffusers ONNX layout (``write_layout``): ``model_index.json``
with ``OnnxRuntimeModel`` entries for the graphs present, each graph in ``<folder>/model.onnx`` beside
its ``config.json``, plus tokenizers and scheduler; ControlNets in ``controlnet/<type>/`` and TAESD in
``taesd_encoder/`` / ``taesd_decoder/`` (sdkiln extras that other loaders ignore).

Heavy imports (torch, diffusers, numpy) stay inside functions.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdkiln.runtime.backends import torch_io
from sdkiln.runtime.contract.errors import BuildError, UserError
from sdkiln.runtime.contract.families import Family, component_specs, get_family
from sdkiln.runtime.contract.layout import (
    CONTROLNET_DIR,
    MODEL_FILE,
    ONNX_COPIED,
    ONNX_INDEXED,
    PIPELINE_CONFIG_DIRS,
    VAE_KINDS,
    VAE_TINY_DIR,
)
from sdkiln.runtime.contract.manifest import ModelFacts
from sdkiln.runtime.contract.specs import bind_axes, resolve_shape
from sdkiln.stages.common.onnx.parity import ParityCase
from sdkiln.stages.common.torch.pipeline import controlnet_types, read_configs
from sdkiln.stages.engine.core import InputArtifact

logger = logging.getLogger(__name__)

INDEXED = ONNX_INDEXED
COPIED = ONNX_COPIED
__all__ = ["VAE_KINDS", "Component", "plan_components", "plan_exported", "torch_graph"]


@dataclass(frozen=True)
class Component:
    """One exported graph: manifest key, family component kind, output folder and contract I/O spec."""

    key: str  # "unet", "controlnet.scribble", "vae_decoder", ...
    kind: str  # the family component: "unet", "controlnet", "text_encoder_2", ...
    folder: str  # "unet", "controlnet/scribble", ...
    config_source: str  # folder of the PIPELINE artifact holding its config.json
    inputs: tuple[dict[str, Any], ...]
    outputs: tuple[dict[str, Any], ...]

    @property
    def path(self) -> str:
        return f"{self.folder}/{MODEL_FILE}"

    @property
    def controlnet_type(self) -> str | None:
        return self.key.split(".", 1)[1] if self.kind == "controlnet" else None

    @property
    def input_names(self) -> list[str]:
        return [t["name"] for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t["name"] for t in self.outputs]

    def spec(self, static: dict[str, int] | None = None) -> dict[str, list[dict[str, Any]]]:
        """The I/O spec; with ``static`` axis bindings every dim is resolved to an int."""

        def conv(ts: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
            return [
                {**t, "shape": resolve_shape(t["shape"], static) if static else list(t["shape"])} for t in ts
            ]

        return {"inputs": conv(self.inputs), "outputs": conv(self.outputs)}


def plan_exported(onnx: InputArtifact, model: InputArtifact) -> tuple[Family, list[Component]]:
    """The components an ONNX artifact holds, planned against the PIPELINE it was exported from
    (for the stages that transform an export: optimize, quantize, prepare for TensorRT)."""
    fam, planned = plan_components(model.path, model.model, onnx.model.unet_controlnet_residuals)
    return fam, [c for c in planned if c.key in onnx.components]


def plan_components(
    pipeline_dir: Path, facts: ModelFacts, unet_residuals: bool | None = None
) -> tuple[Family, list[Component]]:
    """Every graph of a PIPELINE artifact, in export order. ``unet_residuals`` (default: when the
    pipeline has ControlNets) adds the ControlNet residual inputs to the UNet graph."""
    fam = get_family(facts.family)
    configs = read_configs(pipeline_dir)
    for needed in ("unet", "vae", *fam.text_encoders):
        if needed not in configs:
            raise UserError(f"{pipeline_dir}: no {needed}/config.json; not a {fam.name} pipeline folder")
    cns = list(facts.controlnets or controlnet_types(pipeline_dir))
    taesd = VAE_TINY_DIR in configs
    residuals = bool(cns) if unet_residuals is None else unet_residuals
    specs = component_specs(fam, configs, controlnets=cns, taesd=taesd, unet_residual_inputs=residuals)
    comps = []
    for key, spec in specs.items():
        kind = key.split(".", 1)[0]
        if kind == "controlnet":
            folder = source = f"{CONTROLNET_DIR}/{key.split('.', 1)[1]}"
        else:
            folder, source = key, PIPELINE_CONFIG_DIRS[kind]
        comps.append(Component(key, kind, folder, source, tuple(spec["inputs"]), tuple(spec["outputs"])))
    return fam, comps


def component_precision(kind: str, precision: str, vae_precision: str) -> str:
    """The precision one component gets in an export of ``precision``."""
    return vae_precision if precision == "fp16" and kind in VAE_KINDS else precision


def select(comps: list[Component], wanted: list[str] | None) -> list[Component]:
    """The components named in ``wanted`` (keys like ``unet``, ``controlnet.scribble``, or a kind like
    ``controlnet`` for all of them); all when None. Unknown names are a UserError."""
    if wanted is None:
        return comps
    known = {c.key for c in comps} | {c.kind for c in comps}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise UserError(f"components {unknown} are not in this pipeline (it has: {[c.key for c in comps]})")
    return [c for c in comps if c.key in wanted or c.kind in wanted]


# --------------------------------------------------------------------------------------------------
# Axis bindings and fixed inputs


def latent_multiple(unet_config: dict[str, Any]) -> int:
    """Latent sides must be multiples of this: the UNet halves them once per down block but the last."""
    return 2 ** (len(unet_config["block_out_channels"]) - 1)


def bindings(batch: int, height: int, width: int, vae_scale_factor: int = 8) -> dict[str, int]:
    """Concrete sizes of the contract's dynamic axes for a batch and an image size in pixels."""
    if height % vae_scale_factor or width % vae_scale_factor:
        raise UserError(f"image size {height}x{width} is not a multiple of {vae_scale_factor}")
    return bind_axes(batch, height, width, vae_scale_factor)


def check_sizes(fam: Family, unet_config: dict[str, Any], sizes: list[int], what: str) -> None:
    """UserError unless every image size gives latents the UNet can halve down to its last block."""
    mult = latent_multiple(unet_config) * fam.vae_scale_factor
    bad = [s for s in sizes if s % mult]
    if bad:
        raise UserError(
            f"{what}: image sizes {bad} are not multiples of {mult} (this UNet's input granularity)"
        )


def make_feeds(comp: Component, axes: dict[str, int], seed: int) -> dict[str, Any]:
    """Seeded graph inputs of ``comp`` for concrete axis sizes, with realistic value ranges per input
    (token ids with BOS/EOS, images in [-1, 1] or [0, 1], time ids, small ControlNet residuals)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds: dict[str, Any] = {}
    for t in comp.inputs:
        shape = resolve_shape(t["shape"], axes)
        name = t["name"]
        if name == "input_ids":
            feeds[name] = _token_ids(rng, shape)
        elif name == "timestep":
            feeds[name] = np.full(shape, 999.0 * rng.uniform(0.05, 0.95), dtype=np.float32).round()
        elif name == "conditioning_scale":
            feeds[name] = np.full(shape, 0.8, dtype=np.float32)  # not 1.0: a mis-wired scale must show
        elif name == "controlnet_cond":
            feeds[name] = rng.uniform(0.0, 1.0, shape).astype(np.float32)
        elif name == "time_ids":
            h, w = axes["height"], axes["width"]
            feeds[name] = np.tile(np.array([h, w, 0, 0, h, w], dtype=np.float32), (shape[0], 1))
        elif comp.kind in ("vae_encoder", "taesd_encoder") and name == "sample":
            feeds[name] = rng.uniform(-1.0, 1.0, shape).astype(np.float32)
        elif "additional_residual" in name:
            feeds[name] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
        else:
            feeds[name] = rng.standard_normal(shape).astype(np.float32)
        if feeds[name].dtype != np.dtype(t["dtype"]):
            feeds[name] = feeds[name].astype(t["dtype"])
    return feeds


def _token_ids(rng: Any, shape: list[int]) -> Any:
    """Token ids shaped like a CLIP tokenizer's: BOS, a few words, EOS, then EOS padding."""
    import numpy as np

    from sdkiln.stages.common.tokenizer import VOCAB_SIZE

    bos, eos = VOCAB_SIZE - 2, VOCAB_SIZE - 1
    ids = np.full(shape, eos, dtype=np.int32)
    for row in ids:
        n = int(rng.integers(3, shape[1] - 2))
        row[0] = bos
        row[1 : n + 1] = rng.integers(0, VOCAB_SIZE - 2, n)
    return ids


# --------------------------------------------------------------------------------------------------
# PyTorch modules with graph signatures


def module_for(loaded: Any, comp: Component) -> Any:
    """The torch module behind a component of a ``pipeline_io.LoadedPipeline``."""
    if comp.kind == "controlnet":
        return loaded.controlnets[comp.controlnet_type]
    if comp.kind in ("vae_encoder", "vae_decoder"):
        return loaded.pipe.vae
    if comp.kind in ("taesd_encoder", "taesd_decoder"):
        if loaded.vae_tiny is None:
            raise UserError("the pipeline has no vae_tiny/ (TAESD) to export")
        return loaded.vae_tiny
    return getattr(loaded.pipe, comp.kind)


def torch_graph(loaded: Any, comp: Component) -> Any:
    """A torch module whose ``forward(*inputs)`` takes the graph inputs in spec order and returns the
    graph outputs in spec order: what gets exported, and the PyTorch reference of every parity gate."""
    return torch_io.graph_module(module_for(loaded, comp), comp.key, comp.input_names, comp.output_names)


def reference(module: Any, comp: Component, feeds: dict[str, Any]) -> dict[str, Any]:
    """Run the torch graph module on numpy feeds; fp32 numpy outputs by graph output name."""
    import torch

    with torch.inference_mode():
        outs = module(*(torch.from_numpy(feeds[n]) for n in comp.input_names))
    return {n: o.float().numpy() for n, o in zip(comp.output_names, outs, strict=True)}


def parity_cases(
    module: Any,
    comp: Component,
    batch_sizes: list[int],
    image_sizes: list[int],
    seed: int,
    vae_scale_factor: int = 8,
    static: dict[str, int] | None = None,
) -> list[ParityCase]:
    """Fixed inputs and PyTorch outputs at every batch size x image size (or the static shape only).

    A UNet with ControlNet residual inputs also gets a ``no_controlnet`` case: zero residuals against
    the PyTorch UNet called without residuals, which is how the runtime uses one graph for all tasks.
    """
    shapes = (
        [(static["batch"], static["height"], static["width"])]
        if static
        else [(b, s, s) for s in image_sizes for b in batch_sizes]
    )
    cases = []
    for i, (b, h, w) in enumerate(shapes):
        axes = bindings(b, h, w, vae_scale_factor)
        feeds = make_feeds(comp, axes, seed + 1000 * i)
        cases.append(ParityCase(f"b{b}_{h}x{w}", feeds, reference(module, comp, feeds)))
    residuals = [n for n in comp.input_names if "additional_residual" in n]
    if comp.kind == "unet" and residuals:
        import numpy as np

        first = cases[0].feeds
        zero = {k: (np.zeros_like(v) if k in residuals else v) for k, v in first.items()}
        plain = Component(
            comp.key,
            comp.kind,
            comp.folder,
            comp.config_source,
            tuple(t for t in comp.inputs if t["name"] not in residuals),
            comp.outputs,
        )
        plain_module = torch_io.graph_module(module.model, plain.key, plain.input_names, plain.output_names)
        expected = reference(plain_module, plain, {k: v for k, v in zero.items() if k not in residuals})
        cases.append(ParityCase(f"{cases[0].label}_no_controlnet", zero, expected))
    return cases


# --------------------------------------------------------------------------------------------------
# Layout


def copy_config(pipeline_dir: Path, comp: Component, out_dir: Path) -> None:
    """Put the component's ``config.json`` beside its graph (optimum reads e.g. the VAE's
    ``scaling_factor`` and the UNet's ``time_cond_proj_dim`` from there)."""
    src = Path(pipeline_dir) / comp.config_source / "config.json"
    if not src.is_file():
        raise BuildError(f"{src} is missing")
    dst = Path(out_dir) / comp.folder / "config.json"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def write_layout(pipeline_dir: Path, out_dir: Path, present: list[Component]) -> dict[str, Any]:
    """Tokenizers, scheduler (and feature extractor) from the pipeline, and a ``model_index.json`` whose
    entries match the folders present: graphs as ``["diffusers", "OnnxRuntimeModel"]``, other torch
    components (safety checker, image encoder) as ``[null, null]``, no ``vae`` entry (the VAE is split
    into encoder and decoder)."""
    pipeline_dir, out_dir = Path(pipeline_dir), Path(out_dir)
    index = json.loads((pipeline_dir / "model_index.json").read_text())
    keys = {c.key for c in present}
    index.pop("vae", None)
    for name, value in list(index.items()):
        if name.startswith("_") or not isinstance(value, list):
            continue
        if name in INDEXED:
            if name not in keys:
                index.pop(name)
        elif name in COPIED and value[0] is not None and (pipeline_dir / name).is_dir():
            shutil.copytree(pipeline_dir / name, out_dir / name, dirs_exist_ok=True)
        else:
            index[name] = [None, None]
    for name in INDEXED:
        if name in keys:
            index[name] = ["diffusers", "OnnxRuntimeModel"]
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index
