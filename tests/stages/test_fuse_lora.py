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
        ValidationError, match="'rank', 'seed' and 'text_encoder' apply to source 'preset' only"
    ):
        FuseLoraParams.model_validate({"loras": [{"source": "hub", "repo": "a/b", "rank": 8}]})
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
    with pytest.raises(UserError, match="only 1 of the 2 LoRA modules in half.safetensors matched"):
        STAGE.run(ctx)
