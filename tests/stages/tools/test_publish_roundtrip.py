"""Round trip through the loopback Hub with a real tiny build and the real CLI:

    sdkiln build (tiny) → sdkiln publish → sdkiln run sketch --model owner/name@tag  ==  the local bundle's image

The build is recipes/tiny.yaml cut to its ``base`` step, placed in the bundle as ``torch/base`` for the
PyTorch reference (fusing and quantising add tens of seconds and nothing this test checks); it is built
once per module with the engine's Python API.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from testkit import REPO as ROOT

REPO = "sdkiln-test/tiny-roundtrip"


def _tiny_recipe() -> dict:
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    recipe["steps"] = [{**s, "bundle": "torch/base"} for s in recipe["steps"] if s["id"] == "base"]
    return recipe


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(bundle folder, artifacts root) of the tiny build."""
    pytest.importorskip(
        "torch", reason="the tiny build needs the build toolchain (pip install -e '.[build]')"
    )
    from sdkiln.stages import STAGES
    from sdkiln.stages.engine import build

    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(yaml.safe_dump(_tiny_recipe(), sort_keys=False))
    root = tmp_path_factory.mktemp("artifacts")
    return build(path, artifacts_root=root, stages=STAGES).bundle, root


@pytest.fixture
def tiny_bundle(tiny_build: tuple[Path, Path]) -> Path:
    return tiny_build[0]


@pytest.fixture
def sketch_png(tmp_path: Path) -> Path:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(img).rectangle((12, 20, 52, 44), outline="black", width=3)
    path = tmp_path / "sketch.png"
    img.save(path)
    return path


def _run(model: str, sketch: Path, out: Path) -> int:
    from sdkiln.stages.cli import main

    return main(
        [
            "run",
            "sketch",
            "--model",
            model,
            "--backend",
            "torch",
            "--image",
            str(sketch),
            "--prompt",
            "a red car",
            "--steps",
            "2",
            "--seed",
            "3",
            "--width",
            "64",
            "--height",
            "64",
            "--out",
            str(out),
        ]
    )


def test_published_bundle_runs_from_the_hub_like_the_local_one(
    hub, tiny_bundle, sketch_png, tmp_path, monkeypatch
):
    from PIL import Image

    from sdkiln.stages.cli import main

    assert (
        main(["publish", str(tiny_bundle), "--repo-id", REPO, "--endpoint", hub.endpoint, "--tag", "v1"]) == 0
    )
    monkeypatch.setenv(
        "HF_ENDPOINT", hub.endpoint
    )  # `sdkiln run` has no --endpoint: HF_ENDPOINT, as users set it

    assert _run(str(tiny_bundle), sketch_png, tmp_path / "local.png") == 0
    assert _run(f"{REPO}@v1", sketch_png, tmp_path / "hub.png") == 0

    local = np.asarray(Image.open(tmp_path / "local.png"))
    from_hub = np.asarray(Image.open(tmp_path / "hub.png"))
    assert local.shape == from_hub.shape and np.array_equal(local, from_hub)
    assert local.std() > 0  # an actual image, not a blank


def test_run_with_unknown_repo_or_revision_exits_2(
    hub, tiny_bundle, sketch_png, tmp_path, monkeypatch, capsys
):
    from sdkiln.stages.cli import main

    assert main(["publish", str(tiny_bundle), "--repo-id", REPO, "--endpoint", hub.endpoint]) == 0
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    capsys.readouterr()

    assert _run("sdkiln-test/missing@v1", sketch_png, tmp_path / "a.png") == 2
    assert "sdkiln-test/missing: no such repository" in capsys.readouterr().err
    assert _run(f"{REPO}@v7", sketch_png, tmp_path / "b.png") == 2
    assert f"{REPO}@v7: no such revision" in capsys.readouterr().err


def test_publish_hub_step_publishes_from_a_recipe_build(hub, tiny_build, tmp_path):
    from sdkiln.stages import STAGES
    from sdkiln.stages.engine import build

    bundle, root = tiny_build
    recipe = _tiny_recipe()
    recipe["steps"].append(
        {
            "id": "publish",
            "stage": "publish_hub",
            "inputs": {"torch": "base"},
            "params": {"repo_id": "sdkiln-test/from-build", "endpoint": hub.endpoint, "tag": "v1"},
        }
    )
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))

    result = build(
        path, artifacts_root=root, stages=STAGES
    )  # the base step is a cache hit: only the publish runs

    assert [(s.step, s.status) for s in result.steps] == [("base", "HIT"), ("publish", "MISS")]
    record = json.loads((result.steps[1].path / "published.json").read_text())
    assert hub.state.repos["sdkiln-test/from-build"].tags["v1"] == record["commit"]
    local = json.loads((bundle / "manifest.json").read_text())["files"]
    remote = hub.state.commit_files("sdkiln-test/from-build", "v1")
    weights = [r for r in local if r.startswith("torch/base/") and r.endswith(".safetensors")]
    assert weights and all(remote[r].lfs_sha256 == local[r]["sha256"] for r in weights)
    assert not (result.bundle / "publish").exists()  # the record is not part of the bundle
