"""Plan and build recipes over the content-addressed cache, then assemble the recipe's bundle.

    result = build(Path("recipes/tiny.yaml"), artifacts_root=Path("artifacts"))
    print(result.bundle)          # artifacts/tiny

A step's key hashes (stage, version, params, upstream *output digests*, package versions, pins), so
an unchanged step never reruns and a byte-identical upstream rebuild reruns nothing downstream.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import importlib.metadata
import logging
import os
import platform
import re
import secrets
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sdkiln.stages.cache import Cache, Entry, compute_key
from sdkiln.stages.core import BuildError, InputArtifact, SdkilnError, StageContext, UserError
from sdkiln.stages.manifest import (
    MANIFEST,
    SCHEMA_VERSION,
    digest_of,
    sha256_file,
    write_json_atomic,
)
from sdkiln.stages.recipe import Recipe, Step, load_recipe
from sdkiln.stages.registry import registry

logger = logging.getLogger(__name__)

LOCK_FILE = "build.lock.json"
_SHA = re.compile(r"^[0-9a-f]{40}$")


def package_versions(names: tuple[str, ...] | list[str]) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "sdkiln": package_versions(["sdkiln"])["sdkiln"],
    }


def bundle_path(artifacts_root: Path, recipe_name: str) -> Path:
    return artifacts_root / recipe_name


def read_lock(artifacts_root: Path, recipe_name: str) -> dict[str, Any] | None:
    import json

    path = bundle_path(artifacts_root, recipe_name) / LOCK_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        logger.warning("%s is unreadable; treating the build as new", path)
        return None


@dataclass
class StepResult:
    step: str
    stage: str
    status: str  # HIT, MISS, or (plan only) PENDING
    reason: str
    key: str | None = None
    digest: str | None = None
    duration_s: float = 0.0
    path: Path | None = None


@dataclass
class BuildResult:
    recipe: Recipe
    bundle: Path
    steps: list[StepResult] = field(default_factory=list)

    @property
    def ran(self) -> list[str]:
        return [s.step for s in self.steps if s.status == "MISS"]


class _Planner:
    """Computes each step's key data; shared by ``plan`` (no side effects) and ``build``."""

    def __init__(
        self, recipe: Recipe, cache: Cache, lock: dict[str, Any] | None, frozen: bool, resolve: bool
    ):
        self.recipe = recipe
        self.cache = cache
        self.lock_steps: dict[str, Any] = (lock or {}).get("steps", {})
        self.frozen = frozen
        self.resolve = resolve

    def pins(self, step: Step) -> tuple[dict[str, dict[str, str]], str | None]:
        """{name: {"ref", "sha"}} for the step's moving references, or a reason they are unresolved."""
        if step.stage.refs is None:
            return {}, None
        old = self.lock_steps.get(step.id, {}).get("pins", {})
        out: dict[str, dict[str, str]] = {}
        for name, ref in step.stage.refs(step.params).items():
            if _SHA.match(ref):
                out[name] = {"ref": ref, "sha": ref}
            elif old.get(name, {}).get("ref") == ref and (self.frozen or not self.resolve):
                out[name] = old[name]
            elif self.frozen:
                raise UserError(
                    f"step {step.id}: {name} at {ref!r} is not pinned in {LOCK_FILE}; "
                    "--frozen refuses to resolve it (build once without --frozen)"
                )
            elif not self.resolve:
                return out, f"{name} at {ref!r} not pinned yet (resolved at build)"
            else:
                assert step.stage.resolve is not None, f"stage {step.stage.name} has refs but no resolve"
                out[name] = {"ref": ref, "sha": step.stage.resolve(name, ref)}
        return out, None

    def key_data(self, step: Step, input_digests: dict[str, str], pins: dict[str, dict[str, str]]) -> dict:
        return {
            "stage": step.stage.name,
            "version": step.stage.version,
            "params": step.params.model_dump(mode="json"),
            "inputs": dict(sorted(input_digests.items())),
            "env": package_versions(step.stage.env_packages),
            "pins": {n: p["sha"] for n, p in sorted(pins.items())},
        }

    def why_changed(self, step: Step, key_data: dict[str, Any]) -> str:
        old = self.lock_steps.get(step.id)
        if old is None:
            return "not built before"
        reasons = []
        if old.get("stage") != key_data["stage"]:
            reasons.append(f"stage {old.get('stage')} → {key_data['stage']}")
        if old.get("version") != key_data["version"]:
            reasons.append(f"stage version {old.get('version')} → {key_data['version']}")
        reasons += [f"param {p}" for p in _diff(old.get("params", {}), key_data["params"])]
        for name, digest in key_data["inputs"].items():
            if old.get("inputs", {}).get(name) != digest:
                reasons.append(f"input {name} changed")
        reasons += [f"package {p}" for p in _diff(old.get("env", {}), key_data["env"])]
        old_pins = {n: p.get("sha") for n, p in old.get("pins", {}).items()}
        reasons += [f"pin {p}" for p in _diff(old_pins, key_data["pins"])]
        return ", ".join(reasons) if reasons else "not in cache"


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            p = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{p} added ({new[k]!r})")
            elif k not in new:
                out.append(f"{p} removed")
            else:
                out += _diff(old[k], new[k], p)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = []
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            out += _diff(a, b, f"{prefix}[{i}]")
        return out
    return [] if old == new else [f"{prefix} {old!r} → {new!r}"]


def plan(
    recipe_path: Path,
    artifacts_root: Path,
    overrides: list[str] | None = None,
    stages: dict | None = None,
) -> list[StepResult]:
    """HIT/MISS with the reason for every step, without running or resolving anything."""
    recipe = load_recipe(Path(recipe_path), stages or registry(), overrides)
    cache = Cache(artifacts_root)
    planner = _Planner(recipe, cache, read_lock(artifacts_root, recipe.name), frozen=False, resolve=False)
    digests: dict[str, str | None] = {}
    rows = []
    for step in recipe.steps:
        missing_up = [n for n, ref in step.inputs.items() if digests.get(ref) is None]
        if missing_up:
            ups = ", ".join(f"{n} (step {step.inputs[n]})" for n in missing_up)
            rows.append(StepResult(step.id, step.stage.name, "MISS", f"input {ups} will be built first"))
            digests[step.id] = None
            continue
        pins, unresolved = planner.pins(step)
        if unresolved:
            rows.append(StepResult(step.id, step.stage.name, "MISS", unresolved))
            digests[step.id] = None
            continue
        kd = planner.key_data(step, {n: digests[r] for n, r in step.inputs.items()}, pins)  # type: ignore[misc]
        key = compute_key(kd)
        entry, reason = cache.lookup(key)
        if entry is not None:
            rows.append(StepResult(step.id, step.stage.name, "HIT", "cached", key, entry.digest))
            digests[step.id] = entry.digest
        else:
            why = planner.why_changed(step, kd)
            if reason != "not in cache":
                why = reason if why == "not in cache" else f"{why}; {reason}"
            rows.append(StepResult(step.id, step.stage.name, "MISS", why, key))
            digests[step.id] = None
    return rows


def build(
    recipe_path: Path,
    artifacts_root: Path,
    overrides: list[str] | None = None,
    force: set[str] | None = None,
    frozen: bool = False,
    stages: dict | None = None,
) -> BuildResult:
    """Build every step that is not cached, then assemble ``artifacts/<recipe-name>/``."""
    artifacts_root = Path(artifacts_root)
    recipe = load_recipe(Path(recipe_path), stages or registry(), overrides)
    force = set(force or ())
    unknown = force - {s.id for s in recipe.steps}
    if unknown:
        raise UserError(
            f"--force {', '.join(sorted(unknown))}: no such step (steps: {', '.join(s.id for s in recipe.steps)})"
        )
    cache = Cache(artifacts_root)
    cache.clean_stale()
    planner = _Planner(recipe, cache, read_lock(artifacts_root, recipe.name), frozen=frozen, resolve=True)
    entries: dict[str, Entry] = {}
    lock_steps: dict[str, Any] = {}
    result = BuildResult(recipe, bundle_path(artifacts_root, recipe.name))
    n = len(recipe.steps)
    for i, step in enumerate(recipe.steps, 1):
        t0 = time.perf_counter()
        pins, _ = planner.pins(step)
        input_digests = {name: entries[ref].digest for name, ref in step.inputs.items()}
        kd = planner.key_data(step, input_digests, pins)
        key = compute_key(kd)
        entry, reason = (None, "forced") if step.id in force else cache.lookup(key)
        status = "HIT"
        if entry is None:
            why = reason if step.id in force else planner.why_changed(step, kd)
            with cache.lock(key):
                if step.id not in force:
                    entry, _ = cache.lookup(key)  # a concurrent build may have made it meanwhile
                if entry is None:
                    status = "MISS"
                    logger.info(
                        "[%d/%d] %-14s %-16s MISS  (%s) running...", i, n, step.id, step.stage.name, why
                    )
                    entry = _run_step(recipe, step, cache, key, kd, pins, entries)
                    reason = why
        dt = time.perf_counter() - t0
        logger.info("[%d/%d] %-14s %-16s %-4s  %.1fs", i, n, step.id, step.stage.name, status, dt)
        entries[step.id] = entry
        result.steps.append(
            StepResult(step.id, step.stage.name, status, reason, key, entry.digest, round(dt, 3), entry.path)
        )
        lock_steps[step.id] = {**kd, "key": key, "digest": entry.digest, "pins": pins}
    lock = {"schema": SCHEMA_VERSION, "recipe": recipe.name, "steps": lock_steps}
    _assemble_bundle(recipe, entries, lock, result.bundle, cache)
    return result


def _run_step(
    recipe: Recipe,
    step: Step,
    cache: Cache,
    key: str,
    key_data: dict[str, Any],
    pins: dict[str, dict[str, str]],
    entries: dict[str, Entry],
) -> Entry:
    tmp = cache.new_temp(key)
    work = cache.root / f"{tmp.name}-work"
    work.mkdir()
    inputs = {
        name: InputArtifact(ref, entries[ref].path, entries[ref].manifest)
        for name, ref in step.inputs.items()
    }
    ctx = StageContext(
        step_id=step.id,
        stage=step.stage,
        params=step.params,
        inputs=inputs,
        out_dir=tmp,
        recipe_dir=recipe.dir,
        pins={n: p["sha"] for n, p in pins.items()},
        recipe=recipe.raw,
        work_dir=work,
        log=logging.getLogger(f"sdkiln.stage.{step.stage.name}"),
    )
    t0 = time.perf_counter()
    try:
        step.stage.run(ctx)
    except SdkilnError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        logger.debug("step %s failed:\n%s", step.id, traceback.format_exc())
        raise BuildError(f"step {step.id} ({step.stage.name}) failed: {type(e).__name__}: {e}") from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    duration = round(time.perf_counter() - t0, 3)
    fields = {
        "schema": SCHEMA_VERSION,
        "kind": step.stage.output_kind,
        "stage": step.stage.name,
        "stage_version": step.stage.version,
        "step": step.id,
        "recipe": recipe.name,
        "params": key_data["params"],
        "inputs": {name: {"step": ref, "digest": entries[ref].digest} for name, ref in step.inputs.items()},
        "env": key_data["env"],
        "pins": pins,
        "environment": environment(),
        "metrics": {**ctx.metrics, "duration_s": duration},
        "components": ctx.components,
        "extra": ctx.extra,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    return cache.commit(key, tmp, fields)


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


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # the cache is immutable once committed; links cost no space
    except OSError:
        shutil.copy2(src, dst)


_SECTION_FIELDS = (
    "stage",
    "stage_version",
    "kind",
    "key",
    "digest",
    "params",
    "metrics",
    "components",
    "extra",
    "pins",
    "env",
)


@dataclass(frozen=True)
class BundlePart:
    """One step's committed output and the folder it takes in a bundle."""

    folder: str
    step: str
    path: Path
    manifest: dict[str, Any]


def write_bundle_tree(
    dest: Path,
    *,
    name: str,
    description: str,
    recipe_raw: dict[str, Any],
    parts: list[BundlePart],
    lock: dict[str, Any],
    note: str = "Rebuild: sdkiln build recipe.yaml",
) -> dict[str, Any]:
    """Lay out a bundle in the empty folder ``dest``: each part's payload (hard-linked) under its folder,
    ``recipe.yaml``, ``build.lock.json`` and, last, ``manifest.json``; returns the manifest.

    Payload hashes come from the parts' own manifests, so large files are not hashed again.
    """
    files: dict[str, dict[str, Any]] = {}
    sections: dict[str, Any] = {}
    for part in parts:
        for rel, meta in part.manifest["files"].items():
            _place(part.path / rel, dest / part.folder / rel)
            files[f"{part.folder}/{rel}"] = meta
        sections[part.folder] = {k: part.manifest.get(k) for k in _SECTION_FIELDS} | {"step": part.step}
    (dest / "recipe.yaml").write_text(
        f"# Effective recipe of this bundle. {note}\n" + yaml.safe_dump(recipe_raw, sort_keys=False)
    )
    write_json_atomic(dest / LOCK_FILE, lock)
    for extra in ("recipe.yaml", LOCK_FILE):
        p = dest / extra
        files[extra] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    manifest = {
        "schema": SCHEMA_VERSION,
        "kind": "bundle",
        "name": name,
        "description": description,
        "recipe": recipe_raw,
        "lock": lock,
        "sections": sections,
        "environment": environment(),
        "files": dict(sorted(files.items())),
        "digest": digest_of(files),
    }
    write_json_atomic(dest / MANIFEST, manifest)
    return manifest


def _assemble_bundle(
    recipe: Recipe, entries: dict[str, Entry], lock: dict[str, Any], bundle: Path, cache: Cache
) -> None:
    """Write ``artifacts/<name>/`` next to the old one, then swap it in."""
    root = bundle.parent
    with _bundle_lock(root, recipe.name):
        tmp = root / f".tmp-bundle-{recipe.name}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir(parents=True)
        try:
            parts = [
                BundlePart(step.bundle_dir, step.id, entries[step.id].path, entries[step.id].manifest)
                for step in recipe.steps
                if step.bundle_dir is not None
            ]
            write_bundle_tree(
                tmp,
                name=recipe.name,
                description=recipe.description,
                recipe_raw=recipe.raw,
                parts=parts,
                lock=lock,
            )
            if bundle.exists():
                trash = root / f".trash-bundle-{recipe.name}-{secrets.token_hex(4)}"
                os.replace(bundle, trash)
                os.replace(tmp, bundle)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, bundle)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    for p in root.glob(f".t*-bundle-{recipe.name}-*"):  # leftovers of crashed assemblies
        with contextlib.suppress(OSError):
            if p.is_dir() and not _pid_alive(p.name):
                shutil.rmtree(p, ignore_errors=True)


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
    import json

    refs: dict[str, list[str]] = {}
    for lock_path in sorted(artifacts_root.glob(f"*/{LOCK_FILE}")):
        try:
            lock = json.loads(lock_path.read_text())
        except (OSError, ValueError):
            continue
        for st in lock.get("steps", {}).values():
            refs.setdefault(st.get("key"), []).append(lock.get("recipe", lock_path.parent.name))
    return refs


def gc(artifacts_root: Path, dry_run: bool = False) -> list[Entry]:
    """Remove cache entries no bundle's lock refers to."""
    cache = Cache(artifacts_root)
    cache.clean_stale()
    refs = referenced_keys(artifacts_root)
    doomed = [e for e in cache.entries() if e.key not in refs]
    if not dry_run:
        for e in doomed:
            cache.remove(e.key)
    return doomed
