"""load_pipeline: a diffusers pipeline from the Hub, a local folder or a preset, in the PIPELINE layout.

Recipe examples::

    - id: base            # SD 1.5 + scribble ControlNet + TAESD, pinned to commits in the lock
      stage: load_pipeline
      params:
        source: hub
        repo: stable-diffusion-v1-5/stable-diffusion-v1-5
        revision: main
        family: sd15
        components:
          controlnet.scribble: {repo: lllyasviel/control_v11p_sd15_scribble}
          vae_tiny: {repo: madebyollin/taesd}

    - id: base            # offline: a real architecture with seeded random weights
      stage: load_pipeline
      params: {source: preset, preset: tiny-sd15-controlnet, seed: 0}

Hub revisions are moving references: ``refs`` names them, the engine pins them (``resolve``) and passes
the shas in ``ctx.pins``; ``run`` downloads exactly the files needed from those commits (safetensors of
the requested variant; pickle checkpoints refused unless ``allow_pickle``). Remote code is never run:
only diffusers/transformers classes named in the table are instantiated.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.families import SCHEDULERS
from sdkiln.runtime.contract.layout import Kind
from sdkiln.stages.common.hub import REPO_PATTERN
from sdkiln.stages.engine.core import Stage, StageContext, StageParams

logger = logging.getLogger(__name__)

# Must list families.FAMILIES (a test checks): a Literal makes a bad name a validation error.
FamilyName = Literal["sd15", "sd-turbo", "sdxl", "ssd-1b"]
Role = Literal[
    "unet", "vae", "vae_tiny", "text_encoder", "text_encoder_2", "controlnet.scribble", "controlnet.canny"
]
# Model class per overridable role (text encoders take theirs from the family table).
ROLE_CLASS = {
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "vae_tiny": "AutoencoderTiny",
    "controlnet": "ControlNetModel",
}
# Folders of a Hub pipeline repo we load; anything else model_index.json lists (safety checker,
# feature extractor, image encoder) is neither downloaded nor loaded.
PIPELINE_FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


class ComponentOverride(StageParams):
    """A component taken from another Hub repo (a ControlNet, a fixed VAE, TAESD, an LCM UNet)."""

    repo: str = Field(pattern=REPO_PATTERN)
    revision: str = Field(default="main", min_length=1)
    subfolder: str | None = None
    variant: Literal["fp16"] | None = None


class LoadPipelineParams(StageParams):
    """Where the pipeline comes from. ``hub`` needs ``repo``; ``local`` needs ``path`` (relative to the
    recipe); ``preset`` needs ``preset``. ``components`` overrides or adds components from other repos."""

    source: Literal["hub", "local", "preset"]
    repo: str | None = Field(default=None, pattern=REPO_PATTERN)
    revision: str = Field(default="main", min_length=1)
    variant: Literal["fp16"] | None = None
    path: str | None = None
    preset: str | None = None
    seed: int = Field(default=0, ge=0)
    family: FamilyName | None = None
    components: dict[Role, ComponentOverride] = Field(default_factory=dict)
    # "family": the family's default (families.Generation.scheduler); "source": keep the folder's own.
    scheduler: Literal["family", "source", "lcm", "euler", "euler_a", "dpmpp", "ddim"] = "family"
    dtype: Literal["float32", "float16"] = "float32"
    allow_pickle: bool = False

    @model_validator(mode="after")
    def _source_fields(self) -> LoadPipelineParams:
        from sdkiln.stages.common.torch.presets import PRESETS

        needed = {"hub": "repo", "local": "path", "preset": "preset"}[self.source]
        if getattr(self, needed) is None:
            raise ValueError(f"source {self.source!r} needs {needed!r}")
        for other in ("repo", "path", "preset"):
            if other != needed and getattr(self, other) is not None:
                raise ValueError(f"{other!r} does not apply to source {self.source!r}")
        if self.source != "hub" and (self.revision != "main" or self.variant is not None):
            raise ValueError(
                "'revision' and 'variant' apply to source 'hub' only (components have their own)"
            )
        if self.source == "preset":
            if self.preset not in PRESETS:
                raise ValueError(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
            if self.family is not None and self.family != PRESETS[self.preset].family:
                raise ValueError(f"preset {self.preset!r} is family {PRESETS[self.preset].family!r}")
        elif self.seed != 0:
            raise ValueError("'seed' applies to source 'preset' only")
        return self


# --------------------------------------------------------------------------------------------------
# Pins


def _ref_name(role: str, repo: str) -> str:
    return f"hub:{role}:{repo}"


def refs(params: LoadPipelineParams) -> dict[str, str]:
    """Moving Hub references to pin: ``{"hub:base:<repo>": revision, "hub:<role>:<repo>": revision}``."""
    out: dict[str, str] = {}
    if params.source == "hub":
        out[_ref_name("base", params.repo)] = params.revision
    for role, comp in params.components.items():
        out[_ref_name(role, comp.repo)] = comp.revision
    return out


def resolve(name: str, ref: str) -> str:
    """Resolve one ``hub:<role>:<repo>`` reference to a commit sha (network; cache when offline)."""
    from sdkiln.stages.common.hub import resolve_ref

    return resolve_ref(name, ref)


def _pinned(ctx: StageContext, role: str, repo: str, revision: str) -> str:
    from sdkiln.stages.common.hub import resolve_revision

    sha = ctx.pins.get(_ref_name(role, repo))
    if sha is None:  # called outside the engine (tests, scripts): pin now
        sha = resolve_revision(repo, revision)
    return sha


def check(params: LoadPipelineParams, recipe_dir: Path) -> list[str]:
    """Plan-time problems: a local folder that does not exist or is not a diffusers folder."""
    problems = []
    if params.source == "local":
        folder = (recipe_dir / params.path).resolve()
        if not folder.is_dir():
            problems.append(f"params.path: folder {folder} does not exist")
        elif not (folder / "model_index.json").is_file():
            problems.append(f"params.path: {folder} is not a diffusers pipeline folder (no model_index.json)")
    return problems


# --------------------------------------------------------------------------------------------------
# Run


def _download_pipeline(ctx: StageContext, p: LoadPipelineParams) -> tuple[Path, dict[str, Any]]:
    from sdkiln.stages.common import hub

    sha = _pinned(ctx, "base", p.repo, p.revision)
    files = hub.list_files(p.repo, sha)
    if "model_index.json" not in files:
        raise UserError(f"{p.repo}@{sha} is not a diffusers pipeline repo (no model_index.json)")
    present = {f.split("/")[0] for f in files if "/" in f}
    overridden = set(p.components)
    folders = [f for f in PIPELINE_FOLDERS if f in present and f not in overridden]
    got = hub.fetch(p.repo, sha, folders, p.variant, p.allow_pickle)
    variant = hub.variant_in(got.files, p.variant)
    return got.snapshot, {
        "source": "hub",
        "repo": p.repo,
        "revision": p.revision,
        "sha": sha,
        "variant": variant,
        "files": list(got.files),
    }


def _load_base(
    snapshot: Path, family: str, p: LoadPipelineParams, torch_dtype: Any, variant: str | None
) -> Any:
    import diffusers

    from sdkiln.runtime.contract.families import get_family
    from sdkiln.stages.common.torch.pipeline import pipeline_class

    fam = get_family(family)
    cls_name = pipeline_class(snapshot)
    if cls_name != fam.pipeline_class:
        raise UserError(
            f"{snapshot}: pipeline class {cls_name} is not {fam.pipeline_class} (family {family})"
        )
    index = json.loads((snapshot / "model_index.json").read_text())
    # Components we do not load are passed as None: diffusers then neither looks for them nor builds them.
    skip = {k: None for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
    skip = {k: v for k, v in skip.items() if k not in PIPELINE_FOLDERS or k in p.components}
    return getattr(diffusers, cls_name).from_pretrained(
        str(snapshot),
        dtype=torch_dtype,
        use_safetensors=None if p.allow_pickle else True,
        variant=variant,
        **skip,
    )


def _load_override(
    ctx: StageContext,
    role: str,
    comp: ComponentOverride,
    family: str,
    p: LoadPipelineParams,
    torch_dtype: Any,
) -> tuple[Any, dict[str, Any]]:
    import diffusers
    import transformers

    from sdkiln.runtime.contract.families import get_family
    from sdkiln.stages.common import hub

    sha = _pinned(ctx, role, comp.repo, comp.revision)
    got = hub.fetch(
        comp.repo, sha, [comp.subfolder] if comp.subfolder else None, comp.variant, p.allow_pickle
    )
    snapshot, needed = got.snapshot, got.files
    base_role = role.split(".")[0]
    fam = get_family(family)
    cls_name = ROLE_CLASS.get(base_role) or fam.components[role].model_class
    module = diffusers if hasattr(diffusers, cls_name) else transformers
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "use_safetensors": None if p.allow_pickle else True}
    if comp.subfolder:
        kwargs["subfolder"] = comp.subfolder
    if hub.variant_in(needed, comp.variant):
        kwargs["variant"] = comp.variant
    model = getattr(module, cls_name).from_pretrained(str(snapshot), **kwargs)
    return model.eval(), {
        "repo": comp.repo,
        "revision": comp.revision,
        "sha": sha,
        "subfolder": comp.subfolder,
        "variant": hub.variant_in(needed, comp.variant),
        "files": list(needed),
    }


def run(ctx: StageContext) -> None:
    """Load, apply overrides and the scheduler choice, save in the PIPELINE layout, describe."""
    import torch

    from sdkiln.runtime.contract.families import get_family
    from sdkiln.stages.common.hub import refuse_pickles
    from sdkiln.stages.common.torch.pipeline import (
        describe_pipeline,
        infer_family,
        open_pipeline,
        save_pipeline,
    )
    from sdkiln.stages.common.torch.presets import build_preset, get_preset, make_scheduler

    p: LoadPipelineParams = ctx.params
    torch_dtype = getattr(torch, p.dtype)
    controlnets: dict[str, Any] = {}
    vae_tiny = None
    with ctx.timed("load_s"):
        if p.source == "preset":
            family = get_preset(p.preset).family
            built = build_preset(p.preset, seed=p.seed)
            pipe, controlnets, vae_tiny = built.pipe, dict(built.controlnets), built.vae_tiny
            source: dict[str, Any] = {"source": "preset", "preset": p.preset, "seed": p.seed}
        elif p.source == "local":
            folder = (ctx.recipe_dir / p.path).resolve()
            if not (folder / "model_index.json").is_file():
                raise UserError(f"params.path: {folder} is not a diffusers pipeline folder")
            refuse_pickles(folder, p.allow_pickle, what=str(folder))
            family = p.family or infer_family(folder)
            loaded = open_pipeline(folder, family=family, dtype=p.dtype, allow_pickle=p.allow_pickle)
            pipe, controlnets, vae_tiny = loaded.pipe, dict(loaded.controlnets), loaded.vae_tiny
            source = {"source": "local", "path": str(folder)}
        else:
            snapshot, source = _download_pipeline(ctx, p)
            family = p.family or infer_family(snapshot)
            pipe = _load_base(snapshot, family, p, torch_dtype, source["variant"])

        overrides = {}
        for role, comp in sorted(p.components.items()):
            model, info = _load_override(ctx, role, comp, family, p, torch_dtype)
            overrides[role] = info
            if role.startswith("controlnet."):
                controlnets[role.split(".", 1)[1]] = model
            elif role == "vae_tiny":
                vae_tiny = model
            else:
                pipe.register_modules(**{role: model})
        if overrides:
            source["components"] = overrides

    if p.scheduler != "source":
        # Built on the source's config (betas, prediction type); the runtime implements these keys.
        key = get_family(family).generation.scheduler if p.scheduler == "family" else p.scheduler
        pipe.scheduler = make_scheduler(family, key, base=dict(pipe.scheduler.config))
    if p.dtype != "float32":
        pipe.to(torch_dtype)
        for m in [*controlnets.values(), vae_tiny]:
            if m is not None:
                m.to(torch_dtype)

    with ctx.timed("save_s"):
        save_pipeline(pipe, ctx.out_dir, controlnets=controlnets, vae_tiny=vae_tiny)
    lcm = type(pipe.scheduler).__name__ == SCHEDULERS["lcm"]
    desc = describe_pipeline(
        ctx.out_dir,
        family=family,
        source=source,
        lcm=lcm,
        precision=_precision(p.dtype),
        scheduler=type(pipe.scheduler).__name__,
    )
    ctx.components.update(desc.components)
    ctx.model = desc.model
    ctx.metrics["bytes"] = desc.bytes
    ctx.metrics["unet_params"] = sum(x.numel() for x in pipe.unet.parameters())


def _precision(dtype: str) -> str:
    return {"float32": "fp32", "float16": "fp16"}[dtype]


def _bundle_dir(params: LoadPipelineParams) -> str | None:
    return None  # the loaded model is an intermediate; fuse_lora / exporters put theirs in the bundle


STAGE = Stage(
    name="load_pipeline",
    version="3",  # 2: configs carry no _name_or_path; 3: per-folder variant fallback, index-driven shards
    inputs={},
    output_kind=Kind.PIPELINE,
    params=LoadPipelineParams,
    run=run,
    description="Load a pipeline from the Hub (pinned), a local folder or a preset; safetensors only",
    env_packages=("torch", "diffusers", "transformers", "safetensors", "huggingface_hub"),
    bundle_dir=_bundle_dir,
    check=check,
    refs=refs,
    resolve=resolve,
)
