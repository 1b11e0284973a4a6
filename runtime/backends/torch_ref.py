"""The PyTorch reference backend: the diffusers models of a PIPELINE bundle section behind the same
component interface as ONNX Runtime (contract I/O names, numpy in and out).

It exists for parity: the runtime's one denoising loop runs over these components exactly as over the
ONNX ones, so any difference in the final image comes from the export, not from the loop. Needs the
build extra (torch, diffusers, transformers); importing this module imports none of them.

The I/O spec comes from ``families.component_specs`` filled in from the section's own configs, and
inputs are checked against it like any other backend's. ``dtype="float16"``/``"bfloat16"`` runs the
text encoder, UNet and ControlNets in that dtype; the VAE stays in float32 when its config says
``force_upcast`` (the SD 1.5 and SDXL VAEs overflow in fp16).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sdkiln.runtime.backends.base import ComponentIO, check_inputs
from sdkiln.stages.core import UserError

logger = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")


def _imports():
    try:
        import diffusers
        import torch
        import transformers
    except ImportError as e:
        raise UserError(
            f"the torch backend needs the build toolchain ({e.name} is missing): pip install 'sdkiln[build]'"
        ) from e
    return torch, diffusers, transformers


def read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise UserError(f"{path}: missing (is this a diffusers pipeline folder?)") from e
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable config ({e})") from e


class TorchComponent:
    """Numpy in, numpy out, around one call into a diffusers/transformers module."""

    def __init__(self, name: str, io: ComponentIO, fn: Callable[..., dict[str, Any]], dtype: Any):
        self.name = name
        self.io = io
        self._fn = fn
        self._dtype = dtype

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        check_inputs(self.name, self.io, inputs)
        tensors = {
            k: torch.from_numpy(np.ascontiguousarray(v)).to(
                self._dtype if v.dtype.kind == "f" else torch.long
            )
            for k, v in inputs.items()
        }
        with torch.inference_mode():
            out = self._fn(**tensors)
        return {k: v.float().numpy() for k, v in out.items()}


class TorchBackend:
    """diffusers models loaded from a pipeline folder (``torch/fused`` or any PIPELINE section)."""

    name = "torch"

    def __init__(
        self, folder: Path, family: str, controlnets: list[str], taesd: bool, dtype: str = "float32"
    ):
        torch, diffusers, transformers = _imports()
        if dtype not in DTYPES:
            raise UserError(f"torch dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
        from sdkiln.stages.families import component_specs, get_family

        self._torch = torch
        self._dt = getattr(torch, dtype)
        fam = get_family(family)
        configs = {
            "unet": read_config(folder / "unet" / "config.json"),
            "vae": read_config(folder / "vae" / "config.json"),
        }
        for te in fam.text_encoders:
            configs[te] = read_config(folder / te / "config.json")
        if taesd:
            configs["vae_tiny"] = read_config(folder / "vae_tiny" / "config.json")
        specs = component_specs(
            fam, configs, controlnets=controlnets, taesd=taesd, unet_residual_inputs=bool(controlnets)
        )
        self._io = {k: ComponentIO.from_manifest(v) for k, v in specs.items()}
        self._folder = folder
        self._family = fam
        self._controlnets = controlnets
        self._taesd = taesd
        self._vae_dt = torch.float32 if configs["vae"].get("force_upcast", True) else self._dt
        self._modules: dict[str, Any] = {}
        self._components: dict[str, TorchComponent] = {}
        self.description = f"torch {torch.__version__} + diffusers {diffusers.__version__} ({dtype}, CPU)"

    # -- loading -----------------------------------------------------------------------------------

    def _module(self, key: str) -> Any:
        if key in self._modules:
            return self._modules[key]
        torch, diffusers, transformers = _imports()
        folder = self._folder
        if key == "text_encoder":
            m = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=self._dt)
        elif key == "text_encoder_2":
            m = transformers.CLIPTextModelWithProjection.from_pretrained(
                folder / "text_encoder_2", torch_dtype=self._dt
            )
        elif key == "unet":
            m = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=self._dt)
        elif key == "vae":
            m = diffusers.AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=self._vae_dt)
        elif key == "vae_tiny":
            m = diffusers.AutoencoderTiny.from_pretrained(folder / "vae_tiny", torch_dtype=self._vae_dt)
        elif key.startswith("controlnet."):
            m = diffusers.ControlNetModel.from_pretrained(
                folder / "controlnet" / key.split(".", 1)[1], torch_dtype=self._dt
            )
        else:  # pragma: no cover - guarded by has()
            raise KeyError(key)
        m.eval()
        self._modules[key] = m
        return m

    def has(self, component: str) -> bool:
        return component in self._io

    def component(self, component: str) -> TorchComponent:
        if component not in self._io:
            raise UserError(f"this bundle section has no {component} (it has: {', '.join(sorted(self._io))})")
        if component not in self._components:
            fn, dt = self._make(component)
            self._components[component] = TorchComponent(component, self._io[component], fn, dt)
        return self._components[component]

    def _make(self, name: str) -> tuple[Callable[..., dict[str, Any]], Any]:
        if name == "text_encoder" or name == "text_encoder_2":
            model = self._module(name)
            wants = set(self._io[name].outputs)

            def text(input_ids):
                out = model(input_ids, output_hidden_states="penultimate_hidden_state" in wants)
                res = {"last_hidden_state": out.last_hidden_state}
                if "pooler_output" in wants:
                    res["pooler_output"] = out.pooler_output
                if "text_embeds" in wants:
                    res["text_embeds"] = out.text_embeds
                if "penultimate_hidden_state" in wants:
                    res["penultimate_hidden_state"] = out.hidden_states[-2]
                return res

            return text, self._dt
        if name == "unet":
            unet = self._module("unet")

            def run_unet(
                sample,
                timestep,
                encoder_hidden_states,
                timestep_cond=None,
                text_embeds=None,
                time_ids=None,
                mid_block_additional_residual=None,
                **residuals,
            ):
                downs = [
                    residuals[f"down_block_additional_residual_{i}"] for i in range(len(residuals))
                ] or None
                added = (
                    {"text_embeds": text_embeds, "time_ids": time_ids} if text_embeds is not None else None
                )
                out = unet(
                    sample,
                    timestep,
                    encoder_hidden_states,
                    timestep_cond=timestep_cond,
                    added_cond_kwargs=added,
                    down_block_additional_residuals=downs,
                    mid_block_additional_residual=mid_block_additional_residual,
                    return_dict=False,
                )[0]
                return {"out_sample": out}

            return run_unet, self._dt
        if name.startswith("controlnet."):
            cn = self._module(name)

            def run_cn(
                sample,
                timestep,
                encoder_hidden_states,
                controlnet_cond,
                conditioning_scale,
                text_embeds=None,
                time_ids=None,
            ):
                added = (
                    {"text_embeds": text_embeds, "time_ids": time_ids} if text_embeds is not None else None
                )
                downs, mid = cn(
                    sample,
                    timestep,
                    encoder_hidden_states,
                    controlnet_cond,
                    conditioning_scale=float(conditioning_scale.reshape(-1)[0]),
                    added_cond_kwargs=added,
                    return_dict=False,
                )
                res = {f"down_block_res_sample_{i}": d for i, d in enumerate(downs)}
                res["mid_block_res_sample"] = mid
                return res

            return run_cn, self._dt
        vae_key = "vae_tiny" if name.startswith("taesd") else "vae"
        vae = self._module(vae_key)
        if name.endswith("_encoder"):

            def encode(sample):
                out = vae.encode(sample)
                # AutoencoderKL: the posterior mean (contract); AutoencoderTiny: its deterministic latents.
                latents = out.latents if vae_key == "vae_tiny" else out.latent_dist.mean
                return {"latent_sample": latents}

            return encode, self._vae_dt

        def decode(latent_sample):
            return {"sample": vae.decode(latent_sample, return_dict=False)[0]}

        return decode, self._vae_dt
