"""The shared remote cache on a local S3 server (moto) and a shared folder, through real `sdkiln` runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CHAIN = """
# Build: sdkiln build chain.yaml --remote s3://bucket/cache
name: chain
steps:
  - id: a
    stage: r_write
    params: {text: "alpha", repeat: 3}
  - id: b
    stage: r_write
    params: {text: "beta"}
  - id: joined
    stage: r_concat
    inputs: {a: a, b: b}
    params: {sep: "|"}
"""


def _lock(sdk) -> dict:
    return json.loads((sdk.artifacts / "chain" / "build.lock.json").read_text())


def _step_lines(stderr: str) -> dict[str, str]:
    """{step: its final log line} from a build's stderr."""
    out = {}
    for line in stderr.splitlines():
        parts = line.split()
        if line.startswith("[") and len(parts) > 3 and "running..." not in line:
            out[parts[1]] = line
    return out


def test_push_wipe_pull_runs_nothing_and_bundle_is_byte_identical(sdk, s3):
    url = s3.bucket()
    recipe = sdk.recipe("chain", CHAIN)
    first = sdk.run("build", str(recipe), "--remote", url)
    assert sorted(sdk.started()) == ["a", "b", "joined"]
    assert first.stderr.count("remote: pushed") == 3
    bundle = Path(first.stdout.strip())
    before = sdk.tree(bundle)
    assert s3.assert_entries_whole(url) == 3
    assert "locks/chain.json" in s3.objects(url)

    sdk.wipe_local()
    plan = sdk.run("plan", str(recipe), "--remote", url).stdout
    assert [line.split()[2:4] for line in plan.splitlines()] == [["HIT", "(remote)"]] * 3
    second = sdk.run("build", str(recipe), "--remote", url)
    assert sorted(sdk.started()) == ["a", "b", "joined"], "the second build must run no stage"
    lines = _step_lines(second.stderr)
    assert all("HIT (remote)" in lines[s] for s in ("a", "b", "joined")), second.stderr
    assert "3 pulled from the remote" in second.stderr
    sdk.run("verify", str(bundle))
    assert sdk.tree(bundle) == before, "the pulled bundle must match the first one byte for byte"
    plan = sdk.run("plan", str(recipe), "--remote", url).stdout
    assert [line.split()[2:4] for line in plan.splitlines()] == [["HIT", "(local)"]] * 3


def test_flipped_byte_in_a_remote_blob_is_a_miss_named_in_the_log_and_rebuilt(sdk, s3):
    url = s3.bucket()
    recipe = sdk.recipe("chain", CHAIN)
    sdk.run("build", str(recipe), "--remote", url)
    b = json.loads(s3.objects(url)[f"entries/{_lock(sdk)['steps']['b']['key']}.json"])
    sha = b["files"]["data/text.txt"]["sha256"]
    blob = f"cas/{sha[:2]}/{sha}"
    data = bytearray(s3.objects(url)[blob])
    data[0] ^= 0x01
    s3.put(url, blob, bytes(data))

    sdk.wipe_local()
    out = sdk.run("build", str(recipe), "--remote", url)
    assert "remote entry corrupt: changed data/text.txt (sha256 mismatch)" in out.stderr
    assert sdk.started()[3:] == ["b"], "only the step whose entry is corrupt runs; its output is identical"
    lines = _step_lines(out.stderr)
    assert "HIT (remote)" in lines["a"] and "HIT (remote)" in lines["joined"] and "MISS" in lines["b"]
    sdk.run("verify", str(sdk.artifacts / "chain"))
    assert s3.assert_entries_whole(url) == 3, "the rebuild re-pushed the blob"

    sdk.wipe_local()
    again = sdk.run("build", str(recipe), "--remote", url)
    assert len(sdk.started()) == 4 and again.stderr.count("HIT (remote)") == 3


def test_partial_or_foreign_remote_entries_are_misses(sdk, s3):
    url = s3.bucket()
    recipe = sdk.recipe("chain", CHAIN)
    sdk.run("build", str(recipe), "--remote", url)
    keys = {s: v["key"] for s, v in _lock(sdk)["steps"].items()}
    entry_a = json.loads(s3.objects(url)[f"entries/{keys['a']}.json"])
    sha = entry_a["files"]["data/text.txt"]["sha256"]
    s3.delete(url, f"cas/{sha[:2]}/{sha}")  # a's blob is gone: a partial entry
    s3.put(url, f"entries/{keys['b']}.json", json.dumps(entry_a).encode())  # b's manifest is a's

    sdk.wipe_local()
    plan = sdk.run("plan", str(recipe), "--remote", url).stdout.splitlines()
    assert "remote entry belongs to another key" in plan[1]
    out = sdk.run("build", str(recipe), "--remote", url)
    assert "remote entry partial: missing data/text.txt" in out.stderr
    assert sorted(sdk.started()[3:]) == ["a", "b"]
    assert s3.assert_entries_whole(url) == 3


def test_no_remote_push_only_pulls(sdk, s3):
    url = s3.bucket()
    recipe = sdk.recipe("chain", CHAIN)
    out = sdk.run("build", str(recipe), "--remote", url, "--no-remote-push")
    assert "read-only" in out.stderr and "pushed" not in out.stderr
    assert s3.objects(url) == {}
    # Someone else pushes a build; the read-only user pulls it.
    other = sdk.root / "other"
    sdk.run("--artifacts", str(other), "build", str(recipe), "--remote", url)
    sdk.wipe_local()
    (sdk.root / "sdkiln.toml").write_text(f'[remote]\nurl = "{url}"\npush = false\n')
    before = s3.objects(url)
    out = sdk.run("build", str(recipe))
    assert out.stderr.count("HIT (remote)") == 3 and "sdkiln.toml, read-only" in out.stderr
    assert s3.objects(url) == before, "a read-only user uploads nothing, not even the lock"


def test_project_config_file_and_its_errors(sdk, s3):
    url = s3.bucket()
    recipe = sdk.recipe("chain", CHAIN)
    sub = sdk.root / "sub"
    sub.mkdir()
    (sdk.root / "sdkiln.toml").write_text(f'[remote]\nurl = "{url}"\n')
    sdk.run("build", str(recipe))  # found in the working directory's parent chain
    assert s3.assert_entries_whole(url) == 3
    out = sdk.run("build", str(recipe), "--no-remote")
    assert "remote cache" not in out.stderr
    (sdk.root / "sdkiln.toml").write_text(f'[remote]\nurl = "{url}"\npush = "sometimes"\nurk = 1\n')
    bad = sdk.run("plan", str(recipe), check=2)
    assert "sdkiln.toml: 2 problem(s)" in bad.stderr
    assert "remote.push: Input should be a valid boolean" in bad.stderr
    assert "remote.urk: Extra inputs are not permitted" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_shared_folder_remote_and_gc(sdk, tmp_path):
    shared = tmp_path / "shared-cache"
    recipe = sdk.recipe("chain", CHAIN)
    sdk.run("build", str(recipe), "--remote", str(shared))
    sdk.run("build", str(recipe), "steps.a.params.text=omega", "--remote", str(shared))
    entries = sorted(p.name for p in (shared / "entries").iterdir())
    assert len(entries) == 5  # a, b, joined, and the new a and joined
    assert not [p for p in shared.rglob("*") if ".tmp-" in p.name]

    dry = sdk.run("gc", "--remote", str(shared), "--dry-run", "--keep-hours", "0").stdout
    assert "would remove 2 unreferenced entries" in dry
    assert sorted(p.name for p in (shared / "entries").iterdir()) == entries, "a dry run removes nothing"
    young = sdk.run("gc", "--remote", str(shared), "--dry-run").stdout
    assert "would remove 0 unreferenced entries" in young, "entries built within --keep-hours are kept"
    sdk.run("gc", "--remote", str(shared), "--keep-hours", "0")
    assert len(list((shared / "entries").iterdir())) == 3
    blobs = sorted(p.name for p in (shared / "cas").rglob("*") if p.is_file())
    assert len(blobs) == 4  # omega's and beta's text, the join, and the note every r_write shares

    sdk.wipe_local()
    out = sdk.run("build", str(recipe), "steps.a.params.text=omega", "--remote", str(shared))
    assert out.stderr.count("HIT (remote)") == 3, "gc kept everything the latest lock refers to"


def test_gc_refuses_without_any_pushed_lock(sdk, tmp_path):
    shared = tmp_path / "empty-cache"
    shared.mkdir()
    out = sdk.run("gc", "--remote", str(shared), check=2)
    assert "no build lock has been pushed there yet" in out.stderr


def test_credentials_never_appear_in_output_files_or_the_remote(sdk, s3):
    url = s3.bucket()
    secret = s3.env["AWS_SECRET_ACCESS_KEY"]
    recipe = sdk.recipe("chain", CHAIN)
    outputs = [
        sdk.run("-v", "build", str(recipe), "--remote", url),
        sdk.run("-v", "plan", str(recipe), "--remote", url),
        sdk.run("-v", "gc", "--remote", url, "--dry-run"),
    ]
    # A URL carrying a password is refused, and the refusal does not repeat it.
    bad = sdk.run("build", str(recipe), "--remote", "s3://AKIDEXAMPLE:hunter2hunter2@bucket/x", check=2)
    assert "hunter2hunter2" not in bad.stderr + bad.stdout
    assert "s3://AKIDEXAMPLE:***@bucket/x" in bad.stderr and "carries a password" in bad.stderr
    # A backend error that would echo the secret is redacted.
    s3_bad = sdk.run("build", str(recipe), "--remote", "s3://no-such-bucket-here/x", check=2)
    outputs.append(s3_bad)
    assert "bucket 'no-such-bucket-here' not found" in s3_bad.stderr
    for proc in outputs:
        assert secret not in proc.stdout + proc.stderr
    for path in sdk.artifacts.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    for name, data in s3.objects(url).items():
        assert secret.encode() not in data, name


def test_redact_strips_url_passwords_queries_and_known_secrets(monkeypatch):
    from sdkiln.stages.engine.remote import redact, redact_url

    assert (
        redact_url("https://user:pw@host.example/p?X-Amz-Signature=abc") == "https://user:***@host.example/p"
    )
    assert redact_url("s3://bucket/prefix") == "s3://bucket/prefix"
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEJr")
    msg = "403 for https://u:p4ss@hub/api?token=x with hf_abcdefghijklmnop and FwoGZXIvYXdzEJr"
    assert redact(msg) == "403 for https://u:***@hub/api with *** and ***"


def test_a_push_that_dies_before_its_manifest_leaves_no_entry(tmp_path, monkeypatch):
    """Files first, manifest last: a push cut off before the manifest is invisible to every reader."""
    from sdkiln.stages.engine.cache import Cache
    from sdkiln.stages.engine.remote import FsspecStore, RemoteCache, open_remote

    cache = Cache(tmp_path / "artifacts")
    key = "ab" * 32
    tmp = cache.new_temp(key)
    (tmp / "weights.bin").write_bytes(b"\0" * 1000)
    (tmp / "config.json").write_text("{}")
    entry = cache.commit(
        key, tmp, {"kind": "test", "stage": "t", "stage_version": "1", "step": "s", "recipe": "r"}
    )

    remote = open_remote(str(tmp_path / "remote"))
    real_put = FsspecStore._put

    def put_then_die(self, src, path):
        if path.startswith("entries/"):
            raise ConnectionError("network gone")
        real_put(self, src, path)

    monkeypatch.setattr(FsspecStore, "_put", put_then_die)
    assert remote.push(entry) is False
    monkeypatch.setattr(FsspecStore, "_put", real_put)
    assert len(list((tmp_path / "remote" / "cas").rglob("*.*"))) == 0  # no temp files left
    assert remote.fetch_manifest(key) == (None, "not in remote cache")
    other = Cache(tmp_path / "elsewhere")
    with other.lock(key):
        assert remote.pull(other, key) == (None, "not in remote cache")
    assert remote.push(entry) is True
    with other.lock(key):
        pulled, why = RemoteCache(remote.store).pull(other, key)
    assert why == "pulled from remote cache" and pulled.digest == entry.digest


@pytest.mark.parametrize(
    "rel",
    ["../escape.txt", "/etc/passwd", "a/../../b", "manifest.json"],
    ids=["dotdot", "abs", "nested", "mf"],
)
def test_a_remote_manifest_with_unsafe_paths_is_refused(rel):
    from sdkiln.runtime.contract.digest import digest_of
    from sdkiln.stages.engine.remote import check_manifest

    files = {rel: {"sha256": "0" * 64, "size": 1}}
    data = json.dumps({"key": "k", "files": files, "digest": digest_of(files)}).encode()
    manifest, why = check_manifest("k", data)
    assert manifest is None and "unsafe path" in why
