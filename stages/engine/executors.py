"""Where a build's steps run: here (the engine's own loop, the default) or as Ray tasks on a cluster.

    sdkiln build recipes/tiny.yaml --executor ray --address ray-head:6379 --remote s3://team/sdkiln

With ``--executor ray`` every step becomes one Ray task; Ray starts a task once the tasks of its inputs
have finished, so independent steps run in parallel on whatever nodes have room. A stage's declared
``needs`` become the task's resource request (``ray_resources``), so a step lands only on a node that
offers them, and a step no node can take is refused before anything runs (``unplaceable``).

Workers share nothing with the driver but the remote cache: a task computes its key with the worker's
own package versions, looks the key up in its node's cache (``$SDKILN_WORKER_CACHE``, default
``~/.cache/sdkiln/worker``) and then in the remote, pulls its inputs from the remote if they are not on
the node, runs the stage into a temp dir, commits and pushes. The driver then pulls the bundle's parts
from the remote and assembles the bundle as a local build does. A worker killed mid-step leaves a temp
dir on its node and no manifest on the remote (so no entry); Ray reruns the task, elsewhere if the
node is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

from sdkiln.runtime.contract.errors import BuildError, SdkilnError, UserError
from sdkiln.runtime.contract.manifest import SCHEMA_VERSION
from sdkiln.stages.engine.build import BuildResult, _run_step, assemble, load_for_build
from sdkiln.stages.engine.cache import Cache, Entry, compute_key
from sdkiln.stages.engine.core import Stage
from sdkiln.stages.engine.plan import Planner, StepResult, bundle_path, read_lock
from sdkiln.stages.engine.recipe import Recipe, validate
from sdkiln.stages.engine.remote import RemoteCache, RemoteSettings, open_remote, redact

logger = logging.getLogger(__name__)

# Ray reruns a task whose worker process or node died this many times (application errors: never).
MAX_RETRIES = 3
# Settings that describe the build travel with the Ray job; the driver's own paths and remote do not.
_NOT_FORWARDED = frozenset({"SDKILN_ARTIFACTS", "SDKILN_REMOTE", "SDKILN_REMOTE_PUSH"})
_RESOURCE_NAME = re.compile(r"^[a-z][a-z0-9_\-]*$")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


# -- resources ---------------------------------------------------------------------------------------
def ray_resources(stage: Stage) -> dict[str, Any]:
    """Ray task options for a stage's ``needs``.

    ``gpu`` → ``num_gpus=1``; ``memory:<size>`` (e.g. ``memory:24GiB``) → ``memory`` in bytes; any
    other need (``macos``, ``tensorrt``, ``network``, ...) → one unit of the custom resource of that
    name, which a node offers with ``ray start --resources '{"macos": 4}'``.
    """
    options: dict[str, Any] = {"num_cpus": 1}
    custom: dict[str, float] = {}
    for need in sorted(stage.needs):
        if need == "gpu":
            options["num_gpus"] = 1
        elif need.startswith("memory:"):
            m = _SIZE.match(need[len("memory:") :].strip())
            if not m:
                raise UserError(
                    f"stage {stage.name}: need {need!r}: write the size as memory:<number><unit>, e.g. memory:24GiB"
                )
            options["memory"] = int(float(m.group(1)) * _UNITS[m.group(2)])
        elif _RESOURCE_NAME.match(need):
            custom[need] = 1
        else:
            raise UserError(
                f"stage {stage.name}: need {need!r} is not a valid resource name ([a-z][a-z0-9_-]*)"
            )
    if custom:
        options["resources"] = custom
    return options


def demand(options: dict[str, Any]) -> dict[str, float]:
    """The resources a task with these options takes from a node, in ``ray.nodes()`` names."""
    out: dict[str, float] = {"CPU": options.get("num_cpus", 1)}
    if options.get("num_gpus"):
        out["GPU"] = options["num_gpus"]
    if options.get("memory"):
        out["memory"] = options["memory"]
    out.update(options.get("resources", {}))
    return out


def unplaceable(recipe: Recipe, options: dict[str, dict[str, Any]], nodes: list[dict[str, Any]]) -> list[str]:
    """One line per step that no alive node of the cluster can take, naming what is missing."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    problems = []
    for step in recipe.steps:
        want = demand(options[step.id])
        if any(all(res.get(k, 0) >= v for k, v in want.items()) for res in alive):
            continue
        short = []
        for name, amount in sorted(want.items()):
            best = max((res.get(name, 0) for res in alive), default=0)
            if best < amount:
                shown = _human_bytes(amount) if name == "memory" else f"{amount:g}"
                have = (_human_bytes(best) if name == "memory" else f"{best:g}") if best else "none"
                short.append(f"{name}={shown} (largest on a node: {have})")
        if not short:
            short.append(f"all of {', '.join(f'{k}={v:g}' for k, v in sorted(want.items()))} on one node")
        problems.append(f"step {step.id} ({step.stage.name}) needs {'; '.join(short)}")
    return problems


def _human_bytes(n: float) -> str:
    return f"{n / 2**30:.1f}GiB"


# -- the driver --------------------------------------------------------------------------------------
def forwarded_env() -> dict[str, str]:
    """The ``SDKILN_*`` settings (stage plugins, worker cache, ...) that the job's workers get."""
    return {k: v for k, v in os.environ.items() if k.startswith("SDKILN_") and k not in _NOT_FORWARDED}


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError(
            "--executor ray: ray is not installed; pip install -c constraints.txt 'sdkiln[remote]'"
        ) from None
    return ray


def _connect(ray: Any, address: str | None) -> bool:
    """Join the cluster (or start a local one); True if this call did, so it also disconnects."""
    if ray.is_initialized():  # an in-process caller (a test, a notebook) already chose the cluster
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    env = forwarded_env()
    if env:
        kwargs["runtime_env"] = {"env_vars": env}
    if address is None:
        # "local", not None: Ray would otherwise join whatever cluster it last saw on this machine.
        kwargs |= {"address": "local", "include_dashboard": False}
        logger.info("no --address (or RAY_ADDRESS): starting a private Ray instance on this machine")
    else:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise UserError(
            f"--address {address}: cannot join a Ray cluster ({redact(str(e))}); start one with "
            "`ray start --head` and pass its address (or set RAY_ADDRESS)"
        ) from None
    return True


def build_on_ray(
    recipe_path: Path,
    artifacts_root: Path,
    overrides: list[str] | None = None,
    force: set[str] | None = None,
    frozen: bool = False,
    *,
    stages: dict[str, Stage],
    remote: RemoteCache | None,
    address: str | None = None,
) -> BuildResult:
    """``engine.build`` on a Ray cluster: run the steps there, assemble the bundle here.

    The cluster's nodes, not this machine, must meet the steps' needs (``unplaceable`` checks that).
    """
    artifacts_root = Path(artifacts_root)
    recipe, force = load_for_build(recipe_path, stages, overrides, force)
    if remote is None:
        raise UserError(
            "--executor ray needs a remote cache: the workers exchange artifacts only through it "
            "(give --remote URL, set SDKILN_REMOTE, or put [remote] url = ... in sdkiln.toml)"
        )
    if not remote.push_enabled:
        raise UserError(
            "--executor ray pushes every step to the remote cache: drop --no-remote-push (or push = false)"
        )
    options = {step.id: ray_resources(step.stage) for step in recipe.steps}
    ray = _import_ray()
    cache = Cache(artifacts_root)
    cache.clean_stale()
    planner = Planner(recipe, read_lock(artifacts_root, recipe.name), frozen=frozen, resolve=True)
    pins = {step.id: planner.pins(step)[0] for step in recipe.steps}
    # Ray's driver prints cluster events ("a worker died ...") to stdout from a background thread;
    # send them to stderr so that stdout carries only the command's result (the bundle path).
    with contextlib.redirect_stdout(sys.stderr):
        results = _run_on_cluster(ray, recipe, stages, address, options, pins, force, remote)
    failed = [results[s.id] for s in recipe.steps if not results[s.id]["ok"]]
    if failed:
        first = next((f for f in failed if not f.get("skipped")), failed[0])
        raise (UserError if first["exit_code"] == 2 else BuildError)(first["error"])
    return _finish(recipe, artifacts_root, cache, remote, planner, pins, results)


def _run_on_cluster(
    ray: Any,
    recipe: Recipe,
    stages: dict[str, Stage],
    address: str | None,
    options: dict[str, dict[str, Any]],
    pins: dict[str, dict[str, dict[str, str]]],
    force: set[str],
    remote: RemoteCache,
) -> dict[str, dict[str, Any]]:
    """Submit one task per step (inputs as upstream task results) and wait for all of them."""
    started = _connect(ray, address)
    try:
        problems = unplaceable(recipe, options, ray.nodes())
        if problems:
            raise UserError(
                f"{len(problems)} step(s) cannot run on this Ray cluster:\n"
                + "\n".join(f"  {p}" for p in problems)
                + "\n  add a node that has them (e.g. `ray start --address ADDR --resources '{\"macos\": 1}'`"
                " or a GPU node), or build those steps on a machine that can"
            )
        task = ray.remote(run_step_task)
        # The stage registry travels once through the object store; a stage's code is pickled by
        # reference, so every node must have sdkiln (and any plugin module) installed.
        stages_ref = ray.put(stages)
        refs: dict[str, Any] = {}
        for step in recipe.steps:
            payload = {
                "recipe": recipe.raw,
                "recipe_path": str(recipe.path),
                "step": step.id,
                "inputs": list(step.inputs.items()),
                "pins": pins[step.id],
                "forced": step.id in force,
                "remote": remote.url,
            }
            refs[step.id] = task.options(
                name=f"sdkiln:{recipe.name}:{step.id}",
                max_retries=MAX_RETRIES,
                retry_exceptions=False,
                **options[step.id],
            ).remote(payload, stages_ref, *[refs[ref] for ref in step.inputs.values()])
        return _collect(ray, recipe, refs)
    finally:
        if started:
            ray.shutdown()


def _collect(ray: Any, recipe: Recipe, refs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Wait for every task, logging each step as it finishes; a lost task becomes a failure record."""
    by_ref = {ref: sid for sid, ref in refs.items()}
    results: dict[str, dict[str, Any]] = {}
    n = len(refs)
    while by_ref:
        ready, _ = ray.wait(list(by_ref), num_returns=1)
        for ref in ready:
            sid = by_ref.pop(ref)
            step = recipe.step(sid)
            try:
                res = ray.get(ref)
            except ray.exceptions.RayError as e:
                res = {
                    "ok": False,
                    "step": sid,
                    "exit_code": 1,
                    "error": f"step {sid} ({step.stage.name}) was lost on the Ray cluster after "
                    f"{MAX_RETRIES} retries: {type(e).__name__}: {redact(str(e)).splitlines()[0][:300]}",
                }
            results[sid] = res
            if res["ok"]:
                shown = f"HIT ({res['source']})" if res["status"] == "HIT" else "MISS"
                if res["status"] == "MISS" and res["reason"].startswith("remote"):
                    shown += f" ({res['reason']})"  # a corrupt or partial remote entry, named here
                logger.info(
                    "[%d/%d] %-14s %-16s %-4s  %.1fs  on %s",
                    len(results),
                    n,
                    sid,
                    step.stage.name,
                    shown,
                    res["duration_s"],
                    res["node"],
                )
            else:
                logger.info(
                    "[%d/%d] %-14s %-16s FAILED  %s", len(results), n, sid, step.stage.name, res["error"]
                )
    return results


def _finish(
    recipe: Recipe,
    artifacts_root: Path,
    cache: Cache,
    remote: RemoteCache,
    planner: Planner,
    pins: dict[str, dict[str, dict[str, str]]],
    results: dict[str, dict[str, Any]],
) -> BuildResult:
    """Pull the bundle's parts from the remote, write the lock and assemble the bundle here."""
    result = BuildResult(recipe, bundle_path(artifacts_root, recipe.name))
    entries: dict[str, Entry] = {}
    lock_steps: dict[str, Any] = {}
    for step in recipe.steps:
        res = results[step.id]
        key = res["key"]
        if step.bundle_dir is not None:
            entry, why = cache.lookup(key)
            if entry is None:
                with cache.lock(key):
                    entry, why = cache.lookup(key)
                    if entry is None:
                        entry, why = remote.pull(cache, key)
            if entry is None:
                raise BuildError(
                    f"step {step.id}: done on the cluster, but its entry {key[:12]} cannot be pulled from "
                    f"{remote.display}: {why}"
                )
            entries[step.id] = entry
        reason = res["reason"]
        if res["status"] == "MISS":
            why = planner.why_changed(step, res["key_data"])
            reason = f"{why}; {reason}" if reason.startswith("remote") else why
        result.steps.append(
            StepResult(
                step.id,
                step.stage.name,
                res["status"],
                reason,
                key,
                res["digest"],
                res["duration_s"],
                entries[step.id].path if step.id in entries else None,
                res["source"],
            )
        )
        lock_steps[step.id] = {**res["key_data"], "key": key, "digest": res["digest"], "pins": pins[step.id]}
    lock = {"schema": SCHEMA_VERSION, "recipe": recipe.name, "steps": lock_steps}
    assemble(recipe, entries, lock, result.bundle)
    remote.push_lock(recipe.name, lock)
    return result


# -- the worker --------------------------------------------------------------------------------------
def worker_cache_root() -> Path:
    """This node's own cache (``$SDKILN_WORKER_CACHE``, default ``~/.cache/sdkiln/worker``)."""
    env = os.environ.get("SDKILN_WORKER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "sdkiln" / "worker"


def run_step_task(
    payload: dict[str, Any], stages: dict[str, Stage], *upstream: dict[str, Any]
) -> dict[str, Any]:
    """The body of one Ray task: obtain one step's entry (node cache, remote, or run it) and push it.

    Returns a small record for the driver; errors come back as records too (``ok: False``), so Ray
    retries only lost workers, never a stage that failed.
    """
    t0 = time.perf_counter()
    sid = payload["step"]
    bad = [up for up in upstream if not up["ok"]]
    if bad:
        return {
            "ok": False,
            "skipped": True,
            "step": sid,
            "exit_code": bad[0]["exit_code"],
            "error": bad[0]["error"],
        }
    try:
        return _obtain(payload, stages, upstream, t0)
    except SdkilnError as e:
        return {"ok": False, "step": sid, "exit_code": e.exit_code, "error": redact(str(e))}
    except Exception as e:
        logger.exception("step %s failed on %s", sid, platform.node())
        return {
            "ok": False,
            "step": sid,
            "exit_code": 1,
            "error": f"step {sid}: {type(e).__name__}: {redact(str(e))}",
        }


def _obtain(
    payload: dict[str, Any], stages: dict[str, Stage], upstream: tuple[dict[str, Any], ...], t0: float
) -> dict[str, Any]:
    recipe = validate(payload["recipe"], Path(payload["recipe_path"]), stages)
    step = recipe.step(payload["step"])
    cache = Cache(worker_cache_root())
    cache.clean_stale()
    remote = open_remote(RemoteSettings(payload["remote"], push=True, source="driver"), check=False)
    ups = {name: up for (name, _ref), up in zip(payload["inputs"], upstream, strict=True)}
    pins = payload["pins"]
    kd = Planner.key_data(step, {name: up["digest"] for name, up in ups.items()}, pins)
    key = compute_key(kd)
    forced = payload["forced"]
    entry, reason = (None, "forced") if forced else cache.lookup(key)
    status, source = "HIT", "worker"
    if entry is None:
        with cache.lock(key):
            if not forced:
                entry, _ = cache.lookup(key)
            if entry is None and not forced:
                entry, reason = remote.pull(cache, key)
                source = "remote"
            if entry is None:
                status, source = "MISS", ""
                entries = {
                    ref: _input_entry(cache, remote, ups[name]["key"], ref) for name, ref in payload["inputs"]
                }
                entry = _run_step(recipe, step, cache, key, kd, pins, entries)
                if not remote.push(entry):
                    raise BuildError(
                        f"step {step.id}: built on {platform.node()}, but pushing it to {remote.display} failed"
                    )
    if source == "worker":
        reason = "in this node's cache"
        remote.ensure_pushed(entry)  # the driver and the other nodes take it from the remote
    return {
        "ok": True,
        "step": step.id,
        "key": key,
        "digest": entry.digest,
        "key_data": kd,
        "status": status,
        "source": source,
        "reason": reason,
        "duration_s": round(time.perf_counter() - t0, 3),
        "node": platform.node(),
        "pid": os.getpid(),
    }


def _input_entry(cache: Cache, remote: RemoteCache, key: str, ref: str) -> Entry:
    entry, _ = cache.lookup(key)
    if entry is not None:
        return entry
    with cache.lock(key):
        entry, why = cache.lookup(key)
        if entry is None:
            entry, why = remote.pull(cache, key)
    if entry is None:
        raise BuildError(
            f"input step {ref} ({key[:12]}) is neither on this node nor usable in {remote.display}: {why}"
        )
    return entry
