"""The `sdkiln` command line: parse arguments, call the library, map errors to exit codes.

Exit codes: 0 ok; 1 a build, verification or parity failure; 2 a user error (bad recipe, bad argument,
missing file) — printed as one clear message, never a traceback.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import sys
from pathlib import Path

from sdkiln.runtime.contract.errors import SdkilnError, UserError

logger = logging.getLogger("sdkiln")


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on bad arguments already; keep its message but without the usage dump noise."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _artifacts(args: argparse.Namespace) -> Path:
    return Path(args.artifacts or os.environ.get("SDKILN_ARTIFACTS") or "artifacts")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _stages() -> dict:
    """The built-in stages plus the plugins named in $SDKILN_STAGE_PLUGINS."""
    from sdkiln.stages import STAGES
    from sdkiln.stages.engine.plugins import registry

    return registry(STAGES)


def cmd_validate(args: argparse.Namespace) -> int:
    from sdkiln.stages.engine.recipe import load_recipe

    stages = _stages()
    failed: list[SdkilnError] = []
    for path in args.recipes:
        try:
            recipe = load_recipe(Path(path), stages, args.overrides if len(args.recipes) == 1 else None)
            print(f"ok  {path}: {recipe.name}, {len(recipe.steps)} steps")
        except UserError as e:
            failed.append(e)
            print(str(e), file=sys.stderr)
    return 2 if failed else 0


# -- remote cache and executors (engine/remote.py, engine/executors.py) ----------------------------
def _remote(args: argparse.Namespace, check: bool = True):  # -> RemoteCache | None
    from sdkiln.stages.engine.remote import open_remote, resolve_settings

    settings = resolve_settings(
        getattr(args, "remote", None),
        disabled=getattr(args, "no_remote", False),
        no_push=getattr(args, "no_remote_push", False),
    )
    return open_remote(settings, check=check) if settings is not None else None


def _add_remote_args(s: argparse.ArgumentParser, push: bool) -> None:
    s.add_argument("--remote", metavar="URL", help="shared cache: s3://, gs://, hf://, file:// or a folder")
    s.add_argument("--no-remote", action="store_true", help="ignore $SDKILN_REMOTE and sdkiln.toml")
    if push:
        s.add_argument("--no-remote-push", action="store_true", help="pull from the remote, never push")


def cmd_plan(args: argparse.Namespace) -> int:
    from sdkiln.stages.engine import plan

    rows = plan(
        Path(args.recipe),
        _artifacts(args),
        args.overrides,
        stages=_stages(),
        remote=_remote(args, check=False),
    )
    width = max(len(r.step) for r in rows)
    for r in rows:
        status = f"HIT ({r.source or 'local'})" if r.status == "HIT" else r.status
        print(f"{r.step:<{width}}  {r.stage:<17} {status:<12}  {r.reason}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from sdkiln.stages.engine import build

    common = dict(force=set(args.force or ()), frozen=args.frozen, stages=_stages(), remote=_remote(args))
    only = set(args.only or ())
    if args.executor == "ray":
        from sdkiln.stages.engine.executors import build_on_ray

        if only:
            raise UserError("--only builds here: drop --executor ray, or build the whole recipe on Ray")

        result = build_on_ray(
            Path(args.recipe), _artifacts(args), args.overrides, address=args.address, **common
        )
    else:
        if args.address:
            raise UserError("--address is the Ray cluster's address: it goes with --executor ray")
        result = build(Path(args.recipe), _artifacts(args), args.overrides, only=only, **common)
    hits = sum(s.status == "HIT" for s in result.steps)
    pulled = sum(s.status == "HIT" and s.source == "remote" for s in result.steps)
    logger.info(
        "%d steps: %d cached, %d built%s",
        len(result.steps),
        hits,
        len(result.steps) - hits,
        f" ({pulled} pulled from the remote)" if pulled else "",
    )
    if result.bundle is None:  # --only: no bundle; where each step's artifact is
        for st in result.steps:
            print(f"{st.step}\t{st.path}")
        return 0
    print(result.bundle)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from sdkiln.runtime.contract.manifest import read_any_manifest, verify_files

    if args.parity:
        return _verify_parity(args)
    path = Path(args.path)
    if not path.is_dir():
        raise UserError(f"{path}: no such bundle or cache entry")
    report = verify_files(path, read_any_manifest(path).files)
    if report.ok:
        print(f"ok  {path}")
        return 0
    print(f"FAILED  {path}", file=sys.stderr)
    for line in report.lines():
        print(f"  {line}", file=sys.stderr)
    return 1


def _verify_parity(args: argparse.Namespace) -> int:
    from sdkiln.runtime.contract.digest import write_json_atomic
    from sdkiln.stages.tools.verify import resolve_bundle, verify_parity

    bundle = resolve_bundle(args.path, endpoint=args.endpoint)
    verdict = verify_parity(
        bundle,
        sections=args.section,
        image_size=args.size,
        steps=args.steps,
        e2e=not args.no_e2e,
        tasks=tuple(args.task or ("sketch", "text", "edit")),
    )
    print(f"parity of {bundle} against its reference {verdict.reference}")
    print(verdict.table())
    if args.json:
        write_json_atomic(Path(args.json), verdict.to_json())
    if verdict.failures:
        print(f"parity FAILED: {', '.join(verdict.failed_components)}", file=sys.stderr)
        for line in verdict.failures:
            print(f"  {line}", file=sys.stderr)
        return 1
    unchecked = sum(r.note != "" for r in verdict.rows)
    print(
        f"parity ok: {len(verdict.rows) - unchecked} checks passed"
        + (f", {unchecked} not checked here" if unchecked else "")
    )
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from sdkiln.stages.engine import referenced_keys
    from sdkiln.stages.engine.cache import Cache, dir_size

    root = _artifacts(args)
    cache = Cache(root)
    refs = referenced_keys(root)
    total = 0
    for e in cache.entries():
        size = dir_size(e.path)
        total += size
        used = ",".join(refs.get(e.key, [])) or "-"
        m = e.manifest
        stage, step, kind, created = (m.stage, m.step, m.kind, m.created) if m else ("?", "?", "?", "?")
        print(
            f"{e.key[:12]}  {stage:<17} {step:<14} {kind:<16} {_human(size):>9}  {created}  used by: {used}"
        )
    print(f"total {_human(total)} in {cache.root}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from sdkiln.stages.engine import gc
    from sdkiln.stages.engine.cache import dir_size

    if args.remote is not None:
        return _gc_remote(args)
    doomed = gc(_artifacts(args), dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for e in doomed:
        size = dir_size(e.path) if e.path.exists() else 0
        stage, step = (e.manifest.stage, e.manifest.step) if e.manifest else ("?", "?")
        print(f"{verb} {e.key[:12]}  {stage} {step} {_human(size)}")
    print(f"{verb} {len(doomed)} unreferenced entr{'y' if len(doomed) == 1 else 'ies'}")
    return 0


def _gc_remote(args: argparse.Namespace) -> int:
    from sdkiln.stages.engine.remote import gc_remote, open_remote, resolve_settings

    settings = resolve_settings(None if args.remote is True else args.remote)
    if settings is None:
        raise UserError(
            "gc --remote: no remote configured; give one (gc --remote s3://bucket/prefix), or set "
            "SDKILN_REMOTE, or [remote] url = ... in sdkiln.toml"
        )
    remote = open_remote(settings, check=False)
    report = gc_remote(remote, _artifacts(args), dry_run=args.dry_run, keep_hours=args.keep_hours)
    verb = "would remove" if args.dry_run else "removed"
    for key, m in report.removed:
        stage, step, created = (m.stage, m.step, m.created) if m else ("?", "?", "?")
        print(f"{verb} {key[:12]}  {stage} {step}  {created}")
    for note in report.notes:
        print(f"note: {note}")
    n = len(report.removed)
    print(
        f"{verb} {n} unreferenced entr{'y' if n == 1 else 'ies'} and {report.blobs} unused file(s) from "
        f"{remote.display}; kept {report.kept}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sdkiln", description="Build fast, small Stable Diffusion artifacts, and run them.")
    p.add_argument("--artifacts", help="artifact root (default: $SDKILN_ARTIFACTS or ./artifacts)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("validate", help="check recipes; exit 2 listing every problem")
    s.add_argument("recipes", nargs="+")
    s.add_argument("overrides", nargs="*", default=[], help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("plan", help="show HIT/MISS for each step, with the reason")
    s.add_argument("recipe")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    _add_remote_args(s, push=False)
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("build", help="build a recipe and assemble its bundle")
    s.add_argument("recipe")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. steps.unet_6bit.params.nbits=4")
    s.add_argument("--force", action="append", metavar="STEP", help="rebuild this step even if cached")
    s.add_argument(
        "--only",
        action="append",
        metavar="STEP",
        help="build only this step and the steps it takes inputs from (repeatable); no bundle is assembled",
    )
    s.add_argument("--frozen", action="store_true", help="use the lock's pins; never re-resolve revisions")
    _add_remote_args(s, push=True)
    s.add_argument(
        "--executor", choices=("local", "ray"), default="local", help="where steps run (default: here)"
    )
    s.add_argument(
        "--address", metavar="ADDR", help="Ray cluster address for --executor ray (or RAY_ADDRESS)"
    )
    s.set_defaults(func=cmd_build)

    s = sub.add_parser(
        "verify",
        help="re-hash a bundle or cache entry against its manifest; --parity re-measures every graph",
    )
    s.add_argument(
        "path", help="a bundle or cache entry folder; with --parity also a Hub repo owner/name[@rev]"
    )
    s.add_argument(
        "--parity",
        action="store_true",
        help="also run every graph against the bundle's PyTorch reference (component gates at batch 1 "
        "and 2, then each task end to end); exit 1 naming what fails",
    )
    s.add_argument("--section", action="append", help="with --parity: only this section (repeatable)")
    s.add_argument(
        "--task", action="append", choices=("sketch", "text", "edit"), help="with --parity: e2e tasks"
    )
    s.add_argument("--size", type=int, help="with --parity: image side in px (default: the model's)")
    s.add_argument(
        "--steps", type=int, help="with --parity: denoising steps end to end (default: the family's)"
    )
    s.add_argument("--no-e2e", action="store_true", help="with --parity: component gates only")
    s.add_argument("--json", metavar="PATH", help="with --parity: write the measurements as JSON")
    s.add_argument("--endpoint", help="Hub URL for a repo id (default: $HF_ENDPOINT, else huggingface.co)")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("ls", help="list cached artifacts with sizes")
    s.set_defaults(func=cmd_ls)

    s = sub.add_parser("gc", help="remove cache entries that no bundle's lock refers to")
    s.add_argument("--dry-run", action="store_true")
    s.add_argument(
        "--remote",
        nargs="?",
        const=True,
        metavar="URL",
        help="collect the remote cache instead (the configured one, or URL): keeps what the locks pushed "
        "there and this machine's bundles refer to",
    )
    s.add_argument(
        "--keep-hours", type=float, default=24.0, help="with --remote: keep entries built this recently (24)"
    )
    s.set_defaults(func=cmd_gc)

    _add_optional(sub)
    return p


def _add_optional(sub: argparse._SubParsersAction) -> None:
    """Commands whose modules live beside the engine (runtime, publish, bench, demo)."""
    import importlib

    for module, adder in (
        ("sdkiln.runtime.cli", "add_run_parser"),
        ("sdkiln.runtime.cli", "add_demo_parser"),
        ("sdkiln.runtime.studio.cli", "add_studio_parser"),
        ("sdkiln.stages.tools.publish.cli", "add_publish_parser"),
        ("sdkiln.stages.tools.bench.cli", "add_bench_parser"),
    ):
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            if e.name and e.name.startswith("sdkiln"):
                continue  # that part is not installed in this checkout
            raise
        fn = getattr(mod, adder, None)
        if fn is not None:
            fn(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Library chatter (converter progress bars, config warnings) drowns the one line per step in
    # logs; keep it on a terminal (progress bars) or with -v, and quiet it elsewhere.
    if not args.verbose:
        for var in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
            os.environ.setdefault(var, "error")
        if not sys.stderr.isatty():
            os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    for noisy in (
        "urllib3",
        "httpx",
        "httpx2",
        "httpcore",
        "httpcore2",
        "filelock",
        "huggingface_hub",
        "coremltools",
        "torch",
        "onnxscript",
        "botocore",
        "aiobotocore",
        "s3fs",
        "fsspec",
        "ray",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    start = _dt.datetime.now()
    try:
        return int(args.func(args) or 0)
    except SdkilnError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        logger.debug("took %s", _dt.datetime.now() - start)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
