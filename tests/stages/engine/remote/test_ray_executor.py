"""`sdkiln build --executor ray` on a local Ray cluster (one per session) with the S3 test server."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

PARALLEL = """
name: chain
steps:
  - id: a
    stage: r_write
    params: {text: "alpha", repeat: 3, sleep: 3}
  - id: b
    stage: r_write
    params: {text: "beta", sleep: 3}
  - id: joined
    stage: r_concat
    inputs: {a: a, b: b}
    params: {sep: "|"}
  - id: mac
    stage: r_macos
    params: {text: "from a mac"}
"""


def _events(sdk, kind: str) -> dict[str, list[str]]:
    return {e.split()[1]: e.split()[2:] for e in sdk.events() if e.startswith(kind + " ")}


def _payload(bundle: Path) -> dict[str, dict]:
    """The bundle's file table without the manifest's own measurements (durations differ run to run)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    return manifest["files"]


def test_ray_build_equals_local_build_runs_in_parallel_and_places_by_resource(sdk, s3, ray_address, tmp_path):
    recipe = sdk.recipe("chain", PARALLEL)
    # This Linux machine cannot run the macos step locally (the build refuses it before any work), so
    # the local reference is the same recipe without it; the Ray cluster offers a fake macos resource.
    here = sdk.recipe("chain_here", PARALLEL.split("  - id: mac")[0])
    local = sdk.run("--artifacts", str(tmp_path / "local"), "build", str(here))
    local_bundle = Path(local.stdout.strip())
    sdk.log.unlink()

    url = s3.bucket()
    out = sdk.run("build", str(recipe), "--executor", "ray", "--address", ray_address, "--remote", url)
    bundle = Path(out.stdout.strip())
    sdk.run("verify", str(bundle))
    assert sorted(sdk.started()) == ["a", "b", "joined", "mac"]

    # Identical to the local executor's bundle: every payload file, and the lock (keys and digests).
    def concat(files: dict) -> dict:
        return {k: v for k, v in files.items() if k.startswith("concat/")}

    assert concat(_payload(bundle)) == concat(_payload(local_bundle)) != {}
    ray_lock = json.loads((bundle / "build.lock.json").read_text())
    local_lock = json.loads((local_bundle / "build.lock.json").read_text())
    assert {k: v for k, v in ray_lock["steps"].items() if k != "mac"} == local_lock["steps"]
    assert sdk.tree(bundle / "concat") == sdk.tree(local_bundle / "concat")
    # a and b are independent: with 2 CPUs their 3 s stages overlap in time.
    start, done = _events(sdk, "start"), _events(sdk, "done")
    assert float(start["b"][-1]) < float(done["a"][0]) and float(start["a"][-1]) < float(done["b"][0])
    # The macos step asked for (and got) the macos resource; the others did not.
    assert json.loads(start["mac"][2]).get("macos") == 1.0
    assert "macos" not in json.loads(start["a"][2])
    # The driver got everything through the remote: its own cache holds only what the bundle needs.
    assert s3.assert_entries_whole(url) == 4
    driver_entries = [p for p in (sdk.artifacts / "cache").iterdir() if not p.name.startswith(".")]
    assert len(driver_entries) == 2  # concat and macos are the bundle's parts

    # A second driver with a clean cache (and clean worker caches) runs nothing.
    sdk.wipe_local()
    again = sdk.run("build", str(recipe), "--executor", "ray", "--address", ray_address, "--remote", url)
    assert len(sdk.started()) == 4 and again.stderr.count("HIT (remote)") == 4
    assert _payload(Path(again.stdout.strip())) == _payload(bundle)

    # A flipped byte in the remote is found by the worker, named in the driver's log, and rebuilt.
    key = json.loads((bundle / "build.lock.json").read_text())["steps"]["b"]["key"]
    sha = json.loads(s3.objects(url)[f"entries/{key}.json"])["files"]["data/text.txt"]["sha256"]
    blob = bytearray(s3.objects(url)[f"cas/{sha[:2]}/{sha}"])
    blob[0] ^= 0x01
    s3.put(url, f"cas/{sha[:2]}/{sha}", bytes(blob))
    sdk.wipe_local()
    fixed = sdk.run("build", str(recipe), "--executor", "ray", "--address", ray_address, "--remote", url)
    assert "MISS (remote entry corrupt: changed data/text.txt (sha256 mismatch))" in fixed.stderr
    assert sdk.started()[4:] == ["b"]
    assert _payload(Path(fixed.stdout.strip())) == _payload(bundle)
    assert s3.assert_entries_whole(url) == 4


def test_a_step_no_node_can_run_fails_up_front_naming_what_is_missing(sdk, s3, ray_address):
    recipe = sdk.recipe(
        "needs",
        """
        name: needs
        steps:
          - {id: plain, stage: r_write, params: {text: "x"}}
          - {id: engine, stage: r_tensorrt, params: {text: "x"}}
          - {id: cuda, stage: r_gpu, params: {text: "x"}}
          - {id: huge, stage: r_big, params: {text: "x"}}
        """,
    )
    url = s3.bucket()
    t0 = time.monotonic()
    out = sdk.run(
        "build", str(recipe), "--executor", "ray", "--address", ray_address, "--remote", url, check=2
    )
    assert time.monotonic() - t0 < 60, "refused up front, not after waiting for a node"
    assert "3 step(s) cannot run on this Ray cluster" in out.stderr
    assert "step engine (r_tensorrt) needs tensorrt=1 (largest on a node: none)" in out.stderr
    assert "step cuda (r_gpu) needs GPU=1 (largest on a node: none)" in out.stderr
    assert "step huge (r_big) needs memory=65536.0GiB" in out.stderr
    assert "plain" not in out.stderr.split("cannot run")[1]
    assert "Traceback" not in out.stderr
    assert sdk.started() == [] and s3.objects(url) == {}


def test_executor_ray_requires_a_pushing_remote(sdk):
    recipe = sdk.recipe("chain", PARALLEL)
    out = sdk.run("build", str(recipe), "--executor", "ray", check=2)
    assert "--executor ray needs a remote cache: the workers exchange artifacts only through it" in out.stderr
    (sdk.root / "r").mkdir()
    out = sdk.run(
        "build",
        str(recipe),
        "--executor",
        "ray",
        "--remote",
        str(sdk.root / "r"),
        "--no-remote-push",
        check=2,
    )
    assert "drop --no-remote-push" in out.stderr


def test_a_worker_killed_mid_step_leaves_the_remote_whole_and_the_step_reruns(sdk, s3, ray_address):
    recipe = sdk.recipe(
        "chain",
        """
        name: chain
        steps:
          - {id: a, stage: r_write, params: {text: "alpha"}}
          - {id: slow, stage: r_write, params: {text: "beta", repeat: 100000, sleep: 4}}
          - {id: joined, stage: r_concat, inputs: {a: a, b: slow}, params: {}}
        """,
    )
    url = s3.bucket()
    proc = sdk.popen("build", str(recipe), "--executor", "ray", "--address", ray_address, "--remote", url)
    deadline = time.monotonic() + 90
    while "slow" not in _events(sdk, "start"):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    time.sleep(0.5)  # inside the stage, half of its file written
    victim = int(_events(sdk, "start")["slow"][0])
    os.kill(victim, signal.SIGKILL)  # a Ray worker process of the test's own cluster
    # While the rerun is underway, whatever the remote holds is whole (the killed step pushed nothing).
    s3.assert_entries_whole(url)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    starts = [e.split() for e in sdk.events() if e.startswith("start slow ")]
    assert len(starts) == 2 and int(starts[1][2]) != victim, "Ray reran the step in another worker"
    assert s3.assert_entries_whole(url) == 3
    sdk.run("verify", stdout.strip())
    text = (Path(stdout.strip()) / "concat" / "data" / "text.txt").read_text()
    assert text == "alpha+" + "beta" * 100000
