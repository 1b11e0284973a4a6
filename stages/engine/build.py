"""Build recipes over the content-addressed cache, then assemble the recipe's bundle.

    result = build(Path("recipes/tiny.yaml"), artifacts_root=Path("artifacts"), stages=registry(STAGES))
    print(result.bundle)          # artifacts/tiny

Each step that is not cached runs in a fresh temp dir (``execute``), is hashed, fsynced and committed
with its manifest last (``Cache.commit``); a step whose declared needs this machine does not meet is
refused before any work starts (``needs.unmet``).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdkiln.runtime.contract.digest import digest_of, file_table
from sdkiln.runtime.contract.errors import BuildError, SdkilnError, UserError
from sdkiln.runtime.contract.manifest import SCHEMA_VERSION, ArtifactManifest
from sdkiln.stages.engine.bundle import BundlePart, assemble_bundle, referenced_keys
from sdkiln.stages.engine.cache import Cache, Entry, compute_key
from sdkiln.stages.engine.core import InputArtifact, Stage, StageContext
from sdkiln.stages.engine.environment import environment
from sdkiln.stages.engine.needs import unmet
from sdkiln.stages.engine.plan import Planner, StepResult, bundle_path, plan, read_lock
from sdkiln.stages.engine.recipe import Recipe, Step, load_recipe

if TYPE_CHECKING:
    from sdkiln.stages.engine.remote import RemoteCache

logger = logging.getLogger(__name__)


@dataclass
class BuildResult:
    recipe: Recipe
    bundle: Path | None  # None: a partial build (``only``), which assembles no bundle
    steps: list[StepResult] = field(default_factory=list)

    @property
    def ran(self) -> list[str]:
        return [s.step for s in self.steps if s.status == "MISS"]


def execute(
    stage: Stage,
    params: Any,
    inputs: dict[str, InputArtifact],
    out_dir: Path,
    work_dir: Path,
    *,
    step_id: str | None = None,
    recipe_dir: Path | None = None,
    recipe_raw: dict[str, Any] | None = None,
    pins: dict[str, str] | None = None,
    bundle_dirs: dict[str, str | None] | None = None,
) -> StageContext:
    """Run one stage into ``out_dir`` (which must exist and be empty) with scratch space ``work_dir``;
    returns its context (metrics, components, model facts, details). Unexpected exceptions become a
    BuildError naming the step; SdkilnErrors pass through."""
    step_id = step_id or stage.name
    ctx = StageContext(
        step_id=step_id,
        stage=stage,
        params=params if isinstance(params, stage.params) else stage.params.model_validate(params),
        inputs=inputs,
        out_dir=out_dir,
        recipe_dir=recipe_dir or out_dir.parent,
        pins=pins or {},
        recipe=recipe_raw or {},
        work_dir=work_dir,
        bundle_dirs=bundle_dirs or {},
        log=logging.getLogger(f"sdkiln.stage.{stage.name}"),
    )
    try:
        stage.run(ctx)
    except SdkilnError:
        raise
    except Exception as e:
        logger.debug("step %s failed:\n%s", step_id, traceback.format_exc())
        raise BuildError(f"step {step_id} ({stage.name}) failed: {type(e).__name__}: {e}") from e
    return ctx


def manifest_fields(
    ctx: StageContext,
    *,
    recipe_name: str,
    key_data: dict[str, Any],
    inputs: dict[str, dict[str, str]],
    pins: dict[str, dict[str, str]],
    duration_s: float,
) -> dict[str, Any]:
    """Everything of an artifact manifest but the file table, key and digest (``Cache.commit`` adds them)."""
    return {
        "schema": SCHEMA_VERSION,
        "kind": ctx.stage.output_kind,
        "stage": ctx.stage.name,
        "stage_version": ctx.stage.version,
        "step": ctx.step_id,
        "recipe": recipe_name,
        "params": key_data["params"],
        "inputs": inputs,
        "env": key_data["env"],
        "pins": pins,
        "environment": environment(),
        "metrics": {**ctx.metrics, "duration_s": duration_s},
        "components": ctx.components,
        "model": ctx.model.model_dump(mode="json") if ctx.model is not None else None,
        "details": ctx.details,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def folder_artifact(
    step_id: str,
    folder: Path,
    kind: str,
    *,
    stage: str = "external",
    params: dict[str, Any] | None = None,
    components: dict[str, Any] | None = None,
    model: Any = None,
    details: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> InputArtifact:
    """A folder made outside a build (a preset saved by a test, a stage run by hand) as the input a stage
    receives, with the manifest the engine would have written for it (file table and digest included;
    no cache key)."""
    files = file_table(Path(folder))
    manifest = ArtifactManifest.model_validate(
        {
            "schema": SCHEMA_VERSION,
            "kind": kind,
            "stage": stage,
            "stage_version": "0",
            "step": step_id,
            "recipe": "",
            "params": params or {},
            "metrics": metrics or {},
            "components": components or {},
            "model": model.model_dump(mode="json") if hasattr(model, "model_dump") else model,
            "details": details or {},
            "key": "",
            "files": files,
            "digest": digest_of(files),
        }
    )
    return InputArtifact(step_id, Path(folder), manifest)


def artifact_of(ctx: StageContext) -> InputArtifact:
    """A finished stage run's output as the next stage's input (``execute`` outside a build)."""
    return folder_artifact(
        ctx.step_id,
        ctx.out_dir,
        ctx.stage.output_kind,
        stage=ctx.stage.name,
        params=ctx.params.model_dump(mode="json"),
        components=json.loads(json.dumps(ctx.components, default=str)),
        model=ctx.model,
        details=ctx.details,
        metrics=ctx.metrics,
    )


def _preflight(
    recipe: Recipe, artifacts_root: Path, stages: dict[str, Stage], overrides, force, steps: list[Step]
) -> None:
    """Refuse, before any work, a build with a step that would run here but needs what is missing."""
    lacking = {s.id: unmet(s.stage.needs) for s in steps if s.stage.needs}
    lacking = {k: v for k, v in lacking.items() if v}
    if not lacking:
        return
    cached = {
        r.step for r in plan(recipe.path, artifacts_root, overrides, stages=stages) if r.status == "HIT"
    }
    blocked = {k: v for k, v in lacking.items() if k not in cached or k in force}
    if blocked:
        lines = [f"  step {k} ({recipe.step(k).stage.name}): {why}" for k, v in blocked.items() for why in v]
        raise UserError(
            f"{recipe.path}: {len(blocked)} step(s) need what this machine lacks; nothing was run:\n"
            + "\n".join(lines)
        )


def load_for_build(
    recipe_path: Path, stages: dict[str, Stage], overrides: list[str] | None, force: set[str] | None
) -> tuple[Recipe, set[str]]:
    """The recipe, and ``force`` checked to name its steps."""
    recipe = load_recipe(Path(recipe_path), stages, overrides)
    force = set(force or ())
    unknown = force - {s.id for s in recipe.steps}
    if unknown:
        raise UserError(
            f"--force {', '.join(sorted(unknown))}: no such step (steps: {', '.join(s.id for s in recipe.steps)})"
        )
    return recipe, force


def needed_steps(recipe: Recipe, only: set[str] | None) -> list[Step]:
    """The recipe's steps in order; with ``only``, just those steps and every step they take inputs
    from (what ``make <target>`` would build). A UserError names a step the recipe lacks."""
    if not only:
        return list(recipe.steps)
    ids = [s.id for s in recipe.steps]
    unknown = sorted(set(only) - set(ids))
    if unknown:
        raise UserError(f"--only {', '.join(unknown)}: no such step (steps: {', '.join(ids)})")
    wanted: set[str] = set()
    todo = list(only)
    while todo:
        sid = todo.pop()
        if sid not in wanted:
            wanted.add(sid)
            todo.extend(recipe.step(sid).inputs.values())
    return [s for s in recipe.steps if s.id in wanted]


def build(
    recipe_path: Path,
    artifacts_root: Path,
    overrides: list[str] | None = None,
    force: set[str] | None = None,
    frozen: bool = False,
    *,
    stages: dict[str, Stage],
    remote: RemoteCache | None = None,
    only: set[str] | None = None,
) -> BuildResult:
    """Build every step that is not cached, then assemble ``artifacts/<recipe-name>/``.

    ``remote`` (a ``RemoteCache``): a local miss is pulled from it when it has the key, and what is
    built (or cached here but absent there) is pushed to it. (``engine.executors.build_on_ray`` runs
    the same steps as Ray tasks on a cluster.) ``only``: build just these steps and what they take
    inputs from, into the cache; the bundle (always whole) and its lock are left as they are.
    """
    artifacts_root = Path(artifacts_root)
    recipe, force = load_for_build(recipe_path, stages, overrides, force)
    steps = needed_steps(recipe, only)
    _preflight(recipe, artifacts_root, stages, overrides, force, steps)
    cache = Cache(artifacts_root)
    cache.clean_stale()
    planner = Planner(recipe, read_lock(artifacts_root, recipe.name), frozen=frozen, resolve=True)
    entries: dict[str, Entry] = {}
    lock_steps: dict[str, Any] = {}
    result = BuildResult(recipe, bundle_path(artifacts_root, recipe.name))
    n = len(steps)
    for i, step in enumerate(steps, 1):
        t0 = time.perf_counter()
        pins, _ = planner.pins(step)
        input_digests = {name: entries[ref].digest for name, ref in step.inputs.items()}
        kd = planner.key_data(step, input_digests, pins)
        key = compute_key(kd)
        entry, reason = (None, "forced") if step.id in force else cache.lookup(key)
        status, source = "HIT", "local"
        if entry is None:
            why = reason if step.id in force else planner.why_changed(step, kd)
            with cache.lock(key):
                if step.id not in force:
                    entry, _ = cache.lookup(key)  # a concurrent build may have made it meanwhile
                if entry is None and remote is not None and step.id not in force:
                    entry, remote_why = remote.pull(cache, key)
                    if entry is not None:
                        source, reason = "remote", remote_why
                    elif remote_why != "not in remote cache":
                        why = f"{why}; {remote_why}"  # a corrupt or partial remote entry, named
                if entry is None:
                    status, source = "MISS", ""
                    logger.info(
                        "[%d/%d] %-14s %-16s MISS  (%s) running...", i, n, step.id, step.stage.name, why
                    )
                    entry = _run_step(recipe, step, cache, key, kd, pins, entries)
                    reason = why
        if remote is not None and source != "remote":  # share what this machine has
            if status == "MISS":
                remote.push(entry)
            else:
                remote.ensure_pushed(entry)
        dt = time.perf_counter() - t0
        shown = f"{status} ({source})" if source == "remote" else status
        logger.info("[%d/%d] %-14s %-16s %-4s  %.1fs", i, n, step.id, step.stage.name, shown, dt)
        entries[step.id] = entry
        result.steps.append(
            StepResult(
                step.id, step.stage.name, status, reason, key, entry.digest, round(dt, 3), entry.path, source
            )
        )
        lock_steps[step.id] = {**kd, "key": key, "digest": entry.digest, "pins": pins}
    if only:  # a partial build: the cache has the steps; a bundle is only ever assembled whole
        result.bundle = None
        return result
    lock = {"schema": SCHEMA_VERSION, "recipe": recipe.name, "steps": lock_steps}
    assemble(recipe, entries, lock, result.bundle)
    if remote is not None:  # what `gc --remote` keeps
        remote.push_lock(recipe.name, lock)
    return result


def assemble(recipe: Recipe, entries: dict[str, Entry], lock: dict[str, Any], bundle: Path) -> None:
    """Write ``bundle`` from the entries of the recipe's steps that have a ``bundle_dir``."""
    parts = [
        BundlePart(step.bundle_dir, step.id, entries[step.id].path, _manifest(entries[step.id]))
        for step in recipe.steps
        if step.bundle_dir is not None
    ]
    assemble_bundle(
        bundle,
        name=recipe.name,
        description=recipe.description,
        recipe_raw=recipe.raw,
        parts=parts,
        lock=lock,
    )


def _manifest(entry: Entry) -> ArtifactManifest:
    assert entry.manifest is not None
    return entry.manifest


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
        name: InputArtifact(ref, entries[ref].path, _manifest(entries[ref]))
        for name, ref in step.inputs.items()
    }
    t0 = time.perf_counter()
    try:
        ctx = execute(
            step.stage,
            step.params,
            inputs,
            tmp,
            work,
            step_id=step.id,
            recipe_dir=recipe.dir,
            recipe_raw=recipe.raw,
            pins={n: p["sha"] for n, p in pins.items()},
            bundle_dirs={s.id: s.bundle_dir for s in recipe.steps},
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    fields = manifest_fields(
        ctx,
        recipe_name=recipe.name,
        key_data=key_data,
        inputs={name: {"step": ref, "digest": entries[ref].digest} for name, ref in step.inputs.items()},
        pins=pins,
        duration_s=round(time.perf_counter() - t0, 3),
    )
    return cache.commit(key, tmp, fields)


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
