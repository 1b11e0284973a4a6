"""``sdkiln bench``: latency, memory, size and achieved FLOP/s of a bundle's backends, each measured
against the PyTorch reference in the same run.

    sdkiln bench artifacts/tiny --repeat 3
    sdkiln bench artifacts/bench --backends torch,onnx/fp32,onnx/int8 --components unet --tasks sketch

The package is split by responsibility: ``variants`` (what can run: the bundle, the variants, the run's
config), ``machine`` (CPU/ISA facts and measured GEMM peaks), ``worker`` (one process per variant),
``measure`` (inputs, parity, floors, summaries), ``run`` (interleaved components and tasks),
``report`` (recommendation, Markdown, chart, result files) and ``cli``. ``benchmarks/README.md`` has the
method in full.
"""

from sdkiln.stages.tools.bench.machine import ISA_FLAGS, machine_facts
from sdkiln.stages.tools.bench.measure import judge, make_inputs, parity, parity_floor, summarize
from sdkiln.stages.tools.bench.memory import plan_groups
from sdkiln.stages.tools.bench.report import (
    README_START,
    TARGET_RATIO,
    TARGETS,
    recommend,
    record_for_auto,
    to_markdown,
    write_results,
)
from sdkiln.stages.tools.bench.run import run_bench
from sdkiln.stages.tools.bench.variants import (
    SCHEMA,
    BenchConfig,
    Bundle,
    available_variants,
    select_variants,
)

__all__ = [
    "ISA_FLAGS",
    "README_START",
    "SCHEMA",
    "TARGETS",
    "TARGET_RATIO",
    "BenchConfig",
    "Bundle",
    "available_variants",
    "judge",
    "machine_facts",
    "make_inputs",
    "parity",
    "parity_floor",
    "plan_groups",
    "recommend",
    "record_for_auto",
    "run_bench",
    "select_variants",
    "summarize",
    "to_markdown",
    "write_results",
]
