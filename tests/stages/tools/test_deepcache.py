"""DeepCache-style reuse: the unrolled full step is the diffusers UNet's forward; the shallow step runs on
the cached features; inside the runtime loop full and shallow calls alternate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the DeepCache experiment runs the PyTorch reference")


def test_full_step_is_the_unet_forward_and_shallow_reuses_the_cache(tiny_sd15_dir: Path) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    from sdkiln.stages.tools.bench.deepcache import full_step, shallow_step

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15_dir / "unet").eval()
    g = torch.Generator().manual_seed(0)
    c = unet.config
    x = {
        "sample": torch.randn(2, c.in_channels, 16, 16, generator=g),
        "timestep": torch.tensor([500.0, 500.0]),
        "encoder_hidden_states": torch.randn(2, 77, c.cross_attention_dim, generator=g),
    }
    with torch.inference_mode():
        want = unet(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"]).sample
        got, cache = full_step(unet, x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        shallow = shallow_step(unet, x, cache)
    # same inputs, cache from the same step: the shallow path reproduces the full output
    torch.testing.assert_close(shallow, want, atol=1e-5, rtol=1e-5)
    assert cache.shape[-1] == 16  # the features entering the last up block (upsampled by the one before)


def test_deepcache_in_the_runtime_loop(tiny_bundle: Path) -> None:
    from sdkiln.runtime.load import load
    from sdkiln.runtime.parity import CASES, run_case
    from sdkiln.runtime.pipeline import Pipeline
    from sdkiln.stages.tools.bench.deepcache import DeepCacheBackend

    base = load(tiny_bundle, backend="torch")
    backend = DeepCacheBackend(base.backend, interval=2)
    pipe = Pipeline(backend, base.info, source="deepcache")
    case = next(c for c in CASES if c.task == "sketch")
    a = run_case(pipe, case, steps=4, size=64)
    assert backend.unet.kinds == ["full", "shallow", "full", "shallow"]
    b = run_case(base, case, steps=4, size=64)
    assert np.isfinite(a.pixels).all() and not np.array_equal(a.pixels, b.pixels)  # reuse changes the result
