"""``sdkiln bench``: latency, memory, size and achieved FLOP/s of a bundle's backends, each measured
against the PyTorch reference in the same run.

    sdkiln bench artifacts/tiny --repeat 3
    sdkiln bench artifacts/bench --backends torch,onnx/fp32,onnx/int8 --components unet --tasks sketch

Method (``benchmarks/README.md`` has the long form):

- A *variant* is a backend with its settings: ``torch`` (diffusers fp32 eager, the reference),
  ``torch-bf32`` (fp32 tensors, oneDNN's implicit bf16 matmul/conv), ``torch-bf16`` (bf16 weights,
  channels-last), ``torch-bf16-compile`` (plus ``torch.compile``), and ONNX Runtime over every
  ``onnx/...`` section of the bundle (``onnx/int8@basic`` picks an ORT session-option preset).
- Each variant lives in its own worker process (``python -m sdkiln.stages.bench --worker``), so its
  peak RSS is its own and its thread settings are explicit. The workers run one at a time.
- Per component (text encoder, UNet step, ControlNet step, VAE/TAESD decode/encode) every worker
  loads it, warms up, then the workers take turns, one call each, A B C A B C ..., so a noisy machine
  slows every variant alike. Median, min and max of the timed calls; ``ratio_to_reference`` is the
  variant's median over the median of the reference's samples *from the same rounds*. Variants that
  would not fit in memory together run in groups, each group interleaved with the reference.
- Every variant gets the same seeded inputs (made from the manifest's I/O spec); its outputs are
  compared with the reference's (max abs, cosine, SQNR) against the family's tolerances.
- FLOPs are counted once per component, on the reference, with ``FlopCounterMode`` and the classic
  attention path (it does not count SDPA). The machine's peak is measured in the same run by GEMM
  probes (numpy, torch fp32/bf16, ONNX Runtime fp32 and int8).
- End to end per task (sketch, text, edit) through ``sdkiln.runtime.load(...)``, interleaved the same
  way, with the runtime's own per-stage timings.

Outputs: a JSON report (machine facts included), a Markdown table and a PNG chart, appended to
``benchmarks/results/<timestamp>-<bundle>.*``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import math
import os
import pickle
import platform
import re
import select
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdkiln.stages.core import BuildError, UserError

logger = logging.getLogger(__name__)

SCHEMA = 1

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
    backend: str  # "torch" | "onnxruntime"
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
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: Path) -> Bundle:
        path = Path(path)
        mf = path / "manifest.json"
        if not mf.is_file():
            raise UserError(f"{path}: no manifest.json; is this an sdkiln bundle (artifacts/<recipe>/)?")
        try:
            manifest = json.loads(mf.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{mf}: unreadable ({e})") from e
        if not isinstance(manifest.get("sections"), dict):
            raise UserError(f"{mf}: not a bundle manifest (no 'sections')")
        return cls(path, manifest)

    @property
    def name(self) -> str:
        return str(self.manifest.get("name") or self.root.name)

    @property
    def sections(self) -> dict[str, dict[str, Any]]:
        return self.manifest["sections"]

    def of_kind(self, kind: str) -> list[str]:
        return sorted(s for s, e in self.sections.items() if e.get("kind") == kind)

    def reference_section(self) -> str | None:
        """The PIPELINE section the PyTorch variants read: ``torch/fused`` if present."""
        pipes = self.of_kind("pipeline")
        return "torch/fused" if "torch/fused" in pipes else (pipes[0] if pipes else None)

    def family(self) -> str:
        for entry in self.sections.values():
            fam = (entry.get("extra") or {}).get("family")
            if fam:
                return str(fam)
        raise UserError(f"{self.root}: no section says its model family (manifest extra.family)")

    def components(self, section: str) -> dict[str, dict[str, Any]]:
        """The section's ``components`` table; for a PIPELINE section without one, built from configs."""
        entry = self.sections[section]
        comps = entry.get("components") or {}
        if comps or entry.get("kind") != "pipeline":
            return comps
        return self._pipeline_components(section)

    def _pipeline_components(self, section: str) -> dict[str, dict[str, Any]]:
        from sdkiln.stages.families import component_specs, get_family

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
        for rel, meta in self.manifest.get("files", {}).items():
            if rel.startswith(prefix.rstrip("/") + "/") and (suffixes is None or rel.endswith(suffixes)):
                total += int(meta.get("size", 0))
        if total == 0 and (self.root / prefix).is_dir():  # a hand-made bundle without a files table
            for p in (self.root / prefix).rglob("*"):
                if p.is_file() and (suffixes is None or p.name.endswith(suffixes)):
                    total += p.stat().st_size
        return total


def torch_folder(component: str) -> str:
    """The folder of a PIPELINE section that holds ``component`` (from the family table)."""
    from sdkiln.stages.families import FAMILIES

    base = base_component(component)
    spec = next(iter(FAMILIES.values())).components.get(base)
    if spec is None:
        raise UserError(f"unknown component {component!r}")
    return spec.folder.format(type=component.split(".", 1)[1]) if "." in component else spec.folder


def artifact_bytes(bundle: Bundle, variant: Variant, component: str) -> int:
    """On-disk bytes of what the variant loads for ``component``: the ONNX graph and its external data,
    or the safetensors of the component's diffusers folder (a VAE folder holds encoder and decoder)."""
    if variant.backend == "onnxruntime":
        entry = bundle.components(variant.section).get(component, {})
        rel = Path(entry.get("path", f"{component}/model.onnx")).parent.as_posix()
        total = bundle.files_bytes(f"{variant.section}/{rel}")
        cfg = bundle.files_bytes(f"{variant.section}/{rel}", (".json",))
        return total - cfg
    return bundle.files_bytes(f"{variant.section}/{torch_folder(component)}", (".safetensors", ".bin"))


# --------------------------------------------------------------------------------------------------
# Machine facts


ISA_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_bf16",
    "amx_int8",
    "amx_tile",
)


def machine_facts() -> dict[str, Any]:
    """CPU model, cores, ISA flags, memory, GPU and library versions (cheap; no torch import)."""
    cpuinfo = _read("/proc/cpuinfo")
    flags: set[str] = set()
    model, mhz = platform.processor() or platform.machine(), None
    cores: set[tuple[str, str]] = set()
    phys = core = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "model name":
            model = value
        elif key == "cpu MHz" and mhz is None:
            with contextlib.suppress(ValueError):
                mhz = float(value)
        elif key == "physical id":
            phys = value
        elif key == "core id":
            core = value
            cores.add((phys, core))
    logical = os.cpu_count() or 1
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = logical
    meminfo = _read("/proc/meminfo")
    m = re.search(r"MemTotal:\s+(\d+) kB", meminfo)
    return {
        "cpu_model": model,
        "cpu_mhz": mhz,
        "physical_cores": len(cores) or logical,
        "logical_cpus": logical,
        "cpus_allowed": allowed,
        "isa": {f: f in flags for f in ISA_FLAGS},
        "hypervisor": "hypervisor" in flags,
        "memory_bytes": int(m.group(1)) * 1024 if m else None,
        "gpu": _gpu(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": _versions(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def default_threads(facts: dict[str, Any] | None = None) -> int:
    """Physical cores this process may use."""
    facts = facts or machine_facts()
    return max(1, min(int(facts["physical_cores"]), int(facts["cpus_allowed"])))


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _gpu() -> list[dict[str, Any]] | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    gpus = []
    for line in out.stdout.strip().splitlines():
        name, _, mem = line.partition(",")
        gpus.append({"name": name.strip(), "memory_bytes": int(float(mem)) * 2**20 if mem.strip() else None})
    return gpus or None


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("sdkiln", "torch", "onnxruntime", "onnx", "diffusers", "transformers", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


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
    taesd_e2e: bool = True
    peak_max_n: int = 2048
    seed: int = 0
    timeout_s: float = 3600.0
    # Pause before each timed call: an idle worker's spinning threads (OpenMP, ORT) go to sleep
    # instead of stealing cores from the next variant.
    settle_s: float = 0.05
    memory_budget_gb: float | None = None  # None: 80% of MemAvailable at the start


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Measure a bundle as ``config`` says; returns the report (see ``benchmarks/README.md``).

    Example::

        report = run_bench(BenchConfig(Path("artifacts/tiny"), repeat=3))
        report["components"][0]["results"][0]["ratio_to_reference"]
    """
    if config.repeat < 1 or config.warmup < 0:
        raise UserError("--repeat must be >= 1 and --warmup >= 0")
    bundle = Bundle.open(config.bundle)
    facts = machine_facts()
    threads = config.threads or default_threads(facts)
    if threads < 1:
        raise UserError("--threads must be >= 1")
    started = _dt.datetime.now(_dt.UTC)
    logger.info(
        "bench %s: %d thread(s), %d warm-up + %d interleaved rounds",
        bundle.root,
        threads,
        config.warmup,
        config.repeat,
    )

    available, reasons = available_variants(bundle)
    if config.reference not in available:
        raise UserError(
            f"the reference {config.reference!r} cannot run on this bundle"
            + (f" ({reasons[config.reference]})" if config.reference in reasons else "")
            + f"; variants here: {', '.join(available) or 'none'} (choose one with --reference)"
        )
    reference = available[config.reference]
    phases: dict[str, float] = {}
    errors: list[dict[str, Any]] = []
    budget = memory_budget(config)
    with _Pool(threads, config.timeout_s, str(bundle.root)) as pool:
        # The GEMM probes run alone on the machine, in the reference's worker when that is a PyTorch
        # one (it imports torch anyway), before any other worker starts.
        logger.info("measuring the machine's GEMM peak ...")
        t0 = time.perf_counter()
        host = reference.name if reference.backend == "torch" else "peak"
        pool.start([(host, _setup(reference) if host == reference.name else {"variant": None})])
        peak = measure_peak(pool.get(host), config.peak_max_n)
        peak["measured_in"] = f"worker of {host}"
        phases["peak_s"] = time.perf_counter() - t0
        variants, skipped = select_variants(available, reasons, config, facts, peak)
        logger.info("variants: %s", ", ".join(v.name for v in variants))
        for s in skipped:
            logger.info("skipped %s: %s", s["variant"], s["reason"])

        size = config.size or _native_size(bundle)
        components = _components_to_run(bundle, variants, config)
        comp_rows = []
        t0 = time.perf_counter()
        if components:
            comp_rows = _bench_components(
                bundle, variants, components, config, pool, size, peak, budget, errors
            )
        phases["components_s"] = time.perf_counter() - t0
        task_rows = []
        t0 = time.perf_counter()
        if config.tasks:
            task_rows = _bench_tasks(bundle, variants, config, pool, size, budget, errors, skipped)
        phases["tasks_s"] = time.perf_counter() - t0

    report = {
        "schema": SCHEMA,
        "kind": "sdkiln-bench",
        "created": started.isoformat(timespec="seconds"),
        "duration_s": round((_dt.datetime.now(_dt.UTC) - started).total_seconds(), 1),
        "phases_s": {k: round(v, 2) for k, v in phases.items()},
        "bundle": {
            "path": str(bundle.root),
            "name": bundle.name,
            "digest": bundle.manifest.get("digest"),
            "family": bundle.family(),
            "sections": {s: e.get("kind") for s, e in sorted(bundle.sections.items())},
        },
        "config": {
            "threads": threads,
            "threads_source": "--threads" if config.threads else "physical cores",
            "repeat": config.repeat,
            "warmup": config.warmup,
            "order": "interleaved: after warm-up, each round runs every variant once, in the same order",
            "size": size,
            "batch": config.batch,
            "steps": config.steps,
            "reference": config.reference,
            "seed": config.seed,
            "settle_s": config.settle_s,
            "memory_budget_bytes": budget,
            "backends": list(config.backends) if config.backends else None,
            "components": list(config.components) if config.components else None,
            "tasks": list(config.tasks),
        },
        "machine": facts,
        "peak": peak,
        "variants": [asdict(v) for v in variants],
        "skipped": skipped,
        "components": comp_rows,
        "tasks": task_rows,
        "errors": errors,
        "memory_method": _MEMORY_METHOD,
    }
    report["recommendation"] = recommend(report)
    return report


_MEMORY_METHOD = (
    "peak_rss_bytes: the worker process's VmHWM, reset (/proc/self/clear_refs) before the component is "
    "loaded and read after its timed runs: load + warm-up + runs, including the interpreter and libraries "
    "(baseline_rss_bytes, measured just before loading). Where the reset is not allowed, the high-water "
    "mark is cumulative over the worker's life (memory_reset: false)."
)


def _native_size(bundle: Bundle) -> int:
    from sdkiln.stages.families import get_family

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
    chosen: list[Variant] = []
    skipped = [{"variant": n, "reason": r} for n, r in reasons.items() if config.backends is None]
    if config.backends is None:
        for name in (*DEFAULT_TORCH, *onnx_sections):
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
        if base in available and not preset:
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
    entry = bundle.sections[section]
    precision = (entry.get("params") or {}).get("precision") or section.rsplit("/", 1)[-1]
    return Variant(
        section, "onnxruntime", section, str(precision), {"preset": "default"}, f"ONNX Runtime CPU, {section}"
    )


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
# Inputs, parity and statistics (parent side, numpy only)


def make_inputs(
    component: str, spec_inputs: list[dict[str, Any]], bindings: dict[str, int], seed: int, vocab_size: int
) -> dict[str, Any]:
    """Seeded inputs for one component from its manifest I/O spec, in the ranges the runtime feeds."""
    import numpy as np

    from sdkiln.stages.families import resolve_shape

    rng = np.random.default_rng(seed)
    base = base_component(component)
    out: dict[str, Any] = {}
    for t in spec_inputs:
        name, dtype = t["name"], np.dtype(t.get("dtype", "float32"))
        shape = resolve_shape(t["shape"], bindings)
        if name == "input_ids":
            v = rng.integers(0, vocab_size, size=shape)
        elif name == "timestep":
            v = np.full(shape, 499.0)  # mid-schedule; the value does not change the compute
        elif name == "conditioning_scale":
            v = np.ones(shape)
        elif name == "controlnet_cond":
            v = rng.random(shape)
        elif name == "time_ids":
            h, w = bindings["height"], bindings["width"]
            v = np.tile(np.array([h, w, 0, 0, h, w], dtype=np.float64), (shape[0], 1))
        elif name == "sample" and base in ("vae_encoder", "taesd_encoder"):
            v = rng.uniform(-1.0, 1.0, size=shape)
        elif "residual" in name:
            v = rng.standard_normal(shape) * 0.1
        else:
            v = rng.standard_normal(shape)
        out[name] = np.ascontiguousarray(v.astype(dtype))
    return out


def parity(reference: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    """Worst-case agreement over the outputs both have: max abs, cosine, SQNR (dB; None if identical)."""
    import numpy as np

    names = [n for n in reference if n in outputs]
    if not names:
        return {"outputs": [], "max_abs": None, "cosine": None, "sqnr_db": None}
    max_abs, cosine, sqnr = 0.0, 1.0, math.inf
    for n in names:
        r = reference[n].astype(np.float64).ravel()
        x = outputs[n].astype(np.float64).ravel()
        if r.shape != x.shape:
            return {"outputs": names, "max_abs": None, "cosine": None, "sqnr_db": None, "shape_mismatch": n}
        d = x - r
        max_abs = max(max_abs, float(np.max(np.abs(d))) if d.size else 0.0)
        den = float(np.linalg.norm(r) * np.linalg.norm(x))
        cosine = min(cosine, float(r @ x) / den if den else (1.0 if not d.any() else 0.0))
        noise = float(d @ d)
        sqnr = min(sqnr, 10 * math.log10(float(r @ r) / noise) if noise else math.inf)
    return {
        "outputs": names,
        "max_abs": max_abs,
        "cosine": cosine,
        "sqnr_db": None if math.isinf(sqnr) else sqnr,
    }


def parity_floor(family: str, component: str, precision: str) -> dict[str, float] | None:
    """The family's tolerance for a component at a precision (fp32: max abs + cosine; others: SQNR)."""
    from sdkiln.stages.families import get_family

    spec = get_family(family).components.get(base_component(component))
    if spec is None:
        return None
    tol = spec.tolerance
    if precision == "fp32":
        return {"max_abs": tol.fp32_max_abs, "min_cosine": tol.fp32_min_cosine}
    # bf16/bf32 keep fp16's SQNR floor (fewer mantissa bits, same use); int8 variants (int8-static...)
    # take the int8 one.
    key = (
        "fp16"
        if precision in ("bf16", "bf32", "fp16")
        else "int8"
        if precision.startswith("int8")
        else precision
    )
    floor = tol.min_sqnr_db.get(key)
    return {"min_sqnr_db": floor} if floor is not None else None


def judge(p: dict[str, Any], floor: dict[str, float] | None) -> bool | None:
    """Whether a parity result meets its floor (None: no floor known or nothing compared)."""
    if floor is None or p.get("max_abs") is None:
        return None
    ok = True
    if "max_abs" in floor:
        ok &= p["max_abs"] <= floor["max_abs"]
    if "min_cosine" in floor:
        ok &= p["cosine"] >= floor["min_cosine"]
    if "min_sqnr_db" in floor:
        ok &= p["sqnr_db"] is None or p["sqnr_db"] >= floor["min_sqnr_db"]
    return bool(ok)


def psnr(reference: Any, image: Any) -> float | None:
    """PSNR in dB of two [0, 1] pixel arrays (None if identical)."""
    import numpy as np

    mse = float(np.mean((reference.astype(np.float64) - image.astype(np.float64)) ** 2))
    return None if mse == 0 else 10 * math.log10(1.0 / mse)


def summarize(samples: list[float]) -> dict[str, Any]:
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "samples_s": list(samples),
    }


# --------------------------------------------------------------------------------------------------
# Workers (parent side)


class WorkerError(BuildError):
    """A worker failed (its traceback is in the message)."""


class Worker:
    """A child process that runs one variant; pickled ``(op, kwargs)`` in, ``(status, value)`` out.

    The child's stdout is its message channel (its own prints go to stderr), so library noise cannot
    corrupt it. The child's thread environment is set before it imports anything.
    """

    def __init__(self, label: str, threads: int, timeout_s: float):
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
        env["PYTHONUNBUFFERED"] = "1"
        # Progress bars and info logs of the model libraries would interleave with the parent's log.
        for var, value in (
            ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
            ("TRANSFORMERS_VERBOSITY", "error"),
            ("DIFFUSERS_VERBOSITY", "error"),
        ):
            env.setdefault(var, value)
        self.label = label
        self.timeout_s = timeout_s
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sdkiln.stages.bench", "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )

    def call(self, op: str, timeout_s: float | None = None, **kwargs: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            pickle.dump((op, kwargs), self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.proc.stdin.flush()
        except BrokenPipeError as e:
            raise WorkerError(f"{self.label}: worker exited (code {self.proc.poll()})") from e
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s or self.timeout_s)
        if not ready:
            self.close(kill=True)
            raise WorkerError(
                f"{self.label}: {op} took longer than {timeout_s or self.timeout_s:.0f} s; killed"
            )
        try:
            status, value = pickle.load(self.proc.stdout)
        except EOFError as e:
            code = self.proc.wait()
            raise WorkerError(
                f"{self.label}: worker died during {op} (exit code {code}; out of memory?)"
            ) from e
        if status != "ok":
            raise WorkerError(f"{self.label}: {op} failed:\n{value}")
        return value

    def close(self, kill: bool = False) -> None:
        if self.proc.poll() is not None:
            return
        if not kill:
            with contextlib.suppress(Exception):
                self.call("exit", timeout_s=30)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class _Pool:
    """Worker processes by name, kept for the whole run: a variant's worker serves its components and
    then its end-to-end runs (one torch/diffusers import per variant, not per phase)."""

    def __init__(self, threads: int, timeout_s: float, bundle: str):
        self.threads = threads
        self.timeout_s = timeout_s
        self.bundle = bundle
        self.workers: dict[str, Worker] = {}

    def __enter__(self) -> _Pool:
        return self

    def __exit__(self, *exc: Any) -> None:
        for w in self.workers.values():
            w.close()

    def start(self, items: list[tuple[str, dict[str, Any]]]) -> None:
        """Start the named workers not running yet (all processes first, so their imports overlap),
        then set each up."""
        new = []
        for name, setup in items:
            old = self.workers.get(name)
            if old is not None and old.proc.poll() is None:
                continue
            self.workers[name] = Worker(name, self.threads, self.timeout_s)
            new.append((self.workers[name], setup))
        for w, setup in new:
            w.call("setup", threads=self.threads, bundle=self.bundle, **setup)

    def get(self, name: str) -> Worker:
        return self.workers[name]


def _setup(v: Variant) -> dict[str, Any]:
    return {"variant": asdict(v)}


def measure_peak(worker: Worker, max_n: int) -> dict[str, Any]:
    """GEMM FLOP/s probes (numpy, torch fp32/bf16, ORT fp32/int8) in ``worker``; the best per dtype."""
    probes = worker.call("peak", max_n=max_n)
    by_dtype: dict[str, float] = {}
    for p in probes:
        if p.get("flops_per_s"):
            by_dtype[p["dtype"]] = max(by_dtype.get(p["dtype"], 0.0), p["flops_per_s"])
    return {
        "method": "square GEMMs (2*n^3 FLOPs), n doubling from 256 while one call takes < 0.25 s, best of 3",
        "probes": probes,
        "by_dtype": by_dtype,
        "fp32_flops_per_s": by_dtype.get("fp32"),
    }


# --------------------------------------------------------------------------------------------------
# Interleaving and memory groups

WORKER_OVERHEAD_BYTES = 600 * 2**20  # interpreter, libraries and activations per worker (estimate)
ORT_WEIGHT_FACTOR = 1.5  # ONNX Runtime keeps prepacked copies of MatMul weights beside the originals


def estimate_bytes(bundle: Bundle, v: Variant, components: list[str]) -> int:
    """What holding ``components`` costs a variant's worker, roughly: weights on disk (times ORT's
    prepacking factor) plus a fixed per-worker overhead. Only used to keep co-resident variants
    inside the memory budget; the report's memory numbers are measured."""
    folders: dict[str, int] = {}
    for c in components:
        if v.backend == "onnxruntime":
            folders[c] = int(ORT_WEIGHT_FACTOR * artifact_bytes(bundle, v, c))
        else:  # a VAE folder serves encoder and decoder: count it once
            folders[torch_folder(c)] = artifact_bytes(bundle, v, c)
    return sum(folders.values()) + WORKER_OVERHEAD_BYTES


def plan_groups(reference: str, estimates: dict[str, int], budget: int) -> list[list[str]]:
    """Split the variants into groups that fit ``budget`` together with the reference, which is in
    every group (each variant is interleaved with a reference measured beside it). Order is kept."""
    groups: list[list[str]] = []
    current, used = [reference], estimates[reference]
    for name, need in estimates.items():
        if name == reference:
            continue
        if used + need > budget and len(current) > 1:
            groups.append(current)
            current, used = [reference], estimates[reference]
        current.append(name)
        used += need
    groups.append(current)
    return groups


def memory_budget(config: BenchConfig) -> int:
    """Bytes the co-resident workers may use: ``--memory-budget`` or 80% of MemAvailable now."""
    if config.memory_budget_gb:
        return int(config.memory_budget_gb * 2**30)
    m = re.search(r"MemAvailable:\s+(\d+) kB", _read("/proc/meminfo"))
    return int(0.8 * int(m.group(1)) * 1024) if m else 2**40


def _interleave(
    calls: dict[str, Any], config: BenchConfig, failed: set[str], on_error: Any
) -> dict[str, list[Any]]:
    """Warm-up rounds, then timed rounds; each round calls every member once, in order (A B C A B C).
    A member that fails is dropped from later rounds; ``on_error(name, exc)`` records it."""
    out: dict[str, list[Any]] = {name: [] for name in calls}
    for i in range(config.warmup + config.repeat):
        for name, fn in calls.items():
            if name in failed:
                continue
            time.sleep(config.settle_s)
            try:
                value = fn()
            except WorkerError as e:
                failed.add(name)
                on_error(name, e)
                continue
            if i >= config.warmup:
                out[name].append(value)
    return out


# --------------------------------------------------------------------------------------------------
# Components


def _bench_components(
    bundle: Bundle,
    variants: list[Variant],
    components: list[str],
    config: BenchConfig,
    pool: _Pool,
    size: int,
    peak: dict[str, Any],
    budget: int,
    errors: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    f = 8
    bindings = {
        "batch": config.batch,
        "height": size,
        "width": size,
        "latent_height": size // f,
        "latent_width": size // f,
    }
    pool.start([(v.name, _setup(v)) for v in variants])
    rows = []
    for component in components:
        row = _bench_component(bundle, variants, pool, component, config, bindings, peak, budget, errors)
        if row is not None:
            rows.append(row)
    return rows


def _vocab_size(bundle: Bundle) -> int:
    ref = bundle.reference_section()
    for section in [ref, *bundle.of_kind("onnx")]:
        p = bundle.root / section / "text_encoder" / "config.json" if section else None
        if p is not None and p.is_file():
            return int(json.loads(p.read_text()).get("vocab_size", 49408))
    return 49408


def _spec_for(bundle: Bundle, variants: list[Variant], component: str) -> dict[str, Any] | None:
    # ONNX sections carry the export's own spec (with residual inputs where exported with them); the
    # reference then gets the same inputs.
    for v in variants:
        if v.backend == "onnxruntime" and component in bundle.components(v.section):
            return bundle.components(v.section)[component]
    for v in variants:
        if component in bundle.components(v.section):
            return bundle.components(v.section)[component]
    return None


def _bench_component(
    bundle: Bundle,
    variants: list[Variant],
    pool: _Pool,
    component: str,
    config: BenchConfig,
    bindings: dict[str, int],
    peak: dict[str, Any],
    budget: int,
    errors: list[dict[str, Any]],
) -> dict[str, Any] | None:
    ref_name = config.reference
    spec = _spec_for(bundle, variants, component)
    if spec is None:
        return None
    feeds = make_inputs(component, spec["inputs"], bindings, config.seed, _vocab_size(bundle))
    label = component_label(component)
    logger.info("%s: %s", label, ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items()))
    members = {v.name: v for v in variants if component in bundle.components(v.section)}
    if ref_name not in members:
        errors.append(
            {"variant": ref_name, "component": component, "stage": "reference", "error": "no such component"}
        )
        return None
    estimates = {n: estimate_bytes(bundle, v, [component]) for n, v in members.items()}
    groups = plan_groups(ref_name, estimates, budget)
    if len(groups) > 1:
        logger.info("%s: %d groups to stay within %s: %s", label, len(groups), _fmt_bytes(budget), groups)

    failed: set[str] = set()
    loaded: dict[str, dict[str, Any]] = {}
    samples: dict[str, list[float]] = {}
    ref_samples: dict[str, list[float]] = {}  # per variant: the reference's samples of its group
    results: dict[str, dict[str, Any]] = {}
    outputs: dict[str, dict[str, Any]] = {}

    def on_error(stage: str) -> Any:
        def record(name: str, e: Exception) -> None:
            _record_error(errors, name, component, stage, e)

        return record

    for gi, group in enumerate(groups):
        for name in group:
            if name in loaded or name in failed:
                continue
            try:
                loaded[name] = pool.get(name).call("load", component=component, feeds=feeds)
            except WorkerError as e:
                failed.add(name)
                on_error("load")(name, e)
        if ref_name in failed:
            return None
        calls = {
            n: (lambda w=pool.get(n): w.call("run", n=1)[0]) for n in group if n in loaded and n not in failed
        }
        got = _interleave(calls, config, failed, on_error("run"))
        if ref_name in failed:
            return None
        samples.setdefault(ref_name, []).extend(got[ref_name])
        for name in group:
            if name == ref_name or name in failed:
                continue
            samples[name] = got[name]
            ref_samples[name] = got[ref_name]
        for name in group:
            if name in failed or name in results or (name == ref_name and gi > 0):
                continue
            w = pool.get(name)
            try:
                mem = w.call("memory")
                outputs[name] = w.call("outputs")
            except WorkerError as e:
                failed.add(name)
                on_error("outputs")(name, e)
                continue
            results[name] = {
                "variant": name,
                "backend": members[name].backend,
                "precision": _precision(bundle, members[name], component),
                "group": gi,
                **loaded[name],
                **mem,
            }
            if name != ref_name:  # free it before the next group loads
                with contextlib.suppress(WorkerError):
                    w.call("unload")
    if ref_name not in results:
        return None
    flops = None
    try:  # after the memory readings: classic attention's score matrices are not the reference's cost
        flops = pool.get(ref_name).call("flops")
    except WorkerError as e:
        _record_error(errors, ref_name, component, "flops", e)
    with contextlib.suppress(WorkerError):
        pool.get(ref_name).call("unload")

    ref_samples[ref_name] = samples[ref_name]
    family = bundle.family()
    fp32_peak = peak.get("fp32_flops_per_s")
    rows = []
    for name in members:
        if name not in results:
            continue
        r = results[name]
        stats = summarize(samples[name])
        ref_median = statistics.median(ref_samples[name])
        p = parity(outputs[ref_name], outputs[name])
        floor = None if name == ref_name else parity_floor(family, component, r["precision"])
        flops_per_s = flops / stats["median_s"] if flops else None
        dtype_peak = (peak.get("by_dtype") or {}).get(_peak_dtype(r["precision"]))
        rows.append(
            {
                **r,
                **stats,
                "reference_samples_s": ref_samples[name],
                "reference_median_s": ref_median,
                "ratio_to_reference": stats["median_s"] / ref_median,
                "artifact_bytes": artifact_bytes(bundle, members[name], component),
                "flops_per_s": flops_per_s,
                "fraction_of_fp32_peak": flops_per_s / fp32_peak if flops_per_s and fp32_peak else None,
                "fraction_of_dtype_peak": flops_per_s / dtype_peak if flops_per_s and dtype_peak else None,
                "parity": {**p, "floor": floor, "ok": True if name == ref_name else judge(p, floor)},
            }
        )
    ok_rows = [r for r in rows if r["parity"]["ok"]]
    best = min(ok_rows, key=lambda r: r["ratio_to_reference"]) if ok_rows else None
    logger.info(
        "%s: %s",
        label,
        "  ".join(f"{r['variant']} {_fmt_s(r['median_s'])} ({r['ratio_to_reference']:.2f}x)" for r in rows),
    )
    return {
        "component": component,
        "label": label,
        "inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in feeds.items()},
        "reference": ref_name,
        "reference_median_s": statistics.median(samples[ref_name]),
        "groups": groups,
        "memory_estimates_bytes": estimates,
        "flops": flops,
        "flops_method": "torch.utils.flop_counter.FlopCounterMode on the fp32 reference, classic attention "
        "(AttnProcessor / eager): matmuls and convolutions, 2 FLOPs per multiply-add",
        "weight_bytes_reference": results[ref_name].get("weight_bytes"),
        "results": rows,
        "best": best["variant"] if best else None,
        "best_ratio": best["ratio_to_reference"] if best else None,
    }


def _precision(bundle: Bundle, v: Variant, component: str) -> str:
    """The component's own precision where the section says (an int8 section keeps its VAE decoder
    fp32), else the variant's."""
    if v.backend == "onnxruntime":
        own = (bundle.components(v.section).get(component) or {}).get("precision")
        if own:
            return str(own)
    return v.precision


def _peak_dtype(precision: str) -> str:
    return "int8" if precision.startswith("int8") else "bf16" if precision == "bf16" else "fp32"


def _record_error(errors: list[dict[str, Any]], variant: str, what: str, stage: str, e: Exception) -> None:
    logger.warning("%s on %s failed at %s: %s", variant, what, stage, str(e).splitlines()[0])
    errors.append({"variant": variant, "component": what, "stage": stage, "error": str(e)})


# --------------------------------------------------------------------------------------------------
# End to end (through the runtime)

# What each task runs, for the memory estimate (text encoders are added per family).
TASK_COMPONENTS = {
    "sketch": ("unet", "controlnet.scribble", "vae_decoder"),
    "text": ("unet", "vae_decoder"),
    "edit": ("unet", "controlnet.canny", "vae_encoder", "vae_decoder"),
}


def runtime_gap() -> str | None:
    """Why the runtime cannot run tasks here (None: it can)."""
    try:
        from sdkiln.runtime import load as _load  # noqa: F401
        from sdkiln.runtime.tasks import edit_request, sketch_request, text_request  # noqa: F401
    except ImportError as e:
        return f"sdkiln.runtime is not usable here ({e})"
    return None


@dataclass(frozen=True)
class TaskRun:
    """One end-to-end configuration: a runtime backend over a section, with the full VAE or TAESD.
    ``worker`` names the variant whose process runs it (a +taesd run shares its base's sessions)."""

    name: str
    worker: str
    backend: str  # runtime backend: "torch" | "onnx"
    section: str
    dtype: str
    vae: str  # "full" | "tiny"


def _task_runs(bundle: Bundle, variants: list[Variant], config: BenchConfig) -> list[TaskRun]:
    out = []
    for v in variants:
        if v.backend == "torch":
            dtype = TORCH_VARIANTS[v.name].runtime_dtype if v.name in TORCH_VARIANTS else None
            if dtype is not None:
                out.append(TaskRun(v.name, v.name, "torch", v.section, dtype, "full"))
        elif v.settings.get("preset", "default") == "default":  # the runtime has no session presets
            out.append(TaskRun(v.name, v.name, "onnx", v.section, "float32", "full"))
            if config.taesd_e2e and "taesd_decoder" in bundle.components(v.section):
                out.append(TaskRun(f"{v.name}+taesd", v.name, "onnx", v.section, "float32", "tiny"))
    return out


def _task_params(
    task: str, bundle: Bundle, config: BenchConfig, size: int
) -> tuple[dict[str, Any] | None, str]:
    """The request a task benchmark makes, or None and why the bundle cannot run it."""
    comps: set[str] = set()
    for s in bundle.sections:
        comps |= set(bundle.components(s))
    common = {"steps": config.steps, "seed": config.seed, "height": size, "width": size}
    if task == "sketch":
        if "controlnet.scribble" not in comps:
            return None, "the bundle has no scribble ControlNet"
        return {**common, "prompt": "a lighthouse on a cliff, watercolor"}, ""
    if task == "text":
        return {**common, "prompt": "a lighthouse on a cliff at dusk, oil painting"}, ""
    if task == "edit":
        control = "canny" if "controlnet.canny" in comps else None
        return {**common, "prompt": "the same scene in winter", "strength": 0.6, "control": control}, ""
    raise UserError(f"unknown task {task!r}; choose from: {', '.join(TASKS)}")


def _bench_tasks(
    bundle: Bundle,
    variants: list[Variant],
    config: BenchConfig,
    pool: _Pool,
    size: int,
    budget: int,
    errors: list[dict[str, Any]],
    skipped: list[dict[str, str]],
) -> list[dict[str, Any]]:
    gap = runtime_gap()
    if gap:
        skipped.append({"variant": "tasks", "reason": gap})
        logger.warning("end-to-end tasks skipped: %s", gap)
        return []
    runs = _task_runs(bundle, variants, config)
    if config.reference not in [r.name for r in runs]:
        skipped.append(
            {"variant": "tasks", "reason": f"the runtime has no configuration for {config.reference}"}
        )
        return []
    # A variant's component worker serves its end-to-end runs too (one import of torch per variant).
    pool.start([(r.worker, {"variant": None, "use_torch": r.backend == "torch"}) for r in runs])
    by_name = {v.name: v for v in variants}
    rows = []
    for task in config.tasks:
        params, why = _task_params(task, bundle, config, size)
        if params is None:
            skipped.append({"variant": f"task {task}", "reason": why})
            continue
        row = _bench_task(task, params, bundle, runs, by_name, pool, config, budget, errors)
        if row is not None:
            rows.append(row)
    return rows


def _bench_task(
    task: str,
    params: dict[str, Any],
    bundle: Bundle,
    runs: list[TaskRun],
    variants: dict[str, Variant],
    pool: _Pool,
    config: BenchConfig,
    budget: int,
    errors: list[dict[str, Any]],
) -> dict[str, Any] | None:
    """One task: each worker loads a fresh pipeline (only this task's components get loaded), the
    runs take turns, then the workers drop their pipelines before the next group or task."""
    from sdkiln.stages.families import get_family

    ref_name = config.reference
    ref_worker = next(r.worker for r in runs if r.name == ref_name)
    tes = list(get_family(bundle.family()).text_encoders)
    used = [*tes, *(c for c in TASK_COMPONENTS[task] if c != "controlnet.canny" or params.get("control"))]
    workers = list(dict.fromkeys(r.worker for r in runs))
    estimates = {
        w: estimate_bytes(
            bundle, variants[w], [c for c in used if c in bundle.components(variants[w].section)]
        )
        for w in workers
    }
    groups = plan_groups(ref_worker, estimates, budget)
    failed: set[str] = set()
    samples: dict[str, list[dict[str, Any]]] = {}
    ref_samples: dict[str, list[float]] = {}
    pixels: dict[str, Any] = {}
    mems: dict[str, dict[str, Any]] = {}
    loaded: set[str] = set()

    def record(stage: str) -> Any:
        return lambda name, e: _record_error(errors, name, f"task {task}", stage, e)

    for gi, group in enumerate(groups):
        for w_name in group:
            if w_name in loaded:
                continue
            wr = [r for r in runs if r.worker == w_name]
            try:
                pool.get(w_name).call(
                    "load_runtime",
                    backend=wr[0].backend,
                    section=wr[0].section,
                    dtype=wr[0].dtype,
                    vaes=[r.vae for r in wr],
                )
                loaded.add(w_name)
            except WorkerError as e:
                failed.update(r.name for r in wr)
                record("load")(w_name, e)
        members = [r for r in runs if r.worker in group and r.name not in failed]
        calls = {
            r.name: (
                lambda w=pool.get(r.worker), vae=r.vae: w.call("run_task", task=task, params=params, vae=vae)
            )
            for r in members
        }
        got = _interleave(calls, config, failed, record("run"))
        if ref_name in failed:
            return None
        samples.setdefault(ref_name, []).extend(got[ref_name])
        ref_times = [x["seconds"] for x in got[ref_name]]
        for r in members:
            if r.name in failed or r.name == ref_name:
                continue
            samples[r.name] = got[r.name]
            ref_samples[r.name] = ref_times
        for r in members:
            if r.name in failed or r.name in pixels:
                continue
            try:
                pixels[r.name] = pool.get(r.worker).call("task_pixels", vae=r.vae)
            except WorkerError as e:
                failed.add(r.name)
                record("outputs")(r.name, e)
        for w_name in group:
            if w_name not in loaded or (w_name == ref_worker and gi < len(groups) - 1):
                continue
            w = pool.get(w_name)
            try:
                mem = w.call("memory")
            except WorkerError as e:
                record("memory")(w_name, e)
                mem = {}
            for r in runs:
                if r.worker == w_name:
                    mems[r.name] = {**mem, "memory_shared_with": [x.name for x in runs if x.worker == w_name]}
            with contextlib.suppress(WorkerError):
                w.call("unload")
            loaded.discard(w_name)
    if ref_name not in pixels:
        return None
    ref_samples[ref_name] = [x["seconds"] for x in samples[ref_name]]
    rows = []
    for r in runs:
        if r.name not in pixels or r.name not in samples:
            continue
        seconds = [x["seconds"] for x in samples[r.name]]
        stats = summarize(seconds)
        ref_median = statistics.median(ref_samples[r.name])
        stages = {
            k: statistics.median(x["timings"][k] for x in samples[r.name] if k in x["timings"])
            for k in sorted({k for x in samples[r.name] for k in x["timings"]})
        }
        rows.append(
            {
                "variant": r.name,
                "backend": r.backend,
                "section": r.section,
                "dtype": r.dtype,
                "vae": r.vae,
                "group": next(i for i, g in enumerate(groups) if r.worker in g),
                **stats,
                "reference_samples_s": ref_samples[r.name],
                "reference_median_s": ref_median,
                "ratio_to_reference": stats["median_s"] / ref_median,
                "stages_median_s": stages,
                "psnr_db_vs_reference": psnr(pixels[ref_name], pixels[r.name]),
                **mems.get(r.name, {}),
            }
        )
    logger.info(
        "task %s: %s",
        task,
        "  ".join(f"{r['variant']} {_fmt_s(r['median_s'])} ({r['ratio_to_reference']:.2f}x)" for r in rows),
    )
    best = min(rows, key=lambda r: r["ratio_to_reference"])
    return {
        "task": task,
        "params": params,
        "reference": ref_name,
        "reference_median_s": statistics.median(ref_samples[ref_name]),
        "groups": groups,
        "memory_estimates_bytes": estimates,
        "results": rows,
        "fastest": best["variant"],
        "fastest_ratio": best["ratio_to_reference"],
        "notes": "peak RSS: the worker's, over loading this task's pipeline(s) and every call of the task; "
        "a +taesd run shares its base's process and sessions, so they share one reading. PSNR of a +taesd "
        "run compares a different decoder (TAESD) with the reference's full VAE.",
    }


# The speed target: the best CPU configuration at <= 0.33x the PyTorch eager fp32 time.
TARGET_RATIO = 0.33


def recommend(report: dict[str, Any]) -> dict[str, Any]:
    """What a runtime picking its configuration on this machine should choose, and whether it meets
    the speed target: per component the fastest variant whose outputs meet the family's floors; per
    task the fastest run whose components all met them (``components_parity_ok`` on each task result:
    None where a component was not measured)."""
    from sdkiln.stages.families import get_family

    ok = {
        (row["component"], r["variant"]): r["parity"]["ok"]
        for row in report["components"]
        for r in row["results"]
    }
    tes = list(get_family(report["bundle"]["family"]).text_encoders)
    out: dict[str, Any] = {"target_ratio": TARGET_RATIO, "components": {}, "tasks": {}}
    for row in report["components"]:
        if row["best"]:
            out["components"][row["component"]] = {
                "variant": row["best"],
                "ratio_to_reference": row["best_ratio"],
                "meets_target": row["best_ratio"] <= TARGET_RATIO,
            }
    for row in report["tasks"]:
        used = [*tes, *TASK_COMPONENTS[row["task"]]]
        if not row["params"].get("control"):
            used = [c for c in used if c != "controlnet.canny"]
        for r in row["results"]:
            base = r["variant"].removesuffix("+taesd")
            comps = [("taesd_decoder" if c == "vae_decoder" and r["vae"] == "tiny" else c) for c in used]
            verdicts = [ok.get((c, base)) for c in comps]
            r["components_parity_ok"] = (
                False if False in verdicts else True if all(v is True for v in verdicts) else None
            )
        fine = [r for r in row["results"] if r["components_parity_ok"] is not False]
        if fine:
            best = min(fine, key=lambda r: r["ratio_to_reference"])
            out["tasks"][row["task"]] = {
                "variant": best["variant"],
                "ratio_to_reference": best["ratio_to_reference"],
                "components_parity_ok": best["components_parity_ok"],
                "meets_target": best["ratio_to_reference"] <= TARGET_RATIO,
            }
    return out


# --------------------------------------------------------------------------------------------------
# Writing: JSON, Markdown, PNG


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_bytes(n: float | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _fmt_parity(p: dict[str, Any], reference: bool) -> str:
    if reference:
        return "reference"
    if p.get("max_abs") is None:
        return "-"
    mark = {True: "ok", False: "BELOW FLOOR", None: ""}[p.get("ok")]
    q = "identical" if p.get("sqnr_db") is None else f"SQNR {p['sqnr_db']:.1f} dB"
    return f"{q}, max abs {p['max_abs']:.1e} {mark}".strip()


def to_markdown(report: dict[str, Any], chart: str | None = None) -> str:
    """The report as Markdown: machine line, one table for components, one for tasks."""
    m, c, pk = report["machine"], report["config"], report["peak"]
    isa = ", ".join(k for k, v in m["isa"].items() if v) or "none listed"
    fp32 = pk.get("fp32_flops_per_s")
    lines = [
        f"### `{report['bundle']['name']}` on {m['cpu_model']} ({report['created']})",
        "",
        f"{m['physical_cores']} physical cores, {c['threads']} thread(s) ({c['threads_source']}); ISA: {isa}; "
        f"GPU: {', '.join(g['name'] for g in m['gpu']) if m.get('gpu') else 'none'}. "
        f"Measured GEMM peak: "
        + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in sorted(pk.get("by_dtype", {}).items()))
        + f". {c['size']}x{c['size']} px, batch {c['batch']}; {c['warmup']} warm-up + {c['repeat']} "
        "interleaved rounds; ratio = median / reference median of this run.",
        "",
    ]
    if report["components"]:
        lines += [
            "| component | variant | median | min - max | x ref | peak RSS | artifact | GFLOP | GFLOP/s | % fp32 peak | parity vs reference |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in report["components"]:
            for i, r in enumerate(row["results"]):
                gflop = f"{row['flops'] / 1e9:.3g}" if row["flops"] and i == 0 else ""
                fps = f"{r['flops_per_s'] / 1e9:.1f}" if r["flops_per_s"] else "-"
                frac = f"{r['fraction_of_fp32_peak']:.0%}" if r["fraction_of_fp32_peak"] and fp32 else "-"
                best = " **best**" if r["variant"] == row["best"] and len(row["results"]) > 1 else ""
                lines.append(
                    f"| {row['label'] if i == 0 else ''} | {r['variant']}{best} | {_fmt_s(r['median_s'])} | "
                    f"{_fmt_s(r['min_s'])} - {_fmt_s(r['max_s'])} | {r['ratio_to_reference']:.2f} | "
                    f"{_fmt_bytes(r['peak_rss_bytes'])} | {_fmt_bytes(r['artifact_bytes'])} | {gflop} | {fps} | "
                    f"{frac} | {_fmt_parity(r['parity'], r['variant'] == row['reference'])} |"
                )
        lines.append("")
    if report["tasks"]:
        lines += [
            "| task | variant | median | min - max | x ref | text / denoise / decode (median) | peak RSS | PSNR vs ref |",
            "|---|---|---:|---:|---:|---|---:|---:|",
        ]
        for row in report["tasks"]:
            for i, r in enumerate(row["results"]):
                st = r["stages_median_s"]
                parts = " / ".join(_fmt_s(st.get(k)) for k in ("text_encoder", "denoise", "vae_decoder"))
                ps = r["psnr_db_vs_reference"]
                ps_s = (
                    "reference"
                    if r["variant"] == row["reference"]
                    else ("identical" if ps is None else f"{ps:.1f} dB")
                )
                label = f"{row['task']} ({row['params'].get('steps')} steps)" if i == 0 else ""
                lines.append(
                    f"| {label} | {r['variant']} | {_fmt_s(r['median_s'])} | {_fmt_s(r['min_s'])} - "
                    f"{_fmt_s(r['max_s'])} | {r['ratio_to_reference']:.2f} | {parts} | "
                    f"{_fmt_bytes(r['peak_rss_bytes'])} | {ps_s} |"
                )
        lines.append("")
    rec = report.get("recommendation") or {}
    picks = [(component_label(c), v) for c, v in rec.get("components", {}).items()]
    picks += [(f"task {t}", v) for t, v in rec.get("tasks", {}).items()]
    if picks:
        lines += [f"Fastest with parity above the floors (target: <= {TARGET_RATIO:.2f}x the reference):", ""]
        for what, v in picks:
            met = "meets" if v["meets_target"] else "misses"
            lines.append(f"- {what}: `{v['variant']}` at {v['ratio_to_reference']:.2f}x ({met} the target)")
        lines.append("")
    if report["skipped"]:
        lines += [
            "Not measured: " + "; ".join(f"{s['variant']}: {s['reason']}" for s in report["skipped"]),
            "",
        ]
    if report["errors"]:
        lines += [
            "Failed: "
            + "; ".join(f"{e['variant']} on {e['component']} ({e['stage']})" for e in report["errors"]),
            "",
        ]
    if chart:
        lines += [f"![benchmark chart]({chart})", ""]
    return "\n".join(lines)


def write_chart(report: dict[str, Any], path: Path) -> Path:
    """A PNG: per component and per task, each variant's median as a ratio to the reference's median
    of the same run (log scale when the ratios span more than 4x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    groups = [(row["label"], row["results"]) for row in report["components"]]
    groups += [(f"task: {row['task']}", row["results"]) for row in report["tasks"]]
    n_bars = sum(len(rs) for _, rs in groups) or 1
    names = list(dict.fromkeys(r["variant"] for _, rs in groups for r in rs))
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.26 * n_bars + 0.2 * len(groups)))
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    ratios = [r["ratio_to_reference"] for _, rs in groups for r in rs] or [1.0]
    log = max(ratios) / min(ratios) > 4
    left = min(ratios) / 2 if log else 0.0
    y, ticks, labels = 0.0, [], []
    for label, rs in groups:
        start = y
        for r in rs:
            ratio = r["ratio_to_reference"]
            ax.barh(y, ratio - left, left=left, color=colors[r["variant"]], height=0.8)
            ax.text(ratio, y, f" {_fmt_s(r['median_s'])}", va="center", fontsize=7)
            y += 1
        ticks.append((start + y - 1) / 2)
        labels.append(label)
        y += 0.8
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    if log:
        ax.set_xscale("log")
    ax.set_xlim(left, max(ratios) * (2.0 if log else 1.25))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
    ax.set_xlabel(f"median time / {report['config']['reference']} median of the same run (lower is faster)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[n]) for n in names]
    ax.legend(handles, names, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    m, c = report["machine"], report["config"]
    ax.set_title(
        f"{report['bundle']['name']}: {m['cpu_model']}, {c['threads']} thread(s), {c['size']}x{c['size']} px, "
        f"{c['repeat']} interleaved rounds",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(
    report: dict[str, Any], results_dir: Path, chart: bool = True, readme: Path | None = None
) -> dict[str, Path]:
    """Write ``<timestamp>-<bundle>.json/.md/.png`` into ``results_dir`` (never overwriting an older
    run) and, if ``readme`` is given, replace its latest-results section."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = report["created"].replace(":", "").replace("-", "").replace("+0000", "Z")
    stem = f"{stamp}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', report['bundle']['name'])}"
    n = 1
    while (results_dir / f"{stem}.json").exists():  # two runs in one second: keep both
        n += 1
        stem = f"{stem.rsplit('~', 1)[0]}~{n}"
    paths = {"json": results_dir / f"{stem}.json", "md": results_dir / f"{stem}.md"}
    if chart and (report["components"] or report["tasks"]):
        paths["png"] = write_chart(report, results_dir / f"{stem}.png")
    md = to_markdown(report, chart=paths["png"].name if "png" in paths else None)
    paths["md"].write_text(md)
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
    os.replace(tmp, paths["json"])
    if readme is not None:
        rel = os.path.relpath(paths["png"], readme.parent) if "png" in paths else None
        update_readme(readme, to_markdown(report, chart=rel), os.path.relpath(paths["json"], readme.parent))
    return paths


README_START = "<!-- bench:latest:start -->"
README_END = "<!-- bench:latest:end -->"


def update_readme(readme: Path, markdown: str, json_rel: str) -> None:
    """Replace the text between the bench markers of ``readme`` (appending the markers if absent)."""
    text = readme.read_text() if readme.is_file() else ""
    block = f"{README_START}\n{markdown}\nFull report: [{json_rel}]({json_rel})\n{README_END}"
    if README_START in text and README_END in text:
        head, rest = text.split(README_START, 1)
        _, tail = rest.split(README_END, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + ("\n\n" if text else "") + "## Latest results\n\n" + block + "\n"
    readme.write_text(text)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"cannot serialise {type(o).__name__}")


# --------------------------------------------------------------------------------------------------
# CLI


def _csv(value: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in value.split(",") if x.strip())


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``sdkiln bench``."""
    s = sub.add_parser(
        "bench",
        help="benchmark a bundle's backends against the PyTorch reference",
        description="Latency, memory, size and achieved FLOP/s of a bundle's backends, each against the "
        "PyTorch reference measured in the same run (method: benchmarks/README.md).",
    )
    s.add_argument("bundle", help="a bundle folder (artifacts/<recipe>)")
    s.add_argument(
        "--backends",
        type=_csv,
        help="comma-separated variants: torch, torch-bf32, torch-bf16, torch-bf16-compile, onnx/<section>"
        "[@basic|extended|nospin] (default: all that apply on this machine; the reference always runs)",
    )
    s.add_argument("--components", type=_csv, help="e.g. unet,controlnet,vae_decoder (default: all)")
    s.add_argument(
        "--tasks", type=_csv, default=TASKS, help="sketch,text,edit (default: all); 'none' for none"
    )
    s.add_argument("--repeat", type=int, default=5, help="timed interleaved rounds (default 5)")
    s.add_argument("--warmup", type=int, default=1, help="untimed calls per variant first (default 1)")
    s.add_argument("--threads", type=int, help="intra-op threads for torch and ORT (default: physical cores)")
    s.add_argument("--size", type=int, help="image side in pixels (default: the model's native size)")
    s.add_argument("--steps", type=int, default=4, help="denoising steps per task (default 4)")
    s.add_argument(
        "--reference", default="torch", help="the variant ratios are taken against (default torch)"
    )
    s.add_argument("--no-taesd", action="store_true", help="no +taesd end-to-end variants")
    s.add_argument("--peak-max-n", type=int, default=2048, help="largest GEMM side of the peak probe")
    s.add_argument("--timeout", type=float, default=3600.0, help="seconds one worker call may take")
    s.add_argument(
        "--settle", type=float, default=0.05, help="seconds to pause before each timed call (default 0.05)"
    )
    s.add_argument(
        "--memory-budget",
        type=float,
        help="GiB the co-resident variants may use; more run in groups, each beside the reference "
        "(default: 80%% of available memory)",
    )
    s.add_argument(
        "--results-dir",
        default="benchmarks/results",
        help="where the JSON/MD/PNG go (default benchmarks/results)",
    )
    s.add_argument("--readme", help="a Markdown file whose latest-results section to replace")
    s.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    s.set_defaults(func=bench_command)


def bench_command(args: argparse.Namespace) -> int:
    """``sdkiln bench``: parse, run, write; prints the Markdown table and the result paths."""
    tasks = () if tuple(args.tasks) in (("none",), ()) else tuple(args.tasks)
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise UserError(f"--tasks: unknown {', '.join(bad)}; choose from: {', '.join(TASKS)} or none")
    if args.size is not None and (args.size <= 0 or args.size % 8):
        raise UserError(f"--size {args.size}: must be a positive multiple of 8")
    if args.steps < 1:
        raise UserError("--steps must be >= 1")
    config = BenchConfig(
        bundle=Path(args.bundle),
        backends=args.backends,
        components=args.components,
        tasks=tasks,
        repeat=args.repeat,
        warmup=args.warmup,
        threads=args.threads,
        size=args.size,
        steps=args.steps,
        reference=args.reference,
        taesd_e2e=not args.no_taesd,
        peak_max_n=args.peak_max_n,
        timeout_s=args.timeout,
        settle_s=args.settle,
        memory_budget_gb=args.memory_budget,
    )
    report = run_bench(config)
    paths = write_results(
        report,
        Path(args.results_dir),
        chart=not args.no_chart,
        readme=Path(args.readme) if args.readme else None,
    )
    print(to_markdown(report))
    for kind, p in paths.items():
        print(f"{kind}: {p}")
    return 0


# --------------------------------------------------------------------------------------------------
# Worker (child side). Everything below runs in ``python -m sdkiln.stages.bench --worker``.


def _memory() -> dict[str, int | None]:
    status = _read("/proc/self/status")
    out: dict[str, int | None] = {}
    for key in ("VmRSS", "VmHWM"):
        m = re.search(rf"{key}:\s+(\d+) kB", status)
        out[key] = int(m.group(1)) * 1024 if m else None
    return out


def _reset_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0); False where not allowed."""
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so the baseline is honest
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class _WorkerState:
    """One variant in one process: loads a component, runs it, reports times, outputs and memory."""

    def __init__(self) -> None:
        self.variant: dict[str, Any] | None = None
        self.bundle: Path | None = None
        self.threads = 1
        self.fn: Any = None
        self.model: Any = None
        self.flop_fn: Any = None
        self.last: Any = None
        self.to_numpy: Any = None
        self.pipes: dict[str, Any] = {}
        self.pixels: dict[str, Any] = {}
        self.memory_reset = False
        self.baseline: int | None = None

    # -- setup, peak ---------------------------------------------------------------------------------

    def setup(
        self,
        threads: int,
        variant: dict[str, Any] | None = None,
        bundle: str | None = None,
        use_torch: bool = True,
    ) -> dict:
        """Thread settings first; ``use_torch=False`` keeps torch out of an ONNX-only process (its RSS)."""
        self.threads = threads
        self.variant = variant
        self.bundle = Path(bundle) if bundle else None
        info: dict[str, Any] = {"threads": threads}
        if use_torch if variant is None else variant["backend"] == "torch":
            import torch

            torch.set_num_threads(threads)
            with contextlib.suppress(RuntimeError):  # allowed once, before any inter-op work
                torch.set_num_interop_threads(1)
            info["torch_threads"] = torch.get_num_threads()
        if variant is not None and variant["backend"] == "torch":
            import torch

            s = variant["settings"]
            if s.get("onednn_fp32_precision"):
                torch.backends.mkldnn.matmul.fp32_precision = s["onednn_fp32_precision"]
                torch.backends.mkldnn.conv.fp32_precision = s["onednn_fp32_precision"]
        return info

    def peak(self, max_n: int) -> list[dict[str, Any]]:
        probes = []
        import numpy as np

        probes.append(_probe("numpy matmul", "fp32", max_n, lambda n: _np_gemm(np, n, np.float32)))
        import torch

        probes.append(_probe("torch matmul", "fp32", max_n, lambda n: _torch_gemm(torch, n, torch.float32)))
        probes.append(_probe("torch matmul", "bf16", max_n, lambda n: _torch_gemm(torch, n, torch.bfloat16)))
        try:
            import onnxruntime  # noqa: F401

            probes.append(
                _probe("onnxruntime MatMul", "fp32", max_n, lambda n: _ort_gemm(n, "fp32", self.threads))
            )
            probes.append(
                _probe(
                    "onnxruntime MatMulInteger u8s8",
                    "int8",
                    max_n,
                    lambda n: _ort_gemm(n, "int8", self.threads),
                )
            )
        except ImportError as e:
            probes.append({"name": "onnxruntime", "dtype": "fp32", "error": str(e)})
        return probes

    # -- components ----------------------------------------------------------------------------------

    def load(self, component: str, feeds: dict[str, Any]) -> dict[str, Any]:
        self.unload()
        self.memory_reset = _reset_peak()
        self.baseline = _memory()["VmRSS"]
        t0 = time.perf_counter()
        assert self.variant is not None and self.bundle is not None
        if self.variant["backend"] == "torch":
            weight_bytes = self._load_torch(component, feeds)
        else:
            weight_bytes = self._load_ort(component, feeds)
        return {"load_s": time.perf_counter() - t0, "weight_bytes": weight_bytes}

    def _load_ort(self, component: str, feeds: dict[str, Any]) -> int | None:
        import onnxruntime as ort

        assert self.variant is not None and self.bundle is not None
        section = self.variant["section"]
        manifest = json.loads((self.bundle / "manifest.json").read_text())
        entry = manifest["sections"][section].get("components", {}).get(component)
        if entry is None:
            raise UserError(f"{section} has no {component}")
        s = self.variant["settings"]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if s.get("graph_optimization_level"):
            opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, s["graph_optimization_level"])
        for k, v in (s.get("config") or {}).items():
            opts.add_session_config_entry(k, v)
        session = ort.InferenceSession(
            str(self.bundle / section / entry["path"]), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        names = {i.name for i in session.get_inputs()}
        missing = names - set(feeds)
        if missing:
            raise UserError(f"{component}: the graph wants inputs the spec lacks: {sorted(missing)}")
        run_feeds = {k: v for k, v in feeds.items() if k in names}
        out_names = [o.name for o in session.get_outputs()]

        def fn() -> list[Any]:
            return session.run(out_names, run_feeds)

        self.model = session
        self.fn = fn
        self.to_numpy = lambda outs: dict(zip(out_names, outs, strict=True))
        return None

    def _load_torch(self, component: str, feeds: dict[str, Any]) -> int:
        import diffusers
        import torch
        import transformers

        from sdkiln.stages.families import get_family

        assert self.variant is not None and self.bundle is not None
        s = self.variant["settings"]
        manifest = json.loads((self.bundle / "manifest.json").read_text())
        entry = manifest["sections"][self.variant["section"]]
        family = get_family(
            (entry.get("extra") or {}).get("family") or Bundle(self.bundle, manifest).family()
        )
        base = base_component(component)
        spec = family.components[base]
        folder = self.bundle / self.variant["section"] / torch_folder(component)
        cls_name = spec.model_class
        dtype = getattr(torch, s.get("dtype", "float32"))
        if hasattr(diffusers, cls_name):
            model = getattr(diffusers, cls_name).from_pretrained(folder)
        else:
            # eager attention so the FLOP counter sees it; timing uses SDPA (set back below)
            model = getattr(transformers, cls_name).from_pretrained(folder, attn_implementation="eager")
        model = model.eval()
        if dtype != torch.float32:
            model = model.to(dtype)
        if s.get("channels_last"):
            model = model.to(memory_format=torch.channels_last)
        used = [getattr(model, m) for m in WEIGHT_MODULES.get(base, ())] or [model]
        weight_bytes = sum(p.numel() * p.element_size() for mod in used for p in mod.parameters())

        def tensor(a: Any) -> Any:
            t = torch.from_numpy(a)
            if t.is_floating_point():
                t = t.to(dtype)
                if t.dim() == 4 and s.get("channels_last"):
                    t = t.contiguous(memory_format=torch.channels_last)
            elif base.startswith("text_encoder"):
                t = t.long()
            return t

        x = {k: tensor(v) for k, v in feeds.items()}
        call, names = _torch_call(base, model, x, [o for o in _outputs_of(manifest, self.variant, component)])
        self.model = model
        self.flop_fn = call
        self.fn = call
        if s.get("compile"):
            # Compile now, inside load: no timed call (even with --warmup 0) pays for it.
            self.fn = torch.compile(call)
            with torch.inference_mode():
                self.fn()
        self.to_numpy = lambda outs: {n: o.float().numpy() for n, o in zip(names, outs, strict=True)}
        if hasattr(model, "set_attn_implementation") and not hasattr(diffusers, cls_name):
            model.set_attn_implementation("sdpa")
        return weight_bytes

    def run(self, n: int) -> list[float]:
        times = []
        ctx = _inference_mode(self.variant)
        with ctx:
            for _ in range(n):
                t0 = time.perf_counter()
                out = self.fn()
                times.append(time.perf_counter() - t0)
        self.last = out
        return times

    def outputs(self) -> dict[str, Any]:
        import numpy as np

        return {k: np.array(v, dtype=np.float32) for k, v in self.to_numpy(self.last).items()}

    def flops(self) -> int | None:
        """FLOPs of one call with classic attention (FlopCounterMode does not count SDPA)."""
        if self.flop_fn is None:
            return None
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        restore = _classic_attention(self.model)
        try:
            with torch.inference_mode(), FlopCounterMode(display=False) as counter:
                self.flop_fn()
        finally:
            restore()
        return int(counter.get_total_flops())

    def memory(self, reset: bool = False) -> dict[str, Any]:
        mem = _memory()
        out = {
            "peak_rss_bytes": mem["VmHWM"],
            "baseline_rss_bytes": self.baseline,
            "memory_reset": self.memory_reset,
            "gpu_peak_bytes": _gpu_peak(),
        }
        if reset:
            self.memory_reset = _reset_peak()
        return out

    def unload(self) -> None:
        self.fn = self.model = self.flop_fn = self.last = self.to_numpy = None
        self.pipes, self.pixels = {}, {}

    # -- end to end ----------------------------------------------------------------------------------

    def load_runtime(self, backend: str, section: str, dtype: str, vaes: list[str]) -> dict[str, Any]:
        """A fresh runtime pipeline per VAE choice, all over one backend (TAESD shares the sessions)."""
        from sdkiln.runtime.load import load
        from sdkiln.runtime.pipeline import Pipeline

        self.unload()
        self.memory_reset = _reset_peak()
        self.baseline = _memory()["VmRSS"]
        t0 = time.perf_counter()
        assert self.bundle is not None
        first = load(
            self.bundle, backend=backend, section=section, dtype=dtype, vae=vaes[0], threads=self.threads
        )
        self.pipes = {vaes[0]: first}
        for vae in vaes[1:]:
            self.pipes[vae] = Pipeline(first.backend, first.info, vae=vae, source=first.source)
        return {"load_s": time.perf_counter() - t0}

    def run_task(self, task: str, params: dict[str, Any], vae: str) -> dict[str, Any]:
        """One task from user inputs to pixels (request building, e.g. Canny, included)."""
        from sdkiln.runtime.tasks import edit_request, sketch_request, text_request

        pipe = self.pipes[vae]
        p = dict(params)
        h, w = p["height"], p["width"]
        common = {k: p[k] for k in ("steps", "seed", "height", "width")}
        sketch, photo = _example_sketch(h, w), _example_photo(h, w)
        t0 = time.perf_counter()
        if task == "sketch":
            req = sketch_request(pipe, sketch, p["prompt"], **common)
        elif task == "text":
            req = text_request(pipe, p["prompt"], **common)
        else:
            req = edit_request(
                pipe, photo, p["prompt"], strength=p["strength"], control=p["control"], **common
            )
        result = pipe.generate(req)
        seconds = time.perf_counter() - t0
        self.pixels[vae] = result.pixels
        return {"seconds": seconds, "timings": dict(result.timings), "steps": result.steps}

    def task_pixels(self, vae: str) -> Any:
        return self.pixels[vae]


def _inference_mode(variant: dict[str, Any] | None) -> Any:
    if variant is not None and variant["backend"] == "torch":
        import torch

        return torch.inference_mode()
    return contextlib.nullcontext()


def _gpu_peak() -> int | None:
    if "torch" not in sys.modules:
        return None
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def _outputs_of(manifest: dict[str, Any], variant: dict[str, Any], component: str) -> list[str]:
    """Output names in the contract's order, from any section that lists the component."""
    sections = manifest["sections"]
    for s in [variant["section"], *sorted(sections)]:
        spec = (sections.get(s, {}).get("components") or {}).get(component)
        if spec and spec.get("outputs"):
            return [o["name"] for o in spec["outputs"]]
    return []


def _torch_call(base: str, model: Any, x: dict[str, Any], out_names: list[str]) -> tuple[Any, list[str]]:
    """A no-argument call of ``model`` on the contract inputs ``x``; returns it and its output names."""
    if base == "unet":
        kw = {k: x[k] for k in ("sample", "timestep", "encoder_hidden_states") if k in x}
        if "timestep_cond" in x:
            kw["timestep_cond"] = x["timestep_cond"]
        if "text_embeds" in x:
            kw["added_cond_kwargs"] = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
        downs = sorted(
            (k for k in x if k.startswith("down_block_additional_residual_")),
            key=lambda k: int(k.rsplit("_", 1)[1]),
        )
        if downs:
            kw["down_block_additional_residuals"] = tuple(x[k] for k in downs)
            kw["mid_block_additional_residual"] = x["mid_block_additional_residual"]
        return (lambda: (model(**kw, return_dict=False)[0],)), ["out_sample"]
    if base == "controlnet":
        kw = {k: x[k] for k in ("sample", "timestep", "encoder_hidden_states", "controlnet_cond")}
        kw["conditioning_scale"] = float(x["conditioning_scale"].reshape(-1)[0])
        if "text_embeds" in x:
            kw["added_cond_kwargs"] = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}

        def cn() -> tuple[Any, ...]:
            downs, mid = model(**kw, return_dict=False)
            return (*downs, mid)

        n = len(model.controlnet_down_blocks)
        return cn, [f"down_block_res_sample_{i}" for i in range(n)] + ["mid_block_res_sample"]
    if base.startswith("text_encoder"):
        ids = x["input_ids"]
        want = out_names or ["last_hidden_state", "pooler_output"]
        hidden = "penultimate_hidden_state" in want

        def te() -> tuple[Any, ...]:
            o = model(ids, output_hidden_states=hidden)
            values = {
                "last_hidden_state": o.last_hidden_state,
                "pooler_output": getattr(o, "pooler_output", None),
                "text_embeds": getattr(o, "text_embeds", None),
                "penultimate_hidden_state": o.hidden_states[-2] if hidden else None,
            }
            return tuple(values[n] for n in want)

        return te, want
    if base == "vae_decoder":
        z = x["latent_sample"]
        return (lambda: (model.decode(z, return_dict=False)[0],)), ["sample"]
    if base == "vae_encoder":
        img = x["sample"]
        return (lambda: (model.encode(img).latent_dist.mean,)), ["latent_sample"]
    if base == "taesd_decoder":
        z = x["latent_sample"]
        return (lambda: (model.decode(z).sample,)), ["sample"]
    if base == "taesd_encoder":
        img = x["sample"]
        return (lambda: (model.encode(img).latents,)), ["latent_sample"]
    raise UserError(f"no PyTorch call for component {base!r}")


def _classic_attention(model: Any) -> Any:
    """Switch ``model`` to an attention FlopCounterMode can count; returns the undo."""
    if hasattr(model, "attn_processors") and hasattr(model, "set_attn_processor"):
        from diffusers.models.attention_processor import AttnProcessor

        saved = model.attn_processors
        if saved:
            model.set_attn_processor(AttnProcessor())
            return lambda: model.set_attn_processor(saved)
    if hasattr(model, "set_attn_implementation"):
        prev = model.config._attn_implementation
        model.set_attn_implementation("eager")
        return lambda: model.set_attn_implementation(prev)
    return lambda: None


def _probe(name: str, dtype: str, max_n: int, make: Any) -> dict[str, Any]:
    """Best GEMM rate over sizes 256, 512, ... max_n; stops growing once one call takes 0.25 s."""
    best: dict[str, Any] = {"name": name, "dtype": dtype, "flops_per_s": None}
    n = 256
    try:
        while n <= max_n:
            run = make(n)
            run()  # warm-up (packing, thread pool start)
            t = min(_timed(run) for _ in range(3))
            rate = 2.0 * n**3 / t
            if best["flops_per_s"] is None or rate > best["flops_per_s"]:
                best.update(n=n, seconds=t, flops_per_s=rate)
            if t > 0.25:
                break
            n *= 2
    except Exception as e:  # a probe that cannot run here is a fact, not a failure
        best["error"] = f"{type(e).__name__}: {e}"
    return best


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _np_gemm(np: Any, n: int, dtype: Any) -> Any:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n)).astype(dtype), rng.standard_normal((n, n)).astype(dtype)
    return lambda: a @ b


def _torch_gemm(torch: Any, n: int, dtype: Any) -> Any:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)

    def run() -> Any:
        with torch.inference_mode():
            return a @ b

    return run


def _ort_gemm(n: int, dtype: str, threads: int) -> Any:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if dtype == "fp32":
        ta, tb, tout, op = TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT, "MatMul"
    else:
        ta, tb, tout, op = TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32, "MatMulInteger"
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["y"])],
        "gemm",
        [helper.make_tensor_value_info("a", ta, [n, n]), helper.make_tensor_value_info("b", tb, [n, n])],
        [helper.make_tensor_value_info("y", tout, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts)
    rng = np.random.default_rng(0)
    if dtype == "fp32":
        a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    else:
        a = rng.integers(0, 255, (n, n), dtype=np.uint8)
        b = rng.integers(-127, 127, (n, n), dtype=np.int8)
    feeds = {"a": a, "b": b}
    return lambda: sess.run(None, feeds)


def _example_sketch(h: int, w: int) -> Any:
    """A line drawing: black strokes (a circle, a horizon, a diagonal) on white, uint8 RGB."""
    import numpy as np

    yy, xx = np.mgrid[0:h, 0:w]
    img = np.full((h, w, 3), 255, dtype=np.uint8)
    r = np.hypot(yy - h * 0.4, xx - w * 0.5)
    strokes = (np.abs(r - min(h, w) * 0.2) < max(1, w // 128)) | (np.abs(yy - h * 0.7) < max(1, h // 128))
    strokes |= np.abs((yy - h) + xx * (h / w)) < max(1, w // 128)
    img[strokes] = 0
    return img


def _example_photo(h: int, w: int) -> Any:
    """A synthetic photo with edges for canny: gradient sky, a dark disc, a ground band; uint8 RGB."""
    import numpy as np

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([80 + 100 * yy / h, 120 + 80 * xx / w, 200 - 60 * yy / h], axis=-1)
    img[np.hypot(yy - h * 0.35, xx - w * 0.6) < min(h, w) * 0.15] = (240, 200, 60)
    img[yy > h * 0.7] = (60, 110, 50)
    return img.clip(0, 255).astype(np.uint8)


def _worker_main() -> None:
    """Serve ``(op, kwargs)`` requests on stdin; answers on the original stdout (prints go to stderr)."""
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    state = _WorkerState()
    inp = sys.stdin.buffer
    while True:
        try:
            op, kwargs = pickle.load(inp)
        except EOFError:
            return
        try:
            value = None if op == "exit" else getattr(state, op)(**kwargs)
            reply: tuple[str, Any] = ("ok", value)
        except BaseException as e:  # the parent decides; the worker stays up for the next request
            reply = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        pickle.dump(reply, channel, protocol=pickle.HIGHEST_PROTOCOL)
        channel.flush()
        if op == "exit":
            return


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker_main()
    else:
        sys.exit("usage: python -m sdkiln.stages.bench --worker (use `sdkiln bench` instead)")
