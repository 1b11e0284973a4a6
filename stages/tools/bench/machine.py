"""The machine a benchmark ran on: CPU model and ISA, memory, GPU, package versions, and its measured GEMM
peaks (numpy, torch fp32/bf16, ONNX Runtime fp32/int8, OpenVINO f32/bf16/int8)."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from sdkiln.runtime.machine import ISA_FLAGS, machine_key

# --------------------------------------------------------------------------------------------------
# Machine facts


def machine_facts() -> dict[str, Any]:
    """CPU model, cores, ISA flags, memory, GPU and library versions (cheap; no torch import)."""
    cpuinfo = _read("/proc/cpuinfo")
    flags: set[str] = set()
    model, mhz = platform.processor() or platform.machine(), None
    cores: set[tuple[str, str]] = set()
    phys = core = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "model name":
            model = value
        elif key == "cpu MHz" and mhz is None:
            with contextlib.suppress(ValueError):
                mhz = float(value)
        elif key == "physical id":
            phys = value
        elif key == "core id":
            core = value
            cores.add((phys, core))
    logical = os.cpu_count() or 1
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = logical
    meminfo = _read("/proc/meminfo")
    m = re.search(r"MemTotal:\s+(\d+) kB", meminfo)
    return {
        "machine_key": machine_key(cpuinfo),
        "cpu_model": model,
        "cpu_mhz": mhz,
        "physical_cores": len(cores) or logical,
        "logical_cpus": logical,
        "cpus_allowed": allowed,
        "isa": {f: f in flags for f in ISA_FLAGS},
        "hypervisor": "hypervisor" in flags,
        "memory_bytes": int(m.group(1)) * 1024 if m else None,
        "gpu": _gpu(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": _versions(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def default_threads(facts: dict[str, Any] | None = None) -> int:
    """Physical cores this process may use."""
    facts = facts or machine_facts()
    return max(1, min(int(facts["physical_cores"]), int(facts["cpus_allowed"])))


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _gpu() -> list[dict[str, Any]] | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    gpus = []
    for line in out.stdout.strip().splitlines():
        name, _, mem = line.partition(",")
        gpus.append({"name": name.strip(), "memory_bytes": int(float(mem)) * 2**20 if mem.strip() else None})
    return gpus or None


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in (
        "sdkiln",
        "torch",
        "onnxruntime",
        "openvino",
        "nncf",
        "onnx",
        "diffusers",
        "transformers",
        "numpy",
    ):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


def _probe(name: str, dtype: str, max_n: int, make: Any) -> dict[str, Any]:
    """Best GEMM rate over sizes 256, 512, ... max_n; stops growing once one call takes 0.25 s."""
    best: dict[str, Any] = {"name": name, "dtype": dtype, "flops_per_s": None}
    n = 256
    try:
        while n <= max_n:
            run = make(n)
            run()  # warm-up (packing, thread pool start)
            t = min(_timed(run) for _ in range(3))
            rate = 2.0 * n**3 / t
            if best["flops_per_s"] is None or rate > best["flops_per_s"]:
                best.update(n=n, seconds=t, flops_per_s=rate)
            if t > 0.25:
                break
            n *= 2
    except Exception as e:  # a probe that cannot run here is a fact, not a failure
        best["error"] = f"{type(e).__name__}: {e}"
    return best


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _np_gemm(np: Any, n: int, dtype: Any) -> Any:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n)).astype(dtype), rng.standard_normal((n, n)).astype(dtype)
    return lambda: a @ b


def _torch_gemm(torch: Any, n: int, dtype: Any) -> Any:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)

    def run() -> Any:
        with torch.inference_mode():
            return a @ b

    return run


def _ort_gemm(n: int, dtype: str, threads: int) -> Any:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if dtype == "fp32":
        ta, tb, tout, op = TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT, "MatMul"
    else:
        ta, tb, tout, op = TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32, "MatMulInteger"
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["y"])],
        "gemm",
        [helper.make_tensor_value_info("a", ta, [n, n]), helper.make_tensor_value_info("b", tb, [n, n])],
        [helper.make_tensor_value_info("y", tout, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts)
    rng = np.random.default_rng(0)
    if dtype == "fp32":
        a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    else:
        a = rng.integers(0, 255, (n, n), dtype=np.uint8)
        b = rng.integers(-127, 127, (n, n), dtype=np.int8)
    feeds = {"a": a, "b": b}
    return lambda: sess.run(None, feeds)


def _ov_gemm(n: int, mode: str, threads: int) -> Any:
    """OpenVINO MatMul of an (n, n) activation by a constant (n, n) weight: ``f32`` and ``bf16`` (the
    inference precision hint), or ``int8`` (u8 activations by FakeQuantize, i8 weights, as NNCF writes)."""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    a = ops.parameter([n, n], ov.Type.f32, name="a")
    w = rng.standard_normal((n, n), dtype=np.float32)
    if mode == "int8":
        wq = np.clip(np.round(w * 40), -127, 127).astype(np.int8)
        wd = ops.multiply(ops.convert(ops.constant(wq), ov.Type.f32), ops.constant(np.float32(1 / 40)))
        lo, hi = ops.constant(np.float32(0.0)), ops.constant(np.float32(2.55))
        y = ops.matmul(ops.fake_quantize(a, lo, hi, lo, hi, 256), wd, False, False)
    else:
        y = ops.matmul(a, ops.constant(w), False, False)
    cfg = {
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "bf16" if mode == "bf16" else "f32",
    }
    req = ov.Core().compile_model(ov.Model([y], [a], "gemm"), "CPU", cfg).create_infer_request()
    x = rng.uniform(0, 2.5, (n, n)).astype(np.float32)
    return lambda: req.infer({0: x})
