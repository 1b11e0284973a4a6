"""The three tasks on the tiny bundle with the torch and onnx backends: parity, determinism, defaults,
and the PyTorch reference loop against diffusers' own pipelines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from testkit import make_bundle_of

from sdkiln.runtime import load
from sdkiln.runtime.contract.errors import InputSpecError, UserError
from sdkiln.runtime.contract.metrics import psnr
from sdkiln.runtime.examples import PHOTOS, SKETCHES
from sdkiln.runtime.parity import CASES, compare, floor_for, run_case
from sdkiln.runtime.tasks import sketch_request, text_request

torch = pytest.importorskip("torch", reason="the torch reference backend needs the build extra")

SIZE = 64  # 8x8 latents: the tiny models run a step in milliseconds


@pytest.fixture(scope="module")
def pipes(tiny_bundle: Path) -> dict[str, object]:
    return {
        "torch": load(tiny_bundle, backend="torch"),
        "onnx": load(tiny_bundle, backend="onnx"),
        "int8": load(tiny_bundle, backend="onnx", section="onnx/int8"),
    }


@pytest.fixture(scope="module")
def lcm_pipes(tiny_lcm_bundle: Path) -> dict[str, object]:
    return {"torch": load(tiny_lcm_bundle, backend="torch"), "onnx": load(tiny_lcm_bundle, backend="onnx")}


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_three_tasks_run(pipes, backend: str) -> None:
    pipe = pipes[backend]
    img = pipe.sketch(SKETCHES["house"](), "a cozy house", steps=2, seed=1, height=SIZE, width=SIZE)
    assert img.size == (SIZE, SIZE) and img.mode == "RGB"
    imgs = pipe.text(["a lighthouse at dusk", "a cat"], steps=2, seed=7, height=SIZE, width=SIZE)
    assert len(imgs) == 2 and not np.array_equal(np.asarray(imgs[0]), np.asarray(imgs[1]))
    for control in (None, "canny"):
        img = pipe.edit(
            PHOTOS["scene"](),
            "a red bird",
            strength=0.6,
            control=control,
            steps=3,
            seed=3,
            height=SIZE,
            width=SIZE,
        )
        assert img.size == (SIZE, SIZE)
        assert np.asarray(img).std() > 1.0  # not a flat image


@pytest.mark.parametrize("case", CASES, ids=[c.task for c in CASES])
@pytest.mark.parametrize("variant", ["default", "lcm"])
def test_onnx_matches_the_reference_end_to_end(pipes, lcm_pipes, case, variant: str) -> None:
    group = pipes if variant == "default" else lcm_pipes
    steps = 2 if variant == "default" else None  # LCM: the family default (4 steps)
    ref = run_case(group["torch"], case, steps=steps, size=SIZE)
    got = run_case(group["onnx"], case, steps=steps, size=SIZE)
    m = compare(ref, got)
    assert m["psnr_db"] >= floor_for("fp32"), m
    assert m["ssim"] > 0.999, m
    if variant == "default":
        q = compare(ref, run_case(pipes["int8"], case, steps=steps, size=SIZE))
        assert floor_for("int8") <= q["psnr_db"] < m["psnr_db"], q  # lossy, but above its floor


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_same_seed_same_image_other_seed_other_image(pipes, backend: str) -> None:
    pipe = pipes[backend]

    def run(seed: int) -> np.ndarray:
        return pipe.generate(
            sketch_request(pipe, SKETCHES["cat"](), "a cat", steps=2, seed=seed, height=SIZE, width=SIZE)
        ).pixels

    a, b, c = run(5), run(5), run(6)
    np.testing.assert_array_equal(a, b)
    assert psnr(a[0], c[0]) < 40.0


def test_lcm_defaults_and_no_cfg(lcm_pipes) -> None:
    pipe = lcm_pipes["onnx"]
    result = pipe.generate(text_request(pipe, "a lighthouse", seed=1, height=SIZE, width=SIZE))
    assert (result.steps, result.guidance, result.cfg) == (4, 1.0, False)
    assert result.settings["scheduler"] == "LCM"


def test_plain_sd_uses_cfg_and_dpm(pipes) -> None:
    pipe = pipes["onnx"]
    result = pipe.generate(text_request(pipe, "a lighthouse", steps=2, seed=1, height=SIZE, width=SIZE))
    assert (result.guidance, result.cfg, result.settings["scheduler"]) == (7.5, True, "DPMSolverMultistep")
    no_cfg = pipe.generate(
        text_request(pipe, "a lighthouse", steps=2, seed=1, guidance=1.0, height=SIZE, width=SIZE)
    )
    assert not no_cfg.cfg and psnr(result.pixels[0], no_cfg.pixels[0]) < 60


def test_zero_conditioning_scale_is_plain_txt2img(pipes) -> None:
    """ControlNet plumbing: scale 0 gives exactly the residual-free image; the control window matters."""
    pipe = pipes["onnx"]
    kw = {"steps": 2, "seed": 9, "height": SIZE, "width": SIZE}
    plain = pipe.generate(text_request(pipe, "a car", **kw)).pixels
    zero = pipe.generate(
        sketch_request(pipe, SKETCHES["car"](), "a car", conditioning_scale=0.0, **kw)
    ).pixels
    full = pipe.generate(sketch_request(pipe, SKETCHES["car"](), "a car", **kw)).pixels
    half = pipe.generate(sketch_request(pipe, SKETCHES["car"](), "a car", control_end=0.5, **kw)).pixels
    np.testing.assert_allclose(zero, plain, atol=1e-6)
    assert psnr(full[0], plain[0]) < 60 and psnr(full[0], half[0]) < 60 and psnr(half[0], plain[0]) < 60


def test_tiny_vae(tiny_bundle: Path, pipes) -> None:
    kw = {"steps": 2, "seed": 2, "height": SIZE, "width": SIZE}
    tiny = {be: load(tiny_bundle, backend=be, vae="tiny") for be in ("torch", "onnx")}
    a, b = (p.generate(text_request(p, "a house", **kw)).pixels for p in tiny.values())
    full = pipes["onnx"].generate(text_request(pipes["onnx"], "a house", **kw)).pixels
    assert a.shape == full.shape and psnr(b[0], full[0]) < 40  # a different decoder
    assert psnr(a[0], b[0]) >= floor_for("fp32")  # and the same on both backends


def test_style_preset_changes_the_prompt(pipes) -> None:
    pipe = pipes["onnx"]
    req = text_request(pipe, "a car", style="cyberpunk", height=SIZE, width=SIZE)
    assert req.prompts[0].startswith("a car, cyberpunk") and req.negative_prompts
    with pytest.raises(UserError, match="unknown style preset 'nope'; known presets: .*'cyberpunk'"):
        text_request(pipe, "a car", style="nope")


def test_components_check_inputs_against_the_manifest(pipes) -> None:
    for backend in ("torch", "onnx"):
        te = pipes[backend].backend.component("text_encoder")
        ids = np.zeros((1, 77), np.int32)
        assert te(input_ids=ids)["last_hidden_state"].shape == (1, 77, 32)
        with pytest.raises(InputSpecError, match="text_encoder: unknown input.*bogus; it takes input_ids"):
            te(input_ids=ids, bogus=ids)
        with pytest.raises(InputSpecError, match="input_ids: dtype int64, expected int32"):
            te(input_ids=ids.astype(np.int64))
        with pytest.raises(InputSpecError, match=r"input_ids: shape \(1, 76\), expected \(batch, 77\)"):
            te(input_ids=ids[:, :76])
        unet = pipes[backend].backend.component("unet")
        feeds = {
            k: np.zeros(unet.io.resolve(k, {"batch": 1, "latent_height": 8, "latent_width": 8}), np.float32)
            for k in unet.io.inputs
        }
        feeds["timestep"] = np.zeros((2,), np.float32)
        with pytest.raises(InputSpecError, match="axis 'batch' is 2 here but 1 elsewhere"):
            unet(**feeds)


def test_size_the_bundle_was_not_exported_for(tmp_path: Path, tiny_bundle: Path, pipes) -> None:
    with pytest.raises(UserError, match="multiples of 8"):
        pipes["onnx"].text("a car", height=60, width=64)
    # A static export (as for Core ML or a fixed-shape TensorRT build) admits only its own size.
    root = tmp_path / "static"
    shutil.copytree(tiny_bundle, root, ignore=shutil.ignore_patterns("int8", "torch"))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["sections"] = {"onnx/fp32": manifest["sections"]["onnx/fp32"]}
    manifest["files"] = {
        k: v for k, v in manifest["files"].items() if not k.startswith(("onnx/int8/", "torch/"))
    }
    spec = manifest["sections"]["onnx/fp32"]["components"]["unet"]["inputs"][0]
    spec["shape"] = ["batch", 4, 8, 8]
    (root / "manifest.json").write_text(json.dumps(manifest))
    pipe = load(root, backend="onnx")
    assert pipe.text("a car", steps=1, height=64, width=64).size == (64, 64)
    with pytest.raises(
        UserError, match="not one this bundle was exported for: its UNet takes height 64 px only"
    ):
        pipe.text("a car", steps=1, height=128, width=64)


# --- the reference loop against diffusers' pipelines --------------------------------------------------


def test_torch_reference_loop_matches_diffusers(tiny_sd15_dir: Path, pipes) -> None:
    """Our numpy loop over the torch components gives diffusers' StableDiffusion(ControlNet)Pipeline images
    for the same initial latents (DPM-Solver++ and CFG are deterministic)."""
    from sdkiln.stages.common.torch.pipeline import open_pipeline

    pipe = pipes["torch"]
    loaded = open_pipeline(tiny_sd15_dir, family="sd15")
    latents = torch.from_numpy(np.random.default_rng(4).standard_normal((1, 4, 8, 8), dtype=np.float32))

    ours = pipe.generate(text_request(pipe, "a lighthouse", steps=3, seed=4, height=SIZE, width=SIZE))
    ref = loaded.task_pipeline("text")(
        "a lighthouse",
        num_inference_steps=3,
        guidance_scale=7.5,
        height=SIZE,
        width=SIZE,
        latents=latents.clone(),
        output_type="np",
    ).images
    np.testing.assert_allclose(ours.pixels, ref, atol=2e-4)

    req = sketch_request(
        pipe,
        SKETCHES["car"](),
        "a car",
        steps=3,
        seed=4,
        height=SIZE,
        width=SIZE,
        conditioning_scale=0.7,
        control_start=0.0,
        control_end=0.67,
    )
    ours = pipe.generate(req)
    ref = loaded.task_pipeline("controlnet", "scribble")(
        "a car",
        image=torch.from_numpy(req.control.image),
        num_inference_steps=3,
        guidance_scale=7.5,
        height=SIZE,
        width=SIZE,
        latents=latents.clone(),
        output_type="np",
        controlnet_conditioning_scale=0.7,
        control_guidance_start=0.0,
        control_guidance_end=0.67,
    ).images
    np.testing.assert_allclose(ours.pixels, ref, atol=2e-4)


@pytest.mark.parametrize("control", [None, "canny"])
def test_edit_matches_diffusers_img2img_step_for_step(
    tiny_sd15_dir: Path, pipes, monkeypatch, control
) -> None:
    """``edit`` (img2img, and img2img with canny ControlNet) gives the images of diffusers'
    StableDiffusion(ControlNet)Img2ImgPipeline when both start from the same noise: diffusers' random
    draws are replaced by ours (the noise added to the encoded photo), and its encoder takes the
    latent mean as ours does (diffusers samples it; that draw is the only other randomness)."""
    import diffusers.pipelines.controlnet.pipeline_controlnet_img2img as cn_img2img
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img

    from sdkiln.runtime.tasks import edit_request
    from sdkiln.stages.common.torch.pipeline import open_pipeline

    pipe = pipes["torch"]
    loaded = open_pipeline(tiny_sd15_dir, family="sd15")
    seed, steps, strength = 5, 4, 0.6
    req = edit_request(
        pipe, PHOTOS["scene"](), "a red bird", strength=strength, control=control, steps=steps, seed=seed,
        guidance=6.0, height=SIZE, width=SIZE,
    )  # fmt: skip
    ours = pipe.generate(req)
    noise = torch.from_numpy(np.random.default_rng(seed).standard_normal((1, 4, 8, 8), dtype=np.float32))
    module = cn_img2img if control else img2img
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: noise.clone().to(kw.get("dtype")))
    real = module.retrieve_latents
    monkeypatch.setattr(
        module,
        "retrieve_latents",
        lambda out, generator=None, sample_mode="sample": real(out, sample_mode="argmax"),
    )
    common = dict(
        prompt="a red bird",
        num_inference_steps=steps,
        guidance_scale=6.0,
        strength=strength,
        output_type="np",
    )
    init = torch.from_numpy(req.init_image)
    if control:
        ref = loaded.task_pipeline("controlnet_img2img", control)(
            image=init,
            control_image=torch.from_numpy(req.control.image),
            controlnet_conditioning_scale=req.control.scale,  # diffusers' default here is 0.8
            height=SIZE,
            width=SIZE,
            **common,
        ).images
    else:
        ref = loaded.task_pipeline("img2img")(image=init, **common).images
    assert ours.steps == int(steps * strength)  # img2img skips the first steps, as diffusers does
    np.testing.assert_allclose(ours.pixels, ref, atol=2e-4)
    # and the comparison can fail: other noise gives another image
    other = pipe.generate(edit_request(
        pipe, PHOTOS["scene"](), "a red bird", strength=strength, control=control, steps=steps, seed=seed + 1,
        guidance=6.0, height=SIZE, width=SIZE,
    ))  # fmt: skip
    assert np.abs(other.pixels - ref).max() > 1e-2


def _torch_only_bundle(root: Path, artifact) -> Path:
    """A bundle with just the ``torch/fused`` section: enough for the reference backend."""
    return make_bundle_of(root, {"torch/fused": artifact})


def test_sd_turbo_defaults_one_step_no_cfg_and_matches_diffusers(
    tmp_path: Path, tiny_sd_turbo_artifact
) -> None:
    from sdkiln.stages.common.torch.pipeline import open_pipeline

    bundle = _torch_only_bundle(tmp_path / "turbo", tiny_sd_turbo_artifact)
    pipe = load(bundle, backend="torch")
    ours = pipe.generate(text_request(pipe, "a lighthouse", seed=3, height=SIZE, width=SIZE))
    assert (ours.steps, ours.guidance, ours.cfg) == (1, 0.0, False)
    assert ours.settings["scheduler"] == "EulerAncestralDiscrete"
    latents = torch.from_numpy(np.random.default_rng(3).standard_normal((1, 4, 8, 8), dtype=np.float32))
    loaded = open_pipeline(tiny_sd_turbo_artifact.path, family="sd-turbo")
    ref = loaded.task_pipeline("text")(
        "a lighthouse",
        num_inference_steps=1,
        guidance_scale=0.0,
        height=SIZE,
        width=SIZE,
        latents=latents,
        output_type="np",
    ).images
    np.testing.assert_allclose(ours.pixels, ref, atol=2e-4)


def test_sdxl_conditioning_matches_diffusers(tmp_path: Path, tiny_sdxl_artifact) -> None:
    """Two text encoders (penultimate layers), pooled embeds, time ids, zeroed negative, CFG: as diffusers."""
    from sdkiln.stages.common.torch.pipeline import open_pipeline

    bundle = _torch_only_bundle(tmp_path / "sdxl", tiny_sdxl_artifact)
    pipe = load(bundle, backend="torch")
    ours = pipe.generate(text_request(pipe, "a lighthouse", steps=2, seed=5, height=SIZE, width=SIZE))
    assert ours.cfg and ours.guidance == 5.0
    latents = torch.from_numpy(np.random.default_rng(5).standard_normal((1, 4, 8, 8), dtype=np.float32))
    loaded = open_pipeline(tiny_sdxl_artifact.path, family="sdxl")
    ref = loaded.task_pipeline("text")(
        "a lighthouse",
        num_inference_steps=2,
        guidance_scale=5.0,
        height=SIZE,
        width=SIZE,
        latents=latents,
        output_type="np",
    ).images
    np.testing.assert_allclose(ours.pixels, ref, atol=2e-4)


def test_torch_low_precision_keeps_the_vae_fp32(tiny_bundle: Path) -> None:
    pipe = load(tiny_bundle, backend="torch", dtype="bfloat16")
    result = pipe.generate(text_request(pipe, "a car", steps=2, seed=1, height=SIZE, width=SIZE))
    assert np.isfinite(result.pixels).all()
    assert pipe.backend._module("unet").dtype == torch.bfloat16
    assert pipe.backend._module("vae_decoder").dtype == torch.float32  # force_upcast: fp16/bf16 VAEs overflow
