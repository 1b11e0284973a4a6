"""Running a benchmark: components interleaved across worker processes within a memory budget, then the tasks end to end, into one report."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import statistics
import time
from dataclasses import asdict
from typing import Any

from sdkiln.runtime.contract.errors import UserError
from sdkiln.stages.tools.bench.machine import default_threads, machine_facts
from sdkiln.stages.tools.bench.measure import (
    judge,
    make_inputs,
    parity,
    parity_floor,
    record_error,
    summarize,
)
from sdkiln.stages.tools.bench.memory import estimate_bytes, interleave, memory_budget, plan_groups
from sdkiln.stages.tools.bench.report import _fmt_bytes, _fmt_s, recommend
from sdkiln.stages.tools.bench.tasks import _runtime_config, bench_tasks
from sdkiln.stages.tools.bench.variants import (
    _MEMORY_METHOD,
    SCHEMA,
    BenchConfig,
    Bundle,
    Variant,
    _components_to_run,
    _native_size,
    artifact_bytes,
    available_variants,
    bf16_label,
    component_label,
    hint_of,
    select_variants,
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
        fast_base = None
        mixed: list[Variant] = []
        if config.tasks:
            mixed = compose_mixed(variants, comp_rows, skipped, config.steps)
            for v in mixed:
                logger.info("composed %s: inference precision %s", v.name, v.settings["inference_precision"])
            fast_base = choose_fast_base(config, [*variants, *mixed], comp_rows, skipped)
            task_rows = bench_tasks(
                bundle, [*variants, *mixed], config, pool, size, budget, errors, skipped, fast_base
            )
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
            "task_repeat": config.task_repeat or config.repeat,
            "levers": list(config.levers),
            "fast_base": fast_base,
            "fast_base_source": "--fast-base" if config.fast_base not in (None, "auto") else "auto",
        },
        "machine": facts,
        "peak": peak,
        "variants": [asdict(v) for v in [*variants, *mixed]],
        "skipped": skipped,
        "components": comp_rows,
        "tasks": task_rows,
        "errors": errors,
        "memory_method": _MEMORY_METHOD,
    }
    report["recommendation"] = recommend(report)
    return report


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
        if v.backend in ("onnxruntime", "openvino") and component in bundle.components(v.section):
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
    cpu: dict[str, list[float]] = {}

    def on_error(stage: str) -> Any:
        def record(name: str, e: Exception) -> None:
            record_error(errors, name, component, stage, e)

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
        # The reference stays loaded across groups: warmed once, in the first.
        got = interleave(calls, config, failed, on_error("run"), warm={ref_name} if gi else set())
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
                cpu[name] = w.call("cpu_samples")[-config.repeat :]
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
        record_error(errors, ref_name, component, "flops", e)
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
                "cpu_samples_s": cpu.get(name),
                "cpu_median_s": statistics.median(cpu[name]) if cpu.get(name) else None,
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
    fp32), else the variant's; under OpenVINO's bf16 hint, what that precision computes in."""
    if v.backend in ("onnxruntime", "openvino"):
        own = (bundle.components(v.section).get(component) or {}).get("precision")
        if own:
            if hint_of(v, component) == "bf16":
                return bf16_label(str(own))
            return str(own)
    return v.precision


def _peak_dtype(precision: str) -> str:
    return "int8" if precision.startswith("int8") else "bf16" if precision == "bf16" else "fp32"


def choose_fast_base(
    config: BenchConfig,
    variants: list[Variant],
    comp_rows: list[dict[str, Any]],
    skipped: list[dict[str, str]],
) -> str | None:
    """The variant the fast-profile levers run on: ``--fast-base``, or (``auto``) the variant the runtime
    can run whose every measured component met its floor in this run and whose components, weighted by
    how often one task calls them (``steps`` x UNet and ControlNet), cost least."""
    if not config.levers or config.fast_base is None:
        return None
    names = {v.name: v for v in variants}
    if config.fast_base != "auto":
        if config.fast_base not in names:
            raise UserError(
                f"--fast-base {config.fast_base!r} is not among the variants run: {', '.join(names)}"
            )
        return config.fast_base
    candidates = {}
    for v in variants:
        if v.name == config.reference or _runtime_config(v) is None:
            continue
        sources = v.settings.get("sources") or {}
        mine = [
            (row["component"], r)
            for row in comp_rows
            for r in row["results"]
            if r["variant"] == sources.get(row["component"], v.name)
        ]
        if mine and all(r["parity"]["ok"] is True for _, r in mine):
            candidates[v.name] = {c: r["median_s"] for c, r in mine}
    common = set.intersection(*(set(c) for c in candidates.values())) if candidates else set()
    if not common:
        skipped.append(
            {"variant": "fast levers", "reason": "no variant had every measured component pass its floor"}
        )
        return None
    cost = {
        n: per_task_s({c: t for c, t in comps.items() if c in common}, config.steps)
        for n, comps in candidates.items()
    }
    return min(cost, key=cost.__getitem__)


def per_task_s(medians: dict[str, float], steps: int) -> float:
    """What one task costs by its components' medians: the UNet and ControlNets run ``steps`` times, the
    rest once."""
    return sum(t * (steps if c.split(".", 1)[0] in ("unet", "controlnet") else 1) for c, t in medians.items())


def compose_mixed(
    variants: list[Variant], comp_rows: list[dict[str, Any]], skipped: list[dict[str, str]], steps: int = 4
) -> list[Variant]:
    """Per OpenVINO section measured at both inference precisions in this run, a candidate
    (``<section>@mixed``) that runs a component in bf16 where its bf16 output met the component's floor
    and ran faster than f32 (or f32 missed its floor), and in f32 everywhere else, components this run
    did not measure included. Every component of it then met its floor, so its end-to-end run is an
    exact-profile candidate (``TaskRun.profile``); ``settings["sources"]`` names, per component, the
    variant whose measurement chose it (the report judges its parity by those rows). Only the candidate
    whose chosen components cost least per task (``steps`` x UNet and ControlNet) is returned: each end-to-end
    variant costs the task phase a group beside the reference."""
    from sdkiln.runtime.backends.openvino import format_precision

    names = {v.name: v for v in variants}
    out = []
    cost: dict[str, float] = {}
    for v in variants:
        if v.backend != "openvino" or v.settings.get("inference_precision", "f32") != "f32":
            continue
        bf = names.get(f"{v.name}@bf16")
        if bf is None:
            continue
        overrides: dict[str, str] = {}
        sources: dict[str, str] = {}
        medians: dict[str, float] = {}
        for row in comp_rows:
            res = {r["variant"]: r for r in row["results"]}
            f, b = res.get(v.name), res.get(bf.name)
            if f is None:
                continue
            c = row["component"]
            bf16_pays = (
                b is not None
                and b["parity"]["ok"] is True
                and (f["parity"]["ok"] is not True or b["median_s"] < f["median_s"])
            )
            if bf16_pays:
                overrides[c] = "bf16"
            chosen = b if bf16_pays else f
            sources[c], medians[c] = chosen["variant"], chosen["median_s"]
        cost[f"{v.name}@mixed"] = per_task_s(medians, steps)
        if not overrides:
            skipped.append(
                {
                    "variant": f"{v.name}@mixed",
                    "reason": "no component ran faster in bf16 with its output above its floor",
                }
            )
            continue
        spec = format_precision("f32", overrides)
        out.append(
            Variant(
                f"{v.name}@mixed",
                "openvino",
                v.section,
                "mixed",
                {"inference_precision": spec, "sources": sources},
                f"OpenVINO CPU, {v.section}: bf16 for {', '.join(sorted(overrides))} (each above its floor "
                "and faster in this run), f32 elsewhere",
            )
        )
    if len(out) <= 1:
        return out
    best = min(out, key=lambda v: cost[v.name])
    for v in out:
        if v is not best:
            skipped.append(
                {
                    "variant": v.name,
                    "reason": f"its components cost {cost[v.name]:.2f} s per task in this run, "
                    f"{best.name}'s {cost[best.name]:.2f} s: only the cheapest composition runs end to end",
                }
            )
    return [best]
