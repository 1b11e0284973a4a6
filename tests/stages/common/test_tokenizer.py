"""The vendored CLIP BPE gives the real CLIP vocabulary and tokenization."""

from __future__ import annotations

import hashlib
import json

from sdkiln.stages.common.tokenizer import BPE_PATH, VOCAB_SIZE, clip_vocab, make_tokenizer, write_vocab_files


def test_vendored_file_is_the_clip_bpe():
    data = BPE_PATH.read_bytes()
    assert len(data) == 1_356_917
    assert (
        hashlib.sha256(data).hexdigest() == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    )
    assert (BPE_PATH.parent / "LICENSE-clip-bpe.txt").is_file()


def test_vocab_layout():
    vocab = clip_vocab()
    assert len(vocab) == VOCAB_SIZE == 49408
    assert vocab["!"] == 0 and vocab["a</w>"] == 320
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


def test_tokenizes_like_the_real_clip_tokenizer():
    tok = make_tokenizer()
    # ids of openai/clip-vit-large-patch14's tokenizer for this prompt
    ids = tok("a photo of an astronaut riding a horse").input_ids
    assert ids == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]
    padded = tok("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407
    assert make_tokenizer(pad_token="!")("a", padding="max_length", max_length=5).input_ids == [
        49406,
        320,
        49407,
        0,
        0,
    ]


def test_vocab_files(tmp_path):
    vocab_path, merges_path = write_vocab_files(tmp_path)
    assert len(json.loads(vocab_path.read_text())) == 49408
    lines = merges_path.read_text().splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + 48894
