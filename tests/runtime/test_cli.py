"""``sdkiln run``: a PNG and stage times on success; exit 2 and one clear message for every bad input."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest

from sdkiln.runtime.examples import example_path
from sdkiln.stages.cli import main

pytest.importorskip("torch", reason="the tiny bundle is built with the build extra")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["run", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _base(bundle: Path, task: str = "sketch", *extra: str) -> list[str]:
    image = ["--image", str(example_path("car" if task == "sketch" else "scene"))] if task != "text" else []
    return [
        task,
        "--model",
        str(bundle),
        "--prompt",
        "a red sports car",
        *image,
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        *extra,
    ]


@pytest.mark.parametrize(
    ("task", "backend", "extra"),
    [
        ("sketch", "onnx", []),
        ("text", "onnx", ["--style", "product render"]),
        ("edit", "torch", ["--control", "canny", "--strength", "0.7", "--vae", "tiny"]),
    ],
)
def test_run_writes_a_png_and_stage_times(
    capsys, tmp_path: Path, tiny_bundle: Path, task, backend, extra
) -> None:
    out = tmp_path / "out" / f"{task}.png"
    code, stdout, err = _run(
        capsys, *_base(tiny_bundle, task, "--backend", backend, "--out", str(out), *extra)
    )
    assert code == 0, err
    assert out.is_file() and f"wrote {out}" in stdout
    for stage in ("load", "preprocess", "text_encoder", "denoise", "vae_decoder", "total"):
        assert f"  {stage}" in stdout
    from PIL import Image

    assert Image.open(out).size == (64, 64)


def test_long_prompt_is_truncated_with_a_warning(capsys, caplog, tmp_path: Path, tiny_bundle: Path) -> None:
    argv = _base(tiny_bundle, "text", "--out", str(tmp_path / "t.png"))
    argv[argv.index("--prompt") + 1] = "a very detailed castle " * 40
    # (the logger's own level: a library imported earlier in the session may raise the root's)
    with caplog.at_level(logging.WARNING, logger="sdkiln.runtime.tokenizer"):
        code, _, _ = _run(capsys, *argv)
    assert code == 0
    # (pytest owns the log handlers here; under the real CLI this line goes to stderr)
    assert (
        "truncated because CLIP can only handle sequences up to 77 tokens: castle a very detailed"
        in caplog.text
    )


@pytest.fixture(scope="module")
def corrupt_bundles(tmp_path_factory, tiny_bundle: Path) -> dict[str, Path]:
    """Copies of the onnx/fp32 part of the tiny bundle: one byte flipped, one file removed."""
    out = {}
    for kind in ("flipped", "missing"):
        root = tmp_path_factory.mktemp(kind) / "bundle"
        shutil.copytree(tiny_bundle, root, ignore=shutil.ignore_patterns("int8", "torch"))
        unet = root / "onnx" / "fp32" / "unet" / "model.onnx"
        if kind == "flipped":
            data = bytearray(unet.read_bytes())
            data[len(data) // 2] ^= 0xFF
            unet.write_bytes(bytes(data))
        else:
            unet.unlink()
        out[kind] = root
    return out


def _bad_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "notes.txt").write_text("not an image")
    png = example_path("car").read_bytes()
    (tmp / "truncated.png").write_bytes(png[: len(png) // 2])
    (tmp / "folder.png").mkdir(exist_ok=True)
    return {
        "missing image": (
            ["--image", str(tmp / "nope.png")],
            "--image: " + str(tmp / "nope.png") + ": no such file",
        ),
        "image is a folder": (["--image", str(tmp / "folder.png")], "folder.png: not a file"),
        "not an image": (["--image", str(tmp / "notes.txt")], "notes.txt: not an image file PIL can read"),
        "truncated image": (["--image", str(tmp / "truncated.png")], "truncated.png: cannot read"),
        "size not exported": (
            ["--width", "60"],
            "image size 60x64: width and height must be positive multiples of 8",
        ),
        "steps < 1": (["--steps", "0"], "--steps must be at least 1 (got 0)"),
        "unknown backend": (
            ["--backend", "tensorflow"],
            "unknown backend 'tensorflow'; choose from: onnx, torch, coreml",
        ),
        "unknown style": (["--style", "vaporwave"], "unknown style preset 'vaporwave'; known presets:"),
        "coreml off macOS": (["--backend", "coreml"], "the coreml backend runs only on macOS"),
        "unknown section": (["--section", "onnx/fp8"], "the bundle has no section 'onnx/fp8'"),
    }


@pytest.mark.parametrize("case", list(_bad_cases(Path("/tmp"))))
def test_bad_input_exits_2_with_one_message(capsys, tmp_path: Path, tiny_bundle: Path, case: str) -> None:
    if case == "coreml off macOS" and sys.platform == "darwin":
        pytest.skip("Core ML is available on macOS")
    extra, message = _bad_cases(tmp_path)[case]
    code, _, err = _run(capsys, *_base(tiny_bundle, "sketch", "--out", str(tmp_path / "x.png"), *extra))
    assert code == 2
    assert message in err
    assert "Traceback" not in err and err.count("error:") == 1


@pytest.mark.parametrize("strength", ["0", "1.5", "-0.2"])
def test_strength_outside_0_1(capsys, tmp_path: Path, tiny_bundle: Path, strength: str) -> None:
    code, _, err = _run(
        capsys, *_base(tiny_bundle, "edit", "--strength", strength, "--out", str(tmp_path / "x.png"))
    )
    assert code == 2 and f"--strength must be in (0, 1] (got {float(strength)})" in err


@pytest.mark.parametrize(
    ("module", "backend", "message"),
    [
        ("onnxruntime", "onnx", "the onnx backend needs onnxruntime: pip install 'sdkiln[runtime]'"),
        ("diffusers", "torch", "the torch backend needs the build toolchain (diffusers is missing)"),
    ],
)
def test_backend_library_missing(
    capsys, monkeypatch, tmp_path: Path, tiny_bundle: Path, module, backend, message
):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    code, _, err = _run(
        capsys, *_base(tiny_bundle, "sketch", "--backend", backend, "--out", str(tmp_path / "x.png"))
    )
    assert code == 2 and message in err


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("flipped", "onnx/fp32/unet/model.onnx: sha256 mismatch"),
        ("missing", "onnx/fp32/unet/model.onnx: missing"),
    ],
)
def test_corrupted_bundle_is_refused_before_loading(capsys, tmp_path, corrupt_bundles, kind, message) -> None:
    code, _, err = _run(capsys, *_base(corrupt_bundles[kind], "sketch", "--out", str(tmp_path / "x.png")))
    assert code == 2
    assert "bundle is corrupted, 1 bad file(s)" in err and message in err
    assert not (tmp_path / "x.png").exists()


def test_task_and_source_mistakes(capsys, tmp_path: Path, tiny_bundle: Path) -> None:
    code, _, err = _run(capsys, "sketch", "--model", str(tiny_bundle), "--prompt", "p")
    assert code == 2 and "sketch needs --image (the sketch)" in err
    code, _, err = _run(capsys, *_base(tiny_bundle, "text", "--image", str(example_path("car"))))
    assert code == 2 and "text takes no --image" in err
    code, _, err = _run(capsys, "text", "--model", str(tmp_path / "nope"), "--prompt", "p")
    assert code == 2 and "no such bundle folder, and not a Hub repo" in err
    not_bundle = tmp_path / "empty"
    not_bundle.mkdir()
    code, _, err = _run(capsys, "text", "--model", str(not_bundle), "--prompt", "p")
    assert code == 2 and "no manifest.json; is this an sdkiln bundle?" in err
    (not_bundle / "manifest.json").write_text(json.dumps({"files": {}, "sections": {}}))
    code, _, err = _run(capsys, "text", "--model", str(not_bundle), "--prompt", "p")
    assert code == 2 and "the bundle has no onnx section for the onnx backend (it has: none)" in err
