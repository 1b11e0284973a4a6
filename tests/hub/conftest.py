"""Fixtures for the Hub tests: a loopback Hub server per test and small, valid bundle folders.

The server is this folder's ``hub_server.py``, bound to 127.0.0.1 on a free port, started and stopped
around each test. Clients reach it through ``endpoint=`` (or ``HF_ENDPOINT``) with Xet switched off, as a
private Hub without Xet storage needs. Writes require the token the ``HF_TOKEN`` variable carries, so
every test also proves the token is taken from huggingface_hub's usual source.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
TEST_TOKEN = "hf_loopbackTestToken0123456789"


def _load_server_module() -> Any:
    # Tests import with --import-mode=importlib: load the helper by path under a unique name.
    name = "sdkiln_tests_hub_server"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "hub_server.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


hub_server = _load_server_module()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """A running loopback Hub; the client is set up as for a private Hub without Xet."""
    from huggingface_hub import constants
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    # huggingface_hub reads HF_HUB_DISABLE_XET at import; the constant is what its upload path checks.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("SDKILN_HUB_CACHE", str(tmp_path / "hub-cache"))
    disable_progress_bars()
    server = hub_server.HubServer(token=TEST_TOKEN).start()
    try:
        yield server
    finally:
        server.stop()
        enable_progress_bars()
    assert server.state.server_errors == [], "the loopback Hub hit a bug of its own"


def _blob(seed: int, size: int) -> bytes:
    # Binary (NUL bytes guaranteed) so the server stores it in LFS, like real weights.
    rng = random.Random(seed)
    return b"\0ONNX" + rng.randbytes(size - 5)


BASE_REPO = "runwayml/stable-diffusion-v1-5"
LORA_REPO = "latent-consistency/lcm-lora-sdv1-5"


def write_bundle(
    root: Path,
    name: str = "tiny",
    variant: int = 0,
    sections: tuple[str, ...] | None = None,
    base_sha: str = "1" * 40,
) -> Path:
    """A small bundle folder in the engine's layout with a correct manifest (real sha256 of real files).

    ``variant`` changes the int8 UNet's bytes (a rebuilt bundle); ``sections`` limits the sections;
    ``base_sha`` is the base pipeline's pinned commit (as load_pipeline records it).
    """
    bundle = root / name
    want = sections or ("onnx/fp32", "onnx/int8", "coreml/split_einsum")
    files: dict[str, bytes] = {}
    recipe = {
        "name": name,
        "description": "Tiny test bundle: SD 1.5-shaped, LCM-fused, with a scribble ControlNet.",
        "steps": [
            {"id": "base", "stage": "load_pipeline", "params": {"repo_id": "runwayml/stable-diffusion-v1-5"}},
            {"id": "onnx", "stage": "export_onnx", "inputs": {"model": "base"}},
        ],
    }
    sections_meta: dict[str, Any] = {}
    # As load_pipeline records a Hub source; fuse_lora and the exporters carry it forward.
    source = {"source": "hub", "repo": BASE_REPO, "revision": "main", "sha": base_sha, "variant": None}
    onnx_components = {
        "unet": {
            "path": "unet/model.onnx",
            "precision": "fp32",
            "inputs": [
                {"name": "sample", "dtype": "float32", "shape": ["batch", 4, "latent_height", "latent_width"]}
            ],
            "outputs": [
                {
                    "name": "out_sample",
                    "dtype": "float32",
                    "shape": ["batch", 4, "latent_height", "latent_width"],
                }
            ],
        },
        "text_encoder": {"path": "text_encoder/model.onnx", "precision": "fp32", "inputs": [], "outputs": []},
        "vae_decoder": {"path": "vae_decoder/model.onnx", "precision": "fp32", "inputs": [], "outputs": []},
        "controlnet.scribble": {
            "path": "controlnet/scribble/model.onnx",
            "precision": "fp32",
            "inputs": [],
            "outputs": [],
        },
    }
    if "onnx/fp32" in want:
        base = "onnx/fp32"
        files[f"{base}/model_index.json"] = json.dumps({"_class_name": "StableDiffusionPipeline"}).encode()
        for i, comp in enumerate(("unet", "text_encoder", "vae_decoder", "controlnet/scribble")):
            files[f"{base}/{comp}/model.onnx"] = _blob(10 + i, 20_000 + 1000 * i)
            files[f"{base}/{comp}/config.json"] = json.dumps({"component": comp}).encode()
        files[f"{base}/unet/model.onnx_data"] = _blob(99, 30_000)
        files[f"{base}/tokenizer/vocab.json"] = json.dumps({"a": 0, "b": 1}).encode()
        files[f"{base}/scheduler/scheduler_config.json"] = json.dumps(
            {"_class_name": "LCMScheduler"}
        ).encode()
        sections_meta[base] = {
            "step": "onnx",
            "stage": "export_onnx",
            "kind": "onnx",
            "params": {"precision": "fp32"},
            "metrics": {
                "parity": {"unet": {"max_abs": 2.1e-6}, "vae_decoder": {"max_abs": 1.5e-6}},
                "duration_s": 3.25,
            },
            "components": onnx_components,
            "extra": {
                "family": "sd15",
                "controlnets": ["scribble"],
                "lcm": True,
                "taesd": False,
                "source": source,
            },
        }
    if "onnx/int8" in want:
        base = "onnx/int8"
        files[f"{base}/unet/model.onnx"] = _blob(200 + variant, 12_000)
        files[f"{base}/unet/config.json"] = json.dumps({"component": "unet"}).encode()
        sections_meta[base] = {
            "step": "unet_int8",
            "stage": "quantize_onnx",
            "kind": "onnx",
            "params": {"precision": "int8"},
            "metrics": {"parity": {"unet": {"sqnr_db": 31.5}}, "bits_per_weight": {"unet": 8.0}},
            "components": {"unet": {**onnx_components["unet"], "precision": "int8"}},
            "extra": {"family": "sd15", "precision": "int8"},
        }
    if "coreml/split_einsum" in want:
        base = "coreml/split_einsum"
        pkg = f"{base}/packages/Unet.mlpackage"
        files[f"{pkg}/Manifest.json"] = json.dumps({"fileFormatVersion": "1.0.0"}).encode()
        files[f"{pkg}/Data/com.apple.CoreML/model.mlmodel"] = _blob(300, 4_000)
        files[f"{pkg}/Data/com.apple.CoreML/weights/weight.bin"] = _blob(301, 16_000)
        files[f"{base}/vocab.json"] = json.dumps({"a": 0}).encode()
        files[f"{base}/merges.txt"] = b"#version: 0.2\na b\n"
        sections_meta[base] = {
            "step": "coreml",
            "stage": "export_coreml",
            "kind": "coreml",
            "params": {"attention": "split_einsum"},
            "metrics": {"parity": {"unet": {"psnr_db": 48.2}}, "bits_per_weight": {"unet": 16.0}},
            "components": {"unet": {"path": "packages/Unet.mlpackage", "precision": "fp16"}},
            "extra": {"family": "sd15"},
        }
    lock = {  # the engine's build.lock.json: per step its key data, with the pins it resolved
        "schema": 1,
        "recipe": name,
        "steps": {
            "base": {"key": "k" * 64, "pins": {f"hub:base:{BASE_REPO}": {"ref": "main", "sha": base_sha}}},
            "fused": {"key": "f" * 64, "pins": {f"hub:lora.0:{LORA_REPO}": {"ref": "main", "sha": "3" * 40}}},
        },
    }
    import yaml

    files["recipe.yaml"] = yaml.safe_dump(recipe, sort_keys=False).encode()
    files["build.lock.json"] = json.dumps(lock, indent=2, sort_keys=True).encode()
    for rel, data in files.items():
        path = bundle / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    manifest = {
        "schema": 1,
        "name": name,
        "recipe": recipe,
        "lock": lock,
        "files": {
            rel: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            for rel, data in sorted(files.items())
        },
        "sections": sections_meta,
        "environment": {"python": "3.11.7", "packages": {"onnx": "1.23.2", "huggingface_hub": "2.4.0"}},
    }
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return bundle


@pytest.fixture
def make_bundle(tmp_path: Path) -> Callable[..., Path]:
    """``make_bundle(name=, variant=, sections=, base_sha=)`` → a fresh bundle folder (see write_bundle)."""
    counter = iter(range(1000))

    def make(**kwargs: Any) -> Path:
        return write_bundle(tmp_path / f"bundles-{next(counter)}", **kwargs)

    return make
