"""The runtime extra is enough to run a bundle on ONNX Runtime, and nothing imports torch.

A fresh virtualenv (``python -m venv --without-pip``) gets exactly the distributions that
``pip install "sdkiln[runtime]"`` would install, resolved from ``pyproject.toml`` through the
``Requires-Dist`` metadata of what is installed here, and linked in from this environment's
site-packages (no network, a second or two). Then a subprocess in it runs ``sketch`` on the tiny bundle's
ONNX section and reports which modules were imported.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from testkit import REPO

HEAVY = (
    "torch",
    "diffusers",
    "transformers",
    "onnx",
    "onnxscript",
    "coremltools",
    "accelerate",
    "peft",
    "optimum",
    "safetensors",
    "sklearn",
    "matplotlib",
)

pytest.importorskip("packaging", reason="requirement markers are evaluated with packaging")


def runtime_closure() -> dict[str, md.Distribution]:
    """Installed distributions that ``sdkiln[runtime]`` depends on, transitively (by normalized name)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["runtime"]]
    found: dict[str, md.Distribution] = {}
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in found:
            continue
        dist = md.distribution(req.name)
        found[name] = dist
        for spec in dist.requires or []:
            sub = Requirement(spec)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
                todo.append(sub)
    return found


def make_venv(root: Path, dists: dict[str, md.Distribution]) -> Path:
    """A venv whose site-packages holds links to exactly ``dists`` and to the sdkiln source folders."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    site = Path(purelib)
    here = Path(sysconfig.get_paths()["purelib"])
    for name, dist in dists.items():
        if not dist.files:
            pytest.fail(f"{name} has no RECORD; cannot link it into the test venv")
        base = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files if not str(f).startswith("..")}
        for top in sorted(tops - {"__pycache__"}):
            src = base / top
            if src.exists() and not (site / top).exists():
                (site / top).symlink_to(src)
        assert base == here, f"{name} is not installed in {here}"
    # sdkiln itself as a regular install lays it out: sdkiln/{runtime,stages} (a namespace package).
    (site / "sdkiln").mkdir()
    (site / "sdkiln" / "runtime").symlink_to(REPO / "runtime")
    (site / "sdkiln" / "stages").symlink_to(REPO / "stages")
    return python


SCRIPT = """
import importlib.util, json, sys
from sdkiln.runtime import load
from sdkiln.runtime.examples import SKETCHES
pipe = load(sys.argv[1], backend="onnx")
img = pipe.sketch(SKETCHES["car"](), "a red sports car", steps=2, seed=1, height=64, width=64)
heavy = {heavy!r}
print(json.dumps({{
    "size": list(img.size),
    "build_side": sorted(m for m in sys.modules if m == "sdkiln.stages" or m.startswith("sdkiln.stages.")),
    "imported": sorted({{m.split(".")[0] for m in sys.modules}} & set(heavy)),
    "installed": sorted(h for h in heavy if importlib.util.find_spec(h) is not None),
    "backend": pipe.backend.description,
}}))
"""


def test_runtime_extra_installs_no_torch() -> None:
    names = set(runtime_closure())
    assert {"onnxruntime", "tokenizers", "pillow", "numpy"} <= names
    assert not names & {"torch", "diffusers", "transformers", "onnx", "coremltools"}, names


def test_sketch_on_onnx_in_a_fresh_runtime_only_venv(tmp_path: Path, tiny_bundle: Path) -> None:
    python = make_venv(tmp_path / "venv", runtime_closure())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    proc = subprocess.run(
        [python, "-c", SCRIPT.format(heavy=HEAVY), str(tiny_bundle)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["size"] == [64, 64]
    assert report["installed"] == [], f"the runtime venv has build packages: {report['installed']}"
    assert report["imported"] == []
    assert report["build_side"] == [], "running the ONNX backend imported the build side"
    assert report["backend"].startswith("onnxruntime")
