"""Without a GPU or TensorRT, every NVIDIA entry point stops with exit 2 and says what is missing.

These run on this CPU-only machine as they are (no GPU, no TensorRT), so they check the real messages.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from testkit import REPO, folder_artifact

from sdkiln.runtime.contract.errors import UserError
from sdkiln.stages.cli import main
from sdkiln.stages.engine.needs import check_needs, unmet_needs


@pytest.fixture(autouse=True)
def _no_gpu_here(monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi: the no-GPU messages cannot be checked here")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def test_unmet_needs_name_the_fix() -> None:
    problems = unmet_needs({"gpu", "tensorrt"})
    assert problems[0].startswith("gpu: no NVIDIA GPU found")
    assert "nvidia-smi" in problems[0]
    assert problems[1].startswith("tensorrt: TensorRT is not installed")
    assert "pip install tensorrt-cu12" in problems[1]
    assert unmet_needs({"network"}) == []
    assert unmet_needs({"warp-drive"}) == ["warp-drive: unknown need (known: network, gpu, macos, tensorrt)"]


def test_check_needs_of_the_stage() -> None:
    from sdkiln.stages.build_tensorrt import STAGE

    with pytest.raises(UserError, match=r"step engines \(build_tensorrt\) cannot run on this machine") as e:
        check_needs(STAGE, "engines")
    assert "gpu:" in str(e.value) and "tensorrt:" in str(e.value)


def test_build_exits_2_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The engine steps come last in the recipe, yet nothing runs: the check comes before the first step."""
    artifacts = tmp_path / "artifacts"
    code = main(["--artifacts", str(artifacts), "build", str(REPO / "recipes" / "tiny-nvidia.yaml")])
    out, err = capsys.readouterr()
    assert code == 2
    assert "step(s) need what this machine lacks; nothing was run" in err
    assert "step engines (build_tensorrt): gpu: no NVIDIA GPU found" in err
    assert "no NVIDIA GPU found" in err and "TensorRT is not installed" in err
    assert "Traceback" not in out + err
    cache = artifacts / "cache"
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")] if cache.is_dir() else []
    assert entries == [], "a step ran although the build could not finish"


def test_stage_run_refuses_without_gpu(tmp_path: Path) -> None:
    """Called directly (no engine in front), the stage itself refuses before any work."""
    from sdkiln.stages.build_tensorrt import STAGE
    from sdkiln.stages.engine.core import StageContext

    unet = {
        "path": "unet/model.onnx",
        "inputs": [{"name": "sample", "dtype": "float32", "shape": ["batch", 4, 8, 8]}],
    }
    prof = {"sample": {"min": [1, 4, 8, 8], "opt": [1, 4, 8, 8], "max": [1, 4, 8, 8]}}
    (tmp_path / "src").mkdir()
    src = folder_artifact(
        "trt_onnx",
        tmp_path / "src",
        "tensorrt",
        components={"unet": unet},
        details={"profiles": {"unet": prof}},
    )
    (tmp_path / "out").mkdir()
    ctx = StageContext(
        "engines", STAGE, STAGE.params(), {"onnx": src}, tmp_path / "out", tmp_path, {}, {}, tmp_path
    )
    with pytest.raises(UserError, match="no NVIDIA GPU found"):
        STAGE.run(ctx)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        ("tensorrt", "TensorRT is not installed"),
        ("torch_cuda", "needs a CUDA build of PyTorch"),
    ],
)
def test_run_with_a_gpu_backend_exits_2(
    backend: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["run", "text", "--model", str(REPO), "--backend", backend, "--prompt", "a lighthouse"])
    out, err = capsys.readouterr()
    assert code == 2
    assert message in err
    assert "Traceback" not in out + err


def test_runtime_load_refuses_before_reading_the_bundle(tmp_path: Path) -> None:
    import sdkiln.runtime

    with pytest.raises(UserError, match="TensorRT is not installed"):
        sdkiln.runtime.load(tmp_path / "no-such-bundle", backend="tensorrt")


def test_cuda_runtime_without_a_driver_is_a_user_error() -> None:
    """With NVIDIA's real bindings installed (``sdkiln[nvidia]``) on a machine without a driver or GPU."""
    pytest.importorskip("cuda.bindings.runtime", reason="needs cuda-bindings (pip install 'sdkiln[nvidia]')")
    from sdkiln.runtime.backends.cuda_rt import CudaRuntime

    CudaRuntime._instance = None
    with pytest.raises(UserError, match=r"CUDA cannot run on this machine: cudaGetDeviceCount returned"):
        CudaRuntime.open()


def test_cuda_bindings_missing_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from sdkiln.runtime.backends import cuda_rt

    real_import = builtins.__import__

    def no_cuda(name, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if name == "cuda" or name.startswith("cuda."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cuda)
    with pytest.raises(UserError, match=r"pip install 'sdkiln\[nvidia\]'"):
        cuda_rt._import_cudart()
