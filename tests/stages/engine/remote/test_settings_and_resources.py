"""Pure pieces, in-process: where the remote comes from, and how stage needs become Ray resources."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.layout import Kind
from sdkiln.stages.engine.core import Stage, StageParams


def _stage(*needs: str) -> Stage:
    return Stage(
        name="s", version="1", inputs={}, output_kind=Kind.DATA, params=StageParams, run=lambda ctx: None,
        needs=frozenset(needs),
    )  # fmt: skip


def test_remote_settings_precedence(tmp_path: Path):
    from sdkiln.stages.engine.remote import resolve_settings

    (tmp_path / "sdkiln.toml").write_text('[remote]\nurl = "s3://from-file/x"\npush = false\n')
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    file = resolve_settings(cwd=deep, environ={})
    assert (file.url, file.push, file.source) == ("s3://from-file/x", False, str(tmp_path / "sdkiln.toml"))
    env = resolve_settings(cwd=deep, environ={"SDKILN_REMOTE": "s3://from-env/y"})
    assert (env.url, env.push, env.source) == ("s3://from-env/y", True, "SDKILN_REMOTE")
    flag = resolve_settings("hf://org/cache", cwd=deep, environ={"SDKILN_REMOTE": "s3://from-env/y"})
    assert (flag.url, flag.source) == ("hf://org/cache", "--remote")
    assert resolve_settings("s3://b/c", no_push=True, environ={}).push is False
    assert resolve_settings("s3://b/c", environ={"SDKILN_REMOTE_PUSH": "0"}).push is False
    assert resolve_settings("s3://b/c", disabled=True, environ={}) is None
    assert resolve_settings(cwd=Path("/"), environ={}) is None
    with pytest.raises(UserError, match="SDKILN_REMOTE_PUSH='maybe': use 1 or 0"):
        resolve_settings("s3://b/c", environ={"SDKILN_REMOTE_PUSH": "maybe"})


def test_needs_become_ray_resources():
    from sdkiln.stages.engine.executors import demand, ray_resources

    assert ray_resources(_stage()) == {"num_cpus": 1}
    opts = ray_resources(_stage("gpu", "tensorrt", "memory:24GiB", "network"))
    assert opts == {
        "num_cpus": 1,
        "num_gpus": 1,
        "memory": 24 * 2**30,
        "resources": {"network": 1, "tensorrt": 1},
    }
    assert demand(opts) == {"CPU": 1, "GPU": 1, "memory": 24 * 2**30, "network": 1, "tensorrt": 1}
    with pytest.raises(UserError, match=r"need 'memory:lots': write the size as memory:<number><unit>"):
        ray_resources(_stage("memory:lots"))
    with pytest.raises(UserError, match="need 'Mac OS' is not a valid resource name"):
        ray_resources(_stage("Mac OS"))


def test_unplaceable_needs_one_node_with_everything():
    from sdkiln.stages.engine.executors import ray_resources, unplaceable
    from sdkiln.stages.engine.recipe import Recipe, Step

    steps = (
        Step("plain", _stage(), {}, StageParams(), None),
        Step("mac_gpu", _stage("macos", "gpu"), {}, StageParams(), None),
    )
    recipe = Recipe("r", "", Path("r.yaml"), steps, {})
    options = {s.id: ray_resources(s.stage) for s in steps}
    split = [
        {"Alive": True, "Resources": {"CPU": 4, "GPU": 1}},
        {"Alive": True, "Resources": {"CPU": 4, "macos": 1}},
        {"Alive": False, "Resources": {"CPU": 4, "GPU": 1, "macos": 1}},  # a dead node counts for nothing
    ]
    assert unplaceable(recipe, options, split) == [
        "step mac_gpu (s) needs all of CPU=1, GPU=1, macos=1 on one node"
    ]
    together = [*split, {"Alive": True, "Resources": {"CPU": 1, "GPU": 2, "macos": 1}}]
    assert unplaceable(recipe, options, together) == []
