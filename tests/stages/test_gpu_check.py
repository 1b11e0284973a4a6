"""``make gpu-check`` on a machine that cannot run it: exit 2, one clear message, a report saying why.

The script is run the way the Makefile runs it (a file, in a fresh interpreter), so what is checked is
what a user without a GPU sees.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from testkit import REPO

from sdkiln.stages import STAGES

SCRIPT = REPO / "stages" / "gpu_check.py"


def _run(tmp_path: Path, path_dirs: list[Path]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    # Only the interpreter's folder and the given ones: no nvidia-smi unless a test puts one there.
    env["PATH"] = os.pathsep.join(
        [str(p) for p in path_dirs] + [str(Path(sys.executable).parent), "/usr/bin", "/bin"]
    )
    out = tmp_path / "report"
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--wheels", str(tmp_path / "no-wheels")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )


def _fake_smi(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    smi = folder / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '0, NVIDIA H200, 9.0, 143771 MiB, 580.159.03'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    return folder


def test_no_gpu_exits_2_with_a_report(tmp_path: Path) -> None:
    if Path("/usr/bin/nvidia-smi").exists():
        pytest.skip("this machine has nvidia-smi")
    res = _run(tmp_path, [])
    assert res.returncode == 2, res.stderr
    assert "gpu-check: no NVIDIA GPU found" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    report = json.loads((tmp_path / "report" / "gpu-check.json").read_text())
    assert report["skipped"][0]["what"] == "everything"
    assert "no NVIDIA GPU" in report["skipped"][0]["why"]
    assert report["timings"] == [] and report["parity"] == []
    assert "## Skipped" in (tmp_path / "report" / "gpu-check.md").read_text()


def test_a_gpu_but_a_cpu_torch_exits_2(tmp_path: Path) -> None:
    """nvidia-smi lists a GPU (a stand-in here), but this PyTorch is a CPU build: the second gate."""
    pytest.importorskip("torch", reason="checks the message about a CPU-only PyTorch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA PyTorch")
    res = _run(tmp_path, [_fake_smi(tmp_path / "bin")])
    assert res.returncode == 2, res.stderr
    assert "cannot use the GPU (a CPU-only build)" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    report = json.loads((tmp_path / "report" / "gpu-check.json").read_text())
    assert report["environment"]["gpus"][0]["name"] == "NVIDIA H200"


def test_markdown_report_lists_every_section() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    data = {
        "started": "t0",
        "finished": "t1",
        "environment": {"device": "NVIDIA H200"},
        "phases": {"tiny-nvidia build": {"seconds": 12.0, "bundle": "x"}},
        "parity": [
            {
                "backend": "tensorrt",
                "task": "text",
                "psnr_db": 41.2,
                "ssim": 0.99,
                "pass": True,
                "description": "d",
            }
        ],
        "timings": [
            {
                "model": "sd-turbo",
                "backend": "tensorrt",
                "what": "UNet step",
                "batch": 1,
                "median_ms": 9.0,
                "min_ms": 8.5,
                "repeats": 10,
            }
        ],
        "targets": {"sd-turbo text 1-step b1": {"limit_ms": 25.0}},
        "skipped": [{"what": "ONNX Runtime CUDA provider", "why": "onnxruntime-gpu is not installed"}],
        "failures": [],
    }
    md = gpu_check.markdown(data)
    for heading in ("## Machine", "## Phases", "## Parity", "## Timings", "## Targets", "## Skipped"):
        assert heading in md
    assert "| sd-turbo text 1-step b1 | 25.0 | not measured |" in md
    assert "## Failures" not in md


@pytest.mark.parametrize("model", ["sd-turbo", "sd15-controlnet"])
def test_the_recipes_gpu_check_writes_validate_and_plan(tmp_path: Path, model: str) -> None:
    from sdkiln.stages.engine import plan
    from sdkiln.stages.engine.plugins import registry
    from sdkiln.stages.engine.recipe import load_recipe

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    path = gpu_check.real_recipe(model, tmp_path, {"tensorrt": True, "cuda_bindings": True})
    recipe = load_recipe(path, registry(STAGES))
    assert [s.stage.name for s in recipe.steps][-1] == "build_tensorrt"
    assert all(r.status == "MISS" for r in plan(path, tmp_path / "artifacts", stages=STAGES))
    no_trt = gpu_check.real_recipe(model, tmp_path, {})
    assert [s.stage.name for s in load_recipe(no_trt, registry(STAGES)).steps] == [
        "load_pipeline",
        "export_onnx",
    ]
