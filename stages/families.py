"""Model families as data: SD 1.5, SDXL, SSD-1B and SD-Turbo.

Everything that differs between families lives in the ``FAMILIES`` table: components and their I/O
specs (names, shapes, dtypes, dynamic axes), latent channels and VAE scale factor, default scheduler,
default steps/guidance, tokenizer settings and per-component parity tolerances. Code elsewhere reads the
table; it never branches on the family name.

Pure data and plain Python: no torch, no diffusers. The runtime may import this module.

Shapes are written with symbols, filled in from the actual component configs (``component_specs``):

- dynamic axes are strings: ``batch``, ``height``, ``width``, ``latent_height``, ``latent_width``, or
  expressions over them (``latent_height * 8``, ``latent_height / 2``);
- ``{name}`` placeholders are static sizes taken from a config (``{cross_attention_dim}``), so the
  same table serves the real models and the tiny test presets.

Example::

    from sdkiln.stages.families import get_family, component_specs
    fam = get_family("sdxl")
    specs = component_specs(fam, configs)  # configs: {"unet": unet_config_dict, ...}
    specs["unet"]["inputs"][0]  # {"name": "sample", "dtype": "float32", "shape": ["batch", 4, ...]}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# --------------------------------------------------------------------------------------------------
# Building blocks


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. ``when`` names a config key that must be truthy for it to exist
    (e.g. ``timestep_cond`` only when the UNet has ``time_cond_proj_dim``)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"
    when: str | None = None


@dataclass(frozen=True)
class Tolerance:
    """Parity tolerances of one component against its PyTorch fp32 reference.

    ``fp32_max_abs``/``fp32_min_cosine``: an fp32 export (ONNX, TensorRT fp32) vs PyTorch.
    ``lora_fuse_max_abs``/``lora_fuse_min_cosine``: fused weights vs the unfused model with adapters.
    ``min_sqnr_db``: quantized/low-precision output SQNR floors, per scheme (fp16, int8, qint8, ...).
    ``coreml_min_psnr_db``: Core ML output PSNR floor (Apple's ml-stable-diffusion uses 35 dB).
    """

    fp32_max_abs: float = 1e-3
    fp32_min_cosine: float = 0.99999
    lora_fuse_max_abs: float = 5e-3
    lora_fuse_min_cosine: float = 0.99999
    min_sqnr_db: dict[str, float] = field(default_factory=dict)
    coreml_min_psnr_db: float = 35.0


@dataclass(frozen=True)
class ComponentSpec:
    """A model component: its folder in a diffusers pipeline, its diffusers/transformers class, and
    its graph I/O (contract names)."""

    name: str
    folder: str
    model_class: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tolerance: Tolerance = Tolerance()


@dataclass(frozen=True)
class TokenizerSpec:
    """One tokenizer: its pipeline folder and pad token (``!`` for OpenCLIP-trained encoders)."""

    folder: str
    pad_token: str
    max_length: int = 77


@dataclass(frozen=True)
class Generation:
    """Default generation settings."""

    steps: int
    guidance: float
    scheduler: str  # a key of SCHEDULERS


@dataclass(frozen=True)
class HubModel:
    """A public Hub repo that belongs with a family (what the recipes use)."""

    repo: str
    subfolder: str | None = None


@dataclass(frozen=True)
class Family:
    """A model family: everything the build and the runtime need to know, as data."""

    name: str
    description: str
    pipeline_class: str
    components: dict[str, ComponentSpec]
    tokenizers: tuple[TokenizerSpec, ...]
    generation: Generation
    lcm_generation: Generation
    # UNet config values of the real model that identify the family in a folder (``detect_family``).
    detect: dict[str, Any]
    # The diffusers pipeline class per task, all sharing the components of ``pipeline_class``.
    task_pipelines: dict[str, str]
    default_size: int  # image side in pixels
    vae_scaling_factor: float
    latent_channels: int = 4
    vae_scale_factor: int = 8  # image pixels per latent pixel, every family and every preset
    controlnet_types: tuple[str, ...] = ()
    hub: dict[str, HubModel] = field(default_factory=dict)
    # Scheduler config overrides this family needs (SD-Turbo samples from the last timestep).
    scheduler_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def text_encoders(self) -> tuple[str, ...]:
        return tuple(n for n in self.components if n.startswith("text_encoder"))

    @property
    def uses_added_cond(self) -> bool:
        """Whether the UNet takes pooled text embeddings and time ids (SDXL micro-conditioning)."""
        return any(t.name == "text_embeds" for t in self.components["unet"].inputs)


# Scheduler keys (what recipes and the runtime name) -> diffusers class. The runtime implements the same
# keys in numpy; extra config per key comes from SCHEDULER_CONFIG.
SCHEDULERS: dict[str, str] = {
    "lcm": "LCMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
}
SCHEDULER_CONFIG: dict[str, dict[str, Any]] = {
    "dpmpp": {"algorithm_type": "dpmsolver++", "solver_order": 2},
}

# --------------------------------------------------------------------------------------------------
# I/O specs (names from the contract). Placeholders: {cross_attention_dim}, {text_hidden}, ...

_B, _LH, _LW = "batch", "latent_height", "latent_width"
_SEQ = 77

_TEXT_ENCODER = ComponentSpec(
    name="text_encoder",
    folder="text_encoder",
    model_class="CLIPTextModel",
    inputs=(TensorSpec("input_ids", (_B, _SEQ), "int32"),),
    outputs=(
        TensorSpec("last_hidden_state", (_B, _SEQ, "{hidden_size}")),
        TensorSpec("pooler_output", (_B, "{hidden_size}")),
    ),
    tolerance=Tolerance(fp32_max_abs=1e-3, min_sqnr_db={"fp16": 30.0, "int8": 20.0}),
)

# SDXL reads the penultimate layer of both encoders; the second one gives the projected pooled vector.
_SDXL_TEXT_ENCODER = ComponentSpec(
    name="text_encoder",
    folder="text_encoder",
    model_class="CLIPTextModel",
    inputs=_TEXT_ENCODER.inputs,
    outputs=(
        TensorSpec("last_hidden_state", (_B, _SEQ, "{hidden_size}")),
        TensorSpec("pooler_output", (_B, "{hidden_size}")),
        TensorSpec("penultimate_hidden_state", (_B, _SEQ, "{hidden_size}")),
    ),
    tolerance=_TEXT_ENCODER.tolerance,
)
_SDXL_TEXT_ENCODER_2 = ComponentSpec(
    name="text_encoder_2",
    folder="text_encoder_2",
    model_class="CLIPTextModelWithProjection",
    inputs=_TEXT_ENCODER.inputs,
    outputs=(
        TensorSpec("text_embeds", (_B, "{projection_dim}")),
        TensorSpec("last_hidden_state", (_B, _SEQ, "{hidden_size}")),
        TensorSpec("penultimate_hidden_state", (_B, _SEQ, "{hidden_size}")),
    ),
    tolerance=_TEXT_ENCODER.tolerance,
)

_UNET_INPUTS = (
    TensorSpec("sample", (_B, "{in_channels}", _LH, _LW)),
    TensorSpec("timestep", (_B,)),
    TensorSpec("encoder_hidden_states", (_B, _SEQ, "{cross_attention_dim}")),
    TensorSpec("timestep_cond", (_B, "{time_cond_proj_dim}"), when="time_cond_proj_dim"),
)
_SDXL_ADDED = (
    TensorSpec("text_embeds", (_B, "{text_embeds_dim}")),
    TensorSpec("time_ids", (_B, 6)),
)
_UNET_OUTPUTS = (TensorSpec("out_sample", (_B, "{out_channels}", _LH, _LW)),)
# Residual inputs ("... when exported with them") are listed by ``controlnet_residual_specs``.

_UNET_TOL = Tolerance(
    fp32_max_abs=2e-3,
    fp32_min_cosine=0.99999,
    lora_fuse_max_abs=5e-3,
    lora_fuse_min_cosine=0.99999,
    # quanto floors: tiny presets measured qint8 37.5, qfloat8 21.6, qint4 13.3 dB (random weights)
    min_sqnr_db={"fp16": 30.0, "int8": 18.0, "qint8": 25.0, "qfloat8": 15.0, "qint4": 8.0},
    coreml_min_psnr_db=35.0,
)


def _unet(added: bool) -> ComponentSpec:
    return ComponentSpec(
        name="unet",
        folder="unet",
        model_class="UNet2DConditionModel",
        inputs=_UNET_INPUTS + (_SDXL_ADDED if added else ()),
        outputs=_UNET_OUTPUTS,
        tolerance=_UNET_TOL,
    )


def _controlnet(added: bool) -> ComponentSpec:
    # Outputs are per-residual and depend on the config: see controlnet_residual_specs.
    return ComponentSpec(
        name="controlnet",
        folder="controlnet/{type}",
        model_class="ControlNetModel",
        inputs=(
            TensorSpec("sample", (_B, "{in_channels}", _LH, _LW)),
            TensorSpec("timestep", (_B,)),
            TensorSpec("encoder_hidden_states", (_B, _SEQ, "{cross_attention_dim}")),
            TensorSpec("controlnet_cond", (_B, 3, "latent_height * 8", "latent_width * 8")),
            TensorSpec("conditioning_scale", (1,)),
        )
        + (_SDXL_ADDED if added else ()),
        outputs=(),
        tolerance=_UNET_TOL,
    )


_VAE_TOL = Tolerance(fp32_max_abs=3e-3, min_sqnr_db={"fp16": 28.0, "int8": 18.0})
_VAE_ENCODER = ComponentSpec(
    name="vae_encoder",
    folder="vae",
    model_class="AutoencoderKL",
    inputs=(TensorSpec("sample", (_B, 3, "height", "width")),),
    outputs=(TensorSpec("latent_sample", (_B, "{latent_channels}", "height / 8", "width / 8")),),
    tolerance=_VAE_TOL,
)
_VAE_DECODER = ComponentSpec(
    name="vae_decoder",
    folder="vae",
    model_class="AutoencoderKL",
    inputs=(TensorSpec("latent_sample", (_B, "{latent_channels}", _LH, _LW)),),
    outputs=(TensorSpec("sample", (_B, 3, "latent_height * 8", "latent_width * 8")),),
    tolerance=_VAE_TOL,
)
_TAESD_ENCODER = ComponentSpec(
    name="taesd_encoder",
    folder="vae_tiny",
    model_class="AutoencoderTiny",
    inputs=_VAE_ENCODER.inputs,
    outputs=_VAE_ENCODER.outputs,
    tolerance=_VAE_TOL,
)
_TAESD_DECODER = ComponentSpec(
    name="taesd_decoder",
    folder="vae_tiny",
    model_class="AutoencoderTiny",
    inputs=_VAE_DECODER.inputs,
    outputs=_VAE_DECODER.outputs,
    tolerance=_VAE_TOL,
)


def _components(sdxl: bool) -> dict[str, ComponentSpec]:
    text = (
        {"text_encoder": _SDXL_TEXT_ENCODER, "text_encoder_2": _SDXL_TEXT_ENCODER_2}
        if sdxl
        else {"text_encoder": _TEXT_ENCODER}
    )
    return {
        **text,
        "unet": _unet(sdxl),
        "controlnet": _controlnet(sdxl),
        "vae_encoder": _VAE_ENCODER,
        "vae_decoder": _VAE_DECODER,
        "taesd_encoder": _TAESD_ENCODER,
        "taesd_decoder": _TAESD_DECODER,
    }


# --------------------------------------------------------------------------------------------------
# The table

_LCM = Generation(steps=4, guidance=1.0, scheduler="lcm")
_SD_TASKS = {
    "text": "StableDiffusionPipeline",
    "img2img": "StableDiffusionImg2ImgPipeline",
    "controlnet": "StableDiffusionControlNetPipeline",
    "controlnet_img2img": "StableDiffusionControlNetImg2ImgPipeline",
}
_SDXL_TASKS = {
    "text": "StableDiffusionXLPipeline",
    "img2img": "StableDiffusionXLImg2ImgPipeline",
    "controlnet": "StableDiffusionXLControlNetPipeline",
    "controlnet_img2img": "StableDiffusionXLControlNetImg2ImgPipeline",
}

FAMILIES: dict[str, Family] = {
    "sd15": Family(
        name="sd15",
        description="Stable Diffusion 1.5: CLIP ViT-L/14 text encoder, 860M UNet, 512x512",
        pipeline_class="StableDiffusionPipeline",
        components=_components(sdxl=False),
        tokenizers=(TokenizerSpec("tokenizer", pad_token="<|endoftext|>"),),
        generation=Generation(steps=25, guidance=7.5, scheduler="dpmpp"),
        lcm_generation=_LCM,
        detect={"cross_attention_dim": 768},
        task_pipelines=_SD_TASKS,
        default_size=512,
        vae_scaling_factor=0.18215,
        controlnet_types=("scribble", "canny"),
        hub={
            "base": HubModel("stable-diffusion-v1-5/stable-diffusion-v1-5"),
            "controlnet.scribble": HubModel("lllyasviel/control_v11p_sd15_scribble"),
            "controlnet.canny": HubModel("lllyasviel/control_v11p_sd15_canny"),
            "vae_tiny": HubModel("madebyollin/taesd"),
            "lcm_lora": HubModel("latent-consistency/lcm-lora-sdv1-5"),
        },
    ),
    "sd-turbo": Family(
        name="sd-turbo",
        description="SD-Turbo: SD 2.1 architecture (OpenCLIP-H text encoder) distilled for 1-4 steps, no CFG",
        pipeline_class="StableDiffusionPipeline",
        components=_components(sdxl=False),
        tokenizers=(TokenizerSpec("tokenizer", pad_token="!"),),
        generation=Generation(steps=1, guidance=0.0, scheduler="euler_a"),
        # Already few-step: LCM settings are the turbo ones.
        lcm_generation=Generation(steps=1, guidance=0.0, scheduler="euler_a"),
        detect={"cross_attention_dim": 1024},
        task_pipelines=_SD_TASKS,
        default_size=512,
        vae_scaling_factor=0.18215,
        hub={
            "base": HubModel("stabilityai/sd-turbo"),
            "vae_tiny": HubModel("madebyollin/taesd"),
        },
        scheduler_overrides={"timestep_spacing": "trailing"},
    ),
    "sdxl": Family(
        name="sdxl",
        description="SDXL 1.0 base: two text encoders, pooled embeddings and time ids, 1024x1024",
        pipeline_class="StableDiffusionXLPipeline",
        components=_components(sdxl=True),
        tokenizers=(
            TokenizerSpec("tokenizer", pad_token="<|endoftext|>"),
            TokenizerSpec("tokenizer_2", pad_token="!"),
        ),
        generation=Generation(steps=30, guidance=5.0, scheduler="euler"),
        lcm_generation=_LCM,
        detect={"cross_attention_dim": 2048, "transformer_layers_per_block": [1, 2, 10]},
        task_pipelines=_SDXL_TASKS,
        default_size=1024,
        vae_scaling_factor=0.13025,
        controlnet_types=("canny",),
        hub={
            "base": HubModel("stabilityai/stable-diffusion-xl-base-1.0"),
            "vae": HubModel("madebyollin/sdxl-vae-fp16-fix"),
            "controlnet.canny": HubModel("diffusers/controlnet-canny-sdxl-1.0"),
            "vae_tiny": HubModel("madebyollin/taesdxl"),
            "lcm_lora": HubModel("latent-consistency/lcm-lora-sdxl"),
        },
    ),
    "ssd-1b": Family(
        name="ssd-1b",
        description="Segmind SSD-1B: a distilled SDXL (fewer transformer blocks), same I/O as SDXL",
        pipeline_class="StableDiffusionXLPipeline",
        components=_components(sdxl=True),
        tokenizers=(
            TokenizerSpec("tokenizer", pad_token="<|endoftext|>"),
            TokenizerSpec("tokenizer_2", pad_token="!"),
        ),
        generation=Generation(steps=30, guidance=7.5, scheduler="euler"),
        lcm_generation=_LCM,
        # SDXL-shaped but not SDXL's transformer depths: checked after "sdxl" (table order).
        detect={"cross_attention_dim": 2048},
        task_pipelines=_SDXL_TASKS,
        default_size=1024,
        vae_scaling_factor=0.13025,
        controlnet_types=("canny",),
        hub={
            "base": HubModel("segmind/SSD-1B"),
            "vae": HubModel("madebyollin/sdxl-vae-fp16-fix"),
            "controlnet.canny": HubModel("diffusers/controlnet-canny-sdxl-1.0-small"),
            "vae_tiny": HubModel("madebyollin/taesdxl"),
            "lcm_lora": HubModel("latent-consistency/lcm-lora-ssd-1b"),
            "lcm_unet": HubModel("latent-consistency/lcm-ssd-1b"),
        },
    ),
}


def get_family(name: str) -> Family:
    """The family called ``name``; a ``KeyError`` that lists the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def generation_defaults(family: str | Family, lcm: bool = False) -> Generation:
    """Default steps / guidance / scheduler key; ``lcm`` after LCM-LoRA fusion or with an LCM UNet."""
    fam = get_family(family) if isinstance(family, str) else family
    return fam.lcm_generation if lcm else fam.generation


def detect_family(pipeline_class: str, unet_config: dict[str, Any]) -> str | None:
    """The first family (table order) whose pipeline class and ``detect`` values match a UNet config.

    Only real-size models can be recognised (the tiny presets match no real family): pass the family
    explicitly for those. Returns None when nothing matches.
    """
    for fam in FAMILIES.values():
        if fam.pipeline_class != pipeline_class:
            continue
        if all(_norm(unet_config.get(k)) == _norm(v) for k, v in fam.detect.items()):
            return fam.name
    return None


def _norm(v: Any) -> Any:
    # Configs store tuples as lists and a per-block value sometimes as one int.
    if isinstance(v, tuple | list):
        return [_norm(x) for x in v]
    return v


# --------------------------------------------------------------------------------------------------
# Specs filled in from configs

_PLACEHOLDER = re.compile(r"^\{(\w+)\}$")


def controlnet_residual_count(block_out_channels: list[int] | tuple[int, ...], layers_per_block: int) -> int:
    """How many down-block residuals a UNet/ControlNet has: conv_in, each resnet layer, each downsampler."""
    n_blocks = len(block_out_channels)
    return 1 + n_blocks * layers_per_block + (n_blocks - 1)


def controlnet_residual_specs(unet_config: dict[str, Any]) -> tuple[list[TensorSpec], TensorSpec]:
    """Shapes of the ControlNet down residuals and mid residual for a UNet config (the UNet's residual
    inputs and the ControlNet's outputs, modulo their names)."""
    channels = list(unet_config["block_out_channels"])
    layers = int(unet_config["layers_per_block"])
    shapes: list[tuple[int | str, ...]] = [(_B, channels[0], _LH, _LW)]
    div = 1
    for i, ch in enumerate(channels):
        for _ in range(layers):
            shapes.append((_B, ch, _dim(_LH, div), _dim(_LW, div)))
        if i < len(channels) - 1:
            div *= 2
            shapes.append((_B, ch, _dim(_LH, div), _dim(_LW, div)))
    mid = TensorSpec("mid_block_res_sample", (_B, channels[-1], _dim(_LH, div), _dim(_LW, div)))
    downs = [TensorSpec(f"down_block_res_sample_{i}", s) for i, s in enumerate(shapes)]
    assert len(downs) == controlnet_residual_count(channels, layers)
    return downs, mid


def _dim(name: str, div: int) -> str:
    return name if div == 1 else f"{name} / {div}"


def _fill(shape: tuple[int | str, ...], values: dict[str, Any]) -> list[int | str]:
    out: list[int | str] = []
    for d in shape:
        m = _PLACEHOLDER.match(d) if isinstance(d, str) else None
        out.append(int(values[m.group(1)]) if m else d)
    return out


def _tensor(t: TensorSpec, values: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    return {"name": name or t.name, "dtype": t.dtype, "shape": _fill(t.shape, values)}


def _specs(ts: tuple[TensorSpec, ...] | list[TensorSpec], values: dict[str, Any]) -> list[dict[str, Any]]:
    return [_tensor(t, values) for t in ts if t.when is None or values.get(t.when)]


def component_specs(
    family: str | Family,
    configs: dict[str, dict[str, Any]],
    controlnets: list[str] | tuple[str, ...] = (),
    taesd: bool = False,
    precision: str = "fp32",
    paths: dict[str, str] | None = None,
    unet_residual_inputs: bool = False,
) -> dict[str, dict[str, Any]]:
    """The manifest ``components`` section (contract) for a pipeline, with sizes from its configs.

    ``configs`` maps ``unet``, ``vae``, ``text_encoder`` (``text_encoder_2``) and optionally
    ``vae_tiny`` to the component's config dict. ``paths`` maps component names to the file each lives
    in (default: the diffusers folder). ``unet_residual_inputs`` adds the ControlNet residual inputs to
    the UNet spec (an export that takes them).
    """
    fam = get_family(family) if isinstance(family, str) else family
    unet_cfg = configs["unet"]
    values: dict[str, Any] = dict(unet_cfg)
    values["latent_channels"] = configs["vae"].get("latent_channels", fam.latent_channels)
    if fam.uses_added_cond:
        # The pooled projection of the last text encoder: what the UNet's add_embedding consumes.
        values["text_embeds_dim"] = int(unet_cfg["projection_class_embeddings_input_dim"]) - 6 * int(
            unet_cfg["addition_time_embed_dim"]
        )
    paths = paths or {}
    out: dict[str, dict[str, Any]] = {}

    def entry(key: str, spec: ComponentSpec, vals: dict[str, Any], folder: str) -> None:
        out[key] = {
            "path": paths.get(key, folder),
            "precision": precision,
            "inputs": _specs(spec.inputs, vals),
            "outputs": _specs(spec.outputs, vals),
        }

    for te in fam.text_encoders:
        entry(te, fam.components[te], {**configs[te]}, fam.components[te].folder)

    downs, mid = controlnet_residual_specs(unet_cfg)
    entry("unet", fam.components["unet"], values, "unet")
    if unet_residual_inputs:
        out["unet"]["inputs"] += [
            _tensor(t, values, f"down_block_additional_residual_{i}") for i, t in enumerate(downs)
        ] + [_tensor(mid, values, "mid_block_additional_residual")]

    for ctype in controlnets:
        key = f"controlnet.{ctype}"
        entry(key, fam.components["controlnet"], values, f"controlnet/{ctype}")
        out[key]["outputs"] = [_tensor(t, values) for t in downs] + [_tensor(mid, values)]

    entry("vae_encoder", fam.components["vae_encoder"], values, "vae")
    entry("vae_decoder", fam.components["vae_decoder"], values, "vae")
    if taesd:
        tvals = {**values, "latent_channels": configs.get("vae_tiny", {}).get("latent_channels", 4)}
        entry("taesd_encoder", fam.components["taesd_encoder"], tvals, "vae_tiny")
        entry("taesd_decoder", fam.components["taesd_decoder"], tvals, "vae_tiny")
    return out


def resolve_shape(shape: list[int | str], bindings: dict[str, int]) -> list[int]:
    """Evaluate a spec shape with concrete axis sizes: ``["batch", 4, "latent_height / 2"]`` with
    ``{"batch": 1, "latent_height": 64}`` gives ``[1, 4, 32]``. Raises KeyError on an unbound axis."""
    out = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
            continue
        m = re.fullmatch(r"\s*(\w+)\s*(?:([*/])\s*(\d+))?\s*", d)
        if not m:
            raise ValueError(f"cannot evaluate dimension {d!r}")
        base = bindings[m.group(1)]
        if m.group(2) == "*":
            base *= int(m.group(3))
        elif m.group(2) == "/":
            base //= int(m.group(3))
        out.append(base)
    return out


# --------------------------------------------------------------------------------------------------
# Core ML parity floors for the tiny presets (export_coreml, palettize_coreml).
#
# ``Tolerance.coreml_min_psnr_db`` (35 dB, Apple's gate) is for real weights. The tiny presets' weights
# are random and their outputs are sums of few terms, so quantisation noise does not average out the
# way it does in a trained model: the floors below are what a correct export/palettization of a tiny
# preset clears with margin, and what a broken one (wrong weights, missing layers) does not.
COREML_TINY_MIN_PSNR_DB: dict[str, float] = {
    "fp16": 50.0,  # fp16 weights read back, fp32 compute (measured 71-81 dB on tiny-sd15/sdxl)
    "palettized": 25.0,  # 6-bit k-means palettes: measured 38-46 dB (ControlNet lowest, UNet highest)
}
