"""The remote cache on a Hugging Face Hub repository (hf://), against the project's loopback Hub."""

from __future__ import annotations

import json
from pathlib import Path

import hub_server  # tests/support
import pytest

TOKEN = "hf_loopbackRemoteCacheToken42"

CHAIN = """
name: chain
steps:
  - {id: a, stage: r_write, params: {text: "alpha", repeat: 3}}
  - {id: b, stage: r_write, params: {text: "beta"}}
  - {id: joined, stage: r_concat, inputs: {a: a, b: b}, params: {sep: "|"}}
"""


@pytest.fixture
def hub(sdk, tmp_path):
    server = hub_server.HubServer(token=TOKEN).start()
    sdk.extra_env.update(
        HF_ENDPOINT=server.endpoint,
        HF_TOKEN=TOKEN,
        HF_HUB_DISABLE_XET="1",  # the loopback Hub speaks LFS, not Xet
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    sdk.extra_env.pop("HF_HUB_OFFLINE", None)
    try:
        yield server
    finally:
        server.stop()
    assert server.state.server_errors == [], "the loopback Hub hit a bug of its own"


def test_hub_repo_remote_push_wipe_pull_and_token_never_shown(sdk, hub):
    url = "hf://team/sdkiln-cache"
    recipe = sdk.recipe("chain", CHAIN)
    first = sdk.run("-v", "build", str(recipe), "--remote", url)
    assert "created private repository team/sdkiln-cache" in first.stderr
    bundle = Path(first.stdout.strip())
    before = sdk.tree(bundle)
    repo = hub.state.repos["team/sdkiln-cache"]
    head = repo.commits[repo.branches["main"]]
    assert sorted(p.split("/")[0] for p in head.files if p != ".gitattributes") == ["cas"] * 4 + [
        "entries"
    ] * 3 + ["locks"]

    sdk.wipe_local()
    plan = sdk.run("plan", str(recipe), "--remote", url).stdout
    assert [line.split()[2:4] for line in plan.splitlines()] == [["HIT", "(remote)"]] * 3
    second = sdk.run("-v", "build", str(recipe), "--remote", url)
    assert sorted(sdk.started()) == ["a", "b", "joined"], "the second build must run no stage"
    assert second.stderr.count("HIT (remote)") == 3
    assert sdk.tree(bundle) == before
    for proc in (first, second):
        assert TOKEN not in proc.stdout + proc.stderr
    for path in sdk.artifacts.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_hub_entry_whose_blob_is_served_corrupt_is_rebuilt(sdk, hub):
    url = "hf://team/sdkiln-cache"
    recipe = sdk.recipe("chain", CHAIN)
    sdk.run("build", str(recipe), "--remote", url)
    lock = json.loads((sdk.artifacts / "chain" / "build.lock.json").read_text())
    repo = hub.state.repos["team/sdkiln-cache"]
    head = repo.commits[repo.branches["main"]]
    manifest = json.loads(head.files[f"entries/{lock['steps']['b']['key']}.json"].content)
    sha = manifest["files"]["data/text.txt"]["sha256"]
    hub.state.hooks.corrupt_downloads.add(f"cas/{sha[:2]}/{sha}")  # served with a flipped byte

    sdk.wipe_local()
    out = sdk.run("build", str(recipe), "--remote", url)
    assert "remote entry corrupt: changed data/text.txt (sha256 mismatch)" in out.stderr
    assert sdk.started()[3:] == ["b"], "only the step whose download was corrupt is rebuilt"
    sdk.run("verify", str(sdk.artifacts / "chain"))


def test_hub_remote_gc_removes_unreferenced_entries_in_one_commit(sdk, hub):
    url = "hf://team/sdkiln-cache"
    recipe = sdk.recipe("chain", CHAIN)
    sdk.run("build", str(recipe), "--remote", url)
    sdk.run("build", str(recipe), "steps.a.params.text=omega", "--remote", url)
    repo = hub.state.repos["team/sdkiln-cache"]

    def entries() -> list[str]:
        return sorted(p for p in repo.commits[repo.branches["main"]].files if p.startswith("entries/"))

    assert len(entries()) == 5
    commits = len(repo.commits)
    out = sdk.run("gc", "--remote", url, "--keep-hours", "0").stdout
    assert "removed 2 unreferenced entries and 2 unused file(s)" in out  # old a's text, old join
    assert len(entries()) == 3 and len(repo.commits) == commits + 2  # entries first, then blobs
    sdk.wipe_local()
    again = sdk.run("build", str(recipe), "steps.a.params.text=omega", "--remote", url)
    assert again.stderr.count("HIT (remote)") == 3
