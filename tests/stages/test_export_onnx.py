"""export_onnx on the tiny presets: every component, contract I/O, parity at two batch sizes and two
resolutions, the optimum/diffusers folder layout, fp16, static shapes, external data, both exporters."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from testkit import run_stage

from sdkiln.runtime.contract.errors import ParityError
from sdkiln.runtime.contract.families import component_specs, get_family
from sdkiln.runtime.contract.floors import Gate, tolerance
from sdkiln.runtime.load import open_section
from sdkiln.runtime.parity import CASES, compare, floor_for, run_case
from sdkiln.stages.common.onnx.parity import ParityCase, ParityReport
from sdkiln.stages.common.torch.pipeline import read_configs
from sdkiln.stages.engine.core import InputArtifact

from .conftest import PARITY

SD15_KEYS = {
    "text_encoder",
    "unet",
    "controlnet.canny",
    "controlnet.scribble",
    "vae_encoder",
    "vae_decoder",
    "taesd_encoder",
    "taesd_decoder",
}
SDXL_KEYS = {
    "text_encoder",
    "text_encoder_2",
    "unet",
    "controlnet.canny",
    "vae_encoder",
    "vae_decoder",
    "taesd_encoder",
    "taesd_decoder",
}
GRID = {f"b{b}_{s}x{s}" for b in PARITY["batch_sizes"] for s in PARITY["image_sizes"]}


def _check_export(onnx: InputArtifact, source: InputArtifact, keys: set[str]) -> None:
    fam = get_family(source.manifest.model.family)
    comps = onnx.components
    assert set(comps) == keys
    expected = component_specs(
        fam,
        read_configs(source.path),
        controlnets=source.manifest.model.controlnets,
        taesd=True,
        unet_residual_inputs=True,
    )
    parity = onnx.metrics["parity"]
    for key, entry in comps.items():
        # Contract names, dtypes and symbolic dims, exactly as the family table derives them; the UNet's
        # ControlNet residuals are optional with a zero default (standard pipelines leave them out).
        want = [
            {**t, "optional": True, "default": 0.0} if "additional_residual" in t["name"] else t
            for t in expected[key]["inputs"]
        ]
        assert entry["inputs"] == want, key
        assert entry["outputs"] == expected[key]["outputs"], key
        assert entry["precision"] == "fp32"
        assert (onnx.path / entry["path"]).is_file()
        assert (onnx.path / entry["path"]).parent.joinpath("config.json").is_file()
        assert set(parity[key]["cases"]) >= GRID, key
        tol = tolerance(key)
        worst = parity[key]["worst"]
        assert worst["max_abs"] <= tol.fp32_max_abs and worst["cosine"] >= tol.fp32_min_cosine, (key, worst)
    # Zero residuals are "no ControlNet": the same graph serves text, sketch and edit.
    assert "b1_32x32_no_controlnet" in parity["unet"]["cases"]
    # ... and leaving them out is the same as feeding zeros, bit for bit.
    unfed = onnx.metrics["optional_inputs"]["unet"]
    assert unfed["unfed_vs_zero_max_abs"] == 0.0 and len(unfed["optional_inputs"]) == sum(
        "additional_residual" in t["name"] for t in expected["unet"]["inputs"]
    )
    # The independent reference: the calls diffusers' own pipelines made, batch 1 and 2, were replayed.
    calls = onnx.manifest.details["pipeline_parity"]["calls"]
    for key in ("unet", "text_encoder", *(k for k in keys if k.startswith("controlnet."))):
        assert calls[key] > 0, key
        labels = set(parity[key]["cases"])
        assert any(c.startswith("pipeline_text_b2") or c.startswith("pipeline_controlnet") for c in labels), (
            key
        )
    ctype = next(k for k in keys if k.startswith("controlnet.")).split(".", 1)[1]
    assert any(c.startswith(f"pipeline_controlnet-{ctype}_b1") for c in parity["unet"]["cases"])
    assert onnx.manifest.details["exporter"] == "torchscript" and onnx.manifest.details["opset"] == 17
    assert onnx.manifest.model.unet_controlnet_residuals is True


def test_tiny_sd15_exports_every_component_at_parity(
    sd15_onnx: InputArtifact, tiny_sd15_artifact: InputArtifact
) -> None:
    _check_export(sd15_onnx, tiny_sd15_artifact, SD15_KEYS)
    unet_inputs = [t["name"] for t in sd15_onnx.components["unet"]["inputs"]]
    assert unet_inputs[:3] == ["sample", "timestep", "encoder_hidden_states"]
    assert unet_inputs[-1] == "mid_block_additional_residual"


def test_tiny_sdxl_exports_every_component_at_parity(
    sdxl_onnx: InputArtifact, tiny_sdxl_artifact: InputArtifact
) -> None:
    _check_export(sdxl_onnx, tiny_sdxl_artifact, SDXL_KEYS)
    comps = sdxl_onnx.components
    outs = {k: [t["name"] for t in comps[k]["outputs"]] for k in ("text_encoder", "text_encoder_2")}
    assert outs["text_encoder"] == ["last_hidden_state", "pooler_output", "penultimate_hidden_state"]
    assert outs["text_encoder_2"] == ["text_embeds", "last_hidden_state", "penultimate_hidden_state"]
    for key in ("unet", "controlnet.canny"):
        names = [t["name"] for t in comps[key]["inputs"]]
        assert {"text_embeds", "time_ids"} <= set(names)


def test_controlnet_scale_is_a_runtime_input(sd15_onnx: InputArtifact) -> None:
    from sdkiln.stages.common.onnx import components as oc
    from sdkiln.stages.common.onnx.io import cpu_session

    entry = sd15_onnx.components["controlnet.scribble"]
    sess = cpu_session(sd15_onnx.path / entry["path"])
    comp = oc.Component(
        "controlnet.scribble", "controlnet", "controlnet/scribble", "", tuple(entry["inputs"]), ()
    )
    feeds = oc.make_feeds(comp, oc.bindings(1, 32, 32), seed=3)
    outs = {}
    for scale in (1.0, 0.5, 0.0):
        feeds["conditioning_scale"] = np.array([scale], dtype=np.float32)
        outs[scale] = sess.run(None, feeds)
    for full, half, zero in zip(outs[1.0], outs[0.5], outs[0.0], strict=True):
        assert np.abs(full).max() > 0
        np.testing.assert_allclose(half, 0.5 * full, rtol=1e-5, atol=1e-6)
        assert not zero.any()


def test_folder_is_a_diffusers_onnx_layout(sd15_onnx: InputArtifact) -> None:
    import diffusers

    root = sd15_onnx.path
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and "vae" not in index
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list):
            continue
        if value == ["diffusers", "OnnxRuntimeModel"]:
            assert (root / name / "model.onnx").is_file(), name
        elif value[0] is not None:
            assert (root / name).is_dir(), name
        else:
            assert not (root / name).exists(), name
    indexed = {n for n, v in index.items() if v == ["diffusers", "OnnxRuntimeModel"]}
    assert indexed == {"text_encoder", "unet", "vae_encoder", "vae_decoder"}
    assert (root / "scheduler" / "scheduler_config.json").is_file()
    assert (root / "tokenizer" / "vocab.json").is_file()
    pipe = diffusers.OnnxStableDiffusionPipeline.from_pretrained(str(root), provider="CPUExecutionProvider")
    assert isinstance(pipe.unet, diffusers.OnnxRuntimeModel)
    assert type(pipe.scheduler).__name__ == index["scheduler"][1]


def test_residual_free_export_runs_in_diffusers_onnx_pipeline(
    tmp_path: Path, tiny_sd15_artifact: InputArtifact
) -> None:
    """Exported without ControlNet inputs, the folder runs in diffusers' own ONNX pipeline and gives the
    PyTorch pipeline's image from the same initial latents."""
    import diffusers
    import torch

    from sdkiln.stages.common.torch.pipeline import open_pipeline
    from sdkiln.stages.export_onnx import STAGE

    params = {
        "controlnet_residuals": False,
        "components": ["text_encoder", "unet", "vae_encoder", "vae_decoder"],
        "parity": {"batch_sizes": [1], "image_sizes": [32]},
    }
    ctx = run_stage(STAGE, params, {"model": tiny_sd15_artifact}, tmp_path)
    assert [t["name"] for t in ctx.components["unet"]["inputs"]] == [
        "sample",
        "timestep",
        "encoder_hidden_states",
    ]
    onnx_pipe = diffusers.OnnxStableDiffusionPipeline.from_pretrained(
        str(ctx.out_dir), provider="CPUExecutionProvider"
    )
    torch_pipe = open_pipeline(tiny_sd15_artifact.path, family="sd15").pipe
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    kw = {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np", "guidance_scale": 7.5}
    got = onnx_pipe("a red house", latents=latents, **kw).images
    with torch.inference_mode():
        want = torch_pipe("a red house", latents=torch.from_numpy(latents), **kw).images
    assert got.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(got, want, atol=2e-3)


def test_fp16_export_with_external_data(
    tmp_path: Path, tiny_sd15_artifact: InputArtifact, sd15_onnx: InputArtifact
) -> None:
    import onnx

    from sdkiln.stages.common.onnx.io import EXTERNAL_DATA_FILE
    from sdkiln.stages.export_onnx import STAGE

    params = {
        "precision": "fp16",
        "components": ["unet", "taesd_decoder"],
        "external_data": "always",
        "parity": {"batch_sizes": [1, 2], "image_sizes": [32]},
    }
    ctx = run_stage(STAGE, params, {"model": tiny_sd15_artifact}, tmp_path)
    unet = ctx.components["unet"]
    assert unet["precision"] == "fp16" and ctx.components["taesd_decoder"]["precision"] == "fp32"
    assert {t["dtype"] for t in unet["inputs"] + unet["outputs"]} == {"float32"}  # fp32 graph I/O
    data = ctx.out_dir / "unet" / EXTERNAL_DATA_FILE
    assert data.is_file() and "unet/model.onnx_data" in ctx.details["external_data"]
    weights = onnx.load(str(ctx.out_dir / "unet" / "model.onnx")).graph.initializer
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in weights) > len(weights) // 2
    assert ctx.metrics["bytes"]["unet"] < 0.6 * sd15_onnx.metrics["bytes"]["unet"]
    floor = tolerance("unet").min_sqnr_db["fp16"]
    assert ctx.metrics["parity"]["unet"]["gate"] == {"min_sqnr_db": floor}
    assert ctx.metrics["parity"]["unet"]["worst"]["sqnr_db"] >= floor


def test_save_model_never_appends_to_old_data(tmp_path: Path, sd15_onnx: InputArtifact) -> None:
    from sdkiln.stages.common.onnx.io import cpu_session, load_model, save_model

    src = sd15_onnx.path / "text_encoder" / "model.onnx"
    model = load_model(src)
    path = tmp_path / "te" / "model.onnx"
    digests = []
    for _ in range(2):
        files = save_model(model, path, "always")
        assert [f.name for f in files] == ["model.onnx", "model.onnx_data"]
        digests.append([hashlib.sha256(f.read_bytes()).hexdigest() for f in files])
    assert digests[0] == digests[1]
    assert save_model(model, path, "auto") == [path] and not (path.parent / "model.onnx_data").exists()
    ids = np.full((1, 77), 49407, dtype=np.int32)
    ids[0, :3] = [49406, 320, 1929]
    np.testing.assert_array_equal(
        cpu_session(path).run(None, {"input_ids": ids})[0], cpu_session(src).run(None, {"input_ids": ids})[0]
    )


def test_static_shapes(tmp_path: Path, tiny_sd15_artifact: InputArtifact) -> None:
    from sdkiln.stages.common.onnx.io import cpu_session
    from sdkiln.stages.export_onnx import STAGE

    params = {"static": {"batch": 2, "height": 32, "width": 48}, "components": ["unet"]}
    ctx = run_stage(STAGE, params, {"model": tiny_sd15_artifact}, tmp_path)
    spec = ctx.components["unet"]
    assert spec["inputs"][0]["shape"] == [2, 4, 4, 6]
    assert all(isinstance(d, int) for t in spec["inputs"] + spec["outputs"] for d in t["shape"])
    assert list(ctx.metrics["parity"]["unet"]["cases"]) == ["b2_32x48", "b2_32x48_no_controlnet"]
    assert ctx.details["shapes"] == "static"
    sess = cpu_session(ctx.out_dir / "unet" / "model.onnx")
    assert [d for d in sess.get_inputs()[0].shape] == [2, 4, 4, 6]


def test_dynamo_exporter(tmp_path: Path, tiny_sd15_artifact: InputArtifact) -> None:
    import onnx

    from sdkiln.stages.export_onnx import STAGE

    params = {"exporter": "dynamo", "opset": 18, "components": ["taesd_decoder"], "parity": PARITY}
    ctx = run_stage(STAGE, params, {"model": tiny_sd15_artifact}, tmp_path)
    model = onnx.load(str(ctx.out_dir / "taesd_decoder" / "model.onnx"))
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {18}
    assert ctx.details["exporter"] == "dynamo"
    assert set(ctx.metrics["parity"]["taesd_decoder"]["cases"]) >= GRID
    assert ctx.components["taesd_decoder"]["outputs"][0]["shape"] == [
        "batch",
        3,
        "latent_height * 8",
        "latent_width * 8",
    ]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"exporter": "dynamo", "opset": 17}, "opset"),
        ({"opset": 21}, "opset"),
        ({"vae_precision": "fp16"}, "vae_precision"),
        ({"components": ["unet", "vae"]}, "components"),
        ({"parity": {"image_sizes": [60]}}, "image_sizes"),
        ({"static": {"height": 500}}, "height"),
        ({"precision": "int8"}, "precision"),
    ],
)
def test_params_are_validated(params: dict, field: str) -> None:
    from sdkiln.stages.export_onnx import ExportOnnxParams

    with pytest.raises(ValidationError, match=field):
        ExportOnnxParams(**params)


def test_parity_failures_are_collected_then_raised(sd15_onnx: InputArtifact) -> None:
    from sdkiln.stages.common.onnx import components as oc
    from sdkiln.stages.common.onnx import io as ou

    report = ParityReport()
    gate = Gate(max_abs=1e-3, min_cosine=0.999)
    for key in ("vae_decoder", "taesd_decoder"):
        entry = sd15_onnx.components[key]
        comp = oc.Component(key, key, key, "", tuple(entry["inputs"]), tuple(entry["outputs"]))
        feeds = oc.make_feeds(comp, oc.bindings(1, 32, 32), seed=0)
        wrong = {"sample": np.zeros((1, 3, 32, 32), np.float32)}  # not what the decoder gives
        sess = ou.cpu_session(sd15_onnx.path / entry["path"])
        report.check(key, sess, [ParityCase("b1_32x32", feeds, wrong)], gate)
    with pytest.raises(ParityError) as err:
        report.raise_if_failed("test")
    assert {f.split(" ")[0] for f in err.value.failures} == {"vae_decoder", "taesd_decoder"}
    assert report.metrics()["vae_decoder"]["worst"]["max_abs"] > 1e-3


@pytest.mark.slow
def test_export_onnx_stage_output_runs_at_parity(tmp_path: Path, tiny_sd15_artifact) -> None:
    from sdkiln.stages.common.onnx.io import ParityParams
    from sdkiln.stages.export_onnx import STAGE, ExportOnnxParams

    params = ExportOnnxParams(parity=ParityParams(batch_sizes=[1], image_sizes=[64]))
    built = run_stage(STAGE, params, {"model": tiny_sd15_artifact}, tmp_path / "stage")
    reference = open_section(tiny_sd15_artifact.path, tiny_sd15_artifact.manifest, "torch")
    onnx = open_section(built.out, built.artifact().manifest, "onnx")
    for case in CASES:
        m = compare(run_case(reference, case, steps=2, size=64), run_case(onnx, case, steps=2, size=64))
        assert m["psnr_db"] >= floor_for("fp32"), (case.task, m)


def test_the_pipeline_reference_catches_a_wrong_wrapper(make_ctx, tiny_sd15_artifact, monkeypatch) -> None:
    """A mistake in the torch wrapper an export is traced from is in the graph AND in the wrapper's own
    reference, so the wrapper-based cases pass; diffusers' recorded calls do not."""
    from sdkiln.runtime.backends import torch_io
    from sdkiln.stages.export_onnx import STAGE

    real = torch_io.CALLS["unet"]

    def off_by_timestep(model, x, outputs):  # a wrapper that shifts the timestep by one
        return real(model, {**x, "timestep": x["timestep"] + 1}, outputs)

    monkeypatch.setitem(torch_io.CALLS, "unet", off_by_timestep)
    params = {"components": ["unet"], "parity": PARITY}
    ctx = make_ctx(STAGE, params, inputs={"model": tiny_sd15_artifact})
    with pytest.raises(ParityError) as err:
        STAGE.run(ctx)
    lines = err.value.failures
    assert lines and all("pipeline_" in line for line in lines), lines
