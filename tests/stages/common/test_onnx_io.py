"""ONNX helpers that only show at real size: fp16 conversion past the protobuf limit, unused inputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdkiln.stages.common.onnx import io as ou


def _upsample_conv() -> onnx.ModelProto:
    """x -> Resize(x2, scales from a Constant node, as the UNet's upsamplers export) -> Conv -> y."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.1, "w")
    scales = helper.make_tensor("scales_value", TensorProto.FLOAT, [4], [1.0, 1.0, 2.0, 2.0])
    nodes = [
        helper.make_node("Constant", [], ["scales"], value=scales),
        helper.make_node("Resize", ["x", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Conv", ["up", "w"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_to_fp16_keeps_resize_scales_fp32_past_the_protobuf_limit(monkeypatch):
    """Above 2 GB the converter cannot infer shapes in memory; without the inferred types it turned the
    Resize scales fp16 and the real-size SD 1.5 UNet failed to load. ``to_fp16`` infers them on the
    weightless graph instead (here the threshold is lowered so a small graph takes that path)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    x = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    ref = _run(_upsample_conv(), x)
    broken = convert_float_to_float16(_upsample_conv(), keep_io_types=True, disable_shape_infer=True)
    with pytest.raises(Exception, match="Resize"):
        _run(broken, x)  # what the big path did before: shows the check below can fail
    monkeypatch.setattr(ou, "EXTERNAL_DATA_THRESHOLD", 0)
    half = ou.to_fp16(_upsample_conv())
    assert [i.data_type for i in half.graph.initializer] == [TensorProto.FLOAT16]
    got = _run(half, x)
    assert np.abs(got - ref).max() < 1e-2


def test_infer_value_info_leaves_the_weights_alone():
    model = _upsample_conv()
    before = [t.SerializeToString() for t in model.graph.initializer]
    ou.infer_value_info(model, min_bytes=16)
    assert [t.SerializeToString() for t in model.graph.initializer] == before
    assert {v.name for v in model.graph.value_info} >= {"up", "scales"}


def test_restore_unused_inputs_puts_the_contract_input_back_in_order():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["sample"], ["out"])],
        "g",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    spec = {
        "inputs": [
            {"name": "sample", "dtype": "float32", "shape": ["batch", 4]},
            {"name": "encoder_hidden_states", "dtype": "float32", "shape": ["batch", 77, 8]},
        ],
        "outputs": [{"name": "out", "dtype": "float32", "shape": ["batch", 4]}],
    }
    assert ou.restore_unused_inputs(model, spec) == ["encoder_hidden_states"]
    assert [v.name for v in model.graph.input] == ["sample", "encoder_hidden_states"]
    assert ou.restore_unused_inputs(model, spec) == []  # nothing left to restore
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"sample": np.ones((1, 4), np.float32), "encoder_hidden_states": np.zeros((1, 77, 8), np.float32)}
    assert sess.run(None, feeds)[0].shape == (1, 4)  # ONNX Runtime takes a feed nothing reads
