"""Fetching bundles from the loopback Hub for the runtime: only what a backend needs, verified, offline."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from sdkiln.runtime.contract.errors import CorruptArtifactError, HubUnreachableError, UserError
from sdkiln.runtime.contract.manifest import BundleManifest
from sdkiln.runtime.fetch import fetch_bundle, files_for, parse_hub_ref, section_names
from sdkiln.stages.tools.publish.commit import publish_bundle

REPO = "sdkiln-test/tiny"


@pytest.fixture
def published(hub, make_bundle):
    """A bundle published as REPO@v1; returns (bundle folder, commit sha)."""
    bundle = make_bundle()
    result = publish_bundle(bundle, REPO, endpoint=hub.endpoint, tag="v1")
    return bundle, result.commit


def downloads(hub) -> list[str]:
    """Repo paths fetched with GET /resolve/ so far."""
    with hub.state.lock:
        return [
            p.split("/resolve/", 1)[1].split("/", 1)[1]
            for m, p in hub.state.requests
            if m == "GET" and "/resolve/" in p
        ]


def test_fetch_downloads_only_what_the_backend_needs(hub, published, tmp_path):
    bundle, commit = published
    folder = fetch_bundle(REPO, "v1", backend="onnx", endpoint=hub.endpoint, cache_dir=tmp_path / "c")

    assert folder.name == commit  # the tag was resolved to its commit
    manifest = json.loads((folder / "manifest.json").read_text())
    got = sorted(downloads(hub))
    want = sorted(
        [r for r in manifest["files"] if not r.startswith("coreml/")] + ["manifest.json", "README.md"]
    )
    assert got == want
    for rel in want:
        path = folder / rel
        assert path.is_file() and not path.is_symlink()  # real files: onnx refuses external data behind links
        if rel != "README.md":  # the card exists only on the Hub
            assert path.read_bytes() == (bundle / rel).read_bytes()
    assert not (folder / "coreml").exists()
    assert {p.name for p in folder.iterdir()} == {
        "README.md",
        "build.lock.json",
        "manifest.json",
        "onnx",
        "recipe.yaml",
    }


def test_a_section_or_another_backend_adds_to_the_same_snapshot(hub, published, tmp_path):
    cache = tmp_path / "c"
    fetch_bundle(REPO, "v1", backend="onnx/int8", endpoint=hub.endpoint, cache_dir=cache)
    assert not any(p.startswith("onnx/fp32/") for p in downloads(hub))
    n = len(downloads(hub))
    folder = fetch_bundle(REPO, "v1", backend="coreml", endpoint=hub.endpoint, cache_dir=cache)
    new = downloads(hub)[n:]
    assert new and all(p.startswith("coreml/split_einsum/") for p in new)
    assert (folder / "coreml/split_einsum/packages/Unet.mlpackage/Manifest.json").is_file()
    with pytest.raises(UserError, match="nothing for backend 'tensorrt'") as err:
        fetch_bundle(REPO, "v1", backend="tensorrt", endpoint=hub.endpoint, cache_dir=cache)
    assert err.value.exit_code == 2


def test_cached_commit_loads_offline_and_a_tag_falls_back_to_its_last_commit(
    hub, published, tmp_path, monkeypatch, caplog
):
    _, commit = published
    caplog.set_level(logging.WARNING, logger="sdkiln.runtime.fetch")
    cache = tmp_path / "c"
    folder = fetch_bundle(REPO, "v1", backend="onnx", endpoint=hub.endpoint, cache_dir=cache)
    hub.stop()  # the Hub is gone

    n = len(hub.state.requests)
    assert fetch_bundle(REPO, commit, backend="onnx", endpoint=hub.endpoint, cache_dir=cache) == folder
    assert len(hub.state.requests) == n  # a cached commit needs no network at all
    assert fetch_bundle(REPO, "v1", backend="onnx", endpoint=hub.endpoint, cache_dir=cache) == folder
    assert "Hub unreachable" in caplog.text
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fetch_bundle(REPO, "v1", backend="onnx", endpoint=hub.endpoint, cache_dir=cache) == folder
    with pytest.raises(HubUnreachableError, match="HF_HUB_OFFLINE"):
        fetch_bundle(REPO, "v1", backend="coreml", endpoint=hub.endpoint, cache_dir=cache)  # never downloaded
    with pytest.raises(HubUnreachableError, match="never resolved"):
        fetch_bundle(REPO, "main", backend="onnx", endpoint=hub.endpoint, cache_dir=cache)


def test_corrupted_cached_file_is_refused_before_loading(hub, published, tmp_path):
    _, commit = published
    cache = tmp_path / "c"
    folder = fetch_bundle(REPO, "v1", backend="onnx", endpoint=hub.endpoint, cache_dir=cache)
    weights = folder / "onnx/fp32/unet/model.onnx_data"
    data = bytearray(weights.read_bytes())
    data[100] ^= 1  # one flipped bit, same size
    weights.write_bytes(bytes(data))

    with pytest.raises(
        CorruptArtifactError, match=r"refusing to load them:\n  onnx/fp32/unet/model.onnx_data: sha256"
    ) as err:
        fetch_bundle(REPO, commit, backend="onnx", endpoint=hub.endpoint, cache_dir=cache)
    assert err.value.exit_code == 2
    assert str(folder) in str(err.value)  # says what to delete

    (folder / "manifest.json").write_text((folder / "manifest.json").read_text().replace("fp32", "fp33"))
    with pytest.raises(CorruptArtifactError, match="manifest.json: changed since it was downloaded"):
        fetch_bundle(REPO, commit, backend="onnx", endpoint=hub.endpoint, cache_dir=cache)


def test_download_that_does_not_match_the_manifest_is_not_kept(hub, published, tmp_path):
    hub.state.hooks.corrupt_downloads.add("onnx/int8/unet/model.onnx")  # right size, wrong bytes
    cache = tmp_path / "c"
    with pytest.raises(CorruptArtifactError, match="downloaded files do not match manifest.json") as err:
        fetch_bundle(REPO, "v1", backend="onnx/int8", endpoint=hub.endpoint, cache_dir=cache)
    assert "onnx/int8/unet/model.onnx: sha256" in str(err.value)
    snaps = list((cache / "sdkiln-test--tiny" / "snapshots").iterdir())
    assert not any((s / "onnx/int8/unet/model.onnx").exists() for s in snaps if s.is_dir())

    hub.state.hooks.corrupt_downloads.clear()  # the Hub is fixed: the next fetch completes
    folder = fetch_bundle(REPO, "v1", backend="onnx/int8", endpoint=hub.endpoint, cache_dir=cache)
    assert (folder / "onnx/int8/unet/model.onnx").is_file()
    assert not any((cache / "sdkiln-test--tiny" / "staging").iterdir())


def test_unknown_repo_or_revision_is_a_clear_user_error(hub, published, tmp_path):
    cache = tmp_path / "c"
    with pytest.raises(UserError, match="sdkiln-test/nope: no such repository") as err:
        fetch_bundle("sdkiln-test/nope", "v1", endpoint=hub.endpoint, cache_dir=cache)
    assert err.value.exit_code == 2
    with pytest.raises(UserError, match=r"sdkiln-test/tiny@v9: no such revision") as err:
        fetch_bundle(REPO, "v9", endpoint=hub.endpoint, cache_dir=cache)
    assert err.value.exit_code == 2
    with pytest.raises(UserError, match="no such revision"):
        fetch_bundle(REPO, "f" * 40, endpoint=hub.endpoint, cache_dir=cache)


def test_hf_endpoint_is_honoured_by_default(hub, published, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    folder = fetch_bundle(REPO, "v1", backend="onnx/int8", cache_dir=tmp_path / "c")
    assert (folder / "onnx/int8/unet/model.onnx").is_file()


def test_repo_that_is_not_a_bundle_is_refused(hub, tmp_path):
    hub.state.create_repo("sdkiln-test/plain")
    hub.state.push_direct("sdkiln-test/plain", "README.md", b"just a repo")
    with pytest.raises(UserError, match="no manifest.json"):
        fetch_bundle("sdkiln-test/plain", endpoint=hub.endpoint, cache_dir=tmp_path / "c")


def test_manifest_paths_cannot_escape_the_folder(hub, tmp_path):
    hub.state.create_repo("sdkiln-test/evil")
    manifest = {
        "files": {"../../outside.txt": {"sha256": hashlib.sha256(b"x").hexdigest(), "size": 1}},
        "sections": {},
    }
    hub.state.push_direct("sdkiln-test/evil", "manifest.json", json.dumps(manifest).encode())
    with pytest.raises(CorruptArtifactError, match="unsafe path"):
        fetch_bundle("sdkiln-test/evil", endpoint=hub.endpoint, cache_dir=tmp_path / "c")
    assert not (tmp_path / "outside.txt").exists()


def test_onnx_external_data_loads_from_the_fetched_folder(hub, tmp_path):
    onnx = pytest.importorskip(
        "onnx", reason="onnx is part of the build extra; the runtime-only install lacks it"
    )
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    # A graph whose weight lives in model.onnx_data, as a large UNet's does.
    src = tmp_path / "bundle"
    (src / "onnx/fp32/unet").mkdir(parents=True)
    weight = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [weight],
    )
    onnx.save_model(
        helper.make_model(graph),
        str(src / "onnx/fp32/unet/model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx_data",
        size_threshold=0,
    )
    files = {p.relative_to(src).as_posix(): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    manifest = {
        "schema": 1,
        "name": "ext",
        "recipe": {},
        "lock": {},
        "files": {r: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for r, d in files.items()},
        "sections": {
            "onnx/fp32": {
                "step": "onnx",
                "stage": "export_onnx",
                "kind": "onnx",
                "params": {},
                "metrics": {},
                "components": {},
                "extra": {},
            }
        },
        "environment": {},
    }
    (src / "manifest.json").write_text(json.dumps(manifest))
    publish_bundle(src, "sdkiln-test/ext", endpoint=hub.endpoint)

    folder = fetch_bundle("sdkiln-test/ext", backend="onnx", endpoint=hub.endpoint, cache_dir=tmp_path / "c")
    model = onnx.load(str(folder / "onnx/fp32/unet/model.onnx"))  # raises on external data behind a symlink
    assert numpy_helper.to_array(model.graph.initializer[0]).sum() == np.arange(4096).sum()


def test_parse_hub_ref():
    assert parse_hub_ref("me/model") == ("me/model", None)
    assert parse_hub_ref("me/model@v1") == ("me/model", "v1")
    assert parse_hub_ref("hf://me/model@refs/pr/1") == ("me/model", "refs/pr/1")
    assert parse_hub_ref("me/model@" + "a" * 40) == ("me/model", "a" * 40)
    for not_a_ref in ("artifacts/tiny/extra", "/abs/path", "model", "me/model@", "./me/model"):
        assert parse_hub_ref(not_a_ref) is None


def test_section_selection():
    f = {"sha256": "0" * 64, "size": 1}
    manifest = BundleManifest.model_validate(
        {
            "files": {"onnx/fp32/a": f, "onnx/int8/b": f, "coreml/x/c": f, "recipe.yaml": f},
            "sections": {
                "onnx/fp32": {"kind": "onnx"},
                "onnx/int8": {"kind": "onnx"},
                "coreml/x": {"kind": "coreml"},
            },
        }
    )
    assert section_names(manifest, None) == ["coreml/x", "onnx/fp32", "onnx/int8"]
    assert section_names(manifest, "onnx") == ["onnx/fp32", "onnx/int8"]
    assert section_names(manifest, "onnx/int8") == ["onnx/int8"]
    assert section_names(manifest, ["onnx/int8", "coreml"]) == ["coreml/x", "onnx/int8"]
    assert section_names(manifest, []) == []
    assert section_names(manifest, lambda m: [sorted(m.sections)[-1]]) == ["onnx/int8"]
    assert files_for(manifest, ["onnx/int8"]) == ["onnx/int8/b", "recipe.yaml"]
    assert files_for(manifest, []) == ["recipe.yaml"]
    torch_manifest = BundleManifest.model_validate(
        {"files": {}, "sections": {"torch/fused": {"kind": "pipeline"}, "torch/qint8": {"kind": "x"}}}
    )
    assert section_names(torch_manifest, "torch") == ["torch/fused"]  # the runtime's torch backend


def test_two_phase_fetch_reads_the_manifest_first(hub, published, tmp_path):
    _, commit = published
    cache = tmp_path / "c"
    folder = fetch_bundle(REPO, "v1", backend=[], endpoint=hub.endpoint, cache_dir=cache)
    assert sorted(downloads(hub)) == ["README.md", "build.lock.json", "manifest.json", "recipe.yaml"]
    manifest = json.loads((folder / "manifest.json").read_text())
    wanted = [s for s in manifest["sections"] if s.endswith("int8")]
    n = len(hub.state.requests)
    assert fetch_bundle(REPO, commit, backend=wanted, endpoint=hub.endpoint, cache_dir=cache) == folder
    assert not any("/revision/" in p for _, p in hub.state.requests[n:])  # the sha needed no resolving
    assert sorted(downloads(hub))[:2] == ["README.md", "build.lock.json"]
    assert {p for p in downloads(hub) if p.startswith("onnx/")} == {
        "onnx/int8/unet/config.json",
        "onnx/int8/unet/model.onnx",
    }


def test_runtime_hub_does_not_import_the_build_toolchain():
    code = (
        "import sys, sdkiln.runtime.fetch\n"
        "bad = sorted(m for m in ('torch', 'diffusers', 'transformers', 'onnx', 'coremltools') if m in sys.modules)\n"
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path.cwd()
    )
    assert out.stdout.strip() == ""
