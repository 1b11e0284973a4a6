"""Model families as data: SD 1.5, SDXL, SSD-1B and SD-Turbo.

(One module of ~540 lines on purpose: it is a table, and the families read best side by side.)

Everything that differs between families lives in the ``FAMILIES`` table: components and their I/O
specs (names, shapes, dtypes, dynamic axes), latent channels and VAE scale factor, default scheduler,
default steps/guidance and tokenizer settings. Code elsewhere reads the
table; it never branches on the family name.

Pure data and plain Python: no torch, no diffusers (part of the runtime's contract). Parity tolerances
per component live in ``floors``.

Shapes are written with symbols, filled in from the actual component configs (``component_specs``):

- dynamic axes are strings: ``batch``, ``height``, ``width``, ``latent_height``, ``latent_width``, or
  expressions over them (``latent_height * 8``, ``latent_height / 2``);
- ``{name}`` placeholders are static sizes taken from a config (``{cross_attention_dim}``), so the
  same table serves the real models and the tiny test presets.

Example::

    from sdkiln.runtime.contract.families import get_family, component_specs
    fam = get_family("sdxl")
    specs = component_specs(fam, configs)  # configs: {"unet": unet_config_dict, ...}
    specs["unet"]["inputs"][0]  # {"name": "sample", "dtype": "float32", "shape": ["batch", 4, ...]}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sdkiln.runtime.contract.specs import resolve_shape

__all__ = [
    "FAMILIES",
    "SCHEDULERS",
    "SCHEDULER_CONFIG",
    "ComponentSpec",
    "Family",
    "component_specs",
    "controlnet_residual_specs",
    "detect_family",
    "generation_defaults",
    "get_family",
    "resolve_shape",
]

# --------------------------------------------------------------------------------------------------
# Building blocks


@dataclass(frozen=True)
class TensorTemplate:
    """One graph input or output, with placeholders for config values. ``when`` names a config key that must be truthy for it to exist
    (e.g. ``timestep_cond`` only when the UNet has ``time_cond_proj_dim``)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"
    when: str | None = None


@dataclass(frozen=True)
class ComponentSpec:
    """A model component: its folder in a diffusers pipeline, its diffusers/transformers class, and
    its graph I/O (contract names)."""

    name: str
    folder: str
    model_class: str
    inputs: tuple[TensorTemplate, ...]
    outputs: tuple[TensorTemplate, ...]


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
    inputs=(TensorTemplate("input_ids", (_B, _SEQ), "int32"),),
    outputs=(
        TensorTemplate("last_hidden_state", (_B, _SEQ, "{hidden_size}")),
        TensorTemplate("pooler_output", (_B, "{hidden_size}")),
    ),
)

# SDXL reads the penultimate layer of both encoders; the second one gives the projected pooled vector.
_SDXL_TEXT_ENCODER = ComponentSpec(
    name="text_encoder",
    folder="text_encoder",
    model_class="CLIPTextModel",
    inputs=_TEXT_ENCODER.inputs,
    outputs=(
        TensorTemplate("last_hidden_state", (_B, _SEQ, "{hidden_size}")),
        TensorTemplate("pooler_output", (_B, "{hidden_size}")),
        TensorTemplate("penultimate_hidden_state", (_B, _SEQ, "{hidden_size}")),
    ),
)
_SDXL_TEXT_ENCODER_2 = ComponentSpec(
    name="text_encoder_2",
    folder="text_encoder_2",
    model_class="CLIPTextModelWithProjection",
    inputs=_TEXT_ENCODER.inputs,
    outputs=(
        TensorTemplate("text_embeds", (_B, "{projection_dim}")),
        TensorTemplate("last_hidden_state", (_B, _SEQ, "{hidden_size}")),
        TensorTemplate("penultimate_hidden_state", (_B, _SEQ, "{hidden_size}")),
    ),
)

_UNET_INPUTS = (
    TensorTemplate("sample", (_B, "{in_channels}", _LH, _LW)),
    TensorTemplate("timestep", (_B,)),
    TensorTemplate("encoder_hidden_states", (_B, _SEQ, "{cross_attention_dim}")),
    TensorTemplate("timestep_cond", (_B, "{time_cond_proj_dim}"), when="time_cond_proj_dim"),
)
_SDXL_ADDED = (
    TensorTemplate("text_embeds", (_B, "{text_embeds_dim}")),
    TensorTemplate("time_ids", (_B, 6)),
)
_UNET_OUTPUTS = (TensorTemplate("out_sample", (_B, "{out_channels}", _LH, _LW)),)
# Residual inputs ("... when exported with them") are listed by ``controlnet_residual_specs``.


def _unet(added: bool) -> ComponentSpec:
    return ComponentSpec(
        name="unet",
        folder="unet",
        model_class="UNet2DConditionModel",
        inputs=_UNET_INPUTS + (_SDXL_ADDED if added else ()),
        outputs=_UNET_OUTPUTS,
    )


def _controlnet(added: bool) -> ComponentSpec:
    # Outputs are per-residual and depend on the config: see controlnet_residual_specs.
    return ComponentSpec(
        name="controlnet",
        folder="controlnet/{type}",
        model_class="ControlNetModel",
        inputs=(
            TensorTemplate("sample", (_B, "{in_channels}", _LH, _LW)),
            TensorTemplate("timestep", (_B,)),
            TensorTemplate("encoder_hidden_states", (_B, _SEQ, "{cross_attention_dim}")),
            TensorTemplate("controlnet_cond", (_B, 3, "latent_height * 8", "latent_width * 8")),
            TensorTemplate("conditioning_scale", (1,)),
        )
        + (_SDXL_ADDED if added else ()),
        outputs=(),
    )


_VAE_ENCODER = ComponentSpec(
    name="vae_encoder",
    folder="vae",
    model_class="AutoencoderKL",
    inputs=(TensorTemplate("sample", (_B, 3, "height", "width")),),
    outputs=(TensorTemplate("latent_sample", (_B, "{latent_channels}", "height / 8", "width / 8")),),
)
_VAE_DECODER = ComponentSpec(
    name="vae_decoder",
    folder="vae",
    model_class="AutoencoderKL",
    inputs=(TensorTemplate("latent_sample", (_B, "{latent_channels}", _LH, _LW)),),
    outputs=(TensorTemplate("sample", (_B, 3, "latent_height * 8", "latent_width * 8")),),
)
_TAESD_ENCODER = ComponentSpec(
    name="taesd_encoder",
    folder="vae_tiny",
    model_class="AutoencoderTiny",
    inputs=_VAE_ENCODER.inputs,
    outputs=_VAE_ENCODER.outputs,
)
_TAESD_DECODER = ComponentSpec(
    name="taesd_decoder",
    folder="vae_tiny",
    model_class="AutoencoderTiny",
    inputs=_VAE_DECODER.inputs,
    outputs=_VAE_DECODER.outputs,
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
            # Distilled small SD 1.5 UNets (one layer per down block: ``layers_per_block: 1`` in their
            # configs), same I/O and family: the difference is data in the UNet config.
            "small": HubModel("segmind/small-sd"),
            "small_v0": HubModel("OFA-Sys/small-stable-diffusion-v0"),
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


def controlnet_residual_count(block_out_channels: list[int] | tuple[int, ...], layers_per_block: int) -> int:
    """How many down-block residuals a UNet/ControlNet has: conv_in, each resnet layer, each downsampler."""
    n_blocks = len(block_out_channels)
    return 1 + n_blocks * layers_per_block + (n_blocks - 1)


def controlnet_residual_specs(unet_config: dict[str, Any]) -> tuple[list[TensorTemplate], TensorTemplate]:
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
    mid = TensorTemplate("mid_block_res_sample", (_B, channels[-1], _dim(_LH, div), _dim(_LW, div)))
    downs = [TensorTemplate(f"down_block_res_sample_{i}", s) for i, s in enumerate(shapes)]
    assert len(downs) == controlnet_residual_count(channels, layers)
    return downs, mid


def _dim(name: str, div: int) -> str:
    return name if div == 1 else f"{name} / {div}"


def _placeholder(d: int | str) -> str | None:
    """``"{cross_attention_dim}"`` -> ``"cross_attention_dim"``; None for anything else."""
    if isinstance(d, str) and len(d) > 2 and d[0] == "{" and d[-1] == "}" and d[1:-1].isidentifier():
        return d[1:-1]
    return None


def _fill(shape: tuple[int | str, ...], values: dict[str, Any]) -> list[int | str]:
    out: list[int | str] = []
    for d in shape:
        key = _placeholder(d)
        out.append(int(values[key]) if key else d)
    return out


def _tensor(t: TensorTemplate, values: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    return {"name": name or t.name, "dtype": t.dtype, "shape": _fill(t.shape, values)}


def _specs(
    ts: tuple[TensorTemplate, ...] | list[TensorTemplate], values: dict[str, Any]
) -> list[dict[str, Any]]:
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
