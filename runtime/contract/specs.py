"""I/O spec types and the shape grammar: what every component takes and gives, checked before it runs.

A spec names each input and output with its numpy dtype and its shape: static ints and named dynamic
axes (``batch``, ``height``, ``width``, ``latent_height``, ``latent_width``) or expressions over one
axis (``latent_height * 8``, ``latent_height / 2``). ``check_inputs`` refuses unknown or missing names,
wrong dtypes and wrong shapes with one message that says which input and what was expected, before
anything reaches the model (the idea of Apple's ``_verify_inputs``).

Example::

    io = ComponentIO.from_manifest(entry)            # entry: a manifest component's dict
    bindings = check_inputs("unet", io, feeds)       # {"batch": 2, "latent_height": 64, ...}
    resolve_shape(["batch", 4, "latent_height / 2"], {"batch": 1, "latent_height": 64})  # [1, 4, 32]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdkiln.runtime.contract.errors import InputSpecError

__all__ = [
    "AXES",
    "ComponentIO",
    "TensorSpec",
    "bind_axes",
    "cast_feeds",
    "check_inputs",
    "eval_dim",
    "resolve_shape",
]

# The dynamic axes of the contract.
AXES = ("batch", "height", "width", "latent_height", "latent_width")

Dim = int | str
_EXPR = re.compile(r"^\s*(\w+)\s*(?:([*/])\s*(\d+))?\s*$")


def eval_dim(dim: Dim, bindings: dict[str, int]) -> int:
    """One dimension for concrete axis sizes: an int as it is, ``axis`` or ``axis * k`` / ``axis / k``
    evaluated. ``KeyError`` on an unbound axis, ``ValueError`` on anything else."""
    if isinstance(dim, int):
        return dim
    m = _EXPR.match(dim)
    if not m:
        raise ValueError(f"cannot evaluate dimension {dim!r}")
    value = bindings[m.group(1)]
    if m.group(2) == "*":
        return value * int(m.group(3))
    if m.group(2) == "/":
        return value // int(m.group(3))
    return value


def resolve_shape(shape: list[Dim] | tuple[Dim, ...], bindings: dict[str, int]) -> list[int]:
    """Evaluate a spec shape with concrete axis sizes: ``["batch", 4, "latent_height / 2"]`` with
    ``{"batch": 1, "latent_height": 64}`` gives ``[1, 4, 32]``."""
    return [eval_dim(d, bindings) for d in shape]


def bind_axes(batch: int, height: int, width: int, vae_scale_factor: int = 8) -> dict[str, int]:
    """Concrete sizes of the contract's dynamic axes for a batch and an image size in pixels."""
    return {
        "batch": batch,
        "height": height,
        "width": width,
        "latent_height": height // vae_scale_factor,
        "latent_width": width // vae_scale_factor,
    }


@dataclass(frozen=True)
class TensorSpec:
    """One input or output. ``optional`` inputs may be left out of a call; ``default`` is their value
    (a Core ML ControlNet's ``conditioning_scale``, an ONNX UNet's zero ControlNet residuals)."""

    name: str
    dtype: str  # numpy dtype name: float32, float16, int32, int64
    shape: tuple[Dim, ...]
    optional: bool = False
    default: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(
            name=str(d["name"]),
            dtype=str(d.get("dtype", "float32")),
            shape=tuple(d["shape"]),
            optional=bool(d.get("optional", False)),
            default=d.get("default"),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.optional:
            out["optional"] = True
        if self.default is not None:
            out["default"] = self.default
        return out


@dataclass(frozen=True)
class ComponentIO:
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]

    @classmethod
    def from_manifest(cls, entry: Any) -> ComponentIO:
        """From a manifest component (a dict or a ``ComponentEntry``)."""
        ins = entry.get("inputs", []) if isinstance(entry, dict) else entry.inputs
        outs = entry.get("outputs", []) if isinstance(entry, dict) else entry.outputs
        conv = [t if isinstance(t, TensorSpec) else TensorSpec.from_dict(t) for t in ins]
        conv_out = [t if isinstance(t, TensorSpec) else TensorSpec.from_dict(t) for t in outs]
        return cls(inputs={t.name: t for t in conv}, outputs={t.name: t for t in conv_out})

    def resolve(self, name: str, bindings: dict[str, int], outputs: bool = False) -> tuple[int, ...]:
        """The concrete shape of input (or output) ``name`` for the given axis sizes."""
        spec = (self.outputs if outputs else self.inputs)[name]
        return tuple(eval_dim(d, bindings) for d in spec.shape)


def check_inputs(component: str, io: ComponentIO, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """Raise InputSpecError unless ``feeds`` matches ``io.inputs``; returns the axis bindings.

    Every required input must be fed; optional ones may be left out. A named axis takes its size from
    its first plain occurrence (``batch``) and every other use must agree; expressions
    (``latent_height * 8``) are checked against the bound size.
    """
    unknown = sorted(set(feeds) - set(io.inputs))
    if unknown:
        raise InputSpecError(
            f"{component}: unknown input(s) {', '.join(unknown)}; it takes {', '.join(io.inputs) or 'nothing'}"
        )
    missing = [n for n, s in io.inputs.items() if n not in feeds and not s.optional]
    if missing:
        raise InputSpecError(f"{component}: missing input(s) {', '.join(missing)}")
    fed = {n: s for n, s in io.inputs.items() if n in feeds}
    bindings: dict[str, int] = {}
    problems: list[str] = []
    for name, spec in fed.items():
        arr = feeds[name]
        if not isinstance(arr, np.ndarray):
            problems.append(f"{name}: expected a numpy array, got {type(arr).__name__}")
            continue
        if arr.dtype != np.dtype(spec.dtype):
            problems.append(f"{name}: dtype {arr.dtype}, expected {spec.dtype}")
        if arr.ndim != len(spec.shape):
            problems.append(
                f"{name}: shape {tuple(arr.shape)} has rank {arr.ndim}, expected {_fmt(spec.shape)}"
            )
            continue
        for dim, size in zip(spec.shape, arr.shape, strict=True):
            if isinstance(dim, int):
                if size != dim:
                    problems.append(f"{name}: shape {tuple(arr.shape)}, expected {_fmt(spec.shape)}")
                    break
            elif (m := _EXPR.match(dim)) and m.group(2) is None:
                axis = dim.strip()
                if bindings.setdefault(axis, size) != size:
                    problems.append(
                        f"{name}: axis {axis!r} is {size} here but {bindings[axis]} elsewhere in this call"
                    )
                    break
    # Expressions last, once every plain axis they refer to is bound.
    for name, spec in fed.items():
        arr = feeds[name]
        if not isinstance(arr, np.ndarray) or arr.ndim != len(spec.shape):
            continue
        for dim, size in zip(spec.shape, arr.shape, strict=True):
            if isinstance(dim, str) and (m := _EXPR.match(dim)) and m.group(2) is not None:
                if m.group(1) not in bindings:
                    factor = int(m.group(3))
                    # An expression over an axis nothing else binds: it must at least divide evenly.
                    if m.group(2) == "*" and size % factor:
                        problems.append(f"{name}: size {size} for {dim!r} is not a multiple of {factor}")
                    continue
                want = eval_dim(dim, bindings)
                if size != want:
                    problems.append(f"{name}: shape {tuple(arr.shape)}, expected {dim} = {want} on that axis")
    if problems:
        raise InputSpecError(f"{component}: inputs do not match its I/O spec: " + "; ".join(problems))
    return bindings


def _fmt(shape: tuple[Dim, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def cast_feeds(io: ComponentIO, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cast each array to the dtype its spec declares (float16 halves of an fp16 export, int32 ids).

    For callers that build feeds in float32 (the denoising loop); the component still checks them.
    """
    out = {}
    for name, arr in feeds.items():
        spec = io.inputs.get(name)
        out[name] = arr if spec is None or arr.dtype == np.dtype(spec.dtype) else arr.astype(spec.dtype)
    return out
