"""Publish a bundle to the Hugging Face Hub as one verified commit, with a generated model card.

    sdkiln publish artifacts/tiny --repo-id me/sdkiln-tiny --tag v1 [--dry-run]

What happens, in order:
1. the bundle is checked against its ``manifest.json`` (every file's sha256 and size; no stray files);
2. ``README.md`` is rendered from the manifest (huggingface_hub ``ModelCard``/``ModelCardData``);
3. ``create_repo(exist_ok=True)``, then the branch head and its tree are read and diffed with the bundle;
4. if anything differs, ONE ``create_commit`` with exactly the changed files (and deletions of files the
   bundle no longer has), ``parent_commit`` = the head just read: a concurrent publish makes the Hub
   refuse the commit (a clear PublishConflictError) instead of interleaving two bundles;
5. the new commit's tree is read back and every file's size and hash compared with the manifest;
6. only then the tag is created (an existing tag is never moved).

An unchanged bundle makes no commit (the tag is still ensured). ``dry_run`` reads the repo (nothing is
written) and reports what each file would do. The token comes from huggingface_hub's usual sources
(``HF_TOKEN``, ``hf auth login``) unless given, and is never logged. The endpoint is ``endpoint=``, else
``$HF_ENDPOINT``, else huggingface.co. Against a server without Xet storage set ``HF_HUB_DISABLE_XET=1``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdkiln.runtime.contract.errors import BuildError, UserError, VerifyError
from sdkiln.runtime.contract.layout import BUNDLE_METADATA, MANIFEST, README
from sdkiln.runtime.contract.manifest import BundleManifest, read_bundle_manifest, verify_files
from sdkiln.runtime.fetch import git_blob_oid, hub_errors, resolve_endpoint
from sdkiln.stages.tools.publish.card import render_model_card, upstream_licenses, upstream_repos

logger = logging.getLogger(__name__)

# Files of a Hub repo that are the Hub's, not the bundle's: never deleted, never compared.
HUB_FILES = frozenset({".gitattributes"})
REPO_ID_PATTERN = r"^[A-Za-z0-9][\w.\-]{0,95}/[A-Za-z0-9][\w.\-]{0,95}$"
TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$"
BRANCH = "main"


class PublishConflictError(BuildError):
    """The branch moved between reading its head and committing (another publish won). Exit code 1."""


class PublishVerifyError(VerifyError):
    """The commit on the Hub does not hold exactly the bundle's files. Exit code 1; no tag was made."""


@dataclass(frozen=True)
class PlannedFile:
    """One file of the published bundle and what publishing does with it."""

    path: str
    size: int
    sha256: str
    action: str  # "add" (new in the repo), "update" (differs), "unchanged"
    source: Path | None = None  # the local file, or None for generated content (the model card)
    content: bytes | None = None

    def git_oid(self) -> str:
        if self.content is not None:
            return hashlib.sha1(b"blob %d\0" % len(self.content) + self.content).hexdigest()
        assert self.source is not None
        return git_blob_oid(self.source)


@dataclass(frozen=True)
class PublishResult:
    """What a publish did (or, with ``dry_run``, would do)."""

    repo_id: str
    endpoint: str
    branch: str
    commit: str | None  # the commit holding the bundle (the head before, for a dry run; None: no repo yet)
    committed: bool  # a new commit was made
    files: tuple[PlannedFile, ...]
    deletions: tuple[str, ...]
    tag: str | None
    tag_created: bool
    pr_url: str | None
    dry_run: bool

    @property
    def url(self) -> str:
        return f"{self.endpoint}/{self.repo_id}"

    @property
    def uploads(self) -> tuple[PlannedFile, ...]:
        return tuple(f for f in self.files if f.action != "unchanged")

    @property
    def changed(self) -> bool:
        return bool(self.uploads or self.deletions)


# -- the bundle ---------------------------------------------------------------------------------------
def load_bundle(bundle: Path) -> BundleManifest:
    """Read the bundle's manifest and check every file against it; all problems are reported at once."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise UserError(f"{bundle}: no such bundle folder (build one with `sdkiln build RECIPE`)")
    manifest = read_bundle_manifest(bundle)
    report = verify_files(bundle, manifest.files)
    extra = [p for p in report.extra if p not in BUNDLE_METADATA]
    problems = (
        [f"missing: {p}" for p in report.missing]
        + [f"changed: {p}" for p in report.changed]
        + [f"extra:   {p} (not in manifest.json)" for p in extra]
    )
    if problems:
        raise VerifyError(
            f"{bundle}: the bundle does not match its manifest.json; refusing to publish it:\n"
            + "\n".join(f"  {p}" for p in problems)
        )
    return manifest


def plan_files(bundle: Path, manifest: BundleManifest, card: str) -> list[PlannedFile]:
    """Every file of the repo-to-be, sorted: the manifest's table, the manifest, metadata and the card."""
    files: dict[str, PlannedFile] = {}
    for rel, meta in manifest.files.items():
        files[rel] = PlannedFile(rel, meta.size, meta.sha256, "add", source=bundle / rel)
    for rel in (MANIFEST, *BUNDLE_METADATA):
        if rel not in files and (bundle / rel).is_file():
            data = (bundle / rel).read_bytes()
            files[rel] = PlannedFile(
                rel, len(data), hashlib.sha256(data).hexdigest(), "add", source=bundle / rel
            )
    if README not in files:  # a README the engine listed in the manifest wins over the generated card
        data = card.encode()
        files[README] = PlannedFile(README, len(data), hashlib.sha256(data).hexdigest(), "add", content=data)
    return [files[k] for k in sorted(files)]


# -- the Hub ------------------------------------------------------------------------------------------
def _diff(planned: list[PlannedFile], remote: dict[str, Any]) -> tuple[list[PlannedFile], list[str]]:
    """Mark each file add/update/unchanged against the remote tree; list remote files to delete."""
    out = []
    for f in planned:
        r = remote.get(f.path)
        if r is None:
            action = "add"
        elif _same(f, r):
            action = "unchanged"
        else:
            action = "update"
        out.append(PlannedFile(f.path, f.size, f.sha256, action, f.source, f.content))
    names = {f.path for f in planned}
    deletions = sorted(p for p in remote if p not in names and p not in HUB_FILES)
    return out, deletions


def _same(f: PlannedFile, remote: Any) -> bool:
    if remote.size != f.size:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == f.sha256
    return remote.blob_id == f.git_oid()


def _verify_remote(planned: list[PlannedFile], remote: dict[str, Any], repo_id: str, commit: str) -> None:
    problems = []
    for f in planned:
        r = remote.get(f.path)
        if r is None:
            problems.append(f"missing: {f.path}")
        elif not _same(f, r):
            problems.append(f"differs: {f.path} ({r.size} bytes on the Hub, {f.size} in the bundle)")
    names = {f.path for f in planned}
    problems += [f"extra:   {p}" for p in sorted(remote) if p not in names and p not in HUB_FILES]
    if problems:
        raise PublishVerifyError(
            f"{repo_id}@{commit}: the commit does not hold exactly the bundle (no tag was created):\n"
            + "\n".join(f"  {p}" for p in problems)
        )


@contextlib.contextmanager
def _commit_errors(repo_id: str, head: str) -> Iterator[None]:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        yield
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (409, 412):
            raise PublishConflictError(
                f"{repo_id}: the branch '{BRANCH}' moved while publishing (it was at {head[:12]} when this publish "
                "started; someone else committed). Nothing was committed; run the publish again to update it."
            ) from None
        raise
    except RuntimeError as e:
        # huggingface_hub wraps a failed LFS upload ("Error while uploading 'x' to the Hub.") around its cause.
        if e.__cause__ is None:
            raise
        raise BuildError(
            f"{repo_id}: {e} ({type(e.__cause__).__name__}: {e.__cause__}); nothing was committed"
        ) from e


def publish_bundle(
    bundle: Path,
    repo_id: str,
    *,
    endpoint: str | None = None,
    token: str | bool | None = None,
    private: bool = False,
    create_pr: bool = False,
    tag: str | None = None,
    dry_run: bool = False,
    license: str | None = None,
) -> PublishResult:
    """Publish the bundle folder ``bundle`` to the model repo ``repo_id`` (see the module docstring).

    Raises UserError (bad arguments, not authorized, a tag that exists elsewhere: exit 2), VerifyError
    (the bundle or the resulting commit does not match the manifest) or PublishConflictError.
    """
    bundle = Path(bundle)
    if not re.match(REPO_ID_PATTERN, repo_id):
        raise UserError(f"--repo-id {repo_id!r}: expected 'owner/name' (letters, digits, '-', '_', '.')")
    if tag is not None and not re.match(TAG_PATTERN, tag):
        raise UserError(f"--tag {tag!r}: use letters, digits, '.', '_' and '-' (e.g. v1 or 2026.01)")
    if tag is not None and create_pr:
        raise UserError("--tag with --create-pr: a pull request is not merged yet; tag after merging it")
    endpoint = resolve_endpoint(endpoint)
    manifest = load_bundle(bundle)

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    api = HfApi(endpoint=endpoint, token=token, library_name="sdkiln")
    with hub_errors(repo_id, BRANCH, endpoint):
        upstream = upstream_repos(manifest)
        licenses = upstream_licenses(api, upstream) if upstream and not license else {}
    recipe_path = bundle / "recipe.yaml"
    recipe_text = recipe_path.read_text() if recipe_path.is_file() else None
    card = render_model_card(manifest, repo_id, recipe_text, license, licenses)
    planned = plan_files(bundle, manifest, card)
    total = sum(f.size for f in planned)
    logger.info(
        "publishing %s (%d files, %.1f MB) to %s/%s", bundle, len(planned), total / 1e6, endpoint, repo_id
    )
    with hub_errors(repo_id, BRANCH, endpoint):
        if dry_run:
            try:
                head = api.model_info(repo_id, revision=BRANCH).sha
            except RepositoryNotFoundError:
                files, _ = _diff(planned, {})
                return PublishResult(
                    repo_id, endpoint, BRANCH, None, False, tuple(files), (), tag, tag is not None, None, True
                )
        else:
            api.create_repo(repo_id, private=private, exist_ok=True)
            head = api.model_info(repo_id, revision=BRANCH).sha
        remote = _tree(api, repo_id, head)
        files, deletions = _diff(planned, remote)
        tag_at = _existing_tag(api, repo_id, tag) if tag else None
        if tag_at is not None:
            tagged = remote if tag_at == head else _tree(api, repo_id, tag_at)
            tagged_files, tagged_del = _diff(planned, tagged)
            if any(f.action != "unchanged" for f in tagged_files) or tagged_del:
                raise UserError(
                    f"{repo_id}: tag {tag!r} already exists at {tag_at[:12]} with other content; tags are never "
                    "moved. Choose a new tag."
                )
        if dry_run:
            return PublishResult(
                repo_id,
                endpoint,
                BRANCH,
                head,
                False,
                tuple(files),
                tuple(deletions),
                tag,
                tag is not None and tag_at is None,
                None,
                True,
            )

        commit, pr_url = head, None
        changed = [f for f in files if f.action != "unchanged"]
        if changed or deletions:
            ops: list[Any] = []
            for f in changed:
                op = CommitOperationAdd(
                    path_in_repo=f.path, path_or_fileobj=f.content if f.content is not None else str(f.source)
                )
                # The bundle check just hashed every file: spare huggingface_hub a second full read.
                op.upload_info.sha256 = bytes.fromhex(f.sha256)
                ops.append(op)
            ops += [CommitOperationDelete(path_in_repo=p) for p in deletions]
            n_add = sum(f.action == "add" for f in changed)
            message = f"sdkiln: publish {manifest.name or bundle.name}"
            description = (
                f"{n_add} added, {len(changed) - n_add} updated, {len(deletions)} deleted; "
                f"{len(planned)} files, {total} bytes. manifest.json sha256 "
                f"{next(f.sha256 for f in planned if f.path == MANIFEST)}."
            )
            with _commit_errors(repo_id, head):
                info = api.create_commit(
                    repo_id,
                    ops,
                    commit_message=message,
                    commit_description=description,
                    revision=BRANCH,
                    parent_commit=head,
                    create_pr=create_pr,
                )
            commit, pr_url = info.oid, info.pr_url
            logger.info(
                "committed %s to %s (%d changed, %d deleted)",
                commit[:12],
                repo_id,
                len(changed),
                len(deletions),
            )
            remote = _tree(api, repo_id, commit)
        _verify_remote(planned, remote, repo_id, commit)

        tag_created = False
        if tag and tag_at is None:
            api.create_tag(repo_id, tag=tag, revision=commit, tag_message=f"sdkiln bundle {manifest.name}")
            tag_created = True
    return PublishResult(
        repo_id,
        endpoint,
        BRANCH,
        commit,
        commit != head,
        tuple(files),
        tuple(deletions),
        tag,
        tag_created,
        pr_url,
        False,
    )


def _tree(api: Any, repo_id: str, revision: str) -> dict[str, Any]:
    from huggingface_hub.hf_api import RepoFile

    return {
        f.path: f
        for f in api.list_repo_tree(repo_id, recursive=True, revision=revision)
        if isinstance(f, RepoFile)
    }


def _existing_tag(api: Any, repo_id: str, tag: str) -> str | None:
    refs = api.list_repo_refs(repo_id)
    return next((t.target_commit for t in refs.tags if t.name == tag), None)
