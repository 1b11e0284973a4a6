"""Fixtures for engine tests: real `sdkiln` processes with the test-only stages plugged in."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

SUPPORT = Path(__file__).resolve().parents[2] / "support"


@dataclass
class Sdk:
    root: Path
    artifacts: Path
    log: Path

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(SUPPORT) + os.pathsep + env.get("PYTHONPATH", "")
        env["SDKILN_STAGE_PLUGINS"] = "stages_for_tests:STAGES"
        env["SDKILN_ARTIFACTS"] = str(self.artifacts)
        env["SDKILN_TEST_LOG"] = str(self.log)
        return env

    def cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "sdkiln.stages.cli", *args]

    def run(self, *args: str, check: int | None = 0) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            self.cmd(*args), env=self.env, cwd=self.root, capture_output=True, text=True, timeout=120
        )
        if check is not None:
            assert proc.returncode == check, (
                f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            self.cmd(*args),
            env=self.env,
            cwd=self.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def recipe(self, name: str, body: str) -> Path:
        path = self.root / f"{name}.yaml"
        path.write_text(textwrap.dedent(body).lstrip())
        return path

    def events(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def started(self) -> list[str]:
        return [e.split()[1] for e in self.events() if e.startswith("start ")]


@pytest.fixture
def sdk(tmp_path: Path) -> Sdk:
    return Sdk(root=tmp_path, artifacts=tmp_path / "artifacts", log=tmp_path / "runs.log")
