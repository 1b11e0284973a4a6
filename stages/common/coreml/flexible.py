"""Core ML UNets and ControlNets that take batch 1 *and* batch 2, declared as batch 2.

Why batch 2 is the declared shape. Apple's Swift ``StableDiffusion`` package reads a UNet's input shape
from ``modelDescription.inputDescriptionsByName["sample"].multiArrayConstraint.shape`` (``Unet.swift``,
``latentSampleShape``), which for a flexible input is its *default* shape; it never reads the enumerated
shapes or ranges. ``StableDiffusionPipeline.generateImages`` then runs classifier-free guidance (on for
``guidanceScale >= 1``) as one batch-2 prediction when ``latentSampleShape[0] >= 2`` and as two serial
batch-1 predictions otherwise, but ``ControlNet.execute`` always builds batch-2 inputs (``t`` of shape
``[2]``, the control image stacked twice) and hands its batch-2 residuals to the UNet even in the serial
path; SDXL (``StableDiffusionXLPipeline``) always feeds batch 2. With ``guidanceScale < 1`` the UNet
gets batch 1. So: default (declared) shape batch 2, so that guidance and every ControlNet call are one
batch-2 prediction, and batch 1 accepted for guidance-free sampling (Swift with ``guidanceScale < 1``;
sdkiln's own runtime for LCM / SD-Turbo).

How. ``EnumeratedShapes`` (every shape can run on the Neural Engine) are allowed on more than one input
only from the iOS 18 / macOS 15 model format (coremltools refuses them below); for older targets each
batch-carrying input gets ``RangeDim(1, 2, default=2)``, where Core ML runs the default shape on the
Neural Engine and others on the GPU or CPU (Apple's Core ML engineers on the developer forums,
thread 724930). Converting with a symbolic batch needs two model-side changes, both exact:

- ``BatchGroupNorm`` computes group norm with reshapes to the input's own traced batch: coremltools' own
  ``group_norm`` lowering builds a constant shape holding the symbolic batch and fails ("Cannot add const
  [is0, ...]"), and a ``-1`` batch would give the result a new batch symbol;
- the split-einsum attention reshapes its context to the query's batch (``tie_batches``): the converter
  draws a fresh batch symbol at many ops (``tile``, broadcasting ``add``), and Core ML's ``einsum``
  refuses operands with two different batch symbols. All inputs also share one batch symbol, and the
  wrappers reshape every input to ``sample``'s batch.

Core ML cannot run a model on Linux; ``program_problems`` checks what can be checked here: the
converted program's outputs keep a symbolic batch (a batch baked in as a constant would show as a static
one), and ``accepted_batches`` reads the flexible shapes back from the package's protobuf.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdkiln.stages.common.coreml.io import save_package

logger = logging.getLogger(__name__)

# The batch sizes a flexible UNet/ControlNet takes; the first is its declared (default) shape.
BATCH_SIZES = (2, 1)
# Model formats where several inputs may have enumerated shapes (coremltools' iOS 18 opset).
ENUMERATED_TARGETS = ("iOS18", "macOS15")


class BatchGroupNorm(nn.Module):
    """``nn.GroupNorm`` over (B, C, H, W) written with plain reshapes whose batch is the input's own
    (traced as a size, so the converted program keeps the batch symbol); same parameters, same names,
    same numbers to float rounding."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.num_groups = norm.num_groups
        self.num_channels = norm.num_channels
        self.eps = norm.eps
        self.affine = norm.affine
        if norm.affine:
            self.weight = norm.weight
            self.bias = norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g = x.reshape(b, self.num_groups, (c // self.num_groups) * h * w)
        mean = g.mean(dim=2, keepdim=True)
        d = g - mean
        var = (d * d).mean(dim=2, keepdim=True)
        y = (d / torch.sqrt(var + self.eps)).reshape(b, c, h, w)
        if self.affine:
            y = y * self.weight.reshape(1, -1, 1, 1) + self.bias.reshape(1, -1, 1, 1)
        return y


def batch_group_norms(module: nn.Module) -> int:
    """Replace every 4-D-input ``nn.GroupNorm`` under ``module`` by a ``BatchGroupNorm``, in place (the
    parameter names stay, so weights still read back by name). Returns how many were replaced."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.GroupNorm):
            setattr(module, name, BatchGroupNorm(child))
            n += 1
        else:
            n += batch_group_norms(child)
    return n


def tie_batches(module: nn.Module) -> int:
    """Switch on ``tie`` in every module that has one (the UNet/ControlNet wrappers, the split-einsum
    attention), in place; returns how many."""
    n = 0
    for m in module.modules():
        if hasattr(type(m), "tie"):
            m.tie = True
            n += 1
    return n


@dataclass(frozen=True)
class BatchPlan:
    """How a component's batch is declared: its sizes (the first is the default) and the Core ML way."""

    sizes: tuple[int, ...]
    mode: str  # "fixed", "enumerated" or "range"

    @property
    def flexible(self) -> bool:
        return self.mode != "fixed"

    @property
    def default(self) -> int:
        return self.sizes[0]


def batch_plan(flexible: bool, default: int, target: str) -> BatchPlan:
    """The batch declaration for a UNet/ControlNet: fixed ``default``, or batch 2 and 1 (default 2),
    enumerated on iOS 18 / macOS 15 targets and a range below."""
    if not flexible:
        return BatchPlan((default,), "fixed")
    return BatchPlan(BATCH_SIZES, "enumerated" if target in ENUMERATED_TARGETS else "range")


def input_types(inputs: Any, plan: BatchPlan, batched: set[str]) -> list[Any]:
    """coremltools input types for a component's planned inputs (``io.TensorInfo``, declared at the
    default batch): the inputs in ``batched`` get the plan's flexible batch, the others stay fixed."""
    import coremltools as ct
    import numpy as np

    # One batch dim (one symbol) for every input, so that the converter knows their batches are one.
    dim = ct.RangeDim(min(plan.sizes), max(plan.sizes), default=plan.default)
    out = []
    for t in inputs:
        default = None if t.default is None else np.full(t.shape, t.default, dtype=np.float32)
        shape: Any = t.shape
        if plan.flexible and t.name in batched:
            if default is not None:
                raise ValueError(f"{t.name}: an optional input cannot have a flexible batch")
            rest = list(t.shape[1:])
            if plan.mode == "enumerated":
                shape = ct.EnumeratedShapes(
                    shapes=[[b, *rest] for b in plan.sizes], default=[plan.default, *rest]
                )
                shape.symbolic_shape[0] = dim.symbol  # the constructor draws a fresh symbol per input
            else:
                shape = ct.Shape([dim, *rest])
        out.append(ct.TensorType(name=t.name, shape=shape, dtype=np.float32, default_value=default))
    return out


def batched_inputs(inputs: Any, default: int) -> set[str]:
    """The inputs whose first axis is the batch: every input declared with the default batch except
    the ``(1,)``-shaped ``conditioning_scale``."""
    return {t.name for t in inputs if t.name != "conditioning_scale" and t.shape and t.shape[0] == default}


def at_batch(inputs: Any, batch: int) -> tuple[Any, ...]:
    """Planned inputs (``io.TensorInfo``, declared at their default batch) resized to ``batch`` on the
    batch axis (``conditioning_scale`` keeps its ``(1,)``)."""
    import dataclasses

    default = inputs[0].shape[0]
    names = batched_inputs(inputs, default)
    return tuple(
        dataclasses.replace(t, shape=(batch, *t.shape[1:])) if t.name in names else t for t in inputs
    )


def program_problems(mlmodel: Any, plan: BatchPlan) -> list[str]:
    """What is wrong with a converted flexible-batch program: an output whose batch is static (some op
    baked the traced batch in) means the other batch size would fail on the device."""
    if not plan.flexible:
        return []
    from coremltools.converters.mil.mil.types.symbolic import is_symbolic

    prog = getattr(mlmodel, "_mil_program", None)
    if prog is None:
        return ["no MIL program to check the batch of (convert with skip_model_load=True)"]
    problems = []
    for var in prog.functions["main"].outputs:
        shape = var.shape
        if not shape or not is_symbolic(shape[0]):
            problems.append(f"output {var.name}: batch is static {shape} (the traced batch was baked in)")
    return problems


def accepted_batches(spec: Any) -> dict[str, list[int]]:
    """Per input of a package's protobuf spec, the batch sizes it accepts (from its enumerated shapes or
    its range on axis 0; the fixed batch otherwise)."""
    return {f.name: accepted_batches_of(f) for f in spec.description.input}


def set_declared_batch(package: Path, batch: int) -> list[str]:
    """Declare every flexible-batch input of a saved package at ``batch`` (the shape Swift reads), in
    place; returns the inputs changed. coremltools' ``bisect_model`` writes its chunks' flexible inputs
    at their lower bound, and Swift reads the UNet's batch from the first chunk."""
    import coremltools as ct

    model = ct.models.MLModel(str(package), skip_model_load=True)
    spec = model.get_spec()
    changed = []
    for f in spec.description.input:
        arr = f.type.multiArrayType
        flexible = arr.WhichOneof("ShapeFlexibility") is not None
        if flexible and len(arr.shape) and batch in accepted_batches_of(f) and int(arr.shape[0]) != batch:
            arr.shape[0] = batch
            changed.append(f.name)
    if changed:
        tmp = package.with_name(f"{package.stem}-redeclared.mlpackage")
        save_package(ct.models.MLModel(spec, weights_dir=model.weights_dir, skip_model_load=True), tmp)
        shutil.rmtree(package)
        tmp.rename(package)
    return changed


def accepted_batches_of(feature: Any) -> list[int]:
    """The batch sizes one input feature of a spec accepts (see ``accepted_batches``)."""
    arr = feature.type.multiArrayType
    which = arr.WhichOneof("ShapeFlexibility")
    if which == "enumeratedShapes":
        return sorted({int(s.shape[0]) for s in arr.enumeratedShapes.shapes})
    if which == "shapeRange":
        r = arr.shapeRange.sizeRanges[0]
        return list(range(int(r.lowerBound), int(r.upperBound) + 1))
    return [int(arr.shape[0])] if len(arr.shape) else []
