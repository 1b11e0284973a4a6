"""TensorRT backend: engines for this GPU from the bundle, or built on first use from its TensorRT-ready ONNX.

    pipe = sdkiln.runtime.load("artifacts/tiny-nvidia", backend="tensorrt")     # cuda_graphs=True to capture

Which engine runs a component, in order:

1. an engine section of the bundle (``build_tensorrt`` output, kind ``tensorrt_engine``) built for this
   GPU generation and TensorRT version (``sm90-trt10.8.0.43``) from exactly the graph files this bundle
   holds (their sha256s are in both manifests);
2. an engine this machine built before, in ``~/.cache/sdkiln/trt`` (``$SDKILN_TRT_CACHE``), keyed by the
   graph's sha256, the GPU + TensorRT tag and the build settings;
3. otherwise it is built now from the TensorRT-ready ONNX with the profile the bundle recorded and the
   machine's persistent timing cache (minutes for a real UNet, once per GPU), and cached as in 2.

Execution: every context is created with user-managed device memory and they all share **one** device
allocation sized to the largest engine's need (components run one after another on one stream, so their
scratch memory never overlaps in time). I/O lives in per-shape device buffers with pinned host staging;
inputs are checked against the manifest's I/O spec (and the engine's profile) before anything runs.
With ``cuda_graphs=True`` each engine call at a given shape (copies in, ``execute_async_v3``, copies out)
is captured once after a warm-up run and replayed after that: the denoising step becomes two graph
launches (ControlNet, UNet) plus the numpy scheduler.

Needs TensorRT 10+ and NVIDIA's ``cuda-bindings``; both are imported only when a backend is made, and
their absence is a UserError that says how to install them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdkiln.runtime.backends import nvidia
from sdkiln.runtime.backends.tensorrt_build import (
    BuildSettings,
    build_engine,
    in_profile,
    refit_engine,
)
from sdkiln.runtime.contract.errors import InputSpecError, UserError
from sdkiln.runtime.contract.specs import ComponentIO, check_inputs

logger = logging.getLogger(__name__)

ENGINE_KIND = "tensorrt_engine"
ONNX_KIND = "tensorrt"


@dataclass(frozen=True)
class EngineSource:
    """Where a component's engine comes from: a bundle plan file or the user cache, or a build."""

    component: str
    plan: Path | None  # an existing plan file (bundle or cache)
    graph: Path  # the TensorRT-ready ONNX it was (or will be) built from
    graph_key: str  # sha256 over the graph's files (from the manifest)
    settings: BuildSettings
    origin: str  # "bundle", "cache" or "build"
    strip_weights: bool = False


def graph_key(files: dict[str, str]) -> str:
    """A graph's identity from its files' sha256s ({relpath: sha256}), independent of where it lives."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()


def component_files(manifest_files: dict[str, Any], section: str, graph_rel: str) -> dict[str, str]:
    """{relpath inside the section: sha256} of one component's graph folder, read from a bundle manifest."""
    prefix = f"{section}/" if section else ""  # "": a cache entry's own file table
    folder = f"{prefix}{graph_rel.rsplit('/', 1)[0]}/"
    return {
        rel[len(prefix) :]: meta["sha256"] if isinstance(meta, dict) else meta.sha256
        for rel, meta in manifest_files.items()
        if rel.startswith(folder) and not rel.endswith((".json", ".txt"))
    }


def choose_engine(
    component: str,
    graph_files: dict[str, str],
    tag: str,
    engine_sections: list[tuple[Path, Any]],
) -> tuple[Path, dict[str, Any]] | None:
    """The bundle engine for ``component`` built for ``tag`` from exactly ``graph_files``, if any:
    (plan path, its record). ``engine_sections``: (folder, Section) pairs. Pure bookkeeping; no TensorRT."""
    for folder, entry in engine_sections:
        details = entry.details
        if (details.get("target") or {}).get("tag") != tag:
            continue
        eng = (details.get("engines") or {}).get(component)
        if not eng or eng.get("source_files") != graph_files:
            continue
        return folder / eng["path"], eng
    return None


def describe_engines(engine_sections: list[tuple[Path, Any]]) -> str:
    tags = sorted({(e.details.get("target") or {}).get("tag", "?") for _, e in engine_sections})
    return ", ".join(tags) or "none"


@dataclass
class _Slot:
    """Buffers (and an optional captured graph) for one set of input shapes."""

    shapes: dict[str, tuple[int, ...]]
    device: dict[str, Any] = field(default_factory=dict)  # tensor -> DeviceBuffer
    host: dict[str, np.ndarray] = field(default_factory=dict)  # tensor -> pinned array
    graph: Any = None
    runs: int = 0


class DevicePool:
    """One device allocation that every execution context uses as its scratch memory."""

    def __init__(self, rt: Any):
        self._rt = rt
        self.buffer: Any = None
        self.generation = 0

    def ensure(self, nbytes: int) -> bool:
        """Grow to at least ``nbytes``; True if the allocation moved (contexts must be rebound)."""
        if self.buffer is not None and self.buffer.nbytes >= nbytes:
            return False
        if self.buffer is not None:
            self._rt.free(self.buffer)
        self.buffer = self._rt.malloc(nbytes)
        self.generation += 1
        logger.debug("TensorRT device memory pool: %.1f MiB", nbytes / 2**20)
        return True


class EngineHost:
    """What the engines of one process share: TensorRT, the CUDA runtime, one stream and one device
    memory pool. ``open`` turns a serialized engine into a runnable component."""

    def __init__(self, device: int = 0, cuda_graphs: bool = False):
        from sdkiln.runtime.backends.cuda_rt import CudaRuntime

        self.trt = nvidia.require_tensorrt()
        self.rt = CudaRuntime.open(device)
        self.tag = nvidia.engine_tag(self.rt.compute_capability, self.trt.__version__)
        self.stream = self.rt.stream()
        self.pool = DevicePool(self.rt)
        self.cuda_graphs = cuda_graphs
        self.runtime = self.trt.Runtime(_logger(self.trt))
        self.components: list[TensorrtComponent] = []

    def deserialize(self, data: bytes, what: str) -> Any:
        engine = self.runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise UserError(
                f"{what}: TensorRT {self.trt.__version__} cannot load this engine (built for another GPU or "
                "TensorRT version, or truncated); rebuild it"
            )
        return engine

    def open(self, name: str, engine: Any, io: ComponentIO, profile: dict) -> TensorrtComponent:
        comp = TensorrtComponent(name, io, engine, self, profile)
        if self.pool.ensure(comp.device_memory):
            for other in self.components:
                other.drop_graphs()
        self.components.append(comp)
        return comp


class TensorrtComponent:
    """One engine behind the numpy component interface."""

    def __init__(self, name: str, io: ComponentIO, engine: Any, backend: EngineHost, profile: dict):
        trt = backend.trt
        self.name = name
        self.io = io
        self.engine = engine
        self._backend = backend
        self._profile = profile
        self._slots: dict[tuple, _Slot] = {}
        self._active: tuple | None = None
        self._pool_generation = -1
        self.context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self.context is None:
            raise UserError(f"{name}: TensorRT could not create an execution context (out of GPU memory?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in self._inputs]
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        problems = []
        if set(self._inputs) != set(io.inputs):
            problems.append(f"inputs: manifest {sorted(io.inputs)}, engine {sorted(self._inputs)}")
        missing = set(io.outputs) - set(self._outputs)
        if missing:
            problems.append(f"outputs {sorted(missing)} are not in the engine")
        if problems:
            raise UserError(
                f"{name}: the engine does not match the bundle's I/O spec: " + "; ".join(problems)
            )
        # TensorRT 10.1+ (and 11) name it device_memory_size_v2; 10.0 has only the old property.
        size = getattr(engine, "device_memory_size_v2", None)
        self.device_memory = int(size if size is not None else engine.device_memory_size)

    # -- binding ---------------------------------------------------------------------------------------

    def _bind_memory(self) -> None:
        pool = self._backend.pool
        if self._pool_generation != pool.generation:
            if hasattr(self.context, "set_device_memory"):  # 10.1+
                self.context.set_device_memory(pool.buffer.ptr, pool.buffer.nbytes)
            else:
                self.context.device_memory = pool.buffer.ptr
            self._pool_generation = pool.generation
            self.drop_graphs()  # captured graphs point at the old scratch memory

    def drop_graphs(self) -> None:
        for slot in self._slots.values():
            if slot.graph is not None:
                self._backend.rt.destroy_graph(slot.graph)
                slot.graph = None
            slot.runs = 0

    def _slot(self, shapes: dict[str, tuple[int, ...]]) -> _Slot:
        key = tuple(sorted(shapes.items()))
        slot = self._slots.get(key)
        ctx, rt = self.context, self._backend.rt
        if slot is None:
            slot = _Slot(shapes)
            for n in self._inputs:
                ctx.set_input_shape(n, shapes[n])
            all_shapes = dict(shapes)
            for n in self._outputs:
                all_shapes[n] = tuple(int(d) for d in ctx.get_tensor_shape(n))
                if any(d < 0 for d in all_shapes[n]):
                    raise UserError(f"{self.name}: TensorRT could not infer the shape of output {n}")
            for n, shape in all_shapes.items():
                host = rt.pinned(self._dtypes[n], shape)
                slot.host[n] = host
                slot.device[n] = rt.malloc(host.nbytes)
            self._slots[key] = slot
            self._active = None
        if self._active != key:
            for n in self._inputs:
                ctx.set_input_shape(n, shapes[n])
            for n, buf in slot.device.items():
                ctx.set_tensor_address(n, buf.ptr)
            self._active = key
        return slot

    # -- running ---------------------------------------------------------------------------------------

    def _enqueue(self, slot: _Slot, stream: int) -> None:
        rt = self._backend.rt
        for n in self._inputs:
            rt.htod(slot.device[n].ptr, slot.host[n], stream)
        if not self.context.execute_async_v3(stream):
            raise UserError(f"{self.name}: TensorRT execution failed (see the TensorRT errors logged above)")
        for n in self._outputs:
            rt.dtoh(slot.host[n], slot.device[n].ptr, stream)

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        check_inputs(self.name, self.io, inputs)
        shapes = {n: tuple(int(d) for d in a.shape) for n, a in inputs.items()}
        problems = in_profile(shapes, self._profile)
        if problems:
            raise InputSpecError(
                f"{self.name}: " + "; ".join(problems) + " (rebuild the engine with a wider profile)"
            )
        backend = self._backend
        rt, stream = backend.rt, backend.stream
        self._bind_memory()
        slot = self._slot(shapes)
        for n in self._inputs:
            np.copyto(
                slot.host[n], inputs[n], casting="same_kind" if inputs[n].dtype.kind == "f" else "unsafe"
            )
        if slot.graph is not None:
            rt.launch(slot.graph, stream)
        elif backend.cuda_graphs and slot.runs >= 1:
            # Captured after one plain run at this shape: TensorRT does its shape-dependent setup then.
            rt.begin_capture(stream)
            try:
                self._enqueue(slot, stream)
            except BaseException:
                with contextlib.suppress(Exception):  # leave the stream out of capture mode
                    rt.destroy_graph(rt.end_capture(stream))
                raise
            slot.graph = rt.end_capture(stream)
            rt.launch(slot.graph, stream)
        else:
            self._enqueue(slot, stream)
        rt.sync(stream)
        slot.runs += 1
        # Copies: the pinned buffers are reused by the next call.
        return {n: slot.host[n].copy() for n in self._outputs if n in self.io.outputs or not self.io.outputs}


class TensorrtBackend:
    """The TensorRT engines of one bundle (its TensorRT-ready ONNX section plus any engine sections)."""

    name = "tensorrt"

    def __init__(
        self,
        folder: Path,
        entry: Any,
        manifest_files: dict[str, Any],
        section: str,
        engine_sections: list[tuple[Path, Any]] | None = None,
        *,
        cuda_graphs: bool = False,
        build: bool = True,
        cache_dir: Path | None = None,
        device: int = 0,
        optimization_level: int = 3,
    ):
        self.host = EngineHost(device, cuda_graphs)
        self.trt, self.rt, self.tag = self.host.trt, self.host.rt, self.host.tag
        self._folder = folder
        self._entries = {k: v.model_dump(mode="json") for k, v in entry.components.items()}
        self._profiles = entry.details.get("profiles") or {}
        self._files = manifest_files
        self._section = section
        self._engine_sections = engine_sections or []
        self._build = build
        self._cache = cache_dir or nvidia.user_cache_dir()
        self._level = optimization_level
        self._loaded: dict[str, TensorrtComponent] = {}
        self.origins: dict[str, str] = {}
        self.description = f"TensorRT {self.trt.__version__} on {self.rt.name} ({self.tag}{', CUDA graphs' if cuda_graphs else ''})"

    def has(self, component: str) -> bool:
        return component in self._entries

    def source(self, component: str) -> EngineSource:
        """Where ``component``'s engine will come from (no TensorRT work)."""
        entry = self._entries[component]
        graph = self._folder / entry["path"]
        files = component_files(self._files, self._section, entry["path"])
        key = graph_key(files)
        profile = self._profiles.get(component)
        if not profile:
            raise UserError(f"{component}: the bundle's TensorRT section records no shape profile for it")
        chosen = choose_engine(component, files, self.tag, self._engine_sections)
        if chosen is not None:
            plan, eng = chosen
            settings = BuildSettings(**eng["settings"])
            # A quantized engine's own graph (Q/DQ inserted) lives beside it; refits read that one.
            own = plan.parent.parent / eng["graph"] if eng.get("graph") else graph
            return EngineSource(component, plan, own, key, settings, "bundle", settings.strip_weights)
        settings = BuildSettings(profile=profile, refit="full", optimization_level=self._level)
        cached = nvidia.cached_engine_dir(self._cache, key, self.tag, settings.digest()) / f"{component}.plan"
        if cached.is_file():
            return EngineSource(component, cached, graph, key, settings, "cache")
        if not self._build:
            raise UserError(
                f"{component}: no TensorRT engine for this GPU and TensorRT ({self.tag}) in the bundle "
                f"(it has: {describe_engines(self._engine_sections)}) or in {self._cache}, and building "
                "on first use is off (build=False)"
            )
        return EngineSource(component, None, graph, key, settings, "build")

    def _engine(self, src: EngineSource) -> Any:
        if src.plan is None:
            out = nvidia.cached_engine_dir(self._cache, src.graph_key, self.tag, src.settings.digest())
            logger.warning(
                "building the TensorRT engine for %s on this GPU (%s); this takes a while once, then it is "
                "cached in %s",
                src.component,
                self.tag,
                out,
            )
            t0 = time.perf_counter()
            timing = nvidia.timing_cache_path(self._cache, self.tag)
            data, _ = build_engine(self.trt, src.graph, src.settings, timing, name=src.component)
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / f".{src.component}.plan.tmp"
            tmp.write_bytes(data)
            tmp.replace(out / f"{src.component}.plan")
            logger.info("built %s in %.0f s", src.component, time.perf_counter() - t0)
        else:
            data = src.plan.read_bytes()
        engine = self.host.deserialize(data, f"{src.component} ({src.plan or 'just built'})")
        if src.strip_weights:
            refit_engine(self.trt, engine, src.graph, name=src.component)
        return engine

    def component(self, component: str) -> TensorrtComponent:
        if component not in self._loaded:
            if component not in self._entries:
                raise UserError(
                    f"this bundle section has no {component} (it has: {', '.join(sorted(self._entries))})"
                )
            src = self.source(component)
            engine = self._engine(src)
            io = ComponentIO.from_manifest(self._entries[component])
            self._loaded[component] = self.host.open(component, engine, io, src.settings.profile)
            self.origins[component] = src.origin
        return self._loaded[component]

    def refit(self, onnx_folder: Path) -> dict[str, int]:
        """Swap in new weights (another LoRA fused into the same architecture) from a TensorRT-ready ONNX
        folder of the same layout, without rebuilding; returns the weights refitted per component."""
        done = {}
        for name, comp in self._loaded.items():
            path = Path(onnx_folder) / self._entries[name]["path"]
            if not path.is_file():
                raise UserError(f"{name}: {path} not found; refit needs the same layout as the bundle")
            done[name] = refit_engine(self.trt, comp.engine, path, name=name)
            comp.drop_graphs()
        return done


def _logger(trt: Any) -> Any:
    from sdkiln.runtime.backends.tensorrt_build import trt_logger

    return trt_logger(trt)
