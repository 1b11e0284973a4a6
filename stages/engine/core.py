"""The build engine's vocabulary: stages, the params they take, and the context a stage runs in.

A stage is a pure definition (name, version, typed inputs, output kind, params model, which package
versions enter its cache key, what the machine must have) plus one ``run`` function that writes only
into the temp dir it is given::

    STAGE = Stage(
        name="export_onnx", version="1",
        inputs={"model": (Kind.PIPELINE,)}, output_kind=Kind.ONNX,
        params=ExportOnnxParams, run=run, env_packages=("torch", "onnx"),
        bundle_dir=lambda p: f"onnx/{p.precision}",
    )

Heavy imports (torch, diffusers, coremltools, ...) belong inside ``run``, never at module import.
Artifact kinds and errors are the contract's (``sdkiln.runtime.contract``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from sdkiln.runtime.contract.manifest import ArtifactManifest, ModelFacts
from sdkiln.runtime.progress import progress

logger = logging.getLogger(__name__)

T = TypeVar("T")

# What a stage may declare it needs of the machine it runs on (checked before it runs).
NEEDS = ("network", "gpu", "macos", "tensorrt")


class StageParams(BaseModel):
    """Base for every stage's params model: unknown keys are errors, input is never rewritten."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Stage:
    """A stage definition. ``run(ctx)`` does the work; everything else is data the engine plans with."""

    name: str
    version: str
    inputs: dict[str, tuple[str, ...]]
    output_kind: str
    params: type[StageParams]
    run: Callable[[StageContext], None]
    description: str = ""
    env_packages: tuple[str, ...] = ()
    optional_inputs: frozenset[str] = frozenset()
    needs: frozenset[str] = frozenset()  # a subset of NEEDS
    # Where the step's output goes in the recipe's bundle (None: not in the bundle by default).
    bundle_dir: Callable[[Any], str | None] = lambda params: None
    # Plan-time checks that need the recipe's folder (a local path exists, ...): returns problems.
    check: Callable[[Any, Path], list[str]] | None = None
    # Moving references (Hub revisions) to pin: returns {name: ref} that the engine resolves via
    # ``resolve`` (e.g. {"repo:runwayml/stable-diffusion-v1-5": "main"}).
    refs: Callable[[Any], dict[str, str]] | None = None
    resolve: Callable[[str, str], str] | None = None
    # Facts about the machine that change the output (a GPU's compute capability, a TensorRT version),
    # computed from params at plan time; they enter the cache key as "machine".
    key_facts: Callable[[Any], dict[str, str]] | None = None


@dataclass
class InputArtifact:
    """An upstream artifact as the stage sees it: a read-only folder and its (typed) manifest."""

    step_id: str
    path: Path
    manifest: ArtifactManifest

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.metrics

    @property
    def components(self) -> dict[str, dict[str, Any]]:
        """The components as the stage that made them wrote them (plain dicts, JSON types); typed
        entries are ``manifest.components``."""
        return {k: v.model_dump(mode="json", exclude_none=True) for k, v in self.manifest.components.items()}

    @property
    def model(self) -> ModelFacts:
        """The model facts of the artifact; a stage that needs them gets a clear error when absent."""
        if self.manifest.model is None:
            from sdkiln.runtime.contract.errors import UserError

            raise UserError(
                f"input {self.step_id} ({self.kind}) does not say which model it holds (no model facts "
                "in its manifest); wire a pipeline, ONNX or Core ML artifact here"
            )
        return self.manifest.model


@dataclass
class StageContext:
    """What ``run`` gets. It writes its payload into ``out_dir`` and fills ``metrics``, ``components``
    (per-component path, precision and I/O spec), ``model`` (facts about the model for later steps and
    the runtime) and ``details`` (stage-specific records)."""

    step_id: str
    stage: Stage
    params: Any
    inputs: dict[str, InputArtifact]
    out_dir: Path
    recipe_dir: Path
    pins: dict[str, str]
    recipe: dict[str, Any]
    work_dir: Path  # scratch space outside the artifact, removed afterwards
    metrics: dict[str, Any] = field(default_factory=dict)
    components: dict[str, Any] = field(default_factory=dict)
    model: ModelFacts | None = None
    details: dict[str, Any] = field(default_factory=dict)
    # step id -> the folder its output takes in the recipe's bundle (None: not in the bundle)
    bundle_dirs: dict[str, str | None] = field(default_factory=dict)
    log: logging.Logger = field(default=logger)

    def input(self, name: str) -> InputArtifact:
        return self.inputs[name]

    def progress(self, items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
        """Iterate with a progress bar on a TTY; one log line per item elsewhere."""
        yield from progress(items, desc=f"{self.step_id}: {desc}", total=total)

    @contextlib.contextmanager
    def timed(self, metric: str) -> Iterator[None]:
        """Record the wall time of a block as ``metrics[metric]`` (seconds)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.metrics[metric] = round(time.perf_counter() - t0, 4)
