"""End to end through the runtime: each task (sketch, text, edit) on every variant, interleaved, with the
runtime's own per-stage timings (text encoder, ControlNet, UNet, decoder) and the final output's
deviation from the reference's (image PSNR/SSIM, final-latent SQNR).

Two kinds of run:
- **exact** (one per variant with a runtime configuration): the same algorithm as the reference (its
  steps, the full VAE, the ControlNet on every step). Its deviation is its end-to-end *parity*, judged
  against the contract's end-to-end floor for its precision.
- **fast** (the ``levers`` on one base variant): declared trade-offs: ``taesd`` (the TAESD decoder),
  ``steps<N>`` (fewer LCM steps), ``cn<K>`` (the ControlNet on the first K steps only, as diffusers'
  ``control_guidance_end``). Their deviation from the exact output is what the trade-off costs; it is
  reported as a deviation, never as parity.
"""

from __future__ import annotations

import contextlib
import logging
import re
import statistics
from dataclasses import dataclass, field
from typing import Any

from sdkiln.runtime.contract.errors import UserError
from sdkiln.stages.tools.bench.measure import deviation, e2e_floor_for, record_error, summarize
from sdkiln.stages.tools.bench.memory import estimate_bytes, interleave, plan_groups
from sdkiln.stages.tools.bench.report import _fmt_s
from sdkiln.stages.tools.bench.variants import (
    TASK_COMPONENTS,
    TASKS,
    TORCH_VARIANTS,
    BenchConfig,
    Bundle,
    Variant,
    bf16_label,
    hint_of,
)
from sdkiln.stages.tools.bench.worker import WorkerError, _Pool

logger = logging.getLogger(__name__)

_LEVER = re.compile(r"^(taesd|steps(\d+)|cn(\d+))$")


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
    """One end-to-end configuration: a runtime backend over a section, with its levers. ``worker`` names
    the variant whose process runs it (fast runs share their base's process and sessions)."""

    name: str
    worker: str
    backend: str  # runtime backend: "torch" | "onnx" | "openvino"
    section: str
    dtype: str
    vae: str  # "full" | "tiny"
    inference_precision: str = "f32"
    steps: int | None = None  # None: the run's configured steps
    control_end: float = 1.0
    levers: tuple[str, ...] = ()
    precisions: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def profile(self) -> str:
        """``exact``: the reference's algorithm, each component at a precision that met its floor (int8
        and bf16 only where they did: ``compose_mixed``); levers and OpenVINO's bf16 inference precision
        on every component are declared fast-profile trade-offs."""
        return "fast" if self.levers or self.inference_precision == "bf16" else "exact"

    def settings(self) -> dict[str, Any]:
        """What ``sdkiln.runtime.load`` and the request need to run this configuration."""
        return {
            "backend": self.backend,
            "section": self.section,
            "vae": self.vae,
            "inference_precision": self.inference_precision,
            "dtype": self.dtype,
            "steps": self.steps,
            "control_end": self.control_end,
        }


def parse_levers(spec: str, steps: int) -> dict[str, Any]:
    """``"taesd+steps2+cn1"`` -> ``{"vae": "tiny", "steps": 2, "control_end": 0.5, "levers": (...)}``."""
    out: dict[str, Any] = {"vae": "full", "steps": None, "control_end": 1.0}
    parts = tuple(p for p in spec.split("+") if p)
    if not parts:
        raise UserError(f"--levers: empty lever in {spec!r}")
    for part in parts:
        m = _LEVER.match(part)
        if m is None:
            raise UserError(f"--levers: unknown lever {part!r} in {spec!r}; use taesd, steps<N>, cn<K>")
        if part == "taesd":
            out["vae"] = "tiny"
        elif m.group(2):
            out["steps"] = int(m.group(2))
            if out["steps"] < 1:
                raise UserError(f"--levers: {part}: steps must be >= 1")
    n = out["steps"] or steps
    for part in parts:
        m = _LEVER.match(part)
        if m is not None and m.group(3):
            k = int(m.group(3))
            if not 1 <= k <= n:
                raise UserError(f"--levers: {part}: the ControlNet must run on 1..{n} steps")
            out["control_end"] = k / n
    out["levers"] = parts
    return out


def _runtime_config(v: Variant) -> tuple[str, str, str] | None:
    """(runtime backend, dtype, inference precision) of a variant, or None if the runtime has none."""
    if v.backend == "torch":
        dtype = TORCH_VARIANTS[v.name].runtime_dtype if v.name in TORCH_VARIANTS else None
        return ("torch", dtype, "f32") if dtype is not None else None
    if v.backend == "openvino":
        return "openvino", "float32", v.settings.get("inference_precision", "f32")
    if v.settings.get("preset", "default") == "default":  # the runtime has no ORT session presets
        return "onnx", "float32", "f32"
    return None


def _precisions(bundle: Bundle, v: Variant, dtype: str) -> dict[str, str]:
    """Per component, the precision a run computes in (from the section's components)."""
    if v.backend == "torch":
        from sdkiln.runtime.contract.layout import VAE_KINDS

        return {c: ("fp32" if c in VAE_KINDS else v.precision) for c in bundle.components(v.section)}
    out = {}
    for c, entry in bundle.components(v.section).items():
        own = str(entry.get("precision") or v.precision)
        out[c] = bf16_label(own) if hint_of(v, c) == "bf16" else own
    return out


def task_runs(
    bundle: Bundle, variants: list[Variant], config: BenchConfig, fast_base: str | None
) -> list[TaskRun]:
    """The exact run of every variant the runtime can run, then the fast runs (levers) on ``fast_base``."""
    out = []
    by_name = {v.name: v for v in variants}
    for v in variants:
        cfg = _runtime_config(v)
        if cfg is None:
            continue
        backend, dtype, hint = cfg
        out.append(
            TaskRun(
                v.name,
                v.name,
                backend,
                v.section,
                dtype,
                "full",
                hint,
                precisions=_precisions(bundle, v, dtype),
            )
        )
    base = by_name.get(fast_base) if fast_base else None
    if base is None or _runtime_config(base) is None:
        return out
    backend, dtype, hint = _runtime_config(base)  # type: ignore[misc]
    for spec in config.levers:
        lv = parse_levers(spec, config.steps)
        if lv["vae"] == "tiny" and "taesd_decoder" not in bundle.components(base.section):
            continue
        out.append(
            TaskRun(
                f"{base.name}+{'+'.join(lv['levers'])}",
                base.name,
                backend,
                base.section,
                dtype,
                lv["vae"],
                hint,
                lv["steps"],
                lv["control_end"],
                lv["levers"],
                precisions=_precisions(bundle, base, dtype),
            )
        )
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


def run_components(task: str, run: TaskRun, tes: list[str], params: dict[str, Any]) -> list[str]:
    """The components one run of ``task`` calls (the ControlNet only if it runs on some step)."""
    used = [*tes, *(c for c in TASK_COMPONENTS[task] if c != "controlnet.canny" or params.get("control"))]
    return [("taesd_decoder" if c == "vae_decoder" and run.vae == "tiny" else c) for c in used]


def bench_tasks(
    bundle: Bundle,
    variants: list[Variant],
    config: BenchConfig,
    pool: _Pool,
    size: int,
    budget: int,
    errors: list[dict[str, Any]],
    skipped: list[dict[str, str]],
    fast_base: str | None = None,
) -> list[dict[str, Any]]:
    gap = runtime_gap()
    if gap:
        skipped.append({"variant": "tasks", "reason": gap})
        logger.warning("end-to-end tasks skipped: %s", gap)
        return []
    runs = task_runs(bundle, variants, config, fast_base)
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
    outputs: dict[str, dict[str, Any]] = {}
    mems: dict[str, dict[str, Any]] = {}
    described: dict[str, str] = {}
    loaded: set[str] = set()

    def record(stage: str) -> Any:
        return lambda name, e: record_error(errors, name, f"task {task}", stage, e)

    def run_params(r: TaskRun) -> dict[str, Any]:
        p = dict(params)
        if r.steps is not None:
            p["steps"] = r.steps
        if r.control_end != 1.0:
            p["control_end"] = r.control_end
        return p

    for gi, group in enumerate(groups):
        for w_name in group:
            if w_name in loaded:
                continue
            wr = [r for r in runs if r.worker == w_name]
            try:
                info = pool.get(w_name).call(
                    "load_runtime",
                    backend=wr[0].backend,
                    section=wr[0].section,
                    dtype=wr[0].dtype,
                    vaes=list(dict.fromkeys(r.vae for r in wr)),
                    inference_precision=wr[0].inference_precision,
                    preload=[task],
                )
                loaded.add(w_name)
                for r in wr:
                    described[r.name] = info.get("description", "")
            except WorkerError as e:
                failed.update(r.name for r in wr)
                record("load")(w_name, e)
        members = [r for r in runs if r.worker in group and r.name not in failed]
        calls = {
            r.name: (
                lambda w=pool.get(r.worker), r=r: w.call(
                    "run_task", task=task, params=run_params(r), vae=r.vae, key=r.name
                )
            )
            for r in members
        }
        # The reference's pipeline stays loaded across groups: warmed once, in the first.
        warm = {r.name for r in members if r.worker == ref_worker} if gi else set()
        got = interleave(calls, _task_config(config), failed, record("run"), warm=warm)
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
            if r.name in failed or r.name in outputs:
                continue
            try:
                outputs[r.name] = pool.get(r.worker).call("task_outputs", key=r.name)
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
    if ref_name not in outputs:
        return None
    ref_samples[ref_name] = [x["seconds"] for x in samples[ref_name]]
    ref_out = outputs[ref_name]
    rows = []
    for r in runs:
        if r.name not in outputs or r.name not in samples:
            continue
        seconds = [x["seconds"] for x in samples[r.name]]
        stats = summarize(seconds)
        cpu = [x["cpu_seconds"] for x in samples[r.name] if "cpu_seconds" in x]
        ref_median = statistics.median(ref_samples[r.name])
        stages = {
            k: statistics.median(x["timings"][k] for x in samples[r.name] if k in x["timings"])
            for k in sorted({k for x in samples[r.name] for k in x["timings"]})
        }
        dev = deviation(ref_out, outputs[r.name]) if r.name != ref_name else None
        comps = run_components(task, r, tes, run_params(r))
        precisions = {c: r.precisions.get(c, "?") for c in comps}
        parity = None
        if r.profile == "exact" and r.name != ref_name:
            floor = e2e_floor_for(list(precisions.values()))
            ok = dev is not None and (dev["psnr_db"] is None or dev["psnr_db"] >= floor)
            parity = {"metric": "image PSNR vs the reference", "floor_db": floor, "ok": ok}
        rows.append(
            {
                "variant": r.name,
                "profile": r.profile,
                "levers": list(r.levers),
                "settings": r.settings(),
                "backend": r.backend,
                "section": r.section,
                "dtype": r.dtype,
                "vae": r.vae,
                "steps": r.steps or params["steps"],
                "control_end": r.control_end,
                "description": described.get(r.name, ""),
                "precisions": precisions,
                "component_sources": variants[r.worker].settings.get("sources"),
                "group": next(i for i, g in enumerate(groups) if r.worker in g),
                **stats,
                "reference_samples_s": ref_samples[r.name],
                "reference_median_s": ref_median,
                "ratio_to_reference": stats["median_s"] / ref_median,
                "cpu_median_s": statistics.median(cpu) if cpu else None,
                "stages_median_s": stages,
                "deviation": dev,
                "psnr_db_vs_reference": dev["psnr_db"] if dev else None,
                "e2e_parity": parity,
                **mems.get(r.name, {}),
            }
        )
    logger.info(
        "task %s: %s",
        task,
        "  ".join(f"{r['variant']} {_fmt_s(r['median_s'])} ({r['ratio_to_reference']:.2f}x)" for r in rows),
    )
    best = min(rows, key=lambda r: r["ratio_to_reference"])
    experiments = {}
    if config.deepcache and variants[ref_worker].backend == "torch":
        ref_row = next(r for r in rows if r["variant"] == ref_name)
        experiments["deepcache"] = _deepcache(
            task, params, pool.get(ref_worker), runs, ref_name, ref_row, ref_out, config, errors
        )
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
        "experiments": experiments,
        "notes": "Weights are random: quality is measured as deviation from the exact (reference) output, "
        "PSNR/SSIM of the image and SQNR of the final latents. An exact run's deviation is its end-to-end "
        "parity (floor by its precisions); a fast run's is the cost of its declared trade-offs, never "
        "parity (TAESD is a different decoder). Peak RSS: the worker's, over loading this task's "
        "pipeline(s) and every call; fast runs share their base's process and sessions, so one reading.",
    }


def _task_config(config: BenchConfig) -> BenchConfig:
    """The interleaving settings of the task phase (``--task-repeat`` may differ from ``--repeat``)."""
    from dataclasses import replace

    return replace(config, repeat=config.task_repeat or config.repeat)


def _deepcache(
    task: str,
    params: dict[str, Any],
    worker: Any,
    runs: list[TaskRun],
    ref_name: str,
    ref_row: dict[str, Any],
    ref_out: dict[str, Any],
    config: BenchConfig,
    errors: list[dict[str, Any]],
) -> dict[str, Any] | None:
    """The reference run again with DeepCache-style reuse (``deepcache.py``), in the reference's own
    process after its timed rounds (not interleaved: its ratio compares with the reference's median of
    this run), with its deviation from the exact output."""
    ref = next(r for r in runs if r.name == ref_name)
    try:
        worker.call(
            "load_runtime",
            backend=ref.backend,
            section=ref.section,
            dtype=ref.dtype,
            vaes=["full"],
            preload=[task],
        )
        got = worker.call(
            "deepcache",
            task=task,
            params=params,
            interval=config.deepcache,
            repeat=config.task_repeat or config.repeat,
        )
        out = worker.call("task_outputs", key="deepcache")
        worker.call("unload")
    except WorkerError as e:
        record_error(errors, ref_name, f"task {task}", "deepcache", e)
        return None
    seconds = [x["seconds"] for x in got["runs"]]
    unet = [x["timings"].get("unet") for x in got["runs"] if x["timings"].get("unet") is not None]
    ref_unet = ref_row["stages_median_s"].get("unet")
    return {
        "interval": config.deepcache,
        "calls": got["kinds"],
        "description": got["description"],
        "median_s": statistics.median(seconds),
        "samples_s": seconds,
        "ratio_to_reference": statistics.median(seconds) / ref_row["median_s"],
        "unet_median_s": statistics.median(unet) if unet else None,
        "unet_ratio_to_reference": statistics.median(unet) / ref_unet if unet and ref_unet else None,
        "deviation": deviation(ref_out, out),
        "method": "the PyTorch reference's UNet run full on every N-th step and shallow (conv_in, first down "
        "block, last up block on the cached deep features) on the others, inside the runtime loop; timed "
        "after the reference's rounds in the same process (not interleaved)",
    }
