"""optimize_onnx: ONNX Runtime graph fusions for a target (CPU or CUDA), parity-gated against PyTorch.

Recipe step::

    - id: onnx_cpu
      stage: optimize_onnx
      inputs: {onnx: onnx, model: fused}     # model: the PIPELINE the export came from (reference)
      params:
        target: cpu                          # or cuda: the full Stable Diffusion fusion set
        components: [unet, controlnet]       # default: every graph
        benchmark: {components: [unet], image_size: 512, repeats: 5}

Fusions come from ``onnxruntime.transformers.optimizer`` (model types ``unet``, ``vae``, ``clip``).
For CPU only fusions with CPU kernels are enabled: that optimizer emits ``NhwcConv``, ``GroupNorm``,
``SkipGroupNorm``, ``BiasSplitGelu``, ``BiasAdd`` and packed-QKV attention, which exist only for CUDA,
even with ``use_gpu=False``. On CPU the fused self-attention (``Attention``, one packed QKV weight) is
then rewritten to ``MatMul`` + ``Split`` + ``MultiHeadAttention``: ORT's CPU ``MultiHeadAttention``
kernel is markedly faster than its ``Attention`` kernel on the long sequences of a UNet (measured on a
tiny UNet at 768 px: 949 ms vs 546 ms of kernel time). For CUDA the optimizer's full SD set is kept.

The manifest records, per component, which fusions happened and the node counts before and after; for
CPU the benchmark records the latency of the input graph and the optimized graph on the CPU provider.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from pydantic import Field, model_validator

from sdkiln.runtime.contract.errors import BuildError
from sdkiln.runtime.contract.layout import VAE_KINDS, Kind
from sdkiln.stages.common.onnx.io import BenchmarkParams
from sdkiln.stages.common.onnx.parity import ParityParams
from sdkiln.stages.engine.core import Stage, StageContext, StageParams

logger = logging.getLogger(__name__)

# Component kind -> onnxruntime.transformers model type.
MODEL_TYPES = {
    "text_encoder": "clip",
    "text_encoder_2": "clip",
    "unet": "unet",
    "controlnet": "unet",
    "vae_encoder": "vae",
    "vae_decoder": "vae",
    "taesd_encoder": "vae",
    "taesd_decoder": "vae",
}
# FusionOptions switches whose ops have CUDA kernels only (checked against ORT 1.32's CPU kernel registry).
CUDA_ONLY_FUSIONS = (
    "enable_nhwc_conv",
    "enable_group_norm",
    "enable_skip_group_norm",
    "enable_bias_splitgelu",
    "enable_bias_add",
    "enable_packed_qkv",
    "enable_packed_kv",
)
CUDA_ONLY_OPS = ("NhwcConv", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd")
# Fusions a recipe may switch off by name (FusionOptions attribute without ``enable_``).
FUSION_NAMES = Literal[
    "attention", "layer_norm", "skip_layer_norm", "bias_skip_layer_norm", "gelu", "bias_gelu"
]


class OptimizeOnnxParams(StageParams):
    target: Literal["cpu", "cuda"] = "cpu"
    components: list[str] | None = Field(default=None, description="keys or kinds to optimize; default: all")
    disable_fusions: list[FUSION_NAMES] = Field(default=[], description="fusions to leave out")
    cpu_multi_head_attention: bool = Field(
        default=True, description="CPU: rewrite fused self-attention to the faster MultiHeadAttention kernel"
    )
    float16: bool = Field(
        default=False, description="CUDA: convert to fp16 after fusing (graph I/O stays fp32)"
    )
    parity: ParityParams = ParityParams()
    benchmark: BenchmarkParams | None = Field(
        default=BenchmarkParams(), description="CPU: latency before/after; null to skip"
    )
    allow_unverified: bool = Field(
        default=False,
        description="CUDA target on a machine without CUDA: skip the parity gate (recorded) instead of failing",
    )

    @model_validator(mode="after")
    def _check(self) -> OptimizeOnnxParams:
        if self.float16 and self.target != "cuda":
            raise ValueError("float16: fp16 conversion here is for the cuda target (export fp16 for CPU)")
        if self.benchmark is not None and self.target != "cpu":
            raise ValueError("benchmark: only the cpu target can be benchmarked here (set benchmark: null)")
        if self.allow_unverified and self.target == "cpu":
            raise ValueError("allow_unverified: a cpu target is always verified")
        return self


def fusion_options(kind: str, target: str, disabled: list[str]) -> Any:
    """The optimizer's FusionOptions for a component kind and target."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    opts = FusionOptions(MODEL_TYPES[kind])
    if target == "cpu":
        for name in CUDA_ONLY_FUSIONS:
            setattr(opts, name, False)
    for name in disabled:
        setattr(opts, f"enable_{name}", False)
    return opts


def attention_to_mha(model: Any) -> int:
    """Rewrite com.microsoft ``Attention`` nodes (packed QKV weight, no mask, no past) into
    ``MatMul`` -> ``Split`` -> ``MultiHeadAttention``, in place. Returns how many were rewritten.

    Same math: Attention computes ``X @ W_qkv + b`` and splits it into Q, K, V; MultiHeadAttention takes
    Q, K, V and the same packed bias.
    """
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    new_nodes = []
    count = 0
    for node in model.graph.node:
        ok = (
            node.op_type == "Attention"
            and node.domain == "com.microsoft"
            and len([i for i in node.input if i]) == 3
            and node.input[1] in inits
            and len(node.output) == 1
        )
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if not ok or set(attrs) - {"num_heads", "qkv_hidden_sizes"}:
            new_nodes.append(node)
            continue
        w = inits[node.input[1]]
        total = int(w.dims[1])
        sizes = list(attrs.get("qkv_hidden_sizes") or [total // 3] * 3)
        prefix = node.name or f"attention_{count}"
        split_name = f"{prefix}_qkv_split_sizes"
        model.graph.initializer.append(numpy_helper.from_array(_int64(sizes), split_name))
        qkv = f"{prefix}_qkv"
        q, k, v = (f"{prefix}_{x}" for x in "qkv")
        new_nodes += [
            helper.make_node("MatMul", [node.input[0], node.input[1]], [qkv], name=f"{prefix}_MatMul_QKV"),
            helper.make_node("Split", [qkv, split_name], [q, k, v], name=f"{prefix}_Split_QKV", axis=-1),
            helper.make_node(
                "MultiHeadAttention",
                [q, k, v, node.input[2]],
                list(node.output),
                name=f"{prefix}_MultiHeadAttention",
                domain="com.microsoft",
                num_heads=int(attrs["num_heads"]),
            ),
        ]
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return count


def _int64(values: list[int]) -> Any:
    import numpy as np

    return np.asarray(values, dtype=np.int64)


def optimize_graph(src: Any, kind: str, params: OptimizeOnnxParams) -> tuple[Any, dict[str, int]]:
    """Fuse one graph (a path); returns the optimized ModelProto and the fusion counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    opts = fusion_options(kind, params.target, list(params.disable_fusions))
    # opt_level 0: Python fusions only. ORT's own optimizer would bake provider-specific layouts into the
    # file; it runs again anyway when a session loads the graph.
    om = optimize_model(
        str(src),
        model_type=MODEL_TYPES[kind],
        opt_level=0,
        optimization_options=opts,
        use_gpu=params.target == "cuda",
    )
    stats = {k: int(v) for k, v in om.get_fused_operator_statistics().items() if v}
    if params.target == "cpu" and params.cpu_multi_head_attention:
        n = attention_to_mha(om.model)
        if n:
            stats["Attention->MultiHeadAttention"] = n
    if params.float16 and kind not in VAE_KINDS:
        om.convert_float_to_float16(keep_io_types=True)
        stats["float16"] = 1
    return om.model, stats


def run(ctx: StageContext) -> None:
    from sdkiln.stages.common.onnx import io as ou
    from sdkiln.stages.common.onnx.transform import GraphTransform

    p: OptimizeOnnxParams = ctx.params
    provider = "CPUExecutionProvider" if p.target == "cpu" else "CUDAExecutionProvider"
    verify = p.target == "cpu" or _has_provider(provider)
    if not verify and not p.allow_unverified:
        raise BuildError(
            f"target {p.target}: {provider} is not available here, so the parity gate cannot run; "
            "build on a CUDA machine, or set allow_unverified: true to skip the gate (recorded)"
        )
    t = GraphTransform(ctx, p.components)
    fusions: dict[str, Any] = {}
    nodes: dict[str, Any] = {}
    bench: dict[str, Any] = {}
    for comp in t.planned:
        if comp not in t.selected:
            t.copy(comp)
            continue
        t0 = time.perf_counter()
        in_path = t.in_path(comp)
        before = ou.load_model(in_path, with_data=False)
        model, stats = optimize_graph(in_path, comp.kind, p)
        if p.target == "cpu":
            bad = sorted({n.op_type for n in model.graph.node if n.op_type in CUDA_ONLY_OPS})
            if bad:
                raise BuildError(f"{comp.key}: CPU graph contains CUDA-only ops {bad}")
        fusions[comp.key] = stats
        nodes[comp.key] = {
            "before": len(before.graph.node),
            "after": len(model.graph.node),
            "ops_before": ou.op_histogram(before),
            "ops_after": ou.op_histogram(model),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        wanted = "fp16" if stats.get("float16") else t.entry(comp)["precision"]
        t.save(comp, model, wanted=wanted)
        del model, before
        if verify:
            t.check_parity(comp, p.parity, provider)
        if p.benchmark is not None and (
            comp.key in p.benchmark.components or comp.kind in p.benchmark.components
        ):
            bench[comp.key] = _benchmark(
                comp, in_path, t.out_path(comp), p.benchmark, t.fam.vae_scale_factor, t.static
            )
    ctx.metrics.update({"fusions": fusions, "nodes": nodes})
    if bench:
        ctx.metrics["benchmark"] = bench
    if not verify:
        ctx.metrics["parity"] = {"skipped": f"{provider} not available"}
    t.finish(
        f"optimize_onnx ({p.target})",
        details={"optimized_for": p.target, "optimized": [c.key for c in t.selected]},
        parity=verify,
    )


def _has_provider(provider: str) -> bool:
    import onnxruntime as ort

    return provider in ort.get_available_providers()


def _benchmark(
    comp: Any,
    before: Any,
    after: Any,
    b: BenchmarkParams,
    vae_scale_factor: int,
    static: dict[str, int] | None,
) -> dict[str, Any]:
    """Latency of the input graph vs the optimized graph on the CPU provider, same feeds, interleaved."""
    from sdkiln.stages.common.onnx import components as oc
    from sdkiln.stages.common.onnx import io as ou

    axes = static or oc.bindings(b.batch, b.image_size, b.image_size, vae_scale_factor)
    feeds = oc.make_feeds(comp, axes, seed=0)
    ms = ou.benchmark(
        {"input": ou.cpu_session(before, b.threads), "optimized": ou.cpu_session(after, b.threads)},
        feeds,
        b.repeats,
    )
    return {
        "shape": {k: axes[k] for k in ("batch", "height", "width")},
        "input_ms": ms["input"],
        "optimized_ms": ms["optimized"],
        "speedup": round(ms["input"] / ms["optimized"], 3),
        "threads": b.threads,
        "repeats": b.repeats,
    }


STAGE = Stage(
    name="optimize_onnx",
    version="1",
    inputs={"onnx": (Kind.ONNX,), "model": (Kind.PIPELINE,)},
    output_kind=Kind.ONNX,
    params=OptimizeOnnxParams,
    run=run,
    description="ONNX Runtime graph fusions for CPU or CUDA, parity-gated against PyTorch",
    env_packages=("torch", "diffusers", "onnx", "onnxruntime"),
    bundle_dir=lambda p: f"onnx/{p.target}{'-fp16' if p.float16 else ''}",
)
