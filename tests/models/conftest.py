"""Helpers for calling stages directly (outside the engine)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sdkiln.stages.core import InputArtifact, Stage, StageContext


@pytest.fixture
def make_ctx(tmp_path: Path):
    """``make_ctx(stage, params_dict, inputs={...}, pins={...})`` -> a StageContext writing under tmp_path."""
    counter = iter(range(1000))

    def make(
        stage: Stage,
        params: dict[str, Any],
        inputs: dict[str, InputArtifact] | None = None,
        pins: dict[str, str] | None = None,
        recipe_dir: Path | None = None,
    ) -> StageContext:
        n = next(counter)
        out, work = tmp_path / f"out{n}", tmp_path / f"work{n}"
        out.mkdir()
        work.mkdir()
        return StageContext(
            step_id=f"{stage.name}{n}",
            stage=stage,
            params=stage.params.model_validate(params),
            inputs=inputs or {},
            out_dir=out,
            recipe_dir=recipe_dir or tmp_path,
            pins=pins or {},
            recipe={},
            work_dir=work,
        )

    return make


def as_input(ctx: StageContext, kind: str = "pipeline") -> InputArtifact:
    """A finished context's output as the next stage's input."""
    manifest = {
        "kind": kind,
        "params": ctx.params.model_dump(),
        "metrics": ctx.metrics,
        "components": ctx.components,
        "extra": ctx.extra,
    }
    return InputArtifact(step_id=ctx.step_id, path=ctx.out_dir, manifest=manifest)


@pytest.fixture
def to_input():
    """``to_input(ctx)``: a finished context's output as an InputArtifact."""
    return as_input
