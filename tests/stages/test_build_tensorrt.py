"""Engine names, cache keys and optimization profiles: the pure logic of the TensorRT path (no TensorRT)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sdkiln.runtime.backends import nvidia
from sdkiln.runtime.backends.tensorrt_build import (
    BuildSettings,
    check_profile,
    in_profile,
    match_profile,
    static_profile,
)
from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.manifest import ModelFacts
from sdkiln.stages.build_tensorrt import (
    STAGE,
    BuildTensorrtParams,
    key_facts,
    plan_profiles,
    profile_for,
    select_components,
    static_profile_for,
)

UNET_INPUTS = [
    {"name": "sample", "dtype": "float32", "shape": ["batch", 4, "latent_height", "latent_width"]},
    {"name": "timestep", "dtype": "float32", "shape": ["batch"]},
    {"name": "encoder_hidden_states", "dtype": "float32", "shape": ["batch", 77, 768]},
]
VAE_INPUTS = [
    {"name": "latent_sample", "dtype": "float32", "shape": ["batch", 4, "latent_height", "latent_width"]}
]


@pytest.mark.parametrize(
    ("text", "cc"),
    [("sm90", (9, 0)), ("sm_86", (8, 6)), ("9.0", (9, 0)), ("SM120", (12, 0)), ("7.5", (7, 5))],
)
def test_parse_sm(text: str, cc: tuple[int, int]) -> None:
    assert nvidia.parse_sm(text) == cc
    assert nvidia.parse_sm(nvidia.sm_name(cc)) == cc


@pytest.mark.parametrize("bad", ["", "sm", "sm9", "ninety", "9.x", "sm90a1"])
def test_parse_sm_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match="compute capability"):
        nvidia.parse_sm(bad)


def test_engine_tag_and_file_names() -> None:
    tag = nvidia.engine_tag((9, 0), "10.8.0.43")
    assert tag == "sm90-trt10.8.0.43"
    assert nvidia.parse_engine_tag(tag) == ((9, 0), "10.8.0.43")
    assert nvidia.engine_file(tag, "controlnet.scribble") == "sm90-trt10.8.0.43/controlnet.scribble.plan"
    assert nvidia.engine_tag((12, 0), "11.4.0.106") == "sm120-trt11.4.0.106"
    with pytest.raises(ValueError):
        nvidia.engine_file(tag, "../unet")
    with pytest.raises(ValueError):
        nvidia.engine_tag((9, 0), "10.8; rm")


def test_precision_needs_the_right_gpu() -> None:
    nvidia.check_precision("fp16", (7, 5))
    nvidia.check_precision("int8", (8, 6))
    nvidia.check_precision("fp8", (8, 9))
    nvidia.check_precision("fp8", (9, 0))
    with pytest.raises(UserError, match=r"fp8 needs compute capability 8\.9.*sm86.*fp16 or int8"):
        nvidia.check_precision("fp8", (8, 6))
    with pytest.raises(UserError, match="7.5"):
        nvidia.check_precision("int8", (7, 0))


def test_nvidia_smi_output_is_parsed() -> None:
    text = "0, NVIDIA H200, 9.0, 143771\n1, NVIDIA L4, 8.9, 23034\n"
    gpus = nvidia._parse_smi(text)
    assert [(g.index, g.name, g.sm, g.memory_mib) for g in gpus] == [
        (0, "NVIDIA H200", "sm90", 143771),
        (1, "NVIDIA L4", "sm89", 23034),
    ]


def test_no_gpu_here_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert nvidia.detect_gpus() == []
    with pytest.raises(UserError, match="no NVIDIA GPU found.*nvidia-smi"):
        nvidia.require_gpu()


def test_engine_cache_is_keyed_by_graph_gpu_trt_and_settings(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SDKILN_TRT_CACHE", str(tmp_path / "trt"))
    root = nvidia.user_cache_dir()
    assert root == tmp_path / "trt"
    prof = {"sample": {"min": [1, 4, 8, 8], "opt": [1, 4, 8, 8], "max": [2, 4, 16, 16]}}
    a = BuildSettings(profile=prof)
    b = BuildSettings(profile=prof, optimization_level=5)
    assert a.digest() == BuildSettings(profile={k: dict(v) for k, v in prof.items()}).digest()
    assert a.digest() != b.digest()
    d = nvidia.cached_engine_dir(root, "ab" * 32, "sm90-trt10.8.0.43", a.digest())
    assert d.parent.name == "sm90-trt10.8.0.43"
    assert d.name.startswith("ab" * 12)
    assert d != nvidia.cached_engine_dir(root, "ab" * 32, "sm89-trt10.8.0.43", a.digest())
    assert d != nvidia.cached_engine_dir(root, "ab" * 32, "sm90-trt10.8.0.43", b.digest())
    assert d != nvidia.cached_engine_dir(root, "cd" * 32, "sm90-trt10.8.0.43", a.digest())
    assert nvidia.timing_cache_path(root, "sm90-trt10.8.0.43") == root / "timing" / "sm90-trt10.8.0.43.cache"


def test_profiles_double_the_cfg_batch_but_not_the_min() -> None:
    unet = profile_for(UNET_INPUTS, "unet", [1, 1, 4], [256, 512, 768], [256, 512, 1024], cfg=True)
    assert unet["sample"] == {"min": [1, 4, 32, 32], "opt": [2, 4, 64, 64], "max": [8, 4, 96, 128]}
    assert unet["encoder_hidden_states"]["max"] == [8, 77, 768]
    vae = profile_for(VAE_INPUTS, "vae_decoder", [1, 1, 4], [256, 512, 768], [256, 512, 1024], cfg=True)
    assert vae["latent_sample"]["max"] == [4, 4, 96, 128]  # the VAE never sees the CFG batch
    no_cfg = profile_for(UNET_INPUTS, "unet", [1, 1, 4], [512] * 3, [512] * 3, cfg=False)
    assert no_cfg["timestep"] == {"min": [1], "opt": [1], "max": [4]}


def test_static_profile_is_one_shape() -> None:
    from sdkiln.stages.build_tensorrt import StaticShape

    prof = static_profile_for(UNET_INPUTS, "unet", StaticShape(batch=1, height=512, width=512), cfg=True)
    assert prof["sample"] == {"min": [2, 4, 64, 64], "opt": [2, 4, 64, 64], "max": [2, 4, 64, 64]}
    pinned = static_profile(
        profile_for(VAE_INPUTS, "vae_decoder", [1, 2, 4], [512] * 3, [512] * 3, cfg=False)
    )
    assert pinned["latent_sample"]["min"] == pinned["latent_sample"]["max"] == [2, 4, 64, 64]


def test_plan_profiles_takes_recorded_override_or_static() -> None:
    comps = {"unet": {"inputs": UNET_INPUTS}, "vae_decoder": {"inputs": VAE_INPUTS}}
    recorded = profile_for(UNET_INPUTS, "unet", [1, 1, 2], [64, 64, 128], [64, 64, 128], cfg=True)
    details = {
        "profiles": {"unet": recorded, "vae_decoder": {"latent_sample": recorded["sample"]}},
        "profile_params": {"batch": [1, 1, 2], "height": [64, 64, 128], "width": [64, 64, 128], "cfg": True},
    }
    facts = ModelFacts(family="sd15")
    assert plan_profiles(BuildTensorrtParams(), details, facts, comps)["unet"] == recorded
    wider = plan_profiles(BuildTensorrtParams(height=[64, 512, 1024]), details, facts, comps)
    assert wider["unet"]["sample"]["max"] == [4, 4, 128, 16]  # height from the step, width recorded
    static = plan_profiles(
        BuildTensorrtParams(static={"batch": 1, "height": 512, "width": 512}), details, facts, comps
    )
    assert static["vae_decoder"]["latent_sample"]["opt"] == [1, 4, 64, 64]
    with pytest.raises(UserError, match="fixed shapes"):
        fixed = ModelFacts(family="sd15", static={"batch": 1})
        plan_profiles(BuildTensorrtParams(static={"batch": 1}), details, fixed, comps)


def test_profile_checks() -> None:
    good = {"x": {"min": [1, 4], "opt": [2, 4], "max": [4, 4]}}
    check_profile(good)
    with pytest.raises(UserError, match="min <= opt <= max"):
        check_profile({"x": {"min": [2, 4], "opt": [1, 4], "max": [4, 4]}})
    with pytest.raises(UserError, match="missing max"):
        check_profile({"x": {"min": [1], "opt": [1]}})
    assert match_profile({"x": (-1, 4)}, good) == []
    problems = match_profile({"x": (-1, 8), "y": (1,)}, good)
    assert any("axis 1 is fixed at 8" in p for p in problems)
    assert any("'y' has no profile entry" in p for p in problems)
    assert in_profile({"x": (3, 4)}, good) == []
    assert in_profile({"x": (5, 4)}, good) == [
        "x: shape [5, 4] is outside the engine's profile [1, 4]..[4, 4]"
    ]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"precision": "int8"}, "calibration"),
        ({"calibration": {"prompts": ["x"]}}, "calibration"),
        ({"static": {"batch": 1}, "batch": [1, 1, 2]}, "batch"),
        ({"height": [64, 60, 128]}, "height"),
        ({"gpu": "ninety"}, "gpu"),
        ({"strip_weights": True, "refit": "none"}, "strip_weights"),
        ({"optimization_level": 6}, "optimization_level"),
    ],
)
def test_params_are_validated(params: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        BuildTensorrtParams(**params)


def test_bundle_folders_and_key_facts(monkeypatch: pytest.MonkeyPatch) -> None:
    assert STAGE.bundle_dir(BuildTensorrtParams()) == "tensorrt/engines"
    assert STAGE.bundle_dir(BuildTensorrtParams(gpu="sm89")) == "tensorrt/engines-sm89"
    int8 = BuildTensorrtParams(precision="int8", gpu="9.0", calibration={"prompts": ["x"]})
    assert STAGE.bundle_dir(int8) == "tensorrt/engines-int8-sm90"
    assert STAGE.needs == frozenset({"gpu", "tensorrt"})
    # A named target keys the step the same on every machine (a cache entry built there is a hit here);
    # "auto" keys it by this machine's GPU, which here is none.
    assert key_facts(BuildTensorrtParams(gpu="sm90"))["gpu"] == "sm90"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert key_facts(BuildTensorrtParams())["gpu"] == "none"
    monkeypatch.setattr(nvidia, "tensorrt_version", lambda: "10.8.0.43")
    assert key_facts(BuildTensorrtParams(gpu="sm90")) == {"gpu": "sm90", "tensorrt": "10.8.0.43"}


def test_select_components_by_key_or_kind() -> None:
    comps = {"unet": {}, "controlnet.scribble": {}, "controlnet.canny": {}, "vae_decoder": {}}
    assert set(select_components(comps, ["controlnet"])) == {"controlnet.scribble", "controlnet.canny"}
    assert set(select_components(comps, ["unet", "controlnet.canny"])) == {"unet", "controlnet.canny"}
    with pytest.raises(UserError, match="text_encoder"):
        select_components(comps, ["text_encoder"])
