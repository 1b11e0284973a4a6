"""The real-model recipes: they validate and plan offline; building one offline is a clear exit 2."""

from __future__ import annotations

import pytest
from testkit import RECIPES

from sdkiln.runtime.contract.families import get_family
from sdkiln.stages import STAGES
from sdkiln.stages.cli import main
from sdkiln.stages.engine import plan
from sdkiln.stages.engine.plugins import registry
from sdkiln.stages.engine.recipe import load_recipe

# recipe -> (family, repo of its base model: what an offline build must name, its families.hub key)
REAL = {
    "sd15-lcm-scribble": ("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "base"),
    "sd-turbo": ("sd-turbo", "stabilityai/sd-turbo", "base"),
    "ssd1b-lcm-canny": ("ssd-1b", "segmind/SSD-1B", "base"),
    "sdxl-lcm-canny": ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "base"),
    "small-sd-text": ("sd15", "segmind/small-sd", "small"),
}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # connection refused at once
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_recipe_validates_and_plans(name, tmp_path, offline):
    family, repo, hub_key = REAL[name]
    path = RECIPES / f"{name}.yaml"
    recipe = load_recipe(path, registry(STAGES))
    base = recipe.steps[0]
    assert base.stage.name == "load_pipeline"
    assert (base.params.repo, base.params.family) == (repo, family)
    assert base.params.repo == get_family(family).hub[hub_key].repo  # recipes and the table agree
    loras = [lo for s in recipe.steps if s.stage.name == "fuse_lora" for lo in s.params.loras]
    if "lcm" in name:
        assert [lo.repo for lo in loras if lo.kind == "lcm"] == [get_family(family).hub["lcm_lora"].repo]
    rows = plan(path, tmp_path / "artifacts", stages=STAGES)
    assert [r.step for r in rows] == [s.id for s in recipe.steps]
    assert all(r.status == "MISS" for r in rows)


@pytest.mark.parametrize("name", ["sd15-lcm-scribble", "sdxl-lcm-canny"])
def test_offline_build_is_exit_2_naming_the_repo(name, tmp_path, offline, capsys):
    rc = main(["--artifacts", str(tmp_path / "artifacts"), "build", str(RECIPES / f"{name}.yaml")])
    err = capsys.readouterr().err
    assert rc == 2
    assert REAL[name][1] in err and "cannot reach the Hugging Face Hub" in err
    assert "Traceback" not in err


def test_every_real_recipe_is_built_by_the_tests():
    """Each shipped recipe but the offline ones is planned here and built against the loopback Hub
    (tests/recipes/)."""
    from real_repos import REAL_RECIPES

    shipped = {p.stem for p in RECIPES.glob("*.yaml")} - {"tiny", "tiny-nvidia", "bench"}
    assert shipped == set(REAL) == set(REAL_RECIPES)


@pytest.mark.parametrize("name", ["bench", "tiny"])
def test_benchmarked_bundles_hold_their_pytorch_reference(name):
    """``sdkiln bench`` measures every variant against the PyTorch reference in the same run: the bundle
    must carry a pipeline section for it (``load_pipeline`` puts none in a bundle unless asked)."""
    from sdkiln.runtime.contract.layout import Kind

    recipe = load_recipe(RECIPES / f"{name}.yaml", registry(STAGES))
    dirs = [s.bundle_dir for s in recipe.steps if s.stage.output_kind == Kind.PIPELINE and s.bundle_dir]
    assert dirs and all(d.startswith("torch/") for d in dirs), dirs
