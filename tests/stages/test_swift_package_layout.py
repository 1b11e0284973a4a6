"""Core ML sections against what Apple's Swift ``StableDiffusion`` package loads and feeds (issue 18).

The expectations below are data written from Apple's source (github.com/apple/ml-stable-diffusion at
e12202c1f6405b83918b58a5d097cd61e3e1f702; the Swift file each comes from is named in a comment), checked
against the packages the stages make here: names of the compiled models in the resources folder,
feature names, the shapes Swift builds, and the batch sizes it feeds. ``macos`` tests compile the
packages with ``xcrun coremlcompiler`` into that folder.

Batch, as Swift drives it (``StableDiffusionPipeline.swift``, ``ControlNet.swift``, ``Unet.swift``): it reads
the UNet's declared ``sample`` shape (``multiArrayConstraint.shape``, the default of a flexible input),
runs classifier-free guidance as one batch-2 prediction when that shape's batch is >= 2, feeds batch 1
when ``guidanceScale < 1``, and always feeds a ControlNet (and then the ControlledUnet) batch 2; the SDXL
pipeline always feeds batch 2.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from testkit import Built, run_stage

pytest.importorskip("coremltools", reason="reading Core ML packages needs coremltools (the build extra)")

# -- the resources folder -------------------------------------------------------------------------------
# StableDiffusionPipeline+Resources.swift, ResourceURLs.init(resourcesAt:)
SD_MODELS = {
    "text_encoder": "TextEncoder.mlmodelc",
    "unet": "Unet.mlmodelc",
    "controlled_unet": "ControlledUnet.mlmodelc",
    "vae_decoder": "VAEDecoder.mlmodelc",
    "vae_encoder": "VAEEncoder.mlmodelc",
}
SD_CHUNKS = {
    "unet": ["UnetChunk1.mlmodelc", "UnetChunk2.mlmodelc"],
    "controlled_unet": ["ControlledUnetChunk1.mlmodelc", "ControlledUnetChunk2.mlmodelc"],
}
# ... controlNetDirURL = baseURL.appending(path: "controlnet"); each name + ".mlmodelc"
CONTROLNET_DIR = "controlnet"
# ... vocabURL / mergesURL, read by BPETokenizer(mergesAt:vocabularyAt:) (BPETokenizer+Reading.swift)
TOKENIZER_FILES = ["vocab.json", "merges.txt"]
# StableDiffusionXL+Resources.swift, ResourceURLs.init(resourcesAt:)
SDXL_MODELS = {
    "text_encoder": "TextEncoder.mlmodelc",
    "text_encoder_2": "TextEncoder2.mlmodelc",
    "unet": "Unet.mlmodelc",
    "vae_decoder": "VAEDecoder.mlmodelc",
    "vae_encoder": "VAEEncoder.mlmodelc",
}

# -- features -----------------------------------------------------------------------------------------
# Unet.swift, predictNoise(latents:timeStep:hiddenStates:additionalResiduals:): the dictionary it builds
UNET_INPUTS = ["sample", "timestep", "encoder_hidden_states"]
# Unet.swift, predictNoise(...pooledStates:geometryConditioning:) (SDXL)
UNET_XL_INPUTS = [*UNET_INPUTS, "text_embeds", "time_ids"]
# ControlNet.swift, execute(latents:timeStep:hiddenStates:images:) (no conditioning scale is passed)
CONTROLNET_INPUTS = ["sample", "timestep", "encoder_hidden_states", "controlnet_cond"]
# TextEncoder.swift: result.featureValue(for: "last_hidden_state"); the input is inputDescriptionsByName.first
TEXT_ENCODER_OUTPUT = "last_hidden_state"
# TextEncoderXL.swift: featureValue(for: "hidden_embeds") and featureValue(for: "pooled_outputs")
TEXT_ENCODER_XL_OUTPUTS = ["hidden_embeds", "pooled_outputs"]
# Decoder.swift / Encoder.swift / Unet.swift read the one input by position and the output as
# result.featureNames.first (a Set: a second output would be read at random).
SINGLE_INPUT = ("text_encoder", "text_encoder_2", "vae_decoder", "vae_encoder")
SINGLE_OUTPUT = ("unet", "controlled_unet", "vae_decoder", "vae_encoder")
# Encoder.swift: mean = channels 0..<4, log-variance 4..<8 of its output
ENCODER_CHANNELS = 8
# StableDiffusionPipeline.swift toHiddenStates: [B, 77, C] -> [B, C, 1, 77]; TextEncoder.swift pads to 77
TEXT_LEN = 77
# StableDiffusionXLPipeline.swift baseGeometry(): [2, 6] when the UNet's time_ids has rank > 1
TIME_IDS = [2, 6]
# Batch Swift feeds (see the module docstring): UNet 2 (guidance) and 1 (guidance < 1); ControlNet 2.
UNET_BATCHES = [1, 2]
CONTROLNET_BATCHES = [2]
DECLARED_BATCH = 2  # what latentSampleShape[0] must be for guidance and ControlNets to be one call


def _spec(path: Path) -> Any:
    import coremltools as ct

    return ct.utils.load_spec(str(path))


def _names(features: Any) -> list[str]:
    return [f.name for f in features]


def _shape(spec: Any, name: str) -> list[int]:
    return [
        int(d) for d in next(f for f in spec.description.input if f.name == name).type.multiArrayType.shape
    ]


def _optional(spec: Any) -> set[str]:
    return {f.name for f in spec.description.input if f.type.isOptional}


def check_section(built: Built, xl: bool = False) -> None:
    """Every package of a Core ML section against the expectations above."""
    from sdkiln.stages.common.coreml.flexible import accepted_batches
    from sdkiln.stages.common.coreml.swift import resources_plan

    comps = built.ctx.components
    plan = dict((target, package) for package, target in resources_plan(built.out, comps))
    models = SDXL_MODELS if xl else SD_MODELS
    for key, entry in comps.items():
        if key.startswith("controlnet."):
            assert f"{CONTROLNET_DIR}/{key.split('.', 1)[1]}.mlmodelc" in plan, key
        elif entry.get("chunks"):
            assert all(name in plan for name in SD_CHUNKS[key]), key
        else:
            assert models[key] in plan, key
    for name in TOKENIZER_FILES:
        assert (built.out / name).is_file(), name

    for key, entry in comps.items():
        chunks = entry.get("chunks") or [entry]
        specs = [_spec(built.out / c["path"]) for c in chunks]
        spec, last = specs[0], specs[-1]  # Swift reads shapes from the first chunk (Unet.swift: models.first)
        # A chunked UNet's model inputs: chunk 1's, and chunk 2's that chunk 1 does not compute
        # (Array<ManagedMLModel>.predictions feeds chunk 2 the original inputs and chunk 1's outputs).
        inputs = _names(spec.description.input)
        inputs += [
            n for n in _names(last.description.input) if n not in inputs + _names(spec.description.output)
        ]
        outputs = _names(last.description.output)
        optional = set().union(*(_optional(s) for s in specs))
        batches = {k: v for s in reversed(specs) for k, v in accepted_batches(s).items()}
        if key in SINGLE_INPUT:
            assert len(inputs) == 1, (key, inputs)
        if key in SINGLE_OUTPUT:
            assert len(outputs) == 1, (key, outputs)
        if key.startswith("text_encoder"):
            assert _shape(spec, inputs[0]) == [1, TEXT_LEN], key
            if xl:
                assert set(TEXT_ENCODER_XL_OUTPUTS) <= set(outputs), (key, outputs)
            else:
                assert TEXT_ENCODER_OUTPUT in outputs, (key, outputs)
        if key == "vae_encoder":
            out = next(f for f in spec.description.output)
            assert int(out.type.multiArrayType.shape[1]) == ENCODER_CHANNELS
        if key in ("unet", "controlled_unet"):
            want = UNET_XL_INPUTS if xl else UNET_INPUTS
            required = [n for n in inputs if n not in optional]
            if key == "controlled_unet":
                cn = next(k for k in comps if k.startswith("controlnet."))
                residuals = _names(_spec(built.out / comps[cn]["path"]).description.output)
                # ControlNet.swift hands its outputs to the UNet by name (StableDiffusionPipeline.swift).
                want = [*want, *residuals]
            assert sorted(required) == sorted(want), (key, required)
            assert _shape(spec, "encoder_hidden_states")[2:] == [1, TEXT_LEN], key
            if xl:
                assert _shape(spec, "time_ids") == TIME_IDS, key
            assert _shape(spec, "sample")[0] == DECLARED_BATCH, key
            for name in required:
                assert set(UNET_BATCHES) <= set(batches[name]), (key, name, batches[name])
        if key.startswith("controlnet."):
            required = [n for n in inputs if n not in optional]
            assert sorted(required) == sorted(CONTROLNET_INPUTS), (key, required)
            assert optional <= {"conditioning_scale"}, key
            for name in required:
                assert set(CONTROLNET_BATCHES) <= set(batches[name]), (key, name)
            sample = _shape(spec, "sample")
            assert _shape(spec, "controlnet_cond")[2:] == [sample[2] * 8, sample[3] * 8], key
            # vDSP_vadd sums several ControlNets' outputs as Float32 (ControlNet.swift).
            assert all(f.type.multiArrayType.dataType == 65568 for f in spec.description.output), key


def test_sd15_split_einsum_section_matches_swift(coreml_split: Built) -> None:
    check_section(coreml_split)


def test_sd15_original_attention_section_matches_swift(coreml_original: Built) -> None:
    check_section(coreml_original)


def test_chunked_unet_matches_swift(palettized_unet: Built) -> None:
    check_section(palettized_unet)


@pytest.fixture(scope="module")
def coreml_sdxl(tiny_sdxl_artifact: Any, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The tiny SDXL preset's text encoders and plain UNet for the Neural Engine, iOS 17 (range batch)."""
    from sdkiln.stages.export_coreml import STAGE, ExportCoremlParams

    params = ExportCoremlParams(
        attention="split_einsum", height=64, width=64, components=("text_encoder", "unet"), unet="plain"
    )
    return run_stage(STAGE, params, {"model": tiny_sdxl_artifact}, tmp_path_factory.mktemp("coreml-sdxl"))


def test_sdxl_section_matches_swift(coreml_sdxl: Built) -> None:
    assert set(coreml_sdxl.ctx.components) == {"text_encoder", "text_encoder_2", "unet"}
    assert coreml_sdxl.ctx.details["batch_flexibility"] == "range"
    check_section(coreml_sdxl, xl=True)


def test_the_check_catches_a_unet_declared_at_batch_one(coreml_split: Built, tmp_path: Path) -> None:
    """A ControlledUnet declared (and fixed) at batch 1 is what Swift would run as two serial calls, then
    hand batch-2 ControlNet residuals: ``check_section`` must refuse it."""
    import coremltools as ct

    out = tmp_path / "section"
    shutil.copytree(coreml_split.out, out)
    rel = coreml_split.ctx.components["controlled_unet"]["path"]
    model = ct.models.MLModel(str(out / rel), skip_model_load=True)
    spec = model.get_spec()
    for f in spec.description.input:
        arr = f.type.multiArrayType
        if f.name != "conditioning_scale":
            arr.shape[0] = 1
            arr.ClearField("enumeratedShapes")
            arr.ClearField("shapeRange")
    ct.models.MLModel(spec, weights_dir=model.weights_dir, skip_model_load=True).save(
        str(tmp_path / "b1.mlpackage")
    )
    shutil.rmtree(out / rel)
    shutil.move(str(tmp_path / "b1.mlpackage"), str(out / rel))
    broken = SimpleNamespace(out=out, ctx=SimpleNamespace(components=coreml_split.ctx.components))
    with pytest.raises(AssertionError, match="controlled_unet"):
        check_section(broken)  # type: ignore[arg-type]


@pytest.mark.parametrize("which", ["coreml_split", "palettized_unet"])
def test_compile_plan_and_card_commands_agree(which: str, request: Any) -> None:
    """The model card's shell loops (``for p in <glob>; do xcrun coremlcompiler compile "$p" <dir>/; done``,
    which names each compiled model after its package) put every package where ``resources_plan`` puts
    it, which is where Apple's Swift package looks."""
    import re

    from sdkiln.runtime.contract.manifest import Section
    from sdkiln.stages.common.coreml.swift import resources_plan
    from sdkiln.stages.tools.publish.elsewhere import compile_commands

    built = request.getfixturevalue(which)
    art = built.artifact("coreml")
    sec = Section.from_artifact("coreml", art.manifest)
    shell = compile_commands("user/repo", "main", "coreml/split_einsum", sec)
    loops = re.findall(r'for p in (\S+); do xcrun coremlcompiler compile "\$p" (\S+); done', shell)
    assert loops, shell
    compiled = sorted(
        (Path(dest.rstrip("/")) / pkg.with_suffix(".mlmodelc").name).as_posix()
        for pattern, dest in loops
        for pkg in built.out.glob(pattern)
    )
    want = sorted("Resources/" + target for _, target in resources_plan(built.out, built.ctx.components))
    assert compiled == want
    assert "cp vocab.json merges.txt Resources/" in shell


@pytest.mark.macos
@pytest.mark.skipif(
    sys.platform != "darwin" or shutil.which("xcrun") is None,
    reason="compiling Core ML models needs macOS with Xcode (xcrun coremlcompiler)",
)
@pytest.mark.parametrize("which", ["coreml_split", "coreml_original", "palettized_unet"])
def test_packages_compile_into_a_swift_resources_folder(which: str, request: Any, tmp_path: Path) -> None:
    from sdkiln.stages.common.coreml.swift import compile_resources, resources_plan

    built = request.getfixturevalue(which)
    made = compile_resources(built.out, built.ctx.components, tmp_path / "Resources")
    assert sorted(p.relative_to(tmp_path / "Resources").as_posix() for p in made) == sorted(
        t for _, t in resources_plan(built.out, built.ctx.components)
    )
    assert all((p / "coremldata.bin").is_file() for p in made)
    assert (tmp_path / "Resources" / "vocab.json").is_file()
