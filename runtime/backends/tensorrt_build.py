"""Build and refit TensorRT engines from TensorRT-ready ONNX graphs (the TensorRT 10/11 Python API).

Shared by the ``build_tensorrt`` stage (engines that go into a bundle) and the runtime's TensorRT backend
(engines built on a user's machine on first use), so both build the same way:

- **Strongly typed networks.** The graph's own types decide precision: ``prepare_tensorrt`` writes fp16
  weights and compute with fp32 graph I/O, and the INT8/FP8 variants carry explicit Q/DQ nodes. This is
  the only mode TensorRT 11 has (its ``BuilderFlag.FP16/INT8/FP8`` and calibrators are gone) and works
  the same on TensorRT 10, so one code path serves both.
- **One optimization profile** per engine: min/opt/max of every graph input, from the recipe
  (``profiles`` in the TensorRT-ready section's manifest) or a static shape.
- **A persistent timing cache** per GPU generation and TensorRT version: read before the build, merged
  and written back atomically under a lock after it, so later builds (and other components with the
  same layers) skip the kernel timing they already did.
- **Refit.** ``refit="full"`` makes every weight refittable (``BuilderFlag.REFIT``): a different LoRA is
  a new set of weights for the same graph, refitted from its ONNX in seconds instead of a rebuild.
  ``strip_weights`` drops refittable weights from the plan (``STRIP_PLAN``); the runtime refits them
  from the bundle's ONNX at load (which then must be the same graph, checked by ``graph_fingerprint``).

Nothing here imports TensorRT at module level; callers pass the module (``nvidia.require_tensorrt()``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from sdkiln.runtime.contract.errors import BuildError, UserError

logger = logging.getLogger(__name__)

Refit = Literal["none", "identical", "full"]
HardwareCompat = Literal["none", "ampere_plus", "same_compute_capability"]
Profile = dict[str, dict[str, list[int]]]  # input -> {"min": [...], "opt": [...], "max": [...]}


@dataclass(frozen=True)
class BuildSettings:
    """Everything besides the graph that changes an engine: part of its cache key."""

    profile: Profile
    refit: Refit = "full"
    strip_weights: bool = False
    optimization_level: int = 3  # TensorRT's default; 5 searches longest, 0-2 build fastest
    workspace_mib: int | None = None  # None: TensorRT's default (the GPU's memory)
    hardware_compatibility: HardwareCompat = "none"
    extra: dict[str, Any] = field(default_factory=dict)

    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def __post_init__(self) -> None:
        if self.strip_weights and self.refit == "none":
            raise UserError("strip_weights needs refittable weights (refit: identical or full)")
        if not 0 <= self.optimization_level <= 5:
            raise UserError(f"optimization_level must be 0..5 (got {self.optimization_level})")
        check_profile(self.profile)


def check_profile(profile: Profile) -> None:
    """UserError unless every input has min <= opt <= max, all of one rank."""
    problems = []
    for name, levels in profile.items():
        missing = {"min", "opt", "max"} - set(levels)
        if missing:
            problems.append(f"{name}: missing {', '.join(sorted(missing))}")
            continue
        lo, opt, hi = levels["min"], levels["opt"], levels["max"]
        if not len(lo) == len(opt) == len(hi):
            problems.append(f"{name}: min/opt/max have different ranks ({lo}, {opt}, {hi})")
        elif not all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
            problems.append(f"{name}: needs min <= opt <= max on every axis (got {lo}, {opt}, {hi})")
        elif any(d < 1 for d in lo):
            problems.append(f"{name}: sizes must be >= 1 (got min {lo})")
    if problems:
        raise UserError("bad optimization profile: " + "; ".join(problems))


def static_profile(profile: Profile, level: str = "opt") -> Profile:
    """The profile pinned to one of its levels (min = opt = max): a static engine, fastest to build and run."""
    return {name: {k: list(levels[level]) for k in ("min", "opt", "max")} for name, levels in profile.items()}


def match_profile(network_inputs: dict[str, tuple[int, ...]], profile: Profile) -> list[str]:
    """Problems between a network's inputs (name -> shape, -1 for dynamic axes) and a profile."""
    problems = []
    for name, shape in network_inputs.items():
        if name not in profile:
            problems.append(f"input {name!r} has no profile entry")
            continue
        for level in ("min", "opt", "max"):
            dims = profile[name][level]
            if len(dims) != len(shape):
                problems.append(
                    f"{name}: profile {level} {dims} has rank {len(dims)}, the graph's is {len(shape)}"
                )
                break
            fixed = [(i, s, d) for i, (s, d) in enumerate(zip(shape, dims, strict=True)) if s >= 0 and s != d]
            if fixed:
                i, s, d = fixed[0]
                problems.append(
                    f"{name}: axis {i} is fixed at {s} in the graph but the profile {level} says {d}"
                )
                break
    for name in profile:
        if name not in network_inputs:
            problems.append(f"profile entry {name!r} is not a graph input")
    return problems


def in_profile(shapes: dict[str, tuple[int, ...]], profile: Profile) -> list[str]:
    """Problems if concrete input shapes fall outside a profile's [min, max] box (runtime check)."""
    problems = []
    for name, shape in shapes.items():
        levels = profile.get(name)
        if levels is None:
            continue
        lo, hi = levels["min"], levels["max"]
        if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
            problems.append(f"{name}: shape {list(shape)} is outside the engine's profile {lo}..{hi}")
    return problems


# --------------------------------------------------------------------------------------------------
# Graph identity for refit bookkeeping (CPU only: onnx, no TensorRT)


def graph_fingerprint(onnx_path: Path) -> str:
    """sha256 of a graph's structure without its weight values: nodes (op, inputs, outputs, attributes),
    graph I/O and each initializer's name, dtype and shape. Two exports of the same architecture with
    different weights (another LoRA fused in) share it; an engine can be refitted only from a graph that
    has its fingerprint."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    g = model.graph
    h = hashlib.sha256()

    def put(*parts: Any) -> None:
        h.update(json.dumps(parts, separators=(",", ":"), default=str).encode())
        h.update(b"\n")

    for init in g.initializer:
        put("init", init.name, int(init.data_type), list(init.dims))
    for node in g.node:
        attrs = []
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:  # constants are weights too: shape and type only
                attrs.append((a.name, "tensor", int(a.t.data_type), list(a.t.dims)))
            else:
                attrs.append((a.name, str(onnx.helper.get_attribute_value(a))))
        put("node", node.op_type, node.domain, list(node.input), list(node.output), attrs)
    for io, values in (("in", g.input), ("out", g.output)):
        for v in values:
            put(io, v.name, str(v.type))
    return h.hexdigest()


def weight_digests(onnx_path: Path) -> dict[str, str]:
    """sha256 of every initializer's bytes, by name (external data read from beside the file)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    base = str(Path(onnx_path).parent)
    out = {}
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init, base_dir=base)
        out[init.name] = hashlib.sha256(arr.tobytes()).hexdigest()
    return out


@dataclass(frozen=True)
class RefitPlan:
    """What refitting an engine from a new graph changes: weights whose bytes differ, and problems."""

    changed: tuple[str, ...]
    unchanged: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def plan_refit(
    old: dict[str, str], new: dict[str, str], refittable: set[str] | None, fingerprints: tuple[str, str]
) -> RefitPlan:
    """Compare the digests of the graph an engine was built from (``old``) with a new one's.

    ``refittable``: the weight names the engine reported refittable at build (None: not recorded).
    A changed weight that the engine cannot refit (folded into a fused kernel, or the engine built
    without ``refit: full``) makes the plan fail: only a rebuild gives the new weights.
    """
    problems = []
    if fingerprints[0] != fingerprints[1]:
        problems.append(
            "the new graph has a different structure (another architecture, export settings or "
            "precision): rebuild the engine instead"
        )
    changed = tuple(sorted(n for n in new if n in old and new[n] != old[n]))
    if refittable is not None:
        stuck = [n for n in changed if n not in refittable]
        if stuck:
            shown = ", ".join(stuck[:5]) + (f" and {len(stuck) - 5} more" if len(stuck) > 5 else "")
            problems.append(f"{len(stuck)} changed weight(s) are not refittable in this engine ({shown})")
    unchanged = sum(1 for n in new if n in old and new[n] == old[n])
    return RefitPlan(changed, unchanged, tuple(problems))


# --------------------------------------------------------------------------------------------------
# Timing cache: one file per GPU generation + TensorRT version, merged under a lock


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def read_timing_cache(path: Path | None) -> bytes:
    if path is None or not path.is_file():
        return b""
    with _locked(path):
        return path.read_bytes()


def write_timing_cache(trt: Any, config: Any, path: Path) -> int:
    """Merge the builder's timing cache with what is on disk now (another build may have added to it),
    then replace the file atomically. Returns the bytes written."""
    with _locked(path):
        cache = config.get_timing_cache()
        if path.is_file():
            on_disk = config.create_timing_cache(path.read_bytes())
            cache.combine(on_disk, True)  # ignore_mismatch: entries of another device are skipped
        data = bytes(memoryview(cache.serialize()))
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return len(data)


# --------------------------------------------------------------------------------------------------
# Building and refitting (needs TensorRT and a GPU)


def trt_logger(trt: Any) -> Any:
    """A TensorRT logger that forwards to ``logging`` (the library must not print)."""

    class Forward(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            level = int(severity)  # INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3, VERBOSE 4
            if level <= 1:
                logger.error("TensorRT: %s", msg)
            elif level == 2:
                logger.warning("TensorRT: %s", msg)
            else:
                logger.debug("TensorRT: %s", msg)

    return Forward()


def _parser_errors(parser: Any) -> list[str]:
    return [str(parser.get_error(i)) for i in range(parser.num_errors)]


def build_engine(
    trt: Any, onnx_path: Path, settings: BuildSettings, timing_cache: Path | None, name: str = ""
) -> tuple[bytes, dict[str, Any]]:
    """Build a serialized engine (plan) from a TensorRT-ready ONNX file; returns it and build facts
    (input/output names, refittable weights, timing-cache size)."""
    what = name or onnx_path.name
    log = trt_logger(trt)
    builder = trt.Builder(log)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errors = _parser_errors(parser)
        raise BuildError(f"{what}: TensorRT's ONNX parser refused {onnx_path}:\n  " + "\n  ".join(errors))
    inputs = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        inputs[t.name] = tuple(int(d) for d in t.shape)
    problems = match_profile(inputs, settings.profile)
    if problems:
        raise UserError(f"{what}: the optimization profile does not fit the graph: " + "; ".join(problems))

    config = builder.create_builder_config()
    if settings.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    config.builder_optimization_level = settings.optimization_level
    if settings.refit == "full":
        config.set_flag(trt.BuilderFlag.REFIT)
    elif settings.refit == "identical":
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
    if settings.strip_weights:
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
    if settings.hardware_compatibility != "none":
        config.hardware_compatibility_level = getattr(
            trt.HardwareCompatibilityLevel, settings.hardware_compatibility.upper()
        )
    profile = builder.create_optimization_profile()
    for inp, levels in settings.profile.items():
        profile.set_shape(inp, levels["min"], levels["opt"], levels["max"])
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(read_timing_cache(timing_cache))
    config.set_timing_cache(cache, False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(f"{what}: TensorRT could not build an engine (see the TensorRT errors logged above)")
    facts: dict[str, Any] = {
        "inputs": sorted(inputs),
        "outputs": sorted(network.get_output(i).name for i in range(network.num_outputs)),
    }
    if timing_cache is not None:
        facts["timing_cache_bytes"] = write_timing_cache(trt, config, timing_cache)
    data = bytes(memoryview(plan))
    if settings.refit != "none":
        runtime = trt.Runtime(log)
        engine = runtime.deserialize_cuda_engine(data)
        facts["refittable"] = sorted(trt.Refitter(engine, log).get_all_weights())
        del engine
    return data, facts


def refit_engine(trt: Any, engine: Any, onnx_path: Path, name: str = "") -> int:
    """Refit every refittable weight of a deserialized engine from an ONNX file (same graph structure,
    new weight values); returns how many weights the engine holds. Raises BuildError on failure."""
    what = name or onnx_path.name
    log = trt_logger(trt)
    refitter = trt.Refitter(engine, log)
    parser_refitter = trt.OnnxParserRefitter(refitter, log)
    if not parser_refitter.refit_from_file(str(onnx_path)):
        errors = _parser_errors(parser_refitter)
        raise BuildError(f"{what}: cannot refit from {onnx_path}:\n  " + "\n  ".join(errors))
    missing = list(refitter.get_missing_weights())
    if missing:
        raise BuildError(
            f"{what}: {onnx_path} lacks {len(missing)} weight(s) the engine needs: {missing[:5]}"
        )
    if not refitter.refit_cuda_engine():
        raise BuildError(f"{what}: TensorRT refused the new weights (see the TensorRT errors logged above)")
    return len(refitter.get_all_weights())


def graph_sha256(onnx_path: Path) -> str:
    """sha256 over a graph file and its external data file(s), in a fixed order: what a cached engine
    built from it is keyed by."""
    from sdkiln.runtime.contract.digest import sha256_file

    h = hashlib.sha256()
    folder = Path(onnx_path).parent
    for p in [onnx_path, *sorted(q for q in folder.iterdir() if q.is_file() and q != Path(onnx_path))]:
        if p.suffix in (".json", ".txt"):
            continue
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()
