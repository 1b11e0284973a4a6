"""Every shipped recipe validates and plans offline, with a comment saying how to build it."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdkiln.stages.engine import plan
from sdkiln.stages.recipe import load_recipe
from sdkiln.stages.registry import registry

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))


def test_recipes_are_shipped():
    names = {p.stem for p in RECIPES}
    assert "tiny" in names, "the offline demo recipe is missing"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_and_plans_offline(path, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    first = path.read_text().lstrip().splitlines()[0]
    assert first.startswith("#") and "sdkiln build" in first, f"{path.name} must open with how to build it"
    recipe = load_recipe(path, registry())
    assert recipe.name == path.stem
    rows = plan(path, tmp_path / "artifacts")
    assert [r.step for r in rows] == [s.id for s in recipe.steps]
    assert all(r.status == "MISS" for r in rows)  # an empty cache: nothing can be a hit
