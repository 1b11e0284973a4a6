"""Every backend honours the same component contract (parametrized over the backends this machine runs):
inputs checked against the spec before anything runs, outputs named and shaped as the spec says, the
three tasks at the requested size, the same image for the same seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sdkiln.runtime.contract.errors import InputSpecError, UserError
from sdkiln.runtime.contract.specs import resolve_shape
from sdkiln.runtime.load import load
from sdkiln.runtime.parity import CASES, run_case

pytest.importorskip("torch", reason="the tiny bundle is built with the build extra")

BACKENDS = ["onnx", "torch", "openvino"]  # coreml: tests/runtime/backends/test_coreml.py (needs macOS)
SIZE = 64


@pytest.fixture(scope="module", params=BACKENDS)
def pipe(request, tiny_bundle: Path):
    if request.param == "openvino":
        return load(request.getfixturevalue("tiny_openvino_bundle"), backend="openvino")
    return load(tiny_bundle, backend=request.param)


def _feeds(io, bindings: dict[str, int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for name, spec in io.inputs.items():
        if spec.optional:
            continue
        shape = resolve_shape(spec.shape, bindings)
        if spec.dtype.startswith("int"):
            feeds[name] = np.full(shape, 49407, dtype=spec.dtype)
        else:
            feeds[name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds


BINDINGS = {"batch": 1, "height": SIZE, "width": SIZE, "latent_height": SIZE // 8, "latent_width": SIZE // 8}


@pytest.mark.parametrize(
    "component",
    ["text_encoder", "unet", "controlnet.scribble", "vae_decoder", "vae_encoder", "taesd_decoder"],
)
def test_outputs_are_named_and_shaped_as_the_spec_says(pipe, component: str) -> None:
    assert pipe.backend.has(component) and pipe.backend.description
    comp = pipe.backend.component(component)
    feeds = _feeds(comp.io, BINDINGS)
    if "conditioning_scale" in feeds:
        feeds["conditioning_scale"] = np.ones((1,), np.float32)
    out = comp(**feeds)
    assert set(out) == set(comp.io.outputs)
    for name, arr in out.items():
        want = resolve_shape(comp.io.outputs[name].shape, BINDINGS)
        assert list(arr.shape) == want, (component, name)
        assert np.isfinite(arr).all()


def test_inputs_are_checked_before_anything_runs(pipe) -> None:
    unet = pipe.backend.component("unet")
    feeds = _feeds(unet.io, BINDINGS)
    with pytest.raises(InputSpecError, match="dtype float64"):
        unet(**{**feeds, "sample": feeds["sample"].astype(np.float64)})
    with pytest.raises(InputSpecError, match="missing input"):
        unet(**{k: v for k, v in feeds.items() if k != "timestep"})
    with pytest.raises(InputSpecError, match="unknown input"):
        unet(**feeds, bogus=feeds["timestep"])
    with pytest.raises(UserError, match="has no controlnet.depth"):
        pipe.backend.component("controlnet.depth")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.task)
def test_tasks_run_at_the_requested_size_and_repeat_exactly(pipe, case) -> None:
    a = run_case(pipe, case, steps=2, size=SIZE)
    b = run_case(pipe, case, steps=2, size=SIZE)
    assert a.images[0].size == (SIZE, SIZE) and np.isfinite(a.pixels).all()
    np.testing.assert_array_equal(a.pixels, b.pixels)  # same seed, same image on the same backend
