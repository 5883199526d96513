"""Training loader on real process groups: tp=2 x dp=2 over gloo, each rank its own process.

Tensor-parallel peers must get the same samples; the two data-parallel groups together must
see every sample of the epoch once. Checked by gathering the keys over the process groups.
"""

from __future__ import annotations

import io
from collections import Counter

import torch.distributed as dist
from PIL import Image

from megatron_ibxl.config import ParallelConfig, RunConfig
from megatron_ibxl.data.loader import build_train_loader
from megatron_ibxl.data.tokenizer import train_tokenizer
from megatron_ibxl.data.writer import write_shard
from tests.helpers.dist import run_distributed

SAMPLES = 24  # 3 shards of 8; micro-batch 3 on dp=2: 4 micro-batches per rank per epoch


def _write_shards(root) -> list[str]:
    keys = []
    for shard in range(3):
        samples = []
        for member in range(8):
            buffer = io.BytesIO()
            Image.new("RGB", (12, 12), (shard * 80, member * 30, 0)).save(buffer, "JPEG")
            key = f"s{shard}m{member}"
            samples.append((key, {"jpg": buffer.getvalue(), "txt": f"item {key}".encode()}))
            keys.append(key)
        write_shard(root / f"d-{shard}.tar", samples)
    return keys


def _keys_on_rank(ctx, pattern: str) -> dict:
    config = RunConfig()
    config.model.vision.image_size = 16
    config.model.text.context_length = 6
    config.data.train_shards = pattern
    config.data.micro_batch = 3
    config.data.loader = "torch"
    config.data.num_threads = 1
    tokenizer = train_tokenizer(["item s0m0"], 300)
    loader = build_train_loader(config, ctx.dp_rank, ctx.dp, tokenizer)
    keys = [key for _ in range(4) for key in next(loader).keys]
    state = loader.state_dict()
    loader.close()

    everyone: list = [None] * ctx.world_size
    dist.all_gather_object(everyone, (ctx.tp_rank, ctx.dp_rank, keys))
    return {"gathered": everyone, "state": state}


def test_tp_peers_share_samples_and_dp_ranks_split_the_epoch(tmp_path):
    keys = _write_shards(tmp_path)
    parallel = ParallelConfig(tp=2, backend="gloo", timeout_s=60)
    results = run_distributed(
        _keys_on_rank,
        4,
        tmp_path,
        str(tmp_path / "d-{0..2}.tar"),
        parallel=parallel,
        timeout_s=480,
    )
    gathered = results[0]["gathered"]
    by_dp: dict[int, list[list[str]]] = {}
    for _, dp_rank, rank_keys in gathered:
        by_dp.setdefault(dp_rank, []).append(rank_keys)
    # Both tensor-parallel ranks of a data-parallel group read the same samples.
    assert all(len(group) == 2 and group[0] == group[1] for group in by_dp.values())
    # The data-parallel groups split the epoch: every sample exactly once.
    assert Counter(by_dp[0][0] + by_dp[1][0]) == Counter(keys)
    # Every rank saves the same position: one full epoch consumed.
    assert all(r["state"]["epoch"] == 1 and r["state"]["sample_index"] == 0 for r in results)
