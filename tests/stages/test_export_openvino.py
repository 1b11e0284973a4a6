"""export_openvino: IR for every component (the ONNX UNet's residual inputs kept), precision labels read
from the IR's constants, NNCF INT8 gated at the int8 floor, the f32 gate (never OpenVINO's bf16 default)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from testkit import run_stage

from sdkiln.runtime.contract.errors import ParityError
from sdkiln.runtime.contract.floors import tolerance
from sdkiln.stages.engine.core import InputArtifact

pytest.importorskip("openvino", reason="export_openvino needs the openvino extra")
pytest.importorskip("nncf", reason="export_openvino needs the openvino extra")

PARITY = {"batch_sizes": [1, 2], "image_sizes": [64]}


@pytest.fixture(scope="module")
def ov_fp32(
    tmp_path_factory: pytest.TempPathFactory, sd15_onnx: InputArtifact, tiny_sd15_artifact: InputArtifact
) -> object:
    from sdkiln.stages.export_openvino import STAGE

    out = tmp_path_factory.mktemp("ov-fp32")
    return run_stage(STAGE, {"parity": PARITY}, {"onnx": sd15_onnx, "model": tiny_sd15_artifact}, out)


def test_every_component_becomes_an_fp32_ir_with_the_contract_io(ov_fp32, sd15_onnx: InputArtifact) -> None:
    import openvino as ov

    ctx = ov_fp32
    assert set(ctx.components) == set(sd15_onnx.components)
    for key, entry in ctx.components.items():
        onnx_entry = sd15_onnx.components[key]
        assert entry["path"].endswith("/model.xml") and (ctx.out_dir / entry["path"]).is_file()
        assert (ctx.out_dir / entry["path"]).with_suffix(".bin").is_file()
        assert entry["inputs"] == onnx_entry["inputs"] and entry["outputs"] == onnx_entry["outputs"]
        assert entry["precision"] == "fp32" and entry["weight_storage"].get("fp32", 0) > 0.99
        model = ov.Core().read_model(str(ctx.out_dir / entry["path"]))
        assert [p.get_any_name() for p in model.inputs] == [t["name"] for t in entry["inputs"]]
    # The UNet keeps the ControlNet residual inputs of the ONNX UNet it was converted from: optional in
    # the ONNX graph (zero-default initializers, which OpenVINO would fold in as constants), real IR inputs
    # here (checked above), still optional in the manifest (the backend feeds the zeros).
    residuals = [t for t in ctx.components["unet"]["inputs"] if "additional_residual" in t["name"]]
    assert any(t["name"] == "mid_block_additional_residual" for t in residuals)
    assert all(t.get("optional") for t in residuals)
    # Gated like an fp32 ONNX export: max-abs, cosine and SQNR, at f32 inference precision.
    parity = ctx.metrics["parity"]
    assert set(parity) == set(ctx.components)
    for key, entry in parity.items():
        assert entry["gate"] == {
            "max_abs": tolerance(key).fp32_max_abs,
            "min_cosine": tolerance(key).fp32_min_cosine,
            "min_sqnr_db": tolerance(key).fp32_min_sqnr_db,
        }
        assert entry["worst"]["max_abs"] < 1e-3, key
    assert "b1_64x64_no_controlnet" in parity["unet"]["cases"]
    assert ctx.details["openvino"]["parity_inference_precision"] == "f32"
    # configs, tokenizer and scheduler come along: the folder is a pipeline the runtime can open
    assert (ctx.out_dir / "unet" / "config.json").is_file() and (ctx.out_dir / "tokenizer").is_dir()
    assert (ctx.out_dir / "scheduler" / "scheduler_config.json").is_file()


def test_static_int8_is_calibrated_labelled_from_content_and_gated(
    tmp_path: Path, sd15_onnx: InputArtifact, tiny_sd15_artifact: InputArtifact
) -> None:
    from sdkiln.stages.export_openvino import STAGE

    params = {
        "quantization": "static",
        "quantize": ["unet"],
        "components": ["text_encoder", "unet"],
        "calibration": {"prompts": ["a red house", "a cat"], "steps": 2, "size": 64},
        "parity": PARITY,
    }
    ctx = run_stage(STAGE, params, {"onnx": sd15_onnx, "model": tiny_sd15_artifact}, tmp_path)
    assert set(ctx.components) == {"text_encoder", "unet"}
    unet = ctx.components["unet"]
    assert unet["precision"] == "int8" and unet["weight_storage"]["int8"] > 0.9
    assert ctx.components["text_encoder"]["precision"] == "fp32"  # not in ``quantize``
    rec = ctx.details["openvino"]["components"]["unet"]
    assert rec["quantization"] == "static" and rec["ops"]["FakeQuantize"] > 0
    assert rec["calibration_samples"] == 4  # two prompts x two steps
    assert ctx.details["openvino"]["not_converted"]
    sqnr = ctx.metrics["parity"]["unet"]["worst"]["sqnr_db"]
    assert ctx.metrics["parity"]["unet"]["gate"] == {"min_sqnr_db": tolerance("unet").min_sqnr_db["int8"]}
    assert tolerance("unet").min_sqnr_db["int8"] <= sqnr < 80  # lossy, above the floor
    bytes_fp32 = sum(f.stat().st_size for f in (sd15_onnx.path / "unet").glob("model.onnx*"))
    assert ctx.metrics["bytes"]["unet"] < 0.5 * bytes_fp32


def test_weight_compression_needs_no_calibration(
    tmp_path: Path, sd15_onnx: InputArtifact, tiny_sd15_artifact: InputArtifact
) -> None:
    from sdkiln.stages.export_openvino import STAGE

    params = {
        "quantization": "weights",
        "quantize": ["text_encoder"],
        "components": ["text_encoder"],
        "parity": PARITY,
    }
    ctx = run_stage(STAGE, params, {"onnx": sd15_onnx, "model": tiny_sd15_artifact}, tmp_path)
    assert ctx.components["text_encoder"]["precision"] == "int8"
    assert "FakeQuantize" not in ctx.details["openvino"]["components"]["text_encoder"]["ops"]


def test_a_broken_ir_fails_its_gate(
    tmp_path: Path,
    sd15_onnx: InputArtifact,
    tiny_sd15_artifact: InputArtifact,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Weights off by 2% in every MatMul of the text encoder: the fp32 gate (max-abs) catches it."""
    from sdkiln.stages.common.openvino import quantize as q
    from sdkiln.stages.export_openvino import STAGE

    def perturb(model, how, data, fix):
        import openvino as ov
        from openvino import opset13 as ops

        for op in model.get_ops():
            if op.get_type_name() == "MatMul":
                const = op.input_value(1).get_node()
                if const.get_type_name() == "Constant":
                    w = const.get_data().copy() * np.float32(1.02)
                    op.input(1).replace_source_output(ops.constant(w).output(0))
        model.validate_nodes_and_infer_types()
        assert isinstance(model, ov.Model)
        return model

    monkeypatch.setattr(q, "quantize", perturb)
    params = {"components": ["text_encoder"], "parity": PARITY}
    with pytest.raises(ParityError, match="text_encoder.*max_abs"):
        run_stage(STAGE, params, {"onnx": sd15_onnx, "model": tiny_sd15_artifact}, tmp_path)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"quantization": "static"}, "calibration"),
        ({"quantization": "weights", "calibration": {}}, "calibration"),
        ({"quantize": ["unet", "vea_decoder"]}, "quantize"),
        ({"components": ["unet.x.y"]}, "components"),
        ({"overflow_fix": "maybe"}, "overflow_fix"),
    ],
)
def test_params_are_validated(params: dict, field: str) -> None:
    from sdkiln.stages.export_openvino import ExportOpenvinoParams

    with pytest.raises(ValidationError, match=field):
        ExportOpenvinoParams(**params)


def test_overflow_fix_auto_follows_the_building_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from sdkiln.runtime import machine
    from sdkiln.stages.export_openvino import STAGE, _overflow_fix

    p = STAGE.params(quantization="static", calibration={})
    monkeypatch.setattr(machine, "has_vnni", lambda cpuinfo=None: False)
    assert _overflow_fix(p) == "enable" and STAGE.key_facts(p) == {"cpu_vnni": "False"}
    monkeypatch.setattr(machine, "has_vnni", lambda cpuinfo=None: True)
    assert _overflow_fix(p) == "disable" and STAGE.key_facts(p) == {"cpu_vnni": "True"}
    assert STAGE.key_facts(STAGE.params()) == {}  # fp32: the CPU does not change the output
    assert (
        _overflow_fix(STAGE.params(quantization="static", calibration={}, overflow_fix="enable")) == "enable"
    )


def test_a_quantized_component_below_its_floor_can_keep_fp32(
    tmp_path: Path,
    sd15_onnx: InputArtifact,
    tiny_sd15_artifact: InputArtifact,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ``below_floor: keep_fp32`` an INT8 component that misses its floor (here: an int8 floor of
    200 dB no quantization reaches) ships as fp32, gated as fp32, and the manifest keeps what it measured."""
    from sdkiln.runtime.contract.floors import Gate
    from sdkiln.stages.common.onnx import transform
    from sdkiln.stages.export_openvino import STAGE

    real = transform.gate_for
    monkeypatch.setattr(
        transform, "gate_for", lambda c, prec: Gate(min_sqnr_db=200.0) if prec == "int8" else real(c, prec)
    )
    params = {
        "quantization": "weights",
        "quantize": ["text_encoder"],
        "components": ["text_encoder"],
        "below_floor": "keep_fp32",
        "parity": PARITY,
    }
    ctx = run_stage(STAGE, params, {"onnx": sd15_onnx, "model": tiny_sd15_artifact}, tmp_path)
    assert ctx.components["text_encoder"]["precision"] == "fp32"
    kept = ctx.details["openvino"]["kept_fp32"]["text_encoder"]
    assert kept["gate"] == {"min_sqnr_db": 200.0} and 15 < kept["worst"]["sqnr_db"] < 200
    assert ctx.metrics["parity"]["text_encoder"]["gate"]["max_abs"] == tolerance("text_encoder").fp32_max_abs
    assert ctx.details["openvino"]["components"]["text_encoder"]["quantization"] == "none"
    params["below_floor"] = "fail"
    with pytest.raises(ParityError, match="text_encoder.*SQNR"):
        run_stage(STAGE, params, {"onnx": sd15_onnx, "model": tiny_sd15_artifact}, tmp_path / "again")


def test_optional_inputs_with_external_data_convert_from_a_work_dir(tmp_path: Path) -> None:
    """Real-size graphs keep their weights in ``model.onnx_data`` (over 2 GB): the rewritten graph in the
    work dir must reach them inside its own folder (OpenVINO refuses data resolving outside it, as a
    symlink into the cache did), and the optional input becomes a real IR input."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sdkiln.stages.common.openvino import io as oi

    w = numpy_helper.from_array(np.arange(64, dtype=np.float32).reshape(8, 8), "w")
    residual = numpy_helper.from_array(np.zeros((1, 8), np.float32), "residual")  # the optional input
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y0"]), helper.make_node("Add", ["y0", "residual"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
            helper.make_tensor_value_info("residual", TensorProto.FLOAT, [1, 8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [w, residual],
    )
    src = tmp_path / "cache" / "unet"
    src.mkdir(parents=True)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(
        model,
        str(src / "model.onnx"),
        save_as_external_data=True,
        location="model.onnx_data",
        size_threshold=0,
    )
    spec = [{"name": "x", "shape": [1, 8]}, {"name": "residual", "shape": [1, 8]}]
    ov_model = oi.convert(src / "model.onnx", spec, tmp_path / "work" / "unet")
    assert sorted(i.get_any_name() for i in ov_model.inputs) == ["residual", "x"]
    compiled = oi.core().compile_model(ov_model, "CPU")
    x, r = np.ones((1, 8), np.float32), np.full((1, 8), 2.0, np.float32)
    out = compiled({"x": x, "residual": r})[0]
    np.testing.assert_allclose(out, x @ numpy_helper.to_array(w) + r, rtol=1e-6)
