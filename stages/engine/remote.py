"""A shared remote cache: cache entries pushed to and pulled from a folder, a bucket or a Hub repo.

    remote = open_remote("s3://team-bucket/sdkiln")          # or file:///mnt/shared, hf://org/cache
    entry, why = remote.pull(cache, key)                      # None + why when it is a miss
    remote.push(entry)

Layout (the same on every backend)::

    <remote>/cas/<sha[:2]>/<sha256>    file contents by sha256, shared between entries, never rewritten
                                       in place (a corrupt blob is replaced by the next push)
    <remote>/entries/<key>.json        an entry's manifest.json, written after its files: its presence
                                       is what makes the entry exist, so a partial upload is no entry
    <remote>/locks/<recipe>.json       the build.lock.json of the latest pushing build of each recipe
                                       name: what ``sdkiln gc --remote`` keeps

Content-addressed blobs make concurrent pushes of one key safe without any lock: whichever manifest is
written last points at blobs that are all there. A pull verifies every file against its manifest's
sha256 in a temp dir and commits it with the same fsync-manifest-last-rename as a local build, so a
corrupted, partial or foreign remote entry is a miss (with the reason in the log), never a hit.

Credentials come from each backend's usual configuration (AWS env vars/profile/instance role for S3,
Google's for GCS, the Hugging Face token for hf://); a URL carrying a password is refused, and every
message that leaves this module is passed through ``redact``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, ValidationError

from sdkiln.runtime.contract.digest import digest_of, sha256_file
from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.layout import MANIFEST
from sdkiln.runtime.contract.manifest import ArtifactManifest
from sdkiln.stages.engine.bundle import referenced_keys
from sdkiln.stages.engine.cache import Cache, Entry

logger = logging.getLogger(__name__)

CONFIG_FILE = "sdkiln.toml"
CAS = "cas"
ENTRIES = "entries"
LOCKS = "locks"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_LOCK_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")
# Environment variables whose values are secrets on some backend: never printed, whatever the message.
_SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "GOOGLE_OAUTH_ACCESS_TOKEN",
)
_INSTALL_HINT = "install the remote extra: pip install -c constraints.txt 'sdkiln[remote]'"


class RemoteError(UserError):
    """The remote cache is misconfigured or unreachable (exit 2: the fix is in the configuration)."""


# -- redaction ---------------------------------------------------------------------------------------
def redact_url(url: str) -> str:
    """``scheme://user:secret@host/path?sig=..`` → ``scheme://user:***@host/path`` (query dropped)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"{user}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _secret_values(extra: Iterable[str] = ()) -> list[str]:
    values = [os.environ.get(name, "") for name in _SECRET_ENV] + list(extra)
    # Longest first, so a secret that contains another is replaced whole.
    return sorted({v for v in values if len(v) >= 4}, key=len, reverse=True)


_URL_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s'\"<>]+")


def redact(text: str, extra_secrets: Iterable[str] = ()) -> str:
    """Remove credentials from a message: URL passwords and query strings, and any known secret value."""
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), str(text))
    for value in _secret_values(extra_secrets):
        text = text.replace(value, "***")
    return text


# -- settings ----------------------------------------------------------------------------------------
class _RemoteSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    push: bool = True


class _ConfigFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    remote: _RemoteSection | None = None


@dataclass(frozen=True)
class RemoteSettings:
    """Where the remote is and whether this user pushes to it; ``source`` says where that was set."""

    url: str
    push: bool
    source: str


def find_config(start: Path) -> Path | None:
    """The nearest ``sdkiln.toml`` in ``start`` or a parent folder."""
    start = start.resolve()
    for folder in (start, *start.parents):
        candidate = folder / CONFIG_FILE
        if candidate.is_file():
            return candidate
    return None


def read_config(path: Path) -> _ConfigFile:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: TOML syntax error: {e}") from None
    try:
        return _ConfigFile.model_validate(data)
    except ValidationError as e:
        problems = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise UserError(
            f"{path}: {len(problems)} problem(s)\n"
            + "\n".join(f"  {p}" for p in problems)
            + '\n  (expected: [remote] with url = "s3://bucket/prefix" and optionally push = false)'
        ) from None


def resolve_settings(
    url: str | None = None,
    *,
    disabled: bool = False,
    no_push: bool = False,
    cwd: Path | None = None,
    environ: dict[str, str] | None = None,
) -> RemoteSettings | None:
    """The remote in force: ``--remote`` > ``$SDKILN_REMOTE`` > ``[remote]`` in the nearest sdkiln.toml.

    ``--no-remote`` (``disabled``) switches a configured remote off; ``--no-remote-push`` (``no_push``),
    ``SDKILN_REMOTE_PUSH=0`` or ``push = false`` in the file make it read-only.
    """
    if disabled:
        return None
    env = os.environ if environ is None else environ
    push = True
    if url:
        source = "--remote"
    elif env.get("SDKILN_REMOTE"):
        url, source = env["SDKILN_REMOTE"], "SDKILN_REMOTE"
    else:
        config = find_config(cwd or Path.cwd())
        section = read_config(config).remote if config is not None else None
        if section is None:
            return None
        url, push, source = section.url, section.push, str(config)
    flag = env.get("SDKILN_REMOTE_PUSH", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        push = False
    elif flag not in ("", "1", "true", "yes", "on"):
        raise UserError(f"SDKILN_REMOTE_PUSH={flag!r}: use 1 or 0")
    return RemoteSettings(url=url, push=push and not no_push, source=source)


# -- stores ------------------------------------------------------------------------------------------
class Store(Protocol):
    """The few operations the remote cache needs from a backend. Paths are relative to the remote."""

    display: str  # the URL without credentials, for messages

    def secrets(self) -> list[str]: ...
    def check(self, for_push: bool) -> None: ...
    def read(self, path: str) -> bytes | None: ...
    def get(self, path: str, dest: Path) -> None: ...  # FileNotFoundError when absent
    def size(self, path: str) -> int | None: ...  # None when absent or unknown (then always uploaded)
    def publish(self, uploads: list[tuple[Path, str]], last: tuple[bytes, str]) -> None: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, paths: list[str]) -> None: ...


class FsspecStore:
    """A folder (``file://`` or a plain path), an S3 bucket (``s3://``, s3fs), GCS (``gs://``, gcsfs), or
    anything else fsspec opens. Object-store PUTs are atomic; on a folder every file is written under a
    temp name and renamed, so no reader sees half a file."""

    def __init__(self, url: str):
        try:
            import fsspec
        except ImportError:
            raise RemoteError(f"remote {redact_url(url)}: fsspec is missing; {_INSTALL_HINT}") from None
        self.display = redact_url(url)
        try:
            fs, base = fsspec.core.url_to_fs(url)
        except ImportError as e:
            raise RemoteError(f"remote {self.display}: {redact(str(e))}; {_INSTALL_HINT}") from None
        except ValueError as e:
            raise RemoteError(f"remote {self.display}: {redact(str(e))}") from None
        self.fs = fs
        self.base = base.rstrip("/")
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        self.is_local = "file" in protocols or "local" in protocols

    def _p(self, path: str) -> str:
        return f"{self.base}/{path}"

    def secrets(self) -> list[str]:
        return []

    def check(self, for_push: bool) -> None:
        if self.is_local:
            if for_push:
                os.makedirs(self.base, exist_ok=True)
            elif not os.path.isdir(self.base):
                raise RemoteError(f"remote {self.display}: no such folder")
            return
        bucket = self.base.split("/", 1)[0]
        if not self.fs.exists(bucket):
            raise RemoteError(
                f"remote {self.display}: bucket {bucket!r} not found or not readable with the credentials "
                "in this environment (create it, or check AWS_PROFILE / AWS_ENDPOINT_URL / "
                "GOOGLE_APPLICATION_CREDENTIALS)"
            )

    def read(self, path: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._p(path))
        except FileNotFoundError:
            return None

    def get(self, path: str, dest: Path) -> None:
        self.fs.get_file(self._p(path), str(dest))

    def size(self, path: str) -> int | None:
        try:
            return int(self.fs.size(self._p(path)))
        except FileNotFoundError:
            return None

    def _put(self, src: Path | bytes, path: str) -> None:
        target = self._p(path)
        if not self.is_local:
            if isinstance(src, bytes):
                self.fs.pipe_file(target, src)
            else:
                self.fs.put_file(str(src), target)
            return
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            if isinstance(src, bytes):
                with open(tmp, "wb") as f:
                    f.write(src)
                    f.flush()
                    os.fsync(f.fileno())
            else:
                shutil.copyfile(src, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def publish(self, uploads: list[tuple[Path, str]], last: tuple[bytes, str]) -> None:
        for src, path in uploads:  # files first ...
            self._put(src, path)
        self._put(last[0], last[1])  # ... the manifest last: only now does the entry exist

    def list(self, prefix: str) -> list[str]:
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(self._p(prefix))
        except FileNotFoundError:
            return []
        start = len(self.base) + 1
        return sorted(p[start:] for p in found if ".tmp-" not in p.rsplit("/", 1)[-1])

    def delete(self, paths: list[str]) -> None:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._p(path))


class HubStore:
    """A Hugging Face Hub repository: ``hf://[datasets/]owner/name[@revision][/prefix]``.

    An entry is pushed in one commit (files and manifest together), so it appears whole or not at all;
    the Hub stores identical LFS content once. Endpoint and token come from huggingface_hub's usual
    configuration (``HF_ENDPOINT``, ``HF_TOKEN`` or ``hf auth login``).
    """

    def __init__(self, url: str):
        try:
            from huggingface_hub import HfApi
        except ImportError:
            raise RemoteError(
                f"remote {redact_url(url)}: huggingface_hub is missing; {_INSTALL_HINT}"
            ) from None
        self.display = redact_url(url)
        rest = url[len("hf://") :].strip("/")
        parts = rest.split("/")
        self.repo_type = "model"
        if parts and parts[0] in ("datasets", "models", "spaces"):
            self.repo_type = parts.pop(0)[:-1]
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise RemoteError(
                f"remote {self.display}: expected hf://[datasets/]owner/name[@revision][/folder]"
            )
        name, _, revision = parts[1].partition("@")
        self.repo_id = f"{parts[0]}/{name}"
        self.revision = revision or "main"
        self.prefix = "/".join(parts[2:])
        # huggingface_hub reads HF_ENDPOINT once, at import; read it now so a later setting counts.
        self.endpoint = os.environ.get("HF_ENDPOINT") or None
        self.api = HfApi(endpoint=self.endpoint)
        self._scratch = Path(tempfile.mkdtemp(prefix="sdkiln-hub-"))

    def __del__(self) -> None:
        shutil.rmtree(getattr(self, "_scratch", ""), ignore_errors=True)

    def _p(self, path: str) -> str:
        return f"{self.prefix}/{path}" if self.prefix else path

    def secrets(self) -> list[str]:
        from huggingface_hub import get_token

        token = get_token()
        return [token] if token else []

    def check(self, for_push: bool) -> None:
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            self.api.repo_info(self.repo_id, repo_type=self.repo_type)
        except RepositoryNotFoundError:
            if not for_push:
                raise RemoteError(f"remote {self.display}: no such repository (or no access)") from None
            self.api.create_repo(self.repo_id, repo_type=self.repo_type, private=True, exist_ok=True)
            logger.info("remote: created private repository %s", self.repo_id)

    @contextlib.contextmanager
    def _download(self, path: str) -> Iterator[Path]:
        """The file at ``path`` in a scratch folder of its own, removed afterwards."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        scratch = Path(tempfile.mkdtemp(dir=self._scratch))
        try:
            try:
                local = hf_hub_download(
                    self.repo_id,
                    self._p(path),
                    repo_type=self.repo_type,
                    revision=self.revision,
                    local_dir=scratch,
                    endpoint=self.endpoint,
                )
            except EntryNotFoundError:
                raise FileNotFoundError(path) from None
            yield Path(local)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def read(self, path: str) -> bytes | None:
        try:
            with self._download(path) as local:
                return local.read_bytes()
        except FileNotFoundError:
            return None

    def get(self, path: str, dest: Path) -> None:
        with self._download(path) as local:
            shutil.move(local, dest)

    def size(self, path: str) -> int | None:
        return None  # the Hub skips LFS content it already has; small files ride inside the commit

    def _commit(self, operations: list[Any], message: str) -> None:
        self.api.create_commit(
            self.repo_id,
            operations,
            commit_message=message,
            repo_type=self.repo_type,
            revision=self.revision,
        )

    def publish(self, uploads: list[tuple[Path, str]], last: tuple[bytes, str]) -> None:
        from huggingface_hub import CommitOperationAdd

        ops = [CommitOperationAdd(path_in_repo=self._p(p), path_or_fileobj=str(src)) for src, p in uploads]
        ops.append(CommitOperationAdd(path_in_repo=self._p(last[1]), path_or_fileobj=last[0]))
        self._commit(ops, f"sdkiln cache: {last[1]}")

    def list(self, prefix: str) -> list[str]:
        from huggingface_hub import RepoFile
        from huggingface_hub.errors import EntryNotFoundError

        try:
            items = self.api.list_repo_tree(
                self.repo_id,
                path_in_repo=self._p(prefix),
                recursive=True,
                revision=self.revision,
                repo_type=self.repo_type,
            )
            paths = [i.path for i in items if isinstance(i, RepoFile)]
        except EntryNotFoundError:
            return []
        start = len(self.prefix) + 1 if self.prefix else 0
        return sorted(p[start:] for p in paths)

    def delete(self, paths: list[str]) -> None:
        from huggingface_hub import CommitOperationDelete

        if paths:
            ops = [CommitOperationDelete(path_in_repo=self._p(p)) for p in paths]
            self._commit(ops, f"sdkiln gc: remove {len(paths)} files")


def normalize_url(url: str) -> str:
    """A plain path becomes an absolute ``file://`` URL (workers must not resolve it against their cwd)."""
    return url if urlsplit(url).scheme else Path(url).expanduser().resolve().as_uri()


def open_store(url: str) -> Store:
    """The backend for ``url``: hf:// → HubStore; anything else (s3://, gs://, file://, a path) → fsspec."""
    url = normalize_url(url)
    parts = urlsplit(url)
    if parts.password:
        raise RemoteError(
            f"remote {redact_url(url)}: the URL carries a password; give credentials the backend's usual "
            "way instead (AWS_PROFILE or AWS_* variables for s3://, HF_TOKEN or `hf auth login` for hf://)"
        )
    if url.startswith("hf://"):
        return HubStore(url)
    return FsspecStore(url)


# -- the remote cache --------------------------------------------------------------------------------
def blob_path(sha256: str) -> str:
    return f"{CAS}/{sha256[:2]}/{sha256}"


def entry_path(key: str) -> str:
    return f"{ENTRIES}/{key}.json"


def _safe_rel(rel: str) -> bool:
    if not rel or rel.startswith("/") or "\\" in rel or rel == MANIFEST:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def check_manifest(key: str, data: bytes) -> tuple[ArtifactManifest | None, str]:
    """Parse a remote manifest and check it could describe ``key``: the manifest or the reason not."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"remote entry unreadable ({e})"
    if not isinstance(raw, dict) or not isinstance(raw.get("files"), dict):
        return None, "remote entry is not an sdkiln manifest (no 'files' table)"
    if raw.get("key") != key:
        return None, "remote entry belongs to another key"
    for rel, meta in raw["files"].items():
        if not _safe_rel(rel):
            return None, f"remote entry lists an unsafe path {rel!r}"
        if not (
            isinstance(meta, dict)
            and isinstance(meta.get("sha256"), str)
            and _HEX64.match(meta["sha256"])
            and isinstance(meta.get("size"), int)
            and meta["size"] >= 0
        ):
            return None, f"remote entry has a malformed record for {rel!r}"
    try:
        manifest = ArtifactManifest.model_validate(raw)
    except ValidationError as e:
        return None, f"remote entry is not an sdkiln artifact manifest ({e.error_count()} problem(s))"
    if manifest.digest != digest_of(manifest.files):
        return None, "remote entry's digest does not match its file table"
    return manifest, "in remote cache"


@dataclass
class GcReport:
    removed: list[tuple[str, ArtifactManifest | None]] = field(default_factory=list)  # (key, manifest)
    kept: int = 0
    blobs: int = 0
    notes: list[str] = field(default_factory=list)


class RemoteCache:
    """Pull and push cache entries through a ``Store``, verifying everything that comes back."""

    def __init__(self, store: Store, push: bool = True, url: str = ""):
        self.store = store
        self.url = url  # as configured (never carries a password: open_store refuses those)
        self.push_enabled = push
        self.display = store.display
        self._bad_blobs: set[str] = set()  # found corrupt by a pull: the next push replaces them
        self._secrets = store.secrets()

    def redact(self, text: str) -> str:
        return redact(text, self._secrets)

    def _fail(self, what: str, e: BaseException) -> str:
        return f"{what} failed ({type(e).__name__}: {self.redact(str(e))})"

    # -- lookups ---------------------------------------------------------------------------------
    def fetch_manifest(self, key: str) -> tuple[ArtifactManifest | None, str]:
        """The remote manifest of ``key`` if it is well formed, or None and why (no file is fetched)."""
        try:
            data = self.store.read(entry_path(key))
        except Exception as e:
            return None, f"remote {self._fail('lookup', e)}"
        if data is None:
            return None, "not in remote cache"
        return check_manifest(key, data)

    def pull(self, cache: Cache, key: str) -> tuple[Entry | None, str]:
        """Download ``key`` into ``cache`` (call while holding ``cache.lock(key)``), verifying every file.

        Returns the committed entry, or None and why it is a miss: absent, unreadable, partial (a file
        missing) or corrupt (a file whose size or sha256 differs). Nothing half-pulled stays behind.
        """
        manifest, why = self.fetch_manifest(key)
        if manifest is None:
            return None, why
        tmp = cache.new_temp(key)
        try:
            for rel, meta in sorted(manifest.files.items()):
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.store.get(blob_path(meta.sha256), dest)
                except FileNotFoundError:
                    return self._reject(tmp, key, f"remote entry partial: missing {rel}")
                except Exception as e:
                    return self._reject(tmp, key, f"remote {self._fail(f'download of {rel}', e)}")
                if dest.stat().st_size != meta.size or sha256_file(dest) != meta.sha256:
                    self._bad_blobs.add(meta.sha256)
                    return self._reject(tmp, key, f"remote entry corrupt: changed {rel} (sha256 mismatch)")
            entry = cache.install(key, tmp, manifest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return entry, "pulled from remote cache"

    def _reject(self, tmp: Path, key: str, why: str) -> tuple[None, str]:
        shutil.rmtree(tmp, ignore_errors=True)
        logger.warning("remote %s: entry %s not used: %s", self.display, key[:12], why)
        return None, why

    # -- pushing ---------------------------------------------------------------------------------
    def push(self, entry: Entry) -> bool:
        """Upload ``entry``: missing or known-bad blobs first, then its manifest. False (and a warning)
        if pushing is off or fails; the local build is unaffected either way."""
        if not self.push_enabled:
            return False
        try:
            uploads: dict[str, Path] = {}
            for rel, meta in sorted(entry.manifest.files.items()):
                sha = meta.sha256
                blob = blob_path(sha)
                if blob in uploads:
                    continue
                if sha in self._bad_blobs or self.store.size(blob) != meta.size:
                    uploads[blob] = entry.path / rel
            manifest = (entry.path / MANIFEST).read_bytes()
            self.store.publish(
                [(src, blob) for blob, src in uploads.items()], (manifest, entry_path(entry.key))
            )
        except Exception as e:
            logger.warning("remote %s: push of %s %s", self.display, entry.key[:12], self._fail("", e)[1:])
            return False
        self._bad_blobs.difference_update(m.sha256 for m in entry.manifest.files.values())
        size = sum(p.stat().st_size for p in uploads.values())
        logger.info(
            "remote: pushed %s (%s, %d new files, %d bytes)",
            entry.key[:12],
            entry.manifest.step,
            len(uploads),
            size,
        )
        return True

    def ensure_pushed(self, entry: Entry) -> bool:
        """Push a locally cached entry unless the remote already has a well-formed one for its key."""
        if not self.push_enabled:
            return False
        manifest, _ = self.fetch_manifest(entry.key)
        if manifest is not None and manifest.digest == entry.digest:
            return False
        return self.push(entry)

    def push_lock(self, recipe: str, lock: dict[str, Any]) -> None:
        """Record the keys a build of ``recipe`` refers to, for ``gc --remote``."""
        if not self.push_enabled or not _LOCK_NAME.match(recipe):
            return
        data = (json.dumps(lock, indent=2, sort_keys=True) + "\n").encode()
        try:
            self.store.publish([], (data, f"{LOCKS}/{recipe}.json"))
        except Exception as e:
            logger.warning("remote %s: %s", self.display, self._fail(f"upload of the {recipe} lock", e))

    # -- garbage collection ----------------------------------------------------------------------
    def referenced_keys(self) -> dict[str, list[str]]:
        """{key: [recipe names]} for every key a lock uploaded to the remote refers to."""
        refs: dict[str, list[str]] = {}
        for path in self.store.list(LOCKS):
            data = self.store.read(path)
            try:
                lock = json.loads(data or b"")
            except ValueError:
                continue
            for st in (lock.get("steps") or {}).values() if isinstance(lock, dict) else ():
                if isinstance(st, dict) and isinstance(st.get("key"), str):
                    refs.setdefault(st["key"], []).append(str(lock.get("recipe", path)))
        return refs

    def gc(self, keep: set[str], dry_run: bool = False, keep_hours: float = 24.0) -> GcReport:
        """Remove entries whose key is not in ``keep``, then blobs no remaining entry lists.

        Conservative: entries built in the last ``keep_hours`` stay (a build still running has pushed
        them but not yet its lock); a kept entry whose manifest cannot be read keeps every blob; temp
        files and anything outside ``entries/`` and ``cas/`` are never touched.
        """
        now = _dt.datetime.now(_dt.UTC)
        report = GcReport()
        live_blobs: set[str] = set()
        blobs_known = True
        doomed: list[str] = []
        for path in self.store.list(ENTRIES):
            name = path.rsplit("/", 1)[-1]
            key = name[: -len(".json")] if name.endswith(".json") else ""
            if not _HEX64.match(key):
                continue
            data = self.store.read(path)
            manifest, _ = check_manifest(key, data) if data is not None else (None, "")
            if key in keep or (manifest is not None and _age_hours(manifest, now) < keep_hours):
                report.kept += 1
                if manifest is None:
                    blobs_known = False
                    report.notes.append(f"kept entry {key[:12]} is unreadable: no blob is removed")
                else:
                    live_blobs.update(m.sha256 for m in manifest.files.values())
                continue
            report.removed.append((key, manifest))
            doomed.append(path)
        blob_paths: list[str] = []
        if blobs_known:
            for path in self.store.list(CAS):
                sha = path.rsplit("/", 1)[-1]
                if _HEX64.match(sha) and sha not in live_blobs:
                    blob_paths.append(path)
                    report.blobs += 1
        if not dry_run:
            self.store.delete(doomed)  # manifests first: an entry is gone before any of its blobs
            self.store.delete(blob_paths)
        return report


def _age_hours(manifest: ArtifactManifest, now: _dt.datetime) -> float:
    try:
        created = _dt.datetime.fromisoformat(manifest.created)
    except ValueError:
        return float("inf")
    if created.tzinfo is None:
        created = created.replace(tzinfo=_dt.UTC)
    return (now - created).total_seconds() / 3600


def open_remote(settings: RemoteSettings | str, push: bool = True, check: bool = True) -> RemoteCache:
    """A ``RemoteCache`` for settings (or a bare URL), checked to be reachable."""
    if isinstance(settings, str):
        settings = RemoteSettings(url=settings, push=push, source="argument")
    store = open_store(settings.url)
    remote = RemoteCache(store, push=settings.push, url=normalize_url(settings.url))
    if check:
        try:
            store.check(for_push=settings.push)
        except RemoteError:
            raise
        except Exception as e:
            raise RemoteError(
                f"remote {store.display} ({settings.source}): {remote._fail('check', e)}"
            ) from None
    logger.info(
        "remote cache: %s (%s%s)", store.display, settings.source, "" if settings.push else ", read-only"
    )
    return remote


def gc_remote(
    remote: RemoteCache, artifacts_root: Path, dry_run: bool = False, keep_hours: float = 24.0
) -> GcReport:
    """``sdkiln gc --remote``: keep every key that a lock uploaded to the remote or a bundle lock under
    ``artifacts_root`` refers to; remove the other entries, then the blobs no kept entry lists."""
    if not remote.push_enabled and not dry_run:
        raise RemoteError(f"remote {remote.display} is read-only here (push = false): gc needs write access")
    remote_refs = remote.referenced_keys()
    if not remote_refs:
        raise RemoteError(
            f"remote {remote.display}: no build lock has been pushed there yet, so nothing marks what is "
            "in use; refusing to collect (a build with push enabled uploads its lock when it finishes)"
        )
    keep = set(remote_refs) | set(referenced_keys(artifacts_root))
    return remote.gc(keep, dry_run=dry_run, keep_hours=keep_hours)
