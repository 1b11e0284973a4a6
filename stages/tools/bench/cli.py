"""``sdkiln bench``: parse, run, write the report."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdkiln.runtime.contract.errors import UserError
from sdkiln.stages.tools.bench.report import to_markdown, write_results
from sdkiln.stages.tools.bench.run import run_bench
from sdkiln.stages.tools.bench.variants import TASKS, BenchConfig

# --------------------------------------------------------------------------------------------------
# CLI


def _csv(value: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in value.split(",") if x.strip())


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``sdkiln bench``."""
    s = sub.add_parser(
        "bench",
        help="benchmark a bundle's backends against the PyTorch reference",
        description="Latency, memory, size and achieved FLOP/s of a bundle's backends, each against the "
        "PyTorch reference measured in the same run (method: benchmarks/README.md).",
    )
    s.add_argument("bundle", help="a bundle folder (artifacts/<recipe>)")
    s.add_argument(
        "--backends",
        type=_csv,
        help="comma-separated variants: torch, torch-bf32, torch-bf16, torch-bf16-compile, onnx/<section>"
        "[@basic|extended|nospin] (default: all that apply on this machine; the reference always runs)",
    )
    s.add_argument("--components", type=_csv, help="e.g. unet,controlnet,vae_decoder (default: all)")
    s.add_argument(
        "--tasks", type=_csv, default=TASKS, help="sketch,text,edit (default: all); 'none' for none"
    )
    s.add_argument("--repeat", type=int, default=5, help="timed interleaved rounds (default 5)")
    s.add_argument("--warmup", type=int, default=1, help="untimed calls per variant first (default 1)")
    s.add_argument("--threads", type=int, help="intra-op threads for torch and ORT (default: physical cores)")
    s.add_argument("--size", type=int, help="image side in pixels (default: the model's native size)")
    s.add_argument("--steps", type=int, default=4, help="denoising steps per task (default 4)")
    s.add_argument(
        "--reference", default="torch", help="the variant ratios are taken against (default torch)"
    )
    s.add_argument("--no-taesd", action="store_true", help="no fast runs with the TAESD decoder")
    s.add_argument(
        "--levers",
        type=_csv,
        default=("taesd",),
        help="fast-profile runs on the fast base, each a '+'-joined set of levers: taesd, steps<N>, "
        "cn<K> (ControlNet on the first K steps), e.g. taesd,taesd+steps2 (default taesd; 'none')",
    )
    s.add_argument(
        "--fast-base",
        default="auto",
        help="the variant the levers run on (default auto: the fastest whose components all met their floors)",
    )
    s.add_argument("--task-repeat", type=int, help="timed rounds of the task phase (default: --repeat)")
    s.add_argument(
        "--deepcache",
        type=int,
        default=0,
        metavar="N",
        help="also run the PyTorch reference with DeepCache-style reuse of the UNet's deep features "
        "(full every N steps, shallow between) and report its time and deviation (default 0: off)",
    )
    s.add_argument(
        "--no-record",
        action="store_true",
        help="do not record this run's picks for backend='auto' (~/.cache/sdkiln/bench/<machine>.json)",
    )
    s.add_argument("--peak-max-n", type=int, default=2048, help="largest GEMM side of the peak probe")
    s.add_argument("--timeout", type=float, default=3600.0, help="seconds one worker call may take")
    s.add_argument(
        "--settle", type=float, default=0.05, help="seconds to pause before each timed call (default 0.05)"
    )
    s.add_argument(
        "--memory-budget",
        type=float,
        help="GiB the co-resident variants may use; more run in groups, each beside the reference "
        "(default: 80%% of available memory)",
    )
    s.add_argument(
        "--results-dir",
        default="benchmarks/results",
        help="where the JSON/MD/PNG go (default benchmarks/results)",
    )
    s.add_argument(
        "--readme",
        action="append",
        help="a Markdown file whose latest-results section to replace (repeatable)",
    )
    s.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    s.set_defaults(func=bench_command)


def bench_command(args: argparse.Namespace) -> int:
    """``sdkiln bench``: parse, run, write; prints the Markdown table and the result paths."""
    tasks = () if tuple(args.tasks) in (("none",), ()) else tuple(args.tasks)
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise UserError(f"--tasks: unknown {', '.join(bad)}; choose from: {', '.join(TASKS)} or none")
    if args.size is not None and (args.size <= 0 or args.size % 8):
        raise UserError(f"--size {args.size}: must be a positive multiple of 8")
    if args.steps < 1:
        raise UserError("--steps must be >= 1")
    levers = () if tuple(args.levers) in (("none",), ()) else tuple(args.levers)
    if args.no_taesd:
        levers = tuple(lv for lv in levers if "taesd" not in lv.split("+"))
    from sdkiln.stages.tools.bench.tasks import parse_levers

    for lv in levers:
        parse_levers(lv, args.steps)  # a bad lever fails before any work
    if args.task_repeat is not None and args.task_repeat < 1:
        raise UserError("--task-repeat must be >= 1")
    if args.deepcache < 0 or args.deepcache == 1:
        raise UserError("--deepcache N: N >= 2 (full every N steps), or 0 for off")
    config = BenchConfig(
        bundle=Path(args.bundle),
        backends=args.backends,
        components=args.components,
        tasks=tasks,
        repeat=args.repeat,
        warmup=args.warmup,
        threads=args.threads,
        size=args.size,
        steps=args.steps,
        reference=args.reference,
        levers=levers,
        fast_base=args.fast_base,
        task_repeat=args.task_repeat,
        deepcache=args.deepcache,
        record=not args.no_record,
        peak_max_n=args.peak_max_n,
        timeout_s=args.timeout,
        settle_s=args.settle,
        memory_budget_gb=args.memory_budget,
    )
    report = run_bench(config)
    paths = write_results(
        report,
        Path(args.results_dir),
        chart=not args.no_chart,
        readme=[Path(r) for r in args.readme or []],
    )
    print(to_markdown(report))
    for kind, p in paths.items():
        print(f"{kind}: {p}")
    if config.record:
        from sdkiln.stages.tools.bench.report import record_for_auto

        where = record_for_auto(report, paths["json"])
        if where is not None:
            print(f"recorded for backend='auto': {where}")
    return 0
