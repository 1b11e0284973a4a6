"""The engine's reliability, shown with real `sdkiln` processes and the test-only stages."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

CHAIN = """
# Build: sdkiln build chain.yaml
name: chain
description: two roots and a join
steps:
  - id: a
    stage: t_write
    params: {text: "alpha", repeat: 3}
  - id: b
    stage: t_write
    params: {text: "beta"}
  - id: joined
    stage: t_concat
    inputs: {a: a, b: b}
    params: {sep: "|"}
"""

# The same recipe with every mapping's keys in another order.
CHAIN_REORDERED = """
steps:
  - params: {repeat: 3, text: "alpha"}
    stage: t_write
    id: a
  - stage: t_write
    id: b
    params: {text: "beta"}
  - inputs: {b: b, a: a}
    params: {sep: "|"}
    id: joined
    stage: t_concat
description: two roots and a join
name: chain
"""


def _lock(sdk) -> dict:
    return json.loads((sdk.artifacts / "chain" / "build.lock.json").read_text())


def test_build_then_rebuild_runs_nothing(sdk):
    recipe = sdk.recipe("chain", CHAIN)
    first = sdk.run("build", str(recipe))
    assert sorted(sdk.started()) == ["a", "b", "joined"]
    bundle = Path(first.stdout.strip())
    assert (bundle / "concat" / "data" / "text.txt").read_text() == "alphaalphaalpha|beta"
    assert "MISS" in first.stderr
    second = sdk.run("build", str(recipe))
    assert sorted(sdk.started()) == ["a", "b", "joined"], "a second build must run no stage"
    assert second.stderr.count("HIT") == 3
    sdk.run("verify", str(bundle))


def test_reordering_yaml_keys_changes_no_key(sdk):
    sdk.run("build", str(sdk.recipe("chain", CHAIN)))
    keys = {s: v["key"] for s, v in _lock(sdk)["steps"].items()}
    sdk.run("build", str(sdk.recipe("chain", CHAIN_REORDERED)))
    assert {s: v["key"] for s, v in _lock(sdk)["steps"].items()} == keys
    assert len(sdk.started()) == 3


def test_changing_one_param_reruns_only_that_step_and_descendants(sdk):
    recipe = sdk.recipe("chain", CHAIN)
    sdk.run("build", str(recipe))
    plan = sdk.run("plan", str(recipe), "steps.b.params.text=gamma").stdout
    assert "b " in plan and "param text 'beta' → 'gamma'" in plan
    assert [line.split()[:3] for line in plan.splitlines()][0] == ["a", "t_write", "HIT"]
    sdk.run("build", str(recipe), "steps.b.params.text=gamma")
    assert sdk.started() == ["a", "b", "joined", "b", "joined"] or sorted(sdk.started()[3:]) == [
        "b",
        "joined",
    ]
    assert (sdk.artifacts / "chain" / "concat" / "data" / "text.txt").read_text() == "alphaalphaalpha|gamma"


def test_byte_identical_upstream_rebuild_reruns_nothing_downstream(sdk):
    recipe = sdk.recipe("chain", CHAIN)
    sdk.run("build", str(recipe))
    # --force reruns `a`; its output is byte-identical, so `joined` keeps its key and is a HIT.
    out = sdk.run("build", str(recipe), "--force", "a")
    assert sdk.started()[3:] == ["a"]
    assert "joined" in out.stderr and out.stderr.count("HIT") == 2


def test_only_builds_a_step_and_its_inputs_into_the_cache_and_no_bundle(sdk):
    recipe = sdk.recipe("chain", CHAIN)
    out = sdk.run("build", str(recipe), "--only", "a")
    assert sdk.started() == ["a"]
    step, path = out.stdout.strip().split("\t")
    assert step == "a" and (Path(path) / "data" / "text.txt").read_text() == "alphaalphaalpha"
    assert not (sdk.artifacts / "chain").exists(), "a partial build assembles no bundle"
    sdk.run("build", str(recipe), "--only", "joined")  # joined and the input it lacks, b
    assert sdk.started() == ["a", "b", "joined"]
    full = sdk.run("build", str(recipe))  # everything cached: the whole bundle, nothing run
    assert len(sdk.started()) == 3 and full.stderr.count("HIT") == 3
    assert (Path(full.stdout.strip()) / "concat" / "data" / "text.txt").is_file()
    bad = sdk.run("build", str(recipe), "--only", "nope", check=2)
    assert "--only nope: no such step (steps: a, b, joined)" in bad.stderr and "Traceback" not in bad.stderr


def test_kill_9_mid_stage_leaves_no_torn_entry_and_resumes(sdk):
    recipe = sdk.recipe(
        "chain",
        CHAIN.replace('params: {text: "beta"}', 'params: {text: "beta", repeat: 100000, sleep: 30}'),
    )
    proc = sdk.popen("build", str(recipe))
    deadline = time.time() + 60
    while "b" not in sdk.started():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    time.sleep(0.3)  # inside the stage, half of the file written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cache = sdk.artifacts / "cache"
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
    for e in entries:  # only `a` committed; every committed entry is whole
        assert (e / "manifest.json").is_file()
    assert len(entries) == 1
    assert any(p.name.startswith(".tmp-") for p in cache.iterdir()), "the killed step leaves only a temp dir"
    fast = recipe.read_text().replace("sleep: 30", "sleep: 0")
    recipe.write_text(fast)  # sleep is a param, so this is a new key; the old temp dir is stale either way
    out = sdk.run("build", str(recipe))
    sdk.run("verify", out.stdout.strip())
    assert not [p for p in cache.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    assert not [p for p in sdk.artifacts.iterdir() if p.name.startswith((".tmp-", ".trash-"))]


def test_flipped_byte_fails_verify_and_is_rebuilt(sdk):
    recipe = sdk.recipe("chain", CHAIN)
    sdk.run("build", str(recipe))
    key = _lock(sdk)["steps"]["b"]["key"]
    entry = sdk.artifacts / "cache" / key
    target = entry / "data" / "text.txt"
    data = bytearray(target.read_bytes())
    data[0] ^= 0x01
    target.unlink()  # the bundle hard-links the same inode: write a new file so only the cache changes
    target.write_bytes(bytes(data))
    bad = sdk.run("verify", str(entry), check=1)
    assert "changed: data/text.txt" in bad.stderr
    plan = sdk.run("plan", str(recipe)).stdout
    assert "cache entry corrupt" in plan
    sdk.run("build", str(recipe))
    assert sdk.started()[3:] == ["b"], "only the corrupt entry is rebuilt; its output is identical"
    sdk.run("verify", str(entry))
    sdk.run("verify", str(sdk.artifacts / "chain"))


def test_verify_names_missing_extra_and_changed_files_of_a_bundle(sdk):
    out = sdk.run("build", str(sdk.recipe("chain", CHAIN)))
    bundle = Path(out.stdout.strip())
    (bundle / "concat" / "data" / "text.txt").unlink()
    (bundle / "stray.bin").write_bytes(b"?")
    lock = bundle / "build.lock.json"
    lock.write_text(lock.read_text() + " ")
    bad = sdk.run("verify", str(bundle), check=1)
    assert "missing: concat/data/text.txt" in bad.stderr
    assert "extra:   stray.bin" in bad.stderr
    assert "changed: build.lock.json" in bad.stderr


def test_two_concurrent_builds_both_succeed_and_each_step_runs_once(sdk):
    recipe = sdk.recipe(
        "chain", CHAIN.replace('params: {text: "beta"}', 'params: {text: "beta", sleep: 1.5}')
    )
    procs = [sdk.popen("build", str(recipe)) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert sorted(sdk.started()) == ["a", "b", "joined"]
    sdk.run("verify", str(sdk.artifacts / "chain"))


def test_failed_stage_exits_1_and_leaves_nothing(sdk):
    recipe = sdk.recipe("boom", "name: boom\nsteps:\n  - {id: x, stage: t_fail, params: {message: kaput}}\n")
    out = sdk.run("build", str(recipe), check=1)
    assert "step x (t_fail) failed: RuntimeError: kaput" in out.stderr
    assert "Traceback" not in out.stderr
    assert not [
        p
        for p in (sdk.artifacts / "cache").iterdir()
        if not p.name.startswith(".locks") and p.name != ".hashmemo.sqlite"
    ]


def test_ls_and_gc(sdk):
    recipe = sdk.recipe("chain", CHAIN)
    sdk.run("build", str(recipe))
    sdk.run("build", str(recipe), "steps.a.params.text=omega")
    listing = sdk.run("ls").stdout
    assert listing.count("t_write") == 3 and "used by: chain" in listing
    dry = sdk.run("gc", "--dry-run").stdout
    assert "would remove 2 unreferenced entries" in dry  # the old `a` and the old `joined`
    sdk.run("gc")
    assert len([p for p in (sdk.artifacts / "cache").iterdir() if not p.name.startswith(".")]) == 3
    sdk.run("build", str(recipe), "steps.a.params.text=omega")
    assert len(sdk.started()) == 5  # nothing referenced was collected


def test_lock_records_keys_digests_and_bundle_manifest_lists_every_file(sdk):
    out = sdk.run("build", str(sdk.recipe("chain", CHAIN)))
    bundle = Path(out.stdout.strip())
    manifest = json.loads((bundle / "manifest.json").read_text())
    lock = _lock(sdk)
    assert set(lock["steps"]) == {"a", "b", "joined"}
    for step in lock["steps"].values():
        assert len(step["key"]) == 64 and len(step["digest"]) == 64
    on_disk = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert sorted([*manifest["files"], "manifest.json"]) == on_disk
    assert manifest["sections"]["concat"]["stage"] == "t_concat"
    assert manifest["sections"]["concat"]["components"]["concat"]["inputs"][0]["name"] == "a"
