"""The ONNX backend says which execution providers its sessions really got, and when CUDA/TensorRT fell back."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from sdkiln.runtime.backends.onnx import describe, fell_back


def test_fell_back() -> None:
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert fell_back(cuda, ["CPUExecutionProvider"])
    assert not fell_back(cuda, cuda)
    assert not fell_back(["CPUExecutionProvider"], ["CPUExecutionProvider"])
    trt = ["TensorrtExecutionProvider", *cuda]
    assert fell_back(trt, cuda)  # TensorRT asked for, CUDA got: a fallback too


def test_description_before_loading_says_requested() -> None:
    assert describe("1.32.0", ["CUDAExecutionProvider", "CPUExecutionProvider"], {}) == (
        "onnxruntime 1.32.0 (requested CUDAExecutionProvider, CPUExecutionProvider)"
    )


def test_a_cuda_session_that_got_the_cpu_says_so(
    nvidia_bundle: Path,
    nvidia_manifest: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """This machine's onnxruntime has no CUDA provider. Claim it has, ask for CUDA, and ONNX Runtime
    quietly builds a CPU session: the backend must notice (session.get_providers()) and say so."""
    import onnxruntime as ort

    from sdkiln.runtime.backends.onnx import OnnxBackend

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime really has CUDA")
    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
    section = nvidia_manifest.sections["onnx/fp32"]
    comps = {k: v.model_dump(mode="json") for k, v in section.components.items()}
    backend = OnnxBackend(nvidia_bundle / "onnx/fp32", comps, provider="cuda")
    assert "requested CUDAExecutionProvider" in backend.description
    with caplog.at_level(logging.WARNING, logger="sdkiln.runtime.backends.onnx"):
        backend.component("vae_decoder")
    assert backend.providers == {"vae_decoder": ["CPUExecutionProvider"]}
    assert backend.description.endswith(
        "(CPUExecutionProvider); requested CUDAExecutionProvider but fell back to CPUExecutionProvider for vae_decoder"
    )
    assert "asked for CUDAExecutionProvider but runs on CPUExecutionProvider" in caplog.text


def test_a_cpu_session_is_plain(nvidia_bundle: Path, nvidia_manifest: Any) -> None:
    from sdkiln.runtime.backends.onnx import OnnxBackend

    section = nvidia_manifest.sections["onnx/fp32"]
    comps = {k: v.model_dump(mode="json") for k, v in section.components.items()}
    backend = OnnxBackend(nvidia_bundle / "onnx/fp32", comps, provider="cpu")
    backend.component("vae_decoder")
    assert backend.description.endswith("(CPUExecutionProvider)")
