"""Which NVIDIA GPU and TensorRT this machine has, and how engines built for them are named and cached.

TensorRT engines run only on the GPU generation (compute capability) and the TensorRT version they were
built with, so both go into every engine's name, cache key and manifest entry::

    tag = engine_tag((9, 0), "10.8.0.43")      # "sm90-trt10.8.0.43"
    engine_file(tag, "unet")                    # "sm90-trt10.8.0.43/unet.plan"

Nothing here imports CUDA or TensorRT: the GPU comes from ``nvidia-smi`` (or an already-imported CUDA
PyTorch), the TensorRT version from the installed distributions' metadata. Both the ``build_tensorrt``
stage and the runtime's TensorRT backend use these, so a bundle's engines and a user's engine cache
agree on names. The messages for a missing GPU or TensorRT live here too, so every entry point says the
same thing.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sdkiln.runtime.contract.errors import UserError

logger = logging.getLogger(__name__)

# pip distributions that carry the TensorRT Python bindings, newest naming first.
TENSORRT_DISTRIBUTIONS = (
    "tensorrt",
    "tensorrt-cu13",
    "tensorrt-cu12",
    "tensorrt-cu13-bindings",
    "tensorrt-cu12-bindings",
    "tensorrt-cu11",
)

# The lowest compute capability on which TensorRT builds each precision with tensor cores.
# fp16/int8: Turing (7.5) and newer, which is also TensorRT 10's floor; fp8: Ada (8.9) and Hopper (9.0).
PRECISION_MIN_CC: dict[str, tuple[int, int]] = {"fp16": (7, 5), "int8": (7, 5), "fp8": (8, 9)}

INSTALL_TENSORRT = (
    "install TensorRT's Python package on a machine with an NVIDIA GPU: `pip install tensorrt-cu12` "
    "(or tensorrt-cu13 for CUDA 13 drivers; the libraries come from NVIDIA's own package index, see "
    "NVIDIA's TensorRT installation guide) and `pip install 'sdkiln[nvidia]'` for the CUDA runtime bindings"
)
INSTALL_GPU = (
    "this needs an NVIDIA GPU (compute capability 7.5 or newer) with its driver: `nvidia-smi` must list "
    "it. On a machine without one, build everything else (ONNX, TensorRT-ready ONNX) and build the "
    "engines where the GPU is, or let the runtime build them on first use"
)

_SM = re.compile(r"^(?:sm_?)?(\d+)(?:\.(\d))?$")
_TAG = re.compile(r"^sm(\d+)-trt([0-9][0-9.]*)$")


@dataclass(frozen=True)
class Gpu:
    """One NVIDIA GPU as ``nvidia-smi`` (or CUDA) reports it."""

    index: int
    name: str
    compute_capability: tuple[int, int]
    memory_mib: int = 0

    @property
    def sm(self) -> str:
        return sm_name(self.compute_capability)


def sm_name(cc: tuple[int, int]) -> str:
    """``(9, 0)`` -> ``"sm90"``; ``(12, 0)`` -> ``"sm120"``."""
    return f"sm{cc[0]}{cc[1]}"


def parse_sm(text: str) -> tuple[int, int]:
    """``"sm90"``, ``"sm_90"``, ``"9.0"``, ``"sm120"`` -> a compute capability; ValueError otherwise."""
    t = text.strip().lower()
    m = _SM.match(t)
    if not m:
        raise ValueError(f"not a compute capability: {text!r} (write it as sm90 or 9.0)")
    if m.group(2) is not None:  # "9.0"
        return int(m.group(1)), int(m.group(2))
    digits = m.group(1)
    if len(digits) < 2:
        raise ValueError(f"not a compute capability: {text!r} (write it as sm90 or 9.0)")
    return int(digits[:-1]), int(digits[-1])


def engine_tag(cc: tuple[int, int], trt_version: str) -> str:
    """The folder name engines for one GPU generation and TensorRT version live in."""
    if not re.fullmatch(r"[0-9][0-9.]*", trt_version):
        raise ValueError(f"not a TensorRT version: {trt_version!r}")
    return f"{sm_name(cc)}-trt{trt_version}"


def parse_engine_tag(tag: str) -> tuple[tuple[int, int], str]:
    """The inverse of ``engine_tag``: ``"sm90-trt10.8.0.43"`` -> ``((9, 0), "10.8.0.43")``."""
    m = _TAG.match(tag)
    if not m:
        raise ValueError(f"not an engine tag: {tag!r} (expected sm<NN>-trt<version>)")
    return parse_sm("sm" + m.group(1)), m.group(2)


def engine_file(tag: str, component: str) -> str:
    """Where a component's engine lives inside an engine folder: ``<tag>/<component>.plan``."""
    if "/" in component or component.startswith("."):
        raise ValueError(f"not a component name: {component!r}")
    return f"{tag}/{component}.plan"


def check_precision(precision: str, cc: tuple[int, int]) -> None:
    """UserError if this GPU generation has no tensor-core kernels for ``precision``."""
    need = PRECISION_MIN_CC.get(precision)
    if need is None:
        raise UserError(
            f"unknown TensorRT precision {precision!r}; choose from {', '.join(PRECISION_MIN_CC)}"
        )
    if cc < need:
        raise UserError(
            f"precision {precision} needs compute capability {need[0]}.{need[1]} or newer "
            f"({sm_name(need)}); this GPU is {cc[0]}.{cc[1]} ({sm_name(cc)}). "
            f"Use precision: fp16{' or int8' if cc >= PRECISION_MIN_CC['int8'] else ''}"
        )


# --------------------------------------------------------------------------------------------------
# Probing the machine (no CUDA or TensorRT import)


def tensorrt_version() -> str | None:
    """The installed TensorRT Python bindings' version, read from package metadata; None if absent."""
    for dist in TENSORRT_DISTRIBUTIONS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist)
    mod = sys.modules.get("tensorrt")  # installed outside pip (a tarball's wheel on PYTHONPATH)
    return getattr(mod, "__version__", None) if mod is not None else None


def _parse_smi(text: str) -> list[Gpu]:
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3:
            continue
        try:
            cc = parse_sm(parts[2])
        except ValueError:
            continue
        mem = int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else 0
        gpus.append(Gpu(int(parts[0]), parts[1], cc, mem))
    return gpus


def detect_gpus() -> list[Gpu]:
    """The NVIDIA GPUs this process can see: ``nvidia-smi`` first, then a CUDA PyTorch if one is imported.

    ``CUDA_VISIBLE_DEVICES`` is honoured the way CUDA does for plain indices (``""`` or ``-1``: none).
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return []
    gpus: list[Gpu] = []
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=index,name,compute_cap,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            if out.returncode == 0:
                gpus = _parse_smi(out.stdout)
            else:
                logger.debug("nvidia-smi exited %d: %s", out.returncode, out.stderr.strip())
        except (OSError, subprocess.TimeoutExpired) as e:
            logger.debug("nvidia-smi failed: %s", e)
    if not gpus and "torch" in sys.modules:
        torch = sys.modules["torch"]
        with contextlib.suppress(Exception):
            if torch.cuda.is_available():
                for i in range(torch.cuda.device_count()):
                    p = torch.cuda.get_device_properties(i)
                    gpus.append(Gpu(i, p.name, (p.major, p.minor), p.total_memory // (1 << 20)))
            return gpus
    if visible and gpus:
        keep = [int(v) for v in visible.split(",") if v.strip().isdigit()]
        if keep:
            gpus = [g for g in gpus if g.index in keep]
    return gpus


def require_gpu(device: int = 0) -> Gpu:
    """The GPU at ``device`` (CUDA's numbering), or a UserError saying what is missing and what to do."""
    gpus = detect_gpus()
    if not gpus:
        raise UserError(f"no NVIDIA GPU found: {INSTALL_GPU}")
    if device >= len(gpus):
        raise UserError(f"GPU {device} does not exist; this machine has {len(gpus)} (0..{len(gpus) - 1})")
    return gpus[device]


def require_tensorrt():
    """``import tensorrt``, or a UserError saying how to install it (never an ImportError traceback)."""
    try:
        import tensorrt
    except ImportError as e:
        raise UserError(f"TensorRT is not installed ({e}); {INSTALL_TENSORRT}") from e
    except OSError as e:  # the bindings are there but a shared library (libnvinfer, libnvonnxparser) is not
        raise UserError(
            f"TensorRT is installed but cannot load its libraries ({e}); {INSTALL_TENSORRT}"
        ) from e
    major = int(str(getattr(tensorrt, "__version__", "0")).split(".")[0] or 0)
    if major < 10:
        raise UserError(
            f"TensorRT {tensorrt.__version__} is too old: sdkiln builds with the TensorRT 10+ API "
            "(named tensors, execute_async_v3, strongly typed networks); upgrade it"
        )
    return tensorrt


# --------------------------------------------------------------------------------------------------
# The user's engine cache


def user_cache_dir() -> Path:
    """``$SDKILN_TRT_CACHE``, else ``$XDG_CACHE_HOME/sdkiln/trt`` (default ``~/.cache/sdkiln/trt``)."""
    env = os.environ.get("SDKILN_TRT_CACHE")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "sdkiln" / "trt"


def timing_cache_path(root: Path, tag: str) -> Path:
    """One timing cache per GPU generation and TensorRT version, shared by every build there."""
    return root / "timing" / f"{tag}.cache"


def cached_engine_dir(root: Path, onnx_sha256: str, tag: str, settings_digest: str) -> Path:
    """Where the runtime keeps an engine it built on first use: keyed by the graph's sha256 (its
    ``model.onnx`` and external data), the GPU + TensorRT tag, and the build settings' digest."""
    return root / "engines" / tag / f"{onnx_sha256[:24]}-{settings_digest[:12]}"
