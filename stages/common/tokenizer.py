"""The CLIP BPE tokenizer files, built from the vendored ``data/bpe_simple_vocab_16e6.txt.gz``.

Presets have random weights but must tokenize prompts exactly as the real models do, so the vocabulary
is the real one: 256 byte symbols, the same with an end-of-word mark, one token per merge, then the two
special tokens, 49,408 in all. ``vocab.json`` and ``merges.txt`` are written the way the Hugging Face
CLIP tokenizers ship them (also the names Apple's Swift package reads).

No heavy imports here: only ``save_tokenizer`` imports transformers, to write the tokenizer config files.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

BPE_PATH = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
# CLIP keeps the first 49152 - 256 - 2 merges of the file (its first line is a version header).
N_MERGES = 49152 - 256 - 2
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes, in CLIP's vocabulary order (GPT-2/CLIP byte-level BPE).

    Printable Latin-1 bytes stand for themselves and come first, in byte order; the other bytes map to
    code points from 256 upward (so no byte becomes whitespace or a control character inside a token)
    and come after them. The order matters: it fixes the ids of the first 512 tokens ("a</w>" is 320).
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


@functools.cache
def clip_merges() -> tuple[tuple[str, str], ...]:
    """The merges CLIP uses, in rank order."""
    lines = gzip.decompress(BPE_PATH.read_bytes()).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : N_MERGES + 1])
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise RuntimeError(f"{BPE_PATH} is not the CLIP BPE file (expected {N_MERGES} merge pairs)")
    return merges  # type: ignore[return-value]


@functools.cache
def clip_vocab() -> dict[str, int]:
    """The 49,408-token CLIP vocabulary: token -> id (``<|startoftext|>`` 49406, ``<|endoftext|>`` 49407)."""
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m) for m in clip_merges()]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"CLIP vocabulary has {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return vocab


def write_vocab_files(out_dir: Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_path.write_text(json.dumps(clip_vocab(), ensure_ascii=False), encoding="utf-8")
    merges_path.write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in clip_merges()) + "\n", encoding="utf-8"
    )
    return vocab_path, merges_path


def make_tokenizer(pad_token: str = EOS_TOKEN, model_max_length: int = 77):
    """A transformers ``CLIPTokenizer`` over the real CLIP vocabulary.

    ``pad_token`` is ``<|endoftext|>`` for SD 1.x and SDXL's first encoder, ``!`` for the OpenCLIP
    encoders (SD 2.x / SD-Turbo, SDXL's second encoder); see ``families.TokenizerSpec``.
    """
    from transformers import CLIPTokenizer

    # transformers 5 wants the merges as pairs, not "a b" strings.
    return CLIPTokenizer(
        vocab=dict(clip_vocab()),
        merges=list(clip_merges()),
        pad_token=pad_token,
        model_max_length=model_max_length,
    )


def save_tokenizer(out_dir: Path, pad_token: str = EOS_TOKEN, model_max_length: int = 77) -> None:
    """Save a complete tokenizer folder (config, ``tokenizer.json``, ``vocab.json``, ``merges.txt``)."""
    tok = make_tokenizer(pad_token=pad_token, model_max_length=model_max_length)
    tok.save_pretrained(str(out_dir))
    # Written by us as well: some savers emit only tokenizer.json, and Core ML / the runtime read these.
    write_vocab_files(out_dir)
