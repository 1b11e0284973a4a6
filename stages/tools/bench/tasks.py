"""End to end through the runtime: each task (sketch, text, edit) on every variant, interleaved, with the
runtime's own per-stage timings and the final images' deviation from the reference."""

from __future__ import annotations

import contextlib
import logging
import statistics
from dataclasses import dataclass
from typing import Any

from sdkiln.runtime.contract.errors import UserError
from sdkiln.stages.tools.bench.measure import psnr, record_error, summarize
from sdkiln.stages.tools.bench.memory import estimate_bytes, interleave, plan_groups
from sdkiln.stages.tools.bench.report import _fmt_s
from sdkiln.stages.tools.bench.variants import (
    TASK_COMPONENTS,
    TASKS,
    TORCH_VARIANTS,
    BenchConfig,
    Bundle,
    Variant,
)
from sdkiln.stages.tools.bench.worker import WorkerError, _Pool

logger = logging.getLogger(__name__)


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


def bench_tasks(
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
        return lambda name, e: record_error(errors, name, f"task {task}", stage, e)

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
        got = interleave(calls, config, failed, record("run"))
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
