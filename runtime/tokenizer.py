"""CLIP BPE tokenization with the ``tokenizers`` library, from a bundle's ``vocab.json`` + ``merges.txt``.

Produces the ids transformers' ``CLIPTokenizer`` produces (NFC, whitespace collapsed, lower case; CLIP's
pre-tokenization regex; byte-level BPE with ``</w>`` word ends; ``<|startoftext|>`` ... ``<|endoftext|>``),
padded and truncated the way diffusers' pipelines call it
(``padding="max_length", max_length=77, truncation=True``)::

    tok = ClipTokenizer.from_folder(Path("bundle/onnx/fp32/tokenizer"))
    ids = tok.encode(["a red sports car"])  # int32 (1, 77)

Prompts longer than the limit are cut with a warning naming the part that was dropped, as diffusers does.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdkiln.runtime.contract.errors import UserError

logger = logging.getLogger(__name__)

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# CLIP's pre-tokenization: special tokens, English contractions, runs of letters, single digits, runs of
# anything else that is not whitespace.
_CLIP_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


@dataclass(frozen=True)
class TokenizerSettings:
    """What the tokenizer folder's config says (or the family defaults when only vocab/merges exist)."""

    pad_token: str = EOS
    max_length: int = 77


class ClipTokenizer:
    """CLIP tokenizer over a vocabulary and merge list; ``encode`` returns padded int32 ids."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], settings: TokenizerSettings):
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        for token in (BOS, EOS, settings.pad_token):
            if token not in vocab:
                raise UserError(f"tokenizer: {token!r} is not in the vocabulary ({len(vocab)} tokens)")
        tok = Tokenizer(
            BPE(
                vocab=vocab,
                merges=merges,
                continuing_subword_prefix="",
                end_of_word_suffix="</w>",
                fuse_unk=False,
                unk_token=EOS,
            )
        )
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_CLIP_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        # Special tokens typed into a prompt stay single tokens, as in transformers. That includes the pad
        # token: with SD 2.x's "!" pad, "!!" is two "!" tokens there, not the BPE token "!!</w>".
        specials = dict.fromkeys([BOS, EOS, settings.pad_token])
        tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
        self._tok = tok
        self.settings = settings
        self.bos_id = vocab[BOS]
        self.eos_id = vocab[EOS]
        self.pad_id = vocab[settings.pad_token]
        self.vocab_size = len(vocab)

    @classmethod
    def from_folder(cls, folder: Path, default_pad_token: str = EOS) -> ClipTokenizer:
        """Read ``vocab.json`` and ``merges.txt`` (and, when present, the pad token and length limit from
        ``tokenizer_config.json`` / ``special_tokens_map.json``) from ``folder``."""
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
        for p in (vocab_path, merges_path):
            if not p.is_file():
                raise UserError(
                    f"tokenizer: {p} is missing (a CLIP tokenizer needs vocab.json and merges.txt)"
                )
        try:
            vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
            lines = merges_path.read_text(encoding="utf-8").splitlines()
        except (OSError, ValueError) as e:
            raise UserError(f"tokenizer: cannot read {folder}: {e}") from e
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise UserError(f"tokenizer: {merges_path} has malformed lines, e.g. {' '.join(bad[0])!r}")
        return cls(vocab, merges, _settings(folder, default_pad_token))  # type: ignore[arg-type]

    def tokenize(self, text: str) -> list[int]:
        """Ids of ``text`` without start/end tokens, padding or truncation."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode(self, prompts: list[str]) -> np.ndarray:
        """int32 (len(prompts), max_length): ``<|startoftext|>`` ids ``<|endoftext|>`` then padding."""
        n = self.settings.max_length
        out = np.full((len(prompts), n), self.pad_id, dtype=np.int32)
        for row, prompt in enumerate(prompts):
            ids = self.tokenize(prompt)
            if len(ids) > n - 2:
                # The decoder maps bytes back; CLIP's word-end marks become spaces, as in transformers.
                dropped = " ".join(self._tok.decode(ids[n - 2 :]).replace("</w>", " ").split())
                logger.warning(
                    "The following part of your input was truncated because CLIP can only handle sequences up "
                    "to %d tokens: %s",
                    n,
                    dropped,
                )
                ids = ids[: n - 2]
            seq = [self.bos_id, *ids, self.eos_id]
            out[row, : len(seq)] = seq
        return out


def _settings(folder: Path, default_pad_token: str) -> TokenizerSettings:
    pad, max_length = default_pad_token, 77
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise UserError(f"tokenizer: {path} is not valid JSON ({e})") from e
        token = data.get("pad_token")
        if isinstance(token, dict):  # the AddedToken form
            token = token.get("content")
        if isinstance(token, str):
            pad = token
        limit = data.get("model_max_length")
        # transformers writes a huge sentinel when there is no limit; CLIP's is 77.
        if isinstance(limit, int) and 0 < limit <= 4096:
            max_length = limit
    return TokenizerSettings(pad_token=pad, max_length=max_length)
