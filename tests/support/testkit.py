"""What the tests share that is not a fixture: running a stage the way the engine does, turning its
output into the next stage's input, building a recipe through the real engine.

    built = run_stage(STAGE, params, {"model": artifact}, tmp_path)
    built.ctx.metrics["parity"]            # what the stage recorded
    next_input = built.artifact("onnx")    # an InputArtifact with the manifest the engine would write
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdkiln.stages.engine import artifact_of, execute, folder_artifact
from sdkiln.stages.engine.core import InputArtifact, Stage, StageContext

__all__ = [
    "REPO",
    "RECIPES",
    "Built",
    "build_recipe",
    "folder_artifact",
    "make_bundle_of",
    "run_stage",
    "step_artifacts",
]

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"


@dataclass
class Built:
    """A stage run outside a build: its context (metrics, components, model facts, details) and folder."""

    ctx: StageContext
    out: Path

    def __getattr__(self, name: str) -> Any:
        # metrics, components, model, details, out_dir, params...: the context's
        return getattr(self.ctx, name)

    def artifact(self, step_id: str | None = None) -> InputArtifact:
        art = artifact_of(self.ctx)
        if step_id is not None:
            art.step_id = step_id
        return art


def run_stage(
    stage: Stage,
    params: Any,
    inputs: dict[str, InputArtifact],
    root: Path,
    recipe_dir: Path | None = None,
    step_id: str | None = None,
) -> Built:
    """Run ``stage`` with the engine's ``execute``: a fresh output folder and scratch folder under ``root``,
    params validated (a dict or the params model)."""
    out, work = root / "out", root / "work"
    out.mkdir(parents=True)
    work.mkdir()
    ctx = execute(
        stage, params, inputs, out, work, step_id=step_id or root.name, recipe_dir=recipe_dir or root
    )
    return Built(ctx, out)


def step_artifacts(bundle: Path) -> dict[str, InputArtifact]:
    """Every step of an engine-built bundle as the input a later stage would receive: the committed cache
    entries its ``build.lock.json`` names (``<artifacts>/cache/<key>``), with their manifests."""
    import json

    from sdkiln.runtime.contract.manifest import read_artifact_manifest

    lock = json.loads((bundle / "build.lock.json").read_text())
    cache = bundle.parent / "cache"
    return {
        step: InputArtifact(step, cache / st["key"], read_artifact_manifest(cache / st["key"]))
        for step, st in lock["steps"].items()
    }


def make_bundle_of(root: Path, parts: dict[str, InputArtifact], name: str | None = None) -> Path:
    """A bundle folder laid out by the engine's bundle writer from artifacts: ``{folder: artifact}``."""
    from sdkiln.stages.engine.bundle import BundlePart, write_bundle_tree

    root.mkdir(parents=True, exist_ok=True)
    write_bundle_tree(
        root,
        name=name or root.name,
        description="",
        recipe_raw={"name": name or root.name, "steps": []},
        parts=[BundlePart(folder, art.step_id, art.path, art.manifest) for folder, art in parts.items()],
        lock={"schema": 2, "recipe": name or root.name, "steps": {}},
    )
    return root


def build_recipe(text: str, root: Path, name: str = "recipe", artifacts: Path | None = None) -> Path:
    """Write a recipe under ``root`` and build it with the real engine and the built-in stages; returns
    the bundle folder."""
    from sdkiln.stages import STAGES
    from sdkiln.stages.engine import build

    recipe = root / f"{name}.yaml"
    recipe.write_text(textwrap.dedent(text).lstrip())
    return build(recipe, artifacts or root / "artifacts", stages=STAGES).bundle


# The NVIDIA path's CPU steps (the nvidia_bundle fixture; the gpu tests extend it with engine steps).
NVIDIA_SIZES = {"batch": [1, 1, 2], "height": [64, 64, 128], "width": [64, 64, 128]}
NVIDIA_PARITY = {"batch_sizes": [1], "image_sizes": [64]}


def nvidia_cpu_recipe() -> dict[str, Any]:
    lora = {"source": "preset", "format": "peft", "kind": "lcm", "scale": 1.0}
    return {
        "name": "nvidia-cpu",
        "description": "tiny-nvidia's CPU steps and a second LoRA through the same export",
        "steps": [
            {
                "id": "base",
                "stage": "load_pipeline",
                "params": {"source": "preset", "preset": "tiny-sd15-controlnet"},
            },
            {
                "id": "fused",
                "stage": "fuse_lora",
                "inputs": {"model": "base"},
                "params": {"loras": [{**lora, "seed": 0}]},
            },
            {
                "id": "onnx",
                "stage": "export_onnx",
                "inputs": {"model": "fused"},
                "params": {"parity": NVIDIA_PARITY},
            },
            {
                "id": "trt_onnx",
                "stage": "prepare_tensorrt",
                "inputs": {"onnx": "onnx", "model": "fused"},
                "params": {
                    "components": ["text_encoder", "unet", "controlnet", "vae_encoder", "vae_decoder"],
                    **NVIDIA_SIZES,
                    "parity": NVIDIA_PARITY,
                },
            },
            {
                "id": "trt_onnx_fp32",
                "stage": "prepare_tensorrt",
                "inputs": {"onnx": "onnx", "model": "fused"},
                "params": {
                    "precision": "fp32",
                    "components": ["unet"],
                    **NVIDIA_SIZES,
                    "parity": NVIDIA_PARITY,
                },
            },
            {
                "id": "fused_b",
                "stage": "fuse_lora",
                "inputs": {"model": "base"},
                "bundle": False,
                "params": {"loras": [{**lora, "seed": 1}]},
            },
            {
                "id": "onnx_b",
                "stage": "export_onnx",
                "inputs": {"model": "fused_b"},
                "bundle": False,
                "params": {"components": ["unet"], "controlnet_residuals": True, "parity": NVIDIA_PARITY},
            },
            {
                "id": "trt_onnx_b",
                "stage": "prepare_tensorrt",
                "inputs": {"onnx": "onnx_b", "model": "fused_b"},
                "bundle": "lora-b/trt",
                "params": {"components": ["unet"], **NVIDIA_SIZES, "parity": NVIDIA_PARITY},
            },
        ],
    }
