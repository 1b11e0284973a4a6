"""What can be benchmarked in a bundle: the bundle view (sections, components, bytes) and the variants (a backend with its settings), chosen per machine."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.manifest import BundleManifest, Section, read_bundle_manifest

SCHEMA = 2

# --------------------------------------------------------------------------------------------------
# Variants (data)


@dataclass(frozen=True)
class TorchSettings:
    """How a PyTorch variant runs the reference section's models."""

    precision: str  # what the report calls it: fp32, bf32, bf16
    dtype: str = "float32"  # the weights' and activations' dtype
    onednn_fp32_precision: str | None = None  # torch.backends.mkldnn.{matmul,conv}.fp32_precision
    channels_last: bool = False
    compile: bool = False
    runtime_dtype: str | None = None  # the runtime's torch backend dtype for e2e (None: not offered)
    description: str = ""


TORCH_VARIANTS: dict[str, TorchSettings] = {
    "torch": TorchSettings("fp32", runtime_dtype="float32", description="diffusers fp32 eager (reference)"),
    "torch-bf32": TorchSettings(
        "bf32",
        onednn_fp32_precision="bf16",
        description="fp32 tensors; oneDNN runs matmul/conv in bf16 internally",
    ),
    "torch-bf16": TorchSettings(
        "bf16",
        dtype="bfloat16",
        channels_last=True,
        runtime_dtype="bfloat16",
        description="bf16 weights and activations, channels-last",
    ),
    "torch-bf16-compile": TorchSettings(
        "bf16",
        dtype="bfloat16",
        channels_last=True,
        compile=True,
        description="bf16, channels-last, torch.compile (compiled while loading, before any timed call)",
    ),
}
# Run without being asked (gated by the hardware, see ``_default_gate``); compile costs minutes.
DEFAULT_TORCH = ("torch", "torch-bf32", "torch-bf16")

# OpenVINO inference-precision presets: ``openvino/fp32@bf16``. The default (f32) is the exact profile.
OV_PRESETS: dict[str, dict[str, Any]] = {
    "default": {"inference_precision": "f32"},
    "bf16": {"inference_precision": "bf16"},
}

# ONNX Runtime session-option presets: ``onnx/fp32@basic``. The default is what the runtime uses.
ORT_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "basic": {"graph_optimization_level": "ORT_ENABLE_BASIC"},
    "extended": {"graph_optimization_level": "ORT_ENABLE_EXTENDED"},
    "nospin": {"config": {"session.intra_op.allow_spinning": "0"}},
}

# Component base name -> what the table calls one call of it.
LABELS = {
    "text_encoder": "text encoder",
    "text_encoder_2": "text encoder 2",
    "unet": "UNet step",
    "controlnet": "ControlNet step",
    "vae_decoder": "VAE decode",
    "vae_encoder": "VAE encode",
    "taesd_decoder": "TAESD decode",
    "taesd_encoder": "TAESD encode",
}
ORDER = tuple(LABELS)
# Parts of a model a component uses (for weight bytes when a folder holds more than one component).
WEIGHT_MODULES = {
    "vae_encoder": ("encoder", "quant_conv"),
    "vae_decoder": ("decoder", "post_quant_conv"),
    "taesd_encoder": ("encoder",),
    "taesd_decoder": ("decoder",),
}
TASKS = ("sketch", "text", "edit")


@dataclass(frozen=True)
class Variant:
    """One thing to measure: a backend, the bundle section it reads and its settings."""

    name: str
    backend: str  # "torch" | "onnxruntime" | "openvino"
    section: str
    precision: str
    settings: dict[str, Any] = field(default_factory=dict)
    description: str = ""


def base_component(name: str) -> str:
    """``controlnet.scribble`` -> ``controlnet``."""
    return name.split(".", 1)[0]


def component_label(name: str) -> str:
    base = base_component(name)
    label = LABELS.get(base, name)
    return f"{label} ({name.split('.', 1)[1]})" if "." in name else label


def _sort_key(name: str) -> tuple[int, str]:
    base = base_component(name)
    return (ORDER.index(base) if base in ORDER else len(ORDER), name)


# --------------------------------------------------------------------------------------------------
# The bundle


@dataclass
class Bundle:
    """A bundle's manifest, read once: which sections exist and what they hold."""

    root: Path
    manifest: BundleManifest

    @classmethod
    def open(cls, path: Path) -> Bundle:
        path = Path(path)
        return cls(path, read_bundle_manifest(path))

    @property
    def name(self) -> str:
        return self.manifest.name or self.root.name

    @property
    def sections(self) -> dict[str, Section]:
        return self.manifest.sections

    def of_kind(self, kind: str) -> list[str]:
        return sorted(s for s, e in self.sections.items() if e.kind == kind)

    def reference_section(self) -> str | None:
        """The PIPELINE section the PyTorch variants read: ``torch/fused`` if present."""
        pipes = self.of_kind("pipeline")
        return "torch/fused" if "torch/fused" in pipes else (pipes[0] if pipes else None)

    def family(self) -> str:
        for entry in self.sections.values():
            if entry.model is not None:
                return entry.model.family
        raise UserError(f"{self.root}: no section says its model family (manifest model.family)")

    def components(self, section: str) -> dict[str, dict[str, Any]]:
        """The section's components (as dicts); for a PIPELINE section without any, built from configs."""
        entry = self.sections[section]
        comps = {k: v.model_dump(mode="json") for k, v in entry.components.items()}
        if comps or entry.kind != "pipeline":
            return comps
        return self._pipeline_components(section)

    def _pipeline_components(self, section: str) -> dict[str, dict[str, Any]]:
        from sdkiln.runtime.contract.families import component_specs, get_family

        folder = self.root / section
        fam = get_family(self.family())
        configs = {}
        for name in ("unet", "vae", "vae_tiny", *fam.text_encoders):
            p = folder / name / "config.json"
            if p.is_file():
                configs[name] = json.loads(p.read_text())
        cn = folder / "controlnet"
        controlnets = sorted(p.name for p in cn.iterdir() if p.is_dir()) if cn.is_dir() else []
        return component_specs(fam, configs, controlnets=controlnets, taesd="vae_tiny" in configs)

    def unet_config(self) -> dict[str, Any]:
        for section in [self.reference_section(), *self.of_kind("onnx")]:
            if section and (self.root / section / "unet" / "config.json").is_file():
                return json.loads((self.root / section / "unet" / "config.json").read_text())
        return {}

    def files_bytes(self, prefix: str, suffixes: tuple[str, ...] | None = None) -> int:
        """Bytes of the manifest's files under ``prefix`` (a folder), optionally only some suffixes."""
        total = 0
        for rel, meta in self.manifest.files.items():
            if rel.startswith(prefix.rstrip("/") + "/") and (suffixes is None or rel.endswith(suffixes)):
                total += meta.size
        if total == 0 and (self.root / prefix).is_dir():  # a hand-made bundle without a files table
            for p in (self.root / prefix).rglob("*"):
                if p.is_file() and (suffixes is None or p.name.endswith(suffixes)):
                    total += p.stat().st_size
        return total


def torch_folder(component: str) -> str:
    """The folder of a PIPELINE section that holds ``component`` (from the family table)."""
    from sdkiln.runtime.contract.families import FAMILIES

    base = base_component(component)
    spec = next(iter(FAMILIES.values())).components.get(base)
    if spec is None:
        raise UserError(f"unknown component {component!r}")
    return spec.folder.format(type=component.split(".", 1)[1]) if "." in component else spec.folder


def artifact_bytes(bundle: Bundle, variant: Variant, component: str) -> int:
    """On-disk bytes of what the variant loads for ``component``: the ONNX graph and its external data,
    or the safetensors of the component's diffusers folder (a VAE folder holds encoder and decoder)."""
    if variant.backend in ("onnxruntime", "openvino"):
        entry = bundle.components(variant.section).get(component, {})
        rel = Path(entry.get("path", f"{component}/model.onnx")).parent.as_posix()
        total = bundle.files_bytes(f"{variant.section}/{rel}")
        cfg = bundle.files_bytes(f"{variant.section}/{rel}", (".json",))
        return total - cfg
    return bundle.files_bytes(f"{variant.section}/{torch_folder(component)}", (".safetensors", ".bin"))


# --------------------------------------------------------------------------------------------------
# Configuration and report


@dataclass(frozen=True)
class BenchConfig:
    """Everything a run depends on; recorded in the report."""

    bundle: Path
    backends: tuple[str, ...] | None = None  # None: every variant that applies here
    components: tuple[str, ...] | None = None  # None: every component of the bundle
    tasks: tuple[str, ...] = TASKS
    repeat: int = 5
    warmup: int = 1
    threads: int | None = None  # None: physical cores
    size: int | None = None  # image side in pixels; None: the model's native size
    batch: int = 1
    steps: int = 4
    reference: str = "torch"
    # Fast-profile levers run end to end on ``fast_base`` (``auto``: the fastest variant whose components
    # all met their floors in this run): ``taesd``, ``steps<N>``, ``cn<K>``, joined with ``+``.
    levers: tuple[str, ...] = ("taesd",)
    fast_base: str | None = "auto"
    task_repeat: int | None = None  # timed rounds of the task phase (None: ``repeat``)
    deepcache: int = 0  # > 0: also run the reference with DeepCache-style reuse (full every N steps)
    record: bool = True  # write this machine's results for ``backend="auto"`` (~/.cache/sdkiln/bench)
    peak_max_n: int = 2048
    seed: int = 0
    timeout_s: float = 3600.0
    # Pause before each timed call: an idle worker's spinning threads (OpenMP, ORT) go to sleep
    # instead of stealing cores from the next variant.
    settle_s: float = 0.05
    memory_budget_gb: float | None = None  # None: 80% of MemAvailable at the start


_MEMORY_METHOD = (
    "peak_rss_bytes: the worker process's VmHWM, reset (/proc/self/clear_refs) before the component is "
    "loaded and read after its timed runs: load + warm-up + runs, including the interpreter and libraries "
    "(baseline_rss_bytes, measured just before loading). Where the reset is not allowed, the high-water "
    "mark is cumulative over the worker's life (memory_reset: false)."
)


def _native_size(bundle: Bundle) -> int:
    from sdkiln.runtime.contract.families import get_family

    fam = get_family(bundle.family())
    sample = bundle.unet_config().get("sample_size")
    if isinstance(sample, list | tuple):
        sample = sample[0]
    return int(sample) * fam.vae_scale_factor if sample else fam.default_size


def available_variants(bundle: Bundle) -> tuple[dict[str, Variant], dict[str, str]]:
    """Every variant the bundle supports (ONNX presets aside), and why the others cannot run here."""
    ref_section = bundle.reference_section()
    available: dict[str, Variant] = {}
    reasons: dict[str, str] = {}
    for name, s in TORCH_VARIANTS.items():
        if ref_section is None:
            reasons[name] = "the bundle has no PIPELINE section (torch/fused) for the PyTorch variants"
            continue
        available[name] = Variant(name, "torch", ref_section, s.precision, asdict(s), s.description)
    onnx_sections = bundle.of_kind("onnx")
    for section in onnx_sections:
        available[section] = _onnx_variant(bundle, section)
    ov_gap = _openvino_gap()
    for section in bundle.of_kind("openvino"):
        if ov_gap:
            reasons[section] = ov_gap
            continue
        available[section] = _ov_variant(bundle, section, "default")
        available[f"{section}@bf16"] = _ov_variant(bundle, section, "bf16")
    for section in bundle.of_kind("coreml"):
        reasons[section] = "Core ML predictions run only on macOS"
    for section in bundle.of_kind("tensorrt"):
        reasons[section] = (
            "TensorRT engines need an NVIDIA GPU with TensorRT (not benchmarked by this command yet)"
        )
    for section in bundle.of_kind("torch_quantized"):
        reasons[section] = "optimum-quanto sections are not benchmarked yet"
    return available, reasons


def select_variants(
    available: dict[str, Variant],
    reasons: dict[str, str],
    config: BenchConfig,
    facts: dict[str, Any],
    peak: dict[str, Any],
) -> tuple[list[Variant], list[dict[str, str]]]:
    """The variants to run (the reference first) and, for each one left out, why."""
    onnx_sections = [n for n, v in available.items() if v.backend == "onnxruntime"]
    ov_variants = [n for n, v in available.items() if v.backend == "openvino"]
    chosen: list[Variant] = []
    skipped = [{"variant": n, "reason": r} for n, r in reasons.items() if config.backends is None]
    if config.backends is None:
        for name in (*DEFAULT_TORCH, *onnx_sections, *ov_variants):
            if name not in available:
                continue
            why = _default_gate(name, facts, peak)
            if why:
                skipped.append({"variant": name, "reason": why})
            else:
                chosen.append(available[name])
        return _reference_first(chosen, available[config.reference]), skipped
    unknown = []
    for name in dict.fromkeys(config.backends):
        base, _, preset = name.partition("@")
        if name in available:  # plain variants, and OpenVINO's ``@bf16`` ones
            chosen.append(available[name])
        elif base in available and not preset:
            chosen.append(available[base])
        elif base in onnx_sections and preset in ORT_PRESETS:
            chosen.append(_with_preset(available[base], preset))
        elif base in reasons:
            skipped.append({"variant": name, "reason": reasons[base]})
        else:
            unknown.append(name)
    if unknown:
        known = [*available, *(f"{s}@{p}" for s in onnx_sections for p in ORT_PRESETS if p != "default")]
        raise UserError(f"--backends: unknown {', '.join(unknown)}; this bundle offers: {', '.join(known)}")
    # Ratios need the reference, whatever else was asked for.
    return _reference_first(chosen, available[config.reference]), skipped


def _reference_first(chosen: list[Variant], reference: Variant) -> list[Variant]:
    return [reference, *(v for v in chosen if v.name != reference.name)]


def _onnx_variant(bundle: Bundle, section: str) -> Variant:
    precision = bundle.sections[section].precision  # from what its components hold (``mixed``...)
    return Variant(
        section, "onnxruntime", section, str(precision), {"preset": "default"}, f"ONNX Runtime CPU, {section}"
    )


def _openvino_gap() -> str | None:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "OpenVINO is not installed here (pip install 'sdkiln[openvino]')"
    return None


def _ov_variant(bundle: Bundle, section: str, preset: str) -> Variant:
    precision = str(bundle.sections[section].precision)
    hint = OV_PRESETS[preset]["inference_precision"]
    if hint == "bf16":
        return Variant(
            f"{section}@bf16",
            "openvino",
            section,
            bf16_label(precision),
            dict(OV_PRESETS[preset]),
            f"OpenVINO CPU, {section}, bf16 inference precision (a fast-profile trade-off)",
        )
    return Variant(
        section, "openvino", section, precision, dict(OV_PRESETS[preset]), f"OpenVINO CPU, {section}, f32"
    )


def hint_of(v: Variant, component: str) -> str:
    """The OpenVINO inference precision ``component`` runs in under variant ``v`` (``f32`` elsewhere)."""
    if v.backend != "openvino":
        return "f32"
    from sdkiln.runtime.backends.openvino import parse_precision, precision_of

    default, overrides = parse_precision(v.settings.get("inference_precision", "f32"))
    return precision_of(component, default, overrides)


def bf16_label(precision: str) -> str:
    """What a component stored at ``precision`` computes in under OpenVINO's bf16 hint: fp32 weights run
    in bf16; int8 ones keep their int8 kernels with the rest in bf16."""
    return "bf16" if precision in ("fp32", "bf16") else f"{precision}+bf16"


def _with_preset(v: Variant, preset: str) -> Variant:
    return Variant(
        f"{v.section}@{preset}",
        v.backend,
        v.section,
        v.precision,
        {"preset": preset, **ORT_PRESETS[preset]},
        f"{v.description}, session options {preset}",
    )


def _default_gate(name: str, facts: dict[str, Any], peak: dict[str, Any]) -> str | None:
    """Why a default variant is not worth running on this machine (None: run it). Asked-for variants
    always run; these only keep an unattended run from spending an hour on emulated bf16."""
    isa = facts.get("isa", {})
    if name.endswith("@bf16") and not (isa.get("avx512_bf16") or isa.get("amx_bf16")):
        return "OpenVINO's bf16 inference needs avx512_bf16 or amx_bf16 (absent here); ask for it with --backends"
    if name == "torch-bf32" and not (isa.get("avx512_bf16") or isa.get("amx_bf16")):
        return (
            "oneDNN's implicit-bf16 fp32 path needs avx512_bf16 or amx_bf16 (absent here), so it would run "
            "plain fp32; ask for it with --backends to measure anyway"
        )
    if name.startswith("torch-bf16"):
        bf16 = (peak.get("by_dtype") or {}).get("bf16")
        fp32 = (peak.get("by_dtype") or {}).get("fp32")
        if bf16 and fp32 and bf16 < 0.5 * fp32:
            return (
                f"the measured bf16 GEMM peak ({bf16 / 1e9:.1f} GFLOP/s) is {bf16 / fp32:.1%} of the fp32 one "
                f"({fp32 / 1e9:.1f} GFLOP/s): no native bf16 here; ask for it with --backends to measure anyway"
            )
    return None


def _components_to_run(bundle: Bundle, variants: list[Variant], config: BenchConfig) -> list[str]:
    have: set[str] = set()
    for v in variants:
        have |= set(bundle.components(v.section))
    if config.components is None:
        return sorted(have, key=_sort_key)
    wanted: list[str] = []
    for c in config.components:
        matches = sorted((h for h in have if h == c or base_component(h) == c), key=_sort_key)
        if not matches:
            raise UserError(f"--components: {c!r} is not in the bundle (it has: {', '.join(sorted(have))})")
        wanted += [m for m in matches if m not in wanted]
    return wanted


# --------------------------------------------------------------------------------------------------
# End to end (through the runtime)

# What each task runs, for the memory estimate (text encoders are added per family).
TASK_COMPONENTS = {
    "sketch": ("unet", "controlnet.scribble", "vae_decoder"),
    "text": ("unet", "vae_decoder"),
    "edit": ("unet", "controlnet.canny", "vae_encoder", "vae_decoder"),
}
