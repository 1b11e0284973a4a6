"""Inputs, parity against the reference, floors and summaries of timed samples."""

from __future__ import annotations

import logging
import math
import statistics
from typing import Any

from sdkiln.stages.tools.bench.variants import base_component

# --------------------------------------------------------------------------------------------------
# Inputs, parity and statistics (parent side, numpy only)


logger = logging.getLogger(__name__)


def make_inputs(
    component: str, spec_inputs: list[dict[str, Any]], bindings: dict[str, int], seed: int, vocab_size: int
) -> dict[str, Any]:
    """Seeded inputs for one component from its manifest I/O spec, in the ranges the runtime feeds."""
    import numpy as np

    from sdkiln.runtime.contract.specs import resolve_shape

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
    """The contract's gate for a component at a precision (fp32: max abs + cosine; others: SQNR)."""
    from sdkiln.runtime.contract.floors import gate

    try:
        g = gate(component, precision)
    except KeyError:
        return None
    return {
        k: v
        for k, v in (("max_abs", g.max_abs), ("min_cosine", g.min_cosine), ("min_sqnr_db", g.min_sqnr_db))
        if v is not None
    }


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


def record_error(errors: list[dict[str, Any]], variant: str, what: str, stage: str, e: Exception) -> None:
    logger.warning("%s on %s failed at %s: %s", variant, what, stage, str(e).splitlines()[0])
    errors.append({"variant": variant, "component": what, "stage": stage, "error": str(e)})


def deviation(reference: dict[str, Any], output: dict[str, Any]) -> dict[str, Any]:
    """How far a task's output is from the reference's: image PSNR (dB, peak 1) and SSIM of the first
    image, max abs pixel difference, and SQNR (dB) of the final latents. ``None`` dB: bit-identical."""
    from sdkiln.runtime.contract.metrics import EXACT_DB, compare, compare_images

    img = compare_images(reference["pixels"][0], output["pixels"][0])
    out: dict[str, Any] = {
        "psnr_db": None if img["psnr_db"] >= EXACT_DB else img["psnr_db"],
        "ssim": img["ssim"],
        "max_abs": img["max_abs"],
        "latents_sqnr_db": None,
    }
    a, b = reference.get("latents"), output.get("latents")
    if a is not None and b is not None and a.shape == b.shape:
        sqnr = compare(a, b)["sqnr_db"]
        out["latents_sqnr_db"] = None if sqnr >= EXACT_DB else round(sqnr, 3)
    return out


def e2e_floor_for(precisions: list[str]) -> float:
    """The contract's end-to-end PSNR floor for a run whose components compute in ``precisions``: the
    lowest floor among them (bf16 takes fp16's, as the component gates do; ``int8+bf16`` int8's)."""
    from sdkiln.runtime.contract.floors import e2e_floor

    labels = sorted({_e2e_label(p) for p in precisions}) or ["fp32"]
    return e2e_floor(labels[0]) if len(labels) == 1 else e2e_floor("mixed", labels)


def _e2e_label(precision: str) -> str:
    if precision.startswith("int8"):
        return "int8"
    return {"bf16": "fp16", "bf32": "fp16"}.get(precision, precision)
