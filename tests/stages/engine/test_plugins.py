"""Plugins add stages; they never replace a built-in one, and every loaded plugin stage is logged."""

from __future__ import annotations

import logging
import textwrap

import pytest

from sdkiln.runtime.contract.errors import UserError
from sdkiln.stages import STAGES
from sdkiln.stages.engine.plugins import registry


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    def write(name: str, stage_name: str) -> str:
        (tmp_path / f"{name}.py").write_text(
            textwrap.dedent(
                f"""
                from sdkiln.runtime.contract.layout import Kind
                from sdkiln.stages.engine.core import Stage, StageParams

                class P(StageParams):
                    pass

                STAGES = {{"{stage_name}": Stage(name="{stage_name}", version="1", inputs={{}},
                                               output_kind=Kind.DATA, params=P, run=lambda ctx: None)}}
                """
            )
        )
        return f"{name}:STAGES"

    monkeypatch.syspath_prepend(str(tmp_path))
    return write


def test_registry_is_a_literal_dict_of_every_stage() -> None:
    assert {"load_pipeline", "fuse_lora", "export_onnx", "export_coreml", "parity", "publish_hub"} <= set(
        STAGES
    )
    assert all(name == stage.name for name, stage in STAGES.items())


def test_a_plugin_adds_a_stage_and_is_logged(plugin, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="sdkiln.stages.engine.plugins"):
        stages = registry(STAGES, plugin("my_plugin", "my_stage"))
    assert "my_stage" in stages and set(STAGES) < set(stages)
    assert "plugin stage my_stage loaded from my_plugin:STAGES" in caplog.text


def test_a_plugin_cannot_replace_a_builtin(plugin) -> None:
    with pytest.raises(UserError, match=r"export_onnx would replace built-in stage\(s\)"):
        registry(STAGES, plugin("evil_plugin", "export_onnx"))


def test_two_plugins_cannot_define_one_stage(plugin) -> None:
    spec = plugin("a_plugin", "dup") + "," + plugin("b_plugin", "dup")
    with pytest.raises(UserError, match="'dup' is defined by both a_plugin:STAGES and b_plugin:STAGES"):
        registry(STAGES, spec)


def test_the_cli_and_the_stage_registry_import_no_toolchain():
    """Every `sdkiln` command imports the registry; the heavy toolchains load inside a stage's run only
    (importing torch alone costs seconds and ~200 MB)."""
    import subprocess
    import sys

    code = (
        "import sys, sdkiln.stages.cli, sdkiln.stages\n"
        "bad = ('torch', 'diffusers', 'transformers', 'onnx', 'onnxruntime', 'coremltools', 'ray')\n"
        "print(','.join(sorted(m for m in bad if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
