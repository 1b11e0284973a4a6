"""Small test-only stages that exercise the engine through the same paths as the model stages.

They are loaded into real `sdkiln` processes through SDKILN_STAGE_PLUGINS, and every run appends a line
to the file named by SDKILN_TEST_LOG, so tests can count what actually ran.
"""

from __future__ import annotations

import os
import time
from typing import Literal

from pydantic import Field

from sdkiln.runtime.contract.layout import Kind
from sdkiln.stages.engine.core import Stage, StageContext, StageParams


def _log(event: str) -> None:
    path = os.environ.get("SDKILN_TEST_LOG")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{event}\n".encode())
        finally:
            os.close(fd)


class WriteParams(StageParams):
    text: str
    repeat: int = Field(default=1, ge=1, le=1_000_000)
    sleep: float = Field(default=0.0, ge=0, le=60)
    mode: Literal["plain", "upper"] = "plain"


def run_write(ctx: StageContext) -> None:
    _log(f"start {ctx.step_id}")
    p: WriteParams = ctx.params
    body = (p.text.upper() if p.mode == "upper" else p.text) * p.repeat
    out = ctx.out_dir / "data" / "text.txt"
    out.parent.mkdir()
    with open(out, "w") as f:
        half = len(body) // 2
        f.write(body[:half])
        f.flush()
        time.sleep(p.sleep)  # a kill -9 lands here in the crash test: half a file on disk
        f.write(body[half:])
    ctx.metrics["chars"] = len(body)
    _log(f"done {ctx.step_id}")


class ConcatParams(StageParams):
    sep: str = "+"
    nbits: int = Field(default=8, ge=1, le=8)


def run_concat(ctx: StageContext) -> None:
    _log(f"start {ctx.step_id}")
    parts = [(ctx.inputs[n].path / "data" / "text.txt").read_text() for n in ("a", "b") if n in ctx.inputs]
    (ctx.out_dir / "data").mkdir()
    (ctx.out_dir / "data" / "text.txt").write_text(ctx.params.sep.join(parts))
    ctx.components["concat"] = {"inputs": [{"name": "a", "dtype": "str", "shape": [1]}], "outputs": []}
    _log(f"done {ctx.step_id}")


class ReportParams(StageParams):
    pass


def run_report(ctx: StageContext) -> None:
    _log(f"start {ctx.step_id}")
    text = (ctx.inputs["report"].path / "data" / "text.txt").read_text()
    (ctx.out_dir / "summary.txt").write_text(f"{len(text)} chars\n")
    _log(f"done {ctx.step_id}")


class FailParams(StageParams):
    message: str = "boom"


def run_fail(ctx: StageContext) -> None:
    (ctx.out_dir / "partial.bin").write_bytes(b"x" * 10)
    raise RuntimeError(ctx.params.message)


STAGES = {
    "t_write": Stage(
        name="t_write",
        version="1",
        inputs={},
        output_kind=Kind.DATA,
        params=WriteParams,
        run=run_write,
    ),
    "t_concat": Stage(
        name="t_concat",
        version="1",
        inputs={"a": (Kind.DATA,), "b": (Kind.DATA,)},
        optional_inputs=frozenset({"b"}),
        output_kind=Kind.DATA,
        params=ConcatParams,
        run=run_concat,
        bundle_dir=lambda p: "concat",
    ),
    "t_summarize": Stage(
        name="t_summarize",
        version="1",
        inputs={"report": (Kind.REPORT,)},
        output_kind=Kind.REPORT,
        params=ReportParams,
        run=run_report,
    ),
    "t_fail": Stage(
        name="t_fail", version="1", inputs={}, output_kind=Kind.DATA, params=FailParams, run=run_fail
    ),
}
