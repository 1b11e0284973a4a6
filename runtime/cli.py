"""``sdkiln run sketch|text|edit`` and ``sdkiln demo``: parse, call the runtime library, report.

The main CLI adds these subcommands with ``add_run_parser`` /
``add_demo_parser`` and maps errors to exit codes (UserError -> 2 with one message). Cheap checks
(steps, strength, style, backend, the input image) run before the bundle is loaded, so bad input fails
fast; then the run prints where the PNG went and the time per stage::

    sdkiln run sketch --model artifacts/tiny --backend onnx --image car.png --prompt "a red sports car"
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from sdkiln.runtime.contract.errors import UserError

logger = logging.getLogger(__name__)

TASKS = ("sketch", "text", "edit")


def add_run_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``run`` to the main CLI's subcommands."""
    p = subparsers.add_parser(
        "run",
        help="run a bundle: sketch (ControlNet scribble), text (txt2img) or edit (img2img / canny)",
        description="Generate one image with a bundle on a backend; prints the PNG path and stage times.",
    )
    p.add_argument("task", choices=TASKS)
    p.add_argument("--model", required=True, help="bundle folder (or Hub repo owner/name[@rev])")
    p.add_argument(
        "--backend",
        default="onnx",
        help="onnx (default), openvino, torch (PyTorch reference), coreml, tensorrt or torch_cuda (NVIDIA "
        "GPUs), or auto: the configuration `sdkiln bench` measured fastest on this machine (see --profile)",
    )
    p.add_argument(
        "--profile",
        choices=("exact", "fast"),
        default="exact",
        help="with --backend auto: exact (same algorithm, parity passed) or fast (declared trade-offs: "
        "TAESD, fewer steps, ControlNet on the first steps; their measured deviation is printed)",
    )
    p.add_argument(
        "--inference-precision",
        default="f32",
        metavar="SPEC",
        help="openvino: f32 (exact; default), bf16 (where the CPU has it), or per component, e.g. "
        "f32,vae_decoder=bf16 (what sdkiln bench recommends where a component's bf16 met its floor)",
    )
    p.add_argument(
        "--section", help="bundle section to run, e.g. onnx/int8 (default: onnx/fp32, torch/fused)"
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", help="used where the family runs classifier-free guidance")
    p.add_argument("--style", help="a style preset (sdkiln.runtime.styles), e.g. cyberpunk")
    p.add_argument("--image", help="the sketch (sketch) or the photo (edit)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the family's, e.g. 4 for LCM)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the family's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strength", type=float, default=0.6, help="edit: how much to change, in (0, 1]")
    p.add_argument(
        "--control", choices=("none", "canny"), default="none", help="edit: keep structure with canny"
    )
    p.add_argument("--canny-low", type=int, default=100)
    p.add_argument("--canny-high", type=int, default=200)
    p.add_argument("--conditioning-scale", type=float, default=1.0, help="ControlNet strength")
    p.add_argument(
        "--control-start", type=float, default=0.0, help="fraction of steps before ControlNet starts"
    )
    p.add_argument(
        "--control-end",
        type=float,
        help="fraction of steps after which it stops (default 1.0, or the auto configuration's)",
    )
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument(
        "--vae", choices=("full", "tiny"), default="full", help="tiny: TAESD, where the bundle has it"
    )
    p.add_argument("--provider", default="auto", help="ONNX Runtime provider: auto, cpu, cuda, tensorrt")
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="tensorrt/torch_cuda: replay denoising calls as CUDA graphs",
    )
    p.add_argument(
        "--compile",
        default="none",
        help="torch_cuda: torch.compile mode (none, default, max-autotune-no-cudagraphs, reduce-overhead)",
    )
    p.add_argument("--out", help="PNG path (default: ./<task>-<seed>.png)")
    p.set_defaults(func=run_command)
    return p


def add_demo_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``demo`` to the main CLI's subcommands."""
    p = subparsers.add_parser(
        "demo", help="render the example sketches with a bundle; contact sheet + report"
    )
    p.add_argument("bundle")
    p.add_argument("--out", default="artifacts/demo")
    p.set_defaults(func=demo_command)
    return p


def _check_args(args: argparse.Namespace) -> None:
    """Everything checkable without loading the model, so bad input fails in milliseconds."""
    from sdkiln.runtime.load import check_backend
    from sdkiln.runtime.styles import apply_style

    check_backend(args.backend)
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1 (got {args.steps})")
    if args.task == "edit" and not 0.0 < args.strength <= 1.0:
        raise UserError(f"--strength must be in (0, 1] (got {args.strength})")
    if args.style is not None:
        apply_style(args.prompt, args.style)
    if args.task in ("sketch", "edit"):
        if not args.image:
            raise UserError(
                f"{args.task} needs --image (the {'sketch' if args.task == 'sketch' else 'photo'})"
            )
        from sdkiln.runtime.images import open_image

        open_image(args.image, "--image")
    elif args.image:
        raise UserError("text takes no --image (did you mean edit?)")


def _out_path(args: argparse.Namespace) -> Path:
    out = Path(args.out) if args.out else Path(f"{args.task}-{args.seed}.png")
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: must end in .png")
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder")
    return out


def run_command(args: argparse.Namespace) -> int:
    """``sdkiln run``: check arguments, load, generate, save; prints the PNG path and stage times."""
    from sdkiln.runtime.load import load
    from sdkiln.runtime.progress import progress
    from sdkiln.runtime.tasks import edit_request, sketch_request, text_request

    _check_args(args)
    out = _out_path(args)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    pipe = load(
        args.model,
        backend=args.backend,
        section=args.section,
        vae=args.vae,
        provider=args.provider,
        cuda_graphs=args.cuda_graphs,
        compile=args.compile,
        inference_precision=args.inference_precision,
        profile=args.profile,
        task=args.task,
    )
    if pipe.choice is not None:
        print(pipe.choice.describe())
        pick = pipe.choice.details.get("pick") or {}
        if pick.get("profile_of_run") == "fast" and pick.get("deviation"):
            d = pick["deviation"]
            print(
                f"  measured deviation from the exact output (random-weight benchmark): PSNR {d.get('psnr_db')} dB, "
                f"SSIM {d.get('ssim')}, final-latent SQNR {d.get('latents_sqnr_db')} dB"
            )
    pipe.preload(pipe.components_for(args.task, None if args.control == "none" else args.control))
    timings["load"] = time.perf_counter() - t0
    logger.info("%s: %s", args.task, pipe)

    common: dict[str, Any] = {
        "negative_prompt": args.negative_prompt,
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "height": args.height,
        "width": args.width,
        "style": args.style,
    }
    control = {
        "conditioning_scale": args.conditioning_scale,
        "control_start": args.control_start,
        "control_end": args.control_end,
    }
    t0 = time.perf_counter()
    if args.task == "text":
        request = text_request(pipe, args.prompt, **common)
    elif args.task == "sketch":
        request = sketch_request(pipe, args.image, args.prompt, **common, **control)
    else:
        request = edit_request(
            pipe,
            args.image,
            args.prompt,
            strength=args.strength,
            control=None if args.control == "none" else args.control,
            canny_low=args.canny_low,
            canny_high=args.canny_high,
            **common,
            **control,
        )
    timings["preprocess"] = time.perf_counter() - t0
    result = pipe.generate(request, progress=lambda items, desc, total: progress(items, desc, total))
    timings.update(result.timings)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        result.images[0].save(out)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write ({e.strerror or e})") from e
    print(
        f"wrote {out}  ({result.settings['width']}x{result.settings['height']}, {result.steps} step{'s' if result.steps != 1 else ''}, "
        f"guidance {result.guidance:g}{' with CFG' if result.cfg else ''}, seed {result.seed}, {pipe.backend.description})"
    )
    inside = ("controlnet", "unet")  # parts of denoise: shown under it, not added to the total
    for stage, seconds in timings.items():
        if stage not in inside:
            print(f"  {stage:<13} {seconds * 1000:9.1f} ms")
        if stage == "denoise":
            for part in inside:
                if part in timings:
                    print(f"    {part:<11} {timings[part] * 1000:9.1f} ms")
    total = sum(v for k, v in timings.items() if k not in inside)
    print(f"  {'total':<13} {total * 1000:9.1f} ms")
    return 0


def demo_command(args: argparse.Namespace) -> int:
    """``sdkiln demo BUNDLE --out DIR``: the example sketches on each backend, contact sheet + report."""
    from sdkiln.runtime.demo import render_demo

    report = render_demo(Path(args.bundle), Path(args.out))
    print(report)
    return 0
