"""``sdkiln studio``: parse, check, serve. Registered by the main CLI beside ``run`` and ``demo``.

    sdkiln studio --model artifacts/tiny                 # http://127.0.0.1:7860, backend auto
    sdkiln studio --model user/repo@rev --backend onnx --section onnx/int8 --port 7861

Imports neither gradio nor a backend library until the command runs.
"""

from __future__ import annotations

import argparse

from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.layout import BACKEND_KINDS

BACKEND_CHOICES = ("auto", *BACKEND_KINDS)


def add_studio_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``studio`` to the main CLI's subcommands."""
    p = subparsers.add_parser(
        "studio",
        help="the sketch studio: draw in the browser, see the render (needs sdkiln[studio])",
        description="Serve a page where you draw and see renders live; the bundle is loaded once and "
        "shared by every request and user.",
    )
    p.add_argument("--model", required=True, help="bundle folder (or Hub repo owner/name[@rev])")
    p.add_argument(
        "--backend",
        default="auto",
        choices=BACKEND_CHOICES,
        help=f"{', '.join(BACKEND_KINDS)}, or auto (default): the first of onnx, torch that runs the bundle here",
    )
    p.add_argument(
        "--section", help="bundle section to run, e.g. onnx/int8 (default: the backend's preferred)"
    )
    p.add_argument("--provider", default="auto", help="ONNX Runtime provider: auto, cpu, cuda, tensorrt")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument(
        "--concurrency", type=int, default=2, help="renders running at once, shared by all pages (default 2)"
    )
    p.add_argument("--queue-size", type=int, default=32, help="requests waiting at most; more are refused")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload accepted (default 20)")
    p.set_defaults(func=studio_command)
    return p


def studio_command(args: argparse.Namespace) -> int:
    """Check the arguments (before loading anything), then serve until Ctrl-C."""
    from sdkiln.runtime.studio.serve import check_gradio, serve

    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535 (got {args.port})")
    if args.concurrency < 1:
        raise UserError(f"--concurrency must be at least 1 (got {args.concurrency})")
    if args.queue_size < 1:
        raise UserError(f"--queue-size must be at least 1 (got {args.queue_size})")
    if not 0 < args.max_upload_mb <= 200:
        raise UserError(f"--max-upload-mb must be in (0, 200] (got {args.max_upload_mb})")
    check_gradio()
    serve(
        args.model,
        args.backend,
        args.section,
        host=args.host,
        port=args.port,
        provider=args.provider,
        concurrency=args.concurrency,
        queue_size=args.queue_size,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
    )
    return 0
