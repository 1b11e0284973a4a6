"""fuse_lora on the tiny presets: parity within tolerance in both key formats, no LoRA keys left."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from sdkiln.runtime.contract.errors import ParityError, UserError
from sdkiln.runtime.contract.families import get_family
from sdkiln.runtime.contract.floors import tolerance
from sdkiln.stages.fuse_lora import STAGE, FuseLoraParams, detect_format


def _unet_keys(folder) -> list[str]:
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        return list(f.keys())  # noqa: SIM118


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_fusion_parity(family, fmt, make_ctx, request):
    model = request.getfixturevalue(f"tiny_{family}_artifact")
    params = {
        "loras": [
            {"source": "preset", "format": fmt, "kind": "lcm", "scale": 1.0, "seed": 0},
            {"source": "preset", "format": fmt, "scale": 0.5, "seed": 1, "text_encoder": False},
        ]
    }
    ctx = make_ctx(STAGE, params, inputs={"model": model})
    STAGE.run(ctx)
    tol = tolerance("unet")
    m = ctx.metrics
    assert m["parity.unet.max_abs"] <= tol.lora_fuse_max_abs
    assert m["parity.unet.cosine"] >= tol.lora_fuse_min_cosine
    # the LoRAs really change the UNet (the parity numbers are not those of a no-op) ...
    assert m["lora_effect.unet.max_abs"] > 100 * max(m["parity.unet.max_abs"], 1e-6)
    # ... and a LoRA left unfused (the base UNet against the adapters) fails the default fusion gate
    assert m["lora_effect.unet.max_abs"] > tol.lora_fuse_max_abs
    # ... and every text encoder the first LoRA touches is checked too
    for te in get_family(family).text_encoders:
        assert m[f"parity.{te}.max_abs"] <= 1e-3
    assert m["unet_lora_keys"] == 0
    assert not [k for k in _unet_keys(ctx.out_dir) if "lora" in k]
    assert [r["format"] for r in ctx.model.loras] == [fmt, fmt]
    assert ctx.model.lcm is True and ctx.model.scheduler == "LCMScheduler"
    assert ctx.model.family == family
    assert ctx.model.controlnets == model.manifest.model.controlnets  # carried through


def test_parity_gate_fails_loudly(make_ctx, tiny_sd15_artifact):
    params = {"loras": [{"source": "preset", "format": "peft"}], "max_abs": 1e-12}
    ctx = make_ctx(STAGE, params, inputs={"model": tiny_sd15_artifact})
    with pytest.raises(ParityError, match="unet: fused vs adapters max_abs"):
        STAGE.run(ctx)
    assert ctx.metrics["parity.unet.max_abs"] > 1e-12  # recorded even when failing


def test_local_file_format_mismatch_and_pickle(make_ctx, tiny_sd15_artifact, tmp_path):
    import torch

    lora = tmp_path / "style.safetensors"
    save_file({"unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 64)}, str(lora))
    ctx = make_ctx(
        STAGE,
        {"loras": [{"source": "local", "path": str(lora), "format": "kohya"}]},
        inputs={"model": tiny_sd15_artifact},
    )
    with pytest.raises(UserError, match="'kohya' but the file has 'peft' keys"):
        STAGE.run(ctx)
    pickle = tmp_path / "style.bin"
    pickle.write_bytes(b"not loaded")
    p = FuseLoraParams.model_validate({"loras": [{"source": "local", "path": str(pickle)}]})
    assert "pickle checkpoint" in STAGE.check(p, tmp_path)[0]
    ctx = make_ctx(
        STAGE, {"loras": [{"source": "local", "path": str(pickle)}]}, inputs={"model": tiny_sd15_artifact}
    )
    with pytest.raises(UserError, match="arbitrary code"):
        STAGE.run(ctx)


def test_params():
    with pytest.raises(ValidationError, match="needs format 'peft' or 'kohya'"):
        FuseLoraParams.model_validate({"loras": [{"source": "preset"}]})
    with pytest.raises(
        ValidationError, match="'rank', 'seed', 'text_encoder' and 'layers' apply to source 'preset' only"
    ):
        FuseLoraParams.model_validate({"loras": [{"source": "hub", "repo": "a/b", "rank": 8}]})
    with pytest.raises(ValidationError, match="'lcm-lora' adapt the UNet only"):
        FuseLoraParams.model_validate(
            {"loras": [{"source": "preset", "format": "kohya", "layers": "lcm-lora", "text_encoder": True}]}
        )
    p = FuseLoraParams.model_validate(
        {"loras": [{"source": "hub", "repo": "latent-consistency/lcm-lora-sdxl"}]}
    )
    assert STAGE.refs(p) == {"hub:lora.0:latent-consistency/lcm-lora-sdxl": "main"}


def test_detect_format():
    assert detect_format(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]) == "kohya"
    assert detect_format(["unet.down_blocks.0.attentions.0.proj_in.lora_B.weight"]) == "peft"
    with pytest.raises(UserError):
        detect_format(["model.diffusion_model.input_blocks.0.0.weight"])


def test_lora_modules_that_match_nothing_are_an_error(make_ctx, tiny_sd15_artifact, tmp_path):
    import torch

    g = torch.Generator().manual_seed(0)
    good = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    bogus = "unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q"  # no such block
    sd = {}
    for mod in (good, bogus):
        sd[f"{mod}.lora_A.weight"] = torch.randn(4, 64, generator=g)
        sd[f"{mod}.lora_B.weight"] = torch.randn(64, 4, generator=g)
    path = tmp_path / "half.safetensors"
    save_file(sd, str(path))
    ctx = make_ctx(
        STAGE, {"loras": [{"source": "local", "path": str(path)}]}, inputs={"model": tiny_sd15_artifact}
    )
    with pytest.raises(UserError, match=f"2 key\\(s\\) of half.safetensors match no layer.*{bogus}.lora_A"):
        STAGE.run(ctx)


def _lcm_lora_file(unet, path, seed=0, extra=None):
    """A LoRA in the format of the public LCM-LoRAs: kohya keys on diffusers module names, UNet only,
    convs, shortcuts, time-embedding projections and resampler convs included, fp16, ``.alpha``."""
    import torch

    from sdkiln.stages.common.torch.lora import LCM_LORA_UNET_TARGETS
    from sdkiln.stages.fuse_lora import make_preset_lora

    sd = make_preset_lora(unet, [], "kohya", rank=4, seed=seed, unet_targets=LCM_LORA_UNET_TARGETS)
    sd = {k: v.to(torch.float16).contiguous() for k, v in sd.items()} | (extra or {})
    save_file(sd, str(path))
    return sd


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_kohya_lcm_lora_with_convs_and_time_embeddings_fuses(family, make_ctx, request, tmp_path):
    from sdkiln.stages.common.torch.pipeline import open_pipeline

    model = request.getfixturevalue(f"tiny_{family}_artifact")
    unet = open_pipeline(model.path, family=family).pipe.unet
    sd = _lcm_lora_file(unet, tmp_path / "pytorch_lora_weights.safetensors")
    layers = {k.split(".")[0] for k in sd}
    assert any(k.endswith("_time_emb_proj") for k in layers) and any(
        k.endswith("_conv_shortcut") for k in layers
    )
    assert any("downsamplers_0_conv" in k for k in layers) and any("upsamplers_0_conv" in k for k in layers)
    assert "alpha" in {k.rsplit(".", 1)[1] for k in sd}
    params = {
        "loras": [
            {"source": "local", "path": str(tmp_path / "pytorch_lora_weights.safetensors"), "kind": "lcm"}
        ]
    }
    ctx = make_ctx(STAGE, params, inputs={"model": model})
    STAGE.run(ctx)
    tol = tolerance("unet")
    assert ctx.metrics["parity.unet.max_abs"] <= tol.lora_fuse_max_abs
    assert ctx.metrics["parity.unet.cosine"] >= tol.lora_fuse_min_cosine
    assert ctx.metrics["lora_effect.unet.max_abs"] > 100 * max(ctx.metrics["parity.unet.max_abs"], 1e-6)
    record = ctx.model.loras[-1]
    assert record["format"] == "kohya" and record["modules"] == len(layers)  # every layer landed
    assert ctx.model.lcm is True


def test_kohya_key_for_no_layer_exits_2_naming_it(tiny_sd15_dir, tmp_path, capsys):
    """Through the CLI: a LoRA with one key that names no layer of the model is exit 2, the key named."""
    import torch

    from sdkiln.stages.cli import main
    from sdkiln.stages.common.torch.pipeline import open_pipeline

    unet = open_pipeline(tiny_sd15_dir, family="sd15").pipe.unet
    bogus = "lora_unet_down_blocks_0_resnets_0_conv_bogus"
    extra = {
        f"{bogus}.lora_down.weight": torch.zeros(4, 32, 3, 3, dtype=torch.float16),
        f"{bogus}.lora_up.weight": torch.zeros(32, 4, 1, 1, dtype=torch.float16),
        f"{bogus}.alpha": torch.tensor(4.0, dtype=torch.float16),
    }
    _lcm_lora_file(unet, tmp_path / "lcm.safetensors", extra=extra)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: r\nsteps:\n"
        f"  - {{id: base, stage: load_pipeline, params: {{source: local, path: '{tiny_sd15_dir}', family: sd15}}}}\n"
        "  - {id: fused, stage: fuse_lora, inputs: {model: base}, params: {loras: [{source: local, path: lcm.safetensors}]}}\n"
    )
    rc = main(["--artifacts", str(tmp_path / "artifacts"), "build", str(recipe)])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{bogus}.lora_down.weight" in err and "match no layer" in err
    assert "Traceback" not in err


def test_unmatched_keys_names_parts_the_model_lacks(tiny_sd15_dir):
    from sdkiln.stages.common.torch.lora import unmatched_keys
    from sdkiln.stages.common.torch.pipeline import open_pipeline

    pipe = open_pipeline(tiny_sd15_dir, family="sd15").pipe
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    keys = [
        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight",  # a real layer
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha",  # a real text-encoder layer
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha",  # SD 1.5 has no second encoder
        "lora_unet_input_blocks_1_1_proj_in.lora_down.weight",  # SD block names: diffusers maps those
        "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight",
        "unet.down_blocks.1.attentions.0.proj_nope.lora_B.weight",
    ]
    assert unmatched_keys(keys, parts) == [
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha",
        "unet.down_blocks.1.attentions.0.proj_nope.lora_B.weight",
    ]
