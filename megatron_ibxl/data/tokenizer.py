"""Byte-level BPE text tokenizer (GPT-2 style, 50,257 entries at full size).

Captions become `[b, L]` token ids with the end-of-text token appended, where `b` is the
number of captions and `L` the text tower's context length. A caption longer than `L - 1`
tokens is cut so that the end-of-text token still sits at position `L - 1`, since the text
tower pools there; shorter ones are padded with the end-of-text id (the `lengths` returned
with the ids tell the real tokens apart from the padding).

Two ways in: `load_tokenizer` reads a `tokenizer.json` (the `tokenizers` library format)
or a folder with GPT-2 style `vocab.json` and `merges.txt`; `train_tokenizer` learns one
from text, and `megatron-ibxl train-tokenizer` does that on the captions of shards.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron_ibxl.errors import DataError, UserError
from megatron_ibxl.logging_setup import setup_logging

logger = logging.getLogger(__name__)

EOT_TOKEN = "<|endoftext|>"
"""The end-of-text token: appended to every caption, also used as padding."""


class TextTokenizer:
    """A byte-level BPE tokenizer with an end-of-text token.

    Byte-level means every string encodes (no unknown token) and decodes back unchanged.
    """

    def __init__(self, tokenizer: Tokenizer):
        eot_id = tokenizer.token_to_id(EOT_TOKEN)
        if eot_id is None:
            raise DataError(f"tokenizer has no {EOT_TOKEN} token; train or load one that has")
        self._tokenizer = tokenizer
        self.eot_id: int = eot_id
        """Id of the end-of-text token (also the padding id)."""

    @property
    def vocab_size(self) -> int:
        """Entries in the vocabulary, special tokens included. Every id is below it."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without the end-of-text token."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; the end-of-text token is dropped."""
        return self._tokenizer.decode([int(i) for i in ids if int(i) != self.eot_id])

    def encode_batch(
        self, texts: list[str], context_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize captions for the text tower.

        Args:
            texts: b captions.
            context_length: L, tokens per caption including the end-of-text token (>= 1).

        Returns:
            tokens: int64 [b, L]; the caption's ids, cut to L - 1 if longer, then the
                end-of-text id, then end-of-text ids as padding.
            lengths: int64 [b]; real tokens per caption including end-of-text, in 1..L. The
                end-of-text token of caption i is at position lengths[i] - 1.
        """
        if context_length < 1:
            raise ValueError(f"context_length={context_length}: must be at least 1")
        tokens = torch.full((len(texts), context_length), self.eot_id, dtype=torch.long)
        lengths = torch.empty(len(texts), dtype=torch.long)
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        for row, encoding in enumerate(encodings):
            ids = encoding.ids[: context_length - 1]
            tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            lengths[row] = len(ids) + 1  # the end-of-text already fills position len(ids)
        return tokens, lengths

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as one `tokenizer.json` file (folders are created)."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._tokenizer.save(str(path))
        except Exception as exc:  # the tokenizers library raises a bare Exception
            raise UserError(
                f"cannot write the tokenizer to {path}: {exc}; give a file path in a "
                "writable folder"
            ) from exc


def _byte_level(model: models.BPE) -> Tokenizer:
    """A tokenizer around a BPE model with GPT-2's byte-level pre-tokenizer and decoder."""
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """Load a `tokenizer.json`, or a folder holding GPT-2 style `vocab.json` + `merges.txt`.

    Raises DataError naming the path when it is missing, unreadable or has no end-of-text
    token.
    """
    path = Path(path)
    if path.is_dir():
        vocab, merges = path / "vocab.json", path / "merges.txt"
        if not (vocab.is_file() and merges.is_file()):
            json_file = path / "tokenizer.json"
            if json_file.is_file():
                return load_tokenizer(json_file)
            raise DataError(
                f"data.tokenizer={path}: folder has neither vocab.json + merges.txt nor "
                "tokenizer.json"
            )
        try:
            tokenizer = _byte_level(models.BPE.from_file(str(vocab), str(merges)))
        except Exception as exc:
            raise DataError(
                f"data.tokenizer={path}: cannot read vocab.json/merges.txt: {exc}"
            ) from None
        if tokenizer.token_to_id(EOT_TOKEN) is not None:
            tokenizer.add_special_tokens([EOT_TOKEN])
    elif path.is_file():
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise DataError(f"data.tokenizer={path}: not a tokenizers JSON file: {exc}") from None
    else:
        raise DataError(f"data.tokenizer={path}: no such file or folder")
    if tokenizer.token_to_id(EOT_TOKEN) is None:
        raise DataError(f"data.tokenizer={path}: has no {EOT_TOKEN} token")
    return TextTokenizer(tokenizer)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """Learn a byte-level BPE of `vocab_size` entries (256 bytes, end-of-text, merges).

    The trainer stops early when no pair of tokens is left to merge, which happens when the
    text has few distinct words; the vocabulary is then smaller than asked (logged), and
    every id stays below `vocab_size` either way.
    """
    minimum = 256 + 1
    if vocab_size < minimum:
        raise DataError(f"--vocab-size={vocab_size}: must be at least {minimum} (bytes + eot)")
    tokenizer = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    result = TextTokenizer(tokenizer)
    if result.vocab_size < vocab_size:
        logger.debug(
            "tokenizer: merges ran out at %d entries of the %d asked (too few distinct words)",
            result.vocab_size,
            vocab_size,
        )
    return result


class _Counted:
    """Iterate over texts, counting those that hold more than white space."""

    def __init__(self, texts: Iterable[str]) -> None:
        self._texts = texts
        self.non_empty = 0

    def __iter__(self):
        for text in self._texts:
            self.non_empty += bool(text.strip())
            yield text


def run_cli(args) -> int:
    """`megatron-ibxl train-tokenizer --shards PATTERN --vocab-size N --out FILE`."""
    setup_logging()
    from megatron_ibxl.data.shards import expand_shards, iter_captions

    shards = expand_shards(args.shards)
    out = Path(args.out).resolve()
    inputs = {Path(shard).resolve() for shard in shards} | {Path(args.shards).resolve()}
    if out in inputs:
        raise UserError(
            f"--out {args.out}: is one of the inputs (--shards {args.shards}); write the "
            "tokenizer to a new file such as tokenizer.json"
        )
    captions = _Counted(iter_captions(shards))
    tokenizer = train_tokenizer(captions, args.vocab_size)
    if captions.non_empty == 0:
        raise DataError(
            f"--shards {args.shards}: no caption in {len(shards)} shards (no .txt member with "
            "text); a tokenizer needs captions to learn from"
        )
    tokenizer.save(args.out)
    if tokenizer.vocab_size < args.vocab_size:
        logger.warning(
            "tokenizer: only %d entries of the %d asked: the captions have too few distinct "
            "words; ids stay below --vocab-size, but a larger corpus gives a fuller vocabulary",
            tokenizer.vocab_size,
            args.vocab_size,
        )
    logger.info(
        "tokenizer: %d entries (eot id %d) from the captions of %d shards -> %s",
        tokenizer.vocab_size,
        tokenizer.eot_id,
        len(shards),
        args.out,
    )
    return 0
