"""Step keys and the reasons behind HIT and MISS, without running anything.

A step's key is the sha256 of canonical JSON of (stage, stage version, params, the *output digests* of
its inputs, the versions of the packages the stage declares, pinned Hub revisions): reordering YAML keys
changes nothing, and a byte-identical upstream rebuild reruns nothing downstream.

    rows = plan(Path("recipes/tiny.yaml"), Path("artifacts"), stages=registry(STAGES))
    for r in rows: print(r.step, r.status, r.reason)
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.layout import LOCK_FILE
from sdkiln.stages.engine.cache import Cache, compute_key
from sdkiln.stages.engine.core import Stage
from sdkiln.stages.engine.recipe import Recipe, Step, load_recipe

if TYPE_CHECKING:
    from sdkiln.stages.engine.remote import RemoteCache

logger = logging.getLogger(__name__)

_SHA = re.compile(r"^[0-9a-f]{40}$")


def package_versions(names: tuple[str, ...] | list[str]) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def bundle_path(artifacts_root: Path, recipe_name: str) -> Path:
    return artifacts_root / recipe_name


def read_lock(artifacts_root: Path, recipe_name: str) -> dict[str, Any] | None:
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
    source: str = ""  # for a HIT: "local" or "remote"; "" for a MISS


class Planner:
    """Computes each step's key data; shared by ``plan`` (no side effects) and ``build``."""

    def __init__(self, recipe: Recipe, lock: dict[str, Any] | None, frozen: bool, resolve: bool):
        self.recipe = recipe
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
                if step.stage.resolve is None:
                    raise UserError(f"stage {step.stage.name} declares references but cannot resolve them")
                out[name] = {"ref": ref, "sha": step.stage.resolve(name, ref)}
        return out, None

    @staticmethod
    def key_data(step: Step, input_digests: dict[str, str], pins: dict[str, dict[str, str]]) -> dict:
        data = {
            "stage": step.stage.name,
            "version": step.stage.version,
            "params": step.params.model_dump(mode="json"),
            "inputs": dict(sorted(input_digests.items())),
            "env": package_versions(step.stage.env_packages),
            "pins": {n: p["sha"] for n, p in sorted(pins.items())},
        }
        if step.stage.key_facts is not None:  # only such stages carry the field: other keys are unchanged
            data["machine"] = step.stage.key_facts(step.params)
        return data

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
        reasons += [f"machine {p}" for p in _diff(old.get("machine", {}), key_data.get("machine", {}))]
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
    *,
    stages: dict[str, Stage],
    remote: RemoteCache | None = None,
) -> list[StepResult]:
    """HIT/MISS with the reason for every step, without running or resolving anything.

    With ``remote`` a local miss is looked up there too (its manifest only; no file is fetched).
    """
    recipe = load_recipe(Path(recipe_path), stages, overrides)
    cache = Cache(artifacts_root)
    planner = Planner(recipe, read_lock(artifacts_root, recipe.name), frozen=False, resolve=False)
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
            rows.append(
                StepResult(step.id, step.stage.name, "HIT", "cached", key, entry.digest, source="local")
            )
            digests[step.id] = entry.digest
            continue
        if remote is not None:
            manifest, remote_why = remote.fetch_manifest(key)
            if manifest is not None:
                rows.append(
                    StepResult(
                        step.id, step.stage.name, "HIT", remote_why, key, manifest.digest, source="remote"
                    )
                )
                digests[step.id] = manifest.digest
                continue
            reason = f"{reason}; {remote_why}" if reason != "not in cache" else remote_why
        why = planner.why_changed(step, kd)
        if reason != "not in cache":
            why = reason if why == "not in cache" else f"{why}; {reason}"
        rows.append(StepResult(step.id, step.stage.name, "MISS", why, key))
        digests[step.id] = None
    return rows
