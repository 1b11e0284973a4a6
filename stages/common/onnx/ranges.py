"""Activation ranges for static INT8 without ONNX Runtime's calibrator's memory: a lean min/max pass.

ORT's ``MinMaxCalibrater`` makes every tensor it calibrates a graph output and keeps every output of
every calibration run, so on the real-size SD 1.5 UNet it was killed above 23.7 GB (FACTS). Here each
calibrated tensor gets a ``ReduceMin``/``ReduceMax`` pair placed right after the node that produces it
and the tensor's consumers made to wait for it (so ONNX Runtime runs the pair before them and can free
the tensor once they are done; see ``augment``), the graph is saved in the
model's own folder, next to its external data (the weights are never loaded into Python, and never
hard-linked: onnx refuses data with several links), and only the two scalars per tensor come back from
each run. The ranges are what the MinMax calibrator
computes (min and max over every run, widened to include 0) and go to ``quantize_static`` as its
calibration cache.

    cache = minmax_cache(pre_onnx, feeds, ["Conv", "MatMul", "Gemm"])   # pre_onnx: in a work folder
    quantize_static(pre_onnx, out, None, calibration_cache_path=cache, ...)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdkiln.runtime.contract.errors import UserError

_FLOAT = 1  # onnx.TensorProto.FLOAT


def calibrated_tensors(model: Any, op_types: list[str]) -> list[str]:
    """The float activations ORT's calibrator would collect: inputs and outputs of ``op_types`` nodes
    that are not initializers (read from the graph with shapes inferred; the weights need not be loaded)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    typed = {
        v.name: v.type.tensor_type.elem_type
        for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
    }
    inits = {t.name for t in model.graph.initializer}
    names: list[str] = []
    seen: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        for t in (*node.input, *node.output):
            if t and t not in inits and t not in seen and typed.get(t) == _FLOAT:
                seen.add(t)
                names.append(t)
    return names


def augment(model: Any, tensors: list[str]) -> list[tuple[str, str]]:
    """Add a ReduceMin/ReduceMax pair (keepdims 0) per tensor right after its producer, in place, and
    make the tensor's consumers wait for the pair: they read ``t + 0 * (min + max)`` (the same values)
    instead of ``t``. Without that dependency ONNX Runtime runs every reducer after the whole graph (they
    are leaves of its reverse-DFS order), keeping every calibrated activation alive to the end: that is
    what took the real UNet past 20 GB. The pairs' outputs become graph outputs. Returns
    ``[(min_output, max_output)]`` in ``tensors`` order."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    wanted = set(tensors)
    names = {t: (f"__calib_min_{i}", f"__calib_max_{i}") for i, t in enumerate(tensors)}
    gated = {t: f"{t}__calibrated" for t in tensors}
    zero = "__calib_zero"
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), zero))

    def pair(t: str, i: int) -> list[Any]:
        lo, hi = names[t]
        return [
            helper.make_node("ReduceMin", [t], [lo], name=f"{lo}_node", keepdims=0),
            helper.make_node("ReduceMax", [t], [hi], name=f"{hi}_node", keepdims=0),
            helper.make_node("Add", [lo, hi], [f"__calib_sum_{i}"], name=f"__calib_sum_{i}_node"),
            helper.make_node(
                "Mul", [f"__calib_sum_{i}", zero], [f"__calib_dep_{i}"], name=f"__calib_dep_{i}_node"
            ),
            helper.make_node("Add", [t, f"__calib_dep_{i}"], [gated[t]], name=f"__calib_gate_{i}_node"),
        ]

    index = {t: i for i, t in enumerate(tensors)}
    graph_inputs = {i.name for i in model.graph.input}
    nodes = [n for t in tensors if t in graph_inputs for n in pair(t, index[t])]
    for node in model.graph.node:
        node.input[:] = [gated.get(x, x) for x in node.input]
        nodes.append(node)
        for out in node.output:
            if out in wanted:
                nodes.extend(pair(out, index[out]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for t in tensors:
        for name in names[t]:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, []))
    return [names[t] for t in tensors]


def minmax(model_path: Path, feeds: list[dict[str, Any]], op_types: list[str]) -> dict[str, Any]:
    """``{tensor: (lowest, highest)}`` (float32 numpy scalars, widened to include 0) over ``feeds``.
    ``model_path`` must be in a folder this process may write to (a stage's work copy)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    if not feeds:
        raise UserError(f"{model_path}: no calibration feeds")
    model = onnx.load(str(model_path), load_external_data=False)
    tensors = calibrated_tensors(model, op_types)
    pairs = augment(model, tensors)
    augmented = Path(model_path).parent / "__calibration.onnx"
    onnx.save(model, str(augmented))  # the initializers still point at the model's data file
    del model
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(augmented), opts, providers=["CPUExecutionProvider"])
    # Optional inputs (an ONNX UNet's zero-default ControlNet residuals) are overridable initializers to ORT.
    wanted_inputs = {i.name for i in [*sess.get_inputs(), *sess.get_overridable_initializers()]}
    outs = [n for p in pairs for n in p]
    lo = np.full(len(tensors), np.inf, np.float32)
    hi = np.full(len(tensors), -np.inf, np.float32)
    for feed in feeds:
        values = sess.run(outs, {k: v for k, v in feed.items() if k in wanted_inputs})
        lo = np.minimum(lo, np.asarray(values[0::2], np.float32))
        hi = np.maximum(hi, np.asarray(values[1::2], np.float32))
    del sess
    augmented.unlink()
    return {
        t: (np.float32(min(float(lo[i]), 0.0)), np.float32(max(float(hi[i]), 0.0)))
        for i, t in enumerate(tensors)
    }


def minmax_cache(model_path: Path, feeds: list[dict[str, Any]], op_types: list[str]) -> Path:
    """Run ``minmax`` and write the ranges as an ONNX Runtime calibration cache (MinMax) beside the model."""
    from onnxruntime.quantization.calibrate import (
        CalibrationMethod,
        TensorData,
        TensorsData,
        save_tensors_data,
    )

    ranges = minmax(model_path, feeds, op_types)
    data = TensorsData(
        CalibrationMethod.MinMax, {t: TensorData(lowest=lo, highest=hi) for t, (lo, hi) in ranges.items()}
    )
    path = Path(model_path).parent / "calibration.json"
    save_tensors_data(data, path)
    return path
