"""Every shipped recipe validates and plans offline, with a comment saying how to build it."""

from __future__ import annotations

import pytest
from testkit import RECIPES as RECIPE_DIR

from sdkiln.stages import STAGES
from sdkiln.stages.engine import plan
from sdkiln.stages.engine.plugins import registry
from sdkiln.stages.engine.recipe import load_recipe

RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))


def test_recipes_are_shipped():
    names = {p.stem for p in RECIPES}
    assert "tiny" in names, "the offline demo recipe is missing"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_and_plans_offline(path, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    first = path.read_text().lstrip().splitlines()[0]
    assert first.startswith("#") and "sdkiln build" in first, f"{path.name} must open with how to build it"
    recipe = load_recipe(path, registry(STAGES))
    assert recipe.name == path.stem
    rows = plan(path, tmp_path / "artifacts", stages=STAGES)
    assert [r.step for r in rows] == [s.id for s in recipe.steps]
    assert all(r.status == "MISS" for r in rows)  # an empty cache: nothing can be a hit
