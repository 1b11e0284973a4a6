"""``backend="auto"``: the configuration recorded by ``sdkiln bench`` for this machine and bundle, or the
exact default with the reason; the machine key; a fast configuration's levers reach the requests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdkiln.runtime import auto, machine
from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.manifest import read_bundle_manifest

CPUINFO = """processor\t: 0
model name\t: AMD EPYC 9B45
flags\t\t: fpu sse avx2 fma avx512f avx512_bf16 avx512_vnni
processor\t: 1
model name\t: AMD EPYC 9B45
flags\t\t: fpu sse avx2 fma avx512f avx512_bf16 avx512_vnni
"""
ZEN3 = CPUINFO.replace(" avx512f avx512_bf16 avx512_vnni", "").replace("9B45", "7B13")


def test_machine_facts_from_cpuinfo() -> None:
    assert machine.cpu_model(CPUINFO) == "AMD EPYC 9B45"
    assert machine.has_vnni(CPUINFO) and not machine.has_vnni(ZEN3)
    assert machine.isa(CPUINFO)["avx512_bf16"] and not machine.isa(ZEN3)["avx512f"]
    key = machine.machine_key(CPUINFO)
    assert key.startswith("amd-epyc-9b45-") and key == machine.machine_key(CPUINFO)
    assert machine.machine_key(ZEN3) != key  # other model and ISA: another key


def _record(tmp_path: Path, digest: str, picks: dict) -> Path:
    path = tmp_path / f"{machine.machine_key()}.json"
    data = {
        "schema": 1,
        "machine_key": machine.machine_key(),
        "bundles": {digest: {"created": "today", "tasks": picks}},
    }
    path.write_text(json.dumps(data))
    return path


def _pick(settings: dict, ratio: float, profile: str = "exact") -> dict:
    return {
        "variant": f"{settings['section']}",
        "profile_of_run": profile,
        "ratio_to_reference": ratio,
        "label": "with parity" if profile == "exact" else "fast: PSNR 30.0 dB",
        "settings": settings,
        "deviation": {"psnr_db": 30.0, "ssim": 0.9, "latents_sqnr_db": 20.0},
    }


def test_no_record_means_the_exact_default_and_says_how_to_measure(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SDKILN_BENCH_CACHE", str(tmp_path))
    manifest = read_bundle_manifest(tiny_bundle)
    choice = auto.choose(tiny_bundle, manifest, profile="fast")
    assert not choice.measured and choice.settings == {
        "backend": "onnx",
        "section": "onnx/fp32",
        "vae": "full",
    }
    assert "sdkiln bench" in choice.why and machine.machine_key() in choice.why
    with pytest.raises(UserError, match="unknown profile 'turbo'"):
        auto.choose(tiny_bundle, manifest, profile="turbo")


def test_the_recorded_pick_is_loaded_with_its_levers(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sdkiln.runtime.load import load
    from sdkiln.runtime.tasks import sketch_request

    monkeypatch.setenv("SDKILN_BENCH_CACHE", str(tmp_path))
    digest = read_bundle_manifest(tiny_bundle).digest
    fast = {"backend": "onnx", "section": "onnx/int8", "vae": "tiny", "steps": 2, "control_end": 0.5}
    exact = {"backend": "onnx", "section": "onnx/fp32", "vae": "full", "steps": None, "control_end": 1.0}
    _record(tmp_path, digest, {"sketch": {"exact": _pick(exact, 0.4), "fast": _pick(fast, 0.15, "fast")}})

    pipe = load(tiny_bundle, backend="auto", profile="fast", task="sketch")
    assert pipe.choice.measured and pipe.choice.settings == fast
    assert pipe.info.section == "onnx/int8" and pipe.vae == "tiny" and pipe.default_steps == 2
    assert "0.15x" in pipe.choice.why and "fast profile" in pipe.choice.describe()
    req = sketch_request(pipe, _drawing(), "a house", height=64, width=64)
    assert req.control.end == 0.5  # the configuration's ControlNet end, unless the request sets one
    req = sketch_request(pipe, _drawing(), "a house", height=64, width=64, control_end=1.0)
    assert req.control.end == 1.0

    exact_pipe = load(
        tiny_bundle, backend="auto", profile="exact", task="text"
    )  # falls back to the sketch pick
    assert exact_pipe.info.section == "onnx/fp32" and "no text run was benchmarked" in exact_pipe.choice.why
    with pytest.raises(UserError, match="does not apply to backend 'auto'"):
        load(tiny_bundle, backend="auto", section="onnx/fp32")


def test_a_pick_this_bundle_cannot_run_falls_back(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SDKILN_BENCH_CACHE", str(tmp_path))
    manifest = read_bundle_manifest(tiny_bundle)
    gone = {"backend": "openvino", "section": "openvino/int8", "vae": "full"}
    _record(tmp_path, manifest.digest, {"sketch": {"exact": _pick(gone, 0.3)}})
    choice = auto.choose(tiny_bundle, manifest, profile="exact")
    assert not choice.measured and choice.settings["section"] == "onnx/fp32"
    assert "cannot run here" in choice.why and "openvino/int8" in choice.why
    # another bundle's record is not this bundle's
    _record(tmp_path, "0" * 64, {"sketch": {"exact": _pick(gone, 0.3)}})
    assert "no benchmark of this bundle" in auto.choose(tiny_bundle, manifest).why


def _drawing():
    import numpy as np

    img = np.full((64, 64, 3), 255, np.uint8)
    img[20:22, :] = 0
    return img
