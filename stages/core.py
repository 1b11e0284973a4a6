"""The build engine's vocabulary: stages, the context a stage runs in, artifact kinds and errors.

A stage is a pure definition (name, version, typed inputs, output kind, params model, which package
versions enter its cache key) plus one ``run`` function that writes only into the temp dir it is given::

    STAGE = Stage(
        name="export_onnx", version="1",
        inputs={"model": (Kind.PIPELINE,)}, output_kind=Kind.ONNX,
        params=ExportOnnxParams, run=run, env_packages=("torch", "onnx"),
        bundle_dir=lambda p: f"onnx/{p.precision}",
    )

Heavy imports (torch, diffusers, coremltools, ...) belong inside ``run``, never at module import.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

logger = logging.getLogger(__name__)

T = TypeVar("T")


class SdkilnError(Exception):
    """Base of the errors the CLI maps to exit codes instead of tracebacks."""

    exit_code = 1


class UserError(SdkilnError):
    """Bad input: a recipe, an argument, a missing file. Exit code 2, one clear message."""

    exit_code = 2


class RecipeError(UserError):
    """A recipe failed validation; carries every problem at once, each with its path."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


class CorruptArtifactError(UserError):
    """A bundle or download does not match its manifest's sha256s; found before anything is loaded.

    Exit code 2: the fix is the user's (rebuild, re-download, or ``sdkiln verify`` to see what changed).
    """


class BuildError(SdkilnError):
    """A stage failed while running. Exit code 1."""

    exit_code = 1


class ParityError(BuildError):
    """An artifact's outputs are too far from the PyTorch reference; every failure is listed."""

    def __init__(self, what: str, failures: list[str]):
        self.failures = failures
        lines = "\n".join(f"  {f}" for f in failures)
        super().__init__(f"parity gate failed for {what}:\n{lines}")


class VerifyError(SdkilnError):
    """Files do not match their manifest (missing, extra or changed). Exit code 1."""

    exit_code = 1


class Kind:
    """Artifact kinds: what a step produces and what the next step may consume."""

    PIPELINE = "pipeline"  # a diffusers pipeline folder, safetensors only
    TORCH_QUANTIZED = "torch_quantized"  # optimum-quanto quantized weights + quantization maps
    ONNX = "onnx"  # an optimum/diffusers ONNX pipeline folder
    COREML = "coreml"  # Core ML packages in the layout of Apple's StableDiffusion Swift package
    TENSORRT = "tensorrt"  # TensorRT-ready ONNX plus shape profiles
    REPORT = "report"  # measurements only (parity, benchmarks)
    PUBLISHED = "published"  # a record of what was pushed where
    DATA = "data"  # anything else (test stages)


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
    needs: frozenset[str] = frozenset()  # {"network", "gpu", "macos"}
    # Where the step's output goes in the recipe's bundle (None: not in the bundle by default).
    bundle_dir: Callable[[Any], str | None] = lambda params: None
    # Plan-time checks that need the recipe's folder (a local path exists, ...): returns problems.
    check: Callable[[Any, Path], list[str]] | None = None
    # Moving references (Hub revisions) to pin: returns {name: ref} that the engine resolves via
    # ``resolve`` (e.g. {"repo:runwayml/stable-diffusion-v1-5": "main"}).
    refs: Callable[[Any], dict[str, str]] | None = None
    resolve: Callable[[str, str], str] | None = None


@dataclass
class InputArtifact:
    """An upstream artifact as the stage sees it: a read-only folder and its manifest."""

    step_id: str
    path: Path
    manifest: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})

    @property
    def components(self) -> dict[str, Any]:
        return self.manifest.get("components", {})


@dataclass
class StageContext:
    """What ``run`` gets. It writes its payload into ``out_dir`` and may fill ``metrics``,
    ``components`` (per-component I/O spec) and ``extra`` (anything else for the manifest)."""

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
    extra: dict[str, Any] = field(default_factory=dict)
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


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A tqdm bar when stderr is a terminal, otherwise quiet iteration with debug lines."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, desc=desc, total=total, leave=False)
        return
    for i, item in enumerate(items):
        logger.debug("%s: %d/%s", desc, i + 1, total if total is not None else "?")
        yield item
