"""Test-only stages for the remote cache and Ray executor tests (loaded through SDKILN_STAGE_PLUGINS).

Every run appends ``start <step> <pid> <ray node id or -> <assigned resources as JSON>`` and
``done <step> <unix time>`` lines to the file named by SDKILN_TEST_LOG, so a test can see what ran,
where, with which resources, and whether two steps overlapped in time.
"""

from __future__ import annotations

import json
import os
import time

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


def _where() -> tuple[str, str]:
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            return ctx.get_node_id(), json.dumps(ctx.get_assigned_resources(), sort_keys=True).replace(
                " ", ""
            )
    except ImportError:
        pass
    return "-", "{}"


class WriteParams(StageParams):
    text: str
    repeat: int = Field(default=1, ge=1, le=1_000_000)
    sleep: float = Field(default=0.0, ge=0, le=60)


def run_write(ctx: StageContext) -> None:
    node, resources = _where()
    _log(f"start {ctx.step_id} {os.getpid()} {node} {resources} {time.time():.3f}")
    p: WriteParams = ctx.params
    out = ctx.out_dir / "data" / "text.txt"
    out.parent.mkdir()
    body = p.text * p.repeat
    with open(out, "w") as f:
        f.write(body[: len(body) // 2])
        f.flush()
        time.sleep(p.sleep)  # a SIGKILL lands here in the worker-kill test
        f.write(body[len(body) // 2 :])
    # The same bytes in every entry: one blob on the remote, listed by many manifests.
    (ctx.out_dir / "data" / "note.txt").write_text("written by r_write\n")
    _log(f"done {ctx.step_id} {time.time():.3f}")


class ConcatParams(StageParams):
    sep: str = "+"


def run_concat(ctx: StageContext) -> None:
    node, resources = _where()
    _log(f"start {ctx.step_id} {os.getpid()} {node} {resources} {time.time():.3f}")
    parts = [(ctx.inputs[n].path / "data" / "text.txt").read_text() for n in sorted(ctx.inputs)]
    (ctx.out_dir / "data").mkdir()
    (ctx.out_dir / "data" / "text.txt").write_text(ctx.params.sep.join(parts))
    _log(f"done {ctx.step_id} {time.time():.3f}")


def _write_stage(name: str, needs: frozenset[str] = frozenset(), bundle: str | None = None) -> Stage:
    return Stage(
        name=name,
        version="1",
        inputs={},
        output_kind=Kind.DATA,
        params=WriteParams,
        run=run_write,
        needs=needs,
        bundle_dir=lambda p: bundle,
    )


STAGES = {
    "r_write": _write_stage("r_write"),
    "r_concat": Stage(
        name="r_concat",
        version="1",
        inputs={"a": (Kind.DATA,), "b": (Kind.DATA,)},
        optional_inputs=frozenset({"b"}),
        output_kind=Kind.DATA,
        params=ConcatParams,
        run=run_concat,
        bundle_dir=lambda p: "concat",
    ),
    "r_macos": _write_stage("r_macos", frozenset({"macos"}), bundle="macos"),
    "r_tensorrt": _write_stage("r_tensorrt", frozenset({"tensorrt"})),
    "r_gpu": _write_stage("r_gpu", frozenset({"gpu"})),
    "r_big": _write_stage("r_big", frozenset({"memory:64TiB"})),
}
