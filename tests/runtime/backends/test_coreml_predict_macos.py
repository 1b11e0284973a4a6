"""Core ML predict() against PyTorch: only macOS can run a Core ML model (opt in: ``-m macos``).

On Linux the stages check packages by reading their weights back into PyTorch; these tests close the
loop where Core ML runs, with its fp16 compute: the packages' outputs must clear Apple's 35 dB PSNR gate
against the fp32 PyTorch reference (the tiny palettized floor for the 6-bit UNet), and a ControlNet's
outputs must drive the ControlledUnet.
"""

from __future__ import annotations

import sys

import pytest

from sdkiln.runtime.contract.floors import COREML_TINY_MIN_PSNR_DB, tolerance
from sdkiln.stages.common.coreml import io as cio
from sdkiln.stages.common.coreml.flexible import at_batch

pytestmark = [
    pytest.mark.macos,
    pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predict() runs only on macOS"),
]

FP16_COMPUTE_FLOOR_DB = tolerance("unet").coreml_min_psnr_db


def _predict(path, names, example):
    import coremltools as ct

    model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY)
    return model.predict({n: x.numpy() for n, x in zip(names, example, strict=True)})


def _reference(folder, key, example):
    module = cio.build_module(key, cio.load_model(folder, key), "original", added_cond=False)
    return cio.run_module(module, example)


@pytest.mark.parametrize("which", ["coreml_split", "coreml_original"])
def test_every_package_matches_pytorch(which, request, tiny_sd15_dir):
    """Every package at every batch size it declares (flexible UNets/ControlNets: 2 and 1)."""
    built = request.getfixturevalue(which)
    for key, comp in built.ctx.components.items():
        declared = tuple(cio.TensorInfo.from_manifest(t) for t in comp["inputs"])
        for batch in comp.get("batch_sizes") or [declared[0].shape[0]]:
            inputs = at_batch(declared, batch)
            example = cio.example_inputs(inputs, seed=0, vocab_size=49408)
            out = _predict(built.out / comp["path"], [t.name for t in inputs], example)
            reference = _reference(tiny_sd15_dir, key, example)
            for t, ref in zip(comp["outputs"], reference, strict=True):
                assert out[t["name"]].shape == ref.shape, (key, batch, t["name"])
                assert cio.psnr(ref, out[t["name"]]) >= FP16_COMPUTE_FLOOR_DB, (key, batch, t["name"])


def test_controlnet_drives_the_controlled_unet(coreml_split):
    comps = coreml_split.ctx.components
    cn_inputs = tuple(cio.TensorInfo.from_manifest(t) for t in comps["controlnet.scribble"]["inputs"])
    # Apple's Swift pipeline omits conditioning_scale: the default (1) must apply.
    names = [t.name for t in cn_inputs if t.name != "conditioning_scale"]
    example = [
        x
        for t, x in zip(cn_inputs, cio.example_inputs(cn_inputs, 0, 49408), strict=True)
        if t.default is None
    ]
    residuals = _predict(coreml_split.out / comps["controlnet.scribble"]["path"], names, example)
    unet_inputs = {n: x.numpy() for n, x in zip(names, example, strict=True) if n in ("sample", "timestep")}
    unet_inputs["encoder_hidden_states"] = example[names.index("encoder_hidden_states")].numpy()
    import coremltools as ct

    unet = ct.models.MLModel(str(coreml_split.out / comps["controlled_unet"]["path"]))
    noise = unet.predict({**unet_inputs, **residuals})["noise_pred"]
    assert noise.shape == unet_inputs["sample"].shape


def test_palettized_chunks_run_in_sequence(palettized_unet, coreml_original, tiny_sd15_dir):
    import coremltools as ct

    comp = coreml_original.ctx.components["controlled_unet"]
    inputs = tuple(cio.TensorInfo.from_manifest(t) for t in comp["inputs"])
    example = cio.example_inputs(inputs, seed=0, vocab_size=49408)
    feed = {t.name: x.numpy() for t, x in zip(inputs, example, strict=True)}
    for chunk in palettized_unet.ctx.components["controlled_unet"]["chunks"]:
        model = ct.models.MLModel(
            str(palettized_unet.out / chunk["path"]), compute_units=ct.ComputeUnit.CPU_ONLY
        )
        feed.update(model.predict({t["name"]: feed[t["name"]] for t in chunk["inputs"]}))
    reference = _reference(tiny_sd15_dir, "controlled_unet", example)[0]
    assert cio.psnr(reference, feed["noise_pred"]) >= COREML_TINY_MIN_PSNR_DB["palettized"]
