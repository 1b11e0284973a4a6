"""The model card's "Use it elsewhere" section: how to run a published bundle without sdkiln.

- ONNX sections with dynamic shapes load as they are in diffusers' ``OnnxStableDiffusionPipeline`` /
  ``OnnxStableDiffusionImg2ImgPipeline`` (SD 1.x/2.x families; diffusers has no ONNX SDXL pipeline) and
  in optimum's ``ORTDiffusionPipeline``. The UNet's ControlNet residuals are optional inputs, so these
  pipelines, which feed only ``sample``/``timestep``/``encoder_hidden_states``, run it unchanged.
  ``DiffusionPipeline.from_pretrained`` cannot read a pipeline from a repo's subfolder, so the snippet
  downloads the one section (``snapshot_download(allow_patterns=...)``) and loads the local folder
  (``tests/stages/test_onnx_consumers.py`` runs this snippet against a Hub).
- Core ML sections are ``.mlpackage`` files named as Apple's Swift ``StableDiffusion`` package loads
  them once compiled (``xcrun coremlcompiler compile``: ``Unet.mlpackage`` -> ``Unet.mlmodelc``,
  ``controlnet/<type>.mlpackage`` -> ``controlnet/<type>.mlmodelc``), next to ``vocab.json`` and
  ``merges.txt``; the section says what the Swift pipeline can and cannot do with them.

Every function returns plain text; ``render`` gives the card's lines. Deterministic (same manifest, same
text), like the rest of the card.
"""

from __future__ import annotations

from typing import Any

from sdkiln.runtime.contract.families import generation_defaults, get_family
from sdkiln.runtime.contract.manifest import BundleManifest, Section

# diffusers' ONNX pipeline class for a family's pipeline class (diffusers has none for SDXL).
DIFFUSERS_ONNX = {"StableDiffusionPipeline": "OnnxStableDiffusionPipeline"}
# The optimum release that reads these folders, and what it needs (it does not install beside
# transformers 5: optimum-onnx 0.1.0 requires transformers < 4.58).
OPTIMUM = "optimum-onnx[onnxruntime]==0.1.0"
OPTIMUM_NEEDS = "transformers < 4.58 (it does not install beside transformers 5)"
SWIFT_PACKAGE = "https://github.com/apple/ml-stable-diffusion"
# diffusers' ONNX pipelines multiply numpy latents by ``scheduler.init_noise_sigma``, which the
# sigma-based schedulers return as a torch tensor: a TypeError in diffusers 0.42.1 (SD-Turbo's Euler
# ancestral included). The snippet gives those pipelines the same scheduler with a float there.
TENSOR_SIGMA_SCHEDULERS = frozenset(
    {
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "LMSDiscreteScheduler",
        "HeunDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
    }
)


def onnx_section(manifest: BundleManifest) -> str | None:
    """The ONNX section the snippets load: ``onnx/fp32`` if present, else the first dynamic-shape one
    (a static export's fixed batch does not take diffusers' ``timestep`` of shape ``[1]`` with CFG)."""
    dynamic = [
        n
        for n, s in sorted(manifest.sections.items())
        if s.kind == "onnx" and (s.model is None or s.model.static is None) and "unet" in s.components
    ]
    return "onnx/fp32" if "onnx/fp32" in dynamic else (dynamic[0] if dynamic else None)


def _family(section: Section) -> Any | None:
    if section.model is None:
        return None
    try:
        return get_family(section.model.family)
    except KeyError:
        return None


def diffusers_snippet(
    repo_id: str,
    revision: str,
    section: str,
    lcm: bool,
    family: str = "sd15",
    img2img: bool = False,
    scheduler: str | None = None,
) -> str:
    """Python that downloads one ONNX section of the repo and runs it in diffusers' ONNX pipeline
    (``scheduler``: the section's scheduler class, for the ``TENSOR_SIGMA_SCHEDULERS`` fix)."""
    gen = generation_defaults(family, lcm=lcm)
    cls = "OnnxStableDiffusionImg2ImgPipeline" if img2img else "OnnxStableDiffusionPipeline"
    fix = scheduler in TENSOR_SIGMA_SCHEDULERS
    scheduler_class = [
        "",
        "",
        f"class Scheduler({scheduler}):  # diffusers' ONNX pipelines need a float init_noise_sigma",
        "    @property",
        "    def init_noise_sigma(self):",
        "        return float(super().init_noise_sigma)",
        "",
    ]
    call = (
        f'image = pipe("a lighthouse at dusk", image=Image.open("photo.png").convert("RGB"), strength=0.6,\n'
        f"             num_inference_steps={max(gen.steps, 2)}, guidance_scale={gen.guidance}).images[0]"
        if img2img
        else f'image = pipe("a lighthouse at dusk", num_inference_steps={gen.steps}, '
        f"guidance_scale={gen.guidance}).images[0]"
    )
    return "\n".join(
        [
            *(["from PIL import Image"] if img2img else []),
            "from diffusers import " + ", ".join(sorted({cls, scheduler} if fix else {cls})),
            "from huggingface_hub import snapshot_download",
            *(scheduler_class if fix else []),
            "",
            f'local = snapshot_download("{repo_id}", revision="{revision}", allow_patterns=["{section}/*"])',
            f"pipe = {cls}.from_pretrained(",
            f'    f"{{local}}/{section}", provider="CPUExecutionProvider", provider_options={{}},',
            "    safety_checker=None, feature_extractor=None, requires_safety_checker=False,",
            ")",
            *(["pipe.scheduler = Scheduler.from_config(pipe.scheduler.config)"] if fix else []),
            call,
        ]
    )


def optimum_snippet(repo_id: str, revision: str, section: str, lcm: bool, family: str = "sd15") -> str:
    """Python for optimum's ONNX Runtime pipeline (which picks the pipeline class from model_index.json)."""
    gen = generation_defaults(family, lcm=lcm)
    return "\n".join(
        [
            "from huggingface_hub import snapshot_download",
            "from optimum.onnxruntime import ORTDiffusionPipeline",
            "",
            f'local = snapshot_download("{repo_id}", revision="{revision}", allow_patterns=["{section}/*"])',
            f'pipe = ORTDiffusionPipeline.from_pretrained(f"{{local}}/{section}")',
            f'image = pipe("a lighthouse at dusk", num_inference_steps={gen.steps}, '
            f"guidance_scale={gen.guidance}).images[0]",
        ]
    )


def compile_commands(repo_id: str, revision: str, section: str, sec: Section) -> str:
    """Shell: download the Core ML section, compile each package where Swift looks for it."""
    nested = any(c.startswith("controlnet.") for c in sec.components)
    lines = [
        f'hf download {repo_id} --revision {revision} --include "{section}/*" --local-dir bundle',
        f"cd bundle/{section}",
        "mkdir -p Resources" + (" Resources/controlnet" if nested else ""),
        'for p in packages/*.mlpackage; do xcrun coremlcompiler compile "$p" Resources/; done',
    ]
    if nested:
        lines.append(
            'for p in packages/controlnet/*.mlpackage; do xcrun coremlcompiler compile "$p" Resources/controlnet/; done'
        )
    lines.append("cp vocab.json merges.txt Resources/")
    return "\n".join(lines)


def _swift_facts(sec: Section) -> dict[str, Any]:
    comps = sec.components
    controlnets = sorted(k.split(".", 1)[1] for k in comps if k.startswith("controlnet."))
    fam = _family(sec)
    xl = bool(fam and fam.uses_added_cond)
    attention = str(sec.details.get("attention") or "split_einsum")
    batches = sorted({int(b) for c in comps.values() for b in (c.get("batch_sizes") or [])})
    size = sec.model.image_size if sec.model and sec.model.image_size else None
    return {
        "controlnets": controlnets,
        "xl": xl,
        "plain_unet": "unet" in comps,
        "controlled_unet": "controlled_unet" in comps,
        "encoder": "vae_encoder" in comps,
        "units": ".cpuAndNeuralEngine" if attention == "split_einsum" else ".cpuAndGPU",
        "cli_units": "cpuAndNeuralEngine" if attention == "split_einsum" else "cpuAndGPU",
        "scale": float(sec.details.get("vae_scaling_factor") or (fam.vae_scaling_factor if fam else 0.18215)),
        "lcm": bool(sec.model and sec.model.lcm),
        "batches": batches,
        "size": size,
    }


def swift_snippet(sec: Section) -> str:
    """Swift that runs the compiled resources with Apple's ``StableDiffusion`` package."""
    f = _swift_facts(sec)
    gen = generation_defaults(sec.model.family if sec.model else "sd15", lcm=f["lcm"])
    cls = "StableDiffusionXLPipeline" if f["xl"] else "StableDiffusionPipeline"
    cn = f["controlnets"][:1] if not f["xl"] and not f["plain_unet"] else []
    args = 'resourcesAt: URL(fileURLWithPath: "Resources"),'
    if not f["xl"]:
        names = ", ".join(f'"{c}"' for c in cn)
        args += f" controlNet: [{names}],"
    lines = [
        "import CoreML",
        "import StableDiffusion",
        "",
        "let mlConfig = MLModelConfiguration()",
        f"mlConfig.computeUnits = {f['units']}",
        f"let pipeline = try {cls}({args} configuration: mlConfig"
        + (", disableSafety: true)" if not f["xl"] else ")"),
        "try pipeline.loadResources()",
        'var config = PipelineConfiguration(prompt: "a lighthouse at dusk")',
        f"config.stepCount = {max(gen.steps, 2)}",
        f"config.guidanceScale = {max(gen.guidance, 1.0)}  // >= 1: the UNet sees batch 2 (its default shape)",
        "config.schedulerType = .dpmSolverMultistepScheduler",
        f"config.encoderScaleFactor = {f['scale']}",
        f"config.decoderScaleFactor = {f['scale']}",
    ]
    if cn:
        h, w = f["size"] or (512, 512)
        lines.append(f"config.controlNetInputs = [sketch]  // a {w}x{h} CGImage")
    lines.append("let images = try pipeline.generateImages(configuration: config)")
    return "\n".join(lines)


def swift_notes(sec: Section) -> list[str]:
    """What the Swift package can and cannot do with this section (read from its manifest)."""
    f = _swift_facts(sec)
    notes = []
    if f["batches"]:
        notes.append(
            f"The UNet and ControlNet packages accept batch {' and '.join(map(str, f['batches']))}; their "
            "declared (default) shape is batch 2, which the Swift pipeline reads to run classifier-free "
            "guidance (and every ControlNet call) in one prediction; guidance below 1 feeds batch 1."
        )
    if f["controlled_unet"] and not f["plain_unet"]:
        notes.append(
            "Only the ControlNet-ready `ControlledUnet` is in this section: pass a ControlNet name "
            f'(`controlNet: ["{f["controlnets"][0] if f["controlnets"] else "name"}"]`) and a control image; '
            "text-to-image without a ControlNet needs `Unet` (an `export_coreml` step with `unet: both`)."
        )
    if f["controlnets"] and f["xl"]:
        notes.append(
            "Apple's Swift pipeline runs no ControlNet for SDXL; the ControlNet packages are for sdkiln."
        )
    if f["lcm"]:
        notes.append(
            "The UNet has an LCM-LoRA fused; the Swift package has no LCM scheduler, so its DPM-Solver++ "
            "needs more steps than sdkiln's 4 (sdkiln's own Core ML backend samples with LCM)."
        )
    if not f["encoder"]:
        notes.append("No `VAEEncoder`: image-to-image in Swift needs one.")
    return notes


def render(manifest: BundleManifest, repo_id: str, revision: str = "main") -> list[str]:
    """The card lines of "Use it elsewhere" (empty when the bundle has no ONNX or Core ML section)."""
    lines: list[str] = []
    section = onnx_section(manifest)
    if section is not None:
        sec = manifest.sections[section]
        fam = _family(sec)
        family = fam.name if fam else "sd15"
        lcm = bool(sec.model and sec.model.lcm)
        cls = DIFFUSERS_ONNX.get(fam.pipeline_class) if fam else None
        lines += [
            "## Use it elsewhere",
            "",
            f"### ONNX (`{section}`)",
            "",
            "The folder is a standard diffusers/optimum ONNX pipeline. The UNet's ControlNet residual inputs "
            "are optional (zero defaults), so pipelines that feed only `sample`, `timestep` and "
            "`encoder_hidden_states` run the same graph that sdkiln's ControlNet tasks use.",
            "",
        ]
        if cls:
            lines += [
                "diffusers (`pip install diffusers onnxruntime transformers torch`; img2img: "
                "`OnnxStableDiffusionImg2ImgPipeline`):",
                "",
                "```python",
                diffusers_snippet(
                    repo_id,
                    revision,
                    section,
                    lcm,
                    family,
                    scheduler=sec.model.scheduler if sec.model else None,
                ),
                "```",
                "",
            ]
        else:
            lines += [
                f"diffusers has no ONNX pipeline for {family}; use optimum (below) or sdkiln.",
                "",
            ]
        lines += [
            f'optimum (`pip install "{OPTIMUM}"`; needs {OPTIMUM_NEEDS}):',
            "",
            "```python",
            optimum_snippet(repo_id, revision, section, lcm, family),
            "```",
            "",
        ]
    coreml = sorted(n for n, s in manifest.sections.items() if s.kind == "coreml")
    for name in coreml:
        sec = manifest.sections[name]
        if not lines:
            lines += ["## Use it elsewhere", ""]
        f = _swift_facts(sec)
        lines += [
            f"### Core ML (`{name}`) in Apple's Swift `StableDiffusion` package",
            "",
            f"The packages carry the names [{SWIFT_PACKAGE}]({SWIFT_PACKAGE}) loads once compiled. On a Mac "
            "with Xcode:",
            "",
            "```bash",
            compile_commands(repo_id, revision, name, sec),
            "```",
            "",
            "```swift",
            swift_snippet(sec),
            "```",
            "",
            'Or its CLI: `swift run StableDiffusionSample "a lighthouse at dusk" --resource-path Resources '
            + ("--xl " if f["xl"] else "")
            + (
                f"--controlnet {f['controlnets'][0]} --controlnet-inputs sketch.png "
                if f["controlnets"] and not f["plain_unet"] and not f["xl"]
                else ""
            )
            + f"--compute-units {f['cli_units']} --scheduler dpmpp --disable-safety --output-path out`.",
            "",
        ]
        lines += [f"- {n}" for n in swift_notes(sec)] + ([""] if swift_notes(sec) else [])
    return lines
