"""render_demo: contact sheet (sketch | reference | ONNX | INT8 with PSNR) and a Markdown report."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.demo import render_demo

pytest.importorskip("torch", reason="the demo renders the PyTorch reference too")


def test_render_demo(tmp_path: Path, tiny_lcm_bundle: Path) -> None:
    names = ["car", "cat"]  # make demo renders all of them; two rows show the layout
    report = render_demo(tiny_lcm_bundle, tmp_path / "demo", size=64, steps=2, sketches=names)
    text = report.read_text()
    sheet = Image.open(tmp_path / "demo" / "contact_sheet.png")
    assert sheet.width == 4 * 192 and 2 * 192 < sheet.height < 3 * 192  # 4 columns, a row per sketch
    assert "![contact sheet](contact_sheet.png)" in text
    for name in names:
        assert f"| {name} |" in text
        assert (tmp_path / "demo" / f"{name}-onnx-int8.png").is_file()
    # Columns are titled by what each section's files hold; the INT8 section keeps its VAEs fp32.
    assert "onnx/fp32 (fp32)" in text and "onnx/int8 (mixed)" in text and "2 steps" in text
    assert "| unet | fp32 | int8 |" in text and "| vae_decoder | fp32 | fp32 |" in text
    with pytest.raises(UserError, match="unknown example sketch"):
        render_demo(tiny_lcm_bundle, tmp_path / "demo", sketches=["dog"])
