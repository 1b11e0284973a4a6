"""OpenVINO IR on the build side: convert an ONNX graph, save it, read back what an IR holds (I/O,
weight precision by content, an op histogram) and run it for the parity gate.

Heavy imports (openvino) stay inside functions.

    model = convert(onnx_path)                       # ov.Model, the ONNX graph's I/O names kept
    files = save(model, out_dir / "unet" / "model.xml")
    label, shares = weight_precision(read(files[0]))  # "fp32" / "int8" / "mixed", from the constants
    report.check("unet", Session(files[0]), cases, gate)   # ParityReport takes it like an ORT session
"""

from __future__ import annotations

import math
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from sdkiln.runtime.contract.layout import OPENVINO_BIN

# OpenVINO element types of stored weights -> the contract's precision labels.
_WEIGHT_LABELS = {
    "f32": "fp32",
    "f16": "fp16",
    "bf16": "bf16",
    "i8": "int8",
    "u8": "int8",
    "i4": "int4",
    "u4": "int4",
    "f64": "fp64",
}


def core() -> Any:
    import openvino as ov

    return ov.Core()


def convert(
    onnx_path: Path, contract_inputs: list[dict[str, Any]] | None = None, work_dir: Path | None = None
) -> Any:
    """The ONNX graph (and its external data) as an ``ov.Model``; input/output names are kept.

    Optional inputs (an ONNX UNet's ControlNet residuals: graph inputs with a zero-default initializer)
    would be read by OpenVINO's ONNX frontend as constants, so the IR could take no ControlNet. Such a
    graph is first rewritten in ``work_dir`` with those inputs required again, shaped by
    ``contract_inputs`` (``common.onnx.defaults.strip_defaults``; its external data files are hard-linked
    beside it, copied only across file systems: OpenVINO refuses external data that resolves outside the
    model's folder, so a symlink into the cache fails); the runtime backend feeds the defaults when they
    are left out."""
    import onnx
    import openvino as ov

    from sdkiln.runtime.contract.errors import BuildError
    from sdkiln.stages.common.onnx import defaults as od

    onnx_path = Path(onnx_path)
    graph = onnx.load(str(onnx_path), load_external_data=False)
    if not od.default_values(graph):
        del graph
        return ov.convert_model(str(onnx_path))
    if contract_inputs is None or work_dir is None:
        raise BuildError(f"{onnx_path}: optional inputs, and no contract spec to make them OpenVINO inputs")
    od.strip_defaults(graph, contract_inputs)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    for f in onnx_path.parent.iterdir():
        link = work_dir / f.name
        if f.name != onnx_path.name and f.is_file() and not link.exists():
            try:
                os.link(f.resolve(), link)
            except OSError:  # another file system
                shutil.copyfile(f, link)
    stripped = work_dir / onnx_path.name
    onnx.save(graph, str(stripped))
    return ov.convert_model(str(stripped))


def save(model: Any, xml: Path) -> list[Path]:
    """Save ``model`` as ``xml`` + ``model.bin`` with its weights as they are (no fp16 compression:
    the exact profile needs the fp32 weights). Old files are removed first. Returns the files."""
    import openvino as ov

    xml = Path(xml)
    xml.parent.mkdir(parents=True, exist_ok=True)
    bin_path = xml.parent / OPENVINO_BIN
    for old in (xml, bin_path):
        if old.exists():
            old.unlink()
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return [xml, bin_path] if bin_path.exists() else [xml]


def read(xml: Path) -> Any:
    return core().read_model(str(xml))


def weight_storage(model: Any) -> dict[str, int]:
    """Elements of the model's weights by storage precision: Constants of rank >= 2 (matrices,
    convolution kernels, embeddings), as ``onnx.io.weight_storage`` counts ONNX initializers. Compressed
    weights (NNCF) are int8 Constants followed by a Convert; their scales are small fp32 Constants."""
    counts: dict[str, int] = {}
    for op in model.get_ops():
        if op.get_type_name() != "Constant":
            continue
        shape = op.get_output_partial_shape(0)
        if shape.rank.is_dynamic or shape.rank.get_length() < 2:
            continue
        label = _WEIGHT_LABELS.get(op.get_output_element_type(0).get_type_name())
        if label is None:
            continue
        n = math.prod(d.get_length() for d in shape)
        counts[label] = counts.get(label, 0) + n
    return dict(sorted(counts.items()))


def weight_precision(model: Any, majority: float = 0.5) -> tuple[str, dict[str, float]]:
    """The storage precision of more than ``majority`` of the weight elements (else ``mixed``), and the
    share of each; a model without weights is ``fp32``."""
    counts = weight_storage(model)
    total = sum(counts.values())
    if not total:
        return "fp32", {}
    shares = {k: round(v / total, 4) for k, v in counts.items()}
    label, share = max(shares.items(), key=lambda kv: kv[1])
    return (label if share > majority else "mixed"), shares


def op_histogram(model: Any) -> dict[str, int]:
    """Op count per type (``FakeQuantize`` marks quantized activations), sorted by name."""
    return dict(sorted(Counter(op.get_type_name() for op in model.get_ops()).items()))


def _dtype(port: Any) -> str:
    return np.dtype(port.get_element_type().to_dtype()).name


def io_mismatches(model: Any, expected: dict[str, list[dict[str, Any]]], what: str) -> list[str]:
    """Differences between a model's I/O and the contract spec: names and order, dtypes, ranks, and
    every static dim (IR dims carry no axis names, so symbolic ones are only checked to be dynamic)."""
    problems = []
    for side, ports in (("inputs", model.inputs), ("outputs", model.outputs)):
        got = [p.get_any_name() for p in ports]
        want = [t["name"] for t in expected[side]]
        if got != want:
            problems.append(f"{what}: {side} are {got}, the contract says {want}")
            continue
        for p, t in zip(ports, expected[side], strict=True):
            shape = p.get_partial_shape()
            dims = [d.get_length() if d.is_static else None for d in shape]
            ok = _dtype(p) == t["dtype"] and len(dims) == len(t["shape"])
            ok = ok and all(isinstance(w, str) or d == w for d, w in zip(dims, t["shape"], strict=False))
            if not ok:
                problems.append(
                    f"{what}: {side[:-1]} {t['name']} is {_dtype(p)}{shape}, the contract says "
                    f"{t['dtype']}{t['shape']}"
                )
    return problems


def compile_config(inference_precision: str = "f32", threads: int = 0) -> dict[str, Any]:
    """The runtime backend's compile config (the parity gate runs what the runtime runs)."""
    from sdkiln.runtime.backends.openvino import compile_config as runtime_config

    return runtime_config(inference_precision, threads)


class _Output:
    def __init__(self, name: str):
        self.name = name


class Session:
    """An IR compiled on the CPU plugin, with the two methods ``ParityReport.check`` uses of an ONNX
    Runtime session: ``get_outputs()`` (objects with ``.name``) and ``run(None, feeds)``."""

    def __init__(self, xml: Path, inference_precision: str = "f32", threads: int = 0):
        self.compiled = core().compile_model(str(xml), "CPU", compile_config(inference_precision, threads))
        self._names = [p.get_any_name() for p in self.compiled.outputs]
        self._request = self.compiled.create_infer_request()

    def get_outputs(self) -> list[_Output]:
        return [_Output(n) for n in self._names]

    def run(self, names: list[str] | None, feeds: dict[str, Any]) -> list[Any]:
        result = self._request.infer(feeds)
        return [np.array(result[self.compiled.output(n)]) for n in (names or self._names)]


def runtime_census(compiled: Any) -> dict[str, int]:
    """What the CPU plugin really runs: ``layerType:runtimePrecision`` counts of the compute-heavy nodes
    of a compiled model's execution graph (``Convolution:u8`` is an int8 convolution kernel)."""
    heavy = ("Convolution", "FullyConnected", "MatMul", "Deconvolution", "ScaledDotProductAttention")
    c: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind in heavy:
            c[f"{kind}:{info['runtimePrecision'].astype(str)}"] += 1
    return dict(sorted(c.items()))
