"""Bundles from the Hugging Face Hub: ``user/repo@rev`` → a local folder of verified, real files.

(One module on purpose: resolving, the snapshot cache and verification are one protocol whose steps
depend on each other's invariants; split, each half would need the other to be read.)

    from sdkiln.runtime.fetch import fetch_bundle
    folder = fetch_bundle("me/sd15-lcm-scribble", "v1", backend="onnx")

The revision (branch, tag or commit) is resolved to a commit sha once; only the files of the sections
the backend needs are downloaded (plus ``manifest.json`` and ``README.md``), into
``<cache>/<owner>--<name>/snapshots/<sha>/`` as real files (onnx refuses external data behind the
symlinks of the usual Hub cache). Every file is checked against the sha256 and size in ``manifest.json``
before the folder is handed out, on every call: huggingface_hub itself only checks sizes. The manifest
and README are checked against the git blob ids the Hub lists for that commit. A commit already cached
loads without any network access; a tag or branch falls back to the commit it last resolved to when the
Hub cannot be reached (or ``HF_HUB_OFFLINE=1``).

The endpoint is ``endpoint=`` if given, else ``$HF_ENDPOINT`` (read at call time), else huggingface.co.
This module imports no build toolchain (no torch) and nothing of the build side.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from sdkiln.runtime.contract.digest import sha256_file
from sdkiln.runtime.contract.errors import CorruptArtifactError, HubUnreachableError, SdkilnError, UserError
from sdkiln.runtime.contract.layout import MANIFEST, README
from sdkiln.runtime.contract.manifest import BundleManifest, FileEntry, read_bundle_manifest

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# "user/repo", "user/repo@rev" or "hf://user/repo@rev"; rev may hold slashes (refs/pr/1).
HUB_REF_RE = re.compile(
    r"^(?:hf://)?(?P<repo>[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*)(?:@(?P<rev>[^\s@]+))?$"
)
_CHUNK = 1 << 20


def parse_hub_ref(model: str) -> tuple[str, str | None] | None:
    """``"user/repo@rev"`` → ``("user/repo", "rev")``; ``"user/repo"`` → ``("user/repo", None)``; else None.

    A string that names an existing local folder is the caller's to treat as a path first.
    """
    m = HUB_REF_RE.match(model.strip())
    if m is None:
        return None
    return m.group("repo"), m.group("rev")


def resolve_endpoint(endpoint: str | None) -> str:
    """``endpoint`` if given, else ``$HF_ENDPOINT`` (read now, not at import), else huggingface.co."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def default_cache_dir() -> Path:
    """``$SDKILN_HUB_CACHE``, else ``$XDG_CACHE_HOME/sdkiln/hub``, else ``~/.cache/sdkiln/hub``."""
    if env := os.environ.get("SDKILN_HUB_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sdkiln" / "hub"


def offline_mode() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it only at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def git_blob_oid(path: Path) -> str:
    """The git blob id of a file (what the Hub lists as ``oid`` for a regular, non-LFS file)."""
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def safe_relpath(rel: str) -> str:
    """Refuse manifest paths that would escape the bundle folder (absolute, ``..``, backslashes)."""
    p = PurePosixPath(rel)
    if not rel or "\\" in rel or p.is_absolute() or any(part in ("..", "", ".") for part in rel.split("/")):
        raise CorruptArtifactError(f"manifest lists an unsafe path {rel!r}")
    return rel


# -- which files a backend needs ----------------------------------------------------------------------
SectionChoice = str | Sequence[str] | Callable[[BundleManifest], Sequence[str]] | None


def section_names(manifest: BundleManifest, backend: SectionChoice) -> list[str]:
    """The bundle sections a backend reads: ``None`` → all; ``"onnx/int8"`` → that section; ``"onnx"``
    (or any kind) → every section whose folder starts with it or whose kind is it; a list → the union
    (``[]``: no section, only the files outside them); a callable → what it returns for the manifest
    (the runtime's own choice of section, made once the manifest is here)."""
    sections = manifest.sections
    if backend is None:
        return sorted(sections)
    if callable(backend):
        return section_names(manifest, list(backend(manifest)))
    if not isinstance(backend, str):
        return sorted({name for b in backend for name in section_names(manifest, b)})
    backend = backend.strip("/")
    if backend == "torch":  # the runtime's name for its PyTorch reference, which runs pipeline sections
        backend = "pipeline" if any(s.kind == "pipeline" for s in sections.values()) else backend
    if backend in sections:
        return [backend]
    chosen = sorted(
        name for name, sec in sections.items() if name.split("/")[0] == backend or sec.kind == backend
    )
    if not chosen:
        have = ", ".join(f"{n} ({s.kind})" for n, s in sorted(sections.items())) or "none"
        raise UserError(f"this bundle has nothing for backend {backend!r}; its sections are: {have}")
    return chosen


def files_for(manifest: BundleManifest, sections: list[str]) -> list[str]:
    """Files of the given sections plus every file outside all sections (recipe, lock, ...)."""
    out = []
    for rel in manifest.files:
        safe_relpath(rel)
        owner = manifest.section_of(rel)
        if owner is None or owner in sections:
            out.append(rel)
    return sorted(out)


# -- the cache --------------------------------------------------------------------------------------
class _RepoCache:
    """``<root>/<owner>--<name>/``: ``snapshots/<sha>/`` (verified files), ``records/<sha>.json``
    (the git ids of manifest/README at that commit), ``refs/<rev>`` (last sha a tag/branch resolved
    to) and ``staging/`` (downloads in progress, one folder per process)."""

    def __init__(self, root: Path, repo_id: str):
        self.dir = root / repo_id.replace("/", "--")

    def snapshot(self, sha: str) -> Path:
        return self.dir / "snapshots" / sha

    def record_path(self, sha: str) -> Path:
        return self.dir / "records" / f"{sha}.json"

    def read_record(self, sha: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.record_path(sha).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def write_record(self, sha: str, record: dict[str, Any]) -> None:
        _write_atomic(self.record_path(sha), json.dumps(record, indent=2, sort_keys=True).encode())

    def ref_path(self, revision: str) -> Path:
        # A revision may hold slashes (refs/pr/1); keep one file per revision.
        return self.dir / "refs" / revision.replace("%", "%25").replace("/", "%2F")

    def read_ref(self, revision: str) -> str | None:
        try:
            sha = self.ref_path(revision).read_text().strip()
        except OSError:
            return None
        return sha if COMMIT_RE.fullmatch(sha) else None

    def write_ref(self, revision: str, sha: str) -> None:
        _write_atomic(self.ref_path(revision), sha.encode())

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        base = self.dir / "staging"
        base.mkdir(parents=True, exist_ok=True)
        for old in base.iterdir():  # left behind by killed processes: their partial files are useless
            pid = old.name.split("-")[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        path = base / f"{os.getpid()}-{secrets.token_hex(4)}"
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- Hub calls ----------------------------------------------------------------------------------------
def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection failures as the installed huggingface_hub raises them (httpx2 in 2.x, httpx before)."""
    import importlib

    from huggingface_hub.errors import OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OfflineModeIsEnabled]
    for name in ("httpx2", "httpx"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        errors += [mod.ConnectError, mod.TimeoutException, mod.NetworkError]
    return tuple(errors)


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None, endpoint: str) -> Iterator[None]:
    """Turn huggingface_hub's errors into sdkiln's: unknown repo/revision and auth problems are
    UserErrors (exit 2) with one clear line; the token never appears in a message."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        yield
    except GatedRepoError:
        raise UserError(
            f"{repo_id} on {endpoint} is gated: accept its terms on the Hub, then log in"
        ) from None
    except RevisionNotFoundError:
        raise UserError(
            f"{where}: no such revision on {endpoint} (give a branch, a tag or a full commit sha)"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{repo_id}: no such repository on {endpoint} (or it is private and no token grants access: "
            "`hf auth login` or HF_TOKEN)"
        ) from None
    except RemoteEntryNotFoundError as e:
        raise CorruptArtifactError(
            f"{where}: a file its manifest lists is missing from the repo ({e.response.url})"
        ) from None
    except _network_errors() as e:
        raise HubUnreachableError(
            f"{where}: cannot reach the Hub at {endpoint} ({type(e).__name__}: {e})"
        ) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise UserError(
                f"{where}: not authorized on {endpoint} (HTTP {status}); log in with `hf auth login` or set HF_TOKEN"
            ) from None
        raise SdkilnError(
            f"{where}: the Hub at {endpoint} answered HTTP {status}: {str(e).splitlines()[0]}"
        ) from None


def _api(endpoint: str, token: str | bool | None) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token, library_name="sdkiln")


def _tree(api: Any, repo_id: str, sha: str) -> dict[str, Any]:
    from huggingface_hub.hf_api import RepoFile

    return {
        f.path: f
        for f in api.list_repo_tree(repo_id, recursive=True, revision=sha)
        if isinstance(f, RepoFile)
    }


def _download(
    repo_id: str, sha: str, files: list[str], staging: Path, endpoint: str, token: str | bool | None
) -> None:
    """Download ``files`` of commit ``sha`` into ``staging`` as real files (no symlinks)."""
    from huggingface_hub import snapshot_download

    snapshot_download(
        repo_id,
        revision=sha,
        local_dir=staging,
        # Exact paths, escaped: a name with [ or * must not match other files.
        allow_patterns=[glob.escape(f) for f in files],
        endpoint=endpoint,
        token=token,
        cache_dir=staging / ".hf-cache",  # keep the user's HF cache untouched
        library_name="sdkiln",
    )


# -- the entry point ----------------------------------------------------------------------------------
def fetch_bundle(
    repo_id: str,
    revision: str | None = None,
    *,
    backend: SectionChoice = None,
    endpoint: str | None = None,
    cache_dir: Path | None = None,
    token: str | bool | None = None,
) -> Path:
    """Resolve ``repo_id@revision`` to a commit, download what ``backend`` needs, verify, return the folder.

    ``backend``: None (every section), a section (``"onnx/int8"``), a backend/kind (``"onnx"``,
    ``"coreml"``, ``"torch"``), a list of those, or a callable that picks them from the manifest (e.g.
    the runtime's preferred section); ``[]`` fetches only the manifest and the files outside the sections. The folder holds the full ``manifest.json`` but only the files
    of the chosen sections (and the files outside any section). Raises UserError (unknown repo, revision or
    backend; exit 2), CorruptArtifactError (a file does not match the manifest; exit 2) or HubUnreachableError.
    """
    endpoint = resolve_endpoint(endpoint)
    revision = revision or "main"
    cache = _RepoCache(Path(cache_dir) if cache_dir is not None else default_cache_dir(), repo_id)
    offline = offline_mode()
    api = None if offline else _api(endpoint, token)

    sha = _resolve(api, cache, repo_id, revision, endpoint)
    snap = cache.snapshot(sha)
    tree: dict[str, Any] | None = None

    def remote_tree() -> dict[str, Any]:
        nonlocal tree
        if api is None:
            raise HubUnreachableError(
                f"{repo_id}@{revision}: files are missing from the cache ({snap}) and HF_HUB_OFFLINE is set"
            )
        if tree is None:
            with hub_errors(repo_id, revision, endpoint):
                try:
                    tree = _tree(api, repo_id, sha)
                except _network_errors() as e:
                    raise HubUnreachableError(
                        f"{repo_id}@{revision}: cannot reach {endpoint} ({type(e).__name__}) and {snap} is incomplete"
                    ) from None
        return tree

    record = cache.read_record(sha) if (snap / MANIFEST).is_file() else None
    if record is None:  # first time at this commit: fetch and check the manifest (and the card)
        _fetch_top_files(repo_id, sha, revision, snap, cache, remote_tree(), endpoint, token)
        record = cache.read_record(sha)
        assert record is not None
    _check_top_files(snap, record)

    manifest = _read_manifest(snap / MANIFEST)
    sections = section_names(manifest, backend)
    needed = files_for(manifest, sections)
    expected = manifest.files

    missing = [rel for rel in needed if not (snap / rel).is_file()]
    fresh: set[str] = set()
    if missing:
        _check_against_tree(missing, expected, remote_tree(), repo_id, sha)
        size = sum(expected[r].size for r in missing)
        logger.info("downloading %d file(s), %.1f MB, of %s@%s", len(missing), size / 1e6, repo_id, sha[:12])
        with cache.staging() as staging:
            with hub_errors(repo_id, revision, endpoint):
                try:
                    _download(repo_id, sha, missing, staging, endpoint, token)
                except _network_errors() as e:
                    raise HubUnreachableError(
                        f"{repo_id}@{revision}: download from {endpoint} failed ({e})"
                    ) from None
            problems = []
            for rel in missing:
                src = staging / rel
                bad = _mismatch(src, expected[rel])
                if bad:
                    problems.append(f"{rel}: {bad}")
                    continue
                (snap / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, snap / rel)  # only verified files ever enter the snapshot
                fresh.add(rel)
            if problems:
                raise CorruptArtifactError(
                    f"{repo_id}@{sha}: downloaded files do not match manifest.json (not kept):\n"
                    + "\n".join(f"  {p}" for p in problems)
                )

    problems = [
        f"{rel}: {bad}"
        for rel in needed
        if rel not in fresh and (bad := _mismatch(snap / rel, expected[rel]))
    ]
    if problems:
        raise CorruptArtifactError(
            f"{repo_id}@{sha}: cached files do not match manifest.json; refusing to load them:\n"
            + "\n".join(f"  {p}" for p in problems)
            + f"\nDelete {snap} (or just those files) to download them again."
        )
    logger.info(
        "%s@%s: %d file(s) verified in %s (sections: %s)",
        repo_id,
        sha[:12],
        len(needed),
        snap,
        ", ".join(sections) or "none",
    )
    return snap


def _resolve(api: Any, cache: _RepoCache, repo_id: str, revision: str, endpoint: str) -> str:
    """The commit sha of ``revision``: as is when it is one; online via the Hub; else the cached ref."""
    if COMMIT_RE.fullmatch(revision.lower()):
        return revision.lower()
    if api is not None:
        with hub_errors(repo_id, revision, endpoint):
            try:
                sha = api.model_info(repo_id, revision=revision).sha
            except _network_errors() as e:
                cached = cache.read_ref(revision)
                if cached is None:
                    raise HubUnreachableError(
                        f"{repo_id}@{revision}: cannot reach {endpoint} ({type(e).__name__}) and this revision "
                        "was never resolved here; give a cached commit sha or try again online"
                    ) from None
                logger.warning(
                    "%s: Hub unreachable; using %s@%s as last resolved (%s)",
                    endpoint,
                    repo_id,
                    revision,
                    cached[:12],
                )
                return cached
        if not sha or not COMMIT_RE.fullmatch(sha):
            raise SdkilnError(f"{repo_id}@{revision}: the Hub at {endpoint} returned no commit sha")
        cache.write_ref(revision, sha)
        return sha
    cached = cache.read_ref(revision)
    if cached is None:
        raise HubUnreachableError(
            f"{repo_id}@{revision}: HF_HUB_OFFLINE is set and this revision was never resolved here"
        )
    return cached


def _fetch_top_files(
    repo_id: str,
    sha: str,
    revision: str,
    snap: Path,
    cache: _RepoCache,
    tree: dict[str, Any],
    endpoint: str,
    token: str | bool | None,
) -> None:
    """Download manifest.json (and README.md), check them against the tree's git ids, record those ids."""
    if MANIFEST not in tree:
        raise UserError(
            f"{repo_id}@{revision}: no {MANIFEST} at commit {sha[:12]}; is this an sdkiln bundle?"
        )
    top = [name for name in (MANIFEST, README) if name in tree]
    oids = {name: tree[name].blob_id for name in top}
    with cache.staging() as staging:
        with hub_errors(repo_id, revision, endpoint):
            try:
                _download(repo_id, sha, top, staging, endpoint, token)
            except _network_errors() as e:
                raise HubUnreachableError(
                    f"{repo_id}@{revision}: download from {endpoint} failed ({e})"
                ) from None
        for name in top:
            got = git_blob_oid(staging / name)
            if got != oids[name]:
                raise CorruptArtifactError(
                    f"{repo_id}@{sha}: downloaded {name} has git id {got}, the Hub lists {oids[name]}"
                )
        _read_manifest(staging / MANIFEST)  # refuse a broken manifest before it enters the cache
        snap.mkdir(parents=True, exist_ok=True)
        # The record goes first: a manifest in the snapshot always has its record.
        cache.write_record(sha, {"repo_id": repo_id, "commit": sha, "endpoint": endpoint, "git_oids": oids})
        for name in top:
            os.replace(staging / name, snap / name)


def _check_top_files(snap: Path, record: dict[str, Any]) -> None:
    for name, oid in sorted((record.get("git_oids") or {}).items()):
        path = snap / name
        if path.is_file() and git_blob_oid(path) != oid:
            raise CorruptArtifactError(
                f"{path}: changed since it was downloaded (git id differs from the Hub's); refusing to load. "
                f"Delete {snap} to download it again."
            )


def _read_manifest(path: Path) -> BundleManifest:
    """A downloaded bundle manifest, typed, with every path checked to stay inside the bundle."""
    manifest = read_bundle_manifest(path.parent)
    for rel in manifest.files:
        safe_relpath(rel)
    return manifest


def _check_against_tree(
    files: list[str], expected: dict[str, FileEntry], tree: dict[str, Any], repo_id: str, sha: str
) -> None:
    """Before downloading: every file is in the commit with the manifest's size (and sha256 for LFS)."""
    problems = []
    for rel in files:
        entry = tree.get(rel)
        want = expected[rel]
        if entry is None:
            problems.append(f"{rel}: listed in manifest.json but not in the repo")
        elif entry.size != want.size:
            problems.append(f"{rel}: {entry.size} bytes in the repo, {want.size} in manifest.json")
        elif entry.lfs is not None and entry.lfs.sha256 != want.sha256:
            problems.append(f"{rel}: the repo's LFS sha256 differs from manifest.json")
    if problems:
        raise CorruptArtifactError(
            f"{repo_id}@{sha}: the repo does not match its manifest.json:\n"
            + "\n".join(f"  {p}" for p in problems)
        )


def _mismatch(path: Path, want: FileEntry) -> str | None:
    """Why ``path`` is not the manifest's file, or None when it is (size first: it is free)."""
    if not path.is_file() or path.is_symlink():
        return "missing" if not path.exists() else "not a regular file"
    size = path.stat().st_size
    if size != want.size:
        return f"size {size}, manifest says {want.size}"
    digest = sha256_file(path)
    if digest != want.sha256:
        return f"sha256 {digest[:16]}…, manifest says {want.sha256[:16]}…"
    return None
