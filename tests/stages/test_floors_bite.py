"""The default parity floors reject broken artifacts (``runtime/contract/floors.py``).

Each gate gets a correct artifact, which must pass, and a realistically broken one, which must fail at
the DEFAULT floor: one UNet layer 1-2 % off in an fp32 or fp16 graph, an INT8 graph with one wrong
weight scale, and end to end a wrong scheduler and the wrong ControlNet. (LoRA fusion: an unfused LoRA
fails ``lora_fuse_*``, tests/stages/test_fuse_lora.py; quanto: tests/stages/test_quantize_torch.py;
Core ML fp16 and 6-bit read-back: tests/stages/test_export_coreml.py and test_palettize_coreml.py.)
The numbers measured here are the ones floors.py quotes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sdkiln.runtime.contract.floors import e2e_floor, gate
from sdkiln.runtime.contract.manifest import read_bundle_manifest

pytest.importorskip("onnxruntime", reason="the ONNX gates run graphs with ONNX Runtime")
logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def unet_ref(tiny_bundle: Path) -> dict[str, Any]:
    """The tiny bundle's fp32 UNet graph, and its parity cases against the diffusers UNet."""
    import onnx

    from sdkiln.stages.common.onnx import components as oc
    from sdkiln.stages.common.torch.pipeline import open_pipeline

    manifest = read_bundle_manifest(tiny_bundle)
    base, onnx_sec = manifest.sections["torch/base"], manifest.sections["onnx/fp32"]
    loaded = open_pipeline(tiny_bundle / "torch/base", family=base.family)
    fam, comps = oc.plan_components(
        tiny_bundle / "torch/base", base.model, unet_residuals=onnx_sec.model.unet_controlnet_residuals
    )
    unet = next(c for c in comps if c.key == "unet")
    cases = oc.parity_cases(oc.torch_graph(loaded, unet), unet, [1, 2], [64], 0, fam.vae_scale_factor)
    path = tiny_bundle / "onnx/fp32" / onnx_sec.components["unet"].path
    return {"model": onnx.load(str(path), load_external_data=True), "cases": cases}


def _measure(model: Any, cases: list[Any], precision: str) -> tuple[float, list[str]]:
    """(worst SQNR dB, failures at the default gate of ``unet`` at ``precision``)."""
    import onnxruntime as ort

    from sdkiln.stages.common.onnx.parity import ParityReport

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    report = ParityReport()
    entry = report.check("unet", sess, cases, gate("unet", precision))
    return entry["worst"]["sqnr_db"], report.failures


def _largest_weight(model: Any, suffix: str = "") -> Any:
    return max(
        (t for t in model.graph.initializer if t.name.endswith(suffix) and len(t.dims) >= 2),
        key=lambda t: int(np.prod(t.dims)),
    )


def _scaled(model: Any, factor: float, name: str | None = None) -> Any:
    """A copy of ``model`` with one weight tensor (default: the largest) multiplied by ``factor``."""
    import onnx
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    t = next(i for i in out.graph.initializer if i.name == name) if name else _largest_weight(out)
    arr = numpy_helper.to_array(t)
    t.CopyFrom(numpy_helper.from_array((arr.astype(np.float64) * factor).astype(arr.dtype), t.name))
    return out


@pytest.mark.parametrize("off", [0.01, 0.02])
def test_fp32_gate_rejects_one_layer_off(unet_ref, off) -> None:
    ok_sqnr, ok_fail = _measure(unet_ref["model"], unet_ref["cases"], "fp32")
    bad_sqnr, bad_fail = _measure(_scaled(unet_ref["model"], 1 + off), unet_ref["cases"], "fp32")
    logger.warning("fp32 UNet: correct %.1f dB, one layer %+.0f%% %.1f dB", ok_sqnr, 100 * off, bad_sqnr)
    assert not ok_fail
    assert bad_fail, f"one layer {off:.0%} off passed the fp32 gate ({bad_sqnr:.1f} dB)"


def _save(model: Any, path: Path) -> Path:
    import onnx

    onnx.save_model(model, str(path))
    return path


def test_fp16_weights_gate_rejects_one_layer_off(unet_ref, tmp_path) -> None:
    """fp16 activation noise hides one layer 2 % off from the output floor (measured: 56.6 dB correct,
    56.5 dB broken); the weight gate sees it."""
    from sdkiln.stages.common.onnx.io import to_fp16
    from sdkiln.stages.common.onnx.weights import weight_drift

    source = _save(unet_ref["model"], tmp_path / "fp32.onnx")
    ok = to_fp16(unet_ref["model"])
    bad = to_fp16(_scaled(unet_ref["model"], 1.02))
    ok_sqnr, ok_fail = _measure(ok, unet_ref["cases"], "fp16")
    bad_sqnr, _ = _measure(bad, unet_ref["cases"], "fp16")
    ok_drift = weight_drift(_save(ok, tmp_path / "ok.onnx"), source)
    bad_drift = weight_drift(_save(bad, tmp_path / "bad.onnx"), source)
    logger.warning(
        "fp16 UNet: correct %.1f dB (weights %.2g), one layer +2%% %.1f dB (weights %.2g)",
        ok_sqnr, ok_drift.worst()["fp16"], bad_sqnr, bad_drift.worst()["fp16"],
    )  # fmt: skip
    assert not ok_fail and not ok_drift.failures() and ok_drift.coverage > 0.99
    failures = bad_drift.failures()
    assert len(failures) == 1 and _largest_weight(unet_ref["model"]).name in failures[0]


def test_int8_weights_gate_rejects_a_wrong_weight_scale(unet_ref, tmp_path) -> None:
    """One weight scale 2x off: 29.8 dB against a correct 31.5 dB at the output (the int8 floor is 18);
    the weight gate sees it."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from sdkiln.stages.common.onnx.weights import weight_drift

    source = _save(unet_ref["model"], tmp_path / "unet.onnx")
    dst = tmp_path / "unet.int8.onnx"
    quantize_dynamic(
        str(source), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Conv"]
    )
    q = onnx.load(str(dst))
    ok_sqnr, ok_fail = _measure(q, unet_ref["cases"], "int8")
    quantized = [t for t in q.graph.initializer if t.name.endswith("_quantized")]
    biggest = max(quantized, key=lambda t: int(np.prod(t.dims))).name.removesuffix("_quantized")
    bad = _scaled(q, 2.0, f"{biggest}_scale")
    bad_sqnr, _ = _measure(bad, unet_ref["cases"], "int8")
    ok_drift = weight_drift(dst, source)
    bad_drift = weight_drift(_save(bad, tmp_path / "bad.onnx"), source)
    logger.warning(
        "int8 UNet: correct %.1f dB (weights %.3g), one weight scale x2 %.1f dB (weights %.3g)",
        ok_sqnr, ok_drift.worst()["int8"], bad_sqnr, bad_drift.worst()["int8"],
    )  # fmt: skip
    assert not ok_fail and not ok_drift.failures() and ok_drift.coverage > 0.99, ok_drift.unmatched
    failures = bad_drift.failures()
    assert len(failures) == 1 and biggest in failures[0]


def test_e2e_floor_rejects_a_wrong_scheduler_and_the_wrong_controlnet(tiny_bundle) -> None:
    from dataclasses import replace

    from sdkiln.runtime.contract.metrics import compare_images
    from sdkiln.runtime.examples import SKETCHES
    from sdkiln.runtime.load import load
    from sdkiln.runtime.tasks import sketch_request, text_request

    ref = load(tiny_bundle, backend="torch")
    onnx = load(tiny_bundle, backend="onnx", section="onnx/fp32")
    floor = e2e_floor("fp32")

    def psnr(a: Any, b: Any) -> float:
        return compare_images(a.pixels[0], b.pixels[0])["psnr_db"]

    text = text_request(ref, "a lighthouse at dusk", steps=4, seed=7)
    expected = ref.generate(text)
    good = psnr(expected, onnx.generate(text))
    # The same graphs under another scheduler: what a bundle whose scheduler config was lost runs.
    cfg = dict(onnx.info.scheduler_config)
    other = "EulerDiscreteScheduler" if cfg["_class_name"] != "EulerDiscreteScheduler" else "DDIMScheduler"
    onnx.info = replace(onnx.info, scheduler_config={**cfg, "_class_name": other})
    wrong_scheduler = psnr(expected, onnx.generate(text))
    onnx.info = replace(onnx.info, scheduler_config=cfg)
    # The canny ControlNet fed the scribble: what a bundle with its ControlNets mislabelled runs.
    sketch = sketch_request(ref, SKETCHES["car"](), "a red sports car", steps=4, seed=42)
    expected = ref.generate(sketch)
    good_sketch = psnr(expected, onnx.generate(sketch))
    swapped = replace(sketch, control=replace(sketch.control, kind="canny"))
    wrong_controlnet = psnr(expected, onnx.generate(swapped))
    logger.warning(
        "e2e fp32: text %.1f dB, %s instead of %s %.1f dB; sketch %.1f dB, canny ControlNet %.1f dB",
        good,
        other,
        cfg["_class_name"],
        wrong_scheduler,
        good_sketch,
        wrong_controlnet,
    )
    assert good >= floor and good_sketch >= floor
    assert wrong_scheduler < floor, f"a wrong scheduler passed the e2e floor ({wrong_scheduler:.1f} dB)"
    assert wrong_controlnet < floor, f"the wrong ControlNet passed the e2e floor ({wrong_controlnet:.1f} dB)"
