"""Core ML helpers shared by ``export_coreml`` and ``palettize_coreml``: names, I/O wrappers, plans.

- **Layout and names**: the package file names and I/O names Apple's Swift ``StableDiffusion`` package
  loads (``TextEncoder``, ``Unet``/``ControlledUnet`` (+``Chunk1``/``Chunk2``), ``VAEDecoder``,
  ``VAEEncoder``, ``controlnet/<name>``; ``sample``/``timestep``/``encoder_hidden_states`` ->
  ``noise_pred``, ``input_ids`` -> ``last_hidden_state``/``pooled_outputs``, ``z`` -> ``image``, ...).
- **I/O wrappers**: ``nn.Module``s that give each diffusers component exactly that interface (what is
  traced and converted, and what parity checks rebuild).
- Reading packages back (Linux can read a package but not run it) is ``readback``.

Core ML names a converted weight after the attribute path of the traced module (``unet.conv_in.weight``
becomes ``unet_conv_in_weight``, then ``..._to_fp16`` and ``..._to_fp16_palettized``), which is what
``load_weights_into`` relies on; ``coreml_attention`` keeps the diffusers attribute names so this holds
in both attention modes.

This module imports torch at the top: import it only inside a stage's ``run`` (or in tests).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sdkiln.runtime.backends import torch_io
from sdkiln.runtime.contract.layout import (
    APPLE_NAMES,
    CONTROLNET_DIR,
    PACKAGES_DIR,
    UNET_KEYS,
    apple_name,
    chunk_relpaths,
    package_relpath,
)
from sdkiln.runtime.contract.manifest import ModelFacts
from sdkiln.runtime.contract.metrics import compare
from sdkiln.stages.common.coreml.attention import apply_attention

logger = logging.getLogger(__name__)

# Deployment targets whose Core ML runs per-grouped-channel palettes (one lookup table per group).
GROUPED_PALETTE_TARGETS = ("iOS18", "macOS15")
RESIDUAL_PREFIX = "additional_residual_"  # ControlNet outputs = ControlledUnet inputs, mid residual last
TEXT_SEQ_LEN = 77  # CLIP's context: the token axis of every encoder_hidden_states


def family_component(key: str) -> str:
    """The families-table component a key's tolerances come from."""
    if key.startswith("controlnet."):
        return "controlnet"
    return "unet" if key == "controlled_unet" else key


def psnr_floor(key: str, facts: ModelFacts, override: float | None, palettized: bool) -> float:
    """The parity floor for a component: the recipe's ``min_psnr_db`` if set; for a tiny preset the
    contract's tiny floors (``floors.COREML_TINY_MIN_PSNR_DB``); else the component's Core ML floor."""
    from sdkiln.runtime.contract.floors import COREML_TINY_MIN_PSNR_DB, tolerance

    if override is not None:
        return override
    if is_tiny(facts):
        return COREML_TINY_MIN_PSNR_DB["palettized" if palettized else "fp16"]
    return tolerance(family_component(key)).coreml_min_psnr_db


def is_tiny(facts: ModelFacts) -> bool:
    """Whether an artifact descends from a tiny preset (random test-sized weights)."""
    from sdkiln.stages.common.torch.presets import PRESETS

    preset = facts.source.get("preset")
    return preset in PRESETS and PRESETS[preset].size == "tiny"


def package_bytes(path: Path) -> int:
    """Size of a package (a folder) or a file, in bytes."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def psnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    """PSNR of ``candidate`` against ``reference`` in dB, the peak being the reference's largest
    magnitude (the measure Apple's ml-stable-diffusion gates its conversions on, at 35 dB): the
    contract's ``compare()["psnr_db"]``."""
    return compare(reference, candidate)["psnr_db"]


def flat_metrics(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    """``{"a": 1, "b": {"c": 2}}`` under ``"unet"`` -> ``{"unet.a": 1, "unet.b.c": 2}`` (the manifest's
    flat metric names)."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(flat_metrics(f"{prefix}.{k}", v))
        else:
            out[f"{prefix}.{k}"] = v
    return out


# --------------------------------------------------------------------------------------------------
# I/O wrappers: one diffusers/transformers component each, with Apple's interface.


class TextEncoderIO(nn.Module):
    """``input_ids`` (float32 token ids, Apple's convention) -> hidden states and a pooled vector.

    ``hidden_layer`` None takes the last hidden state (SD 1.x/2.x), -2 the penultimate (SDXL);
    ``pooled`` is ``pooler_output`` or, for ``CLIPTextModelWithProjection``, ``text_embeds``.
    """

    def __init__(self, text_encoder: nn.Module, hidden_layer: int | None, pooled: str):
        super().__init__()
        self.text_encoder = text_encoder
        self.hidden_layer = hidden_layer
        self.pooled = pooled

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = "last_hidden_state" if self.hidden_layer is None else "penultimate_hidden_state"
        out = torch_io.call(
            "text_encoder", self.text_encoder, {"input_ids": input_ids}, [hidden, self.pooled]
        )
        return out[hidden], out[self.pooled]


def tie_batch(reference: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` reshaped to ``reference``'s batch: a no-op in value, but in a converted program every
    batch-carrying input then shares the ``sample`` input's batch symbol."""
    b = reference.shape[0]
    return tuple(t.reshape(b, *t.shape[1:]) for t in tensors)


class UnetIO(nn.Module):
    """``sample, timestep, encoder_hidden_states (B, D, 1, 77)[, timestep_cond][, text_embeds, time_ids]
    [, additional_residual_0..N-1]`` -> ``noise_pred``. The last residual is the mid-block one.

    ``tie`` (set for a flexible-batch conversion) reshapes every input to ``sample``'s batch first
    (``tie_batch``)."""

    tie = False

    def __init__(
        self, unet: nn.Module, attention: str, timestep_cond: bool, added_cond: bool, residuals: int
    ):
        super().__init__()
        self.unet = unet
        # split_einsum transformers consume the channels-first context as it comes; diffusers' own
        # attention wants (B, 77, D).
        self.channels_first = attention == "split_einsum"
        self.timestep_cond = timestep_cond
        self.added_cond = added_cond
        self.residuals = residuals

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *extra: torch.Tensor) -> torch.Tensor:  # fmt: skip
        if self.tie:
            timestep, encoder_hidden_states, *rest = tie_batch(
                sample, timestep, encoder_hidden_states, *extra
            )
            extra = tuple(rest)
        context = (
            encoder_hidden_states if self.channels_first else encoder_hidden_states.squeeze(2).transpose(1, 2)
        )
        x: dict[str, Any] = {"sample": sample, "timestep": timestep, "encoder_hidden_states": context}
        i = 0
        if self.timestep_cond:
            x["timestep_cond"] = extra[i]
            i += 1
        if self.added_cond:
            x["text_embeds"], x["time_ids"] = extra[i], extra[i + 1]
            i += 2
        residuals = extra[i:]
        if len(residuals) != self.residuals:
            raise ValueError(f"expected {self.residuals} ControlNet residuals, got {len(residuals)}")
        if residuals:
            x |= {f"down_block_additional_residual_{j}": r for j, r in enumerate(residuals[:-1])}
            x["mid_block_additional_residual"] = residuals[-1]
        return torch_io.call("unet", self.unet, x, ["out_sample"])["out_sample"]


class ControlNetIO(nn.Module):
    """``sample, timestep, encoder_hidden_states (B, D, 1, 77), controlnet_cond, conditioning_scale
    [, text_embeds, time_ids]`` -> ``additional_residual_0..N-1`` (down residuals, then the mid one).
    ``tie``: as ``UnetIO``'s."""

    tie = False

    def __init__(self, controlnet: nn.Module, attention: str, added_cond: bool):
        super().__init__()
        self.controlnet = controlnet
        self.channels_first = attention == "split_einsum"
        self.added_cond = added_cond

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, conditioning_scale: torch.Tensor,
                *extra: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
        if self.tie:
            timestep, encoder_hidden_states, controlnet_cond, *rest = tie_batch(
                sample, timestep, encoder_hidden_states, controlnet_cond, *extra
            )
            extra = tuple(rest)
        context = (
            encoder_hidden_states if self.channels_first else encoder_hidden_states.squeeze(2).transpose(1, 2)
        )
        x: dict[str, Any] = {
            "sample": sample,
            "timestep": timestep,
            "encoder_hidden_states": context,
            "controlnet_cond": controlnet_cond,
            "conditioning_scale": conditioning_scale,
        }
        if self.added_cond:
            x["text_embeds"], x["time_ids"] = extra[0], extra[1]
        out = torch_io.call("controlnet", self.controlnet, x, [])
        downs = [out[f"down_block_res_sample_{j}"] for j in range(len(out) - 1)]
        return (*downs, out["mid_block_res_sample"])


class VAEDecoderIO(nn.Module):
    """``z`` (unscaled latents: the caller divides by the VAE scaling factor) -> ``image`` in [-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


class VAEEncoderIO(nn.Module):
    """``x`` (image in [-1, 1]) -> ``latent``: the posterior's moments (mean, then log-variance, along
    the channel axis), unscaled. Apple's Swift ``Encoder`` samples from them itself."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h


# --------------------------------------------------------------------------------------------------
# Component plans: what each package takes and gives, and how to rebuild its torch module.


@dataclass(frozen=True)
class TensorInfo:
    """One package input or output as the manifest records it (static shapes: Core ML fixes them)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    default: float | None = None  # set: an optional input with this default value

    def to_manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.default is not None:
            out["optional"] = True
            out["default"] = self.default
        return out

    @classmethod
    def from_manifest(cls, d: dict[str, Any]) -> TensorInfo:
        return cls(d["name"], tuple(int(x) for x in d["shape"]), d["dtype"], d.get("default"))


@dataclass(frozen=True)
class ComponentPlan:
    """A component to convert (or to rebuild for a parity check): its key, inputs and the torch module
    with Apple's interface."""

    key: str
    inputs: tuple[TensorInfo, ...]
    output_names: tuple[str, ...]
    description: str


def _text_output_names(hidden_layer: int | None) -> tuple[str, str]:
    # Apple's names: SD 1.x/2.x read `last_hidden_state`, SDXL's encoders `hidden_embeds`; both
    # `pooled_outputs`.
    return ("last_hidden_state" if hidden_layer is None else "hidden_embeds", "pooled_outputs")


def residual_shapes(
    unet_config: dict[str, Any], batch: int, latent_hw: tuple[int, int]
) -> list[tuple[int, ...]]:
    """Shapes of the ControlNet residuals a UNet takes (down ones, then the mid one), for fixed sizes
    (the family table's symbolic shapes, resolved)."""
    from sdkiln.runtime.contract.families import controlnet_residual_specs
    from sdkiln.runtime.contract.specs import resolve_shape

    downs, mid = controlnet_residual_specs(unet_config)
    axes = {"batch": batch, "latent_height": latent_hw[0], "latent_width": latent_hw[1]}
    return [tuple(resolve_shape(list(t.shape), axes)) for t in [*downs, mid]]


def config_key(key: str) -> str:
    """The ``read_configs`` entry a key's config comes from: ``controlled_unet`` is the ``unet``, both VAE
    halves are the ``vae`` (ControlNets have their own folders)."""
    if key in UNET_KEYS:
        return "unet"
    return "vae" if key.startswith("vae_") else key


def load_model(folder: Path, key: str, model_class: str | None = None) -> nn.Module:
    """Load one component's torch model (fp32, eval) from a PIPELINE folder, fresh from disk.

    ``model_class`` names the transformers class of a text encoder (``families.ComponentSpec``).
    """
    import diffusers

    folder = Path(folder)
    if key.startswith("text_encoder"):
        import transformers

        cls = getattr(transformers, model_class or "CLIPTextModel")
        return cls.from_pretrained(str(folder / key), torch_dtype=torch.float32).eval()
    if key in UNET_KEYS:
        return diffusers.UNet2DConditionModel.from_pretrained(
            str(folder / "unet"), torch_dtype=torch.float32
        ).eval()
    if key.startswith("controlnet."):
        path = folder / CONTROLNET_DIR / key.split(".", 1)[1]
        return diffusers.ControlNetModel.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    if key in ("vae_decoder", "vae_encoder"):
        return diffusers.AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=torch.float32).eval()
    raise ValueError(f"unknown Core ML component {key!r}")


def plan_component(
    key: str,
    config: dict[str, Any],
    batch: int,
    latent_hw: tuple[int, int],
    vae_scale_factor: int,
    added_cond: bool,
) -> ComponentPlan:
    """The inputs (names, fixed shapes, dtypes) and output names of component ``key`` with config
    ``config`` (the text encoder's, the UNet's, the ControlNet's or the VAE's), at a batch size
    (UNet/ControlNet; text encoder and VAE always take one) and a latent size."""
    lh, lw = latent_hw
    ih, iw = lh * vae_scale_factor, lw * vae_scale_factor
    if key.startswith("text_encoder"):
        seq = int(config["max_position_embeddings"])
        return ComponentPlan(
            key,
            (TensorInfo("input_ids", (1, seq)),),
            _text_output_names(-2 if added_cond else None),
            "CLIP text encoder",
        )
    if key in UNET_KEYS or key.startswith("controlnet."):
        inputs = [
            TensorInfo("sample", (batch, int(config["in_channels"]), lh, lw)),
            TensorInfo("timestep", (batch,)),
            # Apple's layout for the text states: (B, D, 1, 77), what the ANE attention consumes.
            TensorInfo("encoder_hidden_states", (batch, int(config["cross_attention_dim"]), 1, TEXT_SEQ_LEN)),
        ]
        added = []
        if added_cond:
            pooled = int(config["projection_class_embeddings_input_dim"]) - 6 * int(
                config["addition_time_embed_dim"]
            )
            added = [TensorInfo("text_embeds", (batch, pooled)), TensorInfo("time_ids", (batch, 6))]
        res = residual_shapes(config, batch, latent_hw)
        if key.startswith("controlnet."):
            inputs += [
                TensorInfo("controlnet_cond", (batch, 3, ih, iw)),
                # Optional (default 1): Apple's Swift ControlNet never passes it.
                TensorInfo("conditioning_scale", (1,), default=1.0),
                *added,
            ]
            outputs = tuple(f"{RESIDUAL_PREFIX}{i}" for i in range(len(res)))
            return ComponentPlan(key, tuple(inputs), outputs, "ControlNet: residuals for a ControlledUnet")
        if config.get("time_cond_proj_dim"):
            inputs.append(TensorInfo("timestep_cond", (batch, int(config["time_cond_proj_dim"]))))
        inputs += added
        if key == "controlled_unet":
            inputs += [TensorInfo(f"{RESIDUAL_PREFIX}{i}", s) for i, s in enumerate(res)]
        return ComponentPlan(key, tuple(inputs), ("noise_pred",), "UNet: predicts the noise in a latent")
    latent_ch = int(config["latent_channels"])
    if key == "vae_decoder":
        return ComponentPlan(key, (TensorInfo("z", (1, latent_ch, lh, lw)),), ("image",), "VAE decoder")
    if key == "vae_encoder":
        return ComponentPlan(key, (TensorInfo("x", (1, 3, ih, iw)),), ("latent",), "VAE encoder (moments)")
    raise ValueError(f"unknown Core ML component {key!r}")


def build_module(key: str, model: nn.Module, attention: str, added_cond: bool) -> nn.Module:
    """The torch module with Apple's interface for component ``key`` around ``model`` (from
    ``load_model``), in attention mode ``attention``.

    ``split_einsum`` rewrites the UNet/ControlNet *in place* (a second call finds nothing left to
    rewrite), so build the ``original`` module first when both are needed from one model.
    """
    if key.startswith("text_encoder"):
        pooled = "text_embeds" if hasattr(model, "text_projection") else "pooler_output"
        return TextEncoderIO(model, -2 if added_cond else None, pooled).eval()
    if key in UNET_KEYS:
        n_res = len(residual_shapes(dict(model.config), 1, (8, 8))) if key == "controlled_unet" else 0
        apply_attention(model, attention)
        return UnetIO(
            model, attention, bool(model.config.get("time_cond_proj_dim")), added_cond, n_res
        ).eval()
    if key.startswith("controlnet."):
        apply_attention(model, attention)
        return ControlNetIO(model, attention, added_cond).eval()
    if key == "vae_decoder":
        return VAEDecoderIO(model).eval()
    if key == "vae_encoder":
        return VAEEncoderIO(model).eval()
    raise ValueError(f"unknown Core ML component {key!r}")


def example_inputs(inputs: tuple[TensorInfo, ...], seed: int, vocab_size: int) -> list[torch.Tensor]:
    """Seeded inputs of the right kind for each named input (token ids, a mid-schedule timestep, a
    [0, 1] control image, a [-1, 1] image, SDXL time ids, Gaussian latents and states)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in inputs:
        shape = t.shape
        if t.name == "input_ids":
            x = torch.randint(0, vocab_size, shape, generator=g).to(torch.float32)
        elif t.name == "timestep":
            x = torch.full(shape, 500.0)
        elif t.name == "conditioning_scale":
            x = torch.full(shape, 1.0 if t.default is None else float(t.default))
        elif t.name == "controlnet_cond":
            x = torch.rand(shape, generator=g)
        elif t.name == "x":
            x = torch.rand(shape, generator=g) * 2 - 1
        elif t.name == "time_ids":
            x = torch.tensor([512.0, 512.0, 0.0, 0.0, 512.0, 512.0]).repeat(shape[0], 1)
        else:
            x = torch.randn(shape, generator=g)
        out.append(x)
    return out


@torch.no_grad()
def run_module(module: nn.Module, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    """Run a wrapper and return its outputs as float32 numpy arrays (always a list)."""
    out = module(*inputs)
    outs = out if isinstance(out, tuple | list) else (out,)
    return [o.detach().float().numpy() for o in outs]


__all__ = [
    "APPLE_NAMES",
    "CONTROLNET_DIR",
    "PACKAGES_DIR",
    "UNET_KEYS",
    "apple_name",
    "chunk_relpaths",
    "package_relpath",
]


# -- saving, reproducibly ---------------------------------------------------------------------------
def save_package(mlmodel: Any, path: Path) -> None:
    """``mlmodel.save(path)``, then make the package byte-for-byte reproducible (``normalize_package``)."""
    mlmodel.save(str(path))
    normalize_package(Path(path))


def normalize_package(path: Path) -> None:
    """Make an ``.mlpackage`` a function of its content alone.

    coremltools names the package's items with random UUIDs (``Manifest.json``) and serializes the
    model spec's maps (user metadata) in hash order, so two saves of one model differ in bytes and a
    content-addressed cache or a byte comparison across machines would see two artifacts. Here each
    item id becomes a UUID5 of its path, and the spec is re-serialized deterministically. Core ML reads
    the result exactly as before: the ids are opaque and protobuf map order carries no meaning.
    """
    import json
    import uuid

    from coremltools.proto import Model_pb2

    manifest_path = path / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    renamed = {
        old: str(uuid.uuid5(uuid.NAMESPACE_URL, f"sdkiln:mlpackage:{item['path']}")).upper()
        for old, item in manifest["itemInfoEntries"].items()
    }
    manifest["itemInfoEntries"] = {
        renamed[old]: item
        for old, item in sorted(manifest["itemInfoEntries"].items(), key=lambda kv: renamed[kv[0]])
    }
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")
    for item in manifest["itemInfoEntries"].values():
        if not item["path"].endswith(".mlmodel"):
            continue
        spec_path = path / "Data" / item["path"]
        spec = Model_pb2.Model()
        spec.ParseFromString(spec_path.read_bytes())
        spec_path.write_bytes(spec.SerializeToString(deterministic=True))
