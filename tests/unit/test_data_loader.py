"""Training loader: every sample once per epoch across ranks, exact resume, other dp sizes.

The expected samples come from the shards the tests write (each caption names its key), and
the expected rank of a stream position from the layout the loader documents: micro-batch k
of rank r holds stream positions g0 + k*b*dp + r*b + [0, b).
"""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_ibxl.config import RunConfig
from megatron_ibxl.data.loader import build_train_loader
from megatron_ibxl.data.order import SampleOrder
from megatron_ibxl.data.tokenizer import train_tokenizer
from megatron_ibxl.data.writer import write_shard

SHARD_SIZES = (7, 9, 6, 8, 10, 8)  # 48 samples, uneven shards
SIZE = 16


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 24), colour).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Shards of SHARD_SIZES samples with keys s{shard}k{member}; returns (pattern, keys)."""
    root = tmp_path_factory.mktemp("shards")
    keys = []
    for shard, size in enumerate(SHARD_SIZES):
        samples = []
        for member in range(size):
            key = f"s{shard}k{member}"
            parts = {"jpg": _jpeg((shard * 40, member * 25, 90)), "txt": f"photo {key}".encode()}
            samples.append((key, parts))
            keys.append(key)
        write_shard(root / f"part-{shard:02d}.tar", samples)
    return str(root / f"part-{{00..{len(SHARD_SIZES) - 1:02d}}}.tar"), keys


@pytest.fixture(scope="module")
def tokenizer(dataset):
    return train_tokenizer([f"photo {key}" for key in dataset[1]], 400)


def _config(pattern: str, micro_batch: int, loader: str = "torch", prefetch: int = 0):
    config = RunConfig()
    config.model.vision.image_size = SIZE
    config.model.text.context_length = 8
    config.data.train_shards = pattern
    config.data.micro_batch = micro_batch
    config.data.loader = loader
    config.data.num_threads = 1
    config.data.prefetch = prefetch
    config.data.seed = 7
    return config


def _run(config, tokenizer, dp_size: int, micro_batches: int, position=None):
    """Keys per stream position, from `micro_batches` micro-batches of every rank."""
    b = config.data.micro_batch
    n = sum(SHARD_SIZES)
    start = 0 if position is None else position["epoch"] * n + position["sample_index"]
    by_position: dict[int, str] = {}
    states = []
    for rank in range(dp_size):
        loader = build_train_loader(config, rank, dp_size, tokenizer, position)
        for k in range(micro_batches):
            batch = next(loader)
            assert batch.images.shape == (b, 3, SIZE, SIZE)
            first = start + k * b * dp_size + rank * b
            by_position.update({first + i: key for i, key in enumerate(batch.keys)})
        states.append(loader.state_dict())
        loader.close()
    assert all(state == states[0] for state in states)
    return by_position, states[0]


def test_two_ranks_see_every_sample_once_per_epoch(dataset, tokenizer):
    pattern, keys = dataset
    config = _config(pattern, micro_batch=4)
    # 48 samples = 6 micro-batches of 4 per rank on 2 ranks.
    by_position, state = _run(config, tokenizer, dp_size=2, micro_batches=6)
    assert sorted(by_position.values()) == sorted(keys)
    assert state == {"epoch": 1, "sample_index": 0, "samples_per_epoch": 48, "seed": 7}


def test_epoch_boundary_inside_a_micro_batch(dataset, tokenizer):
    pattern, keys = dataset
    # b=5, dp=2: 5 micro-batches cover positions 0..49; 48 and 49 open epoch 1.
    by_position, state = _run(_config(pattern, 5), tokenizer, dp_size=2, micro_batches=5)
    first_epoch = [by_position[g] for g in range(48)]
    assert sorted(first_epoch) == sorted(keys)
    assert state["epoch"] == 1 and state["sample_index"] == 2
    # Epoch 1 is a different order of the same samples.
    second, _ = _run(_config(pattern, 8), tokenizer, dp_size=1, micro_batches=12)
    assert sorted(second[g] for g in range(48, 96)) == sorted(keys)
    assert [second[g] for g in range(48, 96)] != first_epoch


def test_order_is_reproducible_and_seeded(dataset, tokenizer):
    pattern, _ = dataset
    first, _ = _run(_config(pattern, 4), tokenizer, dp_size=1, micro_batches=3)
    again, _ = _run(_config(pattern, 4), tokenizer, dp_size=1, micro_batches=3)
    other_seed = _config(pattern, 4)
    other_seed.data.seed = 8
    other, _ = _run(other_seed, tokenizer, dp_size=1, micro_batches=3)
    assert first == again and first != other


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_gives_exactly_the_uninterrupted_batches(dataset, tokenizer, prefetch):
    pattern, _ = dataset
    config = _config(pattern, micro_batch=3, prefetch=prefetch)
    tokens_of = {}

    # Uninterrupted: 7 micro-batches per rank on 2 ranks (crosses the epoch end at 42).
    straight = []
    for rank in range(2):
        loader = build_train_loader(config, rank, 2, tokenizer)
        straight.append([next(loader) for _ in range(9)])
        loader.close()
    # Interrupted after 4 micro-batches, resumed from the saved position.
    resumed = []
    for rank in range(2):
        loader = build_train_loader(config, rank, 2, tokenizer)
        head = [next(loader) for _ in range(4)]
        state = loader.state_dict()
        loader.close()
        loader = build_train_loader(config, rank, 2, tokenizer, position=state)
        resumed.append(head + [next(loader) for _ in range(5)])
        loader.close()

    for rank in range(2):
        for a, b in zip(straight[rank], resumed[rank], strict=True):
            assert a.keys == b.keys
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
            # The fallback draws each sample's augmentation from its stream position, so
            # even the pixels match.
            assert torch.equal(a.images, b.images)
            tokens_of.update(zip(a.keys, a.tokens))
    # Tokens are the caption through the tokenizer (captions are "photo KEY").
    key = straight[0][0].keys[0]
    expected, _ = tokenizer.encode_batch([f"photo {key}"], 8)
    assert torch.equal(tokens_of[key], expected[0])


@pytest.mark.parametrize("new_dp", [4, 1])
def test_position_saved_with_two_ranks_resumes_with_other_dp(dataset, tokenizer, new_dp):
    pattern, keys = dataset
    global_batch = 16  # micro_batch 4: dp 2 x accumulation 2, dp 4 x 1, dp 1 x 4
    # One optimizer step with dp=2, accumulation 2: 2 micro-batches per rank.
    before, state = _run(_config(pattern, 4), tokenizer, dp_size=2, micro_batches=2)
    assert state["sample_index"] == global_batch

    # Two more steps with the new layout finish the epoch of 48.
    accumulation = global_batch // (4 * new_dp)
    after, end = _run(
        _config(pattern, 4), tokenizer, new_dp, micro_batches=2 * accumulation, position=state
    )
    seen = list(before.values()) + list(after.values())
    assert Counter(seen) == Counter(keys)  # each sample exactly once
    assert end == {"epoch": 1, "sample_index": 0, "samples_per_epoch": 48, "seed": 7}

    # And the same samples at the same stream positions as an uninterrupted dp=2 run.
    straight, _ = _run(_config(pattern, 4), tokenizer, dp_size=2, micro_batches=6)
    assert {**before, **after} == straight


def test_dali_and_fallback_read_the_same_samples(dataset, tokenizer):
    pattern, _ = dataset
    runs = {}
    for loader_name in ("dali", "torch"):
        config = _config(pattern, micro_batch=6, loader=loader_name, prefetch=1)
        loader = build_train_loader(config, 1, 2, tokenizer)
        batches = [next(loader) for _ in range(2)]
        assert loader.stats.backend == loader_name
        assert all(b.images.dtype == torch.float32 for b in batches)
        runs[loader_name] = [b.keys for b in batches]
        loader.close()
    assert runs["dali"] == runs["torch"]


def test_shuffle_window_reads_few_shards_at_a_time():
    sizes = [5, 3, 4, 6, 2, 5]
    order = SampleOrder(sizes, seed=3, window_shards=2)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    shard_of = np.searchsorted(starts, order.epoch_order(0), side="right") - 1
    assert sorted(order.epoch_order(0).tolist()) == list(range(sum(sizes)))
    # Reference: the windows are consecutive pairs of the shard permutation of (seed, epoch).
    shards = np.random.default_rng([3, 0]).permutation(len(sizes))
    first = 0
    for window in range(3):
        pair = shards[2 * window : 2 * window + 2]
        count = sum(sizes[k] for k in pair)
        assert set(shard_of[first : first + count].tolist()) == set(pair.tolist())
        first += count


def test_fewer_samples_than_the_global_batch_is_warned(dataset, tokenizer, caplog):
    pattern, keys = dataset
    config = _config(pattern, micro_batch=4)
    for global_batch, warned in ((len(keys) - len(keys) % 4, False), (len(keys) + 4, True)):
        caplog.clear()
        config.data.global_batch = global_batch
        build_train_loader(config, 0, 1, tokenizer).close()
        said = f"{len(keys)} usable samples per epoch, fewer than data.global_batch="
        assert (said in caplog.text) is warned, caplog.text
