"""What every backend is: components callable over named numpy arrays, checked against their spec.

The spec types, the shape grammar and the input checks are the contract's (``contract.specs``); this
module only states the two protocols the denoising loop is written against.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from sdkiln.runtime.contract.specs import ComponentIO

__all__ = ["Backend", "Component"]


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
