"""palettize_coreml: k-means weight palettization of Core ML packages (6 bits by default; 4 and 8 too).

(One stage module of ~550 lines: the k-means palette, the mixed-bit search and chunking are only used
here, and the house style keeps a stage's own algorithms beside its ``run``.)

Recipe step::

    - id: coreml6
      stage: palettize_coreml
      inputs: {coreml: coreml, model: fused}   # the export and the PIPELINE it was exported from
      params:
        nbits: 6
        granularity: per_tensor        # per_grouped_channel needs an iOS18/macOS15 export
        components: [text_encoder, unet, controlnet]
        # mixed_bit: {candidates: [4, 6, 8], min_psnr_db: 40}   # a bit width per layer by output PSNR
        # chunk_unet: true             # two UNet packages of about equal size, for iOS memory limits

Each weight of at least ``weight_threshold`` elements becomes a ``constexpr_lut_to_dense`` op: a table of
``2**nbits`` fp16 values (per tensor, or per group of output channels) and an ``nbits`` index per
element. Embedding tables (``gather`` inputs) stay fp16, as in Apple's pipeline. Packages of other
components are copied unchanged. The UNet is palettized before it is chunked.

Checks (Core ML cannot run a model on Linux): every palettized package reloads with
``skip_model_load=True``, keeps its interface, and holds lookup-table ops; its weights, decompressed
from the tables, are loaded into a fresh PyTorch module that runs against the fp32 reference (diffusers'
own attention): the output PSNR must clear the floor (35 dB for real weights, Apple's gate; a
documented lower floor for the tiny presets). Sizes before/after and bits per weight go into the
manifest.

Mixed-bit recipe (optional): every eligible weight is palettized *alone* in PyTorch at each candidate
bit width and the output PSNR measured; treating the per-layer errors as independent noise, a greedy
search then starts every layer at the smallest width and widens, one layer at a time, the one that buys
the most PSNR per added byte, until the predicted PSNR reaches ``min_psnr_db``. The recipe found is
measured in PyTorch as a whole, applied to the package per weight, and recorded in the manifest.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from sdkiln.runtime.contract.errors import BuildError, ParityError, UserError
from sdkiln.runtime.contract.layout import Kind
from sdkiln.stages.engine.core import Stage, StageContext, StageParams

logger = logging.getLogger(__name__)

Bits = Literal[2, 3, 4, 6, 8]
ComponentName = Literal["text_encoder", "unet", "controlnet", "vae_decoder", "vae_encoder"]


class MixedBitParams(StageParams):
    """A per-layer bit-width search driven by measured output PSNR."""

    candidates: tuple[Bits, ...] = Field((4, 6, 8), min_length=2)
    min_psnr_db: float = Field(40.0, ge=10, le=120, description="predicted output PSNR the recipe must reach")

    @model_validator(mode="after")
    def _distinct(self) -> MixedBitParams:
        if len(set(self.candidates)) != len(self.candidates):
            raise ValueError(f"candidates must be distinct, got {list(self.candidates)}")
        return self


class PalettizeCoremlParams(StageParams):
    """Parameters of ``palettize_coreml``."""

    nbits: Literal[4, 6, 8] = 6
    granularity: Literal["per_tensor", "per_grouped_channel"] = "per_tensor"
    group_size: int = Field(
        16, ge=1, le=4096, description="output channels per palette (per_grouped_channel)"
    )
    components: tuple[ComponentName, ...] = Field(("text_encoder", "unet", "controlnet"), min_length=1)
    weight_threshold: int = Field(2048, ge=1, description="weights with fewer elements stay fp16")
    mixed_bit: MixedBitParams | None = None
    chunk_unet: bool = False
    kmeans_workers: int = Field(
        1, ge=1, le=64, description="processes for coremltools' k-means (real-size models)"
    )
    min_psnr_db: float | None = Field(None, ge=0, le=200, description="parity floor; default: the family's")
    seed: int = Field(0, ge=0, description="seed of the parity inputs")

    @model_validator(mode="after")
    def _group_size_needs_groups(self) -> PalettizeCoremlParams:
        if "group_size" in self.model_fields_set and self.granularity != "per_grouped_channel":
            raise ValueError("group_size applies only to granularity per_grouped_channel")
        return self


def selected(key: str, components: tuple[str, ...]) -> bool:
    """Whether component key ``key`` (``text_encoder_2``, ``controlled_unet``, ``controlnet.x``, ...) is
    one of the ``components`` named in the params."""
    from sdkiln.stages.common.coreml.io import UNET_KEYS

    if key.startswith("text_encoder"):
        name = "text_encoder"
    elif key in UNET_KEYS:
        name = "unet"
    elif key.startswith("controlnet."):
        name = "controlnet"
    else:
        name = key
    return name in components


def op_config(params: PalettizeCoremlParams, nbits: int) -> Any:
    """coremltools' k-means palettizer config for ``nbits`` with the params' granularity."""
    import coremltools as ct

    kwargs: dict[str, Any] = {
        "mode": "kmeans",
        "nbits": nbits,
        "weight_threshold": params.weight_threshold,
        "num_kmeans_workers": params.kmeans_workers,
    }
    if params.granularity == "per_grouped_channel":
        kwargs |= {"granularity": "per_grouped_channel", "group_size": params.group_size}
    return ct.optimize.coreml.OpPalettizerConfig(**kwargs)


def palettize_package(
    src: Path, dst: Path, params: PalettizeCoremlParams, per_weight: dict[str, int | None]
) -> None:
    """Palettize the package at ``src`` into ``dst``: every weight above ``params.weight_threshold``
    elements at ``params.nbits``, except those ``per_weight`` names (const op name -> bits, or None to
    leave it as it is); embedding tables (``gather`` inputs) are left alone."""
    import coremltools as ct

    from sdkiln.stages.common.coreml import io as cio

    config = ct.optimize.coreml.OptimizationConfig(
        global_config=op_config(params, params.nbits),
        op_type_configs={"gather": None},
        op_name_configs={
            name: None if bits is None else op_config(params, bits) for name, bits in per_weight.items()
        },
    )
    model = ct.models.MLModel(str(src), skip_model_load=True)
    out = ct.optimize.coreml.palettize_weights(model, config=config)
    dst.parent.mkdir(parents=True, exist_ok=True)
    cio.save_package(out, dst)


def eligible_weights(
    module: Any, package: Path, params: PalettizeCoremlParams
) -> tuple[dict[str, tuple[str, Any]], list[str]]:
    """Which weights of ``package`` to palettize: ``(op name -> (parameter name, fp16 values), the other
    weight op names)``. ``module`` is the converted torch module; it is left holding the package's weights.

    Only model weights above ``weight_threshold`` elements qualify: constants the converter made (a causal
    mask, a folded position-embedding lookup) match no parameter and stay as they are, like embedding
    tables; so do weights whose output channels do not split into whole groups (coremltools would skip
    them with a warning).
    """
    from torch import nn

    from sdkiln.stages.common.coreml.readback import load_weights_into, read_weights

    records = read_weights(package)
    report = load_weights_into(module, records)
    embeddings = {f"{name}.weight" for name, m in module.named_modules() if isinstance(m, nn.Embedding)}
    grouped = params.granularity == "per_grouped_channel"
    eligible = {
        op: (pname, records[op].dense)
        for pname, op in report.matched.items()
        if records[op].dense.size > params.weight_threshold
        and records[op].dense.ndim > 1  # coremltools never compresses rank <= 1 consts (biases)
        and pname not in embeddings
        and not (grouped and records[op].dense.shape[0] % params.group_size)
    }
    return eligible, [op for op in records if op not in eligible]


# --------------------------------------------------------------------------------------------------
# k-means palettes in numpy (the mixed-bit analysis simulates palettization in PyTorch)


def kmeans_palette(values: Any, nbits: int, iterations: int = 25) -> Any:
    """``values`` with each element replaced by the nearest of ``2**nbits`` k-means centroids.

    Clusters the distinct fp16 values weighted by their counts (an fp16 tensor has at most 65,536
    distinct values, so this stays fast on the largest SD weights) with Lloyd iterations, the objective
    coremltools' palettizer minimises. Lloyd's method converges slowly in one dimension from a poor
    start, so the centroids start where an optimal quantizer puts them for many levels: at quantiles of
    the cube root of the value density (Panter and Dite).
    """
    import numpy as np

    flat = np.asarray(values, dtype=np.float16).reshape(-1)
    # Unique over the exact float32 copies: numpy 2.3's AVX-512 float16 sort returns unsorted runs for
    # large arrays with many repeats on some CPUs (seen on AMD Zen 5), which np.unique relies on.
    uniq, inverse, counts = np.unique(flat.astype(np.float32), return_inverse=True, return_counts=True)
    k = 1 << nbits
    x = uniq.astype(np.float64)
    if len(x) <= k:
        return flat.astype(np.float32).reshape(np.shape(values))
    w = counts.astype(np.float64)
    hist, edges = np.histogram(x, bins=2048, weights=w)
    cdf = np.concatenate([[0.0], np.cumsum(np.cbrt(hist))])
    centroids = np.interp((np.arange(k) + 0.5) / k, cdf / cdf[-1], edges)
    for _ in range(iterations):
        # 1-D: the clusters are the intervals between midpoints of the sorted centroids.
        centroids = np.unique(centroids)
        assign = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, x)
        sums = np.bincount(assign, weights=w * x, minlength=len(centroids))
        mass = np.bincount(assign, weights=w, minlength=len(centroids))
        new = np.where(mass > 0, sums / np.maximum(mass, 1e-300), centroids)
        if np.allclose(new, centroids, rtol=0, atol=1e-9):
            break
        centroids = new
    q = centroids[np.searchsorted((centroids[1:] + centroids[:-1]) / 2, x)].astype(np.float16)
    return q[inverse].astype(np.float32).reshape(np.shape(values))


def simulate_palette(values: Any, nbits: int, group_size: int | None) -> Any:
    """Palettize a weight in numpy: one palette per tensor, or one per ``group_size`` output channels."""
    import numpy as np

    arr = np.asarray(values, dtype=np.float32)
    if group_size is None or arr.ndim < 2:
        return kmeans_palette(arr, nbits)
    out = np.empty_like(arr)
    for start in range(0, arr.shape[0], group_size):
        out[start : start + group_size] = kmeans_palette(arr[start : start + group_size], nbits)
    return out


@dataclass
class MixedBitResult:
    """A per-weight bit recipe and how it was found."""

    bits: dict[str, int]  # const op name -> bits
    predicted_psnr_db: float
    measured_psnr_db: float
    sensitivity: dict[str, dict[int, float]]  # op name -> bits -> PSNR with only that weight palettized
    analysis_s: float

    def metrics(self) -> dict[str, Any]:
        hist: dict[str, int] = {}
        for b in self.bits.values():
            hist[str(b)] = hist.get(str(b), 0) + 1
        return {
            "predicted_psnr_db": round(self.predicted_psnr_db, 2),
            "torch_psnr_db": round(self.measured_psnr_db, 2),
            "layers_per_bits": dict(sorted(hist.items())),
            "analysis_s": round(self.analysis_s, 2),
        }


def _noise(psnr_db: float) -> float:
    """Noise power relative to peak power for a PSNR (what adds up across independent errors)."""
    return 0.0 if math.isinf(psnr_db) else 10.0 ** (-psnr_db / 10.0)


def choose_bits(
    sensitivity: dict[str, dict[int, float]],
    sizes: dict[str, int],
    candidates: tuple[int, ...],
    target_db: float,
) -> tuple[dict[str, int], float]:
    """Greedy per-layer bit allocation: start every layer at the smallest candidate; while the predicted
    PSNR (noise powers summed over layers) is below ``target_db``, widen the layer whose next width
    removes the most noise per added bit of storage. Returns (bits per layer, predicted PSNR)."""
    order = sorted(candidates)
    level = {name: 0 for name in sensitivity}

    def noise(name: str) -> float:
        return _noise(sensitivity[name][order[level[name]]])

    total = sum(noise(n) for n in sensitivity)
    while total > 0 and -10 * math.log10(total) < target_db:
        best, best_gain = None, 0.0
        for name in sensitivity:
            if level[name] + 1 >= len(order):
                continue
            gain = noise(name) - _noise(sensitivity[name][order[level[name] + 1]])
            cost = sizes[name] * (order[level[name] + 1] - order[level[name]])
            if gain / cost > best_gain:
                best, best_gain = name, gain / cost
        if best is None:
            break  # every layer at the widest candidate, or no widening helps any more
        total -= noise(best)
        level[best] += 1
        total += noise(best)
    predicted = math.inf if total <= 0 else -10 * math.log10(total)
    return {n: order[lv] for n, lv in level.items()}, predicted


def mixed_bit_search(
    module: Any, example: list[Any], reference: list[Any], eligible: dict[str, tuple[str, Any]],
    params: PalettizeCoremlParams,
) -> MixedBitResult:  # fmt: skip
    """Measure each eligible weight's output PSNR when palettized alone at each candidate width, choose
    a recipe (``choose_bits``) and measure it as a whole. ``eligible``: op name -> (parameter name,
    the package's fp16 values). ``module`` holds the package's weights and is restored afterwards."""
    import torch

    from sdkiln.stages.common.coreml.io import psnr, run_module

    assert params.mixed_bit is not None
    t0 = time.perf_counter()
    group = params.group_size if params.granularity == "per_grouped_channel" else None
    state = module.state_dict()

    def out_psnr() -> float:
        return min(psnr(r, o) for r, o in zip(reference, run_module(module, example), strict=True))

    sensitivity: dict[str, dict[int, float]] = {}
    palettes: dict[tuple[str, int], Any] = {}
    with torch.no_grad():
        for op_name, (pname, values) in eligible.items():
            original = state[pname].clone()
            sensitivity[op_name] = {}
            for bits in params.mixed_bit.candidates:
                q = torch.from_numpy(simulate_palette(values, bits, group)).reshape(original.shape)
                palettes[(op_name, bits)] = q
                state[pname].copy_(q)
                sensitivity[op_name][bits] = out_psnr()
            state[pname].copy_(original)
        sizes = {n: int(v.size) for n, (_, v) in eligible.items()}
        bits, predicted = choose_bits(
            sensitivity, sizes, params.mixed_bit.candidates, params.mixed_bit.min_psnr_db
        )
        originals = {pname: state[pname].clone() for pname, _ in eligible.values()}
        for op_name, (pname, _) in eligible.items():
            state[pname].copy_(palettes[(op_name, bits[op_name])])
        measured = out_psnr()
        for pname, original in originals.items():
            state[pname].copy_(original)
    return MixedBitResult(bits, predicted, measured, sensitivity, time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------------
# Chunking


def chunk_unet(package: Path, chunk_paths: list[Path], work_dir: Path) -> None:
    """Split a (palettized) UNet package into two of about equal weight size (coremltools'
    ``bisect_model``: the cut follows the op order, at half the weight bytes)."""
    import coremltools as ct

    from sdkiln.stages.common.coreml import io as cio

    tmp = work_dir / f"chunks-{package.stem}"
    ct.models.utils.bisect_model(str(package), str(tmp), check_output_correctness=False)
    made = [tmp / f"{package.stem}_chunk{i}.mlpackage" for i in (1, 2)]
    for src, dst in zip(made, chunk_paths, strict=True):
        if not src.is_dir():
            raise BuildError(f"bisect_model did not write {src.name}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(dst))
        cio.normalize_package(dst)


def check_chunks(full: Any, first: Any, second: Any) -> list[str]:
    """The chunks must compose to the full model: chunk 1 reads only model inputs, chunk 2 reads model
    inputs and chunk 1's outputs, and gives exactly the model's outputs."""
    problems = []
    full_in = {t.name for t in full.inputs}
    first_in, first_out = {t.name for t in first.inputs}, {t.name for t in first.outputs}
    second_in = {t.name for t in second.inputs}
    if not first_in <= full_in:
        problems.append(f"chunk 1 reads {sorted(first_in - full_in)}, not model inputs")
    if not second_in <= full_in | first_out:
        problems.append(f"chunk 2 reads {sorted(second_in - full_in - first_out)}, produced by nobody")
    if not first_out & second_in:
        problems.append("chunk 2 reads nothing chunk 1 computes")
    if [t.name for t in second.outputs] != [t.name for t in full.outputs]:
        problems.append(
            f"chunk 2 outputs {[t.name for t in second.outputs]}, model {[t.name for t in full.outputs]}"
        )
    return problems


# --------------------------------------------------------------------------------------------------


def run(ctx: StageContext) -> None:
    import gc

    from sdkiln.runtime.contract.families import get_family
    from sdkiln.stages.common.coreml import flexible
    from sdkiln.stages.common.coreml import io as cio
    from sdkiln.stages.common.coreml import readback as crb
    from sdkiln.stages.common.coreml.io import GROUPED_PALETTE_TARGETS, psnr_floor
    from sdkiln.stages.common.torch.pipeline import read_configs

    p: PalettizeCoremlParams = ctx.params
    src = ctx.input("coreml")
    pipeline = ctx.input("model")
    details_in = src.manifest.details
    target = details_in.get("minimum_deployment_target")
    attention = details_in.get("attention")
    if attention is None or target is None:
        raise UserError("input 'coreml' is not an export_coreml artifact (no attention/deployment target)")
    if p.granularity == "per_grouped_channel" and target not in GROUPED_PALETTE_TARGETS:
        raise UserError(
            f"granularity per_grouped_channel needs a minimum_deployment_target of {' or '.join(GROUPED_PALETTE_TARGETS)}; "
            f"the input was exported for {target}"
        )
    fam = get_family(src.model.family)
    added_cond = fam.uses_added_cond
    vocab = int(read_configs(pipeline.path).get("text_encoder", {}).get("vocab_size", 49408))

    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(src.path / name, ctx.out_dir / name)

    failures: list[str] = []
    total_before = total_after = 0
    mixed: dict[str, dict[str, int]] = {}
    components_in = src.components
    for key, comp in ctx.progress(list(components_in.items()), desc="palettize"):
        package_in = src.path / comp["path"]
        size_before = cio.package_bytes(package_in)
        total_before += size_before
        if not selected(key, p.components):
            shutil.copytree(package_in, ctx.out_dir / comp["path"])
            ctx.components[key] = dict(comp)
            total_after += size_before
            continue

        model_class = fam.components[key].model_class if key.startswith("text_encoder") else None
        inputs = tuple(cio.TensorInfo.from_manifest(t) for t in comp["inputs"])
        example = cio.example_inputs(inputs, p.seed, vocab)
        model = cio.load_model(pipeline.path, key, model_class)
        ref_module = cio.build_module(key, model, "original", added_cond)
        reference = cio.run_module(ref_module, example)
        # A flexible-batch package is measured at each batch size it takes (the declared one first).
        more = []
        for b in (comp.get("batch_sizes") or [])[1:]:
            example_b = cio.example_inputs(flexible.at_batch(inputs, b), p.seed, vocab)
            more.append((example_b, cio.run_module(ref_module, example_b)))
        del ref_module
        module = cio.build_module(key, model, attention, added_cond)

        eligible, others = eligible_weights(module, package_in, p)
        per_weight: dict[str, int | None] = dict.fromkeys(others)
        n_eligible = len(eligible)
        result = None
        if p.mixed_bit is not None:
            result = mixed_bit_search(module, example, reference, eligible, p)
            per_weight |= result.bits
            mixed[key] = dict(sorted(result.bits.items()))
        del module, model, eligible
        gc.collect()

        t0 = time.perf_counter()
        package_out = ctx.out_dir / comp["path"]
        palettize_package(package_in, package_out, p, per_weight)
        palettize_s = time.perf_counter() - t0
        spec_full = crb.read_spec(package_out)
        problems = _check_interface(spec_full, comp)
        problems += _check_batches(package_in, package_out)

        packages = [package_out]
        entry = dict(comp)
        chunk_metrics: dict[str, Any] = {}
        if p.chunk_unet and key in cio.UNET_KEYS:
            t1 = time.perf_counter()
            chunk_rel = cio.chunk_relpaths(key)
            packages = [ctx.out_dir / r for r in chunk_rel]
            chunk_unet(package_out, packages, ctx.work_dir)
            if comp.get("batch_sizes"):
                # bisect_model declares flexible inputs at their lower bound; Swift reads the UNet's batch
                # from chunk 1, and Core ML runs a range's declared shape on the Neural Engine.
                for pkg in packages:
                    flexible.set_declared_batch(pkg, comp["batch_sizes"][0])
            # Swift loads the chunks when both exist: the whole UNet would be dead weight.
            shutil.rmtree(package_out)
            specs = [crb.read_spec(pkg) for pkg in packages]
            problems += check_chunks(spec_full, *specs)
            problems += _check_batches(package_in, packages[0])
            sizes = [cio.package_bytes(pkg) for pkg in packages]
            chunk_metrics = {
                "chunk_s": round(time.perf_counter() - t1, 2),
                "chunk1_bytes": sizes[0],
                "chunk2_bytes": sizes[1],
                "chunk_balance": round(min(sizes) / max(sizes), 3),
            }
            del entry["path"]
            entry["chunks"] = [
                {"path": rel, "inputs": s.io_manifest()[0], "outputs": s.io_manifest()[1]}
                for rel, s in zip(chunk_rel, specs, strict=True)
            ]
        failures += [f"{key}: {x}" for x in problems]

        parity = crb.measure_packages(
            packages, pipeline.path, key, model_class, attention, added_cond, example, reference, more
        )
        if parity.summary.lut_ops != n_eligible:
            failures.append(
                f"{key}: {parity.summary.lut_ops} lookup-table (constexpr_lut_to_dense) ops, expected one per "
                f"eligible weight ({n_eligible})"
            )
        gc.collect()
        worst = parity.worst_db
        floor = psnr_floor(key, src.model, p.min_psnr_db, palettized=True)
        if worst < floor:
            failures.append(f"{key}: PSNR {worst:.1f} dB < {floor:.1f} dB")

        size_after = sum(cio.package_bytes(pkg) for pkg in packages)
        total_after += size_after
        entry["precision"] = crb.precision_label(parity.summary)
        entry["palettization"] = {
            "nbits": "mixed" if result else p.nbits,
            "granularity": p.granularity,
            **({"group_size": p.group_size} if p.granularity == "per_grouped_channel" else {}),
        }
        ctx.components[key] = entry
        metrics = {
            "bytes_before": size_before,
            "bytes_after": size_after,
            "size_ratio": round(size_after / size_before, 4),
            "palettize_s": round(palettize_s, 2),
            "eligible_weights": n_eligible,
            "psnr_db": round(worst, 2),
            "psnr_floor_db": floor,
            **(
                {
                    f"psnr_db_batch{b}": round(db, 2)
                    for b, db in zip(comp["batch_sizes"], parity.case_db, strict=True)
                }
                if more
                else {}
            ),
            **parity.summary.metrics(),
            **parity.load,
            **chunk_metrics,
            **({"mixed_bit": result.metrics()} if result else {}),
        }
        ctx.metrics.update(cio.flat_metrics(key, metrics))
        logger.info(
            "%s: %d -> %d bytes (%.3fx), %.2f bits/weight, PSNR %.1f dB (floor %.1f)",
            key, size_before, size_after, size_after / size_before, parity.summary.bits_per_weight, worst, floor,
        )  # fmt: skip

    ctx.metrics["bytes_before"] = total_before
    ctx.metrics["bytes_after"] = total_after
    ctx.metrics["size_ratio"] = round(total_after / total_before, 4) if total_before else 0.0
    ctx.model = src.model
    ctx.details.update(details_in)
    ctx.details["palettization"] = {
        "nbits": p.nbits,
        "granularity": p.granularity,
        "components": list(p.components),
        "chunked_unet": p.chunk_unet,
        **({"mixed_bit": mixed} if mixed else {}),
    }
    if failures:
        raise ParityError(f"palettize_coreml ({p.nbits}-bit)", failures)


def _check_batches(before: Path, after: Path) -> list[str]:
    """The batch sizes every model input of ``before`` takes must survive in ``after`` (palettization and
    chunking keep a flexible batch; chunk 1 takes the model's inputs)."""
    import coremltools as ct

    from sdkiln.stages.common.coreml.flexible import accepted_batches

    want = accepted_batches(ct.utils.load_spec(str(before)))
    got = accepted_batches(ct.utils.load_spec(str(after)))
    return [
        f"input {n} takes batch {got[n]} after palettization, {want[n]} before"
        for n in sorted(set(want) & set(got))
        if got[n] != want[n]
    ]


def _check_interface(spec: Any, comp: dict[str, Any]) -> list[str]:
    ins, outs = spec.io_manifest()
    problems = []
    if ins != comp["inputs"]:
        problems.append(f"inputs changed by palettization: {ins} != {comp['inputs']}")
    if outs != comp["outputs"]:
        problems.append(f"outputs changed by palettization: {outs} != {comp['outputs']}")
    return problems


STAGE = Stage(
    name="palettize_coreml",
    # 2: packages saved reproducibly (common.coreml.io.normalize_package); 3: flexible-batch packages
    # measured at both batch sizes, chunks declared at the default batch
    version="3",
    inputs={"coreml": (Kind.COREML,), "model": (Kind.PIPELINE,)},
    output_kind=Kind.COREML,
    params=PalettizeCoremlParams,
    run=run,
    description="k-means weight palettization (6-bit default, per tensor or grouped channel, optional "
    "mixed-bit), optional UNet chunking, with Linux-side parity",
    env_packages=("torch", "diffusers", "transformers", "coremltools", "scikit-learn", "numpy"),
    # The recipe usually files it where the export would go (`bundle: coreml/split_einsum`), with the
    # unpalettized export step set to `bundle: false`.
    bundle_dir=lambda p: f"coreml/{'mixed' if p.mixed_bit else p.nbits}bit",
)
