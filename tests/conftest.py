"""Session-wide fixtures: tiny preset pipelines saved once per test session, offline.

Each ``*_dir`` fixture is a read-only PIPELINE folder (contract layout: a diffusers folder plus
``controlnet/<type>/`` and ``vae_tiny/``); each ``*_artifact`` fixture wraps it as the
``InputArtifact`` a stage receives, with the manifest fields (kind, components, extra) filled in.
Treat them as read-only: other tests share them.

- ``tiny_sd15_dir``: SD 1.5 family, scribble and canny ControlNets (randomised zero-convs), TAESD.
- ``tiny_sdxl_dir``: SDXL family, canny ControlNet, TAESD.
- ``tiny_sd_turbo_dir``: SD-Turbo family (Euler ancestral, trailing timesteps), no extras.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from sdkiln.stages.core import InputArtifact

# Tiny models on this shared 2-core machine run 3-5x faster with one intra-op thread than with two
# threads fighting other processes (a 2-step tiny pipeline: 0.18 s vs 0.8 s under load). Set before
# anything imports torch; override by exporting OMP_NUM_THREADS. torch itself is not imported here,
# so tests that check "the runtime does not import torch" stay meaningful.
os.environ.setdefault("OMP_NUM_THREADS", "1")

_PRESETS = {
    "sd15": "tiny-sd15-controlnet",
    "sdxl": "tiny-sdxl-controlnet",
    "sd_turbo": "tiny-sd-turbo",
}


def _saved(factory: pytest.TempPathFactory, key: str) -> tuple[Path, dict[str, Any]]:
    from sdkiln.stages.presets import save_preset

    out = factory.mktemp(f"preset-{key}") / "pipeline"
    manifest = save_preset(_PRESETS[key], out, seed=0)
    return out, manifest


@pytest.fixture(scope="session")
def _tiny_sd15(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    return _saved(tmp_path_factory, "sd15")


@pytest.fixture(scope="session")
def _tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    return _saved(tmp_path_factory, "sdxl")


@pytest.fixture(scope="session")
def _tiny_sd_turbo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    return _saved(tmp_path_factory, "sd_turbo")


@pytest.fixture(scope="session")
def tiny_sd15_dir(_tiny_sd15: tuple[Path, dict[str, Any]]) -> Path:
    """Tiny SD 1.5 pipeline folder with scribble + canny ControlNets and TAESD (``vae_tiny/``)."""
    return _tiny_sd15[0]


@pytest.fixture(scope="session")
def tiny_sd15_artifact(_tiny_sd15: tuple[Path, dict[str, Any]]) -> InputArtifact:
    """``tiny_sd15_dir`` as a stage input (``ctx.inputs["model"]``)."""
    return InputArtifact(step_id="tiny_sd15", path=_tiny_sd15[0], manifest=_tiny_sd15[1])


@pytest.fixture(scope="session")
def tiny_sdxl_dir(_tiny_sdxl: tuple[Path, dict[str, Any]]) -> Path:
    """Tiny SDXL pipeline folder (two text encoders, pooled embeds + time ids), canny ControlNet, TAESD."""
    return _tiny_sdxl[0]


@pytest.fixture(scope="session")
def tiny_sdxl_artifact(_tiny_sdxl: tuple[Path, dict[str, Any]]) -> InputArtifact:
    """``tiny_sdxl_dir`` as a stage input."""
    return InputArtifact(step_id="tiny_sdxl", path=_tiny_sdxl[0], manifest=_tiny_sdxl[1])


@pytest.fixture(scope="session")
def tiny_sd_turbo_dir(_tiny_sd_turbo: tuple[Path, dict[str, Any]]) -> Path:
    """Tiny SD-Turbo pipeline folder (1-step Euler ancestral, no guidance)."""
    return _tiny_sd_turbo[0]


@pytest.fixture(scope="session")
def tiny_sd_turbo_artifact(_tiny_sd_turbo: tuple[Path, dict[str, Any]]) -> InputArtifact:
    """``tiny_sd_turbo_dir`` as a stage input."""
    return InputArtifact(step_id="tiny_sd_turbo", path=_tiny_sd_turbo[0], manifest=_tiny_sd_turbo[1])
