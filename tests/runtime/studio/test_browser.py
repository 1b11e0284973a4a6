"""The studio in a real browser: headless Chromium (Debian's) drives ``sdkiln studio`` on 127.0.0.1.

Strokes are drawn with mouse events on the canvas; every render shown in the page is fetched from the
page and must be pixel-identical to ``sdkiln run`` on the same inputs (same backend and section, so the
same arithmetic: no tolerance is needed and none is allowed). Screenshots go into the test's tmp folder.
"""

from __future__ import annotations

import io
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sdkiln.runtime.examples import example_path
from sdkiln.stages.cli import main

pytest.importorskip("torch", reason="the tiny bundle is built with the build extra")

PROMPT = "a red sports car, studio light"  # the page's default prompt
SEED, STEPS = 42, 4  # the page's defaults for the tiny LCM bundle
# Two strokes (canvas-relative offsets from its centre); few points per stroke, because each mouse move
# costs ~0.4 s of software WebGL on a loaded 2-core machine.
STROKES = [[(-150, -100), (-60, -40), (30, 20), (120, 80)], [(-100, 100), (0, 60), (100, 20)]]


OUTSIDE: dict[int, list[str]] = {}  # page -> requests it made to anywhere but the studio


def open_page(browser: Any, url: str) -> Any:
    context = browser.new_context(viewport={"width": 1400, "height": 1300})
    page = context.new_page()
    # Nothing may leave this machine: every request to another host fails the test's page.
    outside: list[str] = []
    page.on(
        "request",
        lambda r: outside.append(r.url) if not r.url.startswith((url, "data:", "blob:")) else None,
    )
    OUTSIDE[id(page)] = outside
    page.goto(url)
    page.wait_for_selector("#studio-canvas canvas", timeout=60_000)
    return page


def draw(page: Any, strokes: list[list[tuple[int, int]]]) -> None:
    page.click("#studio-canvas button[aria-label='Brush']")
    box = page.locator("#studio-canvas canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    for stroke in strokes:
        page.mouse.move(cx + stroke[0][0], cy + stroke[0][1])
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(cx + x, cy + y)
        page.mouse.up()


def render_id(page: Any) -> int:
    m = re.search(r"render #(\d+)", page.inner_text("#studio-status"))
    return int(m.group(1)) if m else 0


def wait_render(page: Any, after: int, timeout_ms: int = 90_000) -> int:
    """Wait until the page shows a finished render newer than ``after``; returns its id."""
    page.wait_for_function(
        """(after) => {
            const m = document.querySelector('#studio-status').innerText.match(/render #(\\d+)/);
            return m !== null && Number(m[1]) > after;
        }""",
        arg=after,
        timeout=timeout_ms,
    )
    assert page.inner_text("#studio-error").strip() == ""
    return render_id(page)


def wait_error(page: Any, text: str, timeout_ms: int = 60_000) -> str:
    page.wait_for_function(
        "(text) => document.querySelector('#studio-error').innerText.includes(text)",
        arg=text,
        timeout=timeout_ms,
    )
    return page.inner_text("#studio-error")


def fetch(page: Any, url: str) -> bytes:
    response = page.request.get(url)
    assert response.ok, url
    return response.body()


def shown_render(page: Any) -> np.ndarray:
    img = Image.open(io.BytesIO(fetch(page, page.get_attribute("#studio-render img", "src"))))
    assert img.format == "PNG"  # lossless, or pixel equality would mean nothing
    return np.asarray(img.convert("RGB"))


def input_as_rendered(page: Any, out: Path) -> Path:
    out.write_bytes(fetch(page, page.get_attribute("#studio-input a[download]", "href")))
    return out


def choose(page: Any, dropdown: str, option: str) -> None:
    page.click(f"{dropdown} input[role='combobox']")
    page.click(f"ul[role='listbox'] li:has-text('{option}')")


def sdkiln_run(tmp_path: Path, bundle: Path, task: str, *args: str) -> np.ndarray:
    out = tmp_path / f"cli-{task}-{time.monotonic_ns()}.png"
    argv = ["run", task, "--model", str(bundle), "--backend", "onnx", "--section", "onnx/fp32"]
    argv += ["--prompt", PROMPT, "--seed", str(SEED), "--steps", str(STEPS), *args, "--out", str(out)]
    assert main(argv) == 0
    return np.asarray(Image.open(out).convert("RGB"))


def assert_same(shown: np.ndarray, cli: np.ndarray) -> None:
    assert shown.shape == cli.shape == (256, 256, 3)  # the tiny bundle's native size
    diff = int(np.abs(shown.astype(int) - cli.astype(int)).max())
    assert diff == 0, f"the studio's render differs from sdkiln run by up to {diff}/255"


def test_draw_render_then_text_and_edit(
    browser, studio_server, tiny_lcm_bundle: Path, tmp_path: Path
) -> None:
    page = open_page(browser, studio_server.url)
    header = page.inner_text("#studio-header")
    assert (
        "backend onnx" in header and "onnx/fp32" in header and "auto" in header and "TAESD preview" in header
    )

    # sketch: drawing re-renders live (no button), with the TAESD preview before the full decode
    draw(page, STROKES)
    rid = wait_render(page, 0)
    page.screenshot(path=tmp_path / "studio-sketch.png", full_page=True)
    status = page.inner_text("#studio-status")
    assert "sketch" in status and "256×256" in status and f"seed {SEED}" in status
    for stage in ("preprocess", "text_encoder", "denoise", "taesd_preview", "vae_decoder", "total"):
        assert stage in status
    sketch = input_as_rendered(page, tmp_path / "sketch.png")
    drawn = np.asarray(Image.open(sketch).convert("L"))
    assert drawn.shape == (512, 512) and (drawn < 128).mean() > 0.005  # the canvas, with our strokes on it
    assert_same(shown_render(page), sdkiln_run(tmp_path, tiny_lcm_bundle, "sketch", "--image", str(sketch)))
    assert "--image" in page.input_value("#studio-command textarea")

    # text: switching the task re-renders
    page.click("#studio-task [data-testid='text-radio-label']")
    rid = wait_render(page, rid)
    assert "text" in page.inner_text("#studio-status")
    assert_same(shown_render(page), sdkiln_run(tmp_path, tiny_lcm_bundle, "text"))

    # edit: a photo uploaded onto the canvas, kept in shape by the canny ControlNet. Each click is a new
    # request superseding the one before it (a render past its last step may still finish); the page
    # ends up showing the upload's render: the photo itself, rendered, so `sdkiln run` takes the file.
    page.click("#studio-task [data-testid='edit-radio-label']")
    page.click("#studio-canny input[type='checkbox']")
    page.set_input_files("input[data-testid$='upload-button']", str(example_path("scene")))
    photo = np.asarray(Image.open(example_path("scene")).convert("RGB"))
    deadline = time.monotonic() + 90
    while True:
        rid = wait_render(page, rid)
        used = np.asarray(Image.open(input_as_rendered(page, tmp_path / f"input-{rid}.png")).convert("RGB"))
        if used.shape == photo.shape and np.array_equal(used, photo):
            break
        assert time.monotonic() < deadline, "the uploaded photo was never rendered"
    assert "--control canny" in page.input_value("#studio-command textarea")
    page.screenshot(path=tmp_path / "studio-edit.png", full_page=True)
    cli = sdkiln_run(
        tmp_path,
        tiny_lcm_bundle,
        "edit",
        "--image",
        str(example_path("scene")),
        "--strength",
        "0.6",
        "--control",
        "canny",
        "--conditioning-scale",
        "1.0",
    )
    assert_same(shown_render(page), cli)
    assert OUTSIDE[id(page)] == []


def test_errors_show_in_the_page_and_it_keeps_serving(browser, studio_server, tmp_path: Path) -> None:
    page = open_page(browser, studio_server.url)
    upload = "input[data-testid$='upload-button']"

    notes = tmp_path / "notes.png"  # named like an image, but text
    notes.write_text("not an image\n")
    page.set_input_files(upload, str(notes))
    assert "notes.png is not an image" in wait_error(page, "is not an image")

    huge = tmp_path / "huge.png"  # small file, too many pixels: refused before it is decoded
    Image.new("L", (5000, 4000), 255).save(huge)
    page.set_input_files(upload, str(huge))
    assert "5000x4000" in wait_error(page, "too large an image")

    choose(page, "#studio-backend", "coreml")
    assert "no coreml section" in wait_error(page, "no coreml section")
    page.screenshot(path=tmp_path / "studio-error.png", full_page=True)
    choose(page, "#studio-backend", "onnx")
    page.wait_for_function("() => document.querySelector('#studio-error').innerText.trim() === ''")

    page.fill("#studio-prompt textarea", "")
    page.click("#studio-render-button")
    wait_error(page, "prompt: write what to render")

    # ... and it still renders
    page.fill("#studio-prompt textarea", PROMPT)
    page.click("#studio-task [data-testid='text-radio-label']")
    wait_render(page, 0)
    assert "render failed" not in studio_server.log_text()
    # Uploads and everything Gradio wrote live in the studio's own temp folder.
    written = [p.name for p in studio_server.tmpdir.iterdir() if p.name != ".ses"]  # .ses: onnxruntime's
    assert len(written) == 1 and written[0].startswith("sdkiln-studio-"), written
    assert list(studio_server.tmpdir.glob("sdkiln-studio-*/gradio/**/notes.png"))


def test_ten_requests_from_two_pages_at_once(browser, studio_server, tmp_path: Path) -> None:
    pages = [open_page(browser, studio_server.url) for _ in range(2)]
    for page in pages:  # text: the renders need no drawing, so the browsers' canvas work stays out of it
        page.click("#studio-task [data-testid='text-radio-label']")
    for page in pages:
        wait_render(page, 0)
    done = studio_server.count(r"studio: render #")
    rss_before, _ = studio_server.rss_kib()

    t0 = time.monotonic()
    for page in pages:  # 5 clicks on each page, all sent before the first render is back
        page.evaluate(
            "() => { for (let i = 0; i < 5; i++) document.querySelector('#studio-render-button').click(); }"
        )
    deadline = time.monotonic() + 120
    while studio_server.count(r"studio: render #") < done + 10 and time.monotonic() < deadline:
        time.sleep(0.2)
    seconds = time.monotonic() - t0
    rss_after, hwm = studio_server.rss_kib()
    for i, page in enumerate(pages):
        page.screenshot(path=tmp_path / f"studio-concurrent-{i}.png", full_page=True)

    log = studio_server.log_text()
    assert studio_server.count(r"studio: render #") == done + 10, log
    assert not re.search(r"render failed|Traceback", log), log
    assert studio_server.count(r"studio: loaded ") == 1, log  # the model was loaded once, at start
    for page in pages:
        assert page.inner_text("#studio-error").strip() == ""
        status = page.inner_text("#studio-status")
        assert "onnx onnx/fp32 ×1" in status and "up to 2 at once" in status, status
    # No second copy of the model: memory stays put (a copy of the sessions would add their size).
    assert rss_after < 1.5 * rss_before, (rss_before, rss_after)
    print(
        f"10 renders from 2 pages in {seconds:.1f} s; RSS {rss_before / 1024:.0f} -> {rss_after / 1024:.0f} MiB"
    )
    print(f"(peak {hwm / 1024:.0f} MiB)")
