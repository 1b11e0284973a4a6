"""A tiny bundle for the benchmark tests, built by the real engine and stages (offline, seconds).

Only what ``sdkiln bench`` needs is exported: the components one task (sketch) runs, so the build and
the bench stay well under a minute on a shared 2-core machine.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

RECIPE = """
name: bench-tiny
description: tiny SD 1.5 + scribble ControlNet, LCM-LoRA fused, ONNX fp32 of the sketch components
steps:
  - id: base
    stage: load_pipeline
    params: {source: preset, preset: tiny-sd15-controlnet, seed: 0}
  - id: fused
    stage: fuse_lora
    inputs: {model: base}
    params:
      loras:
        - {source: preset, format: peft, kind: lcm, scale: 1.0, seed: 0}
  - id: onnx
    stage: export_onnx
    inputs: {model: fused}
    params:
      precision: fp32
      components: [text_encoder, unet, controlnet.scribble, vae_decoder]
      parity: {batch_sizes: [1], image_sizes: [64]}
"""


@pytest.fixture(scope="session")
def bench_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only bundle: ``torch/fused`` (tiny preset + LCM-LoRA) and ``onnx/fp32``."""
    pytest.importorskip("torch", reason="building the tiny bundle needs the build extra (torch, diffusers)")
    from sdkiln.stages.engine import build

    root = tmp_path_factory.mktemp("bench")
    recipe = root / "bench-tiny.yaml"
    recipe.write_text(textwrap.dedent(RECIPE).lstrip())
    return build(recipe, root / "artifacts").bundle
