"""The studio's model side (no gradio): a bundle loaded once and shared by every request and user.

    studio = Studio("artifacts/tiny", backend="auto", workdir=Path("/tmp/studio"))
    out = studio.render(RenderInputs(task="sketch", prompt="a red car", image="car.png", seed=42))
    out.image.save("render.png")
    print(out.command)          # the `sdkiln run` line that gives the same image

- Each (backend, section) is loaded once, under a lock, with every component any task needs loaded up
  front, so renders running at the same time share the same ONNX sessions / torch modules and never
  load a second copy. ``loads`` counts loads per (backend, section); the page and the log show it.
- A render builds its ``Request`` with the runtime's own builders (``tasks.py``) from the input image
  saved as a PNG in the studio's temp folder, exactly as ``sdkiln run`` builds it from ``--image``: the
  same inputs give the same image, and ``Rendered.command`` is the ``sdkiln run`` line that does.
- Where the section has both VAE decoders, a ``vae="tiny"`` Pipeline over the *same* backend components
  decodes the final latents with TAESD first (``on_preview``); then the full VAE decodes them.
- ``superseded`` is polled before every denoising step: a render nobody wants any more stops early.
"""

from __future__ import annotations

import itertools
import logging
import shlex
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image, ImageOps, UnidentifiedImageError

from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.layout import BACKEND_KINDS
from sdkiln.runtime.contract.manifest import read_bundle_manifest
from sdkiln.runtime.images import open_image
from sdkiln.runtime.load import check_backend, load, pick_section, resolve_source
from sdkiln.runtime.pipeline import Pipeline
from sdkiln.runtime.styles import styles
from sdkiln.runtime.tasks import edit_request, sketch_request, text_request
from sdkiln.runtime.types import Request

logger = logging.getLogger(__name__)

T = TypeVar("T")

TASKS = ("sketch", "text", "edit")
# `--backend auto` until the runtime has its own auto-selection: the first of these this install can
# run and the bundle has a section for.
AUTO_ORDER = ("onnx", "torch")
MAX_STEPS = 50
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 2000
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 4096 * 4096  # larger images are refused before they are decoded
CANVAS_MAX_SIDE = 1024  # uploads are scaled down to this for the canvas (what is rendered is saved)
KEEP_FILES = 64  # PNGs of each kind (inputs, renders, previews) kept in the temp folder, newest first


class Superseded(Exception):
    """A newer request from the same page replaced this one; it stopped before finishing."""


def rss_mb() -> float | None:
    """This process's resident memory in MiB (Linux ``/proc``; None elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def auto_backend(model: str, section: str | None = None) -> tuple[str, str]:
    """``--backend auto``: the first of ``AUTO_ORDER`` whose library is installed and that the bundle has
    a section for; returns ``(backend, note)``, the note saying why (the page shows it)."""
    manifest = read_bundle_manifest(resolve_source(model, []))  # a Hub repo: only its manifest
    skipped = []
    for backend in AUTO_ORDER:
        try:
            pick_section(manifest, backend, section)
            check_backend(backend)
        except UserError as e:
            skipped.append(f"{backend}: {e}")
            continue
        why = f" ({'; '.join(skipped)})" if skipped else ""
        return backend, f"auto: the first of {' → '.join(AUTO_ORDER)} available here{why}"
    raise UserError(
        f"--backend auto: none of {', '.join(AUTO_ORDER)} can run {model} here:\n  " + "\n  ".join(skipped)
    )


def read_upload(
    src: str | Path | Image.Image, what: str = "upload", max_bytes: int | None = None
) -> Image.Image:
    """A checked RGB image from an uploaded file (or a PIL image): at most ``max_bytes`` (default
    ``MAX_UPLOAD_BYTES``) and ``MAX_PIXELS``, and really an image; a UserError naming the file otherwise."""
    max_bytes = MAX_UPLOAD_BYTES if max_bytes is None else max_bytes
    if isinstance(src, Image.Image):
        if src.width * src.height > MAX_PIXELS:
            raise UserError(
                f"{what}: image too large ({src.width}x{src.height}); at most {MAX_PIXELS:,} pixels"
            )
        return open_image(src, what)
    path = Path(src)
    name = path.name
    try:
        size = path.stat().st_size
    except OSError as e:
        raise UserError(f"{what}: {name}: cannot read ({e.strerror or e})") from e
    if size > max_bytes:
        raise UserError(f"{what}: {name} is {_size(size)}; uploads are limited to {_size(max_bytes)}")
    try:
        with Image.open(path) as img:
            # The header gives the size: refuse huge images before decoding a single pixel.
            if img.width * img.height > MAX_PIXELS:
                raise UserError(
                    f"{what}: {name} is too large an image ({img.width}x{img.height}); "
                    f"at most {MAX_PIXELS:,} pixels, e.g. 4096x4096"
                )
            img.load()
            loaded = ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise UserError(f"{what}: {name} is not an image this studio can read (use PNG, JPEG or WebP)") from e
    except OSError as e:  # truncated or corrupt image data
        raise UserError(f"{what}: {name} is not a readable image ({e})") from e
    return open_image(loaded, what)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} bytes"


def for_canvas(img: Image.Image) -> Image.Image:
    """``img`` scaled down (never up) so its longer side is at most ``CANVAS_MAX_SIDE``."""
    scale = CANVAS_MAX_SIDE / max(img.width, img.height)
    if scale >= 1.0:
        return img
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


@dataclass(frozen=True)
class RenderInputs:
    """What the page sends; ``backend``/``section`` None: the studio's default model."""

    task: str
    prompt: str
    image: str | Path | Image.Image | None = None  # sketch: the drawing; edit: the photo
    style: str | None = None
    steps: int | None = None  # None: the family default (4 for LCM)
    seed: int = 0
    conditioning_scale: float = 1.0
    strength: float = 0.6  # edit
    control: str | None = None  # edit: "canny" keeps the photo's structure
    backend: str | None = None
    section: str | None = None


@dataclass(frozen=True)
class LoadedModel:
    backend: str
    section: str
    pipe: Pipeline
    preview: Pipeline | None  # TAESD over the same backend components, where the section has it
    seconds: float


@dataclass(frozen=True)
class Rendered:
    render_id: int
    task: str
    image: Image.Image
    preview: Image.Image | None
    timings: dict[str, float]  # seconds per stage, in the order they ran, and "total"
    backend: str
    section: str
    description: str  # what runs the components, e.g. "onnxruntime 1.32.0 (CPUExecutionProvider)"
    width: int
    height: int
    steps: int
    seed: int
    input_path: Path | None  # the input image as rendered (PNG in the temp folder)
    command: str  # the `sdkiln run` line that gives the same image
    settings: dict[str, Any] = field(default_factory=dict)


def check_inputs(inp: RenderInputs) -> None:
    """Everything checkable without the model; a UserError naming the field."""
    if inp.task not in TASKS:
        raise UserError(f"task must be one of {', '.join(TASKS)} (got {inp.task!r})")
    if not isinstance(inp.prompt, str) or not inp.prompt.strip():
        raise UserError("prompt: write what to render, e.g. 'a red sports car, studio light'")
    if len(inp.prompt) > MAX_PROMPT_CHARS:
        raise UserError(f"prompt: {len(inp.prompt)} characters; at most {MAX_PROMPT_CHARS}")
    if inp.style is not None and inp.style not in styles():
        raise UserError(f"style: unknown preset {inp.style!r}; choose from {', '.join(sorted(styles()))}")
    if inp.steps is not None and not 1 <= inp.steps <= MAX_STEPS:
        raise UserError(f"steps must be between 1 and {MAX_STEPS} (got {inp.steps})")
    if not 0 <= inp.seed <= MAX_SEED:
        raise UserError(f"seed must be between 0 and {MAX_SEED} (got {inp.seed})")
    if not 0.0 <= inp.conditioning_scale <= 2.0:
        raise UserError(f"ControlNet scale must be between 0 and 2 (got {inp.conditioning_scale})")
    if inp.task == "edit" and not 0.0 < inp.strength <= 1.0:
        raise UserError(f"strength must be in (0, 1] (got {inp.strength})")
    if inp.task == "edit" and inp.control not in (None, "canny"):
        raise UserError(f"edit control must be canny or none (got {inp.control!r})")
    if inp.task in ("sketch", "edit") and inp.image is None:
        raise UserError(
            "sketch: draw on the canvas or upload a sketch first"
            if inp.task == "sketch"
            else "edit: upload a photo (or draw) on the canvas first"
        )


def build_request(pipe: Pipeline, inp: RenderInputs, image: Path | None) -> Request:
    """The runtime's request for ``inp``, built the way ``sdkiln run`` builds it (same defaults)."""
    common: dict[str, Any] = {
        "negative_prompt": None,
        "steps": inp.steps,
        "guidance": None,
        "seed": inp.seed,
        "height": None,
        "width": None,
        "style": inp.style,
    }
    control = {"conditioning_scale": inp.conditioning_scale, "control_start": 0.0, "control_end": 1.0}
    if inp.task == "text":
        return text_request(pipe, inp.prompt, **common)
    if inp.task == "sketch":
        return sketch_request(pipe, image, inp.prompt, **common, **control)
    return edit_request(
        pipe, image, inp.prompt, strength=inp.strength, control=inp.control, **common, **control
    )


def run_command_line(
    model: str, inp: RenderInputs, backend: str, section: str, steps: int, image: Path | None
) -> str:
    """The ``sdkiln run`` command that renders the same image as the studio did for ``inp``."""
    args = ["sdkiln", "run", inp.task, "--model", model, "--backend", backend, "--section", section]
    args += ["--prompt", inp.prompt]
    if inp.style:
        args += ["--style", inp.style]
    if image is not None:
        args += ["--image", str(image)]
    args += ["--steps", str(steps), "--seed", str(inp.seed)]
    if inp.task == "edit":
        args += ["--strength", repr(float(inp.strength)), "--control", inp.control or "none"]
    if inp.task == "sketch" or (inp.task == "edit" and inp.control):
        args += ["--conditioning-scale", repr(float(inp.conditioning_scale))]
    args += ["--out", f"{inp.task}-{inp.seed}.png"]
    return shlex.join(args)


def _stoppable(superseded: Callable[[], bool]) -> Callable[[Iterable[T], str, int], Iterator[T]]:
    def progress(items: Iterable[T], desc: str, total: int) -> Iterator[T]:
        for item in items:
            if superseded():
                raise Superseded()
            yield item

    return progress


class Studio:
    """One bundle, its models loaded once per (backend, section), rendering for every page at once.

    Thread-safe: the page's queue runs up to ``--concurrency`` renders at the same time over the same
    loaded components (ONNX Runtime sessions and torch modules run concurrent calls).
    """

    def __init__(
        self,
        model: str | Path,
        backend: str = "auto",
        section: str | None = None,
        *,
        workdir: Path,
        provider: str = "auto",
        max_models: int = 2,
        max_upload_bytes: int = MAX_UPLOAD_BYTES,
    ):
        self.model = str(model)
        self.provider = provider
        self.max_upload_bytes = max_upload_bytes
        self.max_models = max(1, max_models)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.loads: Counter[tuple[str, str]] = Counter()
        self.renders = 0
        self.failures = 0
        self.in_flight = 0
        self.peak_in_flight = 0  # the most renders that ran at the same time
        self.rss_start_mb = rss_mb()
        self._models: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
        self._load_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._manifest = read_bundle_manifest(resolve_source(self.model, []))
        if backend == "auto":
            backend, self.backend_note = auto_backend(self.model, section)
        else:
            self.backend_note = f"--backend {backend}"
        self._default_key: tuple[str, str] | None = None
        self.default = self.model_for(backend, section)
        self._default_key = (self.default.backend, self.default.section)

    # -- models -----------------------------------------------------------------------------------------

    def sections(self) -> list[str]:
        """The bundle's sections that some backend runs (what the page offers)."""
        runnable = set(BACKEND_KINDS.values())
        return sorted(n for n, e in self._manifest.sections.items() if e.kind in runnable)

    def model_for(self, backend: str | None = None, section: str | None = None) -> LoadedModel:
        """The loaded model for (backend, section), loading it once if needed; None: the default model."""
        if backend is None:
            if section is None:
                return self.default
            backend = self.default.backend
        name = pick_section(self._manifest, backend, section or None)  # before importing a library
        check_backend(backend)
        key = (backend, name)
        found = self._models.get(key)
        if found is not None:
            return found
        with self._load_lock:  # one load at a time; a second request for the same model waits for it
            found = self._models.get(key)
            if found is None:
                found = self._load(backend, name)
                self._models[key] = found
                # Keep memory bounded: drop the oldest other model beyond max_models (renders still
                # running on it keep it alive until they finish). The default model always stays.
                for old in [k for k in self._models if k not in (key, self._default_key)]:
                    if len(self._models) <= self.max_models:
                        break
                    logger.info("studio: unloading %s %s (keeping at most %d models)", *old, self.max_models)
                    del self._models[old]
            return found

    def _load(self, backend: str, section: str) -> LoadedModel:
        t0 = time.perf_counter()
        pipe = load(self.model, backend=backend, section=section, vae="full", provider=self.provider)
        names: set[str] = set()
        for task, control in (("sketch", None), ("text", None), ("edit", None), ("edit", "canny")):
            names.update(pipe.components_for(task, control))
        # Everything up front: backends load lazily, and two renders must not both load a component.
        pipe.preload(sorted(names))
        preview = None
        if pipe.backend.has("taesd_decoder") and pipe.backend.has("vae_decoder"):
            preview = Pipeline(pipe.backend, pipe.info, vae="tiny", source=pipe.source)
            preview.preload(["taesd_decoder"])
        seconds = time.perf_counter() - t0
        self.loads[(backend, section)] += 1
        rss = rss_mb()
        logger.info(
            "studio: loaded %s %s in %.2f s (load #%d of it; %d components%s%s)",
            backend,
            section,
            seconds,
            self.loads[(backend, section)],
            len(names),
            ", TAESD preview" if preview else "",
            f"; RSS {rss:.0f} MiB" if rss is not None else "",
        )
        return LoadedModel(backend, section, pipe, preview, seconds)

    # -- rendering --------------------------------------------------------------------------------------

    def save_png(self, img: Image.Image, kind: str, name: str) -> Path:
        """``img`` as ``<workdir>/<kind>/<name>.png`` (lossless), keeping the newest ``KEEP_FILES`` of
        that kind. Names start with the zero-padded render id, so they sort oldest first."""
        folder = self.workdir / kind
        folder.mkdir(exist_ok=True)
        path = folder / f"{name}.png"
        img.save(path)
        for old in sorted(folder.glob("*.png"))[:-KEEP_FILES]:
            old.unlink(missing_ok=True)
        return path

    def _save_input(self, render_id: int, image: str | Path | Image.Image, task: str) -> Path:
        img = read_upload(image, "sketch" if task == "sketch" else "photo", self.max_upload_bytes)
        # PNG: lossless, so `sdkiln run --image` reads exactly the pixels the studio rendered from.
        return self.save_png(img, "inputs", f"{render_id:06d}-{task}")

    def render(
        self,
        inp: RenderInputs,
        *,
        on_preview: Callable[[Image.Image], None] | None = None,
        superseded: Callable[[], bool] = lambda: False,
    ) -> Rendered:
        """One image for ``inp``; a UserError for bad input, ``Superseded`` if ``superseded()`` turned true."""
        render_id = next(self._ids)
        t_start = time.perf_counter()
        with self._stats_lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            check_inputs(inp)
            model = self.model_for(inp.backend, inp.section)
            t0 = time.perf_counter()
            image_path = self._save_input(render_id, inp.image, inp.task) if inp.task != "text" else None
            request = build_request(model.pipe, inp, image_path)
            preprocess = time.perf_counter() - t0
            preview: list[Image.Image] = []
            preview_seconds: list[float] = []

            def taesd_preview(latents: Any) -> None:
                if model.preview is None or superseded():
                    return
                t = time.perf_counter()
                preview.append(model.preview.decode(latents)[0])
                preview_seconds.append(time.perf_counter() - t)
                if on_preview is not None:
                    on_preview(preview[0])

            result = model.pipe.generate(request, progress=_stoppable(superseded), on_latents=taesd_preview)
        except Exception as e:
            with self._stats_lock:
                self.failures += not isinstance(e, Superseded)
            raise
        finally:
            with self._stats_lock:
                self.in_flight -= 1
        # In the order they ran: the TAESD preview comes between the denoising and the full decode.
        timings = {"preprocess": preprocess}
        timings.update((k, v) for k, v in result.timings.items() if k != "vae_decoder")
        if preview_seconds:
            timings["taesd_preview"] = preview_seconds[0]
        timings["vae_decoder"] = result.timings["vae_decoder"]
        timings["total"] = time.perf_counter() - t_start
        with self._stats_lock:
            self.renders += 1
        out = Rendered(
            render_id=render_id,
            task=inp.task,
            image=result.images[0],
            preview=preview[0] if preview else None,
            timings=timings,
            backend=model.backend,
            section=model.section,
            description=model.pipe.backend.description,
            width=result.settings["width"],
            height=result.settings["height"],
            steps=result.steps,
            seed=result.seed,
            input_path=image_path,
            command=run_command_line(self.model, inp, model.backend, model.section, result.steps, image_path),
            settings=result.settings,
        )
        logger.info(
            "studio: render #%d %s %dx%d, %d steps, seed %d on %s %s in %.0f ms",
            render_id,
            inp.task,
            out.width,
            out.height,
            out.steps,
            out.seed,
            out.backend,
            out.section,
            timings["total"] * 1000,
        )
        return out

    def stats(self) -> dict[str, Any]:
        """Loads per model, renders served and failed, memory: what the page's status line shows."""
        with self._stats_lock:
            return {
                "loads": {f"{b} {s}": n for (b, s), n in sorted(self.loads.items())},
                "loaded": [f"{b} {s}" for b, s in self._models],
                "renders": self.renders,
                "failures": self.failures,
                "peak_in_flight": self.peak_in_flight,
                "rss_mb": rss_mb(),
                "rss_start_mb": self.rss_start_mb,
            }
