"""TensorRT-ready graphs in the bundle, engine matching, and refit bookkeeping, on real tiny exports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sdkiln.runtime.backends.tensorrt import choose_engine, component_files, graph_key
from sdkiln.runtime.backends.tensorrt_build import graph_fingerprint, graph_sha256, plan_refit, weight_digests
from sdkiln.runtime.load import engine_sections_for, model_info, pick_section

TAG = "sm90-trt10.8.0.43"


def test_tensorrt_ready_graphs_are_in_the_bundle(nvidia_bundle: Path, nvidia_manifest: Any) -> None:
    sections = nvidia_manifest.sections
    assert sections["tensorrt/onnx-fp16"].kind == "tensorrt"
    assert sections["tensorrt/onnx-fp32"].kind == "tensorrt"
    fp16 = sections["tensorrt/onnx-fp16"]
    assert set(fp16.details["profiles"]) == set(fp16.components)  # every graph has its profile
    for key, entry in fp16.components.items():
        assert (nvidia_bundle / "tensorrt/onnx-fp16" / entry.path).is_file(), key
    assert pick_section(nvidia_manifest, "tensorrt", None) == "tensorrt/onnx-fp16"
    # The runtime reads the TensorRT-ready folder like an ONNX one (configs, scheduler, tokenizer).
    info = model_info(nvidia_bundle / "tensorrt/onnx-fp16", fp16, "tensorrt/onnx-fp16")
    assert info.family == "sd15"
    assert info.controlnets == ("controlnet.canny", "controlnet.scribble")


def _engine_section(manifest: Any, source: str, tag: str, files: dict[str, str]) -> Any:
    """What build_tensorrt writes into a bundle section for a UNet engine (shape of the manifest only)."""
    from sdkiln.runtime.contract.manifest import Section

    return Section(
        kind="tensorrt_engine",
        step="engines",
        digest="e" * 64,
        details={
            "target": {"tag": tag},
            "source": {"step": manifest.sections[source].step, "digest": manifest.sections[source].digest},
            "engines": {"unet": {"path": f"{tag}/unet.plan", "source_files": files, "settings": {}}},
        },
    )


def test_engines_are_matched_by_gpu_tag_and_graph_sha256(nvidia_bundle: Path, nvidia_manifest: Any) -> None:
    section = "tensorrt/onnx-fp16"
    unet_rel = nvidia_manifest.sections[section].components["unet"].path
    files = component_files(nvidia_manifest.files, section, unet_rel)
    assert set(files) == {unet_rel} | ({f"{unet_rel}_data"} & set(files))
    assert all(len(v) == 64 for v in files.values())
    manifest = nvidia_manifest.model_copy(deep=True)
    manifest.sections["tensorrt/engines"] = _engine_section(manifest, section, TAG, files)
    manifest.sections["tensorrt/engines-sm89"] = _engine_section(
        manifest, section, "sm89-trt10.8.0.43", files
    )
    assert engine_sections_for(manifest, section) == ["tensorrt/engines", "tensorrt/engines-sm89"]
    assert engine_sections_for(manifest, "tensorrt/onnx-fp32") == []
    engines = [(nvidia_bundle / n, manifest.sections[n]) for n in engine_sections_for(manifest, section)]
    plan, _ = choose_engine("unet", files, TAG, engines)
    assert plan == nvidia_bundle / "tensorrt/engines" / TAG / "unet.plan"
    assert choose_engine("unet", files, "sm89-trt10.8.0.43", engines)[0].parts[-3] == "engines-sm89"
    assert choose_engine("unet", files, "sm80-trt10.8.0.43", engines) is None  # no engine for this GPU
    changed = {k: "0" * 64 for k in files}
    assert choose_engine("unet", changed, TAG, engines) is None  # built from other weights: not used
    assert choose_engine("vae_decoder", files, TAG, engines) is None
    assert graph_key(files) == graph_key(dict(reversed(list(files.items()))))
    assert graph_key(files) != graph_key(changed)


def test_refit_bookkeeping_across_two_loras(nvidia_bundle: Path) -> None:
    """Two LoRAs fused into one base export to graphs of identical structure (refit works) whose weights
    differ where the LoRA touched them; another component is another structure (rebuild)."""
    a = nvidia_bundle / "tensorrt/onnx-fp16/unet/model.onnx"
    b = nvidia_bundle / "lora-b/trt/unet/model.onnx"
    other = nvidia_bundle / "tensorrt/onnx-fp16/vae_decoder/model.onnx"
    fp_a, fp_b = graph_fingerprint(a), graph_fingerprint(b)
    assert fp_a == fp_b
    assert graph_fingerprint(other) != fp_a
    assert graph_fingerprint(nvidia_bundle / "tensorrt/onnx-fp32/unet/model.onnx") != fp_a  # fp32 vs fp16
    da, db = weight_digests(a), weight_digests(b)
    assert set(da) == set(db)
    plan = plan_refit(da, db, refittable=None, fingerprints=(fp_a, fp_b))
    assert plan.ok
    assert 0 < len(plan.changed) < len(da)  # the LoRA's layers changed, the rest did not
    assert plan.unchanged == len(da) - len(plan.changed)
    assert graph_sha256(a) != graph_sha256(b)

    stuck = plan_refit(da, db, refittable=set(da) - {plan.changed[0]}, fingerprints=(fp_a, fp_b))
    assert not stuck.ok
    assert "1 changed weight(s) are not refittable" in stuck.problems[0]
    wrong = plan_refit(
        da, weight_digests(other), refittable=None, fingerprints=(fp_a, graph_fingerprint(other))
    )
    assert not wrong.ok
    assert "different structure" in wrong.problems[0]


def test_build_tensorrt_reads_its_input_files(nvidia_bundle: Path, nvidia_manifest: Any) -> None:
    """The stage records each engine's source graph files by sha256, the same way the bundle lists them."""
    from sdkiln.stages.build_tensorrt import source_files
    from sdkiln.stages.engine import folder_artifact

    section = "tensorrt/onnx-fp16"
    entry = nvidia_manifest.sections[section]
    art = folder_artifact("trt_onnx", nvidia_bundle / section, "tensorrt", components=entry.components)
    rel = entry.components["unet"].path
    assert source_files(art, rel) == component_files(nvidia_manifest.files, section, rel)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_qdq_graph_for_tensorrt(nvidia_bundle: Path, tmp_path: Path, precision: str) -> None:
    """Explicit quantization of the fp32 TensorRT-ready UNet: symmetric Q/DQ straight in front of the
    convolutions and matmuls, fp16 elsewhere, and close to the fp32 graph when run (ONNX Runtime, CPU)."""
    import numpy as np
    import onnxruntime as ort

    from sdkiln.runtime.contract.metrics import compare
    from sdkiln.stages.common.onnx.io import spec_feeds as random_feeds
    from sdkiln.stages.common.onnx.qdq import qdq_summary, quantize_for_tensorrt

    src_dir = nvidia_bundle / "tensorrt/onnx-fp32"
    from sdkiln.runtime.contract.manifest import read_bundle_manifest

    manifest = read_bundle_manifest(nvidia_bundle)
    entry = manifest.sections["tensorrt/onnx-fp32"].components["unet"].model_dump(mode="json")
    from sdkiln.runtime.contract.specs import resolve_shape
    from sdkiln.stages.common.onnx.components import bindings

    axes = bindings(1, 64, 64)
    shapes = {t["name"]: resolve_shape(t["shape"], axes) for t in entry["inputs"]}
    calib = [random_feeds(entry["inputs"], shapes, seed=s) for s in range(4)]
    for feeds in calib:  # residuals of a ControlNet at work are small next to the UNet's own activations
        for k in feeds:
            if "residual" in k:
                feeds[k] = (feeds[k] * 0.1).astype(np.float32)
    dst = tmp_path / precision / "unet" / "model.onnx"
    quantize_for_tensorrt(src_dir / "unet/model.onnx", dst, precision, calib)
    s = qdq_summary(dst)
    assert s["quantized_ops"] > 10
    assert s["nonzero_zero_points"] == []
    assert s["zero_point_types"] == (["INT8"] if precision == "int8" else ["FLOAT8E4M3FN"])
    assert s["casts_after_dequantize"] == []
    ref = ort.InferenceSession(str(src_dir / "unet/model.onnx"), providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    m = compare(ref.run(None, calib[0])[0], q.run(None, calib[0])[0])
    # Random tiny weights are a hard case for 8-bit scales (seen here: INT8 ~26 dB, FP8 ~15 dB with ORT's
    # distribution-based FP8 scales). The floors say the graph computes the same function, not what a
    # real model gets.
    assert m["sqnr_db"] > (22.0 if precision == "int8" else 12.0), m
