"""Reading Core ML packages back on Linux (which can read a package but not run it): ``read_spec``
(inputs, outputs, op histogram, from the protobuf alone), ``read_weights`` (every weight as a dense array,
palettized ones decompressed from their lookup tables, with their storage cost), ``load_weights_into``
(put them into the torch module that was converted, matched by name) and ``measure_packages`` (the
Linux-side parity check of a package: its weights in PyTorch against the reference).

This module imports torch at the top: import it only inside a stage's ``run`` (or in tests).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sdkiln.runtime.contract.errors import BuildError
from sdkiln.stages.common.coreml.io import TensorInfo, build_module, load_model, psnr, run_module

logger = logging.getLogger(__name__)


_DTYPE_NAMES = {65568: "float32", 65552: "float16", 65600: "float64", 131104: "int32"}


@dataclass
class PackageSpec:
    """What a package's protobuf says: I/O, deployment target (spec version) and its op histogram."""

    spec_version: int
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    ops: Counter = field(default_factory=Counter)
    metadata: dict[str, str] = field(default_factory=dict)

    def io_manifest(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return [t.to_manifest() for t in self.inputs], [t.to_manifest() for t in self.outputs]


def _feature(f: Any) -> TensorInfo:
    arr = f.type.multiArrayType
    default = None
    if f.type.isOptional:
        which = arr.WhichOneof("defaultOptionalValue")
        default = float(getattr(arr, which)) if which else None
    return TensorInfo(
        f.name, tuple(int(d) for d in arr.shape), _DTYPE_NAMES.get(arr.dataType, str(arr.dataType)), default
    )


def read_spec(path: Path) -> PackageSpec:
    """Read a package's interface and op histogram from its protobuf (no weights, no model load)."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    ops: Counter = Counter()
    if spec.WhichOneof("Type") == "mlProgram":
        for fn in spec.mlProgram.functions.values():
            for block in fn.block_specializations.values():
                for op in block.operations:
                    ops[op.type] += 1
    return PackageSpec(
        spec_version=int(spec.specificationVersion),
        inputs=[_feature(f) for f in spec.description.input],
        outputs=[_feature(f) for f in spec.description.output],
        ops=ops,
        metadata=dict(spec.description.metadata.userDefined),
    )


@dataclass
class WeightRecord:
    """One weight of a package: its dense values (as stored: fp16 or fp32, decompressed if palettized)
    and what it costs in the package."""

    name: str
    dense: np.ndarray
    storage_bits: int
    nbits: int | None = None  # palette bits when stored as a lookup table
    groups: tuple[int, ...] = ()  # palettes per axis (per-grouped-channel tables); () for one table

    @property
    def palettized(self) -> bool:
        return self.nbits is not None


def _bits(dtype: Any) -> int:
    from coremltools.converters.mil.mil import types

    name = types.builtin_to_string(dtype)
    m = re.search(r"(\d+)$", name)
    if m is None:
        raise ValueError(f"no bit width for dtype {name}")
    return int(m.group(1))


def _storage_bits(op: Any) -> int:
    total = 0
    for var in op.inputs.values():
        if var.val is not None and np.ndim(var.val) > 0:
            total += int(np.size(var.val)) * _bits(var.dtype)
    return total


def load_program(path: Path) -> Any:
    """A package's MIL program (weights included), the way coremltools' own model tools read one."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    return milproto_load(spec, spec.specificationVersion, model.weights_dir)


def read_weights(path: Path) -> dict[str, WeightRecord]:
    """Every float tensor weight of a package by op name, densified. Lookup-table weights
    (``constexpr_lut_to_dense``) are decompressed and carry their palette bits; other ``constexpr_*``
    compressions are decompressed too. Scalars and the constant inputs of compression ops are skipped."""
    prog = load_program(path)
    records: dict[str, WeightRecord] = {}
    for fn in prog.functions.values():
        for op in fn.operations:
            out = op.outputs[0]
            if op.op_type.startswith("constexpr_"):
                dense = np.asarray(op.materialized_val_inference())
                nbits = None
                groups: tuple[int, ...] = ()
                if op.op_type == "constexpr_lut_to_dense":
                    lut = np.asarray(op.inputs["lut"].val)
                    entries = lut.shape[-2] if lut.ndim >= 2 else lut.shape[0]
                    nbits = int(round(math.log2(entries)))
                    if lut.ndim == dense.ndim + 2:  # iOS 18 tables: one per block of each axis
                        groups = tuple(int(g) for g in lut.shape[: dense.ndim])
                records[op.name] = WeightRecord(op.name, dense, _storage_bits(op), nbits, groups)
            elif op.op_type == "const":
                val = out.val
                if val is None or np.ndim(val) == 0 or not np.issubdtype(np.asarray(val).dtype, np.floating):
                    continue
                # The indices/lut/scale inputs of a compression op are not weights of their own.
                if out.child_ops and all(c.op_type.startswith("constexpr_") for c in out.child_ops):
                    continue
                arr = np.asarray(val)
                records[op.name] = WeightRecord(op.name, arr, arr.size * arr.dtype.itemsize * 8)
    return records


@dataclass
class WeightSummary:
    """Storage of a package's weights: how many, how many palettized, bits per weight."""

    elements: int
    palettized_elements: int
    storage_bytes: float
    lut_ops: int
    nbits: dict[int, int]  # palette bits -> number of tensors
    float_precision: str = "fp16"  # the storage of most unpalettized float elements

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.storage_bytes / self.elements if self.elements else 0.0

    def metrics(self) -> dict[str, Any]:
        return {
            "weight_elements": self.elements,
            "palettized_fraction": round(self.palettized_elements / self.elements, 6)
            if self.elements
            else 0.0,
            "weight_bytes": int(self.storage_bytes),
            "bits_per_weight": round(self.bits_per_weight, 4),
            "lut_ops": self.lut_ops,
            "palette_bits": {str(k): v for k, v in sorted(self.nbits.items())},
        }


def precision_label(summary: WeightSummary) -> str:
    """A package's weight precision read from its content: ``<n>bit`` when more than half the weight
    elements are stored as n-bit lookup-table indices (one palette size), ``mixed-bit`` for several
    palette sizes, else the dominant float storage (``fp16``/``fp32``)."""
    if summary.elements and summary.palettized_elements / summary.elements > 0.5:
        return f"{next(iter(summary.nbits))}bit" if len(summary.nbits) == 1 else "mixed-bit"
    return summary.float_precision


def summarize_weights(records: dict[str, WeightRecord]) -> WeightSummary:
    """Totals over ``read_weights``' records (lookup tables and indices counted at their stored size)."""
    nbits: Counter = Counter(r.nbits for r in records.values() if r.palettized)
    floats: Counter = Counter()
    for r in records.values():
        if not r.palettized:
            floats[{2: "fp16", 4: "fp32", 8: "fp64"}.get(r.dense.dtype.itemsize, str(r.dense.dtype))] += (
                r.dense.size
            )
    return WeightSummary(
        elements=sum(r.dense.size for r in records.values()),
        palettized_elements=sum(r.dense.size for r in records.values() if r.palettized),
        storage_bytes=sum(r.storage_bits for r in records.values()) / 8.0,
        lut_ops=sum(1 for r in records.values() if r.palettized),
        nbits=dict(nbits),
        float_precision=floats.most_common(1)[0][0] if floats else "fp16",
    )


# Suffixes coremltools appends to a weight's name as passes rewrite it (fp16 cast, palettization).
_NAME_SUFFIXES = ("_palettized", "_to_fp16", "_to_fp32")


def weight_key(op_name: str) -> str:
    """A weight op's name with coremltools' pass suffixes removed: the sanitised module path."""
    changed = True
    while changed:
        changed = False
        for suffix in _NAME_SUFFIXES:
            if op_name.endswith(suffix):
                op_name = op_name[: -len(suffix)]
                changed = True
    return op_name


def param_index(module: nn.Module) -> dict[str, str]:
    """Sanitised name (dots as underscores, as Core ML names weights) -> parameter/buffer name."""
    index: dict[str, str] = {}
    for name in module.state_dict():
        key = name.replace(".", "_")
        if key in index:
            raise ValueError(f"parameters {index[key]!r} and {name!r} have the same Core ML name")
        index[key] = name
    return index


@dataclass
class LoadReport:
    """What ``load_weights_into`` matched: parameter -> op name, and what it could not place."""

    matched: dict[str, str]
    unmatched_ops: list[str]  # weights in the package with no parameter of that name
    missing_params: list[str]  # parameters no package weight was found for (kept as they were)
    matched_palettized: int
    # parameter -> ("float" | "<n>bit", relative RMS distance from the reference; see weight_drift)
    drift: dict[str, tuple[str, float]] = field(default_factory=dict)

    def metrics(self, module: nn.Module) -> dict[str, Any]:
        sd = module.state_dict()
        total = sum(v.numel() for v in sd.values())
        missing = sum(sd[n].numel() for n in self.missing_params)
        return {
            "matched_tensors": len(self.matched),
            "unmatched_package_weights": len(self.unmatched_ops),
            "params_not_in_package": len(self.missing_params),
            "param_elements_not_in_package": missing,
            "param_fraction_from_package": round(1 - missing / total, 6) if total else 0.0,
        }


@torch.no_grad()
def load_weights_into(module: nn.Module, records: dict[str, WeightRecord]) -> LoadReport:
    """Copy package weights into the torch module that was converted, matched by name.

    A package weight whose name matches no parameter, or whose size differs, is matched by its values
    to a parameter left over (a renamed weight), else reported; ``accounting_problems`` then decides
    whether what is left is explained (derived constants, identity affines the converter dropped).
    """
    index = param_index(module)
    state = module.state_dict()
    matched: dict[str, str] = {}
    unmatched: list[str] = []
    drift: dict[str, tuple[str, float]] = {}
    n_pal = 0
    for op_name, rec in records.items():
        pname = index.get(weight_key(op_name))
        if pname is None or state[pname].numel() != rec.dense.size:
            # Small constants (folded norms, shapes) are expected; report only tensors worth noticing.
            if rec.dense.size > 1:
                unmatched.append(op_name)
            continue
        target = state[pname]
        drift[pname] = weight_drift(rec, target.detach().float().numpy())
        target.copy_(torch.from_numpy(np.asarray(rec.dense, dtype=np.float32)).reshape(target.shape))
        matched[pname] = op_name
        n_pal += rec.palettized
    missing = [n for n in state if n not in matched and state[n].is_floating_point()]
    # A weight the converter renamed (CLIP's position embedding) is matched by its values instead.
    for op_name in list(unmatched):
        dense = np.asarray(records[op_name].dense, dtype=np.float32).ravel()
        for pname in missing:
            target = state[pname]
            ref = target.detach().float().numpy().ravel()
            if ref.size == dense.size and np.allclose(dense, ref, rtol=2e-3, atol=1e-4):
                target.copy_(torch.from_numpy(dense).reshape(target.shape))
                matched[pname] = op_name
                unmatched.remove(op_name)
                missing.remove(pname)
                break
    return LoadReport(matched, unmatched, missing, n_pal, drift)


# How far a package weight may sit from its reference parameter (relative RMS). Float weights: fp16
# rounding, <= 2^-11 per element (measured <= 3.0e-4 on the tiny presets). Palettized weights: each
# palette entry against the mean of the reference weights assigned to it (k-means centroids), which
# loosens as palettes shrink: 6-bit measured <= 2.9e-3 on the tiny UNet (a layer 1 % off: >= 9.7e-3),
# 4-bit up to 9.4e-3 (tiny VAE decoder, grouped channels). Output PSNR alone cannot see a layer 1-2 %
# off under 6-bit noise.
MAX_WEIGHT_DRIFT = {"float": 2e-3, "8bit": 3e-3, "7bit": 4e-3, "6bit": 6e-3, "5bit": 1.2e-2}
MAX_DRIFT_FEW_BITS = 2.4e-2  # 4 bits and fewer


def drift_limit(kind: str) -> float:
    return MAX_WEIGHT_DRIFT.get(kind, MAX_DRIFT_FEW_BITS)


def weight_drift(rec: WeightRecord, reference: np.ndarray) -> tuple[str, float]:
    """``("float", rel RMS of the stored values vs the reference)`` or, for a palettized weight,
    ``("<n>bit", rel RMS of each palette value vs the centroid of the reference weights that use
    it)``: zero up to rounding for a faithful package, whatever the palette's own quantization error."""
    d = np.asarray(rec.dense, dtype=np.float32).ravel()  # fp32 first: numpy's fp16 unique is unreliable
    r = np.asarray(reference, dtype=np.float64).ravel()
    scale = float(np.sqrt(np.mean(r * r))) or 1.0
    if not np.all(np.isfinite(d)):
        return (f"{rec.nbits}bit" if rec.palettized else "float", float("inf"))
    if rec.palettized:
        _, inv = np.unique(d, return_inverse=True)
        if any(g > 1 for g in rec.groups):  # a table per block: cluster = (block, palette value)
            block = np.zeros(rec.dense.shape, dtype=np.int64)
            for axis, g in enumerate(rec.groups):
                size = rec.dense.shape[axis]
                idx = np.arange(size) // max(1, size // g)
                shape = [1] * rec.dense.ndim
                shape[axis] = size
                block = block * g + idx.reshape(shape)
            _, inv = np.unique(block.ravel() * (int(inv.max()) + 1) + inv, return_inverse=True)
        centroids = np.bincount(inv, weights=r) / np.bincount(inv)
        return f"{rec.nbits}bit", float(np.sqrt(np.mean((d - centroids[inv]) ** 2)) / scale)
    return "float", float(np.sqrt(np.mean((d - r) ** 2)) / scale)


def _is_identity(name: str, t: torch.Tensor) -> bool:
    """A norm's affine left at identity (weight 1, bias 0): the converter drops the multiply/add."""
    return bool((t == 1).all()) if name.endswith("weight") else bool((t == 0).all())


def _derived_constant(arr: np.ndarray) -> str | None:
    """What a parameter-free constant of a package is, if it is one the forward pass computes from the
    config: zeros (a bias-free linear's bias), sinusoidal timestep frequencies, a causal attention mask."""
    a = np.asarray(arr, dtype=np.float64)
    v = a.squeeze()
    if not v.any():
        return "zeros (the bias the converter gives a bias-free linear)"
    if v.ndim == 1 and v.size >= 2 and v[0] == 1.0:
        half = v.size
        for shift in (0.0, 1.0):
            freqs = np.exp(-math.log(10000.0) * np.arange(half) / (half - shift))
            if np.allclose(v, freqs, rtol=2e-3, atol=1e-4):
                return "timestep frequencies"
    if v.ndim == 2 and v.shape[0] == v.shape[1] and v.shape[0] > 1:
        lower = np.tril(np.ones_like(v, dtype=bool))
        if not v[lower].any() and (v[~lower] <= -1e4).all():
            return "causal attention mask"
    return None


def accounting_problems(module: nn.Module, records: dict[str, WeightRecord], report: LoadReport) -> list[str]:
    """Every weight of the package must be a parameter of the module (or a constant the forward pass
    derives from the config), and every parameter must be in the package (or be an identity affine
    the converter removed); anything else means the read-back would measure the reference's own
    weights for that part, so it is a failure, named. Each matched weight must also sit within
    ``MAX_WEIGHT_DRIFT`` of its reference (``weight_drift``)."""
    state = module.state_dict()
    problems = [
        f"package weight {op} {tuple(records[op].dense.shape)} maps to no parameter of the module"
        for op in report.unmatched_ops
        if _derived_constant(records[op].dense) is None
    ]
    problems += [
        f"parameter {name} {tuple(state[name].shape)} is not in the package (and is not an identity affine)"
        for name in report.missing_params
        if not _is_identity(name, state[name])
    ]
    problems += [
        f"weight {name} ({kind}) is {err:.3g} (relative RMS) from the reference, over {drift_limit(kind):g}"
        for name, (kind, err) in sorted(report.drift.items(), key=lambda kv: -kv[1][1])
        if not err <= drift_limit(kind)
    ]
    return problems


@dataclass
class PackageParity:
    """A package measured against the PyTorch reference by reading its weights back."""

    psnr_db: list[float]  # per output (of every case, in order)
    summary: WeightSummary
    load: dict[str, Any]  # LoadReport.metrics
    case_db: list[float] = field(default_factory=list)  # the worst output of each case

    @property
    def worst_db(self) -> float:
        return min(self.psnr_db)


def measure_packages(
    packages: list[Path], folder: Path, key: str, model_class: str | None, attention: str, added_cond: bool,
    example: list[torch.Tensor], reference: list[np.ndarray],
    more: list[tuple[list[torch.Tensor], list[np.ndarray]]] = (),  # type: ignore[assignment]
) -> PackageParity:  # fmt: skip
    """Load the weights of ``packages`` (one package, or the chunks of one) into a fresh torch module of
    component ``key`` (from the PIPELINE ``folder``, in attention mode ``attention``), run it on
    ``example`` and measure each output's PSNR against ``reference``; likewise for each further
    ``(example, reference)`` case in ``more`` (another batch size of a flexible package).

    Raises BuildError when a palettized weight maps to no parameter: the module would then run with
    the reference's own weights and the measurement would prove nothing.
    """
    records: dict[str, WeightRecord] = {}
    for package in packages:
        records.update(read_weights(package))
    summary = summarize_weights(records)
    module = build_module(key, load_model(folder, key, model_class), attention, added_cond)
    report = load_weights_into(module, records)
    problems = accounting_problems(module, records, report)
    del records
    if problems:
        shown = "\n  ".join(problems[:8]) + (f"\n  ... {len(problems) - 8} more" if len(problems) > 8 else "")
        raise BuildError(f"{key}: the read-back cannot account for every weight:\n  {shown}")
    if report.matched_palettized != summary.lut_ops:
        raise BuildError(
            f"{key}: only {report.matched_palettized} of {summary.lut_ops} palettized weights map to "
            "parameters; the parity check would not measure the package"
        )
    all_db: list[float] = []
    case_db: list[float] = []
    for ex, ref in [(example, reference), *more]:
        dbs = [psnr(r, o) for r, o in zip(ref, run_module(module, ex), strict=True)]
        all_db += dbs
        case_db.append(min(dbs))
    return PackageParity(all_db, summary, report.metrics(module), case_db)
