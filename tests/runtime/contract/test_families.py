"""The family tables: pure data, consistent with the stage params and the real architectures."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest

from sdkiln.runtime.contract.families import (
    FAMILIES,
    SCHEDULERS,
    component_specs,
    controlnet_residual_count,
    detect_family,
    generation_defaults,
    get_family,
)
from sdkiln.runtime.contract.floors import tolerance
from sdkiln.runtime.contract.specs import resolve_shape

SD15_UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "sample_size": 64,
}
SDXL_UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": [1, 2, 10],
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}


def test_families_module_imports_no_torch():
    code = "import sys, sdkiln.runtime.contract; import sdkiln.runtime.contract.families, sdkiln.runtime.contract.manifest, sdkiln.runtime.contract.floors, sdkiln.runtime.contract.metrics, sdkiln.runtime.contract.specs; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_stage_literals_list_every_family():
    from sdkiln.stages.load_pipeline import FamilyName

    assert set(typing.get_args(FamilyName)) == set(FAMILIES)


def test_every_family_is_complete():
    for fam in FAMILIES.values():
        assert fam.generation.scheduler in SCHEDULERS and fam.lcm_generation.scheduler in SCHEDULERS
        assert len(fam.tokenizers) == len(fam.text_encoders)
        assert fam.vae_scale_factor == 8 and fam.latent_channels == 4
        assert {"unet", "vae_decoder", "vae_encoder", "controlnet"} <= set(fam.components)
        for name in fam.components:
            assert tolerance(name).fp32_max_abs > 0  # every component has its floors
        assert "base" in fam.hub


def test_defaults_by_family():
    assert generation_defaults("sd-turbo").steps == 1 and generation_defaults("sd-turbo").guidance == 0.0
    lcm = generation_defaults("sd15", lcm=True)
    assert (lcm.steps, lcm.guidance, lcm.scheduler) == (4, 1.0, "lcm")
    with pytest.raises(KeyError, match="known: sd15"):
        get_family("sd3")


def test_residual_counts_match_real_models():
    assert controlnet_residual_count(SD15_UNET["block_out_channels"], 2) == 12
    assert controlnet_residual_count(SDXL_UNET["block_out_channels"], 2) == 9


def test_sd15_specs():
    configs = {"unet": SD15_UNET, "vae": {"latent_channels": 4}, "text_encoder": {"hidden_size": 768}}
    specs = component_specs("sd15", configs, controlnets=["scribble"], unet_residual_inputs=True)
    unet = specs["unet"]
    names = [i["name"] for i in unet["inputs"]]
    assert names[:3] == ["sample", "timestep", "encoder_hidden_states"]
    assert "timestep_cond" not in names  # only LCM-distilled UNets have it
    assert names[3] == "down_block_additional_residual_0" and names[-1] == "mid_block_additional_residual"
    assert unet["inputs"][2]["shape"] == ["batch", 77, 768]
    outs = specs["controlnet.scribble"]["outputs"]
    assert len(outs) == 13
    assert outs[-1] == {
        "name": "mid_block_res_sample",
        "dtype": "float32",
        "shape": ["batch", 1280, "latent_height / 8", "latent_width / 8"],
    }
    assert resolve_shape(outs[3]["shape"], {"batch": 2, "latent_height": 64, "latent_width": 48}) == [
        2,
        320,
        32,
        24,
    ]
    assert specs["text_encoder"]["inputs"][0] == {
        "name": "input_ids",
        "dtype": "int32",
        "shape": ["batch", 77],
    }
    assert specs["vae_decoder"]["outputs"][0]["shape"] == [
        "batch",
        3,
        "latent_height * 8",
        "latent_width * 8",
    ]


def test_sdxl_specs_and_lcm_unet():
    configs = {
        "unet": {**SDXL_UNET, "time_cond_proj_dim": 256},
        "vae": {"latent_channels": 4},
        "text_encoder": {"hidden_size": 768},
        "text_encoder_2": {"hidden_size": 1280, "projection_dim": 1280},
    }
    specs = component_specs("sdxl", configs)
    unet_in = {i["name"]: i["shape"] for i in specs["unet"]["inputs"]}
    assert unet_in["text_embeds"] == ["batch", 1280]
    assert unet_in["time_ids"] == ["batch", 6]
    assert unet_in["timestep_cond"] == ["batch", 256]
    te2 = [o["name"] for o in specs["text_encoder_2"]["outputs"]]
    assert "text_embeds" in te2 and "pooler_output" not in te2
    assert "penultimate_hidden_state" in [o["name"] for o in specs["text_encoder"]["outputs"]]


def test_detect_family():
    assert detect_family("StableDiffusionPipeline", SD15_UNET) == "sd15"
    assert detect_family("StableDiffusionPipeline", {**SD15_UNET, "cross_attention_dim": 1024}) == "sd-turbo"
    assert detect_family("StableDiffusionXLPipeline", SDXL_UNET) == "sdxl"
    ssd = {**SDXL_UNET, "transformer_layers_per_block": [0, 2, 4]}
    assert detect_family("StableDiffusionXLPipeline", ssd) == "ssd-1b"
    assert detect_family("StableDiffusionPipeline", {**SD15_UNET, "cross_attention_dim": 32}) is None
