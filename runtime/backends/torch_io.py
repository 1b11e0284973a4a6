"""The one PyTorch reference: how each contract component is loaded from a diffusers folder and called.

Every PyTorch call by contract names goes through this table: the torch backend (numpy in and out),
the ONNX and Core ML exports (``graph_module`` wraps it with positional inputs), the parity gates of
every stage (their reference outputs), calibration (``contract_inputs`` turns what a diffusers pipeline
passes to a module back into contract feeds) and the benchmarks. So a gate compares an artifact with the
diffusers component called exactly as the diffusers pipeline calls it, and with nothing else.

Contract calls (inputs -> outputs; ``x`` maps input names to tensors):

- ``text_encoder``/``text_encoder_2``: ``input_ids`` (int) -> any of ``last_hidden_state``,
  ``pooler_output``, ``text_embeds`` (projected pooled), ``penultimate_hidden_state``;
- ``unet``: ``sample``, ``timestep``, ``encoder_hidden_states`` [``timestep_cond``] [``text_embeds``,
  ``time_ids``] [``down_block_additional_residual_<i>``..., ``mid_block_additional_residual``] ->
  ``out_sample``;
- ``controlnet``: ``sample``, ``timestep``, ``encoder_hidden_states``, ``controlnet_cond``,
  ``conditioning_scale`` [``text_embeds``, ``time_ids``] -> ``down_block_res_sample_<i>``...,
  ``mid_block_res_sample``;
- ``vae_encoder``/``taesd_encoder``: ``sample`` (image in [-1, 1]) -> ``latent_sample`` (unscaled; the
  posterior mean of AutoencoderKL, TAESD's deterministic latents);
- ``vae_decoder``/``taesd_decoder``: ``latent_sample`` (unscaled) -> ``sample`` (image in [-1, 1]).

torch, diffusers and transformers are imported inside functions: importing this module is free.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.layout import CONTROLNET_DIR, PIPELINE_CONFIG_DIRS
from sdkiln.runtime.contract.specs import resolve_shape

__all__ = [
    "CALLS",
    "call",
    "component_kind",
    "contract_inputs",
    "graph_module",
    "imports",
    "load_module",
    "module_class",
]


def imports() -> tuple[Any, Any, Any]:
    """(torch, diffusers, transformers), or a UserError saying how to install them."""
    try:
        import diffusers
        import torch
        import transformers
    except ImportError as e:
        raise UserError(
            f"the torch backend needs the build toolchain ({e.name} is missing): pip install 'sdkiln[build]'"
        ) from e
    return torch, diffusers, transformers


def component_kind(component: str) -> str:
    """``controlnet.canny`` -> ``controlnet``; every other key is its own kind."""
    return component.split(".", 1)[0]


# -- loading -------------------------------------------------------------------------------------------

# Component kind -> (library, class) of the module behind it.
_CLASSES: dict[str, tuple[str, str]] = {
    "text_encoder": ("transformers", "CLIPTextModel"),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
    "unet": ("diffusers", "UNet2DConditionModel"),
    "controlnet": ("diffusers", "ControlNetModel"),
    "vae_encoder": ("diffusers", "AutoencoderKL"),
    "vae_decoder": ("diffusers", "AutoencoderKL"),
    "taesd_encoder": ("diffusers", "AutoencoderTiny"),
    "taesd_decoder": ("diffusers", "AutoencoderTiny"),
}


def module_class(component: str) -> Any:
    """The diffusers/transformers class of a component key."""
    torch, diffusers, transformers = imports()
    lib, name = _CLASSES[component_kind(component)]
    return getattr(diffusers if lib == "diffusers" else transformers, name)


def module_folder(component: str) -> str:
    """Where a component's module lives in a diffusers PIPELINE folder (both VAE halves: ``vae``)."""
    kind = component_kind(component)
    if kind == "controlnet":
        return f"{CONTROLNET_DIR}/{component.split('.', 1)[1]}"
    return PIPELINE_CONFIG_DIRS[kind]


def load_module(folder: Path, component: str, dtype: str = "float32", allow_pickle: bool = False) -> Any:
    """Load one component's module (eval mode) from a PIPELINE folder. safetensors only unless
    ``allow_pickle``; remote code is never run."""
    torch, _, _ = imports()
    path = Path(folder) / module_folder(component)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json (is {folder} a diffusers pipeline folder with {component}?)")
    kwargs: dict[str, Any] = {"torch_dtype": getattr(torch, dtype)}
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    return module_class(component).from_pretrained(str(path), **kwargs).eval()


# -- calls ---------------------------------------------------------------------------------------------

Call = Callable[[Any, Mapping[str, Any], Sequence[str]], dict[str, Any]]


def _text(model: Any, x: Mapping[str, Any], outputs: Sequence[str]) -> dict[str, Any]:
    out = model(x["input_ids"].long(), output_hidden_states="penultimate_hidden_state" in outputs)
    values = {
        "last_hidden_state": lambda: out.last_hidden_state,
        "pooler_output": lambda: out.pooler_output,
        "text_embeds": lambda: out.text_embeds,
        "penultimate_hidden_state": lambda: out.hidden_states[-2],
    }
    return {n: values[n]() for n in outputs}


def _added(x: Mapping[str, Any]) -> dict[str, Any] | None:
    if x.get("text_embeds") is None:
        return None
    return {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}


def residual_names(names: Sequence[str]) -> list[str]:
    """The ``down_block_additional_residual_<i>`` names among ``names``, in index order."""
    downs = [n for n in names if n.startswith("down_block_additional_residual_")]
    return sorted(downs, key=lambda n: int(n.rsplit("_", 1)[1]))


def _unet(model: Any, x: Mapping[str, Any], outputs: Sequence[str]) -> dict[str, Any]:
    downs = residual_names(list(x))
    res: dict[str, Any] = {}
    if downs:
        res = {
            "down_block_additional_residuals": tuple(x[k] for k in downs),
            "mid_block_additional_residual": x["mid_block_additional_residual"],
        }
    out = model(
        x["sample"],
        x["timestep"],
        encoder_hidden_states=x["encoder_hidden_states"],
        timestep_cond=x.get("timestep_cond"),
        added_cond_kwargs=_added(x),
        return_dict=False,
        **res,
    )
    return {"out_sample": out[0]}


def _controlnet(model: Any, x: Mapping[str, Any], outputs: Sequence[str]) -> dict[str, Any]:
    # A (1,) tensor scale broadcasts where diffusers multiplies each residual by the float scale, so
    # the same call serves tracing (a graph input) and eager runs.
    downs, mid = model(
        x["sample"],
        x["timestep"],
        encoder_hidden_states=x["encoder_hidden_states"],
        controlnet_cond=x["controlnet_cond"],
        conditioning_scale=x["conditioning_scale"],
        added_cond_kwargs=_added(x),
        return_dict=False,
    )
    out = {f"down_block_res_sample_{i}": d for i, d in enumerate(downs)}
    out["mid_block_res_sample"] = mid
    return out


def _vae_encoder(model: Any, x: Mapping[str, Any], outputs: Sequence[str]) -> dict[str, Any]:
    return {"latent_sample": model.encode(x["sample"]).latent_dist.mean}


def _taesd_encoder(model: Any, x: Mapping[str, Any], outputs: Sequence[str]) -> dict[str, Any]:
    return {"latent_sample": model.encode(x["sample"]).latents}


def _decoder(model: Any, x: Mapping[str, Any], outputs: Sequence[str]) -> dict[str, Any]:
    return {"sample": model.decode(x["latent_sample"]).sample}


CALLS: dict[str, Call] = {
    "text_encoder": _text,
    "text_encoder_2": _text,
    "unet": _unet,
    "controlnet": _controlnet,
    "vae_encoder": _vae_encoder,
    "vae_decoder": _decoder,
    "taesd_encoder": _taesd_encoder,
    "taesd_decoder": _decoder,
}


def call(component: str, model: Any, x: Mapping[str, Any], outputs: Sequence[str]) -> dict[str, Any]:
    """Run ``model`` (the diffusers/transformers module of ``component``) on contract inputs ``x``
    (tensors); returns the contract outputs by name (all of them for UNet/ControlNet/VAE, the asked
    ``outputs`` for text encoders)."""
    try:
        fn = CALLS[component_kind(component)]
    except KeyError:
        raise UserError(f"no PyTorch call for component {component!r}; known: {', '.join(CALLS)}") from None
    return fn(model, x, outputs)


def graph_module(model: Any, component: str, input_names: Sequence[str], output_names: Sequence[str]) -> Any:
    """A torch module whose ``forward(*inputs)`` takes the inputs in ``input_names`` order and returns
    the outputs in ``output_names`` order: what an export traces, and the reference its gate runs."""
    import torch

    names, outs = list(input_names), list(output_names)

    class GraphModule(torch.nn.Module):
        def __init__(self, model: Any):
            super().__init__()
            self.model = model

        def forward(self, *args: Any) -> tuple[Any, ...]:
            result = call(component, self.model, dict(zip(names, args, strict=True)), outs)
            return tuple(result[n] for n in outs)

    return GraphModule(model).eval()


# -- the inverse: what a diffusers pipeline passed, as contract feeds (calibration) ------------------

_POSITIONAL = {
    "unet": ("sample", "timestep", "encoder_hidden_states"),
    "controlnet": ("sample", "timestep", "encoder_hidden_states", "controlnet_cond"),
    "text_encoder": ("input_ids",),
    "text_encoder_2": ("input_ids",),
}


def contract_inputs(
    component: str, args: tuple[Any, ...], kwargs: Mapping[str, Any], inputs: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Numpy feeds, by contract names, of one call a diffusers pipeline made to ``component``'s module
    (a forward pre-hook's ``args``/``kwargs``), for a graph whose inputs are ``inputs`` (spec dicts).

    Residual inputs the pipeline did not pass (a text-to-image call of a UNet graph that takes
    ControlNet residuals) are zeros of the spec's shape.
    """
    import numpy as np

    kind = component_kind(component)
    names = _POSITIONAL.get(kind, ())
    x = dict(zip(names, args, strict=False))
    x.update({k: v for k, v in kwargs.items() if k in names and k not in x})
    wanted = [t["name"] for t in inputs]

    def arr(t: Any) -> Any:
        return t.detach().float().cpu().numpy() if hasattr(t, "detach") else np.asarray(t, np.float32)

    if kind.startswith("text_encoder"):
        return {"input_ids": x["input_ids"].detach().cpu().numpy().astype(np.int32)}
    sample = arr(x["sample"])
    b, _, h, w = sample.shape
    ts = np.asarray(arr(x["timestep"]), np.float32).reshape(-1)
    out: dict[str, Any] = {
        "sample": sample,
        "timestep": np.broadcast_to(ts, (b,)).copy(),
        "encoder_hidden_states": arr(x["encoder_hidden_states"]),
    }
    added = kwargs.get("added_cond_kwargs") or {}
    for n in ("text_embeds", "time_ids"):
        if n in wanted:
            out[n] = arr(added[n])
    if kind == "controlnet":
        out["controlnet_cond"] = arr(x["controlnet_cond"])
        scale = kwargs.get("conditioning_scale", 1.0)
        out["conditioning_scale"] = np.asarray([float(scale)], dtype=np.float32)
        return {k: v for k, v in out.items() if k in wanted}
    if "timestep_cond" in wanted:
        out["timestep_cond"] = arr(kwargs["timestep_cond"])
    downs = kwargs.get("down_block_additional_residuals")
    mid = kwargs.get("mid_block_additional_residual")
    axes = {"batch": b, "latent_height": h, "latent_width": w}
    for t in inputs:
        n = t["name"]
        if n.startswith("down_block_additional_residual_"):
            i = int(n.rsplit("_", 1)[1])
            out[n] = (
                arr(downs[i]) if downs is not None else np.zeros(resolve_shape(t["shape"], axes), np.float32)
            )
        elif n == "mid_block_additional_residual":
            out[n] = arr(mid) if mid is not None else np.zeros(resolve_shape(t["shape"], axes), np.float32)
    return {k: v for k, v in out.items() if k in wanted}
