"""The publish_hub stage: upstream artifacts → bundle layout → one verified commit → published.json."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError
from testkit import folder_artifact

from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.fetch import fetch_bundle
from sdkiln.stages.engine.core import InputArtifact, StageContext
from sdkiln.stages.publish_hub import STAGE, PublishHubParams

REPO = "sdkiln-test/from-recipe"
PIN = "2" * 40


@pytest.fixture
def fake_stages(tmp_path, monkeypatch):
    """Two upstream stages registered as plugins: one with a default bundle folder, one without."""
    plugin = tmp_path / "plugins" / "sdkiln_test_fake_stages.py"
    plugin.parent.mkdir()
    plugin.write_text(
        textwrap.dedent(
            """
            from sdkiln.runtime.contract.layout import Kind
            from sdkiln.stages.engine.core import Stage, StageParams

            class OnnxParams(StageParams):
                precision: str = "fp32"

            class CoremlParams(StageParams):
                attention: str = "split_einsum"

            def run(ctx):
                raise AssertionError("upstream stages are not run in this test")

            STAGES = [
                Stage(name="fake_export_onnx", version="1", inputs={}, output_kind=Kind.ONNX, params=OnnxParams,
                      run=run, bundle_dir=lambda p: f"onnx/{p.precision}"),
                Stage(name="fake_export_coreml", version="1", inputs={}, output_kind=Kind.COREML,
                      params=CoremlParams, run=run),
            ]
            """
        )
    )
    monkeypatch.syspath_prepend(str(plugin.parent))
    monkeypatch.setenv("SDKILN_STAGE_PLUGINS", "sdkiln_test_fake_stages:STAGES")


def artifact(
    root: Path, step_id: str, kind: str, stage: str, files: dict[str, bytes], **meta
) -> InputArtifact:
    """A cache entry as the engine hands it to a stage: payload files plus its manifest."""
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return folder_artifact(step_id, root, kind, stage=stage, **meta)


def context(tmp_path: Path, recipe: dict, inputs: dict[str, InputArtifact], **params) -> StageContext:
    """The context the engine gives a publish step of ``recipe``: bundle folders as the recipe plans them."""
    from sdkiln.stages.engine.plugins import registry
    from sdkiln.stages.engine.recipe import validate

    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    plan = validate(json.loads(json.dumps(recipe)), tmp_path / "r.yaml", registry({"publish_hub": STAGE}))
    return StageContext(
        step_id="publish",
        stage=STAGE,
        params=PublishHubParams(**params),
        inputs=inputs,
        out_dir=out,
        recipe_dir=tmp_path,
        pins={"repo:runwayml/stable-diffusion-v1-5": PIN},
        recipe=recipe,
        work_dir=work,
        bundle_dirs={st.id: st.bundle_dir for st in plan.steps},
    )


RECIPE = {
    "name": "tiny-pub",
    "steps": [
        {"id": "onnx", "stage": "fake_export_onnx", "params": {"precision": "fp32"}},
        {"id": "cml", "stage": "fake_export_coreml", "bundle": "coreml/split_einsum"},
        {
            "id": "publish",
            "stage": "publish_hub",
            "inputs": {"onnx": "onnx", "coreml": "cml"},
            "params": {"repo_id": REPO, "tag": "v1"},
        },
    ],
}


def test_stage_publishes_inputs_in_the_bundle_layout(hub, fake_stages, tmp_path):
    onnx = artifact(
        tmp_path / "a1",
        "onnx",
        "onnx",
        "fake_export_onnx",
        {"unet/model.onnx": b"\0" + bytes(range(256)) * 40, "unet/config.json": b"{}"},
        metrics={"parity": {"unet": {"max_abs": 1e-6}}},
        model={
            "family": "sd15",
            "source": {
                "repo_id": "runwayml/stable-diffusion-v1-5",
                "revision": PIN,
                "license": "creativeml-openrail-m",
            },
        },
    )
    cml = artifact(
        tmp_path / "a2",
        "cml",
        "coreml",
        "fake_export_coreml",
        {"packages/Unet.mlpackage/Manifest.json": b"{}", "vocab.json": b"{}"},
    )
    ctx = context(
        tmp_path, RECIPE, {"onnx": onnx, "coreml": cml}, repo_id=REPO, endpoint=hub.endpoint, tag="v1"
    )

    STAGE.run(ctx)

    record = json.loads((ctx.out_dir / "published.json").read_text())
    assert record["repo_id"] == REPO and record["tag"] == "v1" and record["committed"]
    assert hub.state.repos[REPO].tags["v1"] == record["commit"]
    remote = hub.state.commit_files(REPO, "v1")
    assert {
        "onnx/fp32/unet/model.onnx",
        "coreml/split_einsum/packages/Unet.mlpackage/Manifest.json",
        "recipe.yaml",
        "build.lock.json",
        "manifest.json",
        "README.md",
    } <= set(remote)
    manifest = json.loads(remote["manifest.json"].content)
    assert manifest["sections"]["onnx/fp32"]["step"] == "onnx"
    assert manifest["sections"]["coreml/split_einsum"]["kind"] == "coreml"
    assert manifest["kind"] == "bundle" and manifest["name"] == "tiny-pub"
    assert manifest["lock"]["steps"]["onnx"]["digest"] == onnx.manifest.digest  # what was published, exactly
    assert "base_model:\n- runwayml/stable-diffusion-v1-5" in remote["README.md"].content.decode()
    assert ctx.metrics["files"] == len(record["files"]) and ctx.details["commit"] == record["commit"]

    # What the stage published is a bundle the runtime can fetch and verify.
    folder = fetch_bundle(REPO, "v1", backend="onnx", endpoint=hub.endpoint, cache_dir=tmp_path / "c")
    assert (folder / "onnx/fp32/unet/model.onnx").read_bytes() == (onnx.path / "unet/model.onnx").read_bytes()

    # Running the step again with the same inputs changes nothing on the Hub.
    ctx2 = context(
        tmp_path / "again",
        RECIPE,
        {"onnx": onnx, "coreml": cml},
        repo_id=REPO,
        endpoint=hub.endpoint,
        tag="v1",
    )
    STAGE.run(ctx2)
    assert not json.loads((ctx2.out_dir / "published.json").read_text())["committed"]


def test_stage_refuses_inputs_without_a_bundle_folder(hub, fake_stages, tmp_path):
    cml = artifact(tmp_path / "a2", "cml", "coreml", "fake_export_coreml", {"vocab.json": b"{}"})
    recipe = {**RECIPE, "steps": [{"id": "cml", "stage": "fake_export_coreml"}]}
    ctx = context(tmp_path, recipe, {"coreml": cml}, repo_id=REPO, endpoint=hub.endpoint)
    with pytest.raises(UserError, match="step 'cml' has no bundle folder .*give it one"):
        STAGE.run(ctx)
    recipe = {**RECIPE, "steps": [{"id": "cml", "stage": "fake_export_coreml", "bundle": False}]}
    with pytest.raises(UserError, match="step 'cml' has no bundle folder"):
        STAGE.run(context(tmp_path, recipe, {"coreml": cml}, repo_id=REPO, endpoint=hub.endpoint))
    with pytest.raises(UserError, match="needs at least one input"):
        STAGE.run(context(tmp_path, recipe, {}, repo_id=REPO, endpoint=hub.endpoint))
    assert REPO not in hub.state.repos


def test_params_are_validated():
    with pytest.raises(ValidationError, match="repo_id"):
        PublishHubParams(repo_id="no-namespace")
    with pytest.raises(ValidationError, match="tag"):
        PublishHubParams(repo_id=REPO, tag="bad tag")
    with pytest.raises(ValidationError, match="token"):
        PublishHubParams(repo_id=REPO, token="hf_x")  # a token never goes in a recipe
    assert STAGE.needs == frozenset({"network"})


def test_recipe_plan_checks_publish_inputs(fake_stages, tmp_path):
    from sdkiln.runtime.contract.errors import RecipeError
    from sdkiln.stages.engine.plugins import registry
    from sdkiln.stages.engine.recipe import validate

    stages = registry({"publish_hub": STAGE})
    recipe = validate(json.loads(json.dumps(RECIPE)), tmp_path / "r.yaml", stages)
    assert recipe.step("publish").bundle_dir is None  # a record, not part of the bundle
    wrong = json.loads(json.dumps(RECIPE))
    wrong["steps"][2]["inputs"] = {"coreml": "onnx", "bogus": "cml"}
    with pytest.raises(RecipeError) as err:
        validate(wrong, tmp_path / "r.yaml", stages)
    text = str(err.value)
    assert "inputs.bogus: stage publish_hub takes no input 'bogus'" in text
    assert "inputs.coreml: step 'onnx' produces a 'onnx' artifact" in text
