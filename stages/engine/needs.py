"""What a stage needs of the machine (network, an NVIDIA GPU, macOS, TensorRT), checked before it runs.

A stage declares its needs (``Stage.needs``); the engine asks ``unmet`` before running a step that is
not cached and refuses with one message naming what is missing and how to get it, before any work.
Each probe is cheap and imports nothing heavy (torch only if it is installed, for the GPU check).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
from collections.abc import Callable, Iterable

_OFF = {"1", "true", "yes", "on"}


def _offline() -> str | None:
    for var in ("SDKILN_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _OFF:
            return f"network: {var} is set (unset it to allow downloads and uploads)"
    return None


def _gpu() -> str | None:
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            return None
        return (
            f"gpu: no CUDA device is visible to torch {torch.__version__} (an NVIDIA GPU with its driver and "
            "a CUDA build of PyTorch are needed)"
        )
    if shutil.which("nvidia-smi") is not None:
        return None
    return "gpu: no NVIDIA GPU found (no CUDA PyTorch and no nvidia-smi)"


def _macos() -> str | None:
    if platform.system() == "Darwin":
        return None
    return f"macos: this step runs only on macOS (this machine runs {platform.system()})"


def _tensorrt() -> str | None:
    if importlib.util.find_spec("tensorrt") is not None:
        return None
    return (
        "tensorrt: the TensorRT Python package is not installed (pip install tensorrt "
        "--extra-index-url https://pypi.nvidia.com, on a machine with an NVIDIA GPU)"
    )


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
