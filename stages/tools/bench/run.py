"""Running a benchmark: components interleaved across worker processes within a memory budget, then the tasks end to end, into one report."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import re
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from sdkiln.runtime.contract.errors import UserError
from sdkiln.stages.tools.bench.machine import _read, default_threads, machine_facts
from sdkiln.stages.tools.bench.measure import judge, make_inputs, parity, parity_floor, psnr, summarize
from sdkiln.stages.tools.bench.report import _fmt_bytes, _fmt_s, recommend
from sdkiln.stages.tools.bench.variants import (
    _MEMORY_METHOD,
    SCHEMA,
    TASK_COMPONENTS,
    TASKS,
    TORCH_VARIANTS,
    BenchConfig,
    Bundle,
    Variant,
    _components_to_run,
    _native_size,
    artifact_bytes,
    available_variants,
    component_label,
    select_variants,
    torch_folder,
)
from sdkiln.stages.tools.bench.worker import WorkerError, _Pool, _setup, measure_peak

logger = logging.getLogger(__name__)


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
            "digest": bundle.manifest.digest,
            "family": bundle.family(),
            "sections": {s: e.kind for s, e in sorted(bundle.sections.items())},
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
    from sdkiln.runtime.contract.families import get_family

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
