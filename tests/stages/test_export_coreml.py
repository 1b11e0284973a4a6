"""export_coreml on the tiny SD 1.5 preset: Apple's layout and names, specs that match the manifest,
Linux-side parity, and the params' checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError
from testkit import run_stage

from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.families import controlnet_residual_count, get_family
from sdkiln.runtime.contract.floors import COREML_TINY_MIN_PSNR_DB
from sdkiln.stages.common.coreml import io as cio
from sdkiln.stages.common.coreml import readback as crb
from sdkiln.stages.engine.core import InputArtifact
from sdkiln.stages.export_coreml import STAGE, ExportCoremlParams, default_batch

from .conftest import SIZE

SPLIT_PACKAGES = {
    "text_encoder": "packages/TextEncoder.mlpackage",
    "controlled_unet": "packages/ControlledUnet.mlpackage",
    "controlnet.scribble": "packages/controlnet/scribble.mlpackage",
    "vae_decoder": "packages/VAEDecoder.mlpackage",
    "vae_encoder": "packages/VAEEncoder.mlpackage",
}


def test_layout_has_apple_names_and_tokenizer_files(coreml_split):
    out, comps = coreml_split.out, coreml_split.ctx.components
    assert {k: c["path"] for k, c in comps.items()} == SPLIT_PACKAGES
    for rel in SPLIT_PACKAGES.values():
        assert (out / rel / "Manifest.json").is_file()
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    merges = (out / "merges.txt").read_text(encoding="utf-8").splitlines()
    # The preset ships the real CLIP vocabulary; Apple's BPETokenizer reads exactly these two files.
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407 and vocab["a</w>"] == 320
    assert merges[0].startswith("#version") and len(merges) == 1 + 48894
    details, facts = coreml_split.ctx.details, coreml_split.ctx.model
    assert (
        details["attention"] == "split_einsum" and details["batch"] == 2 and facts.image_size == [SIZE, SIZE]
    )
    assert facts.controlnets == ["scribble"] and facts.family == "sd15"


@pytest.mark.parametrize("which", ["coreml_split", "coreml_original"])
def test_packages_reload_and_specs_match_the_manifest(which, request):
    import coremltools as ct

    built = request.getfixturevalue(which)
    for key, comp in built.ctx.components.items():
        path = built.out / comp["path"]
        model = ct.models.MLModel(str(path), skip_model_load=True)
        spec = model.get_spec()
        assert spec.WhichOneof("Type") == "mlProgram", key
        got_in = [crb._feature(f).to_manifest() for f in spec.description.input]
        got_out = [crb._feature(f).to_manifest() for f in spec.description.output]
        assert got_in == comp["inputs"] and got_out == comp["outputs"], key
        assert all(t["dtype"] == "float32" for t in got_in + got_out), key
        meta = dict(spec.description.metadata.userDefined)
        assert meta["sdkiln.component"] == key and meta["sdkiln.attention"] == built.ctx.details["attention"]


def test_io_names_are_apples(coreml_split):
    comps = coreml_split.ctx.components
    names = {
        k: ([t["name"] for t in c["inputs"]], [t["name"] for t in c["outputs"]]) for k, c in comps.items()
    }
    residuals = [f"additional_residual_{i}" for i in range(controlnet_residual_count((32, 64), 2) + 1)]
    assert names["text_encoder"] == (["input_ids"], ["last_hidden_state", "pooled_outputs"])
    assert names["controlled_unet"] == (
        ["sample", "timestep", "encoder_hidden_states", *residuals],
        ["noise_pred"],
    )
    assert names["controlnet.scribble"] == (
        ["sample", "timestep", "encoder_hidden_states", "controlnet_cond", "conditioning_scale"],
        residuals,
    )
    assert names["vae_decoder"] == (["z"], ["image"])
    assert names["vae_encoder"] == (["x"], ["latent"])
    shapes = {t["name"]: t["shape"] for c in comps.values() for t in c["inputs"] + c["outputs"]}
    assert shapes["encoder_hidden_states"] == [2, 32, 1, 77]  # (B, D, 1, S): Apple's layout
    assert shapes["input_ids"] == [1, 77] and shapes["sample"] == [2, 4, 8, 8]
    assert shapes["latent"] == [1, 8, 8, 8]  # the posterior's mean and log-variance, as Swift expects
    assert shapes["image"] == [1, 3, SIZE, SIZE] and shapes["controlnet_cond"] == [2, 3, SIZE, SIZE]
    # Apple's Swift ControlNet never passes the scale: it is optional with default 1.
    scale = next(t for t in comps["controlnet.scribble"]["inputs"] if t["name"] == "conditioning_scale")
    assert scale["optional"] is True and scale["default"] == 1.0


def test_controlnet_outputs_feed_the_controlled_unet(coreml_split):
    comps = coreml_split.ctx.components
    # A flexible-batch package declares its outputs without a shape (they follow the batch fed).
    outs = {t["name"]: t["shape"] for t in comps["controlnet.scribble"]["outputs"]}
    unet_in = {t["name"]: t["shape"] for t in comps["controlled_unet"]["inputs"]}
    assert outs and set(outs) <= set(unet_in) and all(s == [] for s in outs.values())
    assert comps["controlnet.scribble"]["batch_sizes"] == comps["controlled_unet"]["batch_sizes"] == [2, 1]


@pytest.mark.parametrize("which", ["coreml_split", "coreml_original"])
def test_parity_measured_above_floor_with_weights_read_back(which, request):
    built = request.getfixturevalue(which)
    m = built.ctx.metrics
    for key in built.ctx.components:
        assert m[f"{key}.psnr_floor_db"] == COREML_TINY_MIN_PSNR_DB["fp16"]
        assert m[f"{key}.psnr_db"] >= m[f"{key}.psnr_floor_db"], key
        # Finite: the module really ran with the package's (fp16) weights, not the reference ones.
        assert np.isfinite(m[f"{key}.psnr_db"]), key
        # Every weight Core ML stores maps back to its parameter; only GroupNorm/LayerNorm vectors (folded
        # into other constants) and CLIP's position table (a folded lookup) stay unmatched.
        assert m[f"{key}.param_fraction_from_package"] > 0.99, key
        assert m[f"{key}.bits_per_weight"] == 16.0 and m[f"{key}.lut_ops"] == 0, key
        assert m[f"{key}.bytes"] == cio.package_bytes(built.out / built.ctx.components[key]["path"])


def test_attention_implementation_shows_in_the_ops(coreml_split, coreml_original):
    split, orig = coreml_split.ctx.components, coreml_original.ctx.components
    # Tiny UNet: 6 transformers x (self + cross) attention x 2 or 4 heads; 2 products per head, batched
    # matmuls in a flexible-batch package (einsums with a fixed batch: test_fixed_batch_split_einsum...).
    ops = split["controlled_unet"]["ops"]
    assert ops["matmul"] == 96 and ops["softmax"] == 48 and "einsum" not in ops
    assert split["controlnet.scribble"]["ops"]["matmul"] == 48
    assert (
        "einsum" not in orig["controlled_unet"]["ops"] and "einsum" not in orig["controlnet.scribble"]["ops"]
    )
    assert orig["controlled_unet"]["attention"] == "original"
    # Same interface whichever the attention.
    for key in ("controlled_unet", "controlnet.scribble"):
        assert split[key]["inputs"] == orig[key]["inputs"] and split[key]["outputs"] == orig[key]["outputs"]


def test_attention_free_components_ignore_mode(tiny_sd15_dir):
    """Only UNets and ControlNets change with the attention mode, so the original-mode fixture converts
    just those: the text encoder's and VAE's modules are the same either way."""
    for key in ("text_encoder", "vae_decoder", "vae_encoder"):
        model = cio.load_model(tiny_sd15_dir, key)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        a = cio.build_module(key, model, "original", added_cond=False)
        b = cio.build_module(key, model, "split_einsum", added_cond=False)
        assert type(a) is type(b) and list(a.state_dict()) == list(b.state_dict())
        assert all((v == before[k]).all() for k, v in model.state_dict().items())


def test_parity_detects_a_wrong_weight(coreml_split, tiny_sd15_dir):
    """The read-back check is not vacuous: one perturbed weight drops the PSNR below the floor."""
    plan = cio.plan_component("vae_decoder", {"latent_channels": 4}, 1, (8, 8), 8, added_cond=False)
    example = cio.example_inputs(plan.inputs, seed=0, vocab_size=49408)
    reference = cio.run_module(
        cio.build_module("vae_decoder", cio.load_model(tiny_sd15_dir, "vae_decoder"), "original", False),
        example,
    )
    records = crb.read_weights(coreml_split.out / SPLIT_PACKAGES["vae_decoder"])

    def measured(recs):
        module = cio.build_module(
            "vae_decoder", cio.load_model(tiny_sd15_dir, "vae_decoder"), "original", False
        )
        report = crb.load_weights_into(module, recs)
        assert len(report.matched) > 20
        return cio.psnr(reference[0], cio.run_module(module, example)[0])

    good = measured(records)
    conv = next(n for n in records if "conv_in_weight" in n)
    bad = dict(records)
    bad[conv] = crb.WeightRecord(conv, records[conv].dense * 1.5, records[conv].storage_bits)
    assert good >= COREML_TINY_MIN_PSNR_DB["fp16"] > measured(bad)


def test_readback_accounts_for_every_weight(coreml_split, tiny_sd15_dir):
    """Every package weight maps to a parameter (or a derived constant) and every parameter is in the
    package (or is an identity affine the converter removed); a weight the package lacks, or holds
    without a parameter, is named."""

    def check(recs):
        module = cio.build_module(
            "vae_decoder", cio.load_model(tiny_sd15_dir, "vae_decoder"), "original", False
        )
        return crb.accounting_problems(module, recs, crb.load_weights_into(module, recs))

    records = crb.read_weights(coreml_split.out / SPLIT_PACKAGES["vae_decoder"])
    assert check(records) == []
    conv = next(n for n in records if "conv_in_weight" in n)
    missing = check({k: v for k, v in records.items() if k != conv})
    assert len(missing) == 1 and "decoder.conv_in.weight" in missing[0]
    stray = crb.WeightRecord("stray_to_fp16", np.full((4, 4), 0.5, np.float16), 256)
    extra = check({**records, "stray_to_fp16": stray})
    assert extra == ["package weight stray_to_fp16 (4, 4) maps to no parameter of the module"]


def test_one_layer_2pct_off_fails_the_fp16_gate(coreml_split, tiny_sd15_dir):
    """A layer 2 % off in an fp16 package: the read-back finds it at the weight (fp16 rounding is
    ~3e-4 of a tensor's RMS; the limit is 2e-3)."""
    records = crb.read_weights(coreml_split.out / SPLIT_PACKAGES["vae_decoder"])
    conv = next(n for n in records if "conv_in_weight" in n)
    bad = {
        **records,
        conv: crb.WeightRecord(conv, records[conv].dense * np.float16(1.02), records[conv].storage_bits),
    }
    module = cio.build_module("vae_decoder", cio.load_model(tiny_sd15_dir, "vae_decoder"), "original", False)
    problems = crb.accounting_problems(module, bad, crb.load_weights_into(module, bad))
    assert len(problems) == 1 and "decoder.conv_in.weight (float)" in problems[0], problems


def test_derived_constants_are_recognised():
    half = 16
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / half).astype(np.float16)[None]
    assert crb._derived_constant(freqs) == "timestep frequencies"
    mask = np.triu(np.full((5, 5), -3e4, np.float16), 1)
    assert crb._derived_constant(mask) == "causal attention mask"
    assert crb._derived_constant(np.random.default_rng(0).standard_normal((1, 16))) is None


def test_default_batch_follows_guidance():
    assert default_batch(get_family("sd15"), lcm=False) == 2
    assert default_batch(get_family("sd15"), lcm=True) == 1
    assert default_batch(get_family("sd-turbo"), lcm=False) == 1


def test_params_are_validated():
    with pytest.raises(ValidationError, match="attention"):
        ExportCoremlParams(attention="flash")
    with pytest.raises(ValidationError, match="height"):
        ExportCoremlParams(height=100)
    with pytest.raises(ValidationError, match="minimum_deployment_target"):
        ExportCoremlParams(minimum_deployment_target="iOS15")
    with pytest.raises(ValidationError, match="components"):
        ExportCoremlParams(components=())
    with pytest.raises(ValidationError, match="extra"):
        ExportCoremlParams(unknown=1)


def test_user_errors_before_any_conversion(tiny_sd15_artifact: InputArtifact, tmp_path):
    with pytest.raises(UserError, match="depth"):
        run_stage(
            STAGE, ExportCoremlParams(controlnets=("depth",)), {"model": tiny_sd15_artifact}, tmp_path / "a"
        )
    # The tiny UNet halves the latent once: 8x8 latents work, a 72-pixel (9x9 latent) image does not.
    with pytest.raises(UserError, match="multiples of 16"):
        run_stage(
            STAGE, ExportCoremlParams(height=72, width=64), {"model": tiny_sd15_artifact}, tmp_path / "b"
        )


def test_fixed_batch_split_einsum_uses_einsums_and_one_batch(tiny_sd15_artifact, tmp_path):
    """flexible_batch: false keeps the einsum form and one fixed batch (here 1: the default without CFG
    would be 2 for this preset, so it is asked for)."""
    import coremltools as ct

    from sdkiln.stages.common.coreml.flexible import accepted_batches

    params = ExportCoremlParams(
        attention="split_einsum", height=SIZE, width=SIZE, controlnets=("scribble",),
        components=("controlnet",), flexible_batch=False, batch=1,
    )  # fmt: skip
    built = run_stage(STAGE, params, {"model": tiny_sd15_artifact}, tmp_path)
    comp = built.ctx.components["controlnet.scribble"]
    assert comp["ops"]["einsum"] == 48 and comp["batch_sizes"] == [1]
    assert all(t["shape"] for t in comp["outputs"])  # fixed shapes throughout
    accepted = accepted_batches(ct.utils.load_spec(str(built.out / comp["path"])))
    assert accepted["sample"] == [1] and built.ctx.details["batch_flexibility"] == "fixed"


def test_packages_are_saved_reproducibly(coreml_split, tmp_path):
    """Two saves of one model give the same bytes (item ids from paths, deterministic spec), so the
    cache and a remote see one artifact wherever it was built."""
    import coremltools as ct

    def tree(root):
        return {
            p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
        }

    src = coreml_split.out / SPLIT_PACKAGES["vae_decoder"]
    saved = []
    for name in ("a", "b"):
        model = ct.models.MLModel(str(src), skip_model_load=True)
        cio.save_package(model, tmp_path / f"{name}.mlpackage")
        saved.append(tree(tmp_path / f"{name}.mlpackage"))
    assert saved[0] == saved[1] == tree(src)
    manifest = json.loads(saved[0]["Manifest.json"])
    root = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]
    assert root["path"] == "com.apple.CoreML/model.mlmodel"


@pytest.mark.parametrize(
    ("which", "mode", "flexibility"),
    [("coreml_split", "enumerated", "enumeratedShapes"), ("coreml_original", "range", "shapeRange")],
)
def test_unet_and_controlnet_take_batch_one_and_two_declared_as_two(which, mode, flexibility, request):
    """iOS 18 targets get enumerated shapes, older ones a 1...2 range; either way the declared (default)
    shape is batch 2, the one Apple's Swift pipeline reads, and both batches are measured."""
    import coremltools as ct

    from sdkiln.stages.common.coreml.flexible import accepted_batches

    built = request.getfixturevalue(which)
    assert built.ctx.details["batch_flexibility"] == mode and built.ctx.details["batch_sizes"] == [2, 1]
    m = built.ctx.metrics
    for key in ("controlled_unet", "controlnet.scribble"):
        spec = ct.utils.load_spec(str(built.out / built.ctx.components[key]["path"]))
        for f in spec.description.input:
            arr = f.type.multiArrayType
            if f.name == "conditioning_scale":  # (1,), optional: no batch axis
                assert arr.WhichOneof("ShapeFlexibility") is None and list(arr.shape) == [1]
                continue
            assert arr.WhichOneof("ShapeFlexibility") == flexibility, (key, f.name)
            assert int(arr.shape[0]) == 2 and accepted_batches(spec)[f.name] == [1, 2], (key, f.name)
        floor = m[f"{key}.psnr_floor_db"]
        assert m[f"{key}.psnr_db_batch2"] >= floor and m[f"{key}.psnr_db_batch1"] >= floor, key
        assert m[f"{key}.psnr_db"] == min(m[f"{key}.psnr_db_batch2"], m[f"{key}.psnr_db_batch1"])
    # The batch-free components keep one fixed batch-1 shape.
    for key in set(built.ctx.components) - {"controlled_unet", "controlnet.scribble"}:
        spec = ct.utils.load_spec(str(built.out / built.ctx.components[key]["path"]))
        assert all(
            f.type.multiArrayType.WhichOneof("ShapeFlexibility") is None for f in spec.description.input
        )


def test_a_flexible_batch_package_cannot_be_declared_at_batch_one():
    with pytest.raises(ValidationError, match="flexible_batch: false"):
        ExportCoremlParams(batch=1)
    assert ExportCoremlParams(batch=1, flexible_batch=False).batch == 1


def test_a_batch_baked_into_the_program_is_caught():
    """``program_problems`` is what fails the stage when a conversion loses the symbolic batch: a module
    that reshapes with its traced batch as a constant must be reported, the batch-following one not."""
    import coremltools as ct
    import torch

    from sdkiln.stages.common.coreml.flexible import BatchPlan, program_problems

    class Baked(torch.nn.Module):
        def forward(self, x):
            return x.reshape(2, -1).sum(dim=1, keepdim=True).reshape(2, 1, 1, 1) * x

    class Follows(torch.nn.Module):
        def forward(self, x):
            b = x.shape[0]
            return x.reshape(b, -1).sum(dim=1, keepdim=True).reshape(b, 1, 1, 1) * x

    plan = BatchPlan((2, 1), "range")
    problems = {}
    for module in (Baked(), Follows()):
        traced = torch.jit.trace(module, torch.zeros(2, 3, 4, 4))
        shape = ct.Shape([ct.RangeDim(1, 2, default=2), 3, 4, 4])
        mlmodel = ct.convert(
            traced,
            convert_to="mlprogram",
            inputs=[ct.TensorType(name="x", shape=shape, dtype=np.float32)],
            minimum_deployment_target=ct.target.iOS17,
            skip_model_load=True,
        )
        problems[type(module).__name__] = program_problems(mlmodel, plan)
    assert problems["Follows"] == []
    assert len(problems["Baked"]) == 1 and "static" in problems["Baked"][0]


def _scaled(gain: float):
    """A module whose largest activation is ``gain`` times its input's (a VAE half stand-in)."""
    import torch

    class Mul(torch.nn.Module):
        def forward(self, x):
            return x * gain

    return torch.nn.Sequential(torch.nn.Identity(), Mul())


@pytest.mark.parametrize(
    ("gain", "asked", "want"),
    [(1.0, "auto", "fp16"), (1e4, "auto", "fp32"), (1e4, "fp16", "fp16"), (1e4, "fp32", "fp32")],
)
def test_vae_compute_precision_follows_the_measured_peak(gain, asked, want):
    """auto: fp32 once the fp32 run's peak leaves less than 4x headroom below fp16's maximum; the decoder
    is probed with latents divided by the VAE's scaling factor, as the pipeline feeds it."""
    import torch

    from sdkiln.stages.export_coreml import FP16_MAX, vae_precision

    fam = get_family("sd15")
    p = ExportCoremlParams(vae_compute_precision=asked)
    x = torch.ones(1, 4, 8, 8)
    got, peak = vae_precision("vae_decoder", _scaled(gain), [x], p, {"scaling_factor": 0.5}, fam)
    assert peak == pytest.approx(gain / 0.5)
    assert got == want
    assert (peak * 4 > FP16_MAX) == (gain > 1)


def test_vae_fp16_that_overflows_is_a_user_error():
    import torch

    from sdkiln.stages.export_coreml import vae_precision

    p = ExportCoremlParams(vae_compute_precision="fp16")
    with pytest.raises(UserError, match="vae_compute_precision: fp16 overflows this VAE.*fp16-fix"):
        vae_precision("vae_encoder", _scaled(1e5), [torch.ones(1, 3, 8, 8)], p, {}, get_family("sdxl"))
