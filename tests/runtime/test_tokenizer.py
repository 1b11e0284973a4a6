"""The runtime's CLIP tokenizer gives transformers' CLIPTokenizer ids, padded and truncated as diffusers does."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.tokenizer import ClipTokenizer

pytest.importorskip(
    "transformers", reason="the reference tokenizer is transformers' CLIPTokenizer (build extra)"
)

PROMPTS = [
    "a red sports car, studio light",
    "A Lighthouse   at DUSK\n\twith  waves",
    "it's a cat's face; they're 3D-rendered (8k), 1024x768!!",
    "café naïve résumé — “quotes” and emoji 🐱🚗",
    "<|endoftext|> special tokens typed in <|startoftext|>",
    "",
    "   ",
    "numbers 1234567 and symbols #@$%^&*()_+=~`",
]
LONG = " ".join(["an extremely detailed matte painting of a castle"] * 20)


@pytest.fixture(scope="module", params=["<|endoftext|>", "!"], ids=["pad-eos", "pad-bang"])
def tokenizers_pair(request, tmp_path_factory):
    from sdkiln.stages.common.tokenizer import make_tokenizer, save_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(folder, pad_token=request.param)
    # Keep only what a Core ML bundle has, plus the config that names the pad token.
    (folder / "tokenizer.json").unlink(missing_ok=True)
    return ClipTokenizer.from_folder(folder), make_tokenizer(pad_token=request.param)


def _reference(ref, prompts):
    return np.asarray(
        ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids,
        np.int32,
    )


def test_ids_match_transformers(tokenizers_pair) -> None:
    ours, ref = tokenizers_pair
    got = ours.encode(PROMPTS)
    assert got.dtype == np.int32 and got.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(got, _reference(ref, PROMPTS))


def test_long_prompt_is_truncated_with_a_warning(tokenizers_pair, caplog) -> None:
    ours, ref = tokenizers_pair
    with caplog.at_level(logging.WARNING, logger="sdkiln.runtime.tokenizer"):
        got = ours.encode([LONG])
    np.testing.assert_array_equal(got, _reference(ref, [LONG]))
    assert got[0, -1] == ours.eos_id
    assert "truncated because CLIP can only handle sequences up to 77 tokens" in caplog.text
    assert "castle" in caplog.text


def test_pad_token_from_config_and_default(tmp_path: Path) -> None:
    from sdkiln.stages.common.tokenizer import write_vocab_files

    write_vocab_files(tmp_path)
    bare = ClipTokenizer.from_folder(tmp_path)  # vocab + merges only, as in a Core ML bundle
    assert bare.pad_id == bare.eos_id == 49407 and bare.bos_id == 49406
    turbo = ClipTokenizer.from_folder(tmp_path, default_pad_token="!")
    assert turbo.pad_id == 0


def test_missing_or_broken_files_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="vocab.json is missing"):
        ClipTokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text('{"a": 0}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(UserError, match="malformed lines"):
        ClipTokenizer.from_folder(tmp_path)
