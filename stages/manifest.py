"""Manifests: the sha256 file list that makes an artifact or a bundle checkable.

Digests are content addresses: an artifact's digest is the sha256 of the canonical JSON of its sorted
file list ``[[relpath, sha256, size], ...]``, so two byte-identical builds have the same digest wherever
and whenever they ran.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdkiln.stages.core import UserError, VerifyError

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
_CHUNK = 1 << 20


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace: the form every key and digest is computed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class HashMemo:
    """Remembers file hashes by (path, size, mtime_ns, inode) so large unchanged files are hashed once.

    Backed by SQLite, so concurrent builds share it safely. Any change to a file (a flipped byte
    rewrites mtime) misses the memo and the file is hashed again.
    """

    def __init__(self, db_path: Path | None):
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        if db_path is not None:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(db_path, timeout=30, check_same_thread=False)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS memo (path TEXT PRIMARY KEY, size INT, mtime INT, ino INT,"
                " sha256 TEXT)"
            )
            self._db.commit()

    def sha256(self, path: Path) -> str:
        st = path.stat()
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        key = str(path.resolve())
        if self._db is not None:
            with self._lock:
                row = self._db.execute(
                    "SELECT size, mtime, ino, sha256 FROM memo WHERE path = ?", (key,)
                ).fetchone()
            if row is not None and tuple(row[:3]) == stamp:
                return row[3]
        digest = sha256_file(path)
        if self._db is not None:
            with self._lock:
                self._db.execute("INSERT OR REPLACE INTO memo VALUES (?, ?, ?, ?, ?)", (key, *stamp, digest))
                self._db.commit()
        return digest

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


NO_MEMO = HashMemo(None)


def list_files(root: Path) -> list[Path]:
    """Every regular file below ``root`` except the manifest itself, sorted by relative path."""
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    return sorted(
        (p for p in files if p.relative_to(root).as_posix() != MANIFEST), key=lambda p: p.as_posix()
    )


def file_table(root: Path, memo: HashMemo = NO_MEMO) -> dict[str, dict[str, Any]]:
    """{relpath: {"sha256", "size"}} for every file below ``root``."""
    return {
        p.relative_to(root).as_posix(): {"sha256": memo.sha256(p), "size": p.stat().st_size}
        for p in list_files(root)
    }


def digest_of(files: dict[str, dict[str, Any]]) -> str:
    """The content address of a file table."""
    rows = [[rel, f["sha256"], f["size"]] for rel, f in sorted(files.items())]
    return sha256_text(canonical_json(rows))


@dataclass
class VerifyReport:
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.changed)

    def lines(self) -> list[str]:
        return (
            [f"missing: {p}" for p in self.missing]
            + [f"extra:   {p}" for p in self.extra]
            + [f"changed: {p}" for p in self.changed]
        )


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise UserError(f"{root}: no {MANIFEST} here; is this a bundle or a cache entry?")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VerifyError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise VerifyError(f"{path}: not an sdkiln manifest (no 'files' table)")
    return data


def verify_tree(root: Path, manifest: dict[str, Any] | None = None, memo: HashMemo = NO_MEMO) -> VerifyReport:
    """Compare the files below ``root`` with the manifest's table: missing, extra and changed files."""
    manifest = manifest if manifest is not None else read_manifest(root)
    expected: dict[str, dict[str, Any]] = manifest["files"]
    present = {p.relative_to(root).as_posix(): p for p in list_files(root)}
    report = VerifyReport()
    for rel, meta in sorted(expected.items()):
        path = present.get(rel)
        if path is None:
            report.missing.append(rel)
        elif path.stat().st_size != meta["size"] or memo.sha256(path) != meta["sha256"]:
            report.changed.append(rel)
    report.extra = sorted(set(present) - set(expected))
    return report


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temp file, fsync, rename: readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
