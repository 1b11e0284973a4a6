"""The real-size SD 1.5 UNet (the ``sd15`` preset: real shapes, seeded random weights) converts and
palettizes to 6 bits on this machine. Opt in: ``-m slow`` (tens of minutes, ~12 GB of memory).

The conversion time, palettization time and peak memory are printed (``-s``) and attached to the test
report as properties, for the issue note.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest
from testkit import run_stage

from sdkiln.stages.engine.core import InputArtifact

pytestmark = pytest.mark.slow

MAX_SIZE_RATIO = 0.40  # 6-bit package vs the fp16 one (6/16 = 0.375 plus tables and small fp16 weights)
# Random weights are not trained ones: the 6-bit palettes of the preset's Gaussian-like weights lose more
# than Apple's 35 dB gate allows for real checkpoints; this floor still fails any broken package.
RANDOM_WEIGHTS_MIN_PSNR_DB = 30.0


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled from /proc every 0.1 s)."""

    def __init__(self) -> None:
        self.peak_bytes = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._rss())
            time.sleep(0.1)

    def __enter__(self) -> PeakRSS:
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._rss())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak memory is read from /proc")
def test_sd15_unet_converts_and_palettizes_to_6_bits(tmp_path: Path, record_property) -> None:
    from sdkiln.stages.common.torch.presets import save_preset
    from sdkiln.stages.export_coreml import STAGE as EXPORT
    from sdkiln.stages.export_coreml import ExportCoremlParams
    from sdkiln.stages.palettize_coreml import STAGE as PALETTIZE
    from sdkiln.stages.palettize_coreml import PalettizeCoremlParams

    folder = tmp_path / "sd15"
    pipeline = InputArtifact("sd15", folder, save_preset("sd15", folder, seed=0))

    export_params = ExportCoremlParams(
        attention="split_einsum", components=("unet",), unet="plain", height=512, width=512
    )
    with PeakRSS() as export_mem:
        t0 = time.perf_counter()
        exported = run_stage(EXPORT, export_params, {"model": pipeline}, tmp_path / "export")
        export_s = time.perf_counter() - t0

    pal_params = PalettizeCoremlParams(
        nbits=6, components=("unet",), kmeans_workers=2, min_psnr_db=RANDOM_WEIGHTS_MIN_PSNR_DB
    )
    with PeakRSS() as pal_mem:
        t0 = time.perf_counter()
        palettized = run_stage(
            PALETTIZE,
            pal_params,
            {"coreml": exported.artifact("export"), "model": pipeline},
            tmp_path / "pal",
        )
        pal_s = time.perf_counter() - t0

    m = palettized.ctx.metrics
    note = {
        "export_s": round(export_s, 1),
        "unet_convert_s": exported.ctx.metrics["unet.convert_s"],
        "export_peak_rss_gb": round(export_mem.peak_bytes / 2**30, 2),
        "fp16_bytes": m["unet.bytes_before"],
        "fp16_psnr_db": exported.ctx.metrics["unet.psnr_db"],
        "palettize_s": round(pal_s, 1),
        "palettize_peak_rss_gb": round(pal_mem.peak_bytes / 2**30, 2),
        "6bit_bytes": m["unet.bytes_after"],
        "size_ratio": m["unet.size_ratio"],
        "bits_per_weight": m["unet.bits_per_weight"],
        "lut_ops": m["unet.lut_ops"],
        "6bit_psnr_db": m["unet.psnr_db"],
    }
    for k, v in note.items():
        record_property(k, v)
    print("\nsd15 UNet Core ML:", json.dumps(note))

    assert exported.ctx.components["unet"]["inputs"][0]["shape"] == [2, 4, 64, 64]
    assert m["unet.size_ratio"] <= MAX_SIZE_RATIO
    assert m["unet.lut_ops"] == m["unet.eligible_weights"] > 280  # 282 rank >= 2 weights above 2048 elements
    assert 6.0 < m["unet.bits_per_weight"] < 6.5
