"""``serve``: load the bundle once, build the page, serve it until Ctrl-C / SIGTERM.

    serve("artifacts/tiny", backend="auto", host="127.0.0.1", port=7860)

Everything the studio and Gradio write (uploads, the inputs as rendered, served files) goes into one
temp folder, removed when the studio stops.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.studio.engine import MAX_UPLOAD_BYTES, Studio

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_gradio() -> None:
    """A UserError saying how to install the studio extra when gradio is missing."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise UserError("the studio needs gradio: pip install 'sdkiln[studio]'")


def serve(
    model: str,
    backend: str = "auto",
    section: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    provider: str = "auto",
    concurrency: int = 2,
    queue_size: int = 32,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
) -> None:
    """Load the bundle once, then serve the page until interrupted (Ctrl-C or SIGTERM)."""
    check_gradio()
    saved = {k: os.environ.get(k) for k in ("GRADIO_TEMP_DIR", "GRADIO_ANALYTICS_ENABLED")}
    with tempfile.TemporaryDirectory(prefix="sdkiln-studio-") as tmp:
        workdir = Path(tmp)
        # Gradio writes uploads and the files it serves under GRADIO_TEMP_DIR (default /tmp/gradio,
        # shared by every app); keep them in this studio's own temp folder, removed when it stops.
        # Gradio reads some of it at import, so it is set before gradio is imported.
        os.environ["GRADIO_TEMP_DIR"] = str(workdir / "gradio")
        os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # offline, and no telemetry from a local tool
        try:
            # The model first: a bundle or backend problem is reported before the slow gradio import.
            studio = Studio(
                model, backend, section, workdir=workdir, provider=provider, max_upload_bytes=max_upload_bytes
            )
            from sdkiln.runtime.studio.app import build_app, page_style

            app = build_app(studio, concurrency=concurrency, queue_size=queue_size)
            _launch_and_wait(app, studio, host, port, max_upload_bytes, page_style())
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _launch_and_wait(
    app: Any, studio: Studio, host: str, port: int, max_upload_bytes: int, style: dict[str, Any]
) -> None:
    if host not in LOOPBACK:
        logger.warning("studio: listening on %s: anyone who can reach this address can use it", host)
    if threading.current_thread() is threading.main_thread():
        # A plain SIGTERM would skip removing the temp folder; make it a KeyboardInterrupt.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        app.launch(
            server_name=host,
            server_port=port,
            max_file_size=max_upload_bytes,
            quiet=True,
            show_error=False,
            ssr_mode=False,
            prevent_thread_lock=True,
            **style,
        )
    except OSError as e:
        raise UserError(f"cannot serve on {host}:{port} ({e}); choose another --port") from e
    logger.info("studio: serving http://%s:%d (Ctrl-C stops)", f"[{host}]" if ":" in host else host, port)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
        logger.info("studio: stopped (%d renders served)", studio.renders)
