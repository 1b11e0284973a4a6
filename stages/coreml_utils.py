"""Core ML helpers shared by ``export_coreml`` and ``palettize_coreml``.

- **Layout and names**: the package file names and I/O names Apple's Swift ``StableDiffusion`` package
  loads (``TextEncoder``, ``Unet``/``ControlledUnet`` (+``Chunk1``/``Chunk2``), ``VAEDecoder``,
  ``VAEEncoder``, ``controlnet/<name>``; ``sample``/``timestep``/``encoder_hidden_states`` ->
  ``noise_pred``, ``input_ids`` -> ``last_hidden_state``/``pooled_outputs``, ``z`` -> ``image``, ...).
- **I/O wrappers**: ``nn.Module``s that give each diffusers component exactly that interface (what is
  traced and converted, and what parity checks rebuild).
- **Reading packages back** (Linux can read a package but not run it): ``read_spec`` (inputs, outputs,
  op histogram, from the protobuf alone), ``read_weights`` (every weight as a dense array, palettized
  ones decompressed from their lookup tables, with their storage cost), ``load_weights_into`` (put them
  into the torch module that was converted, matched by name) and ``psnr``.

Core ML names a converted weight after the attribute path of the traced module (``unet.conv_in.weight``
becomes ``unet_conv_in_weight``, then ``..._to_fp16`` and ``..._to_fp16_palettized``), which is what
``load_weights_into`` relies on; ``coreml_attention`` keeps the diffusers attribute names so this holds
in both attention modes.

This module imports torch at the top: import it only inside a stage's ``run`` (or in tests).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sdkiln.stages.core import BuildError
from sdkiln.stages.coreml_attention import apply_attention

logger = logging.getLogger(__name__)

PACKAGES_DIR = "packages"
CONTROLNET_DIR = "controlnet"

# Our component keys -> the package names Apple's Swift StableDiffusion package loads
# (StableDiffusionPipeline+Resources.swift, StableDiffusionXL+Resources.swift). ControlNets live in
# `controlnet/<name>` under the names an app passes to the pipeline; we use the ControlNet type.
APPLE_NAMES: dict[str, str] = {
    "text_encoder": "TextEncoder",
    "text_encoder_2": "TextEncoder2",
    "unet": "Unet",
    "controlled_unet": "ControlledUnet",
    "vae_decoder": "VAEDecoder",
    "vae_encoder": "VAEEncoder",
}
UNET_KEYS = ("unet", "controlled_unet")
RESIDUAL_PREFIX = "additional_residual_"  # ControlNet outputs = ControlledUnet inputs, mid residual last
TEXT_SEQ_LEN = 77  # CLIP's context: the token axis of every encoder_hidden_states


def apple_name(key: str) -> str:
    """The package name (without ``.mlpackage``) of a component key: ``unet`` -> ``Unet``,
    ``controlnet.scribble`` -> ``controlnet/scribble``."""
    if key.startswith("controlnet."):
        return f"{CONTROLNET_DIR}/{key.split('.', 1)[1]}"
    return APPLE_NAMES[key]


def package_relpath(key: str) -> str:
    """Where a component's package lives inside a COREML artifact."""
    return f"{PACKAGES_DIR}/{apple_name(key)}.mlpackage"


def chunk_relpaths(key: str) -> list[str]:
    """The two chunk packages of a chunked UNet (``UnetChunk1``/``UnetChunk2``, or the Controlled ones)."""
    if key not in UNET_KEYS:
        raise ValueError(f"only UNets are chunked, not {key!r}")
    return [f"{PACKAGES_DIR}/{APPLE_NAMES[key]}Chunk{i}.mlpackage" for i in (1, 2)]


def package_bytes(path: Path) -> int:
    """Size of a package (a folder) or a file, in bytes."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def psnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Peak signal-to-noise ratio of ``candidate`` against ``reference``, in dB: the peak is the
    reference's largest magnitude, the noise the RMS of the difference (the measure Apple's
    ml-stable-diffusion gates its conversions on, at 35 dB). ``inf`` when they are identical."""
    ref = np.asarray(reference, dtype=np.float64)
    diff = ref - np.asarray(candidate, dtype=np.float64)
    rms = math.sqrt(float(np.mean(diff * diff)))
    peak = float(np.max(np.abs(ref)))
    if rms == 0.0:
        return math.inf
    if peak == 0.0:
        return -math.inf
    return 20.0 * math.log10(peak / rms)


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
        out = self.text_encoder(input_ids.to(torch.long), output_hidden_states=self.hidden_layer is not None)
        hidden = out.last_hidden_state if self.hidden_layer is None else out.hidden_states[self.hidden_layer]
        return hidden, getattr(out, self.pooled)


class UnetIO(nn.Module):
    """``sample, timestep, encoder_hidden_states (B, D, 1, 77)[, timestep_cond][, text_embeds, time_ids]
    [, additional_residual_0..N-1]`` -> ``noise_pred``. The last residual is the mid-block one."""

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
        context = (
            encoder_hidden_states if self.channels_first else encoder_hidden_states.squeeze(2).transpose(1, 2)
        )
        kwargs: dict[str, Any] = {}
        i = 0
        if self.timestep_cond:
            kwargs["timestep_cond"] = extra[i]
            i += 1
        if self.added_cond:
            kwargs["added_cond_kwargs"] = {"text_embeds": extra[i], "time_ids": extra[i + 1]}
            i += 2
        residuals = extra[i:]
        if len(residuals) != self.residuals:
            raise ValueError(f"expected {self.residuals} ControlNet residuals, got {len(residuals)}")
        if residuals:
            kwargs["down_block_additional_residuals"] = tuple(residuals[:-1])
            kwargs["mid_block_additional_residual"] = residuals[-1]
        return self.unet(sample, timestep, context, return_dict=False, **kwargs)[0]


class ControlNetIO(nn.Module):
    """``sample, timestep, encoder_hidden_states (B, D, 1, 77), controlnet_cond, conditioning_scale
    [, text_embeds, time_ids]`` -> ``additional_residual_0..N-1`` (down residuals, then the mid one)."""

    def __init__(self, controlnet: nn.Module, attention: str, added_cond: bool):
        super().__init__()
        self.controlnet = controlnet
        self.channels_first = attention == "split_einsum"
        self.added_cond = added_cond

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, conditioning_scale: torch.Tensor,
                *extra: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
        context = (
            encoder_hidden_states if self.channels_first else encoder_hidden_states.squeeze(2).transpose(1, 2)
        )
        kwargs: dict[str, Any] = {}
        if self.added_cond:
            kwargs["added_cond_kwargs"] = {"text_embeds": extra[0], "time_ids": extra[1]}
        # A (1,) tensor broadcasts where diffusers multiplies each residual by the float scale.
        down, mid = self.controlnet(
            sample, timestep, context, controlnet_cond, conditioning_scale=conditioning_scale, return_dict=False,
            **kwargs,
        )  # fmt: skip
        return (*down, mid)


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
    from sdkiln.stages.families import controlnet_residual_specs, resolve_shape

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


# --------------------------------------------------------------------------------------------------
# Reading packages back


_DTYPE_NAMES = {65568: "float32", 65552: "float16", 65600: "float64", 131104: "int32"}


@dataclass
class PackageSpec:
    """What a package's protobuf says: I/O, deployment target (spec version) and its op histogram."""

    spec_version: int
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    ops: Counter = field(default_factory=Counter)
    metadata: dict[str, str] = field(default_factory=dict)

    def io_manifest(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return [t.to_manifest() for t in self.inputs], [t.to_manifest() for t in self.outputs]


def _feature(f: Any) -> TensorInfo:
    arr = f.type.multiArrayType
    default = None
    if f.type.isOptional:
        which = arr.WhichOneof("defaultOptionalValue")
        default = float(getattr(arr, which)) if which else None
    return TensorInfo(
        f.name, tuple(int(d) for d in arr.shape), _DTYPE_NAMES.get(arr.dataType, str(arr.dataType)), default
    )


def read_spec(path: Path) -> PackageSpec:
    """Read a package's interface and op histogram from its protobuf (no weights, no model load)."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    ops: Counter = Counter()
    if spec.WhichOneof("Type") == "mlProgram":
        for fn in spec.mlProgram.functions.values():
            for block in fn.block_specializations.values():
                for op in block.operations:
                    ops[op.type] += 1
    return PackageSpec(
        spec_version=int(spec.specificationVersion),
        inputs=[_feature(f) for f in spec.description.input],
        outputs=[_feature(f) for f in spec.description.output],
        ops=ops,
        metadata=dict(spec.description.metadata.userDefined),
    )


@dataclass
class WeightRecord:
    """One weight of a package: its dense values (as stored: fp16 or fp32, decompressed if palettized)
    and what it costs in the package."""

    name: str
    dense: np.ndarray
    storage_bits: int
    nbits: int | None = None  # palette bits when stored as a lookup table

    @property
    def palettized(self) -> bool:
        return self.nbits is not None


def _bits(dtype: Any) -> int:
    from coremltools.converters.mil.mil import types

    name = types.builtin_to_string(dtype)
    m = re.search(r"(\d+)$", name)
    if m is None:
        raise ValueError(f"no bit width for dtype {name}")
    return int(m.group(1))


def _storage_bits(op: Any) -> int:
    total = 0
    for var in op.inputs.values():
        if var.val is not None and np.ndim(var.val) > 0:
            total += int(np.size(var.val)) * _bits(var.dtype)
    return total


def load_program(path: Path) -> Any:
    """A package's MIL program (weights included), the way coremltools' own model tools read one."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    return milproto_load(spec, spec.specificationVersion, model.weights_dir)


def read_weights(path: Path) -> dict[str, WeightRecord]:
    """Every float tensor weight of a package by op name, densified. Lookup-table weights
    (``constexpr_lut_to_dense``) are decompressed and carry their palette bits; other ``constexpr_*``
    compressions are decompressed too. Scalars and the constant inputs of compression ops are skipped."""
    prog = load_program(path)
    records: dict[str, WeightRecord] = {}
    for fn in prog.functions.values():
        for op in fn.operations:
            out = op.outputs[0]
            if op.op_type.startswith("constexpr_"):
                dense = np.asarray(op.materialized_val_inference())
                nbits = None
                if op.op_type == "constexpr_lut_to_dense":
                    lut = np.asarray(op.inputs["lut"].val)
                    entries = lut.shape[-2] if lut.ndim >= 2 else lut.shape[0]
                    nbits = int(round(math.log2(entries)))
                records[op.name] = WeightRecord(op.name, dense, _storage_bits(op), nbits)
            elif op.op_type == "const":
                val = out.val
                if val is None or np.ndim(val) == 0 or not np.issubdtype(np.asarray(val).dtype, np.floating):
                    continue
                # The indices/lut/scale inputs of a compression op are not weights of their own.
                if out.child_ops and all(c.op_type.startswith("constexpr_") for c in out.child_ops):
                    continue
                arr = np.asarray(val)
                records[op.name] = WeightRecord(op.name, arr, arr.size * arr.dtype.itemsize * 8)
    return records


@dataclass
class WeightSummary:
    """Storage of a package's weights: how many, how many palettized, bits per weight."""

    elements: int
    palettized_elements: int
    storage_bytes: float
    lut_ops: int
    nbits: dict[int, int]  # palette bits -> number of tensors

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.storage_bytes / self.elements if self.elements else 0.0

    def metrics(self) -> dict[str, Any]:
        return {
            "weight_elements": self.elements,
            "palettized_fraction": round(self.palettized_elements / self.elements, 6)
            if self.elements
            else 0.0,
            "weight_bytes": int(self.storage_bytes),
            "bits_per_weight": round(self.bits_per_weight, 4),
            "lut_ops": self.lut_ops,
            "palette_bits": {str(k): v for k, v in sorted(self.nbits.items())},
        }


def summarize_weights(records: dict[str, WeightRecord]) -> WeightSummary:
    """Totals over ``read_weights``' records (lookup tables and indices counted at their stored size)."""
    nbits: Counter = Counter(r.nbits for r in records.values() if r.palettized)
    return WeightSummary(
        elements=sum(r.dense.size for r in records.values()),
        palettized_elements=sum(r.dense.size for r in records.values() if r.palettized),
        storage_bytes=sum(r.storage_bits for r in records.values()) / 8.0,
        lut_ops=sum(1 for r in records.values() if r.palettized),
        nbits=dict(nbits),
    )


# Suffixes coremltools appends to a weight's name as passes rewrite it (fp16 cast, palettization).
_NAME_SUFFIXES = ("_palettized", "_to_fp16", "_to_fp32")


def weight_key(op_name: str) -> str:
    """A weight op's name with coremltools' pass suffixes removed: the sanitised module path."""
    changed = True
    while changed:
        changed = False
        for suffix in _NAME_SUFFIXES:
            if op_name.endswith(suffix):
                op_name = op_name[: -len(suffix)]
                changed = True
    return op_name


def param_index(module: nn.Module) -> dict[str, str]:
    """Sanitised name (dots as underscores, as Core ML names weights) -> parameter/buffer name."""
    index: dict[str, str] = {}
    for name in module.state_dict():
        key = name.replace(".", "_")
        if key in index:
            raise ValueError(f"parameters {index[key]!r} and {name!r} have the same Core ML name")
        index[key] = name
    return index


@dataclass
class LoadReport:
    """What ``load_weights_into`` matched: parameter -> op name, and what it could not place."""

    matched: dict[str, str]
    unmatched_ops: list[str]  # weights in the package with no parameter of that name
    missing_params: list[str]  # parameters no package weight was found for (kept as they were)
    matched_palettized: int

    def metrics(self, module: nn.Module) -> dict[str, Any]:
        sd = module.state_dict()
        total = sum(v.numel() for v in sd.values())
        missing = sum(sd[n].numel() for n in self.missing_params)
        return {
            "matched_tensors": len(self.matched),
            "unmatched_package_weights": len(self.unmatched_ops),
            "params_not_in_package": len(self.missing_params),
            "param_elements_not_in_package": missing,
            "param_fraction_from_package": round(1 - missing / total, 6) if total else 0.0,
        }


@torch.no_grad()
def load_weights_into(module: nn.Module, records: dict[str, WeightRecord]) -> LoadReport:
    """Copy package weights into the torch module that was converted, matched by name.

    A package weight whose name matches no parameter, or whose size differs, is reported, not loaded.
    Parameters without a package weight keep their values: in practice GroupNorm's affine vectors,
    which the converter folds into other constants (a few hundred numbers, never palettized).
    """
    index = param_index(module)
    state = module.state_dict()
    matched: dict[str, str] = {}
    unmatched: list[str] = []
    n_pal = 0
    for op_name, rec in records.items():
        pname = index.get(weight_key(op_name))
        if pname is None or state[pname].numel() != rec.dense.size:
            # Small constants (folded norms, shapes) are expected; report only tensors worth noticing.
            if rec.dense.size > 1:
                unmatched.append(op_name)
            continue
        target = state[pname]
        target.copy_(torch.from_numpy(np.asarray(rec.dense, dtype=np.float32)).reshape(target.shape))
        matched[pname] = op_name
        n_pal += rec.palettized
    missing = [n for n in state if n not in matched and state[n].is_floating_point()]
    return LoadReport(matched, unmatched, missing, n_pal)


@dataclass
class PackageParity:
    """A package measured against the PyTorch reference by reading its weights back."""

    psnr_db: list[float]  # per output
    summary: WeightSummary
    load: dict[str, Any]  # LoadReport.metrics

    @property
    def worst_db(self) -> float:
        return min(self.psnr_db)


def measure_packages(
    packages: list[Path], folder: Path, key: str, model_class: str | None, attention: str, added_cond: bool,
    example: list[torch.Tensor], reference: list[np.ndarray],
) -> PackageParity:  # fmt: skip
    """Load the weights of ``packages`` (one package, or the chunks of one) into a fresh torch module of
    component ``key`` (from the PIPELINE ``folder``, in attention mode ``attention``), run it on
    ``example`` and measure each output's PSNR against ``reference``.

    Raises BuildError when a palettized weight maps to no parameter: the module would then run with
    the reference's own weights and the measurement would prove nothing.
    """
    records: dict[str, WeightRecord] = {}
    for package in packages:
        records.update(read_weights(package))
    summary = summarize_weights(records)
    module = build_module(key, load_model(folder, key, model_class), attention, added_cond)
    report = load_weights_into(module, records)
    del records
    if report.matched_palettized != summary.lut_ops:
        raise BuildError(
            f"{key}: only {report.matched_palettized} of {summary.lut_ops} palettized weights map to "
            "parameters; the parity check would not measure the package"
        )
    outputs = run_module(module, example)
    return PackageParity(
        [psnr(r, o) for r, o in zip(reference, outputs, strict=True)], summary, report.metrics(module)
    )
