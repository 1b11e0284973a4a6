"""Typed manifests: schema 2 round trips, schema 1 bundles are upgraded, newer schemas are refused, and
verification reports missing, extra and changed files with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdkiln.runtime.contract.digest import digest_of, file_table
from sdkiln.runtime.contract.errors import CorruptArtifactError, SchemaError
from sdkiln.runtime.contract.manifest import (
    SCHEMA_VERSION,
    BundleManifest,
    precision_of,
    read_bundle_manifest,
    verify_bundle_sections,
    verify_files,
)


def _bundle(root: Path, sections: dict, schema: int | None = SCHEMA_VERSION) -> Path:
    (root / "onnx" / "fp32" / "unet").mkdir(parents=True)
    (root / "onnx" / "fp32" / "unet" / "model.onnx").write_bytes(b"graph")
    (root / "recipe.yaml").write_text("name: x\n")
    files = file_table(root)
    data = {"name": "x", "files": files, "digest": digest_of(files), "sections": sections}
    if schema is not None:
        data["schema"] = schema
    (root / "manifest.json").write_text(json.dumps(data))
    return root


def test_schema_1_extra_is_upgraded_to_model_facts_and_details(tmp_path: Path) -> None:
    old = {
        "onnx/fp32": {
            "kind": "onnx",
            "step": "onnx",
            "components": {
                "unet": {"path": "unet/model.onnx", "precision": "fp32", "inputs": [], "outputs": []}
            },
            "extra": {"family": "sd15", "lcm": True, "controlnets": ["scribble"], "exporter": "torchscript"},
        },
        "coreml/x": {"kind": "coreml", "extra": {"family": "sd15", "height": 256, "width": 320, "batch": 1}},
    }
    m = read_bundle_manifest(_bundle(tmp_path, old, schema=None))
    assert m.schema_ == SCHEMA_VERSION
    onnx = m.sections["onnx/fp32"]
    assert onnx.model is not None and onnx.model.family == "sd15" and onnx.model.lcm
    assert onnx.model.controlnets == ["scribble"] and onnx.details == {"exporter": "torchscript"}
    assert m.sections["coreml/x"].model.image_size == [256, 320]
    assert m.sections["coreml/x"].details == {"height": 256, "width": 320, "batch": 1}


def test_a_newer_schema_is_refused_naming_both_versions(tmp_path: Path) -> None:
    _bundle(tmp_path, {}, schema=SCHEMA_VERSION + 1)
    with pytest.raises(SchemaError, match=f"schema {SCHEMA_VERSION + 1}; this sdkiln reads schemas 1, 2"):
        read_bundle_manifest(tmp_path)


def test_unknown_keys_are_refused(tmp_path: Path) -> None:
    _bundle(tmp_path, {"onnx/fp32": {"kind": "onnx", "model": {"family": "sd15", "flavour": "x"}}})
    with pytest.raises(CorruptArtifactError, match="model.flavour"):
        read_bundle_manifest(tmp_path)


def test_round_trip_and_derived_precision(tmp_path: Path) -> None:
    comps = {
        "unet": {"path": "unet/model.onnx", "precision": "int8"},
        "vae_decoder": {"path": "vae_decoder/model.onnx", "precision": "fp32"},
    }
    _bundle(tmp_path, {"onnx/fp32": {"kind": "onnx", "components": comps, "model": {"family": "sd15"}}})
    m = read_bundle_manifest(tmp_path)
    assert BundleManifest.model_validate(json.loads(json.dumps(m.to_json()))) == m
    sec = m.sections["onnx/fp32"]
    assert sec.precision == "mixed" and sec.component_precisions() == {"unet": "int8", "vae_decoder": "fp32"}
    assert precision_of({}) == "none"
    assert m.section_of("onnx/fp32/unet/model.onnx") == "onnx/fp32" and m.section_of("recipe.yaml") is None


def test_verification_names_every_bad_file(tmp_path: Path) -> None:
    root = _bundle(tmp_path, {"onnx/fp32": {"kind": "onnx"}})
    m = read_bundle_manifest(root)
    (root / "onnx/fp32/unet/model.onnx").write_bytes(b"GRAPH")  # same size, other bytes
    (root / "recipe.yaml").unlink()
    (root / "stray.txt").write_text("?")
    report = verify_files(root, m.files)
    assert report.changed == ["onnx/fp32/unet/model.onnx"] and report.missing == ["recipe.yaml"]
    assert report.extra == ["stray.txt"] and "sha256 mismatch" in report.why["onnx/fp32/unet/model.onnx"]
    with pytest.raises(CorruptArtifactError, match=r"2 bad file\(s\)") as err:
        verify_bundle_sections(root, m, ["onnx/fp32"])
    assert "recipe.yaml: missing" in str(err.value)
    # A section not in use is not checked (the runtime verifies only what it loads).
    assert verify_bundle_sections(root, m.model_copy(update={"files": {}}), []) == 0
