"""The studio's model side without a browser: same image as ``sdkiln run``, TAESD preview, one load shared
by concurrent renders, superseded renders stopping early, ``--backend auto``, and every bad input."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.examples import example_path
from sdkiln.runtime.studio import engine
from sdkiln.runtime.studio.engine import (
    RenderInputs,
    Studio,
    Superseded,
    auto_backend,
    check_inputs,
    read_upload,
)
from sdkiln.stages.cli import main

pytest.importorskip("torch", reason="the tiny bundle is built with the build extra")


@pytest.fixture(scope="module")
def studio(tiny_lcm_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Studio:
    return Studio(tiny_lcm_bundle, "auto", workdir=tmp_path_factory.mktemp("studio"))


def _run(tmp_path: Path, argv: list[str]) -> np.ndarray:
    out = tmp_path / f"run-{len(list(tmp_path.iterdir()))}.png"
    assert main(["run", *argv, "--out", str(out)]) == 0
    return np.asarray(Image.open(out).convert("RGB"))


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


CASES = {
    "sketch": (
        RenderInputs(
            "sketch", "a red car", image=example_path("car"), seed=7, steps=3, conditioning_scale=0.8
        ),
        ["sketch", "--image", str(example_path("car")), "--steps", "3", "--conditioning-scale", "0.8"],
    ),
    "text": (
        RenderInputs("text", "a lighthouse", style="watercolor", seed=3, steps=2),
        ["text", "--style", "watercolor", "--steps", "2"],
    ),
    "edit": (
        RenderInputs("edit", "a red car", image=example_path("scene"), seed=5, strength=0.7, control="canny"),
        ["edit", "--image", str(example_path("scene")), "--strength", "0.7", "--control", "canny"],
    ),
}


@pytest.mark.parametrize("task", CASES)
def test_same_image_as_sdkiln_run(studio: Studio, tiny_lcm_bundle: Path, tmp_path: Path, task: str) -> None:
    inputs, argv = CASES[task]
    out = studio.render(inputs)
    assert (out.backend, out.section, out.task) == ("onnx", "onnx/fp32", task)
    prompt, seed = ["--prompt", inputs.prompt], ["--seed", str(inputs.seed)]
    cli = _run(tmp_path, [*argv[:1], "--model", str(tiny_lcm_bundle), *prompt, *seed, *argv[1:]])
    assert np.array_equal(_pixels(out.image), cli)  # same backend, same arithmetic: bit-identical
    # ... and the command the page shows is one that gives it, too.
    shown = shlex.split(out.command)
    assert shown[:3] == ["sdkiln", "run", task]
    assert np.array_equal(_pixels(out.image), _run(tmp_path, shown[2 : shown.index("--out")]))
    if task != "text":  # what was rendered is kept as a PNG of the input's pixels
        assert np.array_equal(_pixels(Image.open(out.input_path)), _pixels(Image.open(inputs.image)))


def test_taesd_preview_comes_first_and_equals_run_with_the_tiny_vae(
    studio: Studio, tiny_lcm_bundle: Path, tmp_path: Path
) -> None:
    order: list[str] = []
    inputs = RenderInputs("sketch", "a house", image=example_path("house"), seed=11)
    out = studio.render(inputs, on_preview=lambda img: order.append("preview"))
    order.append("final")
    assert order == ["preview", "final"] and out.preview is not None
    assert list(out.timings) == [
        "preprocess",
        "text_encoder",
        "denoise",
        "controlnet",  # the denoise split: where the step time went
        "unet",
        "taesd_preview",
        "vae_decoder",
        "total",
    ]
    # The preview decodes the very latents the final image comes from, with TAESD: as `--vae tiny` does.
    argv = ["sketch", "--model", str(tiny_lcm_bundle), "--prompt", "a house", "--seed", "11"]
    argv += ["--image", str(example_path("house"))]
    assert np.array_equal(_pixels(out.preview), _run(tmp_path, [*argv, "--vae", "tiny"]))
    assert not np.array_equal(_pixels(out.preview), _pixels(out.image))


def test_concurrent_renders_share_one_load(studio: Studio) -> None:
    loads = dict(studio.loads)
    components = dict(studio.default.pipe.backend._loaded)  # the loaded ONNX sessions, by component
    inputs = RenderInputs("sketch", "a cat", image=example_path("cat"), seed=1)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: studio.render(inputs), range(8)))
    assert all(np.array_equal(_pixels(o.image), _pixels(outs[0].image)) for o in outs)
    assert studio.loads == loads and loads == {("onnx", "onnx/fp32"): 1}
    assert studio.default.pipe.backend._loaded == components  # the same session objects, none added
    assert studio.peak_in_flight >= 2


def test_a_superseded_render_stops_at_the_next_step(studio: Studio) -> None:
    asked = 0

    def superseded() -> bool:
        nonlocal asked
        asked += 1
        return asked > 2  # newer request after the second step

    renders, failures = studio.renders, studio.failures
    with pytest.raises(Superseded):
        studio.render(RenderInputs("text", "a boat", steps=4), superseded=superseded)
    assert asked == 3 and (studio.renders, studio.failures) == (renders, failures)


def test_a_backend_or_section_the_bundle_lacks(studio: Studio) -> None:
    with pytest.raises(UserError, match="no coreml section"):
        studio.model_for("coreml")
    with pytest.raises(UserError, match="the onnx backend runs 'onnx' sections"):
        studio.model_for("onnx", "torch/fused")
    with pytest.raises(UserError, match="no section 'onnx/fp16'"):
        studio.render(RenderInputs("text", "a boat", section="onnx/fp16"))
    assert studio.render(RenderInputs("text", "a boat", steps=1)).image.size == (256, 256)  # still serving


def test_another_section_is_loaded_once(studio: Studio, tiny_lcm_bundle: Path, tmp_path: Path) -> None:
    inputs = RenderInputs("text", "a boat", seed=2, steps=2, section="onnx/int8")
    first, second = studio.render(inputs), studio.render(inputs)
    assert studio.loads[("onnx", "onnx/int8")] == 1 and first.section == "onnx/int8"
    assert np.array_equal(_pixels(first.image), _pixels(second.image))
    argv = ["text", "--model", str(tiny_lcm_bundle), "--section", "onnx/int8", "--prompt", "a boat"]
    assert np.array_equal(_pixels(first.image), _run(tmp_path, [*argv, "--seed", "2", "--steps", "2"]))


def test_the_torch_backend_gives_the_same_image_as_run_on_torch(
    studio: Studio, tiny_lcm_bundle: Path, tmp_path: Path
) -> None:
    out = studio.render(RenderInputs("text", "a boat", seed=4, steps=2, backend="torch"))
    assert (out.backend, out.section) == ("torch", "torch/fused") and out.preview is not None
    argv = ["text", "--model", str(tiny_lcm_bundle), "--backend", "torch", "--prompt", "a boat"]
    assert np.array_equal(_pixels(out.image), _run(tmp_path, [*argv, "--seed", "4", "--steps", "2"]))
    assert studio.loads[("torch", "torch/fused")] == 1 and studio.default.backend == "onnx"


def _manifest_only(tmp_path: Path, bundle: Path, keep: set[str]) -> Path:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["sections"] = {k: v for k, v in manifest["sections"].items() if k in keep}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def test_auto_takes_the_first_of_onnx_then_torch(tiny_lcm_bundle: Path, tmp_path: Path) -> None:
    backend, note = auto_backend(str(tiny_lcm_bundle))
    assert backend == "onnx" and "onnx → torch" in note
    (tmp_path / "a").mkdir()
    backend, note = auto_backend(str(_manifest_only(tmp_path / "a", tiny_lcm_bundle, {"torch/fused"})))
    assert backend == "torch" and "onnx: the bundle has no onnx section" in note
    (tmp_path / "b").mkdir()
    with pytest.raises(UserError, match="none of onnx, torch can run"):
        auto_backend(str(_manifest_only(tmp_path / "b", tiny_lcm_bundle, set())))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"task": "paint"}, "task must be one of sketch, text, edit"),
        ({"prompt": "  "}, "prompt: write what to render"),
        ({"prompt": "x" * 2001}, "at most 2000"),
        ({"style": "baroque"}, "style: unknown preset 'baroque'"),
        ({"steps": 0}, "steps must be between 1 and 50"),
        ({"steps": 51}, "steps must be between 1 and 50"),
        ({"seed": -1}, "seed must be between 0 and"),
        ({"conditioning_scale": 2.5}, "ControlNet scale must be between 0 and 2"),
        ({"task": "edit", "strength": 0.0}, "strength must be in"),
        ({"task": "edit", "control": "depth"}, "edit control must be canny or none"),
        ({"image": None}, "sketch: draw on the canvas or upload a sketch first"),
        ({"task": "edit", "image": None}, "edit: upload a photo"),
    ],
)
def test_bad_inputs_are_refused_naming_the_field(change: dict, message: str) -> None:
    base = {"task": "sketch", "prompt": "a car", "image": example_path("car")}
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        check_inputs(RenderInputs(**{**base, **change}))


def test_uploads_are_checked(tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(UserError, match="notes.png is not an image"):
        read_upload(text)
    huge = tmp_path / "huge.png"
    Image.new("L", (5000, 4000)).save(huge)
    with pytest.raises(UserError, match=r"too large an image \(5000x4000\)"):
        read_upload(huge)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(example_path("car").read_bytes()[:300])
    with pytest.raises(UserError, match="cut.png is not a readable image"):
        read_upload(truncated)
    with pytest.raises(UserError, match="uploads are limited to 100 bytes"):
        read_upload(example_path("car"), max_bytes=100)
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert read_upload(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent is paper, as in `run`
    assert engine.for_canvas(Image.new("RGB", (3000, 1500))).size == (1024, 512)


def test_importing_the_studio_imports_neither_gradio_nor_torch() -> None:
    code = (
        "import sys, sdkiln.runtime, sdkiln.runtime.studio, sdkiln.runtime.studio.engine, "
        "sdkiln.runtime.studio.live, sdkiln.runtime.studio.cli, sdkiln.runtime.studio.serve\n"
        "print(sorted(m for m in ('gradio', 'torch', 'diffusers') if m in sys.modules))\n"
        # The main CLI (the build side may import torch) offers `studio` without importing gradio.
        "from sdkiln.stages.cli import build_parser\n"
        "assert 'studio' in build_parser().format_help()\n"
        "print('gradio' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "False"], out.stdout + out.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "0"], "--port must be in 1..65535"),
        (["--concurrency", "0"], "--concurrency must be at least 1"),
        (["--max-upload-mb", "0"], "--max-upload-mb must be in"),
        (["--backend", "coreml"], "the bundle has no coreml section"),
        (["--section", "onnx/fp16"], "the bundle has no section 'onnx/fp16'"),
    ],
)
def test_studio_command_errors_exit_2(capsys, tiny_lcm_bundle: Path, argv: list[str], message: str) -> None:
    assert main(["studio", "--model", str(tiny_lcm_bundle), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_studio_on_a_missing_bundle_exits_2(capsys, tmp_path: Path) -> None:
    assert main(["studio", "--model", str(tmp_path / "nope")]) == 2
    assert "no such bundle folder" in capsys.readouterr().err


def test_two_first_requests_for_a_model_load_it_once(studio: Studio, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[tuple[str, str]] = []

    def slow_load(backend: str, section: str) -> engine.LoadedModel:
        loaded.append((backend, section))
        time.sleep(0.3)  # long enough for the second request to arrive while the first loads
        return engine.LoadedModel(backend, section, studio.default.pipe, None, 0.3)

    monkeypatch.setattr(studio, "_load", slow_load)
    monkeypatch.setattr(studio, "_models", OrderedDict(studio._models))
    monkeypatch.delitem(studio._models, ("onnx", "onnx/int8"), raising=False)
    barrier = threading.Barrier(2)

    def get(_: int) -> engine.LoadedModel:
        barrier.wait()  # both ask at the same moment; one loads, the other waits for it and reuses it
        return studio.model_for("onnx", "onnx/int8")

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(get, range(2))
    assert a is b and loaded == [("onnx", "onnx/int8")]
