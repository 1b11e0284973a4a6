"""The Core ML backend's translation to Apple's package interface, checked on Linux.

Core ML cannot predict off macOS, so ``coremltools`` is replaced by a stand-in whose ``MLModel`` runs
the exporter's own Apple-interface torch modules (``common.coreml.io.build_module``: the modules that
export_coreml converts) with the package specs the exporter plans (``common.coreml.io.plan_component``).
The images must match the PyTorch reference: names, layouts ((B, D, 1, 77) text states, residual order,
VAE moments) and batch splitting are all exercised. On a Mac the real packages run (``macos`` marker).
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from sdkiln.runtime import load
from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.parity import CASES, compare, floor_for, run_case

torch = pytest.importorskip("torch", reason="the stand-in packages run torch modules")

KEYS = (
    "text_encoder",
    "unet",
    "controlled_unet",
    "controlnet.scribble",
    "controlnet.canny",
    "vae_decoder",
    "vae_encoder",
)


class _FakeMLModel:
    # path -> (module, input names, output names, the batch sizes the package takes)
    registry: dict[str, tuple[torch.nn.Module, list[str], list[str], list[int]]] = {}
    calls: list[tuple[str, int]] = []

    def __init__(self, path: str, compute_units: object = None):
        self.path = path
        self.module, self.inputs, self.outputs, self.batches = self.registry[path]

    def predict(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = feeds[self.inputs[0]].shape[0]
        # Core ML refuses a batch the package does not declare.
        assert rows in self.batches, f"{self.path}: batch {rows}, the package takes {self.batches}"
        self.calls.append((Path(self.path).name, rows))
        args = [torch.from_numpy(np.asarray(feeds[n], np.float32)) for n in self.inputs]
        with torch.no_grad():
            out = self.module(*args)
        outs = out if isinstance(out, tuple | list) else (out,)
        return {n: o.numpy() for n, o in zip(self.outputs, outs, strict=True)}


def _coreml_bundle(root: Path, source: Path, batch: int, sizes: list[int] | None = None) -> Path:
    """``source``'s torch/fused section plus a coreml/original section of stand-in packages (latent 8x8);
    ``sizes``: the batch sizes a flexible UNet/ControlNet takes (declared at the first), else ``batch``."""
    from sdkiln.stages.common.coreml import io as cio
    from sdkiln.stages.common.torch.pipeline import read_configs

    manifest = json.loads((source / "manifest.json").read_text())
    ref = next(k for k, v in manifest["sections"].items() if v["kind"] == "pipeline")
    shutil.copytree(source / ref, root / "torch" / "fused")
    pipeline = root / "torch" / "fused"
    section = root / "coreml" / "original"
    configs = read_configs(pipeline)
    components = {}
    for key in KEYS:
        ckey = cio.config_key(key)
        config = configs.get(ckey) or json.loads(
            (pipeline / "controlnet" / key.split(".")[1] / "config.json").read_text()
        )
        batched = key in cio.UNET_KEYS or key.startswith("controlnet.")
        b = (sizes[0] if sizes else batch) if batched else 1
        plan = cio.plan_component(key, {**config, "latent_channels": 4}, b, (8, 8), 8, False)
        rel = cio.package_relpath(key)
        (section / rel).mkdir(parents=True)
        (section / rel / "Manifest.json").write_text("{}")
        model = cio.load_model(pipeline, key, "CLIPTextModel" if key == "text_encoder" else None)
        module = cio.build_module(key, model, "original", False)
        _FakeMLModel.registry[str(section / rel)] = (
            module,
            [t.name for t in plan.inputs],
            list(plan.output_names),
            list(sizes) if sizes and batched else [b],
        )
        components[key] = {
            "path": rel,
            "inputs": [t.to_manifest() for t in plan.inputs],
            "outputs": [{"name": n, "dtype": "float32", "shape": []} for n in plan.output_names],
            **({"batch_sizes": list(sizes)} if sizes and batched else {}),
        }
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(pipeline / "tokenizer" / name, section / name)
    from sdkiln.runtime.contract.digest import file_table

    fused = manifest["sections"][ref]
    extra = {"family": "sd15", "precision": "fp32", "height": 64, "width": 64, "batch": batch}
    sections = {
        "torch/fused": fused,
        "coreml/original": {"kind": "coreml", "components": components, "extra": extra},
    }
    (root / "manifest.json").write_text(json.dumps({"files": file_table(root), "sections": sections}))
    return root


@pytest.fixture
def fake_coremltools(monkeypatch):
    fake = types.ModuleType("coremltools")
    fake.__version__ = "stand-in"
    fake.ComputeUnit = types.SimpleNamespace(
        ALL="all", CPU_ONLY="cpu_only", CPU_AND_NE="ne", CPU_AND_GPU="gpu"
    )
    fake.models = types.SimpleNamespace(MLModel=_FakeMLModel)
    monkeypatch.setitem(sys.modules, "coremltools", fake)
    monkeypatch.setattr("sdkiln.runtime.backends.coreml._on_macos", lambda: True)
    return fake


@pytest.mark.parametrize(
    ("source", "batch", "sizes"),
    [
        ("tiny_lcm_bundle", 1, None),
        ("tiny_bundle", 2, None),
        ("tiny_lcm_bundle", 2, [2, 1]),
        ("tiny_bundle", 2, [2, 1]),
    ],
    ids=["lcm-b1", "cfg-b2", "lcm-flexible", "cfg-flexible"],
)
def test_coreml_backend_matches_the_reference(
    request, tmp_path: Path, fake_coremltools, source: str, batch: int, sizes: list[int] | None
):
    bundle = _coreml_bundle(tmp_path / "bundle", request.getfixturevalue(source), batch, sizes)
    _FakeMLModel.calls.clear()
    coreml = load(bundle, backend="coreml")
    reference = load(bundle, backend="torch")
    assert coreml.info.default_size == (64, 64)
    for case in CASES:
        steps = 2
        m = compare(run_case(reference, case, steps=steps, size=64), run_case(coreml, case, steps=steps))
        assert m["psnr_db"] >= floor_for("fp32"), (case.task, m)
    if sizes:
        # A flexible package runs the loop's batch in one call: LCM (no CFG) batch 1, CFG batch 2.
        unet_rows = {rows for name, rows in _FakeMLModel.calls if "Unet" in name}
        assert unet_rows == ({1} if source == "tiny_lcm_bundle" else {2}), unet_rows
    with pytest.raises(
        UserError, match="not one this bundle was exported for: its UNet takes height 64 px only"
    ):
        coreml.text("a car", steps=1, height=128, width=64)


def test_coreml_off_macos_is_a_user_error(tiny_bundle: Path) -> None:
    if sys.platform == "darwin":
        pytest.skip("this checks the message on other systems")
    with pytest.raises(UserError, match="the coreml backend runs only on macOS"):
        load(tiny_bundle, backend="coreml")
