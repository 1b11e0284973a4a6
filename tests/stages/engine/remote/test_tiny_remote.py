"""Acceptance on the real tiny recipe (minutes: opt in with ``-m slow``).

Build recipes/tiny.yaml with the S3 test server as remote, wipe the local cache, build again: every step
is a remote HIT, nothing runs, the bundle verifies and matches byte for byte; then the same under
``--executor ray`` on the session's Ray cluster, from clean driver and worker caches.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parents[4] / "recipes" / "tiny.yaml"
STEPS = ["base", "fused", "int8", "coreml", "coreml6", "onnx", "onnx_int8", "parity"]


def _final_lines(stderr: str) -> dict[str, str]:
    out = {}
    for line in stderr.splitlines():
        parts = line.split()
        if line.startswith("[") and len(parts) > 3 and "running..." not in line:
            out[parts[1]] = line
    return out


def _lock(bundle: Path) -> dict:
    return json.loads((bundle / "build.lock.json").read_text())["steps"]


def test_tiny_pulled_from_s3_runs_nothing_locally_and_on_ray(sdk, s3, ray_address):
    url = s3.bucket()
    first = sdk.run("build", str(TINY), "--remote", url, timeout=900)
    bundle = Path(first.stdout.strip())
    built = sdk.tree(bundle)
    assert sorted(_final_lines(first.stderr)) == sorted(STEPS)
    assert s3.assert_entries_whole(url) == len(STEPS)

    sdk.wipe_local()
    second = sdk.run("build", str(TINY), "--remote", url, timeout=300)
    lines = _final_lines(second.stderr)
    assert all("HIT (remote)" in lines[s] for s in STEPS), second.stderr
    assert "MISS" not in second.stderr, "nothing may run on the second build"
    sdk.run("verify", str(bundle))
    assert sdk.tree(bundle) == built, "the pulled bundle must match the built one byte for byte"

    sdk.wipe_local()
    third = sdk.run(
        "build", str(TINY), "--executor", "ray", "--address", ray_address, "--remote", url, timeout=300
    )
    lines = _final_lines(third.stderr)
    assert all("HIT (remote)" in lines[s] for s in STEPS), third.stderr
    sdk.run("verify", str(bundle))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {k: v for k, v in sdk.tree(bundle).items() if k != "manifest.json"} == {
        k: v for k, v in built.items() if k != "manifest.json"
    }, "the Ray executor's bundle has the same files, byte for byte"
    assert manifest["files"] == json.loads(built["manifest.json"])["files"]


def test_tiny_built_from_scratch_on_ray(sdk, s3, ray_address, tmp_path):
    """Every step runs on the cluster (fresh remote, fresh caches) and gives the same bytes as a local
    build: same keys, same digests, same bundle files (the build is reproducible across cache roots)."""
    local = sdk.run("--artifacts", str(tmp_path / "local"), "build", str(TINY), timeout=900)
    url = s3.bucket()
    out = sdk.run(
        "build", str(TINY), "--executor", "ray", "--address", ray_address, "--remote", url, timeout=900
    )
    lines = _final_lines(out.stderr)
    assert all("MISS" in lines[s] for s in STEPS), out.stderr
    bundle = Path(out.stdout.strip())
    sdk.run("verify", str(bundle))
    assert s3.assert_entries_whole(url) == len(STEPS)
    ray_lock, local_lock = _lock(bundle), _lock(Path(local.stdout.strip()))
    for step in STEPS:
        assert ray_lock[step]["key"] == local_lock[step]["key"], step
        assert ray_lock[step]["digest"] == local_lock[step]["digest"], step
    local_files = json.loads((Path(local.stdout.strip()) / "manifest.json").read_text())["files"]
    assert json.loads((bundle / "manifest.json").read_text())["files"] == local_files
