"""The content-addressed artifact cache: ``<root>/cache/<key>/`` = payload files + manifest.json.

Invariants:
- an entry is a hit only if its manifest parses and every listed file is present with its sha256
  (hashes memoised by path/size/mtime/inode), and no unlisted file is there;
- entries are built in ``cache/.tmp-<key>-<pid>-<rand>/``, fsynced, the manifest written last, then
  renamed into place: a crash leaves a temp dir (cleaned later), never a torn entry;
- one ``flock`` per key: two builds never write the same entry, the second one waits and reuses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdkiln.runtime.contract.digest import (
    HashMemo,
    canonical_json,
    digest_of,
    file_table,
    sha256_text,
    write_json_atomic,
)
from sdkiln.runtime.contract.layout import MANIFEST
from sdkiln.runtime.contract.manifest import ArtifactManifest, read_artifact_manifest, verify_files

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"


def compute_key(key_data: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of (stage, version, params, input digests, env, pins)."""
    return sha256_text(canonical_json(key_data))


@dataclass
class Entry:
    key: str
    path: Path
    manifest: ArtifactManifest | None  # None: an unreadable entry (listed by ``entries`` only)

    @property
    def digest(self) -> str:
        assert self.manifest is not None, f"cache entry {self.key} has no readable manifest"
        return self.manifest.digest


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Cache:
    """The cache below ``<artifacts>/cache``."""

    def __init__(self, artifacts_root: Path):
        self.root = artifacts_root / "cache"
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / ".locks").mkdir(exist_ok=True)
        self.memo = HashMemo(self.root / ".hashmemo.sqlite")

    def path(self, key: str) -> Path:
        return self.root / key

    # -- lookups ---------------------------------------------------------------------------------
    def lookup(self, key: str) -> tuple[Entry | None, str]:
        """The valid entry for ``key``, or None and the reason it is not usable."""
        path = self.path(key)
        if not path.exists():
            return None, "not in cache"
        try:
            manifest = read_artifact_manifest(path)
        except Exception as e:  # a torn or foreign manifest is a miss, never a hit
            return None, f"cache entry unreadable ({e})"
        if manifest.key != key:
            return None, "cache entry belongs to another key"
        report = verify_files(path, manifest.files, self.memo)
        if not report.ok:
            return None, "cache entry corrupt: " + "; ".join(report.lines()[:5])
        return Entry(key, path, manifest), "cached"

    def entries(self) -> list[Entry]:
        out = []
        for p in sorted(self.root.iterdir()):
            if p.name.startswith(".") or not p.is_dir():
                continue
            try:
                out.append(Entry(p.name, p, read_artifact_manifest(p)))
            except Exception:
                out.append(Entry(p.name, p, None))
        return out

    # -- locking ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, key: str, blocking: bool = True) -> Iterator[bool]:
        """An exclusive per-key lock; yields False (without waiting) if non-blocking and held."""
        fd = os.open(self.root / ".locks" / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # -- writing ---------------------------------------------------------------------------------
    def new_temp(self, key: str) -> Path:
        """A fresh temp dir for building ``key`` (call while holding the key's lock)."""
        tmp = self.root / f"{TMP_PREFIX}{key}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        return tmp

    def commit(self, key: str, tmp: Path, manifest_fields: dict[str, Any]) -> Entry:
        """Hash the payload in ``tmp``, write the manifest last, fsync, rename into place."""
        files = file_table(tmp, self.memo)
        manifest = ArtifactManifest.model_validate(
            {**manifest_fields, "key": key, "files": files, "digest": digest_of(files)}
        )
        return self.install(key, tmp, manifest)

    def install(self, key: str, tmp: Path, manifest: ArtifactManifest) -> Entry:
        """fsync the payload in ``tmp``, write ``manifest`` last, rename into place (build and remote pull)."""
        files = manifest.files
        _fsync_tree(tmp)
        write_json_atomic(tmp / MANIFEST, manifest.to_json())
        final = self.path(key)
        if final.exists():  # a corrupt entry we decided to rebuild: move it aside, then drop it
            trash = self.root / f"{TRASH_PREFIX}{key}-{secrets.token_hex(4)}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        # Memo the committed paths (rename keeps inode and mtime, but the path changed).
        for rel in files:
            self.memo.sha256(final / rel)
        return Entry(key, final, manifest)

    def clean_stale(self) -> list[Path]:
        """Remove temp and trash dirs left by crashed builds (those whose key lock nobody holds)."""
        removed = []
        for p in self.root.iterdir():
            if p.name.startswith(TRASH_PREFIX):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
            elif p.name.startswith(TMP_PREFIX):
                key = p.name[len(TMP_PREFIX) :].split("-", 1)[0]
                with self.lock(key, blocking=False) as got:
                    if got:
                        shutil.rmtree(p, ignore_errors=True)
                        removed.append(p)
        for p in removed:
            logger.info("removed leftover %s", p.name)
        return removed

    def remove(self, key: str) -> None:
        with self.lock(key):
            path = self.path(key)
            if path.exists():
                trash = self.root / f"{TRASH_PREFIX}{key}-{secrets.token_hex(4)}"
                os.replace(path, trash)
                shutil.rmtree(trash, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (self.root / ".locks" / f"{key}.lock").unlink()


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
