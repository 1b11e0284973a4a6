"""fuse_lora: fuse LoRAs (LCM-LoRA first of all, and style LoRAs) into the UNet and text encoders.

Recipe example::

    - id: fused
      stage: fuse_lora
      inputs: {model: base}
      params:
        loras:
          - {source: hub, repo: latent-consistency/lcm-lora-sdv1-5, kind: lcm, scale: 1.0}
          - {source: local, path: loras/ink.safetensors, scale: 0.6}

Each LoRA file (diffusers/PEFT keys ``...lora_A/lora_B`` or kohya keys ``lora_unet_..._lora_down`` with
``.alpha``, as LCM-LoRA ships them: convs, projections and time-embedding layers included) goes through
diffusers' own loader as a named adapter with its scale. A key that names no layer of the model is an
error naming that key (``common.torch.lora.unmatched_keys``), before anything is loaded. The output of the UNet (and of
every text encoder the LoRAs touch) with the adapters active is the reference; the adapters are then
fused and unloaded, and the fused model must match that reference within the family's tolerance
(``Tolerance.lora_fuse_*``), or the step fails. The saved UNet has no LoRA keys (checked on disk).

An ``lcm`` LoRA switches the scheduler to LCMScheduler and marks the artifact ``lcm``.

The ``preset`` source builds a seeded random LoRA in the requested key format (``peft`` or ``kohya``)
for the input model's architecture, writes it as a safetensors file and loads it through the same path
as real files: this exercises fusion offline on the tiny presets. ``layers: lcm-lora`` adapts what the
public LCM-LoRAs adapt (UNet only, ResNet convs, shortcuts, time-embedding projections and resampler
convs included). Its ``lora_B``/``lora_up`` weights are
random, not zero, so the LoRA changes the outputs and the parity check means something.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from sdkiln.runtime.contract.errors import BuildError, ParityError, UserError
from sdkiln.runtime.contract.layout import Kind
from sdkiln.stages.common.hub import REPO_PATTERN
from sdkiln.stages.common.torch.lora import LCM_LORA_UNET_TARGETS
from sdkiln.stages.engine.core import Stage, StageContext, StageParams

logger = logging.getLogger(__name__)

DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# The module names a preset LoRA targets: attention projections, feed-forward, transformer in/out and
# ResNet convs (LCM-LoRA's layers up to its ResNet convs), so both Linear and Conv2d fusion are exercised.
PRESET_UNET_TARGETS = LCM_LORA_UNET_TARGETS[: LCM_LORA_UNET_TARGETS.index("conv2") + 1]
PRESET_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# kohya prefixes of the text encoders, by how many the family has
KOHYA_TE_PREFIX = {1: ("lora_te",), 2: ("lora_te1", "lora_te2")}


class LoraSpec(StageParams):
    """One LoRA: where it comes from, its key format, its scale and whether it is an LCM-LoRA."""

    source: Literal["hub", "local", "preset"]
    repo: str | None = Field(default=None, pattern=REPO_PATTERN)
    revision: str = Field(default="main", min_length=1)
    weight_name: str | None = None  # file in the repo; default pytorch_lora_weights.safetensors
    path: str | None = None  # local file, relative to the recipe
    format: Literal["auto", "peft", "kohya"] = "auto"
    scale: float = Field(default=1.0, ge=-8.0, le=8.0)
    kind: Literal["style", "lcm"] = "style"
    # preset only
    rank: int = Field(default=4, ge=1, le=128)
    seed: int = Field(default=0, ge=0)
    text_encoder: bool = True
    # "lcm-lora": the layers the public LCM-LoRAs adapt (UNet only, convs and time embeddings included)
    layers: Literal["default", "lcm-lora"] = "default"
    allow_pickle: bool = False

    @model_validator(mode="after")
    def _source_fields(self) -> LoraSpec:
        needed = {"hub": "repo", "local": "path", "preset": None}[self.source]
        if needed and getattr(self, needed) is None:
            raise ValueError(f"source {self.source!r} needs {needed!r}")
        for other in ("repo", "path"):
            if other != needed and getattr(self, other) is not None:
                raise ValueError(f"{other!r} does not apply to source {self.source!r}")
        if self.source != "hub" and (self.weight_name is not None or self.revision != "main"):
            raise ValueError("'weight_name' and 'revision' apply to source 'hub' only")
        if self.source == "preset":
            if self.format == "auto":
                raise ValueError("a preset LoRA needs format 'peft' or 'kohya'")
        elif (self.rank, self.seed, self.text_encoder, self.layers) != (4, 0, True, "default"):
            raise ValueError("'rank', 'seed', 'text_encoder' and 'layers' apply to source 'preset' only")
        if self.layers == "lcm-lora" and "text_encoder" in self.model_fields_set and self.text_encoder:
            raise ValueError("layers 'lcm-lora' adapt the UNet only; leave out 'text_encoder'")
        return self


class FuseLoraParams(StageParams):
    """LoRAs to fuse, in order; tolerances default to the family's ``lora_fuse_*``."""

    loras: list[LoraSpec] = Field(min_length=1, max_length=8)
    max_abs: float | None = Field(default=None, gt=0)
    min_cosine: float | None = Field(default=None, gt=0, le=1)
    parity_latent_size: int = Field(default=32, ge=8, le=128, multiple_of=8)


def refs(params: FuseLoraParams) -> dict[str, str]:
    """Hub LoRA revisions to pin: ``{"hub:lora.<i>:<repo>": revision}``."""
    return {f"hub:lora.{i}:{lo.repo}": lo.revision for i, lo in enumerate(params.loras) if lo.source == "hub"}


def resolve(name: str, ref: str) -> str:
    """Resolve one ``hub:lora.<i>:<repo>`` reference to a commit sha."""
    from sdkiln.stages.common.hub import resolve_ref

    return resolve_ref(name, ref)


def check(params: FuseLoraParams, recipe_dir: Path) -> list[str]:
    """Plan-time problems: local LoRA files that do not exist, pickle files not allowed."""
    from sdkiln.stages.common.hub import is_pickle

    problems = []
    for i, lo in enumerate(params.loras):
        if lo.source == "local":
            path = (recipe_dir / lo.path).resolve()
            if not path.is_file():
                problems.append(f"params.loras.{i}.path: file {path} does not exist")
            elif is_pickle(path) and not lo.allow_pickle:
                problems.append(
                    f"params.loras.{i}.path: {path.name} is a pickle checkpoint; see allow_pickle"
                )
        if lo.source == "hub" and lo.weight_name and is_pickle(lo.weight_name) and not lo.allow_pickle:
            problems.append(
                f"params.loras.{i}.weight_name: {lo.weight_name} is a pickle checkpoint; see allow_pickle"
            )
    return problems


# --------------------------------------------------------------------------------------------------
# LoRA files


def detect_format(keys: list[str]) -> str:
    """``kohya`` (``lora_unet_*``/``lora_te*`` with ``lora_down``/``lora_up``) or ``peft`` (diffusers/
    PEFT ``lora_A``/``lora_B``, or the older diffusers ``lora.down``/``lora.up``)."""
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k or ".lora.down." in k or ".lora.up." in k for k in keys):
        return "peft"
    raise UserError(f"not a LoRA state dict I know (first keys: {keys[:3]})")


def _targets(module: Any, names: tuple[str, ...]) -> list[tuple[str, Any]]:
    import torch

    out = []
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d) and any(
            name == t or name.endswith("." + t) for t in names
        ):
            out.append((name, m))
    return out


def make_preset_lora(
    unet: Any,
    text_encoders: list[Any],
    fmt: str,
    rank: int = 4,
    seed: int = 0,
    alpha: float | None = None,
    unet_targets: tuple[str, ...] = PRESET_UNET_TARGETS,
) -> dict[str, Any]:
    """A seeded random LoRA state dict for these modules, in ``peft`` (diffusers) or ``kohya`` keys.

    Both factors are random (a trained LoRA's up-projection is not zero either), sized so the LoRA
    moves each weight by roughly a tenth of its own scale. ``alpha`` (kohya only, default rank / 2)
    exercises the alpha scaling of the kohya path. ``unet_targets``: module name suffixes adapted in
    the UNet (``lora.LCM_LORA_UNET_TARGETS``: what LCM-LoRA adapts).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    alpha = float(rank) / 2 if alpha is None else alpha
    te_prefixes = KOHYA_TE_PREFIX[len(text_encoders)] if text_encoders else ()
    te_names = ("text_encoder", "text_encoder_2")
    groups = [("unet", "lora_unet", unet, unet_targets)]
    groups += [(te_names[i], te_prefixes[i], te, PRESET_TEXT_TARGETS) for i, te in enumerate(text_encoders)]
    for peft_prefix, kohya_prefix, module, names in groups:
        for name, m in _targets(module, names):
            w = m.weight
            if isinstance(m, torch.nn.Conv2d):
                down_shape = (rank, w.shape[1], *w.shape[2:])
                up_shape = (w.shape[0], rank, 1, 1)
            else:
                down_shape, up_shape = (rank, w.shape[1]), (w.shape[0], rank)
            fan_in = w[0].numel()
            down = torch.randn(down_shape, generator=g) / fan_in**0.5
            # Scale the product to ~0.1x the weight's own RMS (kohya's alpha/rank factor divided out).
            gain = 0.1 * float(w.detach().pow(2).mean().sqrt()) * (fan_in**0.5) / rank**0.5
            up = torch.randn(up_shape, generator=g) * gain
            if fmt == "kohya":
                key = f"{kohya_prefix}_{name.replace('.', '_')}"
                sd[f"{key}.lora_down.weight"] = down.contiguous()
                sd[f"{key}.lora_up.weight"] = (up * rank / alpha).contiguous()
                sd[f"{key}.alpha"] = torch.tensor(alpha)
            else:
                sd[f"{peft_prefix}.{name}.lora_A.weight"] = down.contiguous()
                sd[f"{peft_prefix}.{name}.lora_B.weight"] = up.contiguous()
    return sd


def _lora_file(ctx: StageContext, i: int, lo: LoraSpec, loaded: Any) -> tuple[Path, dict[str, Any]]:
    """The safetensors file of LoRA ``i`` and what the manifest records about its source."""
    from safetensors.torch import save_file

    from sdkiln.stages.common import hub

    if lo.source == "preset":
        lcm_layers = lo.layers == "lcm-lora"
        tes = [getattr(loaded.pipe, te) for te in loaded.family.text_encoders]
        sd = make_preset_lora(
            loaded.pipe.unet,
            tes if lo.text_encoder and not lcm_layers else [],
            lo.format,
            rank=lo.rank,
            seed=lo.seed,
            unet_targets=LCM_LORA_UNET_TARGETS if lcm_layers else PRESET_UNET_TARGETS,
        )
        path = ctx.work_dir / f"preset_lora_{i}.safetensors"
        save_file(sd, str(path))
        record = {"source": "preset", "format": lo.format, "rank": lo.rank, "seed": lo.seed}
        return path, record | ({"layers": lo.layers} if lcm_layers else {})
    if lo.source == "local":
        path = (ctx.recipe_dir / lo.path).resolve()
        if not path.is_file():
            raise UserError(f"params.loras.{i}.path: file {path} does not exist")
        if hub.is_pickle(path) and not lo.allow_pickle:
            raise UserError(f"params.loras.{i}.path: refusing {path.name}: {hub.PICKLE_RISK}")
        return path, {"source": "local", "path": str(path)}
    name = f"hub:lora.{i}:{lo.repo}"
    sha = ctx.pins.get(name) or hub.resolve_revision(lo.repo, lo.revision)
    weight = lo.weight_name or DEFAULT_WEIGHT_NAME
    if lo.weight_name is None:
        files = hub.list_files(lo.repo, sha)
        root = [f for f in files if "/" not in f and f.endswith(".safetensors")]
        if DEFAULT_WEIGHT_NAME not in files and len(root) == 1:
            weight = root[0]
        elif DEFAULT_WEIGHT_NAME not in files:
            pickles = [f for f in files if hub.is_pickle(f)]
            if pickles and not root:
                raise UserError(f"{lo.repo}: only pickle LoRA weights ({pickles[0]}): {hub.PICKLE_RISK}")
            raise UserError(f"{lo.repo}: cannot tell which LoRA file to use among {root}; set weight_name")
    if hub.is_pickle(weight) and not lo.allow_pickle:
        raise UserError(f"{lo.repo}/{weight}: {hub.PICKLE_RISK}")
    snapshot = hub.download(lo.repo, sha, [weight])
    return snapshot / weight, {
        "source": "hub",
        "repo": lo.repo,
        "revision": lo.revision,
        "sha": sha,
        "weight_name": weight,
    }


def _read_lora(path: Path, allow_pickle: bool) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if not allow_pickle:  # unreachable through _lora_file; kept so no caller can skip the refusal
        raise UserError(f"refusing pickle LoRA {path}")
    import torch

    return torch.load(str(path), map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------------------
# Run


def _text_inputs(pipe: Any, family: Any) -> dict[str, Any]:
    import torch

    out = {}
    for te, tok in zip(family.text_encoders, family.tokenizers, strict=True):
        ids = getattr(pipe, tok.folder)(
            "a photo of a cat, ink sketch",
            padding="max_length",
            max_length=tok.max_length,
            return_tensors="pt",
        ).input_ids
        out[te] = ids.to(torch.long)
    return out


def _forward(loaded: Any, unet_in: dict[str, Any], text_in: dict[str, Any], tes: list[str]) -> dict[str, Any]:
    import torch

    with torch.no_grad():
        outs = {"unet": loaded.pipe.unet(**unet_in).sample}
        for te in tes:
            o = getattr(loaded.pipe, te)(text_in[te], output_hidden_states=True)
            # SD reads the last layer, SDXL the penultimate one: check both.
            outs[te] = torch.cat([o.last_hidden_state.flatten(), o.hidden_states[-2].flatten()])
    return outs


def run(ctx: StageContext) -> None:
    """Load the LoRAs as adapters, take the reference, fuse, unload, gate on parity, save."""
    import torch
    from safetensors import safe_open

    from sdkiln.runtime.contract.families import SCHEDULERS
    from sdkiln.runtime.contract.floors import tolerance
    from sdkiln.runtime.contract.metrics import compare
    from sdkiln.stages.common.torch.lora import unmatched_keys
    from sdkiln.stages.common.torch.pipeline import (
        describe_pipeline,
        open_pipeline,
        save_pipeline,
        unet_inputs,
    )
    from sdkiln.stages.common.torch.presets import make_scheduler

    p: FuseLoraParams = ctx.params
    model = ctx.input("model")
    family = model.model.family
    loaded = open_pipeline(model.path, family=family)
    pipe, fam = loaded.pipe, loaded.family
    tol = tolerance("unet")
    max_abs = p.max_abs if p.max_abs is not None else tol.lora_fuse_max_abs
    min_cos = p.min_cosine if p.min_cosine is not None else tol.lora_fuse_min_cosine

    names, scales, records = [], [], []
    with ctx.timed("load_loras_s"):
        # All files first: preset LoRAs are shaped on the model before any adapter wraps its layers.
        files = [_lora_file(ctx, i, lo, loaded) for i, lo in enumerate(p.loras)]
        for i, (lo, (path, record)) in enumerate(zip(p.loras, files, strict=True)):
            sd = _read_lora(path, lo.allow_pickle)
            fmt = detect_format(list(sd))
            if lo.format != "auto" and lo.format != fmt:
                raise UserError(f"params.loras.{i}.format: {lo.format!r} but the file has {fmt!r} keys")
            name = f"lora{i}"
            n_keys, n_modules = len(sd), count_lora_modules(list(sd))
            parts = {"unet": pipe.unet, **{te: getattr(pipe, te, None) for te in fam.text_encoders}}
            unmatched = unmatched_keys(list(sd), parts)
            if unmatched:
                shown = ", ".join(unmatched[:5]) + (
                    f" (+{len(unmatched) - 5} more)" if len(unmatched) > 5 else ""
                )
                raise UserError(
                    f"params.loras.{i}: {len(unmatched)} key(s) of {path.name} match no layer of this {family} "
                    f"model: {shown}; wrong model family, or a LoRA for another architecture"
                )
            pipe.load_lora_weights(sd, adapter_name=name)  # consumes sd
            loaded_unet = _adapter_count(pipe.unet, name)
            n_loaded = loaded_unet + sum(
                _adapter_count(getattr(pipe, te, None), name) for te in fam.text_encoders
            )
            if loaded_unet == 0:
                raise UserError(
                    f"params.loras.{i}: no UNet weights matched ({fmt} keys): wrong model family?"
                )
            # A LoRA half-applied is a different model: every module in the file must land somewhere.
            if n_loaded < n_modules:
                raise UserError(
                    f"params.loras.{i}: only {n_loaded} of the {n_modules} LoRA modules in {path.name} matched "
                    f"a layer of this {family} model ({fmt} keys): wrong family, or a key layout the loader "
                    "does not convert"
                )
            names.append(name)
            scales.append(lo.scale)
            records.append(
                {
                    **record,
                    "format": fmt,
                    "scale": lo.scale,
                    "kind": lo.kind,
                    "keys": n_keys,
                    "modules": n_loaded,
                }
            )
        pipe.set_adapters(names, adapter_weights=scales)

    tes = [te for te in fam.text_encoders if _adapter_count(getattr(pipe, te, None))]
    unet_in = unet_inputs(pipe.unet.config, family, latent_size=p.parity_latent_size, seed=0)
    text_in = _text_inputs(pipe, fam)
    with ctx.timed("reference_s"):
        ref = _forward(loaded, unet_in, text_in, tes)
        pipe.disable_lora()
        with torch.no_grad():
            base_unet = pipe.unet(**unet_in).sample
        pipe.enable_lora()
        pipe.set_adapters(names, adapter_weights=scales)

    with ctx.timed("fuse_s"):
        components = ["unet", *tes]
        pipe.fuse_lora(components=components, lora_scale=1.0, adapter_names=names)
        pipe.unload_lora_weights()
    fused = _forward(loaded, unet_in, text_in, tes)

    failures = []
    for comp in ["unet", *tes]:
        m = compare(ref[comp].detach(), fused[comp].detach())
        ctx.metrics[f"parity.{comp}.max_abs"] = m["max_abs"]
        ctx.metrics[f"parity.{comp}.cosine"] = m["cosine"]
        if not (m["max_abs"] <= max_abs and m["cosine"] >= min_cos):
            failures.append(
                f"{comp}: fused vs adapters max_abs {m['max_abs']:.3g} (limit {max_abs:.3g}), "
                f"cosine {m['cosine']:.7f} (floor {min_cos})"
            )
    # How much the LoRAs change the UNet: shows the parity numbers are not those of a no-op.
    ctx.metrics["lora_effect.unet.max_abs"] = compare(base_unet.detach(), ref["unet"].detach())["max_abs"]
    if failures:
        raise ParityError(f"fuse_lora ({family})", failures)

    lcm = any(lo.kind == "lcm" for lo in p.loras) or model.model.lcm
    if any(lo.kind == "lcm" for lo in p.loras):
        pipe.scheduler = make_scheduler(family, "lcm", base=dict(pipe.scheduler.config))

    with ctx.timed("save_s"):
        save_pipeline(pipe, ctx.out_dir, controlnets=loaded.controlnets, vae_tiny=loaded.vae_tiny)
    lora_keys = 0
    for f in (ctx.out_dir / "unet").glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            lora_keys += sum("lora" in k for k in fh.keys())  # noqa: SIM118 (safe_open has no __iter__)
    ctx.metrics["unet_lora_keys"] = lora_keys
    if lora_keys:
        raise BuildError(f"the fused UNet still has {lora_keys} LoRA keys after unloading the adapters")

    scheduler = type(pipe.scheduler).__name__
    desc = describe_pipeline(
        ctx.out_dir,
        family=family,
        source=dict(model.model.source),
        lcm=lcm or scheduler == SCHEDULERS["lcm"],
        scheduler=scheduler,
        loras=[*model.model.loras, *records],
    )
    ctx.components.update(desc.components)
    ctx.model = desc.model
    ctx.metrics["bytes"] = desc.bytes


def _adapter_count(module: Any, adapter: str | None = None) -> int:
    """How many layers of a module carry LoRA ``adapter`` (any adapter: (layer, adapter) pairs)."""
    if module is None:
        return 0
    layers = [m.lora_A for m in module.modules() if hasattr(m, "lora_A") and hasattr(m.lora_A, "keys")]
    if adapter is None:
        return sum(len(a) for a in layers)
    return sum(adapter in a for a in layers)


def count_lora_modules(keys: list[str]) -> int:
    """Distinct layers a LoRA state dict adapts (one down/A matrix each)."""
    downs = (".lora_A.weight", ".lora_down.weight", ".lora.down.weight")
    return len({k for k in keys if k.endswith(downs)})


STAGE = Stage(
    name="fuse_lora",
    version="2",  # 2: configs carry no _name_or_path (a path of the machine that built it)
    inputs={"model": (Kind.PIPELINE,)},
    output_kind=Kind.PIPELINE,
    params=FuseLoraParams,
    run=run,
    description="Fuse LoRAs (LCM-LoRA, style) into the UNet/text encoders; parity-gated; no LoRA keys left",
    env_packages=("torch", "diffusers", "transformers", "peft", "safetensors"),
    bundle_dir=lambda p: "torch/fused",
    check=check,
    refs=refs,
    resolve=resolve,
)
