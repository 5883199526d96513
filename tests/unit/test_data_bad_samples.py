"""Bad data: skipped or handled, counted, logged with the shard name; never a crash or hang."""

from __future__ import annotations

import io
import logging
import os

import numpy as np
import pytest
from PIL import Image

from megatron_ibxl.config import RunConfig
from megatron_ibxl.data.loader import build_train_loader
from megatron_ibxl.data.shards import build_index, index_shard
from megatron_ibxl.data.tokenizer import train_tokenizer
from megatron_ibxl.data.writer import write_shard
from megatron_ibxl.errors import DataError

SIZE = 16


def _jpeg(width: int = 24, height: int = 20, colour=(30, 120, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, "JPEG")
    return buffer.getvalue()


def _bad_huffman_jpeg() -> bytes:
    """A JPEG whose header parses and that ends with its end marker, but whose Huffman table
    is invalid: it passes the index checks and fails inside the decoder."""
    pixels = np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    table = data.index(b"\xff\xc4")  # define-Huffman-table marker
    data[table + 5 : table + 21] = b"\xff" * 16  # code counts that overflow the table
    return bytes(data)


def _good(key: str) -> tuple[str, dict[str, bytes]]:
    return key, {"jpg": _jpeg(), "txt": f"a picture {key}".encode()}


def _config(pattern: str, loader: str = "torch", micro_batch: int = 2) -> RunConfig:
    config = RunConfig()
    config.model.vision.image_size = SIZE
    config.model.text.context_length = 8
    config.data.train_shards = pattern
    config.data.micro_batch = micro_batch
    config.data.loader = loader
    config.data.num_threads = 1
    config.data.prefetch = 0
    return config


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["a picture good"], 300)


def test_each_bad_sample_is_skipped_counted_and_logged(tmp_path, caplog, tokenizer):
    jpeg = _jpeg()
    samples = [
        _good("good0"),
        ("noise", {"jpg": np.random.default_rng(1).bytes(400), "txt": b"random bytes"}),
        ("cut", {"jpg": jpeg[: len(jpeg) // 2], "txt": b"half a jpeg"}),
        ("nocaption", {"jpg": jpeg}),
        ("noimage", {"txt": b"a caption alone", "json": b"{}"}),
        ("empty", {"jpg": jpeg, "txt": b""}),
        ("blank", {"jpg": jpeg, "txt": b" \n\t "}),
        ("tiny", {"jpg": _jpeg(1, 1), "txt": b"one pixel"}),
        ("strip", {"jpg": _jpeg(10000, 50), "txt": b"a very wide strip"}),
        _good("good1"),
    ]
    shard = tmp_path / "mixed-0.tar"
    write_shard(shard, samples)
    expected = {
        "corrupt_image": ["noise", "cut"],
        "missing_caption": ["nocaption"],
        "missing_image": ["noimage"],
        "empty_caption": ["empty", "blank"],
        "too_small": ["tiny"],
        "extreme_aspect": ["strip"],
    }

    with caplog.at_level(logging.WARNING):
        index = build_index([str(shard)], min_image_side=8, max_aspect_ratio=10.0)
    assert index.shards[0].keys == ["good0", "good1"]
    by_reason = {}
    for _, key, reason in index.skipped.examples:
        by_reason.setdefault(reason, []).append(key)
    assert by_reason == expected
    assert index.skipped.by_shard == {str(shard): 8}
    assert str(shard) in caplog.text and "corrupt_image=2" in caplog.text

    # The loader trains on the two good samples only and reports the counts.
    loader = build_train_loader(_config(str(shard)), 0, 1, tokenizer)
    keys = [key for _ in range(3) for key in next(loader).keys]
    assert sorted(keys[:2]) == ["good0", "good1"] and set(keys) == {"good0", "good1"}
    assert loader.stats.samples_skipped == 8
    assert loader.stats.skipped_by_reason == {r: len(k) for r, k in expected.items()}
    loader.close()


@pytest.mark.parametrize("loader_name", ["dali", "torch"])
def test_one_pixel_and_very_wide_images_are_handled_when_allowed(tmp_path, tokenizer, loader_name):
    # With the size filters opened up, the extreme images go through the pipeline.
    shard = tmp_path / "extreme-0.tar"
    write_shard(
        shard,
        [
            ("tiny", {"jpg": _jpeg(1, 1), "txt": b"one pixel"}),
            ("strip", {"jpg": _jpeg(10000, 50), "txt": b"a very wide strip"}),
        ],
    )
    config = _config(str(shard), loader_name)
    config.data.min_image_side, config.data.max_aspect_ratio = 1, 1000.0
    loader = build_train_loader(config, 0, 1, tokenizer)
    batch = next(loader)
    assert sorted(batch.keys) == ["strip", "tiny"]
    assert batch.images.shape == (2, 3, SIZE, SIZE)
    assert bool(batch.images.isfinite().all())
    loader.close()


@pytest.mark.parametrize("loader_name", ["dali", "torch"])
def test_decoder_failure_is_replaced_in_its_micro_batch(tmp_path, caplog, tokenizer, loader_name):
    shard = tmp_path / "huffman-0.tar"
    samples = [_good(f"good{i}") for i in range(3)]
    samples.insert(1, ("huffman", {"jpg": _bad_huffman_jpeg(), "txt": b"broken table"}))
    write_shard(shard, samples)
    config = _config(str(shard), loader_name, micro_batch=4)
    loader = build_train_loader(config, 0, 1, tokenizer)
    with caplog.at_level(logging.WARNING):
        batch = next(loader)
    # Still 4 pairs; the broken image's place holds a copy of a good pair.
    assert batch.images.shape[0] == 4 and "huffman" not in batch.keys
    assert len(set(batch.keys)) == 3
    assert loader.stats.decode_errors == 1
    assert loader.state_dict()["sample_index"] == 0  # 4 of 4 positions consumed: epoch 1
    assert str(shard) in caplog.text and "huffman" in caplog.text
    loader.close()


def _tar_of_good_samples(path, count: int) -> bytes:
    write_shard(path, [_good(f"good{i}") for i in range(count)])
    return path.read_bytes()


def test_truncated_tar_keeps_the_complete_samples(tmp_path, caplog, tokenizer):
    data = _tar_of_good_samples(tmp_path / "whole.tar", 4)
    # Cut inside the third sample's image: its header is there, its bytes are not.
    third_image = data.index(b"good2.jpg")
    cut = tmp_path / "cut-0.tar"
    cut.write_bytes(data[: third_image + 512 + 100])
    with caplog.at_level(logging.WARNING):
        index = index_shard(str(cut))
    assert index.keys == ["good0", "good1"]
    assert index.skipped.by_reason["truncated_shard"] == 1

    # A cut inside a member header is also survived.
    cut_header = tmp_path / "cut-1.tar"
    cut_header.write_bytes(data[: third_image + 100])
    header_index = index_shard(str(cut_header))
    assert header_index.keys == ["good0", "good1"]
    assert header_index.skipped.by_reason["truncated_shard"] == 1
    # The untouched tar is not reported.
    assert index_shard(str(tmp_path / "whole.tar")).skipped.total == 0

    with caplog.at_level(logging.WARNING):
        loader = build_train_loader(_config(str(tmp_path / "cut-{0..1}.tar")), 0, 1, tokenizer)
        keys = next(loader).keys + next(loader).keys
    assert sorted(keys) == ["good0", "good0", "good1", "good1"]
    assert "cut-0.tar" in caplog.text and "truncated_shard" in caplog.text
    loader.close()


@pytest.mark.parametrize("kind", ["missing", "not_a_tar", "empty_file"])
def test_shard_that_cannot_be_opened_is_a_data_error(tmp_path, tokenizer, kind):
    _tar_of_good_samples(tmp_path / "ok-0.tar", 2)
    bad = tmp_path / "ok-1.tar"
    if kind == "not_a_tar":
        bad.write_bytes(np.random.default_rng(2).bytes(3000))
    elif kind == "empty_file":
        bad.write_bytes(b"")
    with pytest.raises(DataError, match="ok-1.tar"):
        build_train_loader(_config(str(tmp_path / "ok-{0..1}.tar")), 0, 1, tokenizer)


def test_unreadable_shard_is_a_data_error(tmp_path, tokenizer):
    if os.geteuid() == 0:
        # root reads any file whatever its mode; a folder in the shard's place cannot be
        # opened as a file by anyone.
        (tmp_path / "locked-0.tar").mkdir()
    else:
        _tar_of_good_samples(tmp_path / "locked-0.tar", 2)
        os.chmod(tmp_path / "locked-0.tar", 0)
    with pytest.raises(DataError, match="locked-0.tar: cannot be opened"):
        build_train_loader(_config(str(tmp_path / "locked-0.tar")), 0, 1, tokenizer)


def test_no_usable_sample_is_a_data_error(tmp_path, tokenizer):
    write_shard(tmp_path / "bad-0.tar", [("x", {"jpg": _jpeg(), "txt": b""})])
    with pytest.raises(DataError, match="no usable sample"):
        build_train_loader(_config(str(tmp_path / "bad-0.tar")), 0, 1, tokenizer)


def test_position_from_other_data_is_a_data_error(tmp_path, tokenizer):
    _tar_of_good_samples(tmp_path / "p-0.tar", 3)
    config = _config(str(tmp_path / "p-0.tar"))
    position = {"epoch": 0, "sample_index": 1, "samples_per_epoch": 5, "seed": 0}
    with pytest.raises(DataError, match="samples_per_epoch|5 usable samples"):
        build_train_loader(config, 0, 1, tokenizer, position=position)
    with pytest.raises(DataError, match="sample_index"):
        build_train_loader(config, 0, 1, tokenizer, position={"epoch": 0, "sample_index": 3})


def test_empty_shard_spec_and_list_file(tmp_path, tokenizer):
    with pytest.raises(DataError, match="data.train_shards"):
        build_train_loader(_config(""), 0, 1, tokenizer)
    _tar_of_good_samples(tmp_path / "l-0.tar", 2)
    listing = tmp_path / "list.txt"
    listing.write_text("# shards\nl-0.tar\n\n")
    loader = build_train_loader(_config(str(listing)), 0, 1, tokenizer)
    assert sorted(next(loader).keys) == ["good0", "good1"]
    loader.close()
