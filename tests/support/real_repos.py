"""The Hub repos the shipped recipes use, under their real ids and in their real file layouts, with tiny
configs and seeded random weights made here (``stages/common/torch/presets.py``'s tiny presets).

What a real repo holds beside what a build needs is served too, so a build that fetches too much is
caught by the loopback Hub's request log: ``.bin`` beside ``.safetensors``, ``fp16`` variants, ``non_ema``
weights, the safety checker, root single-file checkpoints (``v1-5-pruned.ckpt``, ``sd_turbo.safetensors``,
``sd_xl_base_1.0.safetensors``), ONNX/OpenVINO/Flax copies, sample images. Those decoys are small random
blobs: loading one by mistake fails loudly. Layouts follow the listings of the public repos (SD 1.5 and
SDXL base are complete listings; the others are reconstructed from how their weights are loaded).

One repo is sharded on purpose (SSD-1B's UNet, both variants, through ``*.safetensors.index[.fp16].json``),
with a leftover shard of an earlier upload that its index does not list: only an index-driven download
leaves it alone.

    repos = real_repos(tmp_path)          # {repo_id: {path: bytes}}
    hub.state.seed_repo(repo_id, files)   # tests/support/hub_server.py
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

# The repo ids the shipped recipes name (the families table's ``hub`` entries).
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SCRIBBLE = "lllyasviel/control_v11p_sd15_scribble"
TAESD = "madebyollin/taesd"
LCM_SD15 = "latent-consistency/lcm-lora-sdv1-5"
TURBO = "stabilityai/sd-turbo"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
CANNY_XL = "diffusers/controlnet-canny-sdxl-1.0"
CANNY_XL_SMALL = "diffusers/controlnet-canny-sdxl-1.0-small"
VAE_FIX = "madebyollin/sdxl-vae-fp16-fix"
TAESDXL = "madebyollin/taesdxl"
LCM_SDXL = "latent-consistency/lcm-lora-sdxl"
SSD1B = "segmind/SSD-1B"
LCM_SSD1B = "latent-consistency/lcm-lora-ssd-1b"
SMALL_SD = "segmind/small-sd"
SMALL_SD_V0 = "OFA-Sys/small-stable-diffusion-v0"

# The shipped recipes with real Hub repos (all of recipes/ but the offline tiny ones and bench), and
# the task each one's bundle is for.
REAL_RECIPES = {
    "sd15-lcm-scribble": "sketch",
    "sd-turbo": "text",
    "ssd1b-lcm-canny": "edit",
    "sdxl-lcm-canny": "edit",
    "small-sd-text": "text",
}

GITATTRIBUTES = "".join(
    f"{p} filter=lfs diff=lfs merge=lfs -text\n"
    for p in ("*.bin", "*.ckpt", "*.safetensors", "*.onnx", "*.onnx_data", "*.msgpack", "*.pth", "*.png")
)

_SCHEDULER_SD = {  # the SD 1.5 repo's PNDM config, verbatim keys (other schedulers' keys included)
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
_SCHEDULER_XL = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
_SCHEDULER_TURBO = {**_SCHEDULER_XL, "timestep_spacing": "trailing", "_diffusers_version": "0.24.0"}


def decoy(name: str, size: int = 4096) -> bytes:
    """A random blob standing in for a file no build should fetch (seeded by its name)."""
    return random.Random(name).randbytes(size)


def _read_tree(folder: Path, prefix: str = "") -> dict[str, bytes]:
    return {
        f"{prefix}{p.relative_to(folder).as_posix()}": p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file()
    }


def _model_files(module: Any, work: Path, prefix: str, *, fp16: bool, pickles: str = "decoy",
                 shard: str | None = None) -> dict[str, bytes]:  # fmt: skip
    """A diffusers/transformers model folder as the Hub serves it: config and safetensors (and its fp16
    variant), with ``pickles``: ``decoy`` (random .bin blobs beside them), ``only`` (real .bin weights,
    no safetensors) or ``none``. ``shard``: a max shard size, to save sharded with an index."""
    out = work / prefix.strip("/").replace("/", "_")
    shutil.rmtree(out, ignore_errors=True)
    kw: dict[str, Any] = {"max_shard_size": shard} if shard else {}
    if pickles == "only":
        # transformers 5 writes safetensors whatever it is asked: rewrite them as the .bin a 2022 upload has
        from safetensors.torch import load_file

        module.save_pretrained(str(out), safe_serialization=False)
        for st in sorted(out.glob("*.safetensors")):
            stem = "pytorch_model" if st.name == "model.safetensors" else st.name.split(".")[0]
            torch.save(load_file(str(st)), out / f"{stem}.bin")
            st.unlink()
    else:
        module.save_pretrained(str(out), safe_serialization=True, **kw)
        if fp16:
            half = _half_copy(module)
            half.save_pretrained(str(out), safe_serialization=True, variant="fp16", **kw)
    files = _read_tree(out, prefix)
    if pickles == "decoy":
        stem = (
            "pytorch_model"
            if (out / "model.safetensors").exists()
            or "model.safetensors.index.json" in {p.name for p in out.iterdir()}
            else "diffusion_pytorch_model"
        )
        files[f"{prefix}{stem}.bin"] = decoy(f"{prefix}{stem}.bin")
        if fp16:
            files[f"{prefix}{stem}.fp16.bin"] = decoy(f"{prefix}{stem}.fp16.bin")
    return files


def _half_copy(module: Any) -> Any:
    import copy

    return copy.deepcopy(module).to(torch.float16)


def _tokenizer_files(tokenizer: Any, work: Path, prefix: str) -> dict[str, bytes]:
    """The tokenizer folder as the SD repos ship it: vocab.json, merges.txt, special_tokens_map.json and
    tokenizer_config.json (no tokenizer.json)."""
    from sdkiln.stages.common.torch.pipeline import ensure_vocab_files

    out = work / prefix.strip("/").replace("/", "_")
    shutil.rmtree(out, ignore_errors=True)
    tokenizer.save_pretrained(str(out))
    ensure_vocab_files(out)
    (out / "tokenizer.json").unlink(missing_ok=True)
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": tokenizer.pad_token,
        "unk_token": "<|endoftext|>",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return _read_tree(out, prefix)


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True).encode()


def _pipeline_repo(built: Any, work: Path, index: dict[str, Any], scheduler: dict[str, Any],
                   *, fp16: bool, pickles: str = "decoy", shard_unet: bool = False) -> dict[str, bytes]:  # fmt: skip
    """A diffusers pipeline repo: model_index.json and one folder per component."""
    pipe = built.pipe
    files: dict[str, bytes] = {".gitattributes": GITATTRIBUTES.encode(), "README.md": b"# tiny stand-in\n"}
    files["model_index.json"] = _json(index)
    files["scheduler/scheduler_config.json"] = _json(scheduler)
    for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            files |= _model_files(
                module, work / "repo", f"{name}/", fp16=fp16, pickles=pickles,
                shard="200KB" if shard_unet and name == "unet" else None,
            )  # fmt: skip
    for name in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, name, None)
        if tok is not None:
            files |= _tokenizer_files(tok, work / "repo", f"{name}/")
    return files


def _lcm_lora(unet: Any, seed: int) -> dict[str, bytes]:
    """An LCM-LoRA as the public repos ship it: kohya keys on diffusers module names (convs, shortcuts,
    time-embedding projections and resampler convs included), fp16 tensors, ``.alpha`` per layer."""
    from safetensors.torch import save

    from sdkiln.stages.common.torch.lora import LCM_LORA_UNET_TARGETS
    from sdkiln.stages.fuse_lora import make_preset_lora

    sd = make_preset_lora(unet, [], "kohya", rank=4, seed=seed, unet_targets=LCM_LORA_UNET_TARGETS)
    sd = {k: v.to(torch.float16).contiguous() for k, v in sd.items()}
    return {
        ".gitattributes": GITATTRIBUTES.encode(),
        "README.md": b"# tiny stand-in\n",
        "pytorch_lora_weights.safetensors": save(sd),
    }


def _component_repo(module: Any, work: Path, name: str, *, fp16: bool, extra: tuple[str, ...] = ()) -> dict[str, bytes]:  # fmt: skip
    files = {".gitattributes": GITATTRIBUTES.encode(), "README.md": b"# tiny stand-in\n"}
    files |= _model_files(module, work / name, "", fp16=fp16)
    for path in extra:
        files[path] = decoy(f"{name}/{path}")
    return files


def _sd_index(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.6.0",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        **(extra or {}),
    }


_XL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.19.0.dev0",
    "force_zeros_for_empty_prompt": True,
    "add_watermarker": None,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _safety_checker() -> dict[str, bytes]:
    files = {
        "safety_checker/config.json": _json({"_name_or_path": "CompVis/stable-diffusion-safety-checker"})
    }
    for name in (
        "model.safetensors",
        "model.fp16.safetensors",
        "pytorch_model.bin",
        "pytorch_model.fp16.bin",
    ):
        files[f"safety_checker/{name}"] = decoy(f"safety_checker/{name}")
    files["feature_extractor/preprocessor_config.json"] = _json({"crop_size": 224, "do_resize": True})
    return files


def _vae_fix(work: Path) -> Any:
    """A tiny SDXL VAE in the fp16-fix repo's config: SDXL's scaling factor, no forced upcast."""
    import diffusers

    from sdkiln.stages.common.torch.presets import _TINY_VAE

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(31)
        return diffusers.AutoencoderKL(**_TINY_VAE, scaling_factor=0.13025, force_upcast=False).eval()


def real_repos(work: Path) -> dict[str, dict[str, bytes]]:
    """Every repo the shipped recipes name, as ``{repo_id: {path: bytes}}`` (tiny, seeded, offline)."""
    from sdkiln.stages.common.torch.presets import build_preset

    work.mkdir(parents=True, exist_ok=True)
    repos: dict[str, dict[str, bytes]] = {}

    # SD 1.5: the complete public listing (36 files) at tiny size.
    sd = build_preset("tiny-sd15-controlnet", seed=0)
    sd15 = _pipeline_repo(sd, work / "sd15", _sd_index(), _SCHEDULER_SD, fp16=True)
    for name in ("diffusion_pytorch_model.non_ema.safetensors", "diffusion_pytorch_model.non_ema.bin"):
        sd15[f"unet/{name}"] = decoy(f"unet/{name}")
    for name in ("v1-5-pruned-emaonly.ckpt", "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.ckpt",
                 "v1-5-pruned.safetensors"):  # fmt: skip
        sd15[name] = decoy(name, 16384)
    sd15["v1-inference.yaml"] = b"model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n"
    repos[SD15] = sd15 | _safety_checker()
    repos[SCRIBBLE] = _component_repo(
        sd.controlnets["scribble"], work, "scribble", fp16=True,
        extra=("images/control.png", "images/image_out.png", "images/input.png"),
    )  # fmt: skip
    repos[TAESD] = _component_repo(
        sd.vae_tiny,
        work,
        "taesd",
        fp16=False,
        extra=("taesd_encoder.safetensors", "taesd_decoder.safetensors"),
    )
    repos[LCM_SD15] = _lcm_lora(sd.pipe.unet, seed=5)

    # SD-Turbo (SD 2.1 architecture): fp16 variants and a root single-file checkpoint.
    turbo = build_preset("tiny-sd-turbo", seed=1)
    index = _sd_index({"scheduler": ["diffusers", "EulerDiscreteScheduler"]})
    for key in ("safety_checker", "feature_extractor"):
        index[key] = [None, None]
    repos[TURBO] = _pipeline_repo(turbo, work / "turbo", index, _SCHEDULER_TURBO, fp16=True) | {
        "sd_turbo.safetensors": decoy("sd_turbo.safetensors", 16384),
        "LICENSE.md": b"Stability AI Community License (stand-in)\n",
    }

    # SDXL base 1.0: the complete public listing (no .bin weights, ONNX/OpenVINO/Flax copies beside).
    xl = build_preset("tiny-sdxl-controlnet", seed=2)
    sdxl = _pipeline_repo(xl, work / "sdxl", _XL_INDEX, _SCHEDULER_XL, fp16=True, pickles="none")
    for folder in ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"):
        flax = "diffusion_flax_model.msgpack" if folder == "unet" else "flax_model.msgpack"
        for name in ("model.onnx", "openvino_model.bin", "openvino_model.xml", flax):
            if not (folder.startswith("vae_") and name == flax):
                sdxl[f"{folder}/{name}"] = decoy(f"{folder}/{name}")
    for folder in ("text_encoder_2", "unet"):
        sdxl[f"{folder}/model.onnx_data"] = decoy(f"{folder}/model.onnx_data")
    sdxl["vae/diffusion_flax_model.msgpack"] = decoy("vae/diffusion_flax_model.msgpack")
    for folder in ("vae_decoder", "vae_encoder"):
        sdxl[f"{folder}/config.json"] = _json({"_class_name": "AutoencoderKL"})
    for name in (
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
    ):
        sdxl[f"vae_1_0/{name}"] = sdxl[f"vae/{name}"]
    for name in ("sd_xl_base_1.0.safetensors", "sd_xl_base_1.0_0.9vae.safetensors",
                 "sd_xl_offset_example-lora_1.0.safetensors", "01.png", "comparison.png", "pipeline.png"):  # fmt: skip
        sdxl[name] = decoy(name, 16384)
    sdxl["LICENSE.md"] = b"CreativeML Open RAIL++-M (stand-in)\n"
    repos[SDXL] = sdxl
    repos[CANNY_XL] = _component_repo(xl.controlnets["canny"], work, "canny-xl", fp16=True)
    repos[VAE_FIX] = _component_repo(
        _vae_fix(work), work, "vae-fix", fp16=False, extra=("sdxl.vae.safetensors", "sdxl_vae.safetensors")
    )
    repos[TAESDXL] = _component_repo(
        xl.vae_tiny, work, "taesdxl", fp16=False,
        extra=("taesdxl.pth", "taesdxl_encoder.safetensors", "taesdxl_decoder.safetensors"),
    )  # fmt: skip
    repos[LCM_SDXL] = _lcm_lora(xl.pipe.unet, seed=6)

    # SSD-1B: SDXL layout, its UNet sharded in both variants, a root single-file checkpoint.
    ssd = build_preset("tiny-ssd-1b-controlnet", seed=3)
    ssd1b = _pipeline_repo(
        ssd, work / "ssd1b", _XL_INDEX, _SCHEDULER_XL, fp16=True, pickles="none", shard_unet=True
    )
    shards = sorted(p for p in ssd1b if p.startswith("unet/diffusion_pytorch_model.fp16-"))
    total = shards[-1].rsplit("-of-", 1)[1].split(".")[0]
    stale = f"unet/diffusion_pytorch_model.fp16-00001-of-{int(total) + 1:05d}.safetensors"
    ssd1b[stale] = decoy(stale)  # a leftover of an earlier upload: no index lists it
    ssd1b["SSD-1B-A1111.safetensors"] = decoy("SSD-1B-A1111.safetensors", 16384)
    repos[SSD1B] = ssd1b
    repos[CANNY_XL_SMALL] = _component_repo(ssd.controlnets["canny"], work, "canny-xl-small", fp16=True)
    repos[LCM_SSD1B] = _lcm_lora(ssd.pipe.unet, seed=7)

    # The distilled small SD 1.5 UNets: pickle (.bin) weights only, as their listings show.
    for seed, repo in ((4, SMALL_SD), (8, SMALL_SD_V0)):
        small = build_preset("tiny-sd15-small", seed=seed)
        index = _sd_index()
        for key in ("safety_checker", "feature_extractor"):
            index.pop(key)
        repos[repo] = _pipeline_repo(small, work / repo.replace("/", "_"), index, _SCHEDULER_SD, fp16=False,
                                     pickles="only")  # fmt: skip
    return repos


def weight_paths_fetched(requests: list[tuple[str, str]]) -> dict[str, list[str]]:
    """The files requested per repo (``GET`` or ``HEAD /{repo}/resolve/{rev}/{path}`` in a request log).
    HEAD counts: huggingface_hub skips the GET of a file whose content it already holds (two tokenizer
    folders with the same vocabulary), yet the build asked for that file."""
    out: dict[str, list[str]] = {}
    for method, path in requests:
        if method not in ("GET", "HEAD") or "/resolve/" not in path:
            continue
        repo, _, rest = path.lstrip("/").partition("/resolve/")
        out.setdefault(repo, []).append(rest.split("/", 1)[1])
    return {k: sorted(set(v)) for k, v in out.items()}
