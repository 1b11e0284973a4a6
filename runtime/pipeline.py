"""The denoising loop, written once over the components of any backend.

``Pipeline.generate(Request)`` does txt2img, img2img (SDEdit strength) and ControlNet guidance in one
loop; ``sketch``/``text``/``edit`` (see ``tasks.py``) only prepare a ``Request``. Everything that could
differ between backends is behind ``Backend.component(name)(**arrays)``; everything else (tokenization,
scheduler maths, initial noise, guidance, image conversion) is numpy and therefore identical for every
backend. That is what makes end-to-end parity meaningful.

Determinism: the initial latents, the img2img noise and any scheduler noise come, in that order, from
``numpy.random.default_rng(seed)``: same seed, same image on the same backend; every backend starts from
the same noise.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from sdkiln.runtime.backends.base import Backend, Component
from sdkiln.runtime.contract.errors import GenerationError, UserError
from sdkiln.runtime.contract.families import generation_defaults
from sdkiln.runtime.contract.specs import cast_feeds
from sdkiln.runtime.images import to_pil, to_pixels
from sdkiln.runtime.schedulers import Scheduler, scheduler_from_config
from sdkiln.runtime.tasks import edit_request, sketch_request, text_request
from sdkiln.runtime.tokenizer import ClipTokenizer
from sdkiln.runtime.types import Control, ModelInfo, Progress, Request, Result

logger = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["Control", "GenerationError", "ModelInfo", "Pipeline", "Request", "Result", "guidance_embedding"]


def _plain(items: Iterable[T], desc: str, total: int) -> Iterator[T]:
    yield from items


def guidance_embedding(w: np.ndarray, dim: int) -> np.ndarray:
    """LCM's guidance-scale embedding (sinusoidal, of ``w * 1000``), as diffusers computes it."""
    w = w.astype(np.float32) * 1000.0
    half = dim // 2
    freq = np.exp(np.arange(half, dtype=np.float32) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freq[None, :]
    emb = np.concatenate([np.sin(emb), np.cos(emb)], axis=1)
    if dim % 2 == 1:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)


class Pipeline:
    """One bundle section on one backend, ready to generate. Build it with ``sdkiln.runtime.load``."""

    def __init__(self, backend: Backend, info: ModelInfo, vae: str = "full", source: str = ""):
        if vae not in ("full", "tiny"):
            raise UserError(f"vae must be 'full' or 'tiny' (got {vae!r})")
        if vae == "tiny" and not (backend.has("taesd_decoder")):
            raise UserError("this bundle has no tiny VAE (TAESD); use vae='full'")
        self.backend = backend
        self.info = info
        self.vae = vae
        self.source = source
        self.tokenizers = [
            ClipTokenizer.from_folder(d, default_pad_token=pad)
            for d, pad in zip(info.tokenizer_dirs, info.pad_tokens, strict=True)
        ]
        gen = generation_defaults(info.family, lcm=info.lcm)
        self.default_steps, self.default_guidance = gen.steps, gen.guidance
        # Set by ``load(..., backend="auto")``: the configuration chosen and why, and its ControlNet end.
        self.choice: Any = None
        self.default_control_end = 1.0

    def __repr__(self) -> str:
        return f"Pipeline({self.source or self.info.section!r}, backend={self.backend.description}, vae={self.vae})"

    # -- the three tasks (sugar over tasks.py + generate) -----------------------------------------------

    def text(self, prompt: str | list[str], **kwargs: Any) -> Image.Image | list[Image.Image]:
        """txt2img. ``prompt`` may be a list (a batch): then a list of images comes back."""
        result = self.generate(text_request(self, prompt, **kwargs))
        return result.images if isinstance(prompt, list) else result.images[0]

    def sketch(self, sketch: Any, prompt: str, **kwargs: Any) -> Image.Image:
        """ControlNet-scribble generation from a line drawing."""
        return self.generate(sketch_request(self, sketch, prompt, **kwargs)).images[0]

    def edit(self, image: Any, prompt: str, **kwargs: Any) -> Image.Image:
        """img2img at ``strength``; ``control="canny"`` keeps the structure with the canny ControlNet."""
        return self.generate(edit_request(self, image, prompt, **kwargs)).images[0]

    def components_for(self, task: str, control: str | None = None) -> list[str]:
        """The components a task runs: text encoder(s), UNet, the VAE half or halves, the ControlNet."""
        names = (
            ["text_encoder"] + [f"text_encoder_{i + 1}" for i in range(1, len(self.tokenizers))] + ["unet"]
        )
        prefix = "taesd" if self.vae == "tiny" else "vae"
        names.append(f"{prefix}_decoder")
        if task == "edit":
            names.append(f"{prefix}_encoder")
        kind = "scribble" if task == "sketch" else control
        if kind:
            names.append(f"controlnet.{kind}")
        return [n for n in names if self.backend.has(n)]

    def preload(self, names: list[str]) -> None:
        """Load components now (backends load them lazily, on first use), so stage times mean compute."""
        for name in names:
            self.backend.component(name)

    # -- sizes ------------------------------------------------------------------------------------------

    def size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """The (height, width) to generate; a UserError if the bundle was not exported for it."""
        h = height or self.info.default_size[0]
        w = width or self.info.default_size[1]
        f = self.info.vae_scale_factor
        if h <= 0 or w <= 0 or h % f or w % f:
            raise UserError(f"image size {w}x{h}: width and height must be positive multiples of {f}")
        unet = self.backend.component("unet")
        sample = unet.io.inputs["sample"].shape
        for axis, (dim, want) in enumerate(zip(sample[2:], (h // f, w // f), strict=True)):
            if isinstance(dim, int) and dim != want:
                fixed = [d * f if isinstance(d, int) else None for d in sample[2:]]
                raise UserError(
                    f"image size {w}x{h} is not one this bundle was exported for: its UNet takes "
                    f"{'height' if axis == 0 else 'width'} {dim * f} px only "
                    f"(exported size {fixed[1] or 'any'}x{fixed[0] or 'any'})"
                )
        return h, w

    # -- the loop ---------------------------------------------------------------------------------------

    def generate(
        self,
        req: Request,
        progress: Progress | None = None,
        on_latents: Callable[[np.ndarray], None] | None = None,
    ) -> Result:
        """Run one request: encode prompts, denoise from seeded noise (or a noised image), decode.

        ``on_latents`` is called with the final latents just before the VAE decodes them (the studio
        decodes them with TAESD, see ``decode``, to show a preview while the full decode runs).
        """
        progress = progress or _plain
        timings: dict[str, float] = {}
        steps = self.default_steps if req.steps is None else req.steps
        guidance = self.default_guidance if req.guidance is None else float(req.guidance)
        if steps < 1:
            raise UserError(f"steps must be at least 1 (got {steps})")
        if not 0.0 < req.strength <= 1.0:
            raise UserError(f"strength must be in (0, 1] (got {req.strength})")
        if not req.prompts:
            raise UserError("no prompt given")
        height, width = self.size(req.height, req.width)
        f = self.info.vae_scale_factor
        batch = len(req.prompts)
        unet = self.backend.component("unet")
        cfg = guidance > 1.0 and self.info.time_cond_proj_dim is None
        controlnet = self._controlnet(req.control, unet) if req.control is not None else None

        scheduler: Scheduler = scheduler_from_config(self.info.scheduler_config)
        scheduler.set_timesteps(steps, strength=req.strength if req.init_image is not None else 1.0)
        timesteps = scheduler.timesteps
        if len(timesteps) == 0:
            raise UserError(
                f"steps={steps} at strength={req.strength} leaves no denoising step; raise either"
            )

        t0 = time.perf_counter()
        cond = self._encode_prompts(req.prompts, req.negative_prompts, cfg)
        timings["text_encoder"] = time.perf_counter() - t0

        rng = np.random.default_rng(req.seed)
        latent_shape = (
            batch,
            unet.io.resolve(
                "sample", {"batch": batch, "latent_height": height // f, "latent_width": width // f}
            )[1],
            height // f,
            width // f,
        )
        if req.init_image is None:
            latents = rng.standard_normal(latent_shape, dtype=np.float32) * np.float32(
                scheduler.init_noise_sigma
            )
        else:
            t0 = time.perf_counter()
            clean = self._encode_image(req.init_image, batch)
            timings["vae_encoder"] = time.perf_counter() - t0
            noise = rng.standard_normal(latent_shape, dtype=np.float32)
            latents = scheduler.add_noise(clean, noise)

        extra = self._unet_extra(cond, guidance, batch, cfg, height, width)
        control_image = None
        if controlnet is not None:
            control_image = np.repeat(req.control.image.astype(np.float32), batch * (2 if cfg else 1), axis=0)

        t0 = time.perf_counter()
        n = len(timesteps)
        spent = {"controlnet": 0.0, "unet": 0.0}  # inside denoise: where the step time goes
        for i in progress(range(n), "denoise", n):
            t = timesteps[i]
            model_in = np.concatenate([latents, latents]) if cfg else latents
            model_in = scheduler.scale_model_input(model_in, i)
            tvec = np.full((model_in.shape[0],), t, dtype=np.float32)
            feeds: dict[str, np.ndarray] = {
                "sample": model_in,
                "timestep": tvec,
                "encoder_hidden_states": cond["hidden"],
                **extra,
            }
            t1 = time.perf_counter()
            residuals = self._residuals(controlnet, req.control, control_image, feeds, i, n, unet)
            t2 = time.perf_counter()
            out = self._run(unet, {**feeds, **residuals})["out_sample"]
            spent["controlnet"] += t2 - t1
            spent["unet"] += time.perf_counter() - t2
            if cfg:
                uncond, text = out[:batch], out[batch:]
                out = uncond + guidance * (text - uncond)
            latents = scheduler.step(out.astype(np.float32), i, latents, rng).prev_sample
        timings["denoise"] = time.perf_counter() - t0
        timings.update(spent if controlnet is not None else {"unet": spent["unet"]})

        if on_latents is not None:
            on_latents(latents)
        t0 = time.perf_counter()
        decoded = self._decode(latents)
        timings["vae_decoder"] = time.perf_counter() - t0
        if not np.isfinite(decoded).all():
            raise GenerationError(
                f"the VAE decoder produced non-finite pixels ({self.backend.description}); an fp16 VAE "
                "overflows on SD 1.5/SDXL latents: export the VAE in fp32 or use vae='tiny'"
            )
        pixels = to_pixels(decoded)
        return Result(
            images=to_pil(pixels),
            pixels=pixels,
            timings=timings,
            steps=n,
            guidance=guidance,
            cfg=cfg,
            seed=req.seed,
            latents=latents,
            settings={
                "height": height,
                "width": width,
                "scheduler": type(scheduler).__name__,
                **(
                    {"scheduler_substituted_for": scheduler.substituted_for}
                    if getattr(scheduler, "substituted_for", None)
                    else {}
                ),
            },
        )

    def decode(self, latents: np.ndarray) -> list[Image.Image]:
        """Final latents (as ``generate`` passes them to ``on_latents``) to images with this pipeline's VAE.

        A ``vae="tiny"`` pipeline over the same backend turns them into a TAESD preview::

            preview = Pipeline(pipe.backend, pipe.info, vae="tiny")
            pipe.generate(request, on_latents=lambda lat: show(preview.decode(lat)[0]))
        """
        return to_pil(to_pixels(self._decode(latents)))

    # -- pieces of the loop -----------------------------------------------------------------------------

    @staticmethod
    def _run(component: Component, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = component(**cast_feeds(component.io, feeds))
        return {k: v.astype(np.float32) if v.dtype != np.float32 else v for k, v in out.items()}

    def _encode_prompts(
        self, prompts: list[str], negatives: list[str] | None, cfg: bool
    ) -> dict[str, np.ndarray]:
        """hidden (B or 2B, 77, D) and, for UNets with added conditioning, pooled text embeds."""
        if negatives is not None and len(negatives) != len(prompts):
            raise UserError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        texts = prompts
        if cfg:
            texts = [*(negatives or [""] * len(prompts)), *prompts]
        hidden_parts, pooled = [], None
        added = "text_embeds" in self.backend.component("unet").io.inputs
        for i, tok in enumerate(self.tokenizers):
            name = "text_encoder" if i == 0 else f"text_encoder_{i + 1}"
            ids = tok.encode(texts)
            out = self._run(self.backend.component(name), {"input_ids": ids})
            # UNets with added conditioning (SDXL) read the penultimate layer; SD 1.x/2.x the last one.
            hidden_parts.append(out["penultimate_hidden_state"] if added else out["last_hidden_state"])
            if "text_embeds" in out:
                pooled = out["text_embeds"]
        hidden = np.concatenate(hidden_parts, axis=-1) if len(hidden_parts) > 1 else hidden_parts[0]
        if cfg and added and self.info.force_zeros_for_empty_prompt and not negatives:
            # SDXL's convention: with no negative prompt the unconditional half is zeros, not "" encoded.
            b = len(prompts)
            hidden[:b] = 0.0
            if pooled is not None:
                pooled[:b] = 0.0
        result = {"hidden": hidden.astype(np.float32)}
        if pooled is not None:
            result["pooled"] = pooled.astype(np.float32)
        return result

    def _unet_extra(
        self, cond: dict[str, np.ndarray], guidance: float, batch: int, cfg: bool, height: int, width: int
    ) -> dict[str, np.ndarray]:
        unet = self.backend.component("unet")
        extra: dict[str, np.ndarray] = {}
        rows = batch * (2 if cfg else 1)
        if "timestep_cond" in unet.io.inputs:
            dim = self.info.time_cond_proj_dim or int(unet.io.inputs["timestep_cond"].shape[1])
            extra["timestep_cond"] = guidance_embedding(np.full((rows,), guidance - 1.0, np.float32), dim)
        if "text_embeds" in unet.io.inputs:
            if "pooled" not in cond:
                raise UserError("this UNet takes pooled text embeddings but no text encoder gives them")
            extra["text_embeds"] = cond["pooled"]
            # SDXL micro-conditioning: original size, crop top-left (0, 0), target size.
            extra["time_ids"] = np.tile(
                np.array([[height, width, 0, 0, height, width]], np.float32), (rows, 1)
            )
        return extra

    def _controlnet(self, control: Control, unet: Component) -> Component:
        name = f"controlnet.{control.kind}"
        if not self.backend.has(name):
            have = [c.split(".", 1)[1] for c in self.info.controlnets] or ["none"]
            raise UserError(f"this bundle has no {control.kind} ControlNet (it has: {', '.join(have)})")
        if "mid_block_additional_residual" not in unet.io.inputs:
            raise UserError("this bundle's UNet was exported without ControlNet residual inputs")
        if not (0.0 <= control.start < control.end <= 1.0):
            raise UserError(
                f"control start/end must satisfy 0 <= start < end <= 1 (got {control.start}, {control.end})"
            )
        return self.backend.component(name)

    def _residuals(
        self,
        controlnet: Component | None,
        control: Control | None,
        control_image: np.ndarray | None,
        feeds: dict[str, np.ndarray],
        i: int,
        n: int,
        unet: Component,
    ) -> dict[str, np.ndarray]:
        names = [
            k for k in unet.io.inputs if k.endswith("_additional_residual") or "_additional_residual_" in k
        ]
        if not names:
            return {}
        # diffusers' controlnet_keep: off before `start` and after `end`, as fractions of the schedule.
        keep = control is not None and not (i / n < control.start or (i + 1) / n > control.end)
        if controlnet is None or not keep or control is None:
            if all(unet.io.inputs[k].optional for k in names):
                return {}  # the graph's own defaults are "no ControlNet" (an ONNX UNet's zero defaults)
            b, _, lh, lw = feeds["sample"].shape
            bindings = {"batch": b, "latent_height": lh, "latent_width": lw}
            return {k: np.zeros(unet.io.resolve(k, bindings), np.float32) for k in names}
        cn_feeds = {k: v for k, v in feeds.items() if k in controlnet.io.inputs}
        cn_feeds["controlnet_cond"] = control_image
        cn_feeds["conditioning_scale"] = np.array([control.scale], np.float32)
        out = self._run(controlnet, cn_feeds)
        res = {
            k.replace("down_block_res_sample_", "down_block_additional_residual_"): v
            for k, v in out.items()
            if k.startswith("down_block_res_sample_")
        }
        res["mid_block_additional_residual"] = out["mid_block_res_sample"]
        if set(res) != set(names):
            raise UserError(
                f"the ControlNet gives {len(res)} residuals but the UNet takes {len(names)}; they do not belong together"
            )
        return res

    def _vae(self, half: str) -> tuple[Component, float, float]:
        if self.vae == "tiny":
            return self.backend.component(f"taesd_{half}"), self.info.taesd_scaling_factor, 0.0
        return (
            self.backend.component(f"vae_{half}"),
            self.info.vae_scaling_factor,
            self.info.vae_shift_factor or 0.0,
        )

    def _encode_image(self, image: np.ndarray, batch: int) -> np.ndarray:
        enc, scale, shift = self._vae("encoder")
        latents = self._run(enc, {"sample": image.astype(np.float32)})["latent_sample"]
        latents = (latents - shift) * scale
        return np.repeat(latents, batch, axis=0).astype(np.float32)

    def _decode(self, latents: np.ndarray) -> np.ndarray:
        dec, scale, shift = self._vae("decoder")
        return self._run(dec, {"latent_sample": (latents / scale + shift).astype(np.float32)})["sample"]
