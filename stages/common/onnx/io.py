"""ONNX helpers shared by the ONNX stages: saving (with external data), I/O specs, ORT sessions, the
parity harness and benchmarks.

No torch here (the PyTorch side of parity lives in ``onnx_components``); heavy imports (onnx,
onnxruntime) stay inside functions.

Example::

    from sdkiln.stages.common.onnx.io import ParityReport, cpu_session, gate_for, io_spec, save_model
    files = save_model(model, out_dir / "unet" / "model.onnx")   # + model.onnx_data when > 2 GB
    spec = io_spec(model)            # {"inputs": [{"name", "dtype", "shape"}], "outputs": [...]}
    report = ParityReport()
    report.check("unet", cpu_session(path), cases, gate_for(tolerance, "fp32"))
    report.raise_if_failed("export_onnx")   # ParityError listing every failure
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import Field

from sdkiln.runtime.contract.errors import BuildError
from sdkiln.runtime.contract.layout import EXTERNAL_DATA_FILE, MODEL_FILE
from sdkiln.stages.engine.core import StageParams

logger = logging.getLogger(__name__)

# Protobuf refuses messages of 2 GiB and more; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
# Tensors smaller than this stay inline even when the model uses external data (shapes, scalars).
_INLINE_TENSOR_BYTES = 1024

_ONNX_DTYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    16: "bfloat16",
}


# --------------------------------------------------------------------------------------------------
# Params shared by the ONNX stages


class BenchmarkParams(StageParams):
    """A latency benchmark of one shape: median of ``repeats`` runs after one warm-up run."""

    components: list[str] = Field(default=["unet"], min_length=1)
    batch: int = Field(default=1, ge=1, le=64)
    image_size: int = Field(default=512, ge=8, le=4096, multiple_of=8)
    repeats: int = Field(default=5, ge=1, le=100)
    threads: int = Field(default=0, ge=0, le=512, description="ORT intra-op threads; 0: ORT's default")


# --------------------------------------------------------------------------------------------------
# Saving and loading


def tensor_bytes(model: Any) -> int:
    """Bytes of the model's initializers (what decides whether it needs external data)."""
    from onnx import helper

    total = 0
    for t in model.graph.initializer:
        if t.raw_data:
            total += len(t.raw_data)
        else:
            n = math.prod(t.dims) if t.dims else 1
            total += n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def save_model(model: Any, path: Path, external_data: str = "auto", restore: bool = True) -> list[Path]:
    """Save ``model`` to ``path``; weights go to ``model.onnx_data`` beside it when ``external_data`` is
    ``always``, or ``auto`` and the tensors exceed the protobuf limit. Returns the files written.

    Any old ``path`` and data file are removed first: ``onnx.save`` appends to an existing data file,
    which would leave stale bytes (and a different digest) behind. ``model`` must hold its weights in
    memory (``load_model(..., with_data=True)``); it still does afterwards unless ``restore`` is False
    (then its tensors point at the saved data file: cheaper for a multi-GB model that is done with).
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    if external_data not in ("auto", "always", "never"):
        raise ValueError(f"external_data must be auto, always or never, not {external_data!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.parent / EXTERNAL_DATA_FILE
    for old in (path, data):
        if old.exists() or old.is_symlink():
            old.unlink()
    size = tensor_bytes(model)
    use_external = external_data == "always" or (external_data == "auto" and size >= EXTERNAL_DATA_THRESHOLD)
    if not use_external and size >= EXTERNAL_DATA_THRESHOLD:
        raise BuildError(
            f"{path}: {size / 2**30:.2f} GiB of weights cannot be saved without external data "
            "(external_data: never)"
        )
    if use_external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=EXTERNAL_DATA_FILE,
            size_threshold=_INLINE_TENSOR_BYTES,
            convert_attribute=True,
        )
        # onnx moves the tensors out of the in-memory model while saving; put them back so the caller's
        # model is unchanged (and can be saved again).
        if restore:
            load_external_data_for_model(model, str(path.parent))
        return [path, data] if data.exists() else [path]
    onnx.save_model(model, str(path))
    return [path]


def model_files(path: Path) -> list[Path]:
    """The files of a saved model: ``model.onnx`` and, when present, its ``model.onnx_data``."""
    path = Path(path)
    data = path.parent / EXTERNAL_DATA_FILE
    return [path, data] if data.is_file() else [path]


def files_bytes(paths: Iterable[Path]) -> int:
    """Total size of some files."""
    return sum(Path(p).stat().st_size for p in paths)


def load_model(path: Path, with_data: bool = True) -> Any:
    """Load an ONNX model (its external data too, unless ``with_data`` is False)."""
    import onnx

    return onnx.load(str(path), load_external_data=with_data)


def copy_model(src: Path, dst: Path) -> list[Path]:
    """Copy a saved model (and its external data file) to a fresh location."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for f in model_files(src):
        target = dst.parent / (dst.name if f.name == MODEL_FILE else f.name)
        if target.exists():
            target.unlink()
        shutil.copyfile(f, target)
        out.append(target)
    return out


def copy_non_model_files(src_dir: Path, dst_dir: Path) -> None:
    """Copy a folder's configs, tokenizers and scheduler, leaving out ONNX models and their data."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    for f in sorted(src_dir.rglob("*")):
        if not f.is_file() or f.name == MODEL_FILE or f.name == EXTERNAL_DATA_FILE or f.suffix == ".onnx":
            continue
        if f.name == "manifest.json" and f.parent == src_dir:
            continue  # the input's own cache manifest is not part of the payload
        target = dst_dir / f.relative_to(src_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)


# --------------------------------------------------------------------------------------------------
# I/O specs


# Weight storage dtypes: ONNX elem type -> precision label.
_WEIGHT_LABELS = {1: "fp32", 10: "fp16", 16: "bf16", 3: "int8", 2: "int8", 11: "fp64"}


def weight_storage(model: Any) -> dict[str, int]:
    """Elements of the model's weights by storage precision (``{"fp32": n, "int8": m, ...}``).

    Weights are initializers of rank >= 2 (matrices, conv kernels, embeddings): what quantization and
    fp16 conversion change. Biases, scales, zero points and shape constants are not counted. Reads only
    the graph's tensor headers (dims and types), so it works on a model loaded without its data.
    """
    counts: dict[str, int] = {}
    for t in model.graph.initializer:
        label = _WEIGHT_LABELS.get(t.data_type)
        if len(t.dims) < 2 or label is None:  # int64 position ids and shape tensors are not weights
            continue
        counts[label] = counts.get(label, 0) + math.prod(t.dims)
    return dict(sorted(counts.items()))


def weight_precision(model: Any, majority: float = 0.5) -> tuple[str, dict[str, float]]:
    """The precision a graph's weights are stored in, read from its content, and the share of each.

    The label is the storage precision of more than ``majority`` of the weight elements (``int8`` for a
    UNet whose MatMuls and convolutions are quantized; ``fp32`` for one where only a few are); a graph
    with no weights is ``fp32``. Returns ``(label, {precision: share})``.
    """
    counts = weight_storage(model)
    total = sum(counts.values())
    if not total:
        return "fp32", {}
    shares = {k: round(v / total, 4) for k, v in counts.items()}
    label, share = max(shares.items(), key=lambda kv: kv[1])
    return (label if share > majority else "mixed"), shares


def _dims(value_info: Any) -> list[int | str]:
    out: list[int | str] = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append("?")
    return out


def _dtype(value_info: Any) -> str:
    elem = value_info.type.tensor_type.elem_type
    return _ONNX_DTYPES.get(elem, f"onnx_type_{elem}")


def io_spec(model: Any) -> dict[str, list[dict[str, Any]]]:
    """The contract's per-component I/O spec of an ONNX model: graph inputs and outputs, each
    ``{"name", "dtype", "shape"}`` with ints for static and strings for dynamic dims. An input that has
    an initializer of its name (ONNX's optional input, see ``defaults``) is ``optional`` with its
    ``default``; initializers that are not graph inputs are weights, not inputs."""
    from sdkiln.stages.common.onnx.defaults import default_values

    defaults = default_values(model)
    inputs = []
    for v in model.graph.input:
        t: dict[str, Any] = {"name": v.name, "dtype": _dtype(v), "shape": _dims(v)}
        if v.name in defaults:
            t["optional"] = True
            if defaults[v.name] is not None:
                t["default"] = defaults[v.name]
        inputs.append(t)
    return {
        "inputs": inputs,
        "outputs": [{"name": v.name, "dtype": _dtype(v), "shape": _dims(v)} for v in model.graph.output],
    }


def set_io_shapes(model: Any, spec: Mapping[str, list[dict[str, Any]]]) -> None:
    """Write the spec's dims (ints static, strings symbolic) onto the graph's inputs and outputs.

    Exporters name symbolic dims their own way (``s0``, ``Addoutput_dim_2``); the runtime and optimum's
    IO binding read the contract names (``latent_height``, ``latent_height * 8``).
    """
    by_name = {t["name"]: t["shape"] for t in [*spec["inputs"], *spec["outputs"]]}
    for v in [*model.graph.input, *model.graph.output]:
        shape = by_name.get(v.name)
        if shape is None:
            continue
        dims = v.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            raise BuildError(f"graph I/O {v.name}: rank {len(dims)} but the spec says {shape}")
        for d, want in zip(dims, shape, strict=True):
            if isinstance(want, int):
                d.dim_value = want
            else:
                d.dim_param = want


def restore_unused_inputs(model: Any, spec: Mapping[str, list[dict[str, Any]]]) -> list[str]:
    """Put back the contract inputs an exporter dropped because nothing reads them, in contract order;
    returns their names.

    A component can ignore an input its family's contract gives it (a small SDXL ControlNet without
    cross-attention never reads ``encoder_hidden_states``); the TorchScript exporter then leaves it out
    of the graph. Every backend feeds the contract's inputs, so the graph keeps it as an unused input.
    """
    import onnx

    dtypes = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
              "int32": onnx.TensorProto.INT32, "int64": onnx.TensorProto.INT64}  # fmt: skip
    present = {v.name: v for v in model.graph.input}
    initializers = {t.name for t in model.graph.initializer}
    wanted = [t for t in spec["inputs"]]
    missing = [t for t in wanted if t["name"] not in present]
    if not missing:
        return []
    ordered = []
    for t in wanted:
        v = present.get(t["name"])
        if v is None:
            shape = [d if isinstance(d, int) else str(d) for d in t["shape"]]
            v = onnx.helper.make_tensor_value_info(t["name"], dtypes[t["dtype"]], shape)
        ordered.append(v)
    extra = [v for v in model.graph.input if v.name not in {t["name"] for t in wanted}]
    if [v.name for v in extra if v.name not in initializers]:
        return []  # inputs the contract does not know: leave the graph alone, the spec check reports them
    del model.graph.input[:]
    model.graph.input.extend([*ordered, *extra])
    return [t["name"] for t in missing]


def spec_mismatches(actual: Mapping[str, Any], expected: Mapping[str, Any], what: str) -> list[str]:
    """Differences between two I/O specs (names and order, dtypes, shapes), one line each."""
    problems = []
    for side in ("inputs", "outputs"):
        a = [t["name"] for t in actual[side]]
        e = [t["name"] for t in expected[side]]
        if a != e:
            problems.append(f"{what}: {side} are {a}, the contract says {e}")
            continue
        for ta, te in zip(actual[side], expected[side], strict=True):
            if bool(ta.get("optional")) != bool(te.get("optional")):
                problems.append(
                    f"{what}: {side[:-1]} {ta['name']} is {'' if ta.get('optional') else 'not '}optional, "
                    f"the contract says it is {'' if te.get('optional') else 'not '}optional"
                )
                continue
            if ta.get("optional"):
                # An optional input's declared dims are relaxed for its broadcastable default
                # (defaults.add_zero_defaults); dtype and rank still have to agree.
                if ta["dtype"] != te["dtype"] or len(ta["shape"]) != len(te["shape"]):
                    problems.append(
                        f"{what}: optional {side[:-1]} {ta['name']} is {ta['dtype']} of rank {len(ta['shape'])}, "
                        f"the contract says {te['dtype']}{te['shape']}"
                    )
                continue
            if ta["dtype"] != te["dtype"] or list(ta["shape"]) != list(te["shape"]):
                problems.append(
                    f"{what}: {side[:-1]} {ta['name']} is {ta['dtype']}{ta['shape']}, "
                    f"the contract says {te['dtype']}{te['shape']}"
                )
    return problems


def op_histogram(model: Any) -> dict[str, int]:
    """Node count per op type (``domain::op`` outside the default domain), sorted by name."""
    c = Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in model.graph.node
    )
    return dict(sorted(c.items()))


def custom_domain_ops(model: Any) -> list[str]:
    """Op types outside the standard ONNX domain (e.g. ``com.microsoft::MultiHeadAttention``)."""
    return sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})


# --------------------------------------------------------------------------------------------------
# ONNX Runtime


def cpu_session(path: Path, threads: int = 0, optimize: bool = True) -> Any:
    """An ONNX Runtime session on the CPU provider. ``threads`` 0 lets ORT choose; ``optimize`` False
    disables ORT's online graph optimizations (to run a graph exactly as written)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # ORT's warnings about unused initializers are noise here
    if threads:
        so.intra_op_num_threads = threads
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def session(path: Path, provider: str = "CPUExecutionProvider", threads: int = 0) -> Any:
    """An ORT session on ``provider``; BuildError when this onnxruntime build lacks it."""
    import onnxruntime as ort

    if provider == "CPUExecutionProvider":
        return cpu_session(path, threads)
    if provider not in ort.get_available_providers():
        raise BuildError(f"{provider} is not available here (have: {ort.get_available_providers()})")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=[provider, "CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------------
# Benchmarks


def benchmark(sessions: Mapping[str, Any], feeds: Mapping[str, Any], repeats: int) -> dict[str, float]:
    """Median latency (ms) of each session on the same feeds. Runs are interleaved (a, b, a, b, ...) so
    that load from other processes hits every session alike."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, dict(feeds))  # warm-up: first-run allocations and kernel selection
    for _ in range(repeats):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, dict(feeds))
            times[k].append(time.perf_counter() - t0)
    return {k: round(statistics.median(v) * 1000, 3) for k, v in times.items()}


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def to_fp16(model: Any, op_block_list: list[str] | None = None) -> Any:
    """Weights and compute in fp16, graph inputs and outputs still fp32 (casts at the edges).

    Uses ONNX Runtime's converter with its default op block list (ops without fp16 kernels stay fp32);
    onnx shape inference is skipped above the protobuf limit, where it cannot run in memory.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    big = tensor_bytes(model) >= EXTERNAL_DATA_THRESHOLD
    if big:
        # Too big for the converter's in-memory shape inference, which it needs to keep fp32 what must
        # stay fp32 (Resize scales made by Constant nodes, the inputs of blocked ops): infer on the
        # graph without its weights and hand the converter the result.
        infer_value_info(model)
    return convert_float_to_float16(
        model, keep_io_types=True, disable_shape_infer=big, op_block_list=op_block_list
    )


def infer_value_info(model: Any, min_bytes: int = 1024) -> None:
    """ONNX shape/type inference on a model of any size, in place: initializers above ``min_bytes`` lose
    their data for the duration (inference reads only their dims; small ones, such as Reshape targets,
    keep theirs), the inferred ``value_info`` is written back onto ``model``."""
    import onnx

    saved: dict[str, bytes] = {}
    for t in model.graph.initializer:
        if t.HasField("raw_data") and len(t.raw_data) > min_bytes:
            saved[t.name] = t.raw_data
            t.ClearField("raw_data")
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    finally:
        for t in model.graph.initializer:
            if t.name in saved:
                t.raw_data = saved[t.name]
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)


def compact_names(model: Any) -> int:
    """Give intermediate tensors short names (``t0``, ``t1``, ...), in place; graph inputs, outputs and
    initializers keep theirs, node names are untouched (profiles stay readable). Returns how many were
    renamed; graphs with subgraphs (If/Loop) are left as they are.

    Quantization roughly doubles a graph's node count, and exporter names like
    ``/model/down_blocks.1/attentions.0/transformer_blocks.0/attn1/to_q/MatMul_output_0`` then make up a
    third of a small model's int8 file.
    """
    from onnx import AttributeProto

    g = model.graph
    if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return 0
    keep = {v.name for v in g.input} | {v.name for v in g.output} | {t.name for t in g.initializer}
    mapping: dict[str, str] = {}
    counter = 0
    for node in g.node:
        for out in node.output:
            if out and out not in keep and out not in mapping:
                while f"t{counter}" in keep:
                    counter += 1
                mapping[out] = f"t{counter}"
                counter += 1
    for node in g.node:
        node.input[:] = [mapping.get(x, x) for x in node.input]
        node.output[:] = [mapping.get(x, x) for x in node.output]
    for vi in g.value_info:
        vi.name = mapping.get(vi.name, vi.name)
    return len(mapping)


def spec_feeds(inputs: list[dict[str, Any]], shapes: dict[str, list[int]], seed: int) -> dict[str, Any]:
    """Inputs for a smoke/parity run from the I/O spec: normal floats, token ids, timesteps in range."""
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for t in inputs:
        name, dtype, shape = t["name"], t.get("dtype", "float32"), shapes[t["name"]]
        if "int" in dtype:
            feeds[name] = rng.integers(0, 49408, size=shape).astype(dtype)
        elif name == "timestep":
            feeds[name] = rng.uniform(1, 999, size=shape).astype(dtype)
        elif name == "conditioning_scale":
            feeds[name] = np.ones(shape, dtype)
        elif name == "controlnet_cond":
            feeds[name] = rng.uniform(0, 1, size=shape).astype(dtype)
        else:
            feeds[name] = rng.standard_normal(shape).astype(dtype)
    return feeds
