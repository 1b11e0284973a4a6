"""palettize_coreml: 6-bit lookup tables in the tiny UNet, sizes and bits per weight in the manifest,
Linux parity above the floor, chunking, mixed-bit recipes, per-grouped-channel palettes."""

from __future__ import annotations

import filecmp

import numpy as np
import pytest
from pydantic import ValidationError
from testkit import run_stage

from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.floors import COREML_TINY_MIN_PSNR_DB
from sdkiln.stages.common.coreml import io as cio
from sdkiln.stages.common.coreml import readback as crb
from sdkiln.stages.palettize_coreml import (
    STAGE,
    PalettizeCoremlParams,
    choose_bits,
    kmeans_palette,
    simulate_palette,
)

CHUNKS = ["packages/ControlledUnetChunk1.mlpackage", "packages/ControlledUnetChunk2.mlpackage"]


def test_unet_has_6bit_lookup_tables_in_both_chunks(palettized_unet):
    entry = palettized_unet.ctx.components["controlled_unet"]
    assert [c["path"] for c in entry["chunks"]] == CHUNKS and "path" not in entry
    assert not (palettized_unet.out / "packages/ControlledUnet.mlpackage").exists()
    for rel in CHUNKS:
        spec = crb.read_spec(palettized_unet.out / rel)
        assert spec.ops["constexpr_lut_to_dense"] > 10, rel
        records = crb.read_weights(palettized_unet.out / rel)
        luts = [r for r in records.values() if r.palettized]
        assert luts and all(r.nbits == 6 for r in luts)
        # A 6-bit palette: at most 64 distinct values per tensor. (float32 before np.unique: numpy 2.3's
        # AVX-512 float16 sort returns unsorted runs for large arrays with many repeats on some CPUs.)
        assert all(len(np.unique(r.dense.astype(np.float32))) <= 64 for r in luts)
    assert entry["palettization"] == {"nbits": 6, "granularity": "per_tensor"}


def test_sizes_bits_and_parity_are_recorded(palettized_unet, coreml_original):
    m = palettized_unet.ctx.metrics
    k = "controlled_unet"
    assert m[f"{k}.bytes_before"] == cio.package_bytes(
        coreml_original.out / "packages/ControlledUnet.mlpackage"
    )
    assert m[f"{k}.bytes_after"] == sum(cio.package_bytes(palettized_unet.out / r) for r in CHUNKS)
    assert m[f"{k}.size_ratio"] < 0.55
    # 6-bit indices plus 64-entry fp16 tables, plus the fp16 weights too small to palettize.
    assert 6.0 < m[f"{k}.bits_per_weight"] < 8.0
    assert m[f"{k}.lut_ops"] == m[f"{k}.eligible_weights"] > 50
    assert m[f"{k}.palette_bits.6"] == m[f"{k}.lut_ops"]
    assert m[f"{k}.psnr_floor_db"] == COREML_TINY_MIN_PSNR_DB["palettized"]
    assert m[f"{k}.psnr_floor_db"] <= m[f"{k}.psnr_db"] < 70  # lossy, and measured through both chunks
    assert m[f"{k}.chunk_balance"] > 0.8
    # Both batch sizes the flexible package takes are measured, and both chunks keep taking them.
    assert m[f"{k}.psnr_db"] == min(m[f"{k}.psnr_db_batch2"], m[f"{k}.psnr_db_batch1"])
    entry = palettized_unet.ctx.components[k]
    assert entry["batch_sizes"] == [2, 1]
    import coremltools as ct

    from sdkiln.stages.common.coreml.flexible import accepted_batches

    first = accepted_batches(ct.utils.load_spec(str(palettized_unet.out / CHUNKS[0])))
    assert first["sample"] == first["encoder_hidden_states"] == [1, 2]


def test_chunks_compose_to_the_unet(palettized_unet, coreml_original):
    full = coreml_original.ctx.components["controlled_unet"]
    first, second = palettized_unet.ctx.components["controlled_unet"]["chunks"]
    full_in = {t["name"] for t in full["inputs"]}
    assert {t["name"] for t in first["inputs"]} <= full_in
    assert {t["name"] for t in second["inputs"]} <= full_in | {t["name"] for t in first["outputs"]}
    assert second["outputs"] == full["outputs"]


def test_other_components_are_copied_unchanged(palettized_unet, coreml_original):
    rel = coreml_original.ctx.components["controlnet.scribble"]["path"]
    cmp = filecmp.dircmp(coreml_original.out / rel, palettized_unet.out / rel)
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only
    assert (
        palettized_unet.ctx.components["controlnet.scribble"]
        == coreml_original.ctx.components["controlnet.scribble"]
    )
    assert (palettized_unet.out / "vocab.json").read_bytes() == (
        coreml_original.out / "vocab.json"
    ).read_bytes()


def test_mixed_bit_grouped_channel(coreml_split, tiny_sd15_artifact, tmp_path):
    """A per-layer recipe over {4, 8} bits with per-grouped-channel palettes (iOS 18 ops), on the VAE
    decoder (an opt-in component)."""
    params = PalettizeCoremlParams(
        components=("vae_decoder",),
        granularity="per_grouped_channel",
        group_size=16,
        mixed_bit={"candidates": (4, 8), "min_psnr_db": 42.0},
    )
    inputs = {"coreml": coreml_split.artifact("coreml"), "model": tiny_sd15_artifact}
    built = run_stage(STAGE, params, inputs, tmp_path)
    m, k = built.ctx.metrics, "vae_decoder"
    recipe = built.ctx.details["palettization"]["mixed_bit"][k]
    hist = {b: list(recipe.values()).count(b) for b in (4, 8)}
    assert hist[4] > 0 and hist[8] > 0, hist  # a real mix: some layers need 8 bits, others do not
    assert m[f"{k}.mixed_bit.predicted_psnr_db"] >= 42.0
    assert m[f"{k}.palette_bits.4"] == hist[4] and m[f"{k}.palette_bits.8"] == hist[8]
    assert m[f"{k}.psnr_db"] >= m[f"{k}.psnr_floor_db"]
    records = crb.read_weights(built.out / built.ctx.components[k]["path"])
    grouped = [r for r in records.values() if r.palettized and r.dense.shape[0] > 16]
    assert grouped
    # Per group of 16 output channels, at most 2**bits values; across the tensor, more.
    for r in grouped:
        assert all(len(np.unique(r.dense[i : i + 16])) <= 2**r.nbits for i in range(0, r.dense.shape[0], 16))
    assert any(len(np.unique(r.dense)) > 2**r.nbits for r in grouped)
    assert built.ctx.components[k]["palettization"] == {
        "nbits": "mixed",
        "granularity": "per_grouped_channel",
        "group_size": 16,
    }
    # Components not selected are copied as they were.
    assert built.ctx.components["controlled_unet"] == coreml_split.ctx.components["controlled_unet"]


def test_grouped_channel_needs_an_ios18_export(coreml_original, tiny_sd15_artifact, tmp_path):
    params = PalettizeCoremlParams(granularity="per_grouped_channel")
    inputs = {"coreml": coreml_original.artifact("coreml"), "model": tiny_sd15_artifact}
    with pytest.raises(UserError, match="iOS18"):
        run_stage(STAGE, params, inputs, tmp_path)


def test_params_are_validated():
    with pytest.raises(ValidationError, match="nbits"):
        PalettizeCoremlParams(nbits=5)
    with pytest.raises(ValidationError, match="group_size"):
        PalettizeCoremlParams(group_size=8)  # per_tensor has no groups
    with pytest.raises(ValidationError, match="distinct"):
        PalettizeCoremlParams(mixed_bit={"candidates": (4, 4)})
    with pytest.raises(ValidationError, match="components"):
        PalettizeCoremlParams(components=("tokenizer",))


def test_kmeans_palette_error_falls_with_bits():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 128)).astype(np.float32)
    errors = []
    for bits in (2, 4, 6, 8):
        q = kmeans_palette(w, bits)
        assert q.shape == w.shape and len(np.unique(q)) <= 2**bits
        errors.append(float(np.mean((q - w) ** 2)))
    assert errors == sorted(errors, reverse=True)
    # Near the optimum for a unit Gaussian: ~0.118 at 2 bits (Lloyd-Max), ~6.6e-4 at 6 bits.
    assert errors[0] < 0.125 and errors[2] < 8e-4
    # Per group: each block of 16 rows gets its own palette, which fits better than one for all.
    g = simulate_palette(w, 2, group_size=16)
    assert float(np.mean((g - w) ** 2)) < errors[0]


def test_choose_bits_widens_the_sensitive_layer_first():
    sensitivity = {"robust": {4: 50.0, 8: 70.0}, "sensitive": {4: 30.0, 8: 55.0}}
    sizes = {"robust": 1000, "sensitive": 1000}
    bits, predicted = choose_bits(sensitivity, sizes, (4, 8), target_db=45.0)
    assert bits == {"robust": 4, "sensitive": 8} and predicted >= 45.0
    bits, predicted = choose_bits(sensitivity, sizes, (4, 8), target_db=20.0)
    assert bits == {"robust": 4, "sensitive": 4}
    bits, predicted = choose_bits(sensitivity, sizes, (4, 8), target_db=90.0)  # unreachable: all widest
    assert bits == {"robust": 8, "sensitive": 8} and predicted < 90.0


def test_one_layer_2pct_off_fails_the_6bit_gate(palettized_unet, tiny_sd15_dir):
    """6-bit noise hides a layer 2 % off from the output PSNR (the palette costs ~15 dB on its own);
    the read-back compares each palette value with the centroid of the reference weights it stands
    for, which a faithful package matches up to rounding."""
    records: dict = {}
    for rel in CHUNKS:
        records.update(crb.read_weights(palettized_unet.out / rel))

    def check(recs):
        module = cio.build_module("unet", cio.load_model(tiny_sd15_dir, "unet"), "original", False)
        report = crb.load_weights_into(module, recs)
        return report, crb.accounting_problems(module, recs, report)

    report, problems = check(records)
    assert problems == []
    worst = max(err for kind, err in report.drift.values() if kind == "6bit")
    assert worst <= crb.drift_limit("6bit")
    op = max((n for n, r in records.items() if r.palettized), key=lambda n: records[n].dense.size)
    bad = {
        **records,
        op: crb.WeightRecord(op, records[op].dense * np.float16(1.02), records[op].storage_bits, 6),
    }
    _, problems = check(bad)
    assert len(problems) == 1 and "(6bit)" in problems[0], problems
