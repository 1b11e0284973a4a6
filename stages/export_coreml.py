"""export_coreml: a PIPELINE -> Core ML packages in the layout of Apple's Swift StableDiffusion package.

Recipe step::

    - id: coreml
      stage: export_coreml
      inputs: {model: fused}
      params:
        attention: split_einsum       # or original (best on the Mac GPU)
        minimum_deployment_target: iOS17
        compute_precision: fp16
        vae_compute_precision: fp32   # SD 1.x/2.x VAEs; auto: fp32 only where fp16 would overflow
        height: 512                   # image pixels; the latent is height / 8
        width: 512
        # flexible_batch: true         # UNet/ControlNet take batch 1 and 2, declared as 2 (Swift reads 2)
        # batch: 2                    # with flexible_batch: false, the one batch; default: 1 without
        #                             # classifier-free guidance (LCM, SD-Turbo), else 2

Per component (text encoder(s), UNet and/or the ControlledUnet that takes the ControlNet residuals,
each ControlNet, VAE decoder, VAE encoder) it traces a wrapper with Apple's I/O names
(``common.coreml``), converts it to an ML Program with fixed shapes, saves
``packages/<Name>.mlpackage`` plus the tokenizer's ``vocab.json`` and ``merges.txt``, and then checks the
package the only ways Linux allows (Core ML cannot run a model here):

- spec: it reloads with ``skip_model_load=True``; inputs, outputs, shapes and dtypes are the planned
  ones; the attention ops are those of the chosen implementation;
- weights: every weight is read back out of the package into a fresh torch module of the same
  architecture, which is run against the fp32 PyTorch reference (diffusers' own attention) at every
  batch size the package takes; the output PSNR must clear the family's Core ML floor (35 dB, Apple's
  gate). This measures the weight storage (fp16) and, for ``split_einsum``, the rewrite; fp16 *compute*
  is only measured on macOS (tests marked ``macos``);
- batch: a flexible-batch UNet/ControlNet (``common.coreml.flexible``: batch 1 and 2, declared as 2, the
  shape Apple's Swift pipeline reads) must keep a symbolic batch through conversion and declare both
  sizes in its spec.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from sdkiln.runtime.contract.errors import ParityError, UserError
from sdkiln.runtime.contract.layout import Kind
from sdkiln.stages.engine.core import Stage, StageContext, StageParams

logger = logging.getLogger(__name__)

ComponentName = Literal["text_encoder", "unet", "controlnet", "vae_decoder", "vae_encoder"]
DeploymentTarget = Literal["iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15"]
# Targets that support per-grouped-channel palettization (coremltools' iOS 18 opset).


class ExportCoremlParams(StageParams):
    """Parameters of ``export_coreml``."""

    attention: Literal["original", "split_einsum"] = Field(
        "split_einsum", description="original: diffusers' attention (Mac GPU); split_einsum: Neural Engine"
    )
    minimum_deployment_target: DeploymentTarget = "iOS17"
    compute_precision: Literal["fp16", "fp32"] = "fp16"
    vae_compute_precision: Literal["auto", "fp16", "fp32"] = Field(
        "auto",
        description="VAE halves: fp32 where fp16 would overflow (SD 1.x/2.x and the original SDXL VAE); "
        "auto: fp32 when the fp32 reference's largest activation on the parity input leaves less than "
        "4x headroom below fp16's maximum, else compute_precision",
    )
    height: int | None = Field(
        None, ge=64, le=2048, multiple_of=8, description="image pixels; default: family's"
    )
    width: int | None = Field(
        None, ge=64, le=2048, multiple_of=8, description="image pixels; default: family's"
    )
    batch: Literal[1, 2] | None = Field(
        None,
        description="UNet/ControlNet declared batch; flexible_batch: 2; else default 1 without "
        "classifier-free guidance, 2 with it",
    )
    flexible_batch: bool = Field(
        True,
        description="UNet/ControlNet take batch 1 and 2, declared as batch 2 (what Apple's Swift pipeline "
        "reads); enumerated shapes on iOS18/macOS15 targets, a range below",
    )
    components: tuple[ComponentName, ...] = Field(
        ("text_encoder", "unet", "controlnet", "vae_decoder", "vae_encoder"), min_length=1
    )
    controlnets: tuple[str, ...] | None = Field(None, description="ControlNet types to export; default: all")
    unet: Literal["auto", "plain", "controlled", "both"] = Field(
        "auto",
        description="plain: Unet; controlled: ControlledUnet taking the ControlNet residuals; "
        "auto: controlled when the pipeline has ControlNets",
    )
    min_psnr_db: float | None = Field(None, ge=0, le=200, description="parity floor; default: the family's")
    seed: int = Field(0, ge=0, description="seed of the parity inputs")

    @model_validator(mode="after")
    def _batch(self) -> ExportCoremlParams:
        if self.flexible_batch and self.batch == 1:
            raise ValueError(
                "batch: a flexible-batch package is declared as batch 2 (the shape Apple's Swift pipeline "
                "reads); set flexible_batch: false for a fixed batch-1 package"
            )
        return self


def _targets() -> dict[str, Any]:
    import coremltools as ct

    return {name: getattr(ct.target, name) for name in DeploymentTarget.__args__}


def component_keys(params: ExportCoremlParams, family: Any, controlnets: list[str]) -> list[str]:
    """The component keys to export, in order (text encoders, UNets, ControlNets, VAE)."""
    keys: list[str] = []
    if "text_encoder" in params.components:
        keys += list(family.text_encoders)
    if "unet" in params.components:
        mode = params.unet
        if mode == "auto":
            mode = "controlled" if controlnets and "controlnet" in params.components else "plain"
        keys += {"plain": ["unet"], "controlled": ["controlled_unet"], "both": ["unet", "controlled_unet"]}[
            mode
        ]
    if "controlnet" in params.components:
        keys += [f"controlnet.{c}" for c in controlnets]
    keys += [k for k in ("vae_decoder", "vae_encoder") if k in params.components]
    return keys


def default_batch(family: Any, lcm: bool) -> int:
    """1 when the family's default sampling needs no classifier-free guidance (LCM, SD-Turbo), else 2."""
    from sdkiln.runtime.contract.families import generation_defaults

    return 1 if generation_defaults(family, lcm).guidance <= 1.0 else 2


def write_tokenizer_files(tokenizer_dir: Path, out_dir: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` (what Apple's ``BPETokenizer`` reads) from a tokenizer
    folder: copied when present, else taken from its ``tokenizer.json``."""
    vocab, merges = tokenizer_dir / "vocab.json", tokenizer_dir / "merges.txt"
    if vocab.is_file() and merges.is_file():
        shutil.copyfile(vocab, out_dir / "vocab.json")
        shutil.copyfile(merges, out_dir / "merges.txt")
        return
    tj = tokenizer_dir / "tokenizer.json"
    if not tj.is_file():
        raise UserError(f"{tokenizer_dir}: no vocab.json/merges.txt and no tokenizer.json to take them from")
    model = json.loads(tj.read_text(encoding="utf-8"))["model"]
    if model.get("type") != "BPE":
        raise UserError(f"{tj}: a {model.get('type')} tokenizer, Apple's pipeline needs a BPE one")
    (out_dir / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    pairs = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(pairs) + "\n", encoding="utf-8")


def check_spec(
    spec: Any, plan: Any, output_shapes: dict[str, tuple[int, ...]], flexible: bool = False
) -> list[str]:
    """Differences between a package's interface and the planned one (empty: they agree). A package
    with a flexible batch declares its inputs at the default batch and its outputs without a shape."""
    problems = []
    got_in = {t.name: t for t in spec.inputs}
    for t in plan.inputs:
        g = got_in.pop(t.name, None)
        if g is None:
            problems.append(f"input {t.name} missing")
        elif (g.shape, g.dtype, g.default) != (t.shape, t.dtype, t.default):
            problems.append(
                f"input {t.name}: {g.shape} {g.dtype} default={g.default}, planned {t.shape} {t.dtype}"
            )
    problems += [f"unexpected input {n}" for n in got_in]
    got_out = {t.name: t for t in spec.outputs}
    if list(got_out) != list(plan.output_names):
        problems.append(f"outputs {list(got_out)}, planned {list(plan.output_names)}")
    for name, shape in output_shapes.items():
        g = got_out.get(name)
        want = () if flexible else tuple(shape)
        if g is not None and (g.shape, g.dtype) != (want, "float32"):
            problems.append(f"output {name}: {g.shape} {g.dtype}, expected {tuple(shape)} float32")
    return problems


def check_batches(package: Path, plan: Any, batch: Any) -> list[str]:
    """Every batch-carrying input of a package must accept exactly the batch sizes planned."""
    import coremltools as ct

    from sdkiln.stages.common.coreml import flexible

    accepted = flexible.accepted_batches(ct.utils.load_spec(str(package)))
    want = sorted(batch.sizes)
    return [
        f"input {name} takes batch {accepted.get(name)}, planned {want}"
        for name in sorted(flexible.batched_inputs(plan.inputs, batch.default))
        if accepted.get(name) != want
    ]


def check_attention_ops(spec: Any, attention: str, heads: int, flexible: bool = False) -> list[str]:
    """The attention implementation must show in the ops: ``split_einsum`` computes each head with two
    einsums (so ``2 * heads`` of them; with a flexible batch two batched matmuls instead, see
    ``SplitHeadAttention``); ``original`` has no einsum."""
    op = "matmul" if flexible and attention == "split_einsum" else "einsum"
    count = spec.ops.get(op, 0)
    expected = 2 * heads if attention == "split_einsum" else 0
    problems = []
    if count != expected:
        problems.append(f"{count} {op} ops, expected {expected} for {attention} attention over {heads} heads")
    if op == "matmul" and spec.ops.get("einsum", 0):
        problems.append(f"{spec.ops['einsum']} einsum ops in a flexible-batch package")
    return problems


def count_heads(module: Any) -> int:
    """Total attention heads in the split-einsum attentions of a module."""
    from sdkiln.stages.common.coreml.attention import SplitHeadAttention

    return sum(m.heads for m in module.modules() if isinstance(m, SplitHeadAttention))


def convert_component(
    module: Any,
    plan: Any,
    example: list[Any],
    out_path: Path,
    params: Any,
    metadata: dict[str, str],
    batch: Any = None,
    precision: str | None = None,
) -> list[str]:
    """Trace ``module`` on ``example`` and convert it to an ML Program saved at ``out_path``, with the
    batch of ``batch`` (a ``flexible.BatchPlan``; default: the plan's fixed shapes), computing in
    ``precision`` (default: ``params.compute_precision``). Returns problems found in the converted
    program (a flexible batch that did not survive conversion)."""
    precision = precision or params.compute_precision
    import coremltools as ct
    import numpy as np
    import torch

    from sdkiln.stages.common.coreml import flexible
    from sdkiln.stages.common.coreml import io as cio

    batch = batch or flexible.BatchPlan((plan.inputs[0].shape[0],), "fixed")
    if batch.flexible:
        # Both exact rewrites a symbolic batch needs (see common/coreml/flexible.py).
        flexible.tie_batches(module)
        flexible.batch_group_norms(module)
    with torch.no_grad(), warnings.catch_warnings():
        # diffusers' shape asserts become trace-time constants: expected with fixed Core ML shapes.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(module, tuple(example), check_trace=False)
    inputs = flexible.input_types(plan.inputs, batch, flexible.batched_inputs(plan.inputs, batch.default))
    mlmodel = ct.convert(
        traced,
        convert_to="mlprogram",
        inputs=inputs,
        outputs=[ct.TensorType(name=n, dtype=np.float32) for n in plan.output_names],
        minimum_deployment_target=_targets()[params.minimum_deployment_target],
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        skip_model_load=True,  # Linux cannot load a model; packages are checked by reading them back
    )
    del traced
    mlmodel.short_description = plan.description
    mlmodel.author = "sdkiln"
    mlmodel.user_defined_metadata.update(metadata)
    problems = flexible.program_problems(mlmodel, batch)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    cio.save_package(mlmodel, out_path)
    return problems


# fp16's largest finite value, and the headroom ``vae_compute_precision: auto`` wants below it.
FP16_MAX = 65504.0
FP16_HEADROOM = 4.0


def peak_activation(module: Any, example: list[Any]) -> float:
    """The largest magnitude any submodule of ``module`` outputs on ``example`` (fp32 reference run):
    what fp16 compute must represent. The SDXL VAE's decoder exceeds fp16's range here; the fp16-fix
    VAE was fine-tuned to stay inside it."""
    import torch

    peak = 0.0

    def hook(_m: Any, _inp: Any, out: Any) -> None:
        nonlocal peak
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                peak = max(peak, float(t.detach().abs().max()))

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        with torch.no_grad():
            module(*example)
    finally:
        for h in handles:
            h.remove()
    return peak


def vae_precision(
    key: str, module: Any, example: list[Any], p: ExportCoremlParams, vae_config: dict[str, Any], fam: Any
) -> tuple[str, float]:
    """The compute precision of a VAE half and the peak activation it was chosen on. The decoder is
    measured on latents of the size the pipeline feeds it (unit Gaussian divided by the scaling
    factor); an explicit fp16 whose peak overflows fp16 is a UserError."""
    scale = float(vae_config.get("scaling_factor", fam.vae_scaling_factor))
    probe = [example[0] / scale] if key == "vae_decoder" else example
    peak = peak_activation(module, probe)
    choice = p.vae_compute_precision
    if choice == "auto":
        choice = "fp32" if peak * FP16_HEADROOM > FP16_MAX else p.compute_precision
    if choice == "fp16" and peak > FP16_MAX:
        raise UserError(
            f"vae_compute_precision: fp16 overflows this VAE (peak activation {peak:.0f} > {FP16_MAX:.0f}); "
            "use fp32 or an fp16-safe VAE (e.g. madebyollin/sdxl-vae-fp16-fix for SDXL)"
        )
    return choice, peak


def run(ctx: StageContext) -> None:
    import gc

    from sdkiln.runtime.contract.families import get_family
    from sdkiln.stages.common.coreml import flexible
    from sdkiln.stages.common.coreml import io as cio
    from sdkiln.stages.common.coreml import readback as crb
    from sdkiln.stages.common.torch.pipeline import read_configs

    p: ExportCoremlParams = ctx.params
    src = ctx.input("model")
    facts = src.model
    fam = get_family(facts.family)
    controlnets = list(facts.controlnets)
    if p.controlnets is not None:
        unknown = sorted(set(p.controlnets) - set(controlnets))
        if unknown:
            raise UserError(f"controlnets {unknown} are not in the input pipeline (has: {controlnets})")
        controlnets = [c for c in controlnets if c in p.controlnets]
    configs = read_configs(src.path)
    added_cond = fam.uses_added_cond
    batch = p.batch or (2 if p.flexible_batch else default_batch(fam, facts.lcm))
    unet_batch = flexible.batch_plan(p.flexible_batch, batch, p.minimum_deployment_target)
    height = p.height or fam.default_size
    width = p.width or fam.default_size
    scale = fam.vae_scale_factor
    down = 2 ** (len(configs["unet"]["block_out_channels"]) - 1)
    if height % (scale * down) or width % (scale * down):
        raise UserError(
            f"height and width must be multiples of {scale * down} for this UNet, got {height}x{width}"
        )
    latent_hw = (height // scale, width // scale)
    keys = component_keys(p, fam, controlnets)
    if not keys:
        raise UserError(f"nothing to export: components {list(p.components)} with ControlNets {controlnets}")
    logger.info(
        "export_coreml: %s attention, %s, %s, %dx%d, batch %s (%s): %s",
        p.attention, p.minimum_deployment_target, p.compute_precision, height, width,
        "/".join(map(str, unet_batch.sizes)), unet_batch.mode, ", ".join(keys),
    )  # fmt: skip

    failures: list[str] = []
    total_bytes = 0
    t_all = time.perf_counter()
    for key in ctx.progress(keys, desc="convert", total=len(keys)):
        cfg_key = cio.config_key(key)
        config = configs[cfg_key] if cfg_key in configs else _controlnet_config(src.path, key)
        model_class = fam.components[key].model_class if key.startswith("text_encoder") else None
        batched = key in cio.UNET_KEYS or key.startswith("controlnet.")
        bplan = unet_batch if batched else flexible.BatchPlan((1,), "fixed")
        vocab = int(configs.get("text_encoder", {}).get("vocab_size", 49408))
        rel = cio.package_relpath(key)
        package = ctx.out_dir / rel

        model = cio.load_model(src.path, key, model_class)
        # The reference: diffusers' own attention, fp32, at every batch size the package takes. Computed
        # before split_einsum rewrites the model.
        ref_module = cio.build_module(key, model, "original", added_cond)
        cases = []
        for b in bplan.sizes:
            plan_b = cio.plan_component(key, config, b, latent_hw, scale, added_cond)
            example_b = cio.example_inputs(plan_b.inputs, p.seed, vocab)
            cases.append((plan_b, example_b, cio.run_module(ref_module, example_b)))
        del ref_module
        plan, example, reference = cases[0]
        module = cio.build_module(key, model, p.attention, added_cond)
        heads = count_heads(module)
        precision = p.compute_precision
        if key.startswith("vae_"):
            precision, peak = vae_precision(key, module, example, p, configs["vae"], fam)
            ctx.metrics[f"{key}.peak_activation"] = round(peak, 2)
            ctx.metrics[f"{key}.compute_precision"] = precision
        t0 = time.perf_counter()
        problems = convert_component(
            module, plan, example, package, p,
            {"sdkiln.component": key, "sdkiln.attention": p.attention, "sdkiln.family": fam.name},
            bplan,
            precision,
        )  # fmt: skip
        convert_s = time.perf_counter() - t0
        del module, model
        gc.collect()

        spec = crb.read_spec(package)
        shapes = {n: tuple(r.shape) for n, r in zip(plan.output_names, reference, strict=True)}
        problems += check_spec(spec, plan, shapes, bplan.flexible)
        if batched:
            problems += check_attention_ops(spec, p.attention, heads, bplan.flexible)
            problems += check_batches(package, plan, bplan)
        failures += [f"{key}: {x}" for x in problems]

        parity = crb.measure_packages(
            [package], src.path, key, model_class, p.attention, added_cond, example, reference,
            [(ex, ref) for _, ex, ref in cases[1:]],
        )  # fmt: skip
        floor = cio.psnr_floor(key, facts, p.min_psnr_db, palettized=False)
        worst = parity.worst_db
        if worst < floor:
            failures.append(f"{key}: PSNR {worst:.1f} dB < {floor:.1f} dB")
        size = cio.package_bytes(package)
        total_bytes += size
        ins, outs = spec.io_manifest()
        ctx.components[key] = {
            "path": rel,
            "apple_name": cio.apple_name(key),
            "precision": crb.precision_label(parity.summary),
            "attention": p.attention if key in cio.UNET_KEYS or key.startswith("controlnet.") else None,
            "inputs": ins,
            "outputs": outs,
            "ops": dict(sorted(spec.ops.items())),
            **({"batch_sizes": list(bplan.sizes)} if batched else {}),
        }
        ctx.metrics.update(
            cio.flat_metrics(
                key,
                {
                    "convert_s": round(convert_s, 2),
                    "bytes": size,
                    "psnr_db": round(worst, 2),
                    "psnr_floor_db": floor,
                    **(
                        {
                            f"psnr_db_batch{b}": round(db, 2)
                            for b, db in zip(bplan.sizes, parity.case_db, strict=True)
                        }
                        if bplan.flexible
                        else {}
                    ),
                    **parity.summary.metrics(),
                    **parity.load,
                },
            )
        )
        logger.info("%s: %.1f s, %d bytes, PSNR %.1f dB (floor %.1f)", key, convert_s, size, worst, floor)
        gc.collect()

    tok_dir = src.path / "tokenizer"
    write_tokenizer_files(tok_dir, ctx.out_dir)
    ctx.metrics["bytes"] = total_bytes
    ctx.metrics["convert_s"] = round(time.perf_counter() - t_all, 2)
    ctx.model = facts.model_copy(
        update={
            "controlnets": [k.split(".", 1)[1] for k in keys if k.startswith("controlnet.")],
            "taesd": False,
            "image_size": [height, width],
        }
    )
    ctx.details.update(
        {
            "attention": p.attention,
            "minimum_deployment_target": p.minimum_deployment_target,
            "compute_precision": p.compute_precision,
            "vae_compute_precision": {
                k: ctx.metrics[f"{k}.compute_precision"] for k in keys if k.startswith("vae_")
            },
            "vae_peak_activation": {
                k: ctx.metrics[f"{k}.peak_activation"] for k in keys if k.startswith("vae_")
            },
            "batch": batch,
            "batch_sizes": list(unet_batch.sizes),
            "batch_flexibility": unet_batch.mode,
            "vae_scaling_factor": float(configs["vae"].get("scaling_factor", fam.vae_scaling_factor)),
            "tokenizer": {"vocab": "vocab.json", "merges": "merges.txt"},
        }
    )
    if failures:
        raise ParityError(f"export_coreml ({p.attention})", failures)


def _controlnet_config(folder: Path, key: str) -> dict[str, Any]:
    from sdkiln.stages.common.coreml.io import CONTROLNET_DIR

    path = folder / CONTROLNET_DIR / key.split(".", 1)[1] / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: no config for {key} at {path}")
    return json.loads(path.read_text())


STAGE = Stage(
    name="export_coreml",
    # 2: packages saved reproducibly (common.coreml.io.normalize_package); 3: UNet/ControlNet take batch 1
    # and 2 (flexible_batch); 4: VAE compute precision (vae_compute_precision)
    version="4",
    inputs={"model": (Kind.PIPELINE,)},
    output_kind=Kind.COREML,
    params=ExportCoremlParams,
    run=run,
    description="Core ML packages (ML Program) in Apple's StableDiffusion layout, original or ANE attention",
    env_packages=("torch", "diffusers", "transformers", "coremltools", "numpy"),
    bundle_dir=lambda p: f"coreml/{p.attention}",
)
