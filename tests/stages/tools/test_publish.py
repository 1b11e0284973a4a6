"""Publishing bundles to the loopback Hub: one verified commit, idempotence, conflicts, crashes, tags."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from sdkiln.runtime.contract.errors import UserError, VerifyError
from sdkiln.runtime.contract.manifest import read_bundle_manifest
from sdkiln.stages.tools.publish.card import render_model_card
from sdkiln.stages.tools.publish.cli import add_publish_parser
from sdkiln.stages.tools.publish.commit import PublishConflictError, PublishVerifyError, publish_bundle

REPO = "sdkiln-test/tiny"
import hub_server  # noqa: E402  (tests/support)


def history(hub, repo_id: str = REPO, rev: str = "main") -> list:
    with hub.state.lock:
        repo = hub.state.repos[repo_id]
        return hub.state.history(repo, hub.state.resolve(repo, rev))


def requests_since(hub, n: int) -> list[tuple[str, str]]:
    with hub.state.lock:
        return list(hub.state.requests[n:])


def expected_paths(bundle: Path) -> set[str]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return set(manifest["files"]) | {"manifest.json", "README.md"}


def test_publish_is_one_verified_commit_then_tag(hub, make_bundle):
    bundle = make_bundle()
    result = publish_bundle(bundle, REPO, endpoint=hub.endpoint, tag="v1", private=True)

    assert result.committed and result.tag_created and not result.dry_run
    assert hub.state.repos[REPO].private
    commits = history(hub)
    assert [c.title for c in commits] == ["sdkiln: publish tiny", "initial commit"]
    assert commits[0].id == result.commit
    assert hub.state.repos[REPO].tags == {"v1": result.commit}

    remote = hub.state.commit_files(REPO, "v1")
    assert set(remote) == expected_paths(bundle) | {".gitattributes"}
    manifest = json.loads((bundle / "manifest.json").read_text())
    for rel, meta in manifest["files"].items():
        entry = remote[rel]
        assert entry.size == meta["size"]
        if entry.lfs_sha256 is not None:  # weights went through LFS with the manifest's sha256
            assert entry.lfs_sha256 == meta["sha256"]
    assert remote["onnx/fp32/unet/model.onnx"].lfs_sha256 is not None
    assert remote["manifest.json"].content == (bundle / "manifest.json").read_bytes()

    # The commit was made against the head read before it, and the tag only after the tree was read back.
    methods = [(m, p) for m, p in hub.state.requests if "/commit/" in p or "/tree/" in p or "/tag/" in p]
    kinds = [p.split("/")[5] for _, p in methods]
    assert kinds == ["tree", "commit", "tree", "tag"]


def test_republishing_unchanged_bundle_makes_no_commit(hub, make_bundle):
    bundle = make_bundle()
    first = publish_bundle(bundle, REPO, endpoint=hub.endpoint, tag="v1")
    n = len(hub.state.requests)

    again = publish_bundle(bundle, REPO, endpoint=hub.endpoint, tag="v1")

    assert not again.committed and not again.changed
    assert again.commit == first.commit and not again.tag_created
    assert len(history(hub)) == 2
    writes = [(m, p) for m, p in requests_since(hub, n) if m == "PUT" or "/commit/" in p or "/tag/" in p]
    assert writes == []


def test_changed_bundle_uploads_only_the_diff_and_deletes_stale_files(hub, make_bundle):
    publish_bundle(make_bundle(), REPO, endpoint=hub.endpoint)
    n = len(hub.state.requests)
    rebuilt = make_bundle(variant=1, sections=("onnx/fp32", "onnx/int8"))  # new int8 UNet, no Core ML

    result = publish_bundle(rebuilt, REPO, endpoint=hub.endpoint)

    actions = {f.path: f.action for f in result.files}
    assert actions["onnx/int8/unet/model.onnx"] == "update"
    assert actions["onnx/fp32/unet/model.onnx"] == "unchanged"
    assert any(p.startswith("coreml/") for p in result.deletions)
    puts = [p for m, p in requests_since(hub, n) if m == "PUT"]
    assert len(puts) == 1  # only the new int8 UNet's bytes travelled
    remote = hub.state.commit_files(REPO)
    assert set(remote) == expected_paths(rebuilt) | {".gitattributes"}
    assert len(history(hub)) == 3


def test_dry_run_reports_the_plan_and_writes_nothing(hub, make_bundle, capsys):
    bundle = make_bundle()
    parser = argparse.ArgumentParser(prog="sdkiln")
    add_publish_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["publish", str(bundle), "--repo-id", REPO, "--endpoint", hub.endpoint, "--dry-run", "--no-parity"]
    )

    assert args.func(args) == 0

    out = capsys.readouterr().out
    assert REPO not in hub.state.repos  # not even created
    assert all(m == "GET" for m, _ in hub.state.requests)
    for rel in expected_paths(bundle):
        assert f"add       {rel}" in out
    assert "does not exist yet" in out

    publish_bundle(bundle, REPO, endpoint=hub.endpoint)
    rebuilt = make_bundle(variant=1)
    n = len(hub.state.requests)
    result = publish_bundle(rebuilt, REPO, endpoint=hub.endpoint, dry_run=True, tag="v2")
    assert [f.path for f in result.uploads] == ["manifest.json", "onnx/int8/unet/model.onnx"]
    assert all(m == "GET" for m, _ in requests_since(hub, n))
    assert len(history(hub)) == 2 and hub.state.repos[REPO].tags == {}


def test_concurrent_commit_makes_publish_fail_cleanly(hub, make_bundle):
    publish_bundle(make_bundle(), REPO, endpoint=hub.endpoint)
    injected = []

    def someone_else_commits(repo_id: str, revision: str) -> None:
        if not injected:  # after this publish read the head, before it commits
            injected.append(hub.state.push_direct(repo_id, "notes.txt", b"hello", title="someone else"))

    hub.state.hooks.on_preupload = someone_else_commits
    with pytest.raises(PublishConflictError, match="moved while publishing") as err:
        publish_bundle(make_bundle(variant=1), REPO, endpoint=hub.endpoint, tag="v2")

    assert err.value.exit_code == 1
    assert [c.title for c in history(hub)][:2] == ["someone else", "sdkiln: publish tiny"]
    assert hub.state.repos[REPO].tags == {}


def test_two_publishes_racing_one_wins_one_conflicts(hub, make_bundle):
    publish_bundle(make_bundle(), REPO, endpoint=hub.endpoint)
    barrier = threading.Barrier(2, timeout=20)
    # Both publishes have read the same head before either commits.
    hub.state.hooks.on_preupload = lambda repo_id, rev: barrier.wait()
    outcomes: dict[int, object] = {}

    def publish(variant: int) -> None:
        try:
            outcomes[variant] = publish_bundle(make_bundle(variant=variant), REPO, endpoint=hub.endpoint)
        except Exception as e:  # collected and checked below
            outcomes[variant] = e

    threads = [threading.Thread(target=publish, args=(v,)) for v in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    errors = [o for o in outcomes.values() if isinstance(o, Exception)]
    wins = [o for o in outcomes.values() if not isinstance(o, Exception)]
    assert len(wins) == 1 and len(errors) == 1, outcomes
    assert isinstance(errors[0], PublishConflictError)
    assert len(history(hub)) == 3  # initial, first publish, the winner: nothing interleaved
    assert history(hub)[0].id == wins[0].commit


def test_publish_killed_midway_then_rerun_ends_with_one_commit(hub, make_bundle, tmp_path):
    bundle = make_bundle()
    hub.state.create_repo(REPO)
    stalled = threading.Event()
    release = threading.Event()
    stored_before_kill: list[str] = []

    def stall_after_first_upload(repo_id: str, oid: str) -> None:
        with hub.state.lock:
            first = not stored_before_kill
            if first:
                stored_before_kill.append(oid)
        if first:
            return
        stalled.set()
        release.wait(30)
        raise hub_server.HubError(500, "client went away")  # the upload never completes

    hub.state.hooks.on_lfs_put = stall_after_first_upload
    script = textwrap.dedent(
        f"""
        from sdkiln.stages.tools.publish.commit import publish_bundle
        publish_bundle({str(bundle)!r}, {REPO!r}, endpoint={hub.endpoint!r}, tag="v1")
        """
    )
    # HF_TOKEN is the fixture's; Xet is off as in the fixture.
    env = {**os.environ, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert stalled.wait(30), "the publish never reached its second upload"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        release.set()
    deadline = time.monotonic() + 10  # the upload that got through is stored by its server thread
    while stored_before_kill[0] not in hub.state.lfs and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(history(hub)) == 1  # killed before its commit: the repo is untouched
    assert hub.state.repos[REPO].tags == {}

    hub.state.hooks.on_lfs_put = None
    n = len(hub.state.requests)
    result = publish_bundle(bundle, REPO, endpoint=hub.endpoint, tag="v1")

    assert [c.title for c in history(hub)] == ["sdkiln: publish tiny", "initial commit"]
    assert set(hub.state.commit_files(REPO, "v1")) == expected_paths(bundle) | {".gitattributes"}
    assert result.tag_created
    reuploaded = [p.rsplit("/", 1)[-1] for m, p in requests_since(hub, n) if m == "PUT"]
    assert stored_before_kill[0] not in reuploaded  # the blob that made it is not sent again


def test_commit_that_does_not_hold_the_bundle_is_caught_before_tagging(hub, make_bundle, monkeypatch):
    bundle = make_bundle()
    original = hub.state.make_commit

    def drop_a_file(repo, parent, files, title, message=""):
        files = {p: e for p, e in files.items() if p != "onnx/fp32/tokenizer/vocab.json"}
        return original(repo, parent, files, title, message)

    monkeypatch.setattr(hub.state, "make_commit", drop_a_file)
    hub.state.create_repo(REPO)
    with pytest.raises(PublishVerifyError, match="missing: onnx/fp32/tokenizer/vocab.json"):
        publish_bundle(bundle, REPO, endpoint=hub.endpoint, tag="v1")
    assert hub.state.repos[REPO].tags == {}


def test_existing_tag_with_other_content_is_refused_before_committing(hub, make_bundle):
    publish_bundle(make_bundle(), REPO, endpoint=hub.endpoint, tag="v1")
    n_commits = len(history(hub))
    with pytest.raises(UserError, match="tag 'v1' already exists") as err:
        publish_bundle(make_bundle(variant=1), REPO, endpoint=hub.endpoint, tag="v1")
    assert err.value.exit_code == 2
    assert len(history(hub)) == n_commits


def test_bundle_that_does_not_match_its_manifest_is_not_published(hub, make_bundle):
    bundle = make_bundle()
    (bundle / "onnx/int8/unet/model.onnx").write_bytes(b"\0tampered")
    (bundle / "stray.txt").write_text("not in the manifest")
    with pytest.raises(VerifyError) as err:
        publish_bundle(bundle, REPO, endpoint=hub.endpoint)
    assert "changed: onnx/int8/unet/model.onnx" in str(err.value)
    assert "extra:   stray.txt" in str(err.value)
    assert hub.state.requests == []


def test_token_comes_from_env_and_is_never_logged(hub, make_bundle, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    publish_bundle(make_bundle(), REPO, endpoint=hub.endpoint, tag="v1")
    assert f"Bearer {hub.token}" in hub.state.auth_headers
    captured = capsys.readouterr()
    assert hub.token not in caplog.text + captured.out + captured.err


def test_wrong_token_is_a_clear_user_error(hub, make_bundle, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(UserError, match="not authorized") as err:
        publish_bundle(make_bundle(), REPO, endpoint=hub.endpoint)
    assert "hf_wrong" not in str(err.value)


def test_hf_endpoint_is_honoured_when_no_endpoint_is_given(hub, make_bundle, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    result = publish_bundle(make_bundle(), REPO, endpoint=None)
    assert result.endpoint == hub.endpoint and result.committed


def test_create_pr_leaves_main_alone(hub, make_bundle):
    publish_bundle(make_bundle(), REPO, endpoint=hub.endpoint)
    main_before = history(hub)[0].id
    result = publish_bundle(make_bundle(variant=1), REPO, endpoint=hub.endpoint, create_pr=True)
    assert result.pr_url and result.pr_url.endswith("/discussions/1")
    assert history(hub)[0].id == main_before
    pr_files = hub.state.commit_files(REPO, "refs/pr/1")
    assert (
        pr_files["onnx/int8/unet/model.onnx"].lfs_sha256
        != hub.state.commit_files(REPO)["onnx/int8/unet/model.onnx"].lfs_sha256
    )
    with pytest.raises(UserError, match="--tag with --create-pr"):
        publish_bundle(make_bundle(), REPO, endpoint=hub.endpoint, create_pr=True, tag="v1")


def test_model_card_describes_the_bundle(make_bundle):
    from huggingface_hub import ModelCard

    bundle = make_bundle()
    manifest = read_bundle_manifest(bundle)
    recipe = (bundle / "recipe.yaml").read_text()
    licenses = {
        "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
        "latent-consistency/lcm-lora-sdv1-5": None,
    }
    text = render_model_card(manifest, REPO, recipe, upstream_license=licenses)
    assert text == render_model_card(manifest, REPO, recipe, upstream_license=licenses)  # deterministic

    card = ModelCard(text)
    data = card.data.to_dict()
    assert data["library_name"] == "sdkiln"
    assert data["pipeline_tag"] == "text-to-image"
    assert data["base_model"] == ["runwayml/stable-diffusion-v1-5", "latent-consistency/lcm-lora-sdv1-5"]
    assert data["base_model_relation"] == "quantized"  # the int8 section
    assert data["license"] == "creativeml-openrail-m"  # the base model's
    assert {"onnx", "coreml", "lcm", "controlnet", "controlnet-scribble", "quantized"} <= set(data["tags"])
    body = card.text
    assert f"sdkiln run sketch --model {REPO}@main --backend onnx --image sketch.png" in body
    base_row = "| [runwayml/stable-diffusion-v1-5](/runwayml/stable-diffusion-v1-5) | base | `" + "1" * 40
    assert base_row + "` | creativeml-openrail-m |" in body
    lora_row = (
        "| [latent-consistency/lcm-lora-sdv1-5](/latent-consistency/lcm-lora-sdv1-5) | lora.0 | `" + "3" * 40
    )
    assert lora_row + "` | unknown |" in body
    # Per-component rows: size of the component folder, bits per weight and parity from the metrics.
    unet_fp32 = sum(m.size for r, m in manifest.files.items() if r.startswith("onnx/fp32/unet/"))
    assert (
        f"| unet | `unet/model.onnx` | fp32 | {unet_fp32 / 1e6:.2f} MB | 32* | parity.max_abs=2.1e-06 |"
        in body
    )
    assert "| unet | `unet/model.onnx` | int8 |" in body and "| 8 | parity.sqnr_db=31.5 |" in body
    assert "| unet | `packages/Unet.mlpackage` | fp16 |" in body and "parity.psnr_db=48.2" in body
    assert "## Recipe" in body and "stage: export_onnx" in body

    explicit = ModelCard(render_model_card(manifest, REPO, recipe, license="mit", upstream_license=licenses))
    assert explicit.data.license == "mit"


def test_license_is_read_from_the_base_models_card_at_its_pinned_commit(hub, make_bundle):
    hub.state.create_repo("runwayml/stable-diffusion-v1-5")
    card = b"---\nlicense: creativeml-openrail-m\n---\n# SD 1.5\n"
    pinned = hub.state.push_direct("runwayml/stable-diffusion-v1-5", "README.md", card)
    hub.state.push_direct(
        "runwayml/stable-diffusion-v1-5", "README.md", card.replace(b"creativeml", b"changed")
    )

    publish_bundle(make_bundle(base_sha=pinned), REPO, endpoint=hub.endpoint)

    readme = hub.state.commit_files(REPO)["README.md"].content.decode()
    assert "license: creativeml-openrail-m" in readme  # the pinned commit's card, not the branch head's
    assert "License: `creativeml-openrail-m` (the base model's)." in readme

    # Without the base repo on the endpoint the license is unknown, and said so.
    publish_bundle(make_bundle(), "sdkiln-test/other", endpoint=hub.endpoint)
    readme = hub.state.commit_files("sdkiln-test/other")["README.md"].content.decode()
    assert "\nlicense:" not in readme and "License: unknown" in readme


def test_server_refuses_lfs_upload_with_wrong_content(hub):
    import httpx2

    oid = "0" * 64
    assert httpx2.put(f"{hub.endpoint}/_lfs/x/y/{oid}", content=b"abc").status_code == 403  # unsigned
    r = httpx2.put(f"{hub.endpoint}/_lfs/x/y/{oid}?sig={hub.sign(oid)}", content=b"abc")
    assert r.status_code == 400  # signed, but the bytes are not the object
    assert hub.state.lfs == {}
