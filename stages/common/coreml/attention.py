"""A Neural-Engine-friendly rewrite of diffusers' spatial transformers (attention ``split_einsum``).

Core ML runs a model on the Apple Neural Engine (ANE) fastest when activations stay in a channels-first,
4-D layout ``(B, C, 1, S)``: the last axis is the sequence, reductions run over the channel axis, and
every dense layer is a 1x1 convolution. Apple's "Deploying Transformers on the Apple Neural Engine"
(machinelearning.apple.com/research/neural-engine-transformers) and its Stable Diffusion port
(github.com/apple/ml-stable-diffusion) describe the recipe; this module is our own implementation of it
as a *module transform* over a diffusers model:

- ``to_split_einsum(model)`` replaces every continuous-input ``Transformer2DModel`` inside a diffusers
  ``UNet2DConditionModel`` or ``ControlNetModel`` (in place) by a ``ChannelsFirstTransformer2D`` holding
  the same weights. Everything else (ResNet blocks, time embedding, up/down sampling) is convolutional
  already and stays diffusers' own code.
- Inside, ``nn.Linear`` becomes ``nn.Conv2d(kernel_size=1)``, LayerNorm normalises over axis 1, and
  attention is computed one head at a time with two einsums whose operands need no transposes
  (``SplitHeadAttention``), the softmax running over axis 1 of a ``(B, S_k, 1, S_q)`` score tensor.
- Module and parameter names are kept (``attn1.to_q``, ``ff.net.0.proj``, ``ff.net.2``, ...), so a
  converted model's ``state_dict`` has exactly the diffusers keys; Linear weights gain two trailing
  singleton axes, and ``to_q`` carries the softmax scale ``1/sqrt(d)``. Every weight Core ML stores
  then keeps a name derived from its module path, which ``coreml_utils`` relies on to read weights back
  out of a package (and ``palettize_coreml`` to know what is a weight).

The cross-attention context may be given as diffusers' ``(B, S, D)`` or already channels-first as
``(B, D, 1, S)`` (the layout of Apple's ``encoder_hidden_states`` input); the latter avoids a transpose
per transformer.

This module imports torch at the top: import it only inside a stage's ``run`` (or in tests).

Example::

    unet = copy.deepcopy(pipe.unet)
    n = to_split_einsum(unet)  # number of transformers replaced
    out = unet(sample, t, encoder_hidden_states.transpose(1, 2).unsqueeze(2)).sample
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# The attention implementations a recipe can select: diffusers' own (best on the Mac GPU) and the
# channels-first per-head rewrite (best on the Neural Engine).
ATTENTION_IMPLEMENTATIONS = ("original", "split_einsum")


class UnsupportedArchitecture(ValueError):
    """The model holds a transformer variant this rewrite does not reproduce exactly."""


def channels_first_context(context: torch.Tensor) -> torch.Tensor:
    """``(B, S, D)`` -> ``(B, D, 1, S)``; a 4-D tensor is taken to be channels-first already."""
    if context.ndim == 4:
        return context
    return context.transpose(1, 2).unsqueeze(2)


def _conv1x1(linear: nn.Linear) -> nn.Conv2d:
    """A 1x1 convolution computing what ``linear`` computes, on channels-first tensors."""
    conv = nn.Conv2d(linear.in_features, linear.out_features, kernel_size=1, bias=linear.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(linear.weight[:, :, None, None])
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
    return conv


def _as_conv1x1(layer: nn.Module) -> nn.Conv2d:
    """A Linear, or an already 1x1 Conv2d (``proj_in`` without linear projection), as a 1x1 conv."""
    if isinstance(layer, nn.Linear):
        return _conv1x1(layer)
    if isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.stride == (1, 1):
        return layer
    raise UnsupportedArchitecture(f"expected a Linear or 1x1 Conv2d, got {layer!r}")


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a ``(B, C, 1, S)`` tensor (same maths as ``nn.LayerNorm(C)``)."""

    def __init__(self, num_channels: int, eps: float, affine: bool):
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels))
            self.bias = nn.Parameter(torch.zeros(num_channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @classmethod
    def from_layer_norm(cls, norm: nn.LayerNorm) -> ChannelsFirstLayerNorm:
        if len(norm.normalized_shape) != 1:
            raise UnsupportedArchitecture(f"LayerNorm over {norm.normalized_shape} (expected one axis)")
        affine = norm.weight is not None
        if affine and norm.bias is None:
            raise UnsupportedArchitecture("LayerNorm with a weight but no bias")
        out = cls(norm.normalized_shape[0], norm.eps, affine)
        if affine:
            with torch.no_grad():
                out.weight.copy_(norm.weight)
                out.bias.copy_(norm.bias)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        centred = x - mean
        var = (centred * centred).mean(dim=1, keepdim=True)
        out = centred * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out


class SplitHeadAttention(nn.Module):
    """Multi-head attention on ``(B, C, 1, S)`` tensors, one head at a time.

    Per head, the scores are ``einsum("bkxd,bdxq->bkxq", k_h^T, q_h)``: a ``(B, S_k, 1, S_q)`` tensor whose
    softmax runs over axis 1, and the output is ``einsum("bdxk,bkxq->bdxq", v_h, weights)``. Splitting
    the heads along the channel axis (instead of reshaping to ``(B, H, S, d)``) keeps every tensor 4-D
    channels-first and avoids the transposes the Neural Engine handles poorly.

    ``tie`` (set for a flexible-batch Core ML conversion, ``flexible.tie_batches``) computes the same two
    products per head as batched matmuls over views whose singleton axis is swapped: coremltools 9's
    ``einsum`` asserts that both operands carry the same batch symbol, which its converter cannot prove
    for a flexible batch; its ``matmul`` broadcasts them.
    """

    tie = False

    def __init__(self, heads: int, dim_head: int, to_q: nn.Conv2d, to_k: nn.Conv2d, to_v: nn.Conv2d,
                 to_out: nn.Conv2d):  # fmt: skip
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.to_q, self.to_k, self.to_v = to_q, to_k, to_v  # to_q includes the 1/sqrt(d) scale
        # A list like diffusers' (its index 1 is a dropout there), so the weight keeps its name `to_out.0`.
        self.to_out = nn.ModuleList([to_out])

    @classmethod
    def from_diffusers(cls, attn: nn.Module) -> SplitHeadAttention:
        """Build from a diffusers ``Attention`` (the plain SD variant; anything else is refused)."""
        unsupported = {
            "norm_q": getattr(attn, "norm_q", None) is not None,
            "norm_k": getattr(attn, "norm_k", None) is not None,
            "norm_cross": getattr(attn, "norm_cross", None) is not None,
            "group_norm": getattr(attn, "group_norm", None) is not None,
            "spatial_norm": getattr(attn, "spatial_norm", None) is not None,
            "residual_connection": bool(getattr(attn, "residual_connection", False)),
            "rescale_output_factor": float(getattr(attn, "rescale_output_factor", 1.0)) != 1.0,
            "added_kv_proj": getattr(attn, "add_k_proj", None) is not None,
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise UnsupportedArchitecture(f"attention with {', '.join(bad)} is not supported by split_einsum")
        heads = int(attn.heads)
        inner = attn.to_q.out_features
        if inner % heads:
            raise UnsupportedArchitecture(f"{inner} channels do not split into {heads} heads")
        # The softmax scale goes into the query projection. Core ML's converter would fold a separate
        # multiply into that convolution anyway, but as a new, anonymous constant: folding it here keeps
        # the weight under its own name (`to_q.weight`), so it can be palettized and read back.
        to_q = _conv1x1(attn.to_q)
        with torch.no_grad():
            to_q.weight.mul_(attn.scale)
            if to_q.bias is not None:
                to_q.bias.mul_(attn.scale)
        return cls(
            heads=heads,
            dim_head=inner // heads,
            to_q=to_q,
            to_k=_conv1x1(attn.to_k),
            to_v=_conv1x1(attn.to_v),
            to_out=_conv1x1(attn.to_out[0]),
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q = self.to_q(x)
        k = self.to_k(context)
        v = self.to_v(context)
        # One transpose of the keys for all heads puts both einsums in the form Core ML lowers to a
        # single batched matmul ("nchw,nwhu->nchu") with no per-head transposes.
        # One split per tensor (not one slice per head) keeps the converted graph small.
        d = self.dim_head
        if self.tie:
            return self.to_out[0](self._matmul_heads(q, k, v))
        k_heads = k.transpose(1, 3).split(d, dim=3)  # (B, S_k, 1, d) each
        q_heads, v_heads = q.split(d, dim=1), v.split(d, dim=1)  # (B, d, 1, S) each
        heads = []
        for q_h, k_h, v_h in zip(q_heads, k_heads, v_heads, strict=True):
            weights = torch.einsum("bkxd,bdxq->bkxq", k_h, q_h).softmax(dim=1)  # (B, S_k, 1, S_q)
            heads.append(torch.einsum("bdxk,bkxq->bdxq", v_h, weights))  # (B, d, 1, S_q)
        return self.to_out[0](torch.cat(heads, dim=1))

    def _matmul_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The per-head products of ``forward`` as batched matmuls; (B, C, 1, S) in and out."""
        d = self.dim_head

        def lift(t: torch.Tensor) -> torch.Tensor:
            # (B, C, 1, S) -> (B, 1, C, S): the singleton axis moves, the data order does not (a reshape).
            return t.reshape(-1, 1, t.shape[1], t.shape[3])

        q_heads, k_heads, v_heads = (lift(t).split(d, dim=2) for t in (q, k, v))
        heads = []
        for q_h, k_h, v_h in zip(q_heads, k_heads, v_heads, strict=True):
            weights = torch.matmul(k_h.transpose(2, 3), q_h).softmax(dim=2)  # (B, 1, S_k, S_q)
            heads.append(torch.matmul(v_h, weights))  # (B, 1, d, S_q)
        out = torch.cat(heads, dim=2)
        return out.reshape(-1, out.shape[2], 1, out.shape[3])


class _ProjectionActivation(nn.Module):
    """The first half of the feed-forward: a 1x1 conv and GELU, gated (GEGLU) or not."""

    def __init__(self, proj: nn.Conv2d, gated: bool, approximate: str):
        super().__init__()
        self.proj = proj
        self.gated = gated
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        if self.gated:
            x, gate = x.chunk(2, dim=1)
            return x * F.gelu(gate, approximate=self.approximate)
        return F.gelu(x, approximate=self.approximate)


class ChannelsFirstFeedForward(nn.Module):
    """diffusers' ``FeedForward`` (GEGLU or GELU) on ``(B, C, 1, S)`` tensors; same parameter names."""

    def __init__(self, act: _ProjectionActivation, out: nn.Conv2d):
        super().__init__()
        # Index 1 is diffusers' dropout: an identity at inference, kept so `net.2` keeps its name.
        self.net = nn.ModuleList([act, nn.Identity(), out])

    @classmethod
    def from_diffusers(cls, ff: nn.Module) -> ChannelsFirstFeedForward:
        from diffusers.models.activations import GEGLU, GELU

        act, out = ff.net[0], ff.net[2]
        if type(act) is GEGLU:
            gated, approximate = True, "none"
        elif type(act) is GELU:
            gated, approximate = False, act.approximate
        else:
            raise UnsupportedArchitecture(f"feed-forward activation {type(act).__name__} is not supported")
        return cls(_ProjectionActivation(_conv1x1(act.proj), gated, approximate), _conv1x1(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class ChannelsFirstTransformerBlock(nn.Module):
    """diffusers' ``BasicTransformerBlock`` (``norm_type="layer_norm"``) on ``(B, C, 1, S)`` tensors."""

    def __init__(self, block: nn.Module):
        super().__init__()
        problems = []
        if block.norm_type != "layer_norm":
            problems.append(f"norm_type {block.norm_type!r}")
        if getattr(block, "pos_embed", None) is not None:
            problems.append("positional embeddings")
        if getattr(block, "fuser", None) is not None:
            problems.append("GLIGEN fuser")
        if getattr(block, "_chunk_size", None) is not None:
            problems.append("chunked feed-forward")
        if problems:
            raise UnsupportedArchitecture(f"transformer block with {', '.join(problems)}")
        self.only_cross_attention = bool(block.only_cross_attention)
        self.norm1 = ChannelsFirstLayerNorm.from_layer_norm(block.norm1)
        self.attn1 = SplitHeadAttention.from_diffusers(block.attn1)
        self.norm2 = ChannelsFirstLayerNorm.from_layer_norm(block.norm2) if block.attn2 is not None else None
        self.attn2 = SplitHeadAttention.from_diffusers(block.attn2) if block.attn2 is not None else None
        self.norm3 = ChannelsFirstLayerNorm.from_layer_norm(block.norm3)
        self.ff = ChannelsFirstFeedForward.from_diffusers(block.ff)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context if self.only_cross_attention else None) + x
        if self.attn2 is not None:
            # diffusers falls back to self-attention when no context is given; so do we.
            x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class _Output:
    """What diffusers' blocks read from a transformer called with ``return_dict=True``."""

    def __init__(self, sample: torch.Tensor):
        self.sample = sample


class ChannelsFirstTransformer2D(nn.Module):
    """A drop-in for a continuous-input ``Transformer2DModel``: GroupNorm, 1x1 conv in, channels-first
    transformer blocks on ``(B, C, 1, H*W)``, 1x1 conv out, residual. Same call signature."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        if not getattr(transformer, "is_input_continuous", False):
            raise UnsupportedArchitecture(
                "only continuous-input (latent feature map) transformers are supported"
            )
        from diffusers.models.attention import BasicTransformerBlock

        self.norm = transformer.norm  # GroupNorm works on (B, C, H, W) as it is
        self.proj_in = _as_conv1x1(transformer.proj_in)
        blocks = []
        for block in transformer.transformer_blocks:
            if type(block) is not BasicTransformerBlock:
                raise UnsupportedArchitecture(f"transformer block {type(block).__name__} is not supported")
            blocks.append(ChannelsFirstTransformerBlock(block))
        self.transformer_blocks = nn.ModuleList(blocks)
        self.proj_out = _as_conv1x1(transformer.proj_out)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        timestep: Any = None,
        added_cond_kwargs: Any = None,
        class_labels: Any = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Any:
        # Stable Diffusion never masks attention; refusing is better than silently ignoring a mask.
        if attention_mask is not None or encoder_attention_mask is not None:
            raise NotImplementedError("split_einsum attention does not support attention masks")
        if cross_attention_kwargs and any(v is not None for v in cross_attention_kwargs.values()):
            raise NotImplementedError("split_einsum attention takes no cross_attention_kwargs")
        b, _, h, w = hidden_states.shape
        residual = hidden_states
        x = self.proj_in(self.norm(hidden_states))
        c = x.shape[1]
        x = x.reshape(b, c, 1, h * w)
        context = None if encoder_hidden_states is None else channels_first_context(encoder_hidden_states)
        for block in self.transformer_blocks:
            x = block(x, context)
        out = self.proj_out(x.reshape(b, c, h, w)) + residual
        return (out,) if not return_dict else _Output(out)


def to_split_einsum(model: nn.Module) -> int:
    """Replace, in place, every ``Transformer2DModel`` inside ``model`` by a ``ChannelsFirstTransformer2D``
    with the same weights. Returns how many were replaced; raises ``UnsupportedArchitecture`` (before
    changing anything) when one of them cannot be reproduced exactly.

    Pass a copy if the original must stay untouched: the new modules share GroupNorm modules with it.
    """
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, Transformer2DModel)]
    replacements = [(name, ChannelsFirstTransformer2D(m)) for name, m in targets]
    for name, new in replacements:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)  # ModuleList accepts a string index through setattr
    logger.debug("split_einsum: replaced %d transformers in %s", len(replacements), type(model).__name__)
    return len(replacements)


def apply_attention(model: nn.Module, attention: str) -> int:
    """Put ``model`` (a UNet or ControlNet, changed in place) into attention implementation ``attention``:
    ``original`` leaves it as it is (returns 0), ``split_einsum`` applies ``to_split_einsum``."""
    if attention == "original":
        return 0
    if attention == "split_einsum":
        return to_split_einsum(model)
    raise ValueError(f"unknown attention implementation {attention!r}; known: {ATTENTION_IMPLEMENTATIONS}")
