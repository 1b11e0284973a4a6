"""Labels from content (issue 12): every precision a bundle states is what its bytes hold."""

from __future__ import annotations

from pathlib import Path

from labels import label_problems
from testkit import make_bundle_of

from sdkiln.runtime.contract.manifest import read_bundle_manifest


def test_tiny_bundle_labels_match_the_bytes(tiny_bundle: Path) -> None:
    assert label_problems(tiny_bundle) == []
    m = read_bundle_manifest(tiny_bundle)
    # the dynamic INT8 section says int8 only where the graph holds int8 weights (the VAE stays fp32)
    precisions = m.sections["onnx/int8"].component_precisions()
    assert precisions["unet"] == "int8" and m.sections["onnx/int8"].precision == "mixed"


def test_coreml_6bit_labels_match_the_packages(palettized_unet, tmp_path: Path) -> None:
    bundle = make_bundle_of(tmp_path / "b", {"coreml/split_einsum": palettized_unet.artifact("coreml6")})
    assert label_problems(bundle) == []
    assert (
        read_bundle_manifest(bundle).sections["coreml/split_einsum"].components["controlled_unet"].precision
        == "6bit"
    )


def test_a_wrong_label_is_reported(tiny_bundle: Path, tmp_path: Path) -> None:
    import json
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    path = copy / "manifest.json"
    path.chmod(0o644)
    data = json.loads(path.read_text())
    data["sections"]["onnx/fp32"]["components"]["unet"]["precision"] = "int8"
    path.write_text(json.dumps(data))
    assert label_problems(copy) == ["onnx/fp32 unet: labelled int8, its files hold fp32"]
