"""Studio fixtures: a studio over the tiny LCM bundle (in-process for the engine tests; ``sdkiln studio``
as a subprocess on a free 127.0.0.1 port for the browser tests), and headless Chromium.

The browser is Debian's ``chromium`` (``make test`` installs it with apt-get; Playwright's own browser
download is not reachable here), driven by Playwright. Where it is missing the browser tests *fail*,
saying how to install it, unless ``SDKILN_NO_BROWSER=1`` opts out (then they skip, saying so).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("SDKILN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",  # containers often give /dev/shm 64 MB: the renderer crashes there
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@dataclass
class StudioServer:
    url: str
    process: subprocess.Popen
    log: Path
    tmpdir: Path  # the server's TMPDIR: everything it writes to a temp folder lands here

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.log_text(), flags=re.MULTILINE))

    def rss_kib(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) of the server process in KiB."""
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines()
        )
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_serving(server: StudioServer, timeout: float = 120.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(
                f"sdkiln studio exited with {server.process.returncode}:\n{server.log_text()}"
            )
        if "studio: serving" in server.log_text():
            with urllib.request.urlopen(server.url, timeout=10) as r:  # noqa: S310 (our own local server)
                assert r.status == 200
            return
        time.sleep(0.2)
    raise AssertionError(f"sdkiln studio did not start within {timeout:.0f} s:\n{server.log_text()}")


@pytest.fixture(scope="module")
def studio_server(tiny_lcm_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StudioServer]:
    """``sdkiln studio --model <tiny LCM bundle> --backend auto`` on a free 127.0.0.1 port."""
    pytest.importorskip("gradio", reason="the studio needs the studio extra (make install has it)")
    root = tmp_path_factory.mktemp("studio-server")
    tmpdir = root / "tmp"
    tmpdir.mkdir()
    log = root / "studio.log"
    port = _free_port()
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "sdkiln.stages.cli",
        "studio",
        "--model",
        str(tiny_lcm_bundle),
        "--port",
        str(port),
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = StudioServer(f"http://127.0.0.1:{port}", proc, log, tmpdir)
    try:
        _wait_until_serving(server)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # Stopped: its temp folder (uploads, inputs, Gradio's files) is gone, and nothing else was left
    # (but `.ses`: onnxruntime 1.32 writes its 51-byte session id there when it is imported).
    left = sorted(p.name for p in tmpdir.iterdir() if p.name != ".ses")
    assert left == [], f"sdkiln studio left {left} in its TMPDIR"


def _browser_or_fail() -> str:
    if os.environ.get("SDKILN_NO_BROWSER"):
        pytest.skip("SDKILN_NO_BROWSER is set: the studio's browser tests are opted out")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"no Chromium at {CHROMIUM}: run `make browser` (apt-get install chromium), point "
            "SDKILN_CHROMIUM at a Chromium binary, or set SDKILN_NO_BROWSER=1 to skip the browser tests"
        )
    try:
        import playwright  # noqa: F401
    except ImportError:
        pytest.fail("the browser tests need playwright: make install (the dev extra has it)")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Debian Chromium driven by Playwright (no network beyond 127.0.0.1 is used)."""
    executable = _browser_or_fail()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()
