"""The PIPELINE artifact layout (contract): read, write and describe it; fixed reference inputs.

Layout: a diffusers folder saved with ``save_pretrained(safe_serialization=True)`` of the base pipeline
class (no ControlNet in ``model_index.json``), plus ``controlnet/<type>/`` (a ControlNetModel folder per
type) and optionally ``vae_tiny/`` (AutoencoderTiny = TAESD).

Every stage that consumes a PIPELINE artifact (fuse_lora, quantize_torch, the exporters) should use
``open_pipeline`` and ``unet_inputs`` from here instead of re-deriving the layout. Heavy imports stay
inside functions.

Example::

    from sdkiln.stages.common.torch.pipeline import open_pipeline, unet_inputs
    loaded = open_pipeline(folder, family="sd15")
    out = loaded.pipe.unet(**unet_inputs(loaded.pipe.unet.config, "sd15")).sample
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.families import FAMILIES, Family, component_specs, detect_family, get_family
from sdkiln.runtime.contract.layout import CONTROLNET_DIR, VAE_TINY_DIR
from sdkiln.runtime.contract.manifest import ModelFacts
from sdkiln.stages.common.hub import is_pickle, refuse_pickles

logger = logging.getLogger(__name__)


@dataclass
class LoadedPipeline:
    """A PIPELINE artifact in memory."""

    family: Family
    pipe: Any  # the base diffusers pipeline
    controlnets: dict[str, Any] = field(default_factory=dict)  # type -> ControlNetModel
    vae_tiny: Any | None = None

    def task_pipeline(self, task: str, controlnet: str | None = None) -> Any:
        """The diffusers pipeline for a task (``text``, ``img2img``, ``controlnet``,
        ``controlnet_img2img``), sharing this pipeline's modules (no copy)."""
        import diffusers

        cls = getattr(diffusers, self.family.task_pipelines[task])
        extra = {}
        if task.startswith("controlnet"):
            if controlnet not in self.controlnets:
                raise UserError(
                    f"no ControlNet {controlnet!r} in this pipeline (has: {list(self.controlnets)})"
                )
            extra["controlnet"] = self.controlnets[controlnet]
        return make_pipeline(cls.__name__, {**self.pipe.components, **extra})


def make_pipeline(class_name: str, components: dict[str, Any]) -> Any:
    """Construct a diffusers pipeline class from components; optional ones it does not get (safety
    checker, feature extractor, image encoder) are None, and no safety checker is required."""
    import diffusers

    cls = getattr(diffusers, class_name)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in components.items() if k in params}
    for name, p in params.items():
        if name not in kwargs and name != "self" and p.default is inspect.Parameter.empty:
            kwargs[name] = None
    if "requires_safety_checker" in params:
        kwargs["requires_safety_checker"] = False
    return cls(**kwargs)


def save_pipeline(
    pipe: Any, out_dir: Path, controlnets: dict[str, Any] | None = None, vae_tiny: Any | None = None
) -> None:
    """Write a pipeline (and its ControlNets and TAESD) in the PIPELINE layout, safetensors only."""
    out_dir = Path(out_dir)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    for ctype, cn in (controlnets or {}).items():
        cn.save_pretrained(str(out_dir / CONTROLNET_DIR / ctype), safe_serialization=True)
    if vae_tiny is not None:
        vae_tiny.save_pretrained(str(out_dir / VAE_TINY_DIR), safe_serialization=True)
    for tok in sorted(out_dir.glob("tokenizer*")):
        ensure_vocab_files(tok)
    drop_local_paths(out_dir)
    pickles = [p for p in out_dir.rglob("*") if is_pickle(p)]
    if pickles:  # a component class that ignored safe_serialization: never ship those
        raise RuntimeError(f"pickle files written into {out_dir}: {pickles}")


def drop_local_paths(out_dir: Path) -> int:
    """Remove ``_name_or_path`` from the configs below ``out_dir``; the number of files changed.

    diffusers records where a component was loaded from (a cache folder of this machine), so the same
    build on another machine or cache root would differ in those bytes. Loading never needs it.
    """
    changed = 0
    for path in sorted(Path(out_dir).rglob("*.json")):
        if path.name not in ("config.json", "model_index.json", "scheduler_config.json"):
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "_name_or_path" in data:
            del data["_name_or_path"]
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            changed += 1
    return changed


def ensure_vocab_files(tokenizer_dir: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` beside a BPE ``tokenizer.json`` when missing.

    transformers 5 saves only ``tokenizer.json``; Core ML's Swift package and simple BPE readers want
    the two classic files, which hold the same vocabulary.
    """
    tokenizer_dir = Path(tokenizer_dir)
    tj = tokenizer_dir / "tokenizer.json"
    if (tokenizer_dir / "vocab.json").is_file() or not tj.is_file():
        return
    model = json.loads(tj.read_text(encoding="utf-8"))["model"]
    if model.get("type") != "BPE":
        return
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tokenizer_dir / "vocab.json").write_text(
        json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8"
    )
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def controlnet_types(folder: Path) -> list[str]:
    """The ControlNet types present in a PIPELINE folder, sorted."""
    root = Path(folder) / CONTROLNET_DIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


def read_configs(folder: Path) -> dict[str, dict[str, Any]]:
    """Component configs of a PIPELINE folder: ``unet``, ``vae``, text encoders, ``vae_tiny``."""
    folder = Path(folder)
    configs: dict[str, dict[str, Any]] = {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", VAE_TINY_DIR):
        path = folder / name / "config.json"
        if path.is_file():
            configs[name] = json.loads(path.read_text())
    return configs


def pipeline_class(folder: Path) -> str:
    """The ``_class_name`` of a diffusers folder's ``model_index.json``: one of the families' classes.

    Anything else (a custom pipeline class, which diffusers could only get by running the repo's own
    code) is refused: remote code is never trusted.
    """
    path = Path(folder) / "model_index.json"
    if not path.is_file():
        raise UserError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    cls = json.loads(path.read_text()).get("_class_name")
    known = sorted({f.pipeline_class for f in FAMILIES.values()})
    if cls not in known:
        raise UserError(f"{folder}: pipeline class {cls!r} is not one sdkiln loads ({', '.join(known)})")
    return cls


def infer_family(folder: Path) -> str:
    """The family of a real-size diffusers folder; a UserError asking for ``family`` otherwise."""
    cls = pipeline_class(folder)
    unet = read_configs(folder).get("unet", {})
    fam = detect_family(cls, unet)
    if fam is None:
        raise UserError(
            f"cannot tell the model family of {folder} ({cls}, cross_attention_dim="
            f"{unet.get('cross_attention_dim')}); set params.family"
        )
    return fam


def folder_bytes(folder: Path) -> int:
    """Total size of the files under a folder."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


@dataclass(frozen=True)
class PipelineDescription:
    """What a PIPELINE artifact's manifest says about its folder: components (I/O specs), model facts and
    its size."""

    components: dict[str, Any]
    model: ModelFacts
    bytes: int


def describe_pipeline(
    folder: Path,
    family: str,
    source: dict[str, Any],
    lcm: bool = False,
    precision: str = "fp32",
    **facts: Any,
) -> PipelineDescription:
    """The manifest blocks of a PIPELINE artifact from its folder; ``facts`` adds model facts
    (``scheduler``, ``loras``)."""
    folder = Path(folder)
    configs = read_configs(folder)
    cns = controlnet_types(folder)
    taesd = VAE_TINY_DIR in configs
    fam = get_family(family)
    paths = {te: te for te in fam.text_encoders}
    paths |= {"unet": "unet", "vae_encoder": "vae", "vae_decoder": "vae"}
    paths |= {f"controlnet.{c}": f"{CONTROLNET_DIR}/{c}" for c in cns}
    if taesd:
        paths |= {"taesd_encoder": VAE_TINY_DIR, "taesd_decoder": VAE_TINY_DIR}
    return PipelineDescription(
        components=component_specs(
            fam, configs, controlnets=cns, taesd=taesd, precision=precision, paths=paths
        ),
        model=ModelFacts(
            family=family,
            pipeline_class=pipeline_class(folder),
            controlnets=cns,
            taesd=taesd,
            lcm=lcm,
            source=dict(source),
            **facts,
        ),
        bytes=folder_bytes(folder),
    )


def open_pipeline(
    folder: Path, family: str | None = None, dtype: str = "float32", allow_pickle: bool = False
) -> LoadedPipeline:
    """Load a PIPELINE folder (base pipeline, ControlNets, TAESD) into memory.

    ``family`` defaults to detection from the configs (real-size models only). Pickle weights are
    refused unless ``allow_pickle``.
    """
    import diffusers
    import torch

    folder = Path(folder)
    refuse_pickles(folder, allow_pickle, what=str(folder))
    fam = get_family(family or infer_family(folder))
    torch_dtype = getattr(torch, dtype)
    cls = getattr(diffusers, pipeline_class(folder))
    pipe = cls.from_pretrained(str(folder), dtype=torch_dtype, use_safetensors=None if allow_pickle else True)
    controlnets = {
        c: diffusers.ControlNetModel.from_pretrained(
            str(folder / CONTROLNET_DIR / c),
            dtype=torch_dtype,
            use_safetensors=None if allow_pickle else True,
        ).eval()
        for c in controlnet_types(folder)
    }
    vae_tiny = None
    if (folder / VAE_TINY_DIR / "config.json").is_file():
        vae_tiny = diffusers.AutoencoderTiny.from_pretrained(
            str(folder / VAE_TINY_DIR), dtype=torch_dtype, use_safetensors=None if allow_pickle else True
        ).eval()
    return LoadedPipeline(family=fam, pipe=pipe, controlnets=controlnets, vae_tiny=vae_tiny)


# --------------------------------------------------------------------------------------------------
# Fixed reference inputs, shared by every parity check


def unet_inputs(
    unet_config: dict[str, Any], family: str, batch: int = 1, latent_size: int | None = None, seed: int = 0
) -> dict[str, Any]:
    """Seeded inputs for a UNet (or, with ``controlnet_inputs``, a ControlNet) forward, as keyword
    arguments of ``UNet2DConditionModel.forward``: sample, timestep, encoder_hidden_states, and where
    the config asks for them ``timestep_cond`` and SDXL's ``added_cond_kwargs``.

    ``latent_size`` defaults to the config's sample_size capped at 64 (512 px), to keep real-size
    checks affordable on a CPU.
    """
    import torch

    fam = get_family(family)
    size = latent_size or min(int(unet_config.get("sample_size") or 64), 64)
    g = torch.Generator().manual_seed(seed)
    cross = int(unet_config["cross_attention_dim"])
    inputs: dict[str, Any] = {
        "sample": torch.randn(batch, int(unet_config["in_channels"]), size, size, generator=g),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": torch.randn(batch, 77, cross, generator=g),
    }
    if unet_config.get("time_cond_proj_dim"):
        inputs["timestep_cond"] = torch.randn(batch, int(unet_config["time_cond_proj_dim"]), generator=g)
    if fam.uses_added_cond:
        pooled = int(unet_config["projection_class_embeddings_input_dim"]) - 6 * int(
            unet_config["addition_time_embed_dim"]
        )
        px = size * fam.vae_scale_factor
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.tensor([[px, px, 0, 0, px, px]], dtype=torch.float32).repeat(batch, 1),
        }
    return inputs


def controlnet_inputs(
    unet_inputs_: dict[str, Any], vae_scale_factor: int = 8, seed: int = 1
) -> dict[str, Any]:
    """ControlNet forward kwargs built on UNet inputs: adds a seeded ``controlnet_cond`` in [0, 1]."""
    import torch

    sample = unet_inputs_["sample"]
    b, _, h, w = sample.shape
    g = torch.Generator().manual_seed(seed)
    inputs = {k: v for k, v in unet_inputs_.items() if k != "timestep_cond"}
    inputs["controlnet_cond"] = torch.rand(b, 3, h * vae_scale_factor, w * vae_scale_factor, generator=g)
    inputs["conditioning_scale"] = 1.0
    return inputs
