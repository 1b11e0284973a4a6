"""Bundles: a recipe's steps laid out as one folder (``artifacts/<recipe>/``) with one manifest.

Each step's committed output is hard-linked (the cache is immutable once committed) under the folder it
takes in the bundle; ``recipe.yaml``, ``build.lock.json`` and, last, ``manifest.json`` complete it. The
bundle is written next to the old one and swapped in, so a reader sees the old or the new bundle.
The same layout is written by ``publish_hub`` for the steps it publishes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sdkiln.runtime.contract.digest import digest_of, sha256_file, write_json_atomic
from sdkiln.runtime.contract.layout import LOCK_FILE, MANIFEST, RECIPE_FILE
from sdkiln.runtime.contract.manifest import (
    SCHEMA_VERSION,
    ArtifactManifest,
    BundleManifest,
    FileEntry,
    Section,
)
from sdkiln.stages.engine.environment import environment


@dataclass(frozen=True)
class BundlePart:
    """One step's committed output and the folder it takes in a bundle."""

    folder: str
    step: str
    path: Path
    manifest: ArtifactManifest


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # the cache is immutable once committed; links cost no space
    except OSError:
        shutil.copy2(src, dst)


def write_bundle_tree(
    dest: Path,
    *,
    name: str,
    description: str,
    recipe_raw: dict[str, Any],
    parts: list[BundlePart],
    lock: dict[str, Any],
    note: str = "Rebuild: sdkiln build recipe.yaml",
) -> BundleManifest:
    """Lay out a bundle in the empty folder ``dest``: each part's payload (hard-linked) under its folder,
    ``recipe.yaml``, ``build.lock.json`` and, last, ``manifest.json``; returns the manifest.

    Payload hashes come from the parts' own manifests, so large files are not hashed again.
    """
    files: dict[str, FileEntry] = {}
    sections: dict[str, Section] = {}
    for part in parts:
        for rel, meta in part.manifest.files.items():
            _place(part.path / rel, dest / part.folder / rel)
            files[f"{part.folder}/{rel}"] = meta
        sections[part.folder] = Section.from_artifact(part.step, part.manifest)
    (dest / RECIPE_FILE).write_text(
        f"# Effective recipe of this bundle. {note}\n" + yaml.safe_dump(recipe_raw, sort_keys=False)
    )
    write_json_atomic(dest / LOCK_FILE, lock)
    for extra in (RECIPE_FILE, LOCK_FILE):
        p = dest / extra
        files[extra] = FileEntry(sha256=sha256_file(p), size=p.stat().st_size)
    manifest = BundleManifest(
        schema=SCHEMA_VERSION,
        name=name,
        description=description,
        recipe=recipe_raw,
        lock=lock,
        sections=sections,
        environment=environment(),
        files=dict(sorted(files.items())),
        digest=digest_of(files),
    )
    write_json_atomic(dest / MANIFEST, manifest.to_json())
    return manifest


@contextlib.contextmanager
def _bundle_lock(artifacts_root: Path, name: str):
    locks = artifacts_root / "cache" / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / f"bundle-{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def assemble_bundle(
    bundle: Path,
    *,
    name: str,
    description: str,
    recipe_raw: dict[str, Any],
    parts: list[BundlePart],
    lock: dict[str, Any],
) -> BundleManifest:
    """Write ``artifacts/<name>/`` next to the old one, then swap it in."""
    root = bundle.parent
    with _bundle_lock(root, name):
        tmp = root / f".tmp-bundle-{name}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir(parents=True)
        try:
            manifest = write_bundle_tree(
                tmp, name=name, description=description, recipe_raw=recipe_raw, parts=parts, lock=lock
            )
            if bundle.exists():
                trash = root / f".trash-bundle-{name}-{secrets.token_hex(4)}"
                os.replace(bundle, trash)
                os.replace(tmp, bundle)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, bundle)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    for p in root.glob(f".t*-bundle-{name}-*"):  # leftovers of crashed assemblies
        with contextlib.suppress(OSError):
            if p.is_dir() and not _pid_alive(p.name):
                shutil.rmtree(p, ignore_errors=True)
    return manifest


def _pid_alive(name: str) -> bool:
    m = re.search(r"-(\d+)-[0-9a-f]{8}$", name)
    if not m:
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def referenced_keys(artifacts_root: Path) -> dict[str, list[str]]:
    """{key: [recipe names]} for every key a bundle's lock refers to."""
    refs: dict[str, list[str]] = {}
    for lock_path in sorted(artifacts_root.glob(f"*/{LOCK_FILE}")):
        try:
            lock = json.loads(lock_path.read_text())
        except (OSError, ValueError):
            continue
        for st in lock.get("steps", {}).values():
            refs.setdefault(st.get("key"), []).append(lock.get("recipe", lock_path.parent.name))
    return refs
