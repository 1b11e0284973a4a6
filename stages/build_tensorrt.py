"""build_tensorrt: TensorRT engines for this machine's GPU from the TensorRT-ready ONNX.

Recipe steps::

    - id: engines                         # -> tensorrt/engines/sm90-trt10.8.0.43/unet.plan ...
      stage: build_tensorrt
      inputs: {onnx: trt_onnx}            # a prepare_tensorrt output (fp16 graphs, fp32 I/O)
      params:
        batch: [1, 1, 4]                  # min, opt, max images (default: prepare_tensorrt's profile)
        height: [512, 512, 768]
        width: [512, 512, 768]
        refit: full                       # every weight refittable: another LoRA refits, no rebuild

    - id: engines_int8                    # explicit INT8 (Q/DQ), calibrated on the recipe's prompts
      stage: build_tensorrt
      inputs: {onnx: trt_onnx_fp32, model: fused}
      params: {precision: int8, calibration: {prompts: ["a house by a lake"], steps: 2, size: 512}}

    - id: engines_lora_b                  # same graph, new weights: engines refitted from engines
      stage: build_tensorrt
      inputs: {onnx: trt_onnx_lora_b, engines: engines}

Engines run only on the GPU generation and TensorRT version that built them, so the step's cache key
carries both (``key_facts``: the compute capability of this GPU, or of the one named by ``gpu: sm90``,
and the TensorRT version), and so do the file names (``<tag>/<component>.plan``). A bundle holds engines
for several GPUs with one step per target (``gpu: sm89``, ``gpu: sm90``; each builds only where that GPU
is, and a cache entry copied from such a machine is a hit anywhere). Without a GPU or TensorRT the step
stops before any work (``needs``) with what is missing and how to install it.

Precision is in the graph (strongly typed networks, the only kind TensorRT 11 builds): fp16 is
``prepare_tensorrt``'s fp16 graphs as they are; int8/fp8 quantize the fp32 TensorRT-ready graphs of the
UNet and ControlNets with symmetric Q/DQ pairs calibrated on the recipe's prompts and sketches
(``tensorrt_quant``), then build from those, which are kept beside the engines. Each engine is checked
against ONNX Runtime on the graph it came from (SQNR floors per precision from the family table).

Refit bookkeeping, per engine, in ``<tag>/<component>.refit.json``: the structure fingerprint of its
graph, the sha256 of every weight, the names TensorRT made refittable. Given ``engines`` (an earlier
build of the same architecture), a component whose structure matches is refitted instead of rebuilt and
the manifest records from which step and how many weights changed.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.layout import Kind
from sdkiln.runtime.contract.manifest import ModelFacts
from sdkiln.stages.common.onnx.calibration import CalibrationParams
from sdkiln.stages.engine.core import InputArtifact, Stage, StageContext, StageParams

logger = logging.getLogger(__name__)

# Graphs that run classifier-free guidance's doubled batch (as in prepare_tensorrt).
CFG_KINDS = ("text_encoder", "text_encoder_2", "unet", "controlnet")
# What INT8/FP8 quantize by default: the denoiser runs every step; text encoders and VAEs run once.
DEFAULT_QUANTIZED = ["unet", "controlnet"]
# The family table's SQNR floor that gates each engine precision.
GATE_PRECISION = {"fp16": "fp16", "int8": "int8", "fp8": "qfloat8"}


class StaticShape(StageParams):
    batch: int = Field(default=1, ge=1, le=64, description="images per prompt")
    height: int = Field(default=512, ge=64, le=4096, multiple_of=8)
    width: int = Field(default=512, ge=64, le=4096, multiple_of=8)


class BuildTensorrtParams(StageParams):
    precision: Literal["fp16", "int8", "fp8"] = "fp16"
    components: list[str] | None = Field(default=None, description="keys or kinds; default: all")
    gpu: str = Field(default="auto", description="auto (this machine's GPU) or the target, e.g. sm90")
    batch: list[int] | None = Field(default=None, min_length=3, max_length=3, description="min, opt, max")
    height: list[int] | None = Field(default=None, min_length=3, max_length=3)
    width: list[int] | None = Field(default=None, min_length=3, max_length=3)
    static: StaticShape | None = Field(default=None, description="one fixed shape: min = opt = max")
    refit: Literal["none", "identical", "full"] = "full"
    strip_weights: bool = Field(
        default=False, description="plans without weights; refitted from the ONNX at load"
    )
    optimization_level: int = Field(default=3, ge=0, le=5)
    workspace_mib: int | None = Field(default=None, ge=64)
    hardware_compatibility: Literal["none", "ampere_plus", "same_compute_capability"] = "none"
    quantize: list[str] = Field(default=DEFAULT_QUANTIZED, description="int8/fp8: the kinds quantized")
    calibration: CalibrationParams | None = None
    parity: bool = Field(default=True, description="check each engine against ONNX Runtime on its graph")

    @model_validator(mode="after")
    def _check(self) -> BuildTensorrtParams:
        from sdkiln.runtime.backends.nvidia import parse_sm

        if self.gpu != "auto":
            parse_sm(self.gpu)  # ValueError -> a validation problem naming the field
        for name in ("batch", "height", "width"):
            v = getattr(self, name)
            if v is None:
                continue
            if self.static is not None:
                raise ValueError(f"{name}: give either static or batch/height/width ranges, not both")
            if not 1 <= v[0] <= v[1] <= v[2]:
                raise ValueError(f"{name}: needs 1 <= min <= opt <= max (got {v})")
            if name != "batch" and any(x % 8 for x in v):
                raise ValueError(f"{name}: sizes must be multiples of 8 (got {v})")
        low = self.precision in ("int8", "fp8")
        if low and self.calibration is None:
            raise ValueError(
                f"calibration: precision {self.precision} is calibrated on prompts; add calibration"
            )
        if not low and self.calibration is not None:
            raise ValueError("calibration: only int8/fp8 engines are calibrated")
        if self.strip_weights and self.refit == "none":
            raise ValueError("strip_weights: needs refit identical or full")
        return self


def _check_files(params: BuildTensorrtParams, recipe_dir: Path) -> list[str]:
    if params.calibration is None:
        return []
    return [
        f"params.calibration.sketches: {s} not found"
        for s in params.calibration.sketches
        if not (Path(recipe_dir) / s).is_file()
    ]


def key_facts(params: BuildTensorrtParams) -> dict[str, str]:
    """The target GPU generation and TensorRT version: engines differ (and only run) per pair."""
    from sdkiln.runtime.backends import nvidia

    if params.gpu != "auto":
        sm = nvidia.sm_name(nvidia.parse_sm(params.gpu))
    else:
        gpus = nvidia.detect_gpus()
        sm = gpus[0].sm if gpus else "none"
    return {"gpu": sm, "tensorrt": nvidia.tensorrt_version() or "absent"}


def _bundle_dir(params: BuildTensorrtParams) -> str:
    from sdkiln.runtime.backends.nvidia import parse_sm, sm_name

    suffix = "" if params.precision == "fp16" else f"-{params.precision}"
    target = "" if params.gpu == "auto" else f"-{sm_name(parse_sm(params.gpu))}"
    return f"tensorrt/engines{suffix}{target}"


# --------------------------------------------------------------------------------------------------
# Profiles (pure: tested on CPU)


def component_kind(key: str) -> str:
    return key.split(".", 1)[0]


def profile_for(
    inputs: list[dict[str, Any]],
    kind: str,
    batch: list[int],
    height: list[int],
    width: list[int],
    cfg: bool,
    vae_scale_factor: int = 8,
) -> dict[str, dict[str, list[int]]]:
    """min/opt/max of every graph input from image ranges. With ``cfg`` the opt/max batch of the text
    encoders, UNet and ControlNets is doubled (cond + uncond in one run); min is not, so a run without
    guidance fits too."""
    from sdkiln.runtime.contract.specs import resolve_shape
    from sdkiln.stages.common.onnx.components import bindings

    factor = 2 if cfg and kind in CFG_KINDS else 1
    out: dict[str, dict[str, list[int]]] = {}
    for t in inputs:
        levels = {}
        for i, level in enumerate(("min", "opt", "max")):
            b = batch[i] if level == "min" else batch[i] * factor
            levels[level] = resolve_shape(t["shape"], bindings(b, height[i], width[i], vae_scale_factor))
        out[t["name"]] = levels
    return out


def static_profile_for(
    inputs: list[dict[str, Any]], kind: str, shape: StaticShape, cfg: bool, vae_scale_factor: int = 8
) -> dict[str, dict[str, list[int]]]:
    """One fixed shape for every level; the CFG-doubled batch where the component runs it."""
    rows = shape.batch * (2 if cfg and kind in CFG_KINDS else 1)
    ranges = ([rows] * 3, [shape.height] * 3, [shape.width] * 3)
    return profile_for(inputs, kind, *ranges, cfg=False, vae_scale_factor=vae_scale_factor)


def plan_profiles(
    p: BuildTensorrtParams, details: dict[str, Any], facts: ModelFacts | None, components: dict[str, Any]
) -> dict:
    """The profile of every component: the prepare step's (``details``: its recorded profiles), or the
    recipe's override, or static."""
    from sdkiln.runtime.contract.families import get_family

    recorded = details.get("profiles") or {}
    pp = details.get("profile_params") or {}
    cfg = bool(pp.get("cfg", True))
    vsf = get_family(facts.family).vae_scale_factor if facts is not None else 8
    exported_static = facts.static if facts is not None else None
    if exported_static and (p.static or p.batch or p.height or p.width):
        raise UserError(
            "the ONNX export has fixed shapes; its engines take only those (drop static/batch/height/width)"
        )
    out = {}
    for key, entry in components.items():
        kind = component_kind(key)
        if p.static is not None:
            out[key] = static_profile_for(entry["inputs"], kind, p.static, cfg, vsf)
        elif p.batch or p.height or p.width:
            ranges = [getattr(p, n) or pp.get(n) for n in ("batch", "height", "width")]
            if any(r is None for r in ranges):
                raise UserError(
                    "batch/height/width: the TensorRT-ready section records no ranges to complete them"
                )
            out[key] = profile_for(entry["inputs"], kind, *ranges, cfg=cfg, vae_scale_factor=vsf)
        elif key in recorded:
            out[key] = recorded[key]
        else:
            raise UserError(f"{key}: the TensorRT-ready section records no profile; give batch/height/width")
    return out


def select_components(components: dict[str, Any], wanted: list[str] | None) -> dict[str, Any]:
    if wanted is None:
        return dict(components)
    unknown = [
        w for w in wanted if w not in components and not any(component_kind(k) == w for k in components)
    ]
    if unknown:
        raise UserError(
            f"components: {unknown} not in the TensorRT-ready section (it has {sorted(components)})"
        )
    return {k: v for k, v in components.items() if k in wanted or component_kind(k) in wanted}


def source_files(src: InputArtifact, graph_rel: str) -> dict[str, str]:
    """{relpath: sha256} of one component's graph folder in the input artifact (its manifest's file
    table, or hashed when the manifest has none)."""
    from sdkiln.runtime.contract.digest import sha256_file

    folder = graph_rel.rsplit("/", 1)[0] + "/"
    listed = src.manifest.files
    if listed:
        return {
            rel: meta.sha256
            for rel, meta in listed.items()
            if rel.startswith(folder) and not rel.endswith((".json", ".txt"))
        }
    base = src.path / folder
    return {
        f"{folder}{p.relative_to(base)}": sha256_file(p)
        for p in sorted(base.rglob("*"))
        if p.is_file() and p.suffix not in (".json", ".txt")
    }


# --------------------------------------------------------------------------------------------------
# Refit from an earlier build


def refit_source(engines: InputArtifact | None, key: str, tag: str) -> tuple[Path, dict[str, Any]] | None:
    """The earlier engine of ``key`` for the same target, with its refit record, if there is one."""
    if engines is None:
        return None
    details = engines.manifest.details
    if (details.get("target") or {}).get("tag") != tag:
        return None
    eng = (details.get("engines") or {}).get(key)
    if not eng or not eng.get("refit_record"):
        return None
    record = json.loads((engines.path / eng["refit_record"]).read_text())
    return engines.path / eng["path"], {**eng, "record": record}


class _EngineSession:
    """A TensorRT component behind the small session interface ParityReport uses (get_outputs, run)."""

    def __init__(self, comp: Any):
        self._comp = comp

    def get_outputs(self) -> list[Any]:
        from types import SimpleNamespace

        return [SimpleNamespace(name=n) for n in self._comp.io.outputs]

    def run(self, _names: Any, feeds: dict[str, Any]) -> list[Any]:
        out = self._comp(**feeds)
        return [out[n] for n in self._comp.io.outputs]


# --------------------------------------------------------------------------------------------------


def run(ctx: StageContext) -> None:
    from sdkiln.runtime.backends import nvidia
    from sdkiln.runtime.backends.tensorrt import EngineHost
    from sdkiln.runtime.backends.tensorrt_build import (
        BuildSettings,
        build_engine,
        graph_fingerprint,
        in_profile,
        plan_refit,
        refit_engine,
        weight_digests,
    )
    from sdkiln.stages.common.onnx.parity import ParityReport

    p: BuildTensorrtParams = ctx.params
    src = ctx.input("onnx")
    comps = select_components(src.components, p.components)
    if not comps:
        raise UserError("no components to build")
    low = p.precision in ("int8", "fp8")
    quantized = {k for k in comps if low and component_kind(k) in p.quantize}
    if quantized:
        not_fp32 = [k for k in quantized if src.components[k].get("precision", "fp32") != "fp32"]
        if not_fp32:
            raise UserError(
                f"precision {p.precision} quantizes fp32 graphs; {not_fp32} are "
                f"{src.components[not_fp32[0]].get('precision')}: add a prepare_tensorrt step with precision: fp32"
            )
        if "model" not in ctx.inputs:
            raise UserError(
                f"precision {p.precision}: calibration runs the reference pipeline; add inputs.model"
            )
    profiles = plan_profiles(p, src.manifest.details, src.manifest.model, comps)

    gpu = nvidia.require_gpu()
    trt = nvidia.require_tensorrt()
    if p.gpu != "auto" and nvidia.parse_sm(p.gpu) != gpu.compute_capability:
        raise UserError(
            f"gpu: this step builds for {p.gpu}, but this machine's GPU is {gpu.name} ({gpu.sm}); run it "
            "where that GPU is, or set gpu: auto"
        )
    nvidia.check_precision(p.precision, gpu.compute_capability)
    tag = nvidia.engine_tag(gpu.compute_capability, trt.__version__)
    timing = nvidia.timing_cache_path(nvidia.user_cache_dir(), tag)
    host = EngineHost()

    calib: dict[str, list[dict[str, Any]]] = {}
    if quantized:
        calib = _calibration_feeds(ctx, quantized)

    report = ParityReport()
    engines: dict[str, Any] = {}
    refits: dict[str, Any] = {}
    for key, entry in ctx.progress(comps.items(), "engines", total=len(comps)):
        graph = src.path / entry["path"]
        own_graph = None
        prec = p.precision if key in quantized else entry.get("precision", "fp16")
        if key in quantized:
            from sdkiln.stages.common.onnx.qdq import qdq_summary, quantize_for_tensorrt

            own_graph = f"qdq/{entry['path']}"
            with ctx.timed(f"quantize_s.{key}"):
                quantize_for_tensorrt(graph, ctx.out_dir / own_graph, p.precision, calib[key])
            ctx.metrics.setdefault("qdq", {})[key] = qdq_summary(ctx.out_dir / own_graph)
            graph = ctx.out_dir / own_graph
        settings = BuildSettings(
            profile=profiles[key],
            refit=p.refit,
            strip_weights=p.strip_weights,
            optimization_level=p.optimization_level,
            workspace_mib=p.workspace_mib,
            hardware_compatibility=p.hardware_compatibility,
        )
        fingerprint = graph_fingerprint(graph)
        digests = weight_digests(graph) if p.refit != "none" else {}
        plan_path = ctx.out_dir / nvidia.engine_file(tag, key)
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        facts: dict[str, Any] = {}
        data: bytes | None = None
        earlier = refit_source(ctx.inputs.get("engines"), key, tag)
        if earlier is not None and earlier[1].get("settings") == _settings_dict(settings):
            old_plan, old = earlier
            rp = plan_refit(
                old["record"]["weights"],
                digests,
                set(old["record"].get("refittable") or []) or None,
                (old["record"]["fingerprint"], fingerprint),
            )
            if rp.ok:
                engine = host.deserialize(old_plan.read_bytes(), key)
                if not p.strip_weights:  # a stripped plan has no weights to refit: the runtime refits at load
                    refit_engine(trt, engine, graph, name=key)
                data = bytes(memoryview(engine.serialize()))
                facts = {"refittable": old["record"].get("refittable") or []}
                refits[key] = {"from_step": ctx.inputs["engines"].step_id, "changed": len(rp.changed)}
            else:
                logger.warning("%s: rebuilding instead of refitting: %s", key, "; ".join(rp.problems))
        if data is None:
            data, facts = build_engine(trt, graph, settings, timing, name=key)
        plan_path.write_bytes(data)
        seconds = round(time.perf_counter() - t0, 2)
        record_rel = f"{tag}/{key}.refit.json"
        if p.refit != "none":
            record = {
                "fingerprint": fingerprint,
                "weights": digests,
                "refittable": facts.get("refittable", []),
            }
            (ctx.out_dir / record_rel).write_text(json.dumps(record, sort_keys=True, indent=1))
        engines[key] = {
            "path": nvidia.engine_file(tag, key),
            "graph": own_graph,
            "source_files": source_files(src, entry["path"]),
            "precision": prec,
            "settings": _settings_dict(settings),
            "settings_digest": settings.digest(),
            "fingerprint": fingerprint,
            "refit_record": record_rel if p.refit != "none" else None,
            "refittable_weights": len(facts.get("refittable", [])),
            "bytes": len(data),
            "seconds": seconds,
        }
        ctx.components[key] = {k: v for k, v in entry.items() if k != "path"} | {"precision": prec}
        if p.parity:
            # Quantized engines are checked on what the model really sees (a calibration input that fits
            # the profile); fp16 ones on random inputs at the profile's smallest shape.
            fits = [
                f
                for f in calib.get(key, [])
                if not in_profile({n: a.shape for n, a in f.items()}, profiles[key])
            ]
            ref_graph = src.path / entry["path"]
            _parity(ctx, report, host, key, entry, data, graph, ref_graph, profiles[key], prec, fits[:1])
    ctx.metrics.update(
        {
            "engines": {
                k: {f: e[f] for f in ("bytes", "seconds", "refittable_weights")} for k, e in engines.items()
            },
            "total_bytes": sum(e["bytes"] for e in engines.values()),
            "parity": report.metrics(),
        }
    )
    ctx.model = src.manifest.model
    ctx.details.update(
        {
            "target": {
                "tag": tag,
                "gpu": gpu.name,
                "compute_capability": list(gpu.compute_capability),
                "tensorrt": trt.__version__,
                "hardware_compatibility": p.hardware_compatibility,
            },
            "source": {"step": src.step_id, "digest": src.manifest.digest},
            "engines": engines,
            "refit": {"mode": p.refit, "strip_weights": p.strip_weights, "refitted": refits},
            "precision": p.precision,
        }
    )
    report.raise_if_failed(f"build_tensorrt ({p.precision}, {tag})")


def _settings_dict(settings: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(settings)


def _parity(
    ctx: StageContext,
    report: Any,
    host: Any,
    key: str,
    entry: dict[str, Any],
    data: bytes,
    graph: Path,
    reference_graph: Path,
    profile: dict[str, dict[str, list[int]]],
    precision: str,
    real_feeds: list[dict[str, Any]],
) -> None:
    """Engine vs ONNX Runtime (CPU) on the graph it came from: on ``real_feeds[0]`` if given, else on
    random inputs at the profile's smallest shape."""
    from sdkiln.runtime.backends.tensorrt_build import refit_engine
    from sdkiln.runtime.contract.errors import BuildError
    from sdkiln.runtime.contract.specs import ComponentIO
    from sdkiln.stages.common.onnx import io as ou
    from sdkiln.stages.common.onnx.parity import ParityCase, gate_for

    engine = host.deserialize(data, key)
    if ctx.params.strip_weights:
        refit_engine(host.trt, engine, graph, name=key)
    io = ComponentIO.from_manifest(entry)
    comp = host.open(key, engine, io, profile)
    feeds = (
        real_feeds[0]
        if real_feeds
        else ou.spec_feeds(entry["inputs"], {n: lv["min"] for n, lv in profile.items()}, seed=0)
    )
    ref_sess = ou.cpu_session(reference_graph)
    names = [o.name for o in ref_sess.get_outputs()]
    expected = dict(zip(names, ref_sess.run(None, feeds), strict=True))
    case = ParityCase(
        "calibration_input" if real_feeds else "min_shape",
        feeds,
        {n: expected[n] for n in io.outputs if n in expected},
    )
    gate_key = GATE_PRECISION.get(precision, "int8")
    try:
        gate = gate_for(key, gate_key)
    except BuildError:  # no floor for that precision here: the int8 one
        gate = gate_for(key, "int8")
    report.check(key, _EngineSession(comp), [case], gate)


def _calibration_feeds(ctx: StageContext, keys: set[str]) -> dict[str, list[dict[str, Any]]]:
    """Per component, the inputs the reference pipeline gave it over the calibration prompts/sketches."""
    from sdkiln.stages.common.onnx import components as oc
    from sdkiln.stages.common.onnx.calibration import collect_calibration
    from sdkiln.stages.common.torch.pipeline import open_pipeline, read_configs

    p: BuildTensorrtParams = ctx.params
    ref = ctx.input("model")
    src = ctx.input("onnx")
    fam, planned = oc.plan_exported(src, ref)
    comps = [c for c in planned if c.key in keys]
    loaded = open_pipeline(ref.path, family=fam.name)
    lcm = ref.model.lcm or bool(read_configs(ref.path)["unet"].get("time_cond_proj_dim"))
    with ctx.timed("calibration_s"):
        feeds = collect_calibration(loaded, fam, comps, p.calibration, ctx.recipe_dir, lcm=lcm)
    empty = [k for k in keys if not feeds.get(k)]
    if empty:
        raise UserError(
            f"calibration gave no inputs for {empty} (a ControlNet needs calibration.sketches to run)"
        )
    return feeds


STAGE = Stage(
    name="build_tensorrt",
    version="1",
    inputs={"onnx": (Kind.TENSORRT,), "model": (Kind.PIPELINE,), "engines": (Kind.TENSORRT_ENGINE,)},
    optional_inputs=frozenset({"model", "engines"}),
    output_kind=Kind.TENSORRT_ENGINE,
    params=BuildTensorrtParams,
    run=run,
    description="TensorRT engines (fp16, or INT8/FP8 Q/DQ) for one GPU generation, refittable, with profiles",
    env_packages=("onnx", "onnxruntime"),
    needs=frozenset({"gpu", "tensorrt"}),
    bundle_dir=_bundle_dir,
    check=lambda params, recipe_dir: _check_files(params, recipe_dir),
    key_facts=key_facts,
)
