"""The studio's page: a Gradio Blocks app over one ``Studio`` (the model side, ``engine.py``).

Only ``serve`` (``sdkiln studio``) imports this module, after pointing Gradio's temp folder at the
studio's own; the runtime and the rest of the CLI never import gradio. (No ``from __future__ import
annotations`` here: Gradio finds the ``gr.Request`` parameters by their evaluated annotations.)

The page: a canvas (the editor's brush, eraser, undo, redo, clear) and an upload button for a sketch
or photo; prompt, style preset, task, steps, seed (+ random), ControlNet scale, edit strength and
canny; the model (backend, section). Renders go through one Gradio queue with
``concurrency`` slots shared by every page; changes re-render live (``live.py``: debounced, a newer
request supersedes the one in flight). Each render shows a TAESD preview first where the bundle has
it, then the image, the time per stage, and the ``sdkiln run`` line that gives the same image.

Every error (bad upload, a backend the bundle lacks, bad input) is shown in the page; the app keeps
serving. Uploads and everything else Gradio writes stay in the studio's temp folder.
"""

import itertools
import logging
import queue
import secrets
import threading
from collections.abc import Iterator
from typing import Any

import gradio as gr

from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.layout import BACKEND_KINDS
from sdkiln.runtime.studio.engine import (
    MAX_STEPS,
    TASKS,
    Rendered,
    RenderInputs,
    Studio,
    Superseded,
    for_canvas,
    read_upload,
)
from sdkiln.runtime.studio.live import LiveRequests
from sdkiln.runtime.styles import styles

logger = logging.getLogger(__name__)

NO_STYLE = "none"
DEFAULT_SECTION = "default"
DEFAULT_PROMPT = "a red sports car, studio light"
CSS = "#studio-error, #studio-error * { color: #b00020 !important; font-weight: 600; }"


def _status(out: Rendered, studio: Studio) -> str:
    rows = "\n".join(f"| {stage} | {seconds * 1000:.1f} |" for stage, seconds in out.timings.items())
    stats = studio.stats()
    loads = ", ".join(f"{k} ×{n}" for k, n in stats["loads"].items())
    rss = f" · RSS {stats['rss_mb']:.0f} MiB" if stats["rss_mb"] is not None else ""
    preview = " · TAESD preview shown first" if out.preview is not None else ""
    return (
        f"**render #{out.render_id}** · {out.task} · {out.backend} · section `{out.section}` · {out.width}×{out.height}"
        f" · {out.steps} step{'s' if out.steps != 1 else ''} · seed {out.seed}{preview}\n\n"
        f"{out.description}\n\n| stage | ms |\n| --- | ---: |\n{rows}\n\n"
        f"models loaded: {loads} · {stats['renders']} renders served, up to {stats['peak_in_flight']} at once"
        f"{rss}"
    )


def _header(studio: Studio) -> str:
    d = studio.default
    return (
        f"## sdkiln studio\n`{studio.model}` · backend **{d.backend}** · section `{d.section}` · "
        f"{d.pipe.backend.description} ({studio.backend_note}) · loaded in {d.seconds:.1f} s"
        + (" · TAESD preview" if d.preview is not None else "")
    )


def build_app(studio: Studio, *, concurrency: int = 2, queue_size: int = 32) -> Any:
    """The Blocks app over ``studio`` (not launched)."""
    live = LiveRequests()
    d = studio.default
    preview_ids, upload_ids = itertools.count(1), itertools.count(1)

    def mark(request: gr.Request) -> int:
        return live.mark(request.session_hash or "")

    def render(is_live: bool, source: str, v: dict[str, Any], request: gr.Request) -> Iterator[tuple]:
        """One render for the page's current values ``v`` (by name); yields (render, status, error,
        command, input file): the TAESD preview first where there is one, then the final image.

        ``source`` is what triggered it: ``canvas`` (the drawing changed), ``upload`` (render the
        uploaded image itself, not the canvas that is still loading it) or ``other``."""
        skip = (gr.skip(),) * 5
        session, tok, task = request.session_hash or "", int(v["token"] or 0), v["task"]
        if source == "upload" and v["uploaded"] is None:
            yield skip  # the upload was refused; its error is on the page
            return
        image = None
        if task != "text":
            image = v["uploaded"] if source == "upload" else (v["canvas"] or {}).get("composite")
        if is_live and (
            not v["live_on"] or (source == "canvas" and task == "text") or (task != "text" and image is None)
        ):
            yield skip  # live rendering is off, or there is nothing to render yet: not an error
            return
        if is_live and not live.settle(session, tok):
            yield skip
            return
        logger.debug("studio: %s render (%s) token %d", "live" if is_live else "asked-for", source, tok)
        gone = threading.Event()  # the page went away (Gradio closed this generator)

        def superseded() -> bool:
            return gone.is_set() or (is_live and not live.is_newest(session, tok))

        try:
            inputs = _inputs(v, task, image)
        except UserError as e:
            yield gr.skip(), gr.skip(), _error(e), gr.skip(), gr.skip()
            return
        events: queue.Queue[tuple[str, Any]] = queue.Queue()

        def work() -> None:
            try:
                out = studio.render(
                    inputs, on_preview=lambda img: events.put(("preview", img)), superseded=superseded
                )
                events.put(("done", out))
            except Superseded:
                events.put(("superseded", None))
            except UserError as e:
                events.put(("error", _error(e)))
            except Exception as e:  # the page shows it; the log has the traceback; the app keeps serving
                logger.exception("studio: render failed")
                events.put(
                    ("error", _error(f"render failed ({type(e).__name__}: {e}); see the studio's log"))
                )

        threading.Thread(target=work, name="studio-render", daemon=True).start()
        try:
            while True:
                kind, value = events.get()
                # Images go to the page as files of their own: Gradio caches a PIL image under the hash of
                # its bytes with a plain write, which races when two renders give the same image.
                if kind == "preview":
                    preview = studio.save_png(value, "previews", f"{next(preview_ids):06d}-preview")
                    yield str(preview), "TAESD preview · the full VAE is decoding…", "", gr.skip(), gr.skip()
                elif kind == "done":
                    image = studio.save_png(value.image, "renders", f"{value.render_id:06d}-{value.task}")
                    used = str(value.input_path) if value.input_path else None
                    yield str(image), _status(value, studio), "", value.command, used
                    return
                elif kind == "error":
                    yield gr.skip(), gr.skip(), value, gr.skip(), gr.skip()
                    return
                else:
                    yield skip
                    return
        finally:
            gone.set()

    def on_upload(path: str | None) -> tuple[Any, str, Any]:
        """A checked upload onto the canvas (and into ``uploaded``, which the next render uses)."""
        if not path:
            return gr.skip(), "", None
        try:
            img = for_canvas(read_upload(path, "upload", studio.max_upload_bytes))
        except UserError as e:
            return gr.skip(), _error(e), None
        # A file, not the PIL image, for the canvas (see the render's note on Gradio's cache) and for the
        # page's state (a path keeps per-page state small however many pages are open).
        saved = str(studio.save_png(img, "uploads", f"{next(upload_ids):06d}-upload"))
        return {"background": saved, "layers": [], "composite": saved}, "", saved

    def on_task(task: str) -> tuple[Any, ...]:
        return (
            gr.update(visible=task != "text"),  # ControlNet scale
            gr.update(visible=task == "edit"),  # strength
            gr.update(visible=task == "edit"),  # canny
        )

    def on_model(backend: str, section: str) -> str:
        """Load the chosen model now (once), so a backend the bundle lacks is reported at once."""
        try:
            m = studio.model_for(backend or None, None if section in (None, DEFAULT_SECTION) else section)
        except UserError as e:
            return _error(e)
        logger.info("studio: page switched to %s %s", m.backend, m.section)
        return ""

    style_names = [NO_STYLE, *sorted(styles())]
    with gr.Blocks(title="sdkiln studio", analytics_enabled=False) as app:
        gr.Markdown(_header(studio), elem_id="studio-header")
        token = gr.Number(value=0, precision=0, visible=False, elem_id="studio-token")
        uploaded = gr.State(None)  # the path of the page's last accepted upload, as put on the canvas
        with gr.Row():
            with gr.Column(scale=1):
                canvas = gr.ImageEditor(
                    label="Sketch (draw here, or upload a sketch or photo)",
                    elem_id="studio-canvas",
                    type="pil",
                    image_mode="RGB",
                    sources=(),
                    brush=gr.Brush(default_size=6, colors=["#000000"], color_mode="fixed"),
                    eraser=gr.Eraser(default_size=20),
                    layers=False,
                    transforms=(),
                    canvas_size=(512, 512),
                    format="png",
                    height=560,
                )
                upload = gr.UploadButton(
                    "Upload a sketch or photo", type="filepath", elem_id="studio-upload", size="sm"
                )
                prompt = gr.Textbox(label="Prompt", value=DEFAULT_PROMPT, elem_id="studio-prompt")
                with gr.Row():
                    task = gr.Radio(list(TASKS), value="sketch", label="Task", elem_id="studio-task")
                    style = gr.Dropdown(style_names, value=NO_STYLE, label="Style", elem_id="studio-style")
                steps = gr.Slider(
                    1, MAX_STEPS, value=d.pipe.default_steps, step=1, label="Steps", elem_id="studio-steps"
                )
                with gr.Row():
                    seed = gr.Number(value=42, precision=0, minimum=0, label="Seed", elem_id="studio-seed")
                    random_seed = gr.Button("random", elem_id="studio-random", size="sm")
                scale = gr.Slider(
                    0.0, 2.0, value=1.0, step=0.05, label="ControlNet scale", elem_id="studio-scale"
                )
                strength = gr.Slider(
                    0.05,
                    1.0,
                    value=0.6,
                    step=0.05,
                    label="Edit strength",
                    visible=False,
                    elem_id="studio-strength",
                )
                canny = gr.Checkbox(
                    value=False,
                    label="Edit: keep the structure (canny ControlNet)",
                    visible=False,
                    elem_id="studio-canny",
                )
                with gr.Row():
                    backend = gr.Dropdown(
                        list(BACKEND_KINDS), value=d.backend, label="Backend", elem_id="studio-backend"
                    )
                    section = gr.Dropdown(
                        [DEFAULT_SECTION, *studio.sections()],
                        value=DEFAULT_SECTION,
                        label="Section",
                        elem_id="studio-section",
                    )
                with gr.Row():
                    live_on = gr.Checkbox(
                        value=True, label="Live: re-render as I draw", elem_id="studio-live"
                    )
                    go = gr.Button("Render", variant="primary", elem_id="studio-render-button")
            with gr.Column(scale=1):
                out = gr.Image(
                    label="Render",
                    type="filepath",
                    format="png",
                    interactive=False,
                    elem_id="studio-render",
                    height=512,
                )
                error = gr.Markdown("", elem_id="studio-error")
                status = gr.Markdown("Draw something, or press Render.", elem_id="studio-status")
                command = gr.Textbox(
                    label="Same image from the command line", interactive=False, elem_id="studio-command"
                )
                used = gr.File(
                    label="The input image as rendered (PNG)", interactive=False, elem_id="studio-input"
                )

        named = {
            "token": token,
            "canvas": canvas,
            "prompt": prompt,
            "style": style,
            "task": task,
            "steps": steps,
            "seed": seed,
            "scale": scale,
            "strength": strength,
            "canny": canny,
            "backend": backend,
            "section": section,
            "live_on": live_on,
            "uploaded": uploaded,
        }
        by_component = {comp: name for name, comp in named.items()}
        outputs = [out, status, error, command, used]
        slots: dict[str, Any] = {"concurrency_id": "render", "concurrency_limit": concurrency}
        quick: dict[str, Any] = {"concurrency_limit": None, "show_progress": "hidden"}

        def chain(trigger: Any, is_live: bool, source: str = "other") -> None:
            # Gradio passes a set of inputs as one {component: value} dict.
            def fn(values: dict[Any, Any], request: gr.Request) -> Iterator[tuple]:
                v = {by_component[comp]: value for comp, value in values.items()}
                yield from render(is_live, source, v, request)

            # "multiple" on both steps: the page sends every request (by default it drops one while the
            # previous is pending); the tokens make the newest win.
            trigger(mark, None, token, trigger_mode="multiple", **quick).then(
                fn,
                set(named.values()),
                outputs,
                show_progress="minimal",
                show_progress_on=out,  # not on the error box, the status or the command
                trigger_mode="multiple",
                **slots,
            )

        chain(canvas.change, is_live=True, source="canvas")  # strokes, undo, clear
        for comp in (task, style, seed, canny, live_on):
            chain(comp.change, is_live=True)
        for comp in (steps, scale, strength):
            chain(comp.release, is_live=True)
        chain(go.click, is_live=False)
        chain(prompt.submit, is_live=False)

        # Setting the canvas from the server fires no change event: an upload renders by itself.
        chain(
            upload.upload(on_upload, upload, [canvas, error, uploaded], **quick).then,
            is_live=True,
            source="upload",
        )
        random_seed.click(lambda: secrets.randbelow(2**31), None, seed, **quick)
        task.change(on_task, task, [scale, strength, canny], **quick)
        for comp in (backend, section):
            comp.change(
                on_model,
                [backend, section],
                error,
                concurrency_id="load",
                concurrency_limit=1,
                show_progress="hidden",
            )
    app.queue(max_size=queue_size, default_concurrency_limit=concurrency)
    return app


def page_style() -> dict[str, Any]:
    """``launch()`` keywords for the page's look (Gradio 6 takes theme and CSS there). System fonts: the
    default theme would fetch web fonts, and the studio makes no request beyond its own host."""
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    return {"theme": theme, "css": CSS}


def _inputs(v: dict[str, Any], task: str, image: Any) -> RenderInputs:
    """The page's values as RenderInputs; a UserError naming a field the page sent empty or malformed."""

    def number(name: str, kind: type, label: str) -> Any:
        try:
            return kind(v[name])
        except (TypeError, ValueError) as e:
            raise UserError(f"{label}: enter a number (got {v[name]!r})") from e

    return RenderInputs(
        task=task,
        prompt=v["prompt"] or "",
        image=image,
        style=None if v["style"] in (None, NO_STYLE) else v["style"],
        steps=number("steps", int, "steps"),
        seed=number("seed", int, "seed"),
        conditioning_scale=number("scale", float, "ControlNet scale"),
        strength=number("strength", float, "edit strength"),
        control="canny" if v["canny"] else None,
        backend=v["backend"] or None,
        section=None if v["section"] in (None, DEFAULT_SECTION) else v["section"],
    )


def _error(e: Exception | str) -> str:
    return f"⚠ {e}"
