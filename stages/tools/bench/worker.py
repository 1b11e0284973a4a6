"""Worker processes, one per variant: the parent side (Worker, a pool) and the child side that serves
requests (``python -m sdkiln.stages.tools.bench.worker``).

(Both sides in one module on purpose: they speak one pickle protocol of (op, kwargs) requests, and each
request's parent call and child handler are easiest to check side by side.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import select
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sdkiln.runtime.contract.errors import BuildError, UserError
from sdkiln.stages.tools.bench.machine import _np_gemm, _ort_gemm, _ov_gemm, _probe, _read, _torch_gemm
from sdkiln.stages.tools.bench.variants import WEIGHT_MODULES, Bundle, Variant, base_component, torch_folder

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
            [sys.executable, "-m", "sdkiln.stages.tools.bench.worker", "--worker"],
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
# Worker (child side). Everything below runs in ``python -m sdkiln.stages.tools.bench.worker --worker``.


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
        self.kernels: dict[str, Any] | None = None
        self.cpu: list[float] = []

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
        try:
            import openvino  # noqa: F401
        except ImportError as e:
            probes.append({"name": "openvino", "dtype": "fp32", "error": str(e)})
            return probes
        for mode, dtype in (("f32", "fp32"), ("bf16", "bf16"), ("int8", "int8")):
            probes.append(
                _probe(
                    f"openvino MatMul {mode}", dtype, max_n, lambda n, m=mode: _ov_gemm(n, m, self.threads)
                )
            )
        return probes

    # -- components ----------------------------------------------------------------------------------

    def load(self, component: str, feeds: dict[str, Any]) -> dict[str, Any]:
        self.unload()
        self.memory_reset = _reset_peak()
        self.baseline = _memory()["VmRSS"]
        t0 = time.perf_counter()
        assert self.variant is not None and self.bundle is not None
        self.kernels = None
        self.cpu: list[float] = []
        if self.variant["backend"] == "torch":
            weight_bytes = self._load_torch(component, feeds)
        elif self.variant["backend"] == "openvino":
            weight_bytes = self._load_ov(component, feeds)
        else:
            weight_bytes = self._load_ort(component, feeds)
        out = {"load_s": time.perf_counter() - t0, "weight_bytes": weight_bytes}
        if self.kernels is not None:
            out["kernels"] = self.kernels
        return out

    def _load_ov(self, component: str, feeds: dict[str, Any]) -> int | None:
        """The runtime's own OpenVINO component (compiled as ``sdkiln run`` compiles it)."""
        from sdkiln.runtime.backends.openvino import OpenVinoBackend
        from sdkiln.stages.common.openvino.io import runtime_census

        assert self.variant is not None and self.bundle is not None
        section = self.variant["section"]
        entries = Bundle.open(self.bundle).components(section)
        if component not in entries:
            raise UserError(f"{section} has no {component}")
        backend = OpenVinoBackend(
            self.bundle / section,
            entries,
            inference_precision=self.variant["settings"].get("inference_precision", "f32"),
            threads=self.threads,
        )
        comp = backend.component(component)
        run_feeds = {k: v for k, v in feeds.items() if k in comp.io.inputs}
        out_names = list(comp.io.outputs)
        self.kernels = {
            "source": "OpenVINO execution graph (layerType:runtimePrecision)",
            "nodes": runtime_census(comp.compiled),
        }
        self.model = comp
        self.fn = lambda: comp(**run_feeds)
        self.to_numpy = lambda outs: {n: outs[n] for n in out_names}
        return None

    def _load_ort(self, component: str, feeds: dict[str, Any]) -> int | None:
        import onnxruntime as ort

        assert self.variant is not None and self.bundle is not None
        section = self.variant["section"]
        entry = Bundle.open(self.bundle).components(section).get(component)
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
        # Profile one call to see which kernels ran (QLinearConv vs ConvInteger vs fp32 Conv), then stop
        # profiling: the timed calls are not profiled.
        import tempfile

        prof_dir = tempfile.mkdtemp(prefix="sdkiln-bench-prof-")
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(prof_dir) / "ort")
        session = ort.InferenceSession(
            str(self.bundle / section / entry["path"]), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        # + optional inputs (an ONNX UNet's zero-default ControlNet residuals: overridable initializers to ORT)
        names = {i.name for i in session.get_inputs()}
        run_names = names | {i.name for i in session.get_overridable_initializers()}
        missing = names - set(feeds)
        if missing:
            raise UserError(f"{component}: the graph wants inputs the spec lacks: {sorted(missing)}")
        run_feeds = {k: v for k, v in feeds.items() if k in run_names}
        out_names = [o.name for o in session.get_outputs()]
        session.run(out_names, run_feeds)
        self.kernels = ort_kernels(session.end_profiling())
        import shutil

        shutil.rmtree(prof_dir, ignore_errors=True)

        def fn() -> list[Any]:
            return session.run(out_names, run_feeds)

        self.model = session
        self.fn = fn
        self.to_numpy = lambda outs: dict(zip(out_names, outs, strict=True))
        return None

    def _load_torch(self, component: str, feeds: dict[str, Any]) -> int:
        import diffusers
        import torch

        from sdkiln.runtime.backends import torch_io

        assert self.variant is not None and self.bundle is not None
        s = self.variant["settings"]
        bundle = Bundle.open(self.bundle)
        base = base_component(component)
        folder = self.bundle / self.variant["section"] / torch_folder(component)
        cls = torch_io.module_class(component)
        dtype = getattr(torch, s.get("dtype", "float32"))
        if hasattr(diffusers, cls.__name__):
            model = cls.from_pretrained(folder)
        else:
            # eager attention so the FLOP counter sees it; timing uses SDPA (set back below)
            model = cls.from_pretrained(folder, attn_implementation="eager")
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
        names = _outputs_of(bundle, self.variant, component)

        def call() -> tuple[Any, ...]:
            out = torch_io.call(component, model, x, names)
            return tuple(out[n] for n in names)

        self.model = model
        self.flop_fn = call
        self.fn = call
        if s.get("compile"):
            # Compile now, inside load: no timed call (even with --warmup 0) pays for it.
            self.fn = torch.compile(call)
            with torch.inference_mode():
                self.fn()
        self.to_numpy = lambda outs: {n: o.float().numpy() for n, o in zip(names, outs, strict=True)}
        if hasattr(model, "set_attn_implementation") and not hasattr(diffusers, cls.__name__):
            model.set_attn_implementation("sdpa")
        return weight_bytes

    def run(self, n: int) -> list[float]:
        """Wall seconds of ``n`` calls; the process CPU seconds of each (all threads) are kept for
        ``cpu_samples``: on a shared machine they vary less than wall time."""
        times = []
        ctx = _inference_mode(self.variant)
        with ctx:
            for _ in range(n):
                c0, t0 = time.process_time(), time.perf_counter()
                out = self.fn()
                times.append(time.perf_counter() - t0)
                self.cpu.append(time.process_time() - c0)
        self.last = out
        return times

    def cpu_samples(self) -> list[float]:
        """CPU seconds of every timed call since the component was loaded (warm-up calls included first)."""
        return list(self.cpu)

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

    def load_runtime(
        self,
        backend: str,
        section: str,
        dtype: str,
        vaes: list[str],
        inference_precision: str = "f32",
        preload: list[str] | None = None,
    ) -> dict[str, Any]:
        """A fresh runtime pipeline per VAE choice, all over one backend (TAESD shares the sessions);
        ``preload`` (a task name) loads that task's components now, so no timed call pays for them."""
        from sdkiln.runtime.load import load
        from sdkiln.runtime.pipeline import Pipeline

        self.unload()
        self.memory_reset = _reset_peak()
        self.baseline = _memory()["VmRSS"]
        t0 = time.perf_counter()
        assert self.bundle is not None
        first = load(
            self.bundle,
            backend=backend,
            section=section,
            dtype=dtype,
            vae=vaes[0],
            threads=self.threads,
            inference_precision=inference_precision,
        )
        self.pipes = {vaes[0]: first}
        for vae in vaes[1:]:
            self.pipes[vae] = Pipeline(first.backend, first.info, vae=vae, source=first.source)
        for task in preload or []:
            for pipe in self.pipes.values():
                pipe.preload(pipe.components_for(task, "canny" if task == "edit" else None))
        return {"load_s": time.perf_counter() - t0, "description": first.backend.description}

    def run_task(self, task: str, params: dict[str, Any], vae: str, key: str | None = None) -> dict[str, Any]:
        """One task from user inputs to pixels (request building, e.g. Canny, included). ``params`` may
        carry the fast-profile levers ``steps`` and ``control_end``; outputs are kept under ``key``."""
        from sdkiln.runtime.tasks import edit_request, sketch_request, text_request

        pipe = self.pipes[vae]
        p = dict(params)
        h, w = p["height"], p["width"]
        common = {k: p[k] for k in ("steps", "seed", "height", "width")}
        control = {"control_end": p["control_end"]} if "control_end" in p else {}
        sketch, photo = _example_sketch(h, w), _example_photo(h, w)
        t0 = time.perf_counter()
        if task == "sketch":
            req = sketch_request(pipe, sketch, p["prompt"], **common, **control)
        elif task == "text":
            req = text_request(pipe, p["prompt"], **common)
        else:
            req = edit_request(
                pipe, photo, p["prompt"], strength=p["strength"], control=p["control"], **common, **control
            )
        c0 = time.process_time()
        result = pipe.generate(req)
        cpu = time.process_time() - c0
        seconds = time.perf_counter() - t0
        self.pixels[key or vae] = {"pixels": result.pixels, "latents": result.latents}
        return {
            "seconds": seconds,
            "cpu_seconds": cpu,
            "timings": dict(result.timings),
            "steps": result.steps,
        }

    def deepcache(self, task: str, params: dict[str, Any], interval: int, repeat: int) -> dict[str, Any]:
        """The task on the loaded torch pipeline with DeepCache-style feature reuse (``deepcache.py``):
        ``repeat`` timed runs; the last run's outputs are kept under ``deepcache``."""
        from sdkiln.runtime.pipeline import Pipeline
        from sdkiln.stages.tools.bench.deepcache import DeepCacheBackend

        base = self.pipes["full"]
        backend = DeepCacheBackend(base.backend, interval)
        pipe = Pipeline(backend, base.info, vae="full", source=base.source)
        self.pipes["deepcache"] = pipe
        runs = []
        for _ in range(repeat):
            backend.unet.reset()
            runs.append(self.run_task(task, params, "deepcache", key="deepcache"))
        return {"runs": runs, "kinds": list(backend.unet.kinds), "description": backend.description}

    def task_pixels(self, vae: str, key: str | None = None) -> Any:
        return self.pixels[key or vae]["pixels"]

    def task_outputs(self, key: str) -> dict[str, Any]:
        """The last run's final pixels and latents (for deviation from the exact output)."""
        return self.pixels[key]


def ort_kernels(profile: str) -> dict[str, Any]:
    """Which kernels an ONNX Runtime session ran, from its profile of one call: per op type, the node
    count and the share of the kernel time (``QLinearConv`` is an int8 convolution; ``ConvInteger`` the
    dynamic-quantization one; ``Conv``/``FusedConv``/``MatMul`` run in fp32)."""
    import json

    try:
        events = json.loads(Path(profile).read_text())
    except (OSError, ValueError):
        return {"source": "onnxruntime profile", "error": f"unreadable profile {profile}"}
    nodes: dict[str, dict[str, float]] = {}
    total = 0.0
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "?")
        d = nodes.setdefault(op, {"count": 0, "us": 0.0})
        d["count"] += 1
        d["us"] += float(e.get("dur", 0))
        total += float(e.get("dur", 0))
    return {
        "source": "onnxruntime profile of one call (op type: nodes, share of kernel time)",
        "nodes": {
            op: {"count": int(d["count"]), "time_share": round(d["us"] / total, 4) if total else None}
            for op, d in sorted(nodes.items(), key=lambda kv: -kv[1]["us"])
        },
    }


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


def _outputs_of(bundle: Bundle, variant: dict[str, Any], component: str) -> list[str]:
    """Output names in the contract's order, from any section that lists the component."""
    for section in [variant["section"], *sorted(bundle.sections)]:
        if section not in bundle.sections:
            continue
        spec = bundle.components(section).get(component)
        if spec and spec.get("outputs"):
            return [o["name"] for o in spec["outputs"]]
    return []


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
        sys.exit("usage: python -m sdkiln.stages.tools.bench.worker --worker (use `sdkiln bench` instead)")
