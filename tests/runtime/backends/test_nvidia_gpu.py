"""On an NVIDIA GPU (opt in: ``pytest -m gpu``): engines built, refitted, loaded and run; torch_cuda parity.

Needs an NVIDIA GPU (compute capability 7.5+) with a CUDA build of PyTorch; the TensorRT tests also need
TensorRT 10+ and ``cuda-bindings`` (``pip install tensorrt-cu12 'sdkiln[nvidia]'``). ``make gpu-check``
runs the same paths end to end with timings; these are the assertions.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from testkit import nvidia_cpu_recipe as _nvidia_cpu_recipe

from sdkiln.stages import STAGES

pytestmark = pytest.mark.gpu

FP16_FLOOR_DB = 28.0


def _needs_cuda_torch():
    torch = pytest.importorskip("torch", reason="needs PyTorch with CUDA")
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU visible to a CUDA build of PyTorch")
    return torch


def _needs_tensorrt():
    from sdkiln.runtime.backends import nvidia
    from sdkiln.runtime.contract.errors import UserError
    from sdkiln.stages.engine.needs import unmet_needs

    problems = unmet_needs({"gpu", "tensorrt"})
    if problems:
        pytest.skip("needs an NVIDIA GPU, TensorRT 10+ and cuda-bindings: " + "; ".join(problems))
    try:
        return nvidia.require_tensorrt()
    except UserError as e:  # pragma: no cover - covered by unmet_needs
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def engine_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CPU recipe plus engines for both LoRAs; the second is refitted from the first."""
    _needs_tensorrt()
    from sdkiln.stages.engine import build

    recipe = copy.deepcopy(_nvidia_cpu_recipe())
    recipe["name"] = "nvidia-gpu"
    recipe["steps"] += [
        {
            "id": "engines",
            "stage": "build_tensorrt",
            "inputs": {"onnx": "trt_onnx"},
            "params": {"optimization_level": 1},
        },
        {
            "id": "engines_b",
            "stage": "build_tensorrt",
            "inputs": {"onnx": "trt_onnx_b", "engines": "engines"},
            "bundle": "lora-b/engines",
            "params": {"optimization_level": 1},
        },
    ]
    root = tmp_path_factory.mktemp("nvidia-gpu")
    path = root / "nvidia-gpu.yaml"
    path.write_text(
        "# Build: sdkiln build nvidia-gpu.yaml (tests)\n" + yaml.safe_dump(recipe, sort_keys=False)
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SDKILN_TRT_CACHE", str(root / "trt-cache"))
        return build(path, root / "artifacts", stages=STAGES).bundle


def _parity(bundle: Path, **kwargs) -> list[tuple[str, float]]:
    from sdkiln.runtime.load import load
    from sdkiln.runtime.parity import available_cases, compare, run_case

    ref = load(bundle, backend="torch")
    pipe = load(bundle, **kwargs)
    return [(c.task, compare(run_case(ref, c), run_case(pipe, c))["psnr_db"]) for c in available_cases(ref)]


def test_engines_refit_and_bookkeeping(engine_bundle: Path) -> None:
    import json

    m = json.loads((engine_bundle / "manifest.json").read_text())
    a, b = m["sections"]["tensorrt/engines"], m["sections"]["lora-b/engines"]
    assert a["kind"] == b["kind"] == "tensorrt_engine"
    tag = a["extra"]["target"]["tag"]
    assert (engine_bundle / "tensorrt/engines" / tag / "unet.plan").is_file()
    refitted = b["extra"]["refit"]["refitted"]
    assert refitted["unet"]["from_step"] == "engines" and refitted["unet"]["changed"] > 0
    # The refitted engine passed its own parity gate against ONNX Runtime on the second LoRA's graph.
    assert b["metrics"]["parity"]["unet"]["worst"]["sqnr_db"] >= 28.0


def test_tensorrt_backend_parity(engine_bundle: Path) -> None:
    _needs_cuda_torch()
    for cuda_graphs in (False, True):
        for task, psnr in _parity(engine_bundle, backend="tensorrt", cuda_graphs=cuda_graphs):
            assert psnr >= FP16_FLOOR_DB, (task, cuda_graphs, psnr)


def test_engines_built_on_first_use_then_cached(engine_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    import json

    from sdkiln.runtime.backends.tensorrt import TensorrtBackend

    monkeypatch.setenv("SDKILN_TRT_CACHE", str(tmp_path / "cache"))
    m = json.loads((engine_bundle / "manifest.json").read_text())
    section = "tensorrt/onnx-fp16"
    args = (engine_bundle / section, m["sections"][section], m["files"], section, [])
    first = TensorrtBackend(*args, optimization_level=1)
    first.component("vae_decoder")
    assert first.origins == {"vae_decoder": "build"}
    second = TensorrtBackend(*args, optimization_level=1)
    second.component("vae_decoder")
    assert second.origins == {"vae_decoder": "cache"}
    assert any((tmp_path / "cache" / "timing").glob("*.cache"))


def test_torch_cuda_parity(tmp_path_factory: pytest.TempPathFactory) -> None:
    _needs_cuda_torch()
    from sdkiln.stages.engine import build

    recipe = _nvidia_cpu_recipe()
    recipe["steps"] = recipe["steps"][:2]  # base + fused: the torch/fused section
    recipe["name"] = "nvidia-torch"
    root = tmp_path_factory.mktemp("nvidia-torch")
    path = root / "nvidia-torch.yaml"
    path.write_text(
        "# Build: sdkiln build nvidia-torch.yaml (tests)\n" + yaml.safe_dump(recipe, sort_keys=False)
    )
    bundle = build(path, root / "artifacts", stages=STAGES).bundle
    for kwargs in ({}, {"compile": "default"}, {"cuda_graphs": True}):
        for task, psnr in _parity(bundle, backend="torch_cuda", **kwargs):
            assert psnr >= FP16_FLOOR_DB, (task, kwargs, psnr)
