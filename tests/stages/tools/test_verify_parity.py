"""``sdkiln verify --parity``: a graph whose manifest was rewritten to match it passes the sha256 check
and fails parity, naming the component."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sdkiln.runtime.contract.digest import sha256_file
from sdkiln.stages.cli import main

pytest.importorskip("onnxruntime", reason="verify --parity runs the graphs with ONNX Runtime")


def _perturb_unet(
    bundle: Path, section: str = "onnx/fp32", scale: float = 1.02, tensor: str | None = None
) -> str:
    """Scale the UNet's largest weight by ``scale`` and rewrite the manifest's sha256/size for it (what a
    careless re-upload or a mis-built graph with a regenerated manifest looks like)."""
    import onnx
    from onnx import numpy_helper

    manifest_path = bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    rel = f"{section}/{manifest['sections'][section]['components']['unet']['path']}"
    path = bundle / rel
    model = onnx.load(str(path), load_external_data=True)
    if tensor is None:
        biggest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    else:
        biggest = next(t for t in model.graph.initializer if t.name == tensor)
    arr = numpy_helper.to_array(biggest)
    biggest.CopyFrom(numpy_helper.from_array((arr * np.float32(scale)).astype(arr.dtype), biggest.name))
    for f in list(path.parent.iterdir()):
        if f.name != "config.json":
            f.unlink()
    onnx.save_model(model, str(path))
    files = manifest["files"]
    for old in [k for k in files if k.startswith(f"{section}/unet/")]:
        del files[old]
    for f in sorted(path.parent.iterdir()):
        files[f"{section}/unet/{f.name}"] = {"sha256": sha256_file(f), "size": f.stat().st_size}
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return biggest.name


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    for p in dst.rglob("*"):
        if p.is_file():
            p.chmod(0o644)
    return dst


def test_verify_parity_passes_on_a_built_bundle(bundle_copy: Path, tmp_path: Path, capsys) -> None:
    out_json = tmp_path / "parity.json"
    rc = main(["verify", "--parity", str(bundle_copy), "--task", "text", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 0, out
    report = json.loads(out_json.read_text())
    rows = {(r["section"], r["what"]): r for r in report["rows"]}
    # Every graph of both ONNX sections was measured, and each task end to end.
    assert ("onnx/fp32", "unet") in rows and ("onnx/int8", "unet") in rows
    assert rows[("onnx/fp32", "unet")]["status"] == "ok"
    assert rows[("onnx/fp32", "unet")]["measured"]["max_abs"] < 1e-3
    assert rows[("onnx/fp32", "e2e:text")]["measured"]["psnr_db"] > 40
    assert "parity ok" in out


def test_a_perturbed_unet_passes_verify_and_fails_verify_parity(bundle_copy: Path, capsys) -> None:
    _perturb_unet(bundle_copy)
    assert main(["verify", str(bundle_copy)]) == 0  # the sha256 check alone cannot see it
    capsys.readouterr()
    rc = main(["verify", "--parity", "--no-e2e", "--section", "onnx/fp32", str(bundle_copy)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "parity FAILED: onnx/fp32 unet" in err
    assert "SQNR" in err and "< 80.0 dB" in err  # the fp32 floor (the old max-abs bound passed it)


def test_verify_parity_refuses_files_that_do_not_match_the_manifest(bundle_copy: Path) -> None:
    from sdkiln.runtime.contract.errors import UserError
    from sdkiln.stages.tools.verify import verify_parity

    graph = next((bundle_copy / "onnx/fp32/unet").glob("*.onnx"))
    graph.write_bytes(graph.read_bytes() + b"\0")
    with pytest.raises(UserError, match="do not match manifest.json"):
        verify_parity(bundle_copy, e2e=False)


def test_verify_parity_names_an_unknown_section(bundle_copy: Path, capsys) -> None:
    assert main(["verify", "--parity", "--section", "onnx/nope", str(bundle_copy)]) == 2
    assert "onnx/nope" in capsys.readouterr().err


def test_publish_refuses_a_bundle_that_fails_parity(bundle_copy: Path, hub, capsys) -> None:
    _perturb_unet(bundle_copy)
    repo = "sdkiln-test/broken-unet"
    rc = main(["publish", str(bundle_copy), "--repo-id", repo, "--endpoint", hub.endpoint])
    assert rc != 0
    assert "onnx/fp32 unet" in capsys.readouterr().err
    assert repo not in hub.state.repos  # nothing was created, nothing uploaded


def test_a_wrong_int8_weight_scale_fails_verify_parity(bundle_copy: Path, capsys) -> None:
    """The int8 output floor cannot see one weight scale 2x off; the weight gate against onnx/fp32 can."""
    import onnx

    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    graph = bundle_copy / "onnx/int8" / manifest["sections"]["onnx/int8"]["components"]["unet"]["path"]
    model = onnx.load(str(graph), load_external_data=False)
    quantized = [t for t in model.graph.initializer if t.name.endswith("_quantized")]
    biggest = max(quantized, key=lambda t: int(np.prod(t.dims))).name.removesuffix("_quantized")
    _perturb_unet(bundle_copy, "onnx/int8", 2.0, tensor=f"{biggest}_scale")
    rc = main(["verify", "--parity", "--no-e2e", "--section", "onnx/int8", str(bundle_copy)])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "parity FAILED: onnx/int8 unet" in err and biggest in err
