"""Typed manifests: the file that makes an artifact (a cache entry) or a bundle checkable and readable.

An **artifact manifest** (``<cache>/<key>/manifest.json``) says what one step produced: its kind, the
stage and params, the digests of its inputs, every file with its sha256 and size, the components it
holds with their I/O specs (``components``), the typed facts about the model that later steps and the
runtime read (``model``: family, ControlNets, LCM, ...), stage-specific records nobody else depends on
(``details``) and the measurements (``metrics``).

A **bundle manifest** (``artifacts/<recipe>/manifest.json``) lists every file of the bundle and, per
bundle folder, the section that came from one step (the same blocks as the step's artifact manifest).

Schema history: 1 had one untyped ``extra`` dict in place of ``model`` + ``details``; it is read and
upgraded (bundles built before still load). A manifest from a newer schema is refused with a message
that names both versions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer

from sdkiln.runtime.contract.digest import NO_MEMO, HashMemo, list_files
from sdkiln.runtime.contract.errors import CorruptArtifactError, SchemaError, UserError, VerifyError
from sdkiln.runtime.contract.layout import MANIFEST
from sdkiln.runtime.contract.specs import TensorSpec

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileEntry(_Strict):
    sha256: str
    size: int


class ComponentEntry(BaseModel):
    """One model component of an artifact: where it lives, its precision and its I/O spec.

    Stages may add annotations of their own (``chunks`` of a split Core ML UNet, ``palettization``,
    ``attention``...): extra keys are kept as they are.
    """

    model_config = ConfigDict(extra="allow")

    path: str | None = None
    precision: str = "fp32"
    inputs: list[TensorSpec] = Field(default_factory=list)
    outputs: list[TensorSpec] = Field(default_factory=list)

    @field_serializer("inputs", "outputs")
    def _tensors(self, tensors: list[TensorSpec]) -> list[dict[str, Any]]:
        # Written as the stages write them: name, dtype, shape, and optional/default only when set.
        return [t.to_dict() for t in tensors]

    def get(self, key: str, default: Any = None) -> Any:
        """Read a field or an annotation by name (``entry.get("chunks")``)."""
        if key in type(self).model_fields:
            return getattr(self, key)
        return (self.model_extra or {}).get(key, default)


class ModelFacts(_Strict):
    """What an artifact says about the model it holds, for later steps and the runtime."""

    family: str
    pipeline_class: str | None = None
    controlnets: list[str] = Field(default_factory=list)  # ControlNet types: ["scribble", "canny"]
    taesd: bool = False
    lcm: bool = False  # LCM-LoRA fused (or an LCM UNet): LCM scheduler, few steps, no CFG
    scheduler: str | None = None  # the diffusers scheduler class of the folder
    source: dict[str, Any] = Field(default_factory=dict)  # where the weights came from (preset, repo)
    loras: list[dict[str, Any]] = Field(default_factory=list)  # fused LoRAs
    unet_controlnet_residuals: bool = False  # the UNet graph takes ControlNet residual inputs
    static: dict[str, int] | None = None  # axis sizes of a static-shape export
    image_size: list[int] | None = None  # (height, width) of fixed-size packages (Core ML)


def precision_of(components: dict[str, ComponentEntry]) -> str:
    """The precision of a set of components: theirs when they all share one, else ``mixed``
    (``component_precisions`` lists them); ``none`` for an artifact without components."""
    precs = sorted({c.precision for c in components.values()})
    if not precs:
        return "none"
    return precs[0] if len(precs) == 1 else "mixed"


class InputRef(_Strict):
    step: str
    digest: str


class ArtifactManifest(BaseModel):
    """``manifest.json`` of a cache entry."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: int = Field(default=SCHEMA_VERSION, alias="schema")
    kind: str
    stage: str
    stage_version: str
    step: str
    recipe: str
    params: dict[str, Any] = Field(default_factory=dict)
    inputs: dict[str, InputRef] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    pins: dict[str, dict[str, str]] = Field(default_factory=dict)
    environment: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    components: dict[str, ComponentEntry] = Field(default_factory=dict)
    model: ModelFacts | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    created: str = ""
    key: str
    files: dict[str, FileEntry]
    digest: str

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    @property
    def precision(self) -> str:
        return precision_of(self.components)


class Section(BaseModel):
    """One bundle folder: the output of one step, described by the blocks of its artifact manifest."""

    model_config = ConfigDict(extra="forbid")

    kind: str
    step: str = ""
    stage: str = ""
    stage_version: str = ""
    key: str = ""  # provenance: the cache key and digest of the step's artifact
    digest: str = ""
    params: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    components: dict[str, ComponentEntry] = Field(default_factory=dict)
    model: ModelFacts | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    pins: dict[str, dict[str, str]] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def from_artifact(cls, step: str, manifest: ArtifactManifest) -> Section:
        return cls(
            step=step,
            **{k: getattr(manifest, k) for k in cls.model_fields if k != "step"},
        )

    @property
    def family(self) -> str | None:
        return self.model.family if self.model else None

    @property
    def precision(self) -> str:
        """The section's precision from its components (``mixed`` when they differ)."""
        return precision_of(self.components)

    def component_precisions(self) -> dict[str, str]:
        return {k: c.precision for k, c in sorted(self.components.items())}


class BundleManifest(BaseModel):
    """``manifest.json`` of a bundle."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: int = Field(default=SCHEMA_VERSION, alias="schema")
    kind: str = "bundle"
    name: str = ""
    description: str = ""
    recipe: dict[str, Any] = Field(default_factory=dict)
    lock: dict[str, Any] = Field(default_factory=dict)
    sections: dict[str, Section]
    environment: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, FileEntry]
    digest: str = ""

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def section_of(self, relpath: str) -> str | None:
        """The section a bundle file belongs to (None: a top-level file such as ``recipe.yaml``)."""
        return next((s for s in self.sections if relpath.startswith(s.rstrip("/") + "/")), None)


# --------------------------------------------------------------------------------------------------
# Reading, with the upgrade from schema 1

_FACT_KEYS = set(ModelFacts.model_fields)


def _upgrade_block(block: dict[str, Any]) -> None:
    """Schema 1 -> 2, in place: ``extra`` becomes ``model`` (the typed facts) and ``details`` (the rest)."""
    extra = block.pop("extra", None) or {}
    if "model" not in block:
        facts = {k: v for k, v in extra.items() if k in _FACT_KEYS}
        if "height" in extra and "width" in extra and "image_size" not in facts:
            facts["image_size"] = [extra["height"], extra["width"]]
        block["model"] = facts if "family" in facts else None
        block.setdefault("details", {k: v for k, v in extra.items() if k not in _FACT_KEYS})


def _check_schema(data: dict[str, Any], path: Path) -> None:
    schema = data.get("schema", 1)
    if schema not in READABLE_SCHEMAS:
        raise SchemaError(
            f"{path}: written by manifest schema {schema}; this sdkiln reads schemas "
            f"{', '.join(map(str, READABLE_SCHEMAS))} (upgrade sdkiln, or rebuild the bundle)"
        )
    if schema == 1:
        if data.get("kind") == "bundle" or "sections" in data:
            for sec in (data.get("sections") or {}).values():
                _upgrade_block(sec)
        else:
            _upgrade_block(data)
        data["schema"] = SCHEMA_VERSION


def _load_json(path: Path, error: type[Exception]) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise error(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(data, dict):
        raise error(f"{path}: not an sdkiln manifest")
    return data


def _short(e: ValidationError) -> str:
    errs = e.errors()
    shown = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in errs[:3])
    return shown + (f" (and {len(errs) - 3} more)" if len(errs) > 3 else "")


def read_artifact_manifest(root: Path) -> ArtifactManifest:
    """The manifest of a cache entry; a UserError when there is none, a VerifyError when it is broken."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise UserError(f"{root}: no {MANIFEST} here; is this a bundle or a cache entry?")
    data = _load_json(path, VerifyError)
    _check_schema(data, path)
    try:
        return ArtifactManifest.model_validate(data)
    except ValidationError as e:
        raise VerifyError(f"{path}: not an sdkiln artifact manifest ({_short(e)})") from e


def read_bundle_manifest(root: Path) -> BundleManifest:
    """The manifest of a bundle; a CorruptArtifactError (exit 2) when it is missing or broken."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise CorruptArtifactError(f"{root}: no {MANIFEST}; is this an sdkiln bundle?")
    data = _load_json(path, CorruptArtifactError)
    _check_schema(data, path)
    try:
        return BundleManifest.model_validate(data)
    except ValidationError as e:
        raise CorruptArtifactError(f"{path}: not an sdkiln bundle manifest ({_short(e)})") from e


def read_any_manifest(root: Path) -> ArtifactManifest | BundleManifest:
    """A bundle's or a cache entry's manifest, whichever ``root`` holds (``sdkiln verify``)."""
    path = Path(root) / MANIFEST
    if path.is_file() and _load_json(path, VerifyError).get("kind") == "bundle":
        return read_bundle_manifest(root)
    return read_artifact_manifest(root)


# --------------------------------------------------------------------------------------------------
# Verification


@dataclass
class VerifyReport:
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    why: dict[str, str] = field(default_factory=dict)  # changed file -> how it differs
    checked: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.changed)

    def lines(self) -> list[str]:
        return (
            [f"missing: {p}" for p in self.missing]
            + [f"extra:   {p}" for p in self.extra]
            + [f"changed: {p}" for p in self.changed]
        )


def verify_files(
    root: Path,
    files: dict[str, FileEntry],
    memo: HashMemo = NO_MEMO,
    only: Callable[[str], bool] | None = None,
    extras: bool = True,
) -> VerifyReport:
    """Compare the files below ``root`` with a manifest's file table: sizes first (cheap), then sha256.

    ``only`` restricts the check to the paths it accepts (the sections a backend uses); ``extras``
    also reports files present but not listed (a cache entry must hold nothing else; a bundle folder
    checked by the runtime may).
    """
    report = VerifyReport()
    present = {p.relative_to(root).as_posix(): p for p in list_files(root)} if extras else {}
    for rel, meta in sorted(files.items()):
        if only is not None and not only(rel):
            continue
        report.checked += 1
        path = Path(root) / rel
        if not path.is_file():
            report.missing.append(rel)
        elif (size := path.stat().st_size) != meta.size:
            report.changed.append(rel)
            report.why[rel] = f"size {size}, manifest says {meta.size}"
        elif memo.sha256(path) != meta.sha256:
            report.changed.append(rel)
            report.why[rel] = "sha256 mismatch (the file changed after the build)"
    if extras:
        report.extra = sorted(r for r in set(present) - set(files) if only is None or only(r))
    return report


def verify_bundle_sections(
    root: Path, manifest: BundleManifest, sections: list[str], memo: HashMemo = NO_MEMO
) -> int:
    """Check every file of ``sections`` (and the top-level files) before anything is loaded; returns how
    many were checked. Raises CorruptArtifactError listing every bad file."""

    def in_use(rel: str) -> bool:
        owner = manifest.section_of(rel)
        return owner is None or owner in sections

    report = verify_files(root, manifest.files, memo, only=in_use, extras=False)
    if not report.ok:
        problems = [f"{p}: missing" for p in report.missing] + [
            f"{p}: {report.why[p]}" for p in report.changed
        ]
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise CorruptArtifactError(
            f"{root}: bundle is corrupted, {len(problems)} bad file(s):\n  " + "\n  ".join(shown)
        )
    return report.checked
