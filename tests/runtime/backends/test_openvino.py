"""The openvino backend: f32 unless asked otherwise (OpenVINO's CPU default is bf16 where the CPU has it),
the manifest spec checked against each compiled model, the same images as ONNX Runtime end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.metrics import compare_images
from sdkiln.runtime.load import load, pick_section
from sdkiln.runtime.parity import CASES, run_case

pytest.importorskip("openvino", reason="the openvino backend needs the openvino extra")


def test_sections_and_the_pinned_precision(tiny_openvino_bundle: Path) -> None:
    from sdkiln.runtime.contract.manifest import read_bundle_manifest

    manifest = read_bundle_manifest(tiny_openvino_bundle)
    assert pick_section(manifest, "openvino", None) == "openvino/fp32"
    pipe = load(tiny_openvino_bundle, backend="openvino")
    unet = pipe.backend.component("unet")
    assert unet.inference_precision == "f32"  # pinned: never the CPU plugin's bf16 default
    assert "openvino" in pipe.backend.description and "f32" in pipe.backend.description
    with pytest.raises(UserError, match="unknown OpenVINO inference precision 'fp8'"):
        load(tiny_openvino_bundle, backend="openvino", inference_precision="fp8")
    with pytest.raises(UserError, match="onnx/fp32.*is 'onnx'; the openvino backend runs 'openvino'"):
        load(tiny_openvino_bundle, backend="openvino", section="onnx/fp32")


def test_bf16_is_refused_where_the_cpu_has_none(monkeypatch: pytest.MonkeyPatch) -> None:
    import openvino as ov

    from sdkiln.runtime.backends import openvino as ovb

    class Core:
        def get_property(self, device: str, name: str) -> list[str]:
            return ["FP32", "INT8"]

    monkeypatch.setattr(ov, "Core", Core)
    with pytest.raises(UserError, match="no native bf16"):
        ovb.check_precision("bf16")
    ovb.check_precision("f32")


def test_a_manifest_that_does_not_describe_the_model_is_refused(tiny_openvino_bundle: Path) -> None:
    import openvino as ov

    from sdkiln.runtime.backends.openvino import OpenVinoComponent, compile_config
    from sdkiln.runtime.contract.specs import ComponentIO, TensorSpec

    io = ComponentIO(
        inputs={"latent_sample": TensorSpec("latent_sample", "float16", ("batch", 4, "h", "w"))},
        outputs={"sample": TensorSpec("sample", "float32", ("batch", 3, "H", "W"))},
    )
    path = tiny_openvino_bundle / "openvino/fp32/vae_decoder/model.xml"
    with pytest.raises(UserError, match="latent_sample: manifest float16"):
        OpenVinoComponent("vae_decoder", path, io, ov.Core(), compile_config())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.task)
def test_same_images_as_onnx_runtime(tiny_openvino_bundle: Path, case) -> None:
    """fp32 IR at f32 precision vs the fp32 ONNX graphs it came from: the same image to float precision."""
    ov_pipe = load(tiny_openvino_bundle, backend="openvino")
    ort_pipe = load(tiny_openvino_bundle, backend="onnx")
    a = run_case(ov_pipe, case, steps=2, size=64)
    b = run_case(ort_pipe, case, steps=2, size=64)
    m = compare_images(b.pixels[0], a.pixels[0])
    assert m["psnr_db"] > 60, m
    assert np.abs(a.pixels - b.pixels).max() < 1e-3


def test_int8_section_runs_and_stays_close(tiny_openvino_bundle: Path) -> None:
    pipe = load(tiny_openvino_bundle, backend="openvino", section="openvino/int8")
    ref = load(tiny_openvino_bundle, backend="openvino")
    case = next(c for c in CASES if c.task == "sketch")
    a, b = run_case(pipe, case, steps=2, size=64), run_case(ref, case, steps=2, size=64)
    assert np.isfinite(a.pixels).all()
    psnr = compare_images(b.pixels[0], a.pixels[0])["psnr_db"]
    assert 15 < psnr < 100  # int8: close, not identical


def test_per_component_precision_spec_parses_and_names_its_mistakes() -> None:
    from sdkiln.runtime.backends import openvino as ovb

    assert ovb.parse_precision("f32") == ("f32", {})
    assert ovb.parse_precision("f32, vae_decoder=bf16,controlnet=bf16") == (
        "f32",
        {"vae_decoder": "bf16", "controlnet": "bf16"},
    )
    assert ovb.parse_precision("vae_decoder=bf16") == ("f32", {"vae_decoder": "bf16"})
    default, overrides = ovb.parse_precision("f32,vae_decoder=bf16,controlnet=bf16,unet=f32")
    assert ovb.format_precision(default, overrides) == "f32,controlnet=bf16,vae_decoder=bf16"
    assert ovb.precision_of("controlnet.scribble", default, overrides) == "bf16"
    assert ovb.precision_of("unet", default, overrides) == "f32"
    assert ovb.precision_of("text_encoder", default, overrides) == "f32"
    with pytest.raises(UserError, match="unknown OpenVINO inference precision 'fp8'"):
        ovb.parse_precision("f32,unet=fp8")
    with pytest.raises(UserError, match="one default precision"):
        ovb.parse_precision("f32,bf16")
    with pytest.raises(UserError, match="'unet=' is not component=precision"):
        ovb.parse_precision("f32,unet=")


def test_per_component_precision_compiles_each_component_as_asked(tiny_openvino_bundle: Path) -> None:
    """Only the named component runs in bf16: its compiled model says so, the others stay f32, and the
    image moves by bf16 noise in the decoder alone (the latents are the f32 ones)."""
    import openvino as ov

    with pytest.raises(UserError, match="this section has no vae_decodr"):
        load(tiny_openvino_bundle, backend="openvino", inference_precision="f32,vae_decodr=bf16")
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no native bf16 for OpenVINO: a bf16 component cannot be compiled here")
    mixed = load(tiny_openvino_bundle, backend="openvino", inference_precision="f32,vae_decoder=bf16")
    exact = load(tiny_openvino_bundle, backend="openvino")
    case = next(c for c in CASES if c.task == "text")
    a, b = run_case(mixed, case, steps=2, size=64), run_case(exact, case, steps=2, size=64)
    assert mixed.backend.component("vae_decoder").inference_precision == "bf16"
    assert mixed.backend.component("unet").inference_precision == "f32"
    assert "vae_decoder bf16" in mixed.backend.description and "unet f32" in mixed.backend.description
    np.testing.assert_array_equal(a.latents, b.latents)
    psnr = compare_images(b.pixels[0], a.pixels[0])["psnr_db"]
    assert 20 < psnr < 100, psnr  # bf16 decoder: close to, not the same as, the f32 one
