"""The lean min/max pass gives the ranges ONNX Runtime's MinMax calibrator gives, with the reducers placed
right after each producer, and reads models whose external data is hard-linked (as in a bundle)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")


def _model(path: Path) -> list[dict[str, np.ndarray]]:
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8 * 6 * 6, 5)).astype(np.float32), "w2")
    shape = numpy_helper.from_array(np.array([0, -1], np.int64), "shape")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "shape"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "w2"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 5])],
        [w1, w2, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, location="model.onnx_data", size_threshold=100)
    return [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32) * (i + 1)} for i in range(3)]


class _Reader:
    def __init__(self, feeds):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def test_ranges_match_ort_minmax_calibrator(tmp_path: Path) -> None:
    import onnx
    from onnxruntime.quantization.calibrate import create_calibrator

    from sdkiln.stages.common.onnx import ranges

    src = tmp_path / "m" / "model.onnx"
    feeds = _model(src)
    order = []
    real_save = onnx.save

    inputs_of = {}

    def spy(model, path, *a, **kw):  # the augmented graph is written, used and removed
        order.extend(n.name for n in model.graph.node)
        inputs_of.update({n.name: list(n.input) for n in model.graph.node})
        return real_save(model, path, *a, **kw)

    import unittest.mock

    with unittest.mock.patch("onnx.save", spy):
        got = ranges.minmax(src, feeds, ["Conv", "MatMul"])
    assert not (src.parent / "__calibration.onnx").exists()
    assert set(got) == {"x", "c", "f", "y"}  # inputs and outputs of the two ops, no weights

    cal = create_calibrator(src, ["Conv", "MatMul"], augmented_model_path=str(tmp_path / "aug.onnx"))
    cal.collect_data(_Reader(feeds))
    want = cal.compute_data()
    for t, (lo, hi) in got.items():
        w_lo, w_hi = want[t].range_value
        assert float(lo) == pytest.approx(min(float(w_lo), 0.0)) and float(hi) == pytest.approx(
            max(float(w_hi), 0.0)
        )

    # each reducer pair sits right after the node whose output it reads, and that node's consumers
    # wait for it (they read ``t + 0 * (min + max)``): ONNX Runtime can then free ``t`` early
    assert order[:5] == [
        "__calib_min_0_node",
        "__calib_max_0_node",
        "__calib_sum_0_node",
        "__calib_dep_0_node",
        "__calib_gate_0_node",
    ]
    assert order[5] == "conv" and order[6].startswith("__calib_min_")
    assert inputs_of["conv"][0] == "x__calibrated" and inputs_of["relu"] == ["c__calibrated"]


def test_quantize_reads_hard_linked_external_data(tmp_path: Path) -> None:
    """A bundle hard-links the cache's files; onnx refuses such data, so the stage reads a private copy."""
    from sdkiln.stages.quantize_onnx import _readable

    src = tmp_path / "m" / "model.onnx"
    _model(src)
    assert _readable(src, tmp_path / "copy") == src  # one link: read in place
    os.link(src.parent / "model.onnx_data", tmp_path / "bundle_link")
    copied = _readable(src, tmp_path / "copy")
    assert copied == tmp_path / "copy" / "model.onnx" and (tmp_path / "copy" / "model.onnx_data").is_file()
    import onnx

    onnx.load(str(copied))  # loads (the original would raise "potential hardlink attack")
    with pytest.raises(Exception, match="hard links"):
        onnx.load(str(src))


def test_optional_inputs_are_fed_to_the_calibration(tmp_path: Path) -> None:
    """An ONNX UNet's ControlNet residuals are optional inputs (zero-default initializers), which ONNX
    Runtime lists as overridable initializers, not inputs: calibration feeds that carry them must reach
    the graph, or the ranges would be those of the zero defaults."""
    import onnx
    from onnx import helper

    from sdkiln.stages.common.onnx import ranges
    from sdkiln.stages.common.onnx.defaults import add_zero_defaults

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "mid_block_additional_residual"], ["y"], name="add")],
        "g",
        [
            helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info(
                "mid_block_additional_residual", onnx.TensorProto.FLOAT, ["batch", 4]
            ),
        ],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    add_zero_defaults(model, ["mid_block_additional_residual"])
    path = tmp_path / "m" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))
    x = np.zeros((1, 4), np.float32)
    fed = ranges.minmax(
        path, [{"x": x, "mid_block_additional_residual": np.full((1, 4), 5.0, np.float32)}], ["Add"]
    )
    unfed = ranges.minmax(path, [{"x": x}], ["Add"])
    assert float(fed["y"][1]) == 5.0 and float(unfed["y"][1]) == 0.0
