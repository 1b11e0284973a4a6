"""Digests, the hash memo and atomic writes: what makes an artifact or a bundle checkable.

Digests are content addresses: an artifact's digest is the sha256 of the canonical JSON of its sorted
file list ``[[relpath, sha256, size], ...]``, so two byte-identical builds have the same digest wherever
and whenever they ran.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
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
    """Remembers file hashes by (path, size, mtime_ns, ctime_ns, inode) so large unchanged files are
    hashed once.

    Backed by SQLite, so concurrent builds share it safely. Any change to a file misses the memo and the
    file is hashed again: a write moves mtime, and an edit whose mtime was put back (``touch -d``,
    ``os.utime``) still moves ctime, which no user call can set.
    """

    def __init__(self, db_path: Path | None):
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        if db_path is not None:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(db_path, timeout=30, check_same_thread=False)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS memo_v2 (path TEXT PRIMARY KEY, size INT, mtime INT, ctime INT,"
                " ino INT, sha256 TEXT)"
            )
            self._db.commit()

    def sha256(self, path: Path) -> str:
        st = path.stat()
        stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        key = str(path.resolve())
        if self._db is not None:
            with self._lock:
                row = self._db.execute(
                    "SELECT size, mtime, ctime, ino, sha256 FROM memo_v2 WHERE path = ?", (key,)
                ).fetchone()
            if row is not None and tuple(row[:4]) == stamp:
                return row[4]
        digest = sha256_file(path)
        if self._db is not None:
            with self._lock:
                self._db.execute(
                    "INSERT OR REPLACE INTO memo_v2 VALUES (?, ?, ?, ?, ?, ?)", (key, *stamp, digest)
                )
                self._db.commit()
        return digest

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


NO_MEMO = HashMemo(None)


def user_memo(name: str = "runtime-hashmemo.sqlite") -> HashMemo:
    """The per-user memo under ``$XDG_CACHE_HOME/sdkiln`` (``~/.cache/sdkiln``); no memo (hash every
    file) when that folder cannot be written."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    try:
        return HashMemo(base / "sdkiln" / name)
    except Exception as e:  # a read-only home or a broken memo must not stop a run
        logger.debug("no hash memo (%s); hashing every file", e)
        return NO_MEMO


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


def digest_of(files: dict[str, Any]) -> str:
    """The content address of a file table (values: dicts or models with ``sha256`` and ``size``)."""
    rows = []
    for rel, f in sorted(files.items()):
        sha, size = (f["sha256"], f["size"]) if isinstance(f, dict) else (f.sha256, f.size)
        rows.append([rel, sha, size])
    return sha256_text(canonical_json(rows))


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temp file, fsync, rename: readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
