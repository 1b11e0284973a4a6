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


# Kinds that are measurements, not models: a bundle carries them for people, no backend runs them.
REPORT_KINDS = {"report", "published"}


def _runnable_kinds() -> set[str]:
    from sdkiln.runtime.contract.layout import BACKEND_KINDS
    from sdkiln.runtime.load import ENGINE_KIND

    # Engine sections are run by the tensorrt backend beside the TensorRT-ready ONNX they came from.
    return set(BACKEND_KINDS.values()) | {ENGINE_KIND}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_section_of_the_bundle_has_a_backend(path):
    """Nothing in a bundle that nothing can run: each step that lands in the bundle makes an artifact
    kind some runtime backend runs (layout.BACKEND_KINDS), or a report."""
    recipe = load_recipe(path, registry(STAGES))
    runnable = _runnable_kinds()
    orphans = {
        s.bundle_dir: s.stage.output_kind
        for s in recipe.steps
        if s.bundle_dir is not None and s.stage.output_kind not in runnable | REPORT_KINDS
    }
    assert not orphans, f"{path.name}: bundle sections no backend runs: {orphans}"


def test_the_kind_check_bites():
    """An optimum-quanto section (kind torch_quantized) has no backend: the check above would refuse it."""
    from sdkiln.runtime.contract.layout import Kind

    assert Kind.TORCH_QUANTIZED not in _runnable_kinds() | REPORT_KINDS
    assert STAGES["quantize_torch"].output_kind == Kind.TORCH_QUANTIZED
