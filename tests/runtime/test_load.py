"""Which section the loader runs: the preferred one, the only one of the backend's kind, or an error that
lists the candidates (it never picks one of several by name)."""

from __future__ import annotations

import logging

import pytest

from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.manifest import BundleManifest
from sdkiln.runtime.load import pick_section


def _manifest(sections: dict[str, tuple[str, str]]) -> BundleManifest:
    return BundleManifest.model_validate(
        {
            "files": {},
            "sections": {
                name: {"kind": kind, "components": {"unet": {"precision": prec}}}
                for name, (kind, prec) in sections.items()
            },
        }
    )


def test_the_preferred_section_wins():
    m = _manifest({"onnx/fp32": ("onnx", "fp32"), "onnx/int8": ("onnx", "int8")})
    assert pick_section(m, "onnx", None) == "onnx/fp32"
    assert pick_section(m, "onnx", "onnx/int8") == "onnx/int8"


def test_the_only_section_of_its_kind_is_used_and_named(caplog):
    m = _manifest({"onnx/int8": ("onnx", "int8"), "torch/base": ("pipeline", "fp32")})
    with caplog.at_level(logging.INFO, logger="sdkiln.runtime.load"):
        assert pick_section(m, "onnx", None) == "onnx/int8"
    assert "using onnx/int8, its only onnx section" in caplog.text


def test_two_candidates_and_no_preferred_one_is_an_error_listing_both():
    m = _manifest({"onnx/int8": ("onnx", "int8"), "onnx/fp16": ("onnx", "fp16")})
    with pytest.raises(UserError) as e:
        pick_section(m, "onnx", None)
    msg = str(e.value)
    assert "onnx/fp16 (fp16), onnx/int8 (int8)" in msg and "--section" in msg


def test_a_section_of_another_kind_is_refused():
    m = _manifest({"onnx/fp32": ("onnx", "fp32"), "torch/fused": ("pipeline", "fp32")})
    with pytest.raises(UserError, match="section 'torch/fused' is 'pipeline'; the onnx backend runs 'onnx'"):
        pick_section(m, "onnx", "torch/fused")
