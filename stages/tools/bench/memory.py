"""How many variants fit in memory at once: per-variant estimates, groups interleaved with the reference
within a budget, and the interleaving order itself."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from sdkiln.stages.tools.bench.machine import _read
from sdkiln.stages.tools.bench.variants import (
    BenchConfig,
    Bundle,
    Variant,
    artifact_bytes,
    torch_folder,
)
from sdkiln.stages.tools.bench.worker import WorkerError

logger = logging.getLogger(__name__)


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
        if v.backend in ("onnxruntime", "openvino"):  # OpenVINO also keeps reordered copies
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


def interleave(
    calls: dict[str, Any],
    config: BenchConfig,
    failed: set[str],
    on_error: Any,
    warm: frozenset[str] | set[str] = frozenset(),
) -> dict[str, list[Any]]:
    """Warm-up rounds, then timed rounds; each round calls every member once, in order (A B C A B C).
    Members in ``warm`` (still loaded and warmed by an earlier group, as the reference is) skip the
    warm-up rounds. A member that fails is dropped from later rounds; ``on_error(name, exc)`` records it."""
    out: dict[str, list[Any]] = {name: [] for name in calls}
    for i in range(config.warmup + config.repeat):
        for name, fn in calls.items():
            if name in failed or (i < config.warmup and name in warm):
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
