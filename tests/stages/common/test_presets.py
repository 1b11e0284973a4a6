"""Tiny presets: build, save, load back, and run 2-step reference inference for each task."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdkiln.runtime.contract.families import generation_defaults, get_family
from sdkiln.stages.common.torch.pipeline import controlnet_inputs, open_pipeline, unet_inputs
from sdkiln.stages.common.torch.presets import build_preset, make_scheduler

SIZE = 64  # pixels: 8x8 latents, every VAE downsamples by 8


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def _run(pipe, **kw) -> np.ndarray:
    out = pipe(
        prompt="a cat sketch",
        num_inference_steps=2,
        height=SIZE,
        width=SIZE,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kw,
    ).images
    return out


@pytest.fixture(scope="module")
def sd15(tiny_sd15_dir):
    return open_pipeline(tiny_sd15_dir, family="sd15")


def test_tiny_sd15_layout(tiny_sd15_dir, tiny_sd15_artifact):
    facts = tiny_sd15_artifact.model
    assert facts.family == "sd15"
    assert facts.controlnets == ["canny", "scribble"]
    assert facts.taesd is True
    index = json.loads((tiny_sd15_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert "controlnet" not in index
    for sub in ("controlnet/scribble", "controlnet/canny", "vae_tiny", "unet"):
        assert (tiny_sd15_dir / sub / "config.json").is_file(), sub
    files = [p.name for p in tiny_sd15_dir.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".bin", ".ckpt", ".pt"))]
    assert (tiny_sd15_dir / "tokenizer" / "vocab.json").is_file()
    assert (tiny_sd15_dir / "tokenizer" / "merges.txt").is_file()
    comps = tiny_sd15_artifact.components
    assert set(comps) >= {"text_encoder", "unet", "vae_encoder", "vae_decoder", "controlnet.scribble"}
    assert comps["controlnet.canny"]["path"] == "controlnet/canny"
    # 1 conv_in + 2 blocks x 2 layers + 1 downsampler, then the mid residual
    assert len(comps["controlnet.scribble"]["outputs"]) == 7


def test_tiny_sd15_tasks(sd15):
    """Text, img2img and sketch (ControlNet) each run 2 steps from the saved-and-loaded folder."""
    loaded = sd15
    text = _run(loaded.task_pipeline("text"), guidance_scale=7.5)
    img2img = _run(loaded.task_pipeline("img2img"), image=_image(1), strength=1.0, guidance_scale=1.0)
    sketch = _run(loaded.task_pipeline("controlnet", "scribble"), image=_image(2))
    canny = _run(loaded.task_pipeline("controlnet", "canny"), image=_image(2))
    for out in (text, img2img, sketch, canny):
        assert out.shape == (1, SIZE, SIZE, 3)
        assert np.isfinite(out).all()
    # the ControlNets are not no-ops and not the same model
    plain = _run(loaded.task_pipeline("text"))
    assert np.abs(sketch - plain).max() > 1e-4
    assert np.abs(sketch - canny).max() > 1e-4


def test_tiny_sd15_taesd_roundtrip(sd15):
    loaded = sd15
    x = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        lat = loaded.vae_tiny.encode(x).latents
        img = loaded.vae_tiny.decode(lat).sample
    assert lat.shape == (1, 4, SIZE // 8, SIZE // 8)
    assert img.shape == x.shape


def test_tiny_sdxl_tasks(tiny_sdxl_dir, tiny_sdxl_artifact):
    assert tiny_sdxl_artifact.manifest.model.family == "sdxl"
    unet_in = {i["name"] for i in tiny_sdxl_artifact.components["unet"]["inputs"]}
    assert {"text_embeds", "time_ids"} <= unet_in
    loaded = open_pipeline(tiny_sdxl_dir, family="sdxl")
    text = _run(loaded.task_pipeline("text"))
    edit = _run(loaded.task_pipeline("controlnet", "canny"), image=_image(3))
    img2img = _run(loaded.task_pipeline("img2img"), image=_image(1), strength=0.75)
    for out in (text, edit, img2img):
        assert out.shape == (1, SIZE, SIZE, 3) and np.isfinite(out).all()


def test_tiny_sd_turbo_one_step(tiny_sd_turbo_dir):
    loaded = open_pipeline(tiny_sd_turbo_dir, family="sd-turbo")
    assert type(loaded.pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert loaded.pipe.scheduler.config.timestep_spacing == "trailing"
    gen = generation_defaults("sd-turbo")
    out = loaded.pipe(
        prompt="x",
        num_inference_steps=gen.steps,
        guidance_scale=gen.guidance,
        height=SIZE,
        width=SIZE,
        output_type="np",
    ).images
    assert out.shape == (1, SIZE, SIZE, 3)


def test_preset_is_seeded():
    a, b, c = (build_preset("tiny-sd15-controlnet", seed=s) for s in (0, 0, 1))
    wa, wb, wc = (x.pipe.unet.conv_in.weight for x in (a, b, c))
    za, zb, zc = (x.controlnets["canny"].controlnet_mid_block.weight for x in (a, b, c))
    assert torch.equal(za, zb) and not torch.equal(za, zc)
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_controlnet_residuals_not_vacuous(sd15):
    loaded = sd15
    inputs = controlnet_inputs(unet_inputs(loaded.pipe.unet.config, "sd15", latent_size=8))
    with torch.no_grad():
        downs, mid = loaded.controlnets["scribble"](**inputs, return_dict=False)
    assert all(d.abs().max() > 1e-2 for d in downs)
    assert mid.abs().max() > 1e-2


def test_scheduler_keys():
    assert type(make_scheduler("sd15", "lcm")).__name__ == "LCMScheduler"
    assert type(make_scheduler("sdxl")).__name__ == "EulerDiscreteScheduler"
    assert get_family("sdxl").generation.scheduler == "euler"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # parameter counts of the released checkpoints
        ("sd15-controlnet", {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}),
        ("sd-turbo", {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}),  # SD 2.1's
        (
            "sdxl-controlnet",
            {
                "unet": 2_567_463_684,
                "vae": 83_653_863,
                "text_encoder": 123_060_480,
                "text_encoder_2": 694_659_840,
            },
        ),
    ],
)
def test_real_size_presets_have_the_real_shapes(name, expected):
    """Built on the meta device (no memory, no compute): the real-size presets are the real architectures."""
    import diffusers

    from sdkiln.stages.common.torch.presets import PRESETS, _text_encoder

    preset, fam = PRESETS[name], get_family(PRESETS[name].family)
    with torch.device("meta"):
        modules = {
            "unet": diffusers.UNet2DConditionModel(**preset.unet),
            "vae": diffusers.AutoencoderKL(**preset.vae),
        }
        for te, cfg in zip(fam.text_encoders, preset.text_encoders, strict=True):
            modules[te] = _text_encoder(cfg, fam.components[te].model_class)
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in modules.items()}
    assert counts == expected


@pytest.mark.slow
def test_real_size_sd15_unet_step(tmp_path):
    """A real-size SD 1.5 preset (random weights) saves, loads back and runs one UNet step at 512 px."""
    from sdkiln.stages.common.torch.presets import save_preset

    manifest = save_preset("sd15", tmp_path / "sd15", seed=0)
    assert manifest["components"]["unet"]["inputs"][2]["shape"] == ["batch", 77, 768]
    loaded = open_pipeline(tmp_path / "sd15")  # real-size: the family is detected from the configs
    assert loaded.family.name == "sd15"
    n_params = sum(p.numel() for p in loaded.pipe.unet.parameters())
    assert 855e6 < n_params < 865e6  # the real SD 1.5 UNet has 859.5M parameters
    with torch.no_grad():
        out = loaded.pipe.unet(**unet_inputs(loaded.pipe.unet.config, "sd15", latent_size=64)).sample
    assert out.shape == (1, 4, 64, 64) and torch.isfinite(out).all()
