"""Byte-level BPE tokenizer: training to the full GPT-2 size, loading, encode_batch."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from tokenizers import pre_tokenizers

from megatron_ibxl.data.tokenizer import EOT_TOKEN, load_tokenizer, run_cli, train_tokenizer
from megatron_ibxl.data.writer import write_shard
from megatron_ibxl.errors import DataError, UserError

GPT2_VOCAB = 50257


def _random_word_corpus(num_words: int, seed: int = 0) -> list[str]:
    """Lines of pseudo-words: random lowercase strings of 3 to 10 letters.

    BPE stops when no adjacent pair is left to merge, so a corpus of natural sentences
    small enough for a unit test runs out long before 50,000 merges. Random words keep
    enough distinct letter sequences (26^2 pairs, 26^3 triples, ...) for the trainer to
    find 50,000 merges, each seen at least once, in a few seconds.
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 11, size=num_words)
    letters = rng.integers(0, 26, size=int(lengths.sum())).astype(np.uint8) + ord("a")
    text = letters.tobytes().decode("ascii")
    ends = np.cumsum(lengths)
    words = [text[end - length : end] for end, length in zip(ends, lengths)]
    return [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]


@pytest.fixture(scope="module")
def full_tokenizer():
    return train_tokenizer(_random_word_corpus(120_000), GPT2_VOCAB)


def test_trained_tokenizer_has_exactly_gpt2_size(full_tokenizer):
    # 256 byte symbols + <|endoftext|> + 50,000 merges.
    assert full_tokenizer.vocab_size == GPT2_VOCAB
    assert 0 <= full_tokenizer.eot_id < GPT2_VOCAB


def test_round_trip_of_text_outside_the_corpus(full_tokenizer):
    # Byte-level BPE encodes any string, including text the corpus never had.
    for text in ["A photo of a cat.", "naïve café, 数字 8!", "  two  spaces\tand tab\n"]:
        ids = full_tokenizer.encode(text)
        assert all(0 <= i < GPT2_VOCAB for i in ids)
        assert full_tokenizer.decode(ids) == text


def test_encode_batch_appends_eot_pads_and_truncates(full_tokenizer):
    eot = full_tokenizer.eot_id
    short, long = "a cat", " ".join(["word"] * 40)
    short_ids = full_tokenizer.encode(short)
    long_ids = full_tokenizer.encode(long)
    context = 8
    assert len(short_ids) + 1 < context < len(long_ids)

    tokens, lengths = full_tokenizer.encode_batch([short, long, ""], context)
    assert tokens.shape == (3, context) and lengths.tolist()[0] == len(short_ids) + 1
    # Short caption: ids, end-of-text, then end-of-text padding.
    expected_short = short_ids + [eot] * (context - len(short_ids))
    assert tokens[0].tolist() == expected_short
    # Long caption: the first context-1 ids, then end-of-text at position L-1.
    assert tokens[1].tolist() == long_ids[: context - 1] + [eot]
    assert lengths[1] == context
    # Empty caption: only the end-of-text token.
    assert lengths[2] == 1 and tokens[2].tolist() == [eot] * context


def test_save_and_load_tokenizer_json(full_tokenizer, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    full_tokenizer.save(path)
    loaded = load_tokenizer(str(path))
    text = "zero-shot prompts: a photo of the digit seven."
    assert loaded.vocab_size == GPT2_VOCAB
    assert loaded.encode(text) == full_tokenizer.encode(text)
    assert loaded.eot_id == full_tokenizer.eot_id


def test_train_tokenizer_refuses_to_overwrite_its_input(tmp_path):
    shard = tmp_path / "train-0000.tar"
    shard.write_bytes(b"not read: the check comes first")
    args = SimpleNamespace(shards=str(shard), vocab_size=300, out=str(shard))
    with pytest.raises(UserError, match="is one of the inputs"):
        run_cli(args)
    assert shard.read_bytes() == b"not read: the check comes first"


def test_saving_onto_a_folder_is_a_user_error(full_tokenizer, tmp_path):
    with pytest.raises(UserError, match=f"cannot write the tokenizer to {tmp_path}: .*folder"):
        full_tokenizer.save(tmp_path)


def _write_gpt2_files(folder) -> None:
    """A tiny GPT-2 style pair: the 256 byte symbols, two merges, the end-of-text token."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    vocab["ca"] = 256
    vocab["cat"] = 257
    vocab[EOT_TOKEN] = 258
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nc a\nca t\n")


def test_load_gpt2_vocab_and_merges(tmp_path):
    _write_gpt2_files(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.vocab_size == 259 and tokenizer.eot_id == 258
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    # "cat" merges to one token (c+a -> ca, ca+t -> cat); " cats" is the space byte, shown
    # as "Ġ" in the byte-level alphabet, then "cat", then "s".
    assert tokenizer.encode("cat") == [257]
    assert tokenizer.encode(" cats") == [alphabet.index("Ġ"), 257, alphabet.index("s")]
    tokens, lengths = tokenizer.encode_batch(["cat"], 4)
    assert tokens.tolist() == [[257, 258, 258, 258]] and lengths.tolist() == [2]


def test_small_corpus_stops_below_the_asked_size():
    # Ten distinct words cannot supply 1,000 merges: the vocabulary comes out smaller,
    # and every id stays below the size asked.
    tokenizer = train_tokenizer(["the digit zero one two three four"] * 50, 1024)
    assert 257 < tokenizer.vocab_size < 1024


def test_missing_tokenizer_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="data.tokenizer"):
        load_tokenizer(str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match="vocab.json"):
        load_tokenizer(str(tmp_path))


def test_gpt2_files_without_eot_are_a_data_error(tmp_path):
    _write_gpt2_files(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    del vocab[EOT_TOKEN]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(DataError, match="endoftext"):
        load_tokenizer(str(tmp_path))


def test_vocab_size_below_bytes_is_a_data_error():
    with pytest.raises(DataError, match="vocab-size"):
        train_tokenizer(["x"], 100)


def test_train_tokenizer_cli_on_shards(tmp_path):
    pixel = Image.new("RGB", (16, 16), (200, 10, 10))
    buffer = io.BytesIO()
    pixel.save(buffer, "JPEG")
    captions = ["a handwritten seven", "the digit seven", "a handwritten three"]
    samples = [
        (f"{i:04d}", {"jpg": buffer.getvalue(), "txt": c.encode()}) for i, c in enumerate(captions)
    ]
    write_shard(tmp_path / "s-0.tar", samples[:2])
    write_shard(tmp_path / "s-1.tar", samples[2:])
    out = tmp_path / "tok.json"
    args = SimpleNamespace(shards=str(tmp_path / "s-{0..1}.tar"), vocab_size=300, out=str(out))
    assert run_cli(args) == 0

    # Reference: the same captions through train_tokenizer directly.
    reference = train_tokenizer(captions, 300)
    loaded = load_tokenizer(str(out))
    assert loaded.vocab_size == reference.vocab_size
    assert loaded.encode("a handwritten seven") == reference.encode("a handwritten seven")
    # "handwritten" occurs in two captions, so a merge exists for it: fewer ids than bytes.
    assert len(loaded.encode(" handwritten")) < len(" handwritten")
