"""Calibration data from the reference pipeline: run the diffusers pipelines over a recipe's prompts and
sketches and record, per component, the contract feeds each graph would have received (UNet/ControlNet
every step, text encoders per prompt, the VAEs on the results). Used by static INT8 (``quantize_onnx``),
TensorRT INT8/FP8 (``build_tensorrt``) and OpenVINO quantization.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from sdkiln.stages.engine.core import StageParams

_DEFAULT_PROMPTS = ["a photograph of a house by a lake, morning light", "a pencil sketch of a cat"]


class CalibrationParams(StageParams):
    """What the static calibration runs through the reference pipeline."""

    prompts: list[str] = Field(default=_DEFAULT_PROMPTS, min_length=1)
    sketches: list[str] = Field(default=[], description="images (recipe-relative paths) for the ControlNets")
    steps: int = Field(default=2, ge=1, le=50)
    size: int = Field(default=512, ge=16, le=2048, multiple_of=8)
    guidance: float | None = Field(default=None, ge=0.0, le=30.0, description="default: the family's")
    seed: int = Field(default=0, ge=0)


def _np(t: Any) -> Any:
    return t.detach().float().cpu().numpy()


def collect_calibration(
    loaded: Any, fam: Any, comps: list[Any], cal: CalibrationParams, recipe_dir: Path, lcm: bool = False
) -> dict[str, list[dict[str, Any]]]:
    """Run the diffusers pipelines over the prompts and sketches; return, per component key, the graph
    feeds it received (UNet/ControlNet every step, text encoders per prompt, VAEs on the results)."""
    import torch
    from PIL import Image

    from sdkiln.runtime.backends import torch_io
    from sdkiln.runtime.contract.families import generation_defaults

    by_key = {c.key: c for c in comps}
    feeds: dict[str, list[dict[str, Any]]] = {k: [] for k in by_key}
    guidance = cal.guidance if cal.guidance is not None else generation_defaults(fam, lcm=lcm).guidance

    def hook(key: str) -> Any:
        def record(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if key in by_key:
                feeds[key].append(torch_io.contract_inputs(key, args, kwargs, by_key[key].inputs))

        return record

    handles = [loaded.pipe.unet.register_forward_pre_hook(hook("unet"), with_kwargs=True)]
    for te in fam.text_encoders:
        handles.append(getattr(loaded.pipe, te).register_forward_pre_hook(hook(te), with_kwargs=True))
    for ctype, cn in loaded.controlnets.items():
        handles.append(cn.register_forward_pre_hook(hook(f"controlnet.{ctype}"), with_kwargs=True))
    latents: list[Any] = []
    try:
        g = torch.Generator().manual_seed(cal.seed)
        common = {
            "num_inference_steps": cal.steps,
            "guidance_scale": guidance,
            "height": cal.size,
            "width": cal.size,
            "output_type": "latent",
            "generator": g,
        }
        text = loaded.task_pipeline("text")
        text.set_progress_bar_config(disable=True)
        for prompt in cal.prompts:
            with torch.inference_mode():
                latents.append(text(prompt=prompt, **common).images)
        # Every ControlNet being calibrated sees every sketch.
        for ctype in sorted(loaded.controlnets):
            if f"controlnet.{ctype}" not in by_key:
                continue
            pipe = loaded.task_pipeline("controlnet", ctype)
            pipe.set_progress_bar_config(disable=True)
            for i, path in enumerate(cal.sketches):
                image = Image.open(Path(recipe_dir) / path).convert("RGB").resize((cal.size, cal.size))
                prompt = cal.prompts[i % len(cal.prompts)]
                with torch.inference_mode():
                    latents.append(pipe(prompt=prompt, image=image, **common).images)
    finally:
        for h in handles:
            h.remove()
    # The VAEs see what the runtime gives them: final latents (unscaled) and decoded images.
    vae = loaded.pipe.vae
    sf = float(vae.config.scaling_factor)
    for lat in latents:
        z = lat / sf
        with torch.inference_mode():
            image = vae.decode(z).sample.clamp(-1, 1)
        for key, value in (
            ("vae_decoder", {"latent_sample": _np(z)}),
            ("vae_encoder", {"sample": _np(image)}),
        ):
            if key in feeds:
                feeds[key].append(value)
        if "taesd_encoder" in feeds:
            feeds["taesd_encoder"].append({"sample": _np(image)})
        if "taesd_decoder" in feeds:
            feeds["taesd_decoder"].append({"latent_sample": _np(z)})
    return feeds
