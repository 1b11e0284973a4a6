"""load_pipeline: presets, local folders, Hub pinning/selection offline, pickle refusal."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch
from pydantic import ValidationError

from sdkiln.runtime.contract.errors import UserError
from sdkiln.stages.common import hub
from sdkiln.stages.common.torch.presets import save_preset
from sdkiln.stages.load_pipeline import STAGE, LoadPipelineParams

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: connection refused at once


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"source": "hub"}, "needs 'repo'"),
        ({"source": "preset", "preset": "tiny-sd15", "repo": "a/b"}, "'repo' does not apply"),
        ({"source": "preset", "preset": "tiny-sd9"}, "unknown preset"),
        ({"source": "preset", "preset": "tiny-sd15", "family": "sdxl"}, "is family 'sd15'"),
        ({"source": "local", "path": "x", "seed": 3}, "'seed' applies to source 'preset' only"),
        (
            {"source": "hub", "repo": "a/b", "components": {"controlnet.depth": {"repo": "c/d"}}},
            "controlnet.depth",
        ),
        ({"source": "hub", "repo": "not a repo"}, "repo"),
    ],
)
def test_params_are_validated(params, match):
    with pytest.raises(ValidationError, match=match):
        LoadPipelineParams.model_validate(params)


def test_refs_name_every_hub_repo():
    p = LoadPipelineParams.model_validate(
        {
            "source": "hub",
            "repo": "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "components": {
                "controlnet.scribble": {"repo": "lllyasviel/control_v11p_sd15_scribble", "revision": "v1"}
            },
        }
    )
    assert STAGE.refs(p) == {
        "hub:base:stable-diffusion-v1-5/stable-diffusion-v1-5": "main",
        "hub:controlnet.scribble:lllyasviel/control_v11p_sd15_scribble": "v1",
    }
    assert STAGE.resolve("hub:base:a/b", "0" * 40) == "0" * 40  # a sha is already pinned: no network


def test_preset_source(make_ctx):
    ctx = make_ctx(STAGE, {"source": "preset", "preset": "tiny-sd15-controlnet", "seed": 0})
    STAGE.run(ctx)
    assert ctx.model.family == "sd15" and ctx.model.controlnets == ["canny", "scribble"]
    assert ctx.model.taesd is True and ctx.model.lcm is False
    assert ctx.model.source == {"source": "preset", "preset": "tiny-sd15-controlnet", "seed": 0}
    assert {"unet", "text_encoder", "controlnet.scribble", "taesd_decoder"} <= set(ctx.components)
    assert ctx.metrics["bytes"] > 0
    # the same seed gives byte-identical weights (so the cache can reuse everything downstream)
    again = save_preset("tiny-sd15-controlnet", ctx.work_dir / "again", seed=0)
    assert again.model.controlnets == ctx.model.controlnets
    for rel in (
        "unet/diffusion_pytorch_model.safetensors",
        "controlnet/scribble/diffusion_pytorch_model.safetensors",
    ):
        assert _sha(ctx.out_dir / rel) == _sha(ctx.work_dir / "again" / rel)


def test_local_source_round_trip(make_ctx, tiny_sdxl_dir):
    ctx = make_ctx(
        STAGE,
        {"source": "local", "path": str(tiny_sdxl_dir), "family": "sdxl", "scheduler": "lcm"},
    )
    assert STAGE.check(ctx.params, ctx.recipe_dir) == []
    STAGE.run(ctx)
    assert ctx.model.family == "sdxl" and ctx.model.lcm is True
    assert ctx.model.scheduler == "LCMScheduler"
    # weights are carried over unchanged (safetensors saving is deterministic: same bytes)
    for rel in ("unet/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"):
        assert _sha(ctx.out_dir / rel) == _sha(tiny_sdxl_dir / rel), rel
    assert ctx.model.controlnets == ["canny"] and ctx.model.taesd is True
    cn = "controlnet/canny/diffusion_pytorch_model.safetensors"
    assert _sha(ctx.out_dir / cn) == _sha(tiny_sdxl_dir / cn)
    # no config names the folder it was loaded from: the output does not depend on where it was built
    configs = [p for p in ctx.out_dir.rglob("*.json") if p.name in ("config.json", "model_index.json")]
    assert len(configs) >= 6
    assert not [p for p in configs if "_name_or_path" in p.read_text()]


def test_local_tiny_needs_family(make_ctx, tiny_sd15_dir):
    ctx = make_ctx(STAGE, {"source": "local", "path": str(tiny_sd15_dir)})
    with pytest.raises(UserError, match="set params.family"):
        STAGE.run(ctx)


def test_check_reports_missing_folder(tmp_path):
    p = LoadPipelineParams.model_validate({"source": "local", "path": "models/nope"})
    problems = STAGE.check(p, tmp_path)
    assert len(problems) == 1 and "does not exist" in problems[0]


def test_pickle_checkpoint_is_refused(make_ctx, tiny_sd15_dir, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_sd15_dir, folder, ignore=shutil.ignore_patterns("controlnet", "vae_tiny"))
    from safetensors.torch import load_file

    unet = folder / "unet"
    torch.save(
        load_file(str(unet / "diffusion_pytorch_model.safetensors")), unet / "diffusion_pytorch_model.bin"
    )
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    ctx = make_ctx(STAGE, {"source": "local", "path": str(folder), "family": "sd15"})
    with pytest.raises(UserError, match="refusing pickle checkpoint.*arbitrary code.*allow_pickle"):
        STAGE.run(ctx)
    # allowed explicitly, it loads, and what comes out is safetensors only
    ctx = make_ctx(STAGE, {"source": "local", "path": str(folder), "family": "sd15", "allow_pickle": True})
    STAGE.run(ctx)
    assert (ctx.out_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(ctx.out_dir.rglob("*.bin"))


def test_offline_hub_names_the_repo(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UserError, match="lllyasviel/control_v11p_sd15_scribble") as e:
        STAGE.resolve("hub:controlnet.scribble:lllyasviel/control_v11p_sd15_scribble", "main")
    assert e.value.exit_code == 2
    with pytest.raises(UserError, match="segmind/SSD-1B"):
        hub.list_files("segmind/SSD-1B", "0" * 40)  # what run() calls before any download


def test_offline_hub_uses_the_cached_ref(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    ref = cache / "models--a--b" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("1" * 40)
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    assert hub.resolve_revision("a/b", "main") == "1" * 40


# The public SD 1.5 repo's listing (all 36 paths; tests/support/real_repos.py serves it at tiny size).
SD15_FILES = [
    ".gitattributes",
    "README.md",
    "feature_extractor/preprocessor_config.json",
    "model_index.json",
    "safety_checker/config.json",
    "safety_checker/model.fp16.safetensors",
    "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin",
    "safety_checker/pytorch_model.fp16.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin",
    "text_encoder/pytorch_model.fp16.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.bin",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "v1-5-pruned-emaonly.ckpt",
    "v1-5-pruned-emaonly.safetensors",
    "v1-5-pruned.ckpt",
    "v1-5-pruned.safetensors",
    "v1-inference.yaml",
    "vae/config.json",
    "vae/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.fp16.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
]
FOLDERS = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]


def test_select_files_takes_only_what_is_needed():
    got = hub.select_files(SD15_FILES, FOLDERS, None, False, "r/sd")
    assert got == sorted(
        [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "tokenizer/merges.txt",
            "tokenizer/special_tokens_map.json",
            "tokenizer/tokenizer_config.json",
            "tokenizer/vocab.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
        ]
    )
    fp16 = hub.select_files(SD15_FILES, FOLDERS, "fp16", False, "r/sd")
    weights = [f for f in fp16 if hub.weight_file(f)]
    assert weights == [
        "text_encoder/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    assert hub.variant_in(fp16, "fp16") == "fp16"
    # allowing pickles changes nothing where safetensors exist
    assert hub.select_files(SD15_FILES, FOLDERS, "fp16", True, "r/sd") == fp16
    for got in (fp16, hub.select_files(SD15_FILES, FOLDERS, None, True, "r/sd")):
        assert not [f for f in got if f.endswith((".ckpt", ".bin")) or "non_ema" in f or "pruned" in f]
        assert not [f for f in got if f.startswith(("safety_checker/", "feature_extractor/"))]


def test_select_files_falls_back_per_folder():
    """fp16 asked: a folder without it takes its default weights, the others their fp16 ones."""
    files = [f for f in SD15_FILES if f != "vae/diffusion_pytorch_model.fp16.safetensors"]
    got = hub.select_files(files, FOLDERS, "fp16", False, "r/sd")
    assert "vae/diffusion_pytorch_model.safetensors" in got
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in got
    assert "unet/diffusion_pytorch_model.safetensors" not in got
    # safetensors of the default variant beat a .bin of the asked one, even with pickles allowed
    assert "vae/diffusion_pytorch_model.fp16.bin" not in hub.select_files(
        files, FOLDERS, "fp16", True, "r/sd"
    )


def test_select_files_takes_sharded_indexes():
    sharded = [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "model.fp16-00001-of-00002.safetensors",
        "model.fp16-00002-of-00002.safetensors",
        "model.safetensors.index.fp16.json",  # diffusers/transformers name of a variant's index
    ]
    # the index only: its shards are read from it (hub.fetch, shards_of)
    assert hub.select_files(sharded, None, None, False, "r/te") == [
        "config.json",
        "model.safetensors.index.json",
    ]
    assert hub.select_files(sharded, None, "fp16", False, "r/te") == [
        "config.json",
        "model.safetensors.index.fp16.json",
    ]
    assert hub.is_index("unet/diffusion_pytorch_model.safetensors.index.fp16.json")
    assert hub.is_index("unet/diffusion_pytorch_model.fp16.safetensors.index.json")  # older diffusers name
    assert hub.weight_file("text_encoder_2/model.fp16-00002-of-00002.safetensors") == (
        "model",
        "fp16",
        "safetensors",
        "shard",
    )
    assert hub.weight_file("v1-5-pruned-emaonly.safetensors") is None
    assert hub.weight_file("taesd_decoder.safetensors") is None


def test_shards_of_reads_the_index(tmp_path):
    index = tmp_path / "model.safetensors.index.fp16.json"
    index.write_text(
        '{"metadata": {}, "weight_map": {"a": "model.fp16-00001-of-00002.safetensors",'
        ' "b": "model.fp16-00002-of-00002.safetensors", "c": "model.fp16-00001-of-00002.safetensors"}}'
    )
    files = [f"te/model.fp16-0000{i}-of-00002.safetensors" for i in (1, 2)] + [
        "te/model.fp16-00001-of-00003.safetensors"
    ]
    assert hub.shards_of(index, "te/model.safetensors.index.fp16.json", files, "r/x") == files[:2]
    with pytest.raises(UserError, match="r/x: index te/x.json lists shards the repo does not have"):
        hub.shards_of(index, "te/x.json", files[:1], "r/x")
    index.write_text("{")
    with pytest.raises(UserError, match="unreadable sharded-weights index"):
        hub.shards_of(index, "te/x.json", files, "r/x")


def test_select_files_refuses_pickle_only_weights():
    files = ["config.json", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.non_ema.bin"]
    with pytest.raises(UserError, match="r/cn.*only pickle weights.*allow_pickle"):
        hub.select_files(files, None, None, False, "r/cn")
    # allowed: the default .bin, not the other variant beside it
    assert hub.select_files(files, None, None, True, "r/cn") == files[:2]
    with pytest.raises(UserError, match="r/cn: no weights found in the repo root"):
        hub.select_files(
            ["config.json", "diffusion_pytorch_model.non_ema.safetensors"], None, None, True, "r/cn"
        )


def test_custom_pipeline_class_is_refused(make_ctx, tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "MyRemoteCodePipeline", "unet": ["x", "y"]}')
    ctx = make_ctx(STAGE, {"source": "local", "path": str(folder), "family": "sd15"})
    with pytest.raises(UserError, match="'MyRemoteCodePipeline' is not one sdkiln loads"):
        STAGE.run(ctx)
