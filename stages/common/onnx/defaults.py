"""Optional graph inputs with zero defaults: one ONNX UNet for ControlNet tasks *and* standard pipelines.

A UNet exported with ControlNet residual inputs (``down_block_additional_residual_<i>``,
``mid_block_additional_residual``) cannot run in a pipeline that does not feed them: diffusers'
``OnnxStableDiffusionPipeline``, optimum's ``ORTDiffusionPipeline`` or any other ONNX Runtime app passes
``sample``, ``timestep`` and ``encoder_hidden_states`` only. ONNX has one way to make a graph input
optional, and ONNX Runtime honours it: an *initializer with the input's name* is the input's default
value (IR version >= 4), used whenever the caller does not feed it (``session.get_inputs()`` then lists
only the required inputs, ``session.get_overridable_initializers()`` the optional ones).

``add_zero_defaults`` gives each residual input a ``[1, 1, 1, 1]`` zero initializer. The residuals are
only ever *added* to the UNet's skip connections (``down_block_res_sample + residual``, ``mid + residual``),
so a zero of shape ``[1, 1, 1, 1]`` broadcasts to exactly "no ControlNet" (``x + 0 == x`` bit for bit),
and the default costs a few bytes: the UNet's weights stay stored once. ONNX Runtime refuses an
initializer whose shape contradicts the input's declared shape (``Shape of initializer ... does not
match``), so the declared static dims of these inputs become symbolic ones (``<input>_dim<k>``); the
symbolic contract dims (``batch``, ``latent_height / 2``) stay. The manifest keeps the contract's shapes,
marked ``optional`` with ``default: 0.0``, and the runtime checks fed residuals against them as before.

TensorRT's ONNX parser treats an input that has an initializer as a constant weight (the residuals would
be baked to zero), so ``strip_defaults`` turns them back into required inputs with the contract's dims
for TensorRT-ready graphs (``prepare_tensorrt``).

Example::

    names = residual_inputs(model)          # the UNet's ControlNet residual inputs
    add_zero_defaults(model, names)         # optional from now on
    spec = manifest_spec(io_spec(model), expected)   # contract shapes, optional + default recorded
    strip_defaults(model, expected["inputs"])       # required again (TensorRT)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from sdkiln.runtime.contract.errors import BuildError

logger = logging.getLogger(__name__)

RESIDUAL_MARK = "additional_residual"
# The value an omitted residual takes: no ControlNet.
RESIDUAL_DEFAULT = 0.0


def residual_inputs(names: list[str] | Any) -> list[str]:
    """The ControlNet residual inputs among graph input names (or of a ModelProto's graph)."""
    if hasattr(names, "graph"):
        names = [v.name for v in names.graph.input]
    return [n for n in names if RESIDUAL_MARK in n]


def default_values(model: Any) -> dict[str, float | None]:
    """Graph inputs that have an initializer of the same name (ONNX's optional inputs), with their
    default when it is one value repeated (None otherwise). Reads only tensor headers and small data."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, float | None] = {}
    for v in model.graph.input:
        t = inits.get(v.name)
        if t is None:
            continue
        value: float | None = None
        if t.data_location != 1:  # EXTERNAL: not read here; defaults written by this module are inline
            arr = numpy_helper.to_array(t)
            if arr.size and (arr == arr.flat[0]).all():
                value = float(arr.flat[0])
        out[v.name] = value
    return out


def add_zero_defaults(model: Any, names: list[str]) -> None:
    """Make each input in ``names`` optional with a broadcastable zero default, in place.

    The initializer has the input's element type and rank, every dim 1. Static dims of the declared
    input shape become symbolic (``<name>_dim<k>``) so that ONNX Runtime accepts the default's shape.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    inputs = {v.name: v for v in model.graph.input}
    taken = {t.name for t in model.graph.initializer}
    for name in names:
        v = inputs.get(name)
        if v is None:
            raise BuildError(f"cannot make {name} optional: the graph has no input of that name")
        if name in taken:
            raise BuildError(f"cannot make {name} optional: it already has an initializer")
        tt = v.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        rank = len(tt.shape.dim)
        model.graph.initializer.append(numpy_helper.from_array(np.zeros([1] * rank, dtype), name))
        for k, d in enumerate(tt.shape.dim):
            if not d.HasField("dim_param"):
                d.Clear()
                d.dim_param = f"{name}_dim{k}"
    if model.ir_version < 4:  # initializers as input defaults need IR >= 4
        model.ir_version = 4


def strip_defaults(model: Any, contract_inputs: list[Mapping[str, Any]]) -> list[str]:
    """Turn optional inputs back into required ones, in place: their initializers are removed and their
    declared dims set from ``contract_inputs`` (the manifest's spec: ints and contract dim names).
    Returns the names it changed."""
    by_name = {t["name"]: t for t in contract_inputs}
    optional = set(default_values(model))
    keep = [t for t in model.graph.initializer if t.name not in optional]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    for v in model.graph.input:
        if v.name not in optional:
            continue
        spec = by_name.get(v.name)
        if spec is None:
            raise BuildError(f"{v.name}: an optional graph input the contract does not describe")
        dims = v.type.tensor_type.shape.dim
        if len(dims) != len(spec["shape"]):
            raise BuildError(f"{v.name}: rank {len(dims)} but the contract says {spec['shape']}")
        for d, want in zip(dims, spec["shape"], strict=True):
            d.Clear()
            if isinstance(want, int):
                d.dim_value = want
            else:
                d.dim_param = want
    return sorted(optional)


def manifest_spec(
    graph_spec: Mapping[str, list[dict[str, Any]]], expected: Mapping[str, list[dict[str, Any]]]
) -> dict[str, list[dict[str, Any]]]:
    """The manifest's I/O spec of a graph: what ``io.io_spec`` read from it, with the contract's shapes
    for optional inputs (whose declared dims were relaxed for their default)."""
    contract = {t["name"]: t for t in expected["inputs"]}
    inputs = []
    for t in graph_spec["inputs"]:
        if t.get("optional") and t["name"] in contract:
            t = {**t, "shape": list(contract[t["name"]]["shape"])}
        inputs.append(t)
    return {"inputs": inputs, "outputs": list(graph_spec["outputs"])}


def optional_spec(spec: Mapping[str, list[dict[str, Any]]], names: list[str]) -> dict[str, Any]:
    """``spec`` with the inputs in ``names`` marked optional with the residual default."""
    wanted = set(names)
    return {
        "inputs": [
            {**t, "optional": True, "default": RESIDUAL_DEFAULT} if t["name"] in wanted else dict(t)
            for t in spec["inputs"]
        ],
        "outputs": [dict(t) for t in spec["outputs"]],
    }


def check_unfed(session: Any, feeds: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Run ``session`` with the optional inputs fed as zeros and again without them; the outputs must be
    identical (a default that is not exactly "no ControlNet" is a BuildError). Returns a record for the
    manifest: the optional inputs, the shape of the check and the largest difference seen."""
    import numpy as np

    optional = [a.name for a in session.get_overridable_initializers() if RESIDUAL_MARK in a.name]
    if not optional:
        return {}
    required = {k: v for k, v in feeds.items() if k not in optional}
    zero = {**required, **{k: np.zeros_like(feeds[k]) for k in optional if k in feeds}}
    fed = session.run(None, zero)
    unfed = session.run(None, required)
    worst = max(
        float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
        for a, b in zip(fed, unfed, strict=True)
    )
    if worst != 0.0:
        raise BuildError(
            f"{what}: leaving the ControlNet residuals out is not the same as feeding zeros "
            f"(max abs difference {worst:g})"
        )
    return {
        "optional_inputs": optional,
        "unfed_vs_zero_max_abs": worst,
        "batch": int(feeds["sample"].shape[0]),
    }
