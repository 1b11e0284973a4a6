"""Session-wide fixtures, offline: tiny preset pipelines, tiny bundles built by the real engine, and a
loopback Hugging Face Hub.

- ``tiny_sd15_dir``/``_artifact``: SD 1.5 family, scribble and canny ControlNets (randomised
  zero-convs), TAESD. ``tiny_sdxl_*``: SDXL family, canny ControlNet, TAESD. ``tiny_sd_turbo_*``:
  SD-Turbo (Euler ancestral, trailing timesteps). Each ``*_artifact`` is the ``InputArtifact`` a stage
  receives, with the manifest the engine would write.
- ``tiny_bundle``: ``recipes``-style build of the SD 1.5 preset: ``torch/base`` (the preset, DPM-Solver++),
  ``onnx/fp32`` and ``onnx/int8`` (dynamic INT8: text encoder, UNet, ControlNets, VAE encoder; the VAE
  decoder and TAESD stay fp32), built with ``sdkiln.stages.engine.build``.
- ``tiny_lcm_bundle``: the same preset with an LCM-LoRA fused (``torch/fused``, LCM scheduler) and its
  ``onnx/fp32``/``onnx/int8``; it shares the first build's cache.
- ``real_hub``: a loopback Hub serving every repo the shipped real recipes name, under the real ids and
  layouts with tiny weights (``tests/support/real_repos.py``); ``real_build(name)`` builds
  ``recipes/<name>.yaml`` unchanged through ``sdkiln build`` against it, once per session (all recipes
  share one artifact root; each has its own Hugging Face cache, so its request log shows everything it
  downloaded) and returns a ``RecipeBuild``.
- ``hub``: a running loopback Hub (``tests/support/hub_server.py``); ``make_bundle``: small hand-made
  bundle folders for the publish and fetch tests.
Treat every session fixture as read-only: other tests share them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Tiny models on this shared 2-core machine run 3-5x faster with one intra-op thread than with two
# threads fighting other processes (a 2-step tiny pipeline: 0.18 s vs 0.8 s under load). Set before
# anything imports torch; override by exporting OMP_NUM_THREADS. torch itself is not imported here,
# so tests that check "the runtime does not import torch" stay meaningful.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from testkit import RECIPES, build_recipe, folder_artifact, nvidia_cpu_recipe  # noqa: E402  (tests/support)

_PRESETS = {
    "sd15": "tiny-sd15-controlnet",
    "sdxl": "tiny-sdxl-controlnet",
    "sd_turbo": "tiny-sd-turbo",
}


@pytest.fixture(scope="session", autouse=True)
def _private_hash_memo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The runtime memoises sha256s under $XDG_CACHE_HOME; keep the tests' memo out of the user's home."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


def _preset(factory: pytest.TempPathFactory, key: str) -> Any:
    pytest.importorskip("torch", reason="building tiny presets needs the build extra (torch, diffusers)")
    from sdkiln.runtime.contract.layout import Kind
    from sdkiln.stages.common.torch.presets import save_preset

    out = factory.mktemp(f"preset-{key}") / "pipeline"
    desc = save_preset(_PRESETS[key], out, seed=0)
    return folder_artifact(
        f"tiny_{key}",
        out,
        Kind.PIPELINE,
        stage="load_pipeline",
        components=desc.components,
        model=desc.model,
        metrics={"bytes": desc.bytes},
    )


@pytest.fixture(scope="session")
def tiny_sd15_artifact(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Tiny SD 1.5 pipeline (scribble + canny ControlNets, TAESD in ``vae_tiny/``) as a stage input."""
    return _preset(tmp_path_factory, "sd15")


@pytest.fixture(scope="session")
def tiny_sd15_dir(tiny_sd15_artifact: Any) -> Path:
    return tiny_sd15_artifact.path


@pytest.fixture(scope="session")
def tiny_sdxl_artifact(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Tiny SDXL pipeline (two text encoders, pooled embeds + time ids), canny ControlNet, TAESD."""
    return _preset(tmp_path_factory, "sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tiny_sdxl_artifact: Any) -> Path:
    return tiny_sdxl_artifact.path


@pytest.fixture(scope="session")
def tiny_sd_turbo_artifact(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Tiny SD-Turbo pipeline (1-step Euler ancestral, no guidance)."""
    return _preset(tmp_path_factory, "sd_turbo")


@pytest.fixture(scope="session")
def tiny_sd_turbo_dir(tiny_sd_turbo_artifact: Any) -> Path:
    return tiny_sd_turbo_artifact.path


# -- tiny bundles built by the engine ----------------------------------------------------------------

# Parity of the tiny exports on a small grid: the gates still run, in seconds.
_TINY_PARITY = "parity: {batch_sizes: [1, 2], image_sizes: [64]}"

TINY_RECIPE = f"""
name: tiny-test
description: tiny SD 1.5 + scribble/canny ControlNets + TAESD; ONNX fp32 and dynamic INT8
steps:
  - id: base
    stage: load_pipeline
    bundle: torch/base
    params: {{source: preset, preset: tiny-sd15-controlnet, seed: 0}}
  - id: onnx
    stage: export_onnx
    inputs: {{model: base}}
    params: {{{_TINY_PARITY}}}
  - id: onnx_int8
    stage: quantize_onnx
    inputs: {{onnx: onnx, model: base}}
    params: {{mode: dynamic, {_TINY_PARITY}}}
"""

TINY_LCM_RECIPE = f"""
name: tiny-lcm-test
description: the tiny preset with an LCM-LoRA fused; ONNX fp32 and dynamic INT8
steps:
  - id: base
    stage: load_pipeline
    params: {{source: preset, preset: tiny-sd15-controlnet, seed: 0}}
  - id: fused
    stage: fuse_lora
    inputs: {{model: base}}
    params:
      loras: [{{source: preset, format: peft, kind: lcm, scale: 1.0, seed: 0}}]
  - id: onnx
    stage: export_onnx
    inputs: {{model: fused}}
    params: {{{_TINY_PARITY}}}
  - id: onnx_int8
    stage: quantize_onnx
    inputs: {{onnx: onnx, model: fused}}
    params: {{mode: dynamic, {_TINY_PARITY}}}
"""


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One artifact root (cache) shared by the session's engine-built bundles."""
    return tmp_path_factory.mktemp("engine") / "artifacts"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_artifacts: Path) -> Path:
    """A read-only bundle built by the engine: ``torch/base``, ``onnx/fp32``, ``onnx/int8``."""
    pytest.importorskip("torch", reason="building the tiny bundle needs the build extra (torch, diffusers)")
    return build_recipe(TINY_RECIPE, tmp_path_factory.mktemp("recipe"), "tiny-test", tiny_artifacts)


@pytest.fixture(scope="session")
def tiny_lcm_bundle(
    tmp_path_factory: pytest.TempPathFactory, tiny_artifacts: Path, tiny_bundle: Path
) -> Path:
    """A read-only engine-built bundle with an LCM-LoRA fused: ``torch/fused`` (LCM scheduler, 4 steps, no
    CFG by default), ``onnx/fp32``, ``onnx/int8``."""
    return build_recipe(TINY_LCM_RECIPE, tmp_path_factory.mktemp("recipe"), "tiny-lcm-test", tiny_artifacts)


TINY_OPENVINO_RECIPE = f"""
name: tiny-openvino-test
description: the tiny preset exported to ONNX fp32 and converted to OpenVINO IR (fp32, and static INT8)
steps:
  - id: base
    stage: load_pipeline
    bundle: torch/base
    params: {{source: preset, preset: tiny-sd15-controlnet, seed: 0}}
  - id: onnx
    stage: export_onnx
    inputs: {{model: base}}
    params: {{{_TINY_PARITY}}}
  - id: ov
    stage: export_openvino
    inputs: {{onnx: onnx, model: base}}
    params: {{{_TINY_PARITY}}}
  - id: ov_int8
    stage: export_openvino
    inputs: {{onnx: onnx, model: base}}
    params:
      quantization: static
      quantize: [unet]
      calibration: {{prompts: ["a red house", "a cat"], steps: 2, size: 64}}
      {_TINY_PARITY}
"""


@pytest.fixture(scope="session")
def tiny_openvino_bundle(
    tmp_path_factory: pytest.TempPathFactory, tiny_artifacts: Path, tiny_bundle: Path
) -> Path:
    """A read-only engine-built bundle: ``torch/base``, ``onnx/fp32``, ``openvino/fp32`` and
    ``openvino/int8`` (static INT8 UNet); shares the tiny bundle's cache."""
    pytest.importorskip("openvino", reason="the OpenVINO bundle needs the openvino extra")
    pytest.importorskip("nncf", reason="the OpenVINO bundle needs the openvino extra")
    return build_recipe(
        TINY_OPENVINO_RECIPE, tmp_path_factory.mktemp("recipe"), "tiny-openvino-test", tiny_artifacts
    )


# -- the NVIDIA path's CPU steps -------------------------------------------------------------------


@pytest.fixture(scope="session")
def nvidia_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_artifacts: Path) -> Path:
    """``recipes/tiny-nvidia.yaml``'s CPU steps (pipeline, ONNX, TensorRT-ready fp16 and fp32 graphs) plus a
    second LoRA fused into the same base and carried through the same export (refit bookkeeping):
    ``tensorrt/onnx-fp16`` (text encoder, UNet, ControlNets, VAE halves), ``tensorrt/onnx-fp32`` (the UNet,
    what INT8/FP8 quantize) and ``lora-b/trt`` (the other LoRA's UNet). The engine steps need a GPU."""
    import yaml

    pytest.importorskip("torch", reason="the NVIDIA-path bundle is built with the build extra")
    text = yaml.safe_dump(nvidia_cpu_recipe(), sort_keys=False)
    return build_recipe(text, tmp_path_factory.mktemp("nvidia"), "nvidia-cpu", tiny_artifacts)


@pytest.fixture(scope="session")
def nvidia_manifest(nvidia_bundle: Path) -> Any:
    from sdkiln.runtime.contract.manifest import read_bundle_manifest

    return read_bundle_manifest(nvidia_bundle)


# -- the loopback Hub ---------------------------------------------------------------------------------

TEST_TOKEN = "hf_loopbackTestToken0123456789"
BASE_REPO = "runwayml/stable-diffusion-v1-5"
LORA_REPO = "latent-consistency/lcm-lora-sdv1-5"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """A running loopback Hub (127.0.0.1, a free port); the client set up as for a private Hub without
    Xet. Writes need the token ``HF_TOKEN`` carries, so every test also proves the token comes from
    huggingface_hub's usual source."""
    import hub_server
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
            "model": {
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
            "model": {"family": "sd15"},
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
            "model": {"family": "sd15"},
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
        "schema": 2,
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


# -- the shipped real recipes against a loopback Hub with the real layouts ---------------------------------


@dataclass(frozen=True)
class RecipeBuild:
    name: str
    rc: int
    bundle: Path
    requests: list[tuple[str, str]]  # the loopback Hub's request log while this recipe built
    seconds: float
    log: str


@pytest.fixture(scope="session")
def real_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A loopback Hub serving every repo the shipped recipes name (tiny weights, real layouts)."""
    pytest.importorskip("torch", reason="building the recipes needs the build extra (torch, diffusers)")
    import hub_server
    from real_repos import real_repos

    repos = real_repos(tmp_path_factory.mktemp("real-repos"))
    server = hub_server.HubServer().start()
    for repo_id, files in repos.items():
        server.state.seed_repo(repo_id, files)
    server.repos = repos  # what each repo holds, for the request-log checks
    try:
        yield server
    finally:
        server.stop()
    assert server.state.server_errors == [], "the loopback Hub hit a bug of its own"


@pytest.fixture(scope="session")
def real_build(real_hub: Any, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], RecipeBuild]:
    """``real_build("sd15-lcm-scribble")``: that recipe built as shipped, once per session."""
    from huggingface_hub import constants

    from sdkiln.stages.cli import main

    root = tmp_path_factory.mktemp("real-recipes")
    built: dict[str, RecipeBuild] = {}

    def build(name: str) -> RecipeBuild:
        if name in built:
            return built[name]
        saved = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_TOKEN", "TQDM_DISABLE")}
        cache = constants.HF_HUB_CACHE
        os.environ["HF_ENDPOINT"] = real_hub.endpoint
        os.environ["TQDM_DISABLE"] = "1"  # converter progress bars would bury the log's step lines
        os.environ.pop("HF_HUB_OFFLINE", None)
        os.environ.pop("HF_TOKEN", None)
        constants.HF_HUB_CACHE = str(root / f"hf-cache-{name}")
        first = len(real_hub.state.requests)
        t0 = time.perf_counter()
        log = root / f"{name}.log"
        try:
            with pytest.MonkeyPatch.context() as mp, log.open("w") as fh:
                mp.setattr("sys.stderr", fh)
                rc = main(["--artifacts", str(root / "artifacts"), "build", str(RECIPES / f"{name}.yaml")])
        finally:
            constants.HF_HUB_CACHE = cache
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        with real_hub.state.lock:
            requests = list(real_hub.state.requests[first:])
        built[name] = RecipeBuild(
            name, rc, root / "artifacts" / name, requests, time.perf_counter() - t0, log.read_text()
        )
        return built[name]

    return build
