"""DeepCache-style feature reuse, measured before anything is exported: does reusing the UNet's deep
features across LCM steps hold up at 4 steps?

DeepCache (Ma et al., 2023) runs the full UNet on some steps and caches the input of its last up block
(the high-level features); on the steps between, a "shallow" UNet runs only ``conv_in``, the first down
block and the last up block, on the cached features. Here that is a wrapper around the PyTorch
reference's UNet inside the runtime's own loop (the ControlNet still runs every step, its residuals
added where the shallow path has them), so the only difference from the exact output is the reuse.
The bench reports its time and its deviation from the exact output (PSNR/SSIM, final-latent SQNR); a
full and a shallow graph would be exported only if the deviation were small.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sdkiln.runtime.contract.specs import check_inputs


def _embed(unet: Any, sample: Any, timestep: Any, timestep_cond: Any) -> Any:
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    return unet.time_embedding(t_emb, timestep_cond)


def _down(block: Any, h: Any, emb: Any, ehs: Any) -> tuple[Any, tuple[Any, ...]]:
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=h, temb=emb, encoder_hidden_states=ehs)
    return block(hidden_states=h, temb=emb)


def _up(block: Any, h: Any, emb: Any, res: tuple[Any, ...], ehs: Any, size: Any) -> Any:
    if getattr(block, "has_cross_attention", False):
        return block(
            hidden_states=h,
            temb=emb,
            res_hidden_states_tuple=res,
            encoder_hidden_states=ehs,
            upsample_size=size,
        )
    return block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=size)


def _out(unet: Any, h: Any) -> Any:
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


def full_step(unet: Any, x: dict[str, Any]) -> tuple[Any, Any]:
    """The UNet's forward (diffusers' ``UNet2DConditionModel`` order), returning the noise prediction and
    the cache: the hidden state entering the last up block."""
    ehs = x["encoder_hidden_states"]
    emb = _embed(unet, x["sample"], x["timestep"], x.get("timestep_cond"))
    h = unet.conv_in(x["sample"])
    res: tuple[Any, ...] = (h,)
    for block in unet.down_blocks:
        h, r = _down(block, h, emb, ehs)
        res += r
    if x.get("down") is not None:
        res = tuple(a + b for a, b in zip(res, x["down"], strict=True))
    h = unet.mid_block(h, emb, encoder_hidden_states=ehs)
    if x.get("mid") is not None:
        h = h + x["mid"]
    cache = None
    for i, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        r, res = res[-n:], res[:-n]
        last = i == len(unet.up_blocks) - 1
        if last:
            cache = h
        h = _up(block, h, emb, r, ehs, None if last else res[-1].shape[2:])
    return _out(unet, h), cache


def shallow_step(unet: Any, x: dict[str, Any], cache: Any) -> Any:
    """``conv_in``, the first down block and the last up block on ``cache``: the shallow path."""
    ehs = x["encoder_hidden_states"]
    emb = _embed(unet, x["sample"], x["timestep"], x.get("timestep_cond"))
    h = unet.conv_in(x["sample"])
    res: tuple[Any, ...] = (h,)
    _, r = _down(unet.down_blocks[0], h, emb, ehs)
    res += r
    n = len(unet.up_blocks[-1].resnets)
    res = res[:n]
    if x.get("down") is not None:
        res = tuple(a + b for a, b in zip(res, x["down"][:n], strict=True))
    return _out(unet, _up(unet.up_blocks[-1], cache, emb, res, ehs, None))


class DeepCacheUNet:
    """The runtime's UNet component, computed the DeepCache way: full on every ``interval``-th call of a
    generation (``reset()`` before each), shallow on the others."""

    def __init__(self, inner: Any, interval: int = 2):
        self.name, self.io, self.model = inner.name, inner.io, inner.model
        self.interval = interval
        self.calls = 0
        self.cache: Any = None
        self.kinds: list[str] = []

    def reset(self) -> None:
        self.calls, self.cache, self.kinds = 0, None, []

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        check_inputs(self.name, self.io, inputs)
        t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}
        downs = sorted(
            (k for k in t if k.startswith("down_block_additional_residual_")),
            key=lambda k: int(k.rsplit("_", 1)[1]),
        )
        x = {
            "sample": t["sample"],
            "timestep": t["timestep"],
            "encoder_hidden_states": t["encoder_hidden_states"],
            "timestep_cond": t.get("timestep_cond"),
            "down": tuple(t[k] for k in downs) if downs else None,
            "mid": t.get("mid_block_additional_residual"),
        }
        with torch.inference_mode():
            if self.cache is None or self.calls % self.interval == 0:
                out, self.cache = full_step(self.model, x)
                self.kinds.append("full")
            else:
                out = shallow_step(self.model, x, self.cache)
                self.kinds.append("shallow")
        self.calls += 1
        return {"out_sample": out.float().numpy()}


class DeepCacheBackend:
    """Another backend's components, with its UNet computed by ``DeepCacheUNet``."""

    def __init__(self, inner: Any, interval: int = 2):
        self.inner = inner
        self.name = inner.name
        self.description = f"{inner.description} + DeepCache (full every {interval} steps)"
        self.unet = DeepCacheUNet(inner.component("unet"), interval)

    def has(self, component: str) -> bool:
        return self.inner.has(component)

    def component(self, component: str) -> Any:
        return self.unet if component == "unet" else self.inner.component(component)
