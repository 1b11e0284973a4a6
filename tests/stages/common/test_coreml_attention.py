"""The Neural-Engine attention rewrite (split_einsum) computes what diffusers' attention computes."""

from __future__ import annotations

import copy

import pytest
import torch

from sdkiln.runtime.contract.metrics import compare
from sdkiln.stages.common.coreml.attention import (
    ChannelsFirstTransformer2D,
    SplitHeadAttention,
    UnsupportedArchitecture,
    apply_attention,
    channels_first_context,
    to_split_einsum,
)
from sdkiln.stages.common.torch.pipeline import controlnet_inputs, open_pipeline, unet_inputs

# fp32 on CPU: the rewrite reorders sums (per-head einsums, channel-axis LayerNorm), nothing more.
MAX_ABS = 1e-4
MIN_SQNR_DB = 80.0


@pytest.fixture(scope="module")
def tiny(tiny_sd15_dir):
    return open_pipeline(tiny_sd15_dir, family="sd15")


def _close(ref: torch.Tensor, out: torch.Tensor) -> None:
    m = compare(ref, out)
    assert m["max_abs"] < MAX_ABS and m["sqnr_db"] > MIN_SQNR_DB, m


@torch.no_grad()
def test_unet_with_controlnet_residuals_matches(tiny):
    unet = tiny.pipe.unet
    inputs = unet_inputs(unet.config, "sd15", batch=2, latent_size=8)
    g = torch.Generator().manual_seed(3)
    down, mid = tiny.controlnets["scribble"](**controlnet_inputs(inputs), return_dict=False)
    residuals = {
        "down_block_additional_residuals": tuple(torch.randn(d.shape, generator=g) for d in down),
        "mid_block_additional_residual": torch.randn(mid.shape, generator=g),
    }
    ref = unet(**inputs, **residuals).sample

    ane = copy.deepcopy(unet)
    assert to_split_einsum(ane) == 6  # 2 down + 3 up + 1 mid transformers in the tiny UNet
    assert not any(type(m).__name__ == "Transformer2DModel" for m in ane.modules())
    _close(ref, ane(**inputs, **residuals).sample)
    # The channels-first context (Apple's encoder_hidden_states layout) gives the same result.
    cf = {**inputs, "encoder_hidden_states": channels_first_context(inputs["encoder_hidden_states"])}
    _close(ref, ane(**cf, **residuals).sample)
    # Same parameter names (Linear weights gain two singleton axes), so weights map back by name.
    assert list(ane.state_dict()) == list(unet.state_dict())


@torch.no_grad()
def test_controlnet_matches(tiny):
    cn = tiny.controlnets["scribble"]
    inputs = controlnet_inputs(unet_inputs(tiny.pipe.unet.config, "sd15", batch=2, latent_size=8))
    inputs["conditioning_scale"] = 0.7
    down, mid = cn(**inputs, return_dict=False)
    ane = copy.deepcopy(cn)
    assert apply_attention(ane, "split_einsum") == 3
    down2, mid2 = ane(**inputs, return_dict=False)
    for a, b in zip((*down, mid), (*down2, mid2), strict=True):
        _close(a, b)
    # The ControlNet's residual convolutions were randomised: this compares non-zero tensors.
    assert mid.abs().max() > 0


@torch.no_grad()
def test_sdxl_style_transformer_matches():
    """Linear projections, two blocks, plain GELU feed-forward, biased attention: the SDXL / SD 2.x
    variants of the block are reproduced too."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    torch.manual_seed(0)
    t = Transformer2DModel(
        num_attention_heads=3,
        attention_head_dim=8,
        in_channels=24,
        num_layers=2,
        cross_attention_dim=16,
        norm_num_groups=8,
        use_linear_projection=True,
        activation_fn="gelu-approximate",
        attention_bias=True,
    ).eval()
    x, ctx = torch.randn(2, 24, 4, 5), torch.randn(2, 7, 16)
    ref = t(x, encoder_hidden_states=ctx).sample
    ane = ChannelsFirstTransformer2D(copy.deepcopy(t))
    _close(ref, ane(x, encoder_hidden_states=ctx).sample)
    _close(ref, ane(x, encoder_hidden_states=ctx, return_dict=False)[0])


def test_unsupported_blocks_are_refused_before_any_change():
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    model = torch.nn.Sequential(
        Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=8),
        Transformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=16,
            norm_num_groups=8,
            norm_type="ada_norm",
            num_embeds_ada_norm=10,
        ),
    )
    with pytest.raises(UnsupportedArchitecture, match="ada_norm"):
        to_split_einsum(model)
    assert type(model[0]) is Transformer2DModel  # the supported one was not replaced either
    with pytest.raises(ValueError, match="unknown attention"):
        apply_attention(model, "flash")
    assert apply_attention(model, "original") == 0


def test_split_einsum_attention_converts_to_einsums_without_per_head_transposes():
    """What makes it Neural-Engine friendly, as Core ML sees it: per head two einsums (which Core ML
    runs as batched matmuls on (B, C, 1, S) tensors) and a softmax over the channel axis; the only
    transpose is the keys', once for all heads."""
    import coremltools as ct
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = SplitHeadAttention.from_diffusers(
        Attention(64, cross_attention_dim=32, heads=4, dim_head=16)
    ).eval()
    x, context = torch.randn(1, 64, 1, 36), torch.randn(1, 32, 1, 77)
    with torch.no_grad():
        traced = torch.jit.trace(attn, (x, context))
    mlmodel = ct.convert(
        traced,
        convert_to="mlprogram",
        inputs=[ct.TensorType(name="x", shape=x.shape), ct.TensorType(name="context", shape=context.shape)],
        minimum_deployment_target=ct.target.iOS17,
        skip_model_load=True,
    )
    ops = [op for op in mlmodel._mil_program.functions["main"].operations if op.op_type != "const"]
    types = [op.op_type for op in ops]
    assert types.count("einsum") == 8 and types.count("softmax") == 4
    assert types.count("transpose") == 1 and "matmul" not in types
    assert all(int(op.axis.val) == 1 for op in ops if op.op_type == "softmax")
    assert all(len(op.outputs[0].shape) == 4 for op in ops if op.op_type in ("einsum", "softmax", "conv"))
