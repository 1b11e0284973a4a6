"""Parity cases taken from diffusers' own pipelines: an independent reference for the ONNX gates.

``parity_cases`` (components.py) feeds a graph and the torch wrapper it was traced from the same seeded
inputs, so a mistake in that wrapper (an argument mapped wrong, a missing conditioning input) would be
in both and pass. Here the reference is what diffusers itself does: its text-to-image and ControlNet
pipelines run at the recipe's resolution, at batch 1 and 2, and forward hooks record every call they
make to the text encoders, the UNet and the ControlNets, with the outputs the modules returned. The
recorded inputs become graph feeds by the contract (``torch_io.contract_inputs``, the same conversion
the runtime's loop follows), and the graph must reproduce the recorded outputs.

    cases = pipeline_cases(loaded, comps, size=512, batch_sizes=[1, 2])   # {component key: [ParityCase]}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import Field

from sdkiln.runtime.backends import torch_io
from sdkiln.stages.common.onnx.parity import ParityCase
from sdkiln.stages.engine.core import StageParams

HOOKED = ("text_encoder", "text_encoder_2", "unet", "controlnet")


class PipelineParityParams(StageParams):
    """The diffusers pipelines run for the independent reference (``size``: pixels, default the model's)."""

    enabled: bool = True
    size: int | None = Field(default=None, ge=16, le=2048, multiple_of=8)
    batch_sizes: list[int] = Field(default=[1, 2], min_length=1)
    steps: int = Field(default=1, ge=1, le=4, description="denoising steps per run (each one a UNet call)")
    seed: int = Field(default=0, ge=0)


def _np(t: Any) -> Any:
    return t.detach().float().cpu().numpy()


def _outputs(kind: str, out: Any, names: Sequence[str]) -> dict[str, Any]:
    """The recorded module output, by graph output name (names the call did not produce are left out)."""
    if kind == "unet":
        sample = out[0] if isinstance(out, tuple) else out.sample
        return {"out_sample": _np(sample)}
    if kind == "controlnet":
        downs, mid = out if isinstance(out, tuple) else (out.down_block_res_samples, out.mid_block_res_sample)
        got = {f"down_block_res_sample_{i}": _np(d) for i, d in enumerate(downs)}
        got["mid_block_res_sample"] = _np(mid)
        return {n: got[n] for n in names if n in got}
    values = {
        "last_hidden_state": getattr(out, "last_hidden_state", None),
        "pooler_output": getattr(out, "pooler_output", None),
        "text_embeds": getattr(out, "text_embeds", None),
        "penultimate_hidden_state": (
            out.hidden_states[-2] if getattr(out, "hidden_states", None) is not None else None
        ),
    }
    return {n: _np(values[n]) for n in names if values.get(n) is not None}


def pipeline_cases(
    loaded: Any,
    comps: Sequence[Any],
    *,
    size: int,
    batch_sizes: Sequence[int],
    steps: int = 1,
    seed: int = 0,
    guidance: float | None = None,
    static: dict[str, int] | None = None,
) -> dict[str, list[ParityCase]]:
    """Run diffusers' text-to-image pipeline (and the ControlNet pipeline of each ControlNet in
    ``comps``) and return, per hooked component key, one case per recorded call. With ``static`` axis
    sizes only calls of that exact shape are kept (a static graph takes nothing else)."""
    import numpy as np
    import torch

    by_key = {c.key: c for c in comps if c.kind in HOOKED}
    cases: dict[str, list[ParityCase]] = {k: [] for k in by_key}
    label = {"run": ""}

    def hook(key: str) -> Any:
        comp = by_key[key]
        names = [t["name"] for t in comp.outputs]

        residual_inputs = any("additional_residual" in t["name"] for t in comp.inputs)

        def record(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            if (
                comp.kind == "unet"
                and not residual_inputs
                and kwargs.get("mid_block_additional_residual") is not None
            ):
                return  # a graph without residual inputs cannot take a ControlNet-guided call
            feeds = torch_io.contract_inputs(key, args, kwargs, comp.inputs)
            expected = _outputs(comp.kind, out, names)
            if not expected:
                return
            feeds = {
                t["name"]: feeds[t["name"]].astype(t["dtype"]) for t in comp.inputs if t["name"] in feeds
            }
            n = sum(label["run"] in c.label for c in cases[key])
            cases[key].append(ParityCase(f"{label['run']}_call{n}", feeds, expected))

        return record

    modules = {"unet": loaded.pipe.unet}
    for te in ("text_encoder", "text_encoder_2"):
        if getattr(loaded.pipe, te, None) is not None:
            modules[te] = getattr(loaded.pipe, te)
    for ctype, cn in loaded.controlnets.items():
        modules[f"controlnet.{ctype}"] = cn
    handles = [m.register_forward_hook(hook(k), with_kwargs=True) for k, m in modules.items() if k in by_key]
    g_kw = {} if guidance is None else {"guidance_scale": guidance}
    rng = np.random.default_rng(seed)
    try:
        runs: list[tuple[str, Any, dict[str, Any]]] = [("text", loaded.task_pipeline("text"), {})]
        for key in by_key:
            if key.startswith("controlnet."):
                ctype = key.split(".", 1)[1]
                cond = torch.from_numpy(rng.uniform(0.0, 1.0, (1, 3, size, size)).astype(np.float32))
                runs.append(
                    (f"controlnet-{ctype}", loaded.task_pipeline("controlnet", ctype), {"image": cond})
                )
        for task, pipe, extra in runs:
            pipe.set_progress_bar_config(disable=True)
            for b in batch_sizes:
                label["run"] = f"pipeline_{task}_b{b}_{size}px"
                prompts = ["a photograph of a house by a lake", "a pencil sketch of a cat"] * b
                kw = dict(extra)
                if "image" in kw:
                    kw["image"] = kw["image"].repeat(b, 1, 1, 1)
                with torch.inference_mode():
                    pipe(
                        prompt=prompts[:b],
                        num_inference_steps=steps,
                        height=size,
                        width=size,
                        output_type="latent",
                        generator=torch.Generator().manual_seed(seed),
                        **g_kw,
                        **kw,
                    )
    finally:
        for h in handles:
            h.remove()
    if static:
        cases = {k: [c for c in v if _fits(c, by_key[k], static)] for k, v in cases.items()}
    return cases


def _fits(case: ParityCase, comp: Any, static: dict[str, int]) -> bool:
    from sdkiln.runtime.contract.specs import resolve_shape

    return all(
        list(case.feeds[t["name"]].shape) == resolve_shape(t["shape"], static)
        for t in comp.inputs
        if t["name"] in case.feeds
    )
