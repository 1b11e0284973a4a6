"""``sdkiln publish``: parse, call ``commit.publish_bundle``, print what happened."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from sdkiln.stages.tools.publish.commit import PublishResult, publish_bundle


def add_publish_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``sdkiln publish`` to an argparse subparsers object; sets ``func=publish_command``."""
    p = subparsers.add_parser(
        "publish",
        help="publish a built bundle to the Hugging Face Hub (one verified commit, then the tag)",
        description=(
            "Upload BUNDLE (artifacts/<name>) to a Hub model repo as one commit based on the branch head, "
            "verify the commit against manifest.json, then create --tag. An unchanged bundle makes no commit. "
            "The token comes from HF_TOKEN or `hf auth login`."
        ),
    )
    p.add_argument("bundle", type=Path, help="the bundle folder, e.g. artifacts/tiny")
    p.add_argument("--repo-id", required=True, help="owner/name of the model repo (created if missing)")
    p.add_argument(
        "--endpoint",
        default=None,
        help="Hub URL (default: $HF_ENDPOINT, else https://huggingface.co); for a server without Xet storage "
        "set HF_HUB_DISABLE_XET=1",
    )
    p.add_argument("--private", action="store_true", help="create the repo private (ignored if it exists)")
    p.add_argument(
        "--create-pr", action="store_true", help="open a pull request instead of committing to main"
    )
    p.add_argument("--tag", default=None, help="tag the verified commit (never moves an existing tag)")
    p.add_argument(
        "--license", default=None, help="license id for the model card when the build recorded none"
    )
    p.add_argument("--dry-run", action="store_true", help="read the repo and print what would be uploaded")
    p.add_argument(
        "--no-parity",
        action="store_true",
        help="skip re-measuring every graph against the bundle's PyTorch reference before uploading "
        "(what `sdkiln verify --parity` does; on by default)",
    )
    p.set_defaults(func=publish_command)
    return p


def format_result(result: PublishResult) -> str:
    """Human-readable report: one line per file that changes, then what happened."""
    lines = []
    for f in result.files:
        if f.action != "unchanged":
            lines.append(f"  {f.action:<9} {f.path}  ({f.size} bytes)")
    lines += [f"  delete    {p}" for p in result.deletions]
    unchanged = sum(f.action == "unchanged" for f in result.files)
    up_bytes = sum(f.size for f in result.uploads)
    if result.dry_run:
        head = (
            f"[dry run] {result.url}: {len(result.uploads)} file(s) to upload ({up_bytes} bytes), "
            f"{len(result.deletions)} to delete, {unchanged} unchanged"
        )
    else:
        head = (
            f"{result.url}: {len(result.uploads)} file(s) uploaded ({up_bytes} bytes), "
            f"{len(result.deletions)} deleted, {unchanged} unchanged"
        )
    out = [head, *lines]
    if result.dry_run:
        if result.tag:
            out.append(f"would {'create' if result.tag_created else 'keep'} tag {result.tag}")
        if result.commit is None:
            out.append("the repo does not exist yet; it would be created")
    else:
        out.append(
            f"committed {result.commit}"
            if result.committed
            else f"no commit needed: the repo is at {result.commit}"
        )
        if result.pr_url:
            out.append(f"pull request: {result.pr_url}")
        if result.tag:
            out.append(
                f"tag {result.tag} created at {result.commit}"
                if result.tag_created
                else f"tag {result.tag} already exists with this content"
            )
    return "\n".join(out)


def publish_command(args: argparse.Namespace) -> int:
    """``sdkiln publish``: call the library, print the report. Errors propagate as SdkilnError."""
    # httpx2 logs every request URL at INFO; LFS upload URLs carry pre-signed credentials.
    logging.getLogger("httpx2").setLevel(max(logging.WARNING, logging.getLogger("httpx2").level))
    if not args.no_parity:
        from sdkiln.stages.tools.verify import verify_parity

        verdict = verify_parity(args.bundle)
        print(verdict.table())
        verdict.raise_if_failed()  # nothing is uploaded for a bundle whose graphs miss their floors
    result = publish_bundle(
        args.bundle,
        args.repo_id,
        endpoint=args.endpoint,
        token=None,
        private=args.private,
        create_pr=args.create_pr,
        tag=args.tag,
        dry_run=args.dry_run,
        license=args.license,
    )
    print(format_result(result))
    return 0
