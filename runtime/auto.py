"""``backend="auto"``: the configuration ``sdkiln bench`` measured fastest on this kind of machine, for this
bundle, among those whose parity passed in that run.

``sdkiln bench`` records its picks per machine in ``$SDKILN_BENCH_CACHE``, else
``$XDG_CACHE_HOME/sdkiln/bench``, else ``~/.cache/sdkiln/bench``: one ``<machine key>.json`` (CPU model,
usable CPUs and a digest of the ISA flags: ``runtime.machine.machine_key``), with, per bundle digest and
task, the ``exact`` pick (the same algorithm; every component within its floor and the end-to-end parity
measured and passed) and the ``fast`` pick (declared trade-offs such as TAESD, fewer steps or the
ControlNet on the first steps only, with their measured deviation from the exact output). ``choose``
reads it; without a record for this machine and bundle it falls back to the exact default (the ONNX
Runtime fp32 section) and says so, with the command that makes a record.

    choice = choose(bundle_root, manifest, profile="fast", task="sketch")
    choice.settings   # {"backend": "openvino", "section": "openvino/int8", "vae": "tiny", "steps": 2, ...}
    choice.why        # "fastest fast-profile run of sdkiln bench on this machine (0.12x torch, ...)"
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.layout import BACKEND_KINDS, PREFERRED_SECTIONS
from sdkiln.runtime.machine import machine_key

logger = logging.getLogger(__name__)

PROFILES = ("exact", "fast")
RECORD_SCHEMA = 1
# The configuration settings a record may set (anything else in it is ignored).
SETTINGS = ("backend", "section", "vae", "inference_precision", "dtype", "steps", "control_end")


def records_dir() -> Path:
    if os.environ.get("SDKILN_BENCH_CACHE"):
        return Path(os.environ["SDKILN_BENCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdkiln" / "bench"


def record_path(key: str | None = None) -> Path:
    return records_dir() / f"{key or machine_key()}.json"


@dataclass(frozen=True)
class Choice:
    """What ``backend="auto"`` runs, and why."""

    profile: str
    settings: dict[str, Any]
    why: str
    measured: bool  # from a benchmark record of this machine and bundle (False: the default)
    details: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        s = self.settings
        parts = [f"backend {s['backend']}", f"section {s['section']}"]
        if s.get("backend") == "openvino":
            parts.append(f"inference precision {s.get('inference_precision', 'f32')}")
        parts.append(f"vae {s.get('vae', 'full')}")
        if s.get("steps"):
            parts.append(f"{s['steps']} steps")
        if s.get("control_end", 1.0) != 1.0:
            parts.append(f"ControlNet until {s['control_end']:.0%} of the steps")
        return f"auto ({self.profile} profile): {', '.join(parts)} - {self.why}"


def read_record(key: str | None = None) -> dict[str, Any] | None:
    path = record_path(key)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        logger.warning("ignoring unreadable benchmark record %s (%s)", path, e)
        return None
    return data if data.get("schema") == RECORD_SCHEMA else None


def choose(root: Path, manifest: Any, profile: str = "exact", task: str = "sketch") -> Choice:
    """The configuration to run ``task`` with on this machine (see the module docstring)."""
    if profile not in PROFILES:
        raise UserError(f"unknown profile {profile!r}; choose from: {', '.join(PROFILES)}")
    key = machine_key()
    record = read_record(key)
    bundle = ((record or {}).get("bundles") or {}).get(manifest.digest or "")
    if bundle is None:
        where = record_path(key)
        reason = (
            f"no benchmark of this bundle is recorded for this machine ({key}); measure it with "
            f"`sdkiln bench {root}` (recorded in {where})"
        )
        return _default(manifest, profile, reason)
    tasks = bundle.get("tasks") or {}
    picks = tasks.get(task) or next(iter(tasks.values()), None) or {}
    pick = picks.get(profile)
    if not pick:
        return _default(manifest, profile, f"the benchmark recorded for this machine has no {profile} pick")
    settings = {k: pick["settings"][k] for k in SETTINGS if k in pick.get("settings", {})}
    problem = _unusable(manifest, settings)
    if problem:
        return _default(manifest, profile, f"the recorded {profile} pick cannot run here ({problem})")
    used_task = task if task in tasks else next(iter(tasks))
    why = (
        f"fastest {profile}-profile configuration of `sdkiln bench` on this machine for this bundle "
        f"({used_task}: {pick['ratio_to_reference']:.2f}x the PyTorch reference, {pick.get('label', '')}; "
        f"run {bundle.get('created', '?')})"
    )
    if used_task != task:
        why += f"; no {task} run was benchmarked, so the {used_task} pick is used"
    return Choice(profile, settings, why, True, {"record": str(record_path(key)), "pick": pick})


def _default(manifest: Any, profile: str, reason: str) -> Choice:
    sections = manifest.sections
    for backend in ("onnx", "openvino"):
        name = PREFERRED_SECTIONS[backend]
        if name in sections and sections[name].kind == BACKEND_KINDS[backend]:
            settings = {"backend": backend, "section": name, "vae": "full"}
            break
    else:
        kinds = {"onnx": "onnx", "openvino": "openvino", "pipeline": "torch"}
        found = next(((n, kinds[e.kind]) for n, e in sorted(sections.items()) if e.kind in kinds), None)
        if found is None:
            raise UserError("backend auto: the bundle has no ONNX, OpenVINO or PyTorch section to run")
        settings = {"backend": found[1], "section": found[0], "vae": "full"}
    return Choice(profile, settings, f"the exact default ({reason})", False)


def _unusable(manifest: Any, s: dict[str, Any]) -> str | None:
    backend, section = s.get("backend"), s.get("section")
    if backend not in BACKEND_KINDS:
        return f"unknown backend {backend!r}"
    entry = manifest.sections.get(section)
    if entry is None or entry.kind != BACKEND_KINDS[backend]:
        return f"the bundle has no {BACKEND_KINDS[backend]} section {section!r}"
    library = {"openvino": "openvino", "onnx": "onnxruntime", "torch": "torch"}.get(backend)
    if library and importlib.util.find_spec(library) is None:
        return f"the {backend} backend's library ({library}) is not installed"
    return None
