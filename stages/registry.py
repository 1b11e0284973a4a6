"""The explicit registry of stages: one import per stage module, one entry per stage.

Extra stages (a user's own, or the engine tests') come from modules named in the environment variable
``SDKILN_STAGE_PLUGINS`` (``package.module:ATTR``, comma-separated, ATTR a dict or list of Stage).
"""

from __future__ import annotations

import importlib
import os

from sdkiln.stages.core import Stage, UserError

# One line per stage module. Stage modules import nothing heavy at module level.
_MODULES = [
    "load_pipeline",
    "fuse_lora",
    "quantize_torch",
    "parity",
    "export_coreml",
    "palettize_coreml",
    "publish_hub",
    "export_onnx",
    "optimize_onnx",
    "quantize_onnx",
    "prepare_tensorrt",
]


def _builtin() -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    for name in _MODULES:
        stage = importlib.import_module(f"sdkiln.stages.{name}").STAGE
        stages[stage.name] = stage
    return stages


def _plugins(spec: str) -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    for entry in filter(None, (s.strip() for s in spec.split(","))):
        module_name, _, attr = entry.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attr or "STAGES")
        except (ImportError, AttributeError) as e:
            raise UserError(f"SDKILN_STAGE_PLUGINS: cannot load {entry!r}: {e}") from e
        for stage in obj.values() if isinstance(obj, dict) else obj:
            stages[stage.name] = stage
    return stages


def registry() -> dict[str, Stage]:
    """All stages by name: the built-in ones plus any plugins named in SDKILN_STAGE_PLUGINS."""
    stages = _builtin()
    stages.update(_plugins(os.environ.get("SDKILN_STAGE_PLUGINS", "")))
    return stages
