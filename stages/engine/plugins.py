"""Stages from plugins: modules named in ``SDKILN_STAGE_PLUGINS`` (``package.module:ATTR``, comma-separated,
ATTR a dict or list of Stage; default ATTR ``STAGES``) join the built-in stages.

A plugin may add stages but never replace a built-in one: a name collision is a UserError naming both.
Every loaded plugin stage is logged.
"""

from __future__ import annotations

import importlib
import logging
import os

from sdkiln.runtime.contract.errors import UserError
from sdkiln.stages.engine.core import Stage

logger = logging.getLogger(__name__)

ENV = "SDKILN_STAGE_PLUGINS"


def load_plugins(spec: str) -> dict[str, tuple[Stage, str]]:
    """{stage name: (stage, the plugin entry it came from)} for a ``SDKILN_STAGE_PLUGINS`` value."""
    stages: dict[str, tuple[Stage, str]] = {}
    for entry in filter(None, (s.strip() for s in spec.split(","))):
        module_name, _, attr = entry.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attr or "STAGES")
        except (ImportError, AttributeError) as e:
            raise UserError(f"{ENV}: cannot load {entry!r}: {e}") from e
        for stage in obj.values() if isinstance(obj, dict) else obj:
            if not isinstance(stage, Stage):
                raise UserError(f"{ENV}: {entry!r} holds {type(stage).__name__}, not a Stage")
            if stage.name in stages:
                raise UserError(
                    f"{ENV}: stage {stage.name!r} is defined by both {stages[stage.name][1]} and {entry}"
                )
            stages[stage.name] = (stage, entry)
    return stages


def registry(builtin: dict[str, Stage], spec: str | None = None) -> dict[str, Stage]:
    """The built-in stages plus the plugins named in ``spec`` (default: ``$SDKILN_STAGE_PLUGINS``)."""
    plugins = load_plugins(os.environ.get(ENV, "") if spec is None else spec)
    clash = sorted(set(plugins) & set(builtin))
    if clash:
        raise UserError(
            f"{ENV}: plugin stage(s) {', '.join(clash)} would replace built-in stage(s) of the same name "
            f"(from {', '.join(plugins[c][1] for c in clash)}); rename them"
        )
    for name, (_, entry) in sorted(plugins.items()):
        logger.info("plugin stage %s loaded from %s", name, entry)
    return {**builtin, **{name: stage for name, (stage, _) in plugins.items()}}
