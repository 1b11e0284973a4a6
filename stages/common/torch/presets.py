"""Preset models: real architectures built from their configs with seeded random weights, no download.

``tiny-*`` presets use diffusers-test-sized configs (they build in seconds and run 2 steps in well under
a second); ``sd15``, ``sd15-controlnet``, ``sd15-scribble``, ``sd15-small`` (the distilled small SD 1.5
UNets), ``sd-turbo``, ``sdxl``, ``sdxl-controlnet``, ``ssd-1b-controlnet`` have the shapes and compute of
the real models. Architecture differences (SSD-1B's transformer depths, the small UNets' one layer per
block, the small SDXL ControlNet) are config data in this table. Every preset ships the real CLIP tokenizer (``tokenizer.py``), so prompts tokenize as
with the real weights, and every VAE downsamples by 8 (``families.Family.vae_scale_factor``).

ControlNets are made with ``ControlNetModel.from_unet`` and then their zero-initialised output convs
are randomised: otherwise every residual is exactly 0 and residual parity checks prove nothing.

Example::

    from sdkiln.stages.common.torch.presets import save_preset
    desc = save_preset("tiny-sd15-controlnet", Path("/tmp/tiny"), seed=0)
    desc.model  # ModelFacts(family="sd15", controlnets=["scribble", "canny"], taesd=True, ...)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdkiln.runtime.contract.families import SCHEDULER_CONFIG, SCHEDULERS, get_family

if TYPE_CHECKING:
    from sdkiln.stages.common.torch.pipeline import PipelineDescription

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Architectures (plain dicts: the keyword arguments of the diffusers / transformers config classes)

_TINY_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
    "hidden_act": "gelu",
}
_CLIP_L = {  # CLIP ViT-L/14 text tower: SD 1.x, SDXL's first encoder
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
_CLIP_BIGG = {  # OpenCLIP ViT-bigG/14 text tower: SDXL's second encoder
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}

_TINY_UNET_SD = {
    "sample_size": 32,
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": (2, 4),
    "norm_num_groups": 32,
}
_TINY_UNET_SDXL = {
    **_TINY_UNET_SD,
    "use_linear_projection": True,
    "transformer_layers_per_block": (1, 2),
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,  # time ids + pooled text (projection_dim)
    "cross_attention_dim": 64,  # both encoders' hidden states, concatenated
}
_SD15_UNET = {
    "sample_size": 64,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
# The distilled small SD 1.5 UNets (segmind/small-sd, OFA-Sys/small-stable-diffusion-v0): SD 1.5 with
# one ResNet (and attention) per down block and two per up block, the mid block kept.
_SD15_SMALL_UNET = {**_SD15_UNET, "layers_per_block": 1}
_TINY_UNET_SD_SMALL = {**_TINY_UNET_SD, "layers_per_block": 1}
_SD21_UNET = {  # SD 2.x / SD-Turbo: linear projections, per-block head dims, OpenCLIP-H context
    **_SD15_UNET,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
    "cross_attention_dim": 1024,
}
_CLIP_H = {  # OpenCLIP ViT-H/14 text tower as SD 2.x ships it (23 of its 24 layers)
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "projection_dim": 512,
    "hidden_act": "gelu",
}
_SDXL_UNET = {
    "sample_size": 128,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
# Segmind SSD-1B: SDXL with transformer blocks removed (per down block 0/2/4, per up block 4,4,10 /
# 2,1,1 / none) and a mid block without attention (ComfyUI's SSD_1B table; diffusers' nested
# transformer_layers_per_block).
_SSD1B_UNET = {
    **_SDXL_UNET,
    "transformer_layers_per_block": [[1, 1], [2, 2], [4, 4]],
    "reverse_transformer_layers_per_block": [[4, 4, 10], [2, 1, 1], [1, 1, 1]],
    "mid_block_type": "UNetMidBlock2D",
}

# The same traits at test size: per-layer transformer depths and a mid block without attention.
_TINY_UNET_SSD1B = {
    **_TINY_UNET_SDXL,
    "transformer_layers_per_block": [[1, 1], [1, 1]],
    "reverse_transformer_layers_per_block": [[2, 1, 1], [1, 1, 1]],
    "mid_block_type": "UNetMidBlock2D",
}
# diffusers/controlnet-canny-sdxl-1.0-small: an SDXL ControlNet without transformer layers in its
# down blocks (168M parameters, the "7x smaller" of its model card; its config file was not seen).
_SMALL_SDXL_CN_UNET = {
    "transformer_layers_per_block": [0, 0, 0],
    "reverse_transformer_layers_per_block": None,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}
_TINY_SMALL_SDXL_CN_UNET = {**_SMALL_SDXL_CN_UNET, "transformer_layers_per_block": [0, 0]}

# Four blocks, so the VAE downsamples by 8 like the real one, with few channels.
_TINY_VAE = {
    "block_out_channels": (8, 16, 32, 32),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 4,
    "sample_size": 256,
}
_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
}
_TINY_TAESD = {
    "encoder_block_out_channels": (8, 8, 8, 8),
    "decoder_block_out_channels": (8, 8, 8, 8),
    "num_encoder_blocks": (1, 1, 1, 1),
    "num_decoder_blocks": (1, 1, 1, 1),
}
_TAESD: dict[str, Any] = {}  # AutoencoderTiny's defaults are TAESD's architecture
_TINY_CN = {"conditioning_embedding_out_channels": (8, 16, 16, 32)}
_CN = {"conditioning_embedding_out_channels": (16, 32, 96, 256)}

# Scheduler config shared by SD 1.x/2.x/XL checkpoints; family and scheduler overrides go on top.
_SCHEDULER_BASE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}


@dataclass(frozen=True)
class Preset:
    """A named architecture: family, component configs, extras (ControlNets, TAESD)."""

    name: str
    family: str
    size: str  # "tiny" or "real"
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]  # one per family text encoder, in order
    controlnet: dict[str, Any]
    taesd: dict[str, Any]
    controlnets: tuple[str, ...] = ()
    with_taesd: bool = False
    # UNet config keys changed for the UNet the ControlNets copy (empty: the preset's own UNet)
    controlnet_unet: dict[str, Any] = field(default_factory=dict)


def _p(name: str, family: str, size: str, **kw: Any) -> Preset:
    tiny = size == "tiny"
    sdxl = get_family(family).uses_added_cond
    text = (
        (_TINY_TEXT, _TINY_TEXT)
        if tiny and sdxl
        else (_TINY_TEXT,)
        if tiny
        else (_CLIP_L, _CLIP_BIGG)
        if sdxl
        else (_CLIP_L,)
    )
    unet = (_TINY_UNET_SDXL if sdxl else _TINY_UNET_SD) if tiny else (_SDXL_UNET if sdxl else _SD15_UNET)
    return Preset(
        name=name,
        family=family,
        size=size,
        unet=kw.pop("unet", unet),
        vae=kw.pop("vae", _TINY_VAE if tiny else _VAE),
        text_encoders=kw.pop("text_encoders", text),
        controlnet=_TINY_CN if tiny else _CN,
        taesd=_TINY_TAESD if tiny else _TAESD,
        **kw,
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _p("tiny-sd15", "sd15", "tiny"),
        _p("tiny-sd15-controlnet", "sd15", "tiny", controlnets=("scribble", "canny"), with_taesd=True),
        _p("tiny-sd15-small", "sd15", "tiny", unet=_TINY_UNET_SD_SMALL, with_taesd=True),
        _p("tiny-sd-turbo", "sd-turbo", "tiny", unet={**_TINY_UNET_SD, "use_linear_projection": True}),
        _p("tiny-sdxl", "sdxl", "tiny"),
        _p("tiny-sdxl-controlnet", "sdxl", "tiny", controlnets=("canny",), with_taesd=True),
        _p(
            "tiny-ssd-1b-controlnet",
            "ssd-1b",
            "tiny",
            unet=_TINY_UNET_SSD1B,
            controlnets=("canny",),
            with_taesd=True,
            controlnet_unet=_TINY_SMALL_SDXL_CN_UNET,
        ),  # fmt: skip
        _p("sd15", "sd15", "real"),
        _p("sd15-controlnet", "sd15", "real", controlnets=("scribble", "canny"), with_taesd=True),
        _p("sd15-scribble", "sd15", "real", controlnets=("scribble",), with_taesd=True),
        _p("sd15-small", "sd15", "real", unet=_SD15_SMALL_UNET, with_taesd=True),
        _p("sd-turbo", "sd-turbo", "real", unet=_SD21_UNET, text_encoders=(_CLIP_H,)),
        _p("sdxl", "sdxl", "real"),
        _p("sdxl-controlnet", "sdxl", "real", controlnets=("canny",), with_taesd=True),
        _p(
            "ssd-1b-controlnet",
            "ssd-1b",
            "real",
            unet=_SSD1B_UNET,
            controlnets=("canny",),
            with_taesd=True,
            controlnet_unet=_SMALL_SDXL_CN_UNET,
        ),  # fmt: skip
    ]
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a ``KeyError`` listing the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


# --------------------------------------------------------------------------------------------------
# Building


def _text_encoder(cfg: dict[str, Any], model_class: str):
    import transformers

    from sdkiln.stages.common.tokenizer import VOCAB_SIZE, clip_vocab

    vocab = clip_vocab()
    config = transformers.CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        **cfg,
    )
    return getattr(transformers, model_class)(config).eval()


def make_scheduler(family: str, key: str | None = None, base: dict[str, Any] | None = None):
    """A diffusers scheduler for a family: ``key`` from ``families.SCHEDULERS`` (default: the family's),
    built on ``base`` (a scheduler config; default: the SD checkpoints' one)."""
    import diffusers

    fam = get_family(family)
    key = key or fam.generation.scheduler
    config = {**_SCHEDULER_BASE, **(base or {}), **SCHEDULER_CONFIG.get(key, {}), **fam.scheduler_overrides}
    return getattr(diffusers, SCHEDULERS[key]).from_config(config)


def randomise_zero_convs(controlnet: Any, seed: int) -> None:
    """Give a ControlNet's zero-initialised convs (down/mid residual projections and the conditioning
    embedding's output) seeded default-init weights, so its residuals are not identically 0."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in [
            *controlnet.controlnet_down_blocks,
            controlnet.controlnet_mid_block,
            controlnet.controlnet_cond_embedding.conv_out,
        ]:
            module.reset_parameters()


@dataclass
class Built:
    """A built preset: the base pipeline plus the extras the PIPELINE layout carries."""

    preset: Preset
    pipe: Any
    controlnets: dict[str, Any]
    vae_tiny: Any | None


def build_preset(name: str, seed: int = 0) -> Built:
    """Build a preset in memory with seeded random weights (same seed, same weights)."""
    import diffusers
    import torch

    from sdkiln.stages.common.tokenizer import make_tokenizer
    from sdkiln.stages.common.torch.pipeline import make_pipeline

    preset = get_preset(name)
    fam = get_family(preset.family)
    # Each component gets its own seed so that adding one never changes another's weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = diffusers.UNet2DConditionModel(**preset.unet).eval()
        torch.manual_seed(seed + 1)
        vae = diffusers.AutoencoderKL(**preset.vae, scaling_factor=fam.vae_scaling_factor).eval()
        components: dict[str, Any] = {"unet": unet, "vae": vae}
        for i, (te, cfg) in enumerate(zip(fam.text_encoders, preset.text_encoders, strict=True)):
            torch.manual_seed(seed + 2 + i)
            components[te] = _text_encoder(cfg, fam.components[te].model_class)
        for tok in fam.tokenizers:
            components[tok.folder] = make_tokenizer(pad_token=tok.pad_token, model_max_length=tok.max_length)
        components["scheduler"] = make_scheduler(fam.name)
        controlnets = {}
        cn_source = unet
        if preset.controlnet_unet and preset.controlnets:
            torch.manual_seed(seed + 9)
            cn_source = diffusers.UNet2DConditionModel(**{**preset.unet, **preset.controlnet_unet})
        for i, ctype in enumerate(preset.controlnets):
            cn = diffusers.ControlNetModel.from_unet(cn_source, **preset.controlnet).eval()
            randomise_zero_convs(cn, seed + 10 + i)
            controlnets[ctype] = cn
        vae_tiny = None
        if preset.with_taesd:
            torch.manual_seed(seed + 20)
            vae_tiny = diffusers.AutoencoderTiny(**preset.taesd).eval()
    pipe = make_pipeline(fam.pipeline_class, components)
    return Built(preset=preset, pipe=pipe, controlnets=controlnets, vae_tiny=vae_tiny)


def save_preset(name: str, out_dir: Path, seed: int = 0) -> PipelineDescription:
    """Build preset ``name`` and save it in the PIPELINE layout (contract) into ``out_dir``; returns what
    its manifest says (components with their I/O specs, model facts, bytes)."""
    from sdkiln.stages.common.torch.pipeline import describe_pipeline, save_pipeline

    built = build_preset(name, seed=seed)
    save_pipeline(built.pipe, out_dir, controlnets=built.controlnets, vae_tiny=built.vae_tiny)
    return describe_pipeline(
        out_dir,
        family=built.preset.family,
        source={"source": "preset", "preset": name, "seed": seed},
        lcm=False,
    )
