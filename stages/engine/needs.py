"""What a stage needs of the machine (network, an NVIDIA GPU, macOS, TensorRT), checked before it runs.

A stage declares its needs (``Stage.needs``); the engine asks ``unmet`` before running a step that is
not cached and refuses with one message naming what is missing and how to get it, before any work.
Each probe is cheap and imports nothing heavy (torch only if it is installed, for the GPU check).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sdkiln.stages.engine.core import Stage

_OFF = {"1", "true", "yes", "on"}


def _offline() -> str | None:
    for var in ("SDKILN_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _OFF:
            return f"network: {var} is set (unset it to allow downloads and uploads)"
    return None


def _gpu() -> str | None:
    from sdkiln.runtime.backends import nvidia

    return None if nvidia.detect_gpus() else f"gpu: no NVIDIA GPU found; {nvidia.INSTALL_GPU}"


def _macos() -> str | None:
    if platform.system() == "Darwin":
        return None
    return f"macos: this step runs only on macOS (this machine runs {platform.system()})"


def _tensorrt() -> str | None:
    from sdkiln.runtime.backends import nvidia
    from sdkiln.runtime.backends.cuda_rt import INSTALL_CUDA_BINDINGS, _import_cudart
    from sdkiln.runtime.contract.errors import UserError

    try:
        nvidia.require_tensorrt()
    except UserError as e:
        return f"tensorrt: {e}"
    try:
        _import_cudart()
    except UserError:
        return f"tensorrt: the CUDA runtime bindings are missing; {INSTALL_CUDA_BINDINGS}"
    return None


PROBES: dict[str, Callable[[], str | None]] = {
    "network": _offline,
    "gpu": _gpu,
    "macos": _macos,
    "tensorrt": _tensorrt,
}


def unmet(needs: Iterable[str]) -> list[str]:
    """One line per need this machine does not meet (empty: all met). Unknown needs are reported too."""
    out = []
    for need in sorted(needs):
        probe = PROBES.get(need)
        if probe is None:
            out.append(f"{need}: unknown need (known: {', '.join(PROBES)})")
        elif (why := probe()) is not None:
            out.append(why)
    return out


unmet_needs = unmet


def check_needs(stage: Stage, step_id: str | None = None) -> None:
    """Raise a UserError listing what ``stage`` needs and this machine lacks; return if nothing."""
    from sdkiln.runtime.contract.errors import UserError

    problems = unmet(stage.needs)
    if problems:
        who = f"step {step_id} ({stage.name})" if step_id else f"stage {stage.name}"
        raise UserError(f"{who} cannot run on this machine:\n  " + "\n  ".join(problems))
