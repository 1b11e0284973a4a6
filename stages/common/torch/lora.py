"""LoRA state dicts as real repos ship them: which layers they adapt, and which keys land on no layer.

Two key formats reach ``fuse_lora``:

- diffusers/PEFT: ``unet.<module path>.lora_A.weight`` / ``.lora_B.weight`` (``text_encoder.``,
  ``text_encoder_2.`` for the text encoders);
- kohya: ``lora_unet_<module path with . as _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
  (``lora_te_``, or ``lora_te1_``/``lora_te2_`` for SDXL's two encoders). LCM-LoRA (all three public
  repos) uses this format on diffusers module names, UNet only, and adapts far more than attention:
  every ResNet conv and shortcut, the time-embedding projections and the down/up-sampler convs
  (``LCM_LORA_UNET_TARGETS``).

diffusers' loader converts both, but a key it cannot place is only logged (and its layer silently
left as it was): ``unmatched_keys`` finds those keys by name before loading, so a LoRA for another
architecture is an error that names the key. Kohya files in Stable Diffusion's original block names
(``lora_unet_input_blocks_...``) are converted by diffusers and cannot be checked by name here; the
layer count check in ``fuse_lora`` still covers them.
"""

from __future__ import annotations

from typing import Any

# The layers LCM-LoRA adapts in a diffusers UNet (module name suffixes). Attention and feed-forward,
# the transformer's in/out projections, and the convolutional layers: ResNet convs, their shortcuts
# and time-embedding projections, and the down/up-sampler convs.
LCM_LORA_UNET_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
)

# kohya prefix -> the pipeline attribute it adapts (longest prefixes first when matching)
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te_": "text_encoder",
}
# Original Stable Diffusion block names: diffusers maps them to its own; not checkable by name here.
_SGM_BLOCKS = ("input_blocks_", "middle_block_", "output_blocks_", "label_emb_")
_PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_A.bias", ".lora_B.bias")
_KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale")


def adaptable_modules(module: Any) -> dict[str, str]:
    """Linear and Conv2d layers of a module: kohya name (dots as underscores) -> module path. A layer an
    earlier adapter already wraps (PEFT keeps the original as ``<path>.base_layer``) keeps its path."""
    import torch

    out = {}
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d):
            path = name.removesuffix(".base_layer")
            out[path.replace(".", "_")] = path
    return out


def unmatched_keys(keys: list[str], modules: dict[str, Any]) -> list[str]:
    """The keys of a LoRA state dict that adapt no layer of ``modules`` (pipeline attribute -> module:
    ``unet``, ``text_encoder``, ``text_encoder_2``; a missing one means the model has no such part).

    A key is unmatched when its layer does not exist, or when it adapts a part the model lacks (a
    second text encoder on SD 1.5). Keys whose layer cannot be named here (original SD block names,
    older diffusers processor keys) are not judged.
    """
    tables: dict[str, dict[str, str] | None] = {}

    def table(part: str) -> dict[str, str] | None:
        if part not in tables:
            tables[part] = adaptable_modules(modules[part]) if modules.get(part) is not None else None
        return tables[part]

    out = []
    for key in keys:
        base, dot, suffix = key.partition(".")
        kohya = next((p for p in KOHYA_PREFIXES if base.startswith(p)), None)
        if kohya is not None and f".{suffix}" in _KOHYA_SUFFIXES:
            path = base[len(kohya) :]
            if path.startswith(_SGM_BLOCKS):
                continue
            names = table(KOHYA_PREFIXES[kohya])
            # transformers 5's CLIP text models have no ``text_model`` level; kohya files name it
            if names is None or (path not in names and path.removeprefix("text_model_") not in names):
                out.append(key)
            continue
        peft_suffix = next((s for s in _PEFT_SUFFIXES if key.endswith(s)), None)
        if peft_suffix is None or ".processor." in key or not dot:
            continue
        part, _, path = key[: -len(peft_suffix)].partition(".")
        if part not in ("unet", "text_encoder", "text_encoder_2"):
            continue
        names = table(part)
        if names is None or not {path, path.removeprefix("text_model.")} & set(names.values()):
            out.append(key)
    return sorted(out)
