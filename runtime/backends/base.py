"""What every backend component is: a callable over named numpy arrays that checks them against its spec.

The spec is the manifest's per-component I/O table (contract: names, dtypes, shapes with static ints and
named dynamic axes such as ``batch``, ``latent_height`` or ``latent_height * 8``). ``check_inputs``
refuses unknown or missing names, wrong dtypes and wrong shapes with one message that says which input
and what was expected, before anything reaches the model (Apple's ``_verify_inputs`` idea).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from sdkiln.stages.core import UserError

__all__ = ["Backend", "Component", "ComponentIO", "InputSpecError", "TensorSpec", "check_inputs"]


class InputSpecError(UserError):
    """An input does not match the component's I/O spec (name, dtype or shape)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, int32, int64
    shape: tuple[int | str, ...]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(name=str(d["name"]), dtype=str(d.get("dtype", "float32")), shape=tuple(d["shape"]))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ComponentIO:
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> ComponentIO:
        return cls(
            inputs={t["name"]: TensorSpec.from_dict(t) for t in entry.get("inputs", [])},
            outputs={t["name"]: TensorSpec.from_dict(t) for t in entry.get("outputs", [])},
        )

    def resolve(self, name: str, bindings: dict[str, int], outputs: bool = False) -> tuple[int, ...]:
        """The concrete shape of input (or output) ``name`` for the given axis sizes."""
        spec = (self.outputs if outputs else self.inputs)[name]
        return tuple(_eval_dim(d, bindings) for d in spec.shape)


class Component(Protocol):
    """One model component (text encoder, UNet, ControlNet, VAE half) on some backend."""

    name: str
    io: ComponentIO

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    """The components of one bundle section, ready to run."""

    name: str  # "onnx", "torch", "coreml"
    description: str  # what runs them, e.g. "onnxruntime 1.32 (CPUExecutionProvider)"

    def has(self, component: str) -> bool: ...

    def component(self, component: str) -> Component: ...


_EXPR = re.compile(r"^\s*(\w+)\s*(?:([*/])\s*(\d+))?\s*$")


def _eval_dim(dim: int | str, bindings: dict[str, int]) -> int:
    if isinstance(dim, int):
        return dim
    m = _EXPR.match(dim)
    if not m or m.group(1) not in bindings:
        raise KeyError(dim)
    value = bindings[m.group(1)]
    if m.group(2) == "*":
        return value * int(m.group(3))
    if m.group(2) == "/":
        return value // int(m.group(3))
    return value


def check_inputs(component: str, io: ComponentIO, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """Raise InputSpecError unless ``feeds`` matches ``io.inputs`` exactly; returns the axis bindings.

    A named axis takes its size from its first plain occurrence (``batch``) and every other use must
    agree; expressions (``latent_height * 8``) are checked against the bound size.
    """
    unknown = sorted(set(feeds) - set(io.inputs))
    if unknown:
        raise InputSpecError(
            f"{component}: unknown input(s) {', '.join(unknown)}; it takes {', '.join(io.inputs) or 'nothing'}"
        )
    missing = [n for n in io.inputs if n not in feeds]
    if missing:
        raise InputSpecError(f"{component}: missing input(s) {', '.join(missing)}")
    bindings: dict[str, int] = {}
    problems: list[str] = []
    for name, spec in io.inputs.items():
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
            elif _EXPR.match(dim) and _EXPR.match(dim).group(2) is None:  # type: ignore[union-attr]
                axis = dim.strip()
                if bindings.setdefault(axis, size) != size:
                    problems.append(
                        f"{name}: axis {axis!r} is {size} here but {bindings[axis]} elsewhere in this call"
                    )
                    break
    # Expressions last, once every plain axis they refer to is bound.
    for name, spec in io.inputs.items():
        arr = feeds[name]
        if not isinstance(arr, np.ndarray) or arr.ndim != len(spec.shape):
            continue
        for dim, size in zip(spec.shape, arr.shape, strict=True):
            if isinstance(dim, str) and (m := _EXPR.match(dim)) and m.group(2) is not None:
                base = m.group(1)
                if base not in bindings:
                    factor = int(m.group(3))
                    # An expression over an axis nothing else binds: it must at least divide evenly.
                    if m.group(2) == "*" and size % factor:
                        problems.append(f"{name}: size {size} for {dim!r} is not a multiple of {factor}")
                    continue
                want = _eval_dim(dim, bindings)
                if size != want:
                    problems.append(f"{name}: shape {tuple(arr.shape)}, expected {dim} = {want} on that axis")
    if problems:
        raise InputSpecError(f"{component}: inputs do not match its I/O spec: " + "; ".join(problems))
    return bindings


def _fmt(shape: tuple[int | str, ...]) -> str:
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
