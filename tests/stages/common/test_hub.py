"""load_pipeline's Hub source end to end against the loopback Hub of tests/support/hub_server.py.

A tiny pipeline and a ControlNet are pushed to a local server; the stage pins ``main`` to a sha,
lists the files, downloads only the needed ones at that sha through ``HF_ENDPOINT``, and refuses a
pickle-only component.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sdkiln.runtime.contract.errors import UserError
from sdkiln.stages.load_pipeline import STAGE

TOKEN = "hf_loopbackTestToken0123456789"


def _server_module():
    import hub_server

    return hub_server


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    server = _server_module().HubServer(token=TOKEN).start()
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)  # read at call time by sdkiln.stages.hub
    try:
        yield server
    finally:
        server.stop()


def _push(hub, repo: str, folder: Path) -> str:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo(repo)
    return api.upload_folder(repo_id=repo, folder_path=str(folder)).oid


def test_hub_source_pins_and_downloads_only_what_is_needed(hub, make_ctx, tiny_sd15_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_sd15_dir, base, ignore=shutil.ignore_patterns("controlnet", "vae_tiny"))
    (base / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"not needed")
    (base / "v1-5-pruned.ckpt").write_bytes(b"not needed either")
    sha = _push(hub, "acme/tiny-sd", base)
    _push(hub, "acme/tiny-scribble", tiny_sd15_dir / "controlnet" / "scribble")

    params = {
        "source": "hub",
        "repo": "acme/tiny-sd",
        "family": "sd15",
        "components": {"controlnet.scribble": {"repo": "acme/tiny-scribble"}},
    }
    ctx = make_ctx(STAGE, params)
    pins = {name: STAGE.resolve(name, ref) for name, ref in STAGE.refs(ctx.params).items()}
    assert pins["hub:base:acme/tiny-sd"] == sha
    ctx = make_ctx(STAGE, params, pins=pins)
    STAGE.run(ctx)
    assert ctx.model.source["sha"] == sha
    assert (
        ctx.model.source["components"]["controlnet.scribble"]["sha"]
        == pins["hub:controlnet.scribble:acme/tiny-scribble"]
    )
    assert ctx.model.controlnets == ["scribble"]
    snapshot = next((tmp_path / "hf-cache").glob("models--acme--tiny-sd/snapshots/*"))
    downloaded = {str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()}
    assert "unet/diffusion_pytorch_model.safetensors" in downloaded
    assert "unet/diffusion_pytorch_model.fp16.safetensors" not in downloaded
    assert "v1-5-pruned.ckpt" not in downloaded


def test_hub_pickle_component_is_refused(hub, make_ctx, tmp_path):
    folder = tmp_path / "cn"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    _push(hub, "acme/pickled-cn", folder)
    params = {
        "source": "preset",
        "preset": "tiny-sd15",
        "components": {"controlnet.canny": {"repo": "acme/pickled-cn"}},
    }
    with pytest.raises(UserError, match="acme/pickled-cn.*only pickle weights.*arbitrary code"):
        STAGE.run(make_ctx(STAGE, params))


def test_hub_unknown_repo(hub):
    with pytest.raises(UserError, match="acme/missing"):
        STAGE.resolve("hub:base:acme/missing", "main")
