"""Shared pieces of the sharding and checkpoint tests: a tiny config, a deterministic global
batch per step, and a few optimizer steps through train_step, shard_model and clip_and_step.

Every rank builds the whole global batch of a step from the same seed and takes its own rows,
so any layout sees the same data: the contrastive batch is the global batch
(`loss.negatives: global`), whatever dp and accumulation are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_ibxl.config import ParallelConfig, RunConfig
from megatron_ibxl.models import build_dual_encoder
from megatron_ibxl.parallel import LaunchEnv, init_parallel, shutdown_parallel
from megatron_ibxl.parallel.sharding import full_parameters, shard_model
from megatron_ibxl.training.optimizer import build_optimizer, clip_and_step
from megatron_ibxl.training.schedule import build_scheduler
from megatron_ibxl.training.step import train_step

GLOBAL_BATCH = 8
"""Pairs per optimizer step in every test layout."""


def tiny_model_config(config: RunConfig) -> None:
    """Shrink `config.model` in place to a dual encoder that trains in milliseconds: two
    layers per tower, width 16, two heads, 4 patches of 4 px, 6 tokens of a 29-word
    vocabulary (padded to 32 for any tp up to 8)."""
    vision, text = config.model.vision, config.model.text
    vision.image_size, vision.patch_size, vision.channels = 8, 4, 3
    vision.hidden, vision.num_layers, vision.num_heads, vision.mlp_hidden = 16, 2, 2, 32
    text.vocab_size, text.vocab_pad_multiple, text.context_length = 29, 8, 6
    text.hidden, text.num_layers, text.num_heads, text.mlp_hidden = 16, 2, 2, 32
    config.model.embed_dim = 8
    config.model.logit_scale_init = math.log(10.0)


def relayout(ctx, tp: int, store):
    """Tear this process group down and join a new one over the same processes with another
    tensor-parallel size (and the seeds a fresh process gets), to test several layouts
    without paying for a new set of processes each time. `store` is a fresh rendezvous file
    path, the same on every rank. Returns the new ParallelContext."""
    rank, world_size = ctx.rank, ctx.world_size
    shutdown_parallel()
    launch = LaunchEnv(rank, world_size, rank, "127.0.0.1", 0, "test")
    parallel = ParallelConfig(tp=tp, backend="gloo", timeout_s=600)
    return init_parallel(parallel, seed=0, launch=launch, init_method=f"file://{store}")


@dataclass
class Batch:
    """One micro-batch, as the data loader would yield it."""

    images: torch.Tensor
    tokens: torch.Tensor
    lengths: torch.Tensor


def make_config(
    tp: int = 1,
    dp: int = 1,
    zero: int = 0,
    gather: str = "step",
    accumulation: int = 1,
    clip_grad: float = 0.5,
    dropout: float = 0.0,
    sequence_parallel: bool = False,
    precision: str = "fp32",
) -> RunConfig:
    """A run of the tiny model (fp32 unless asked): warmup 2, total 5 steps, peak lr 1e-3."""
    config = RunConfig()
    tiny_model_config(config)
    config.model.hidden_dropout = dropout
    config.parallel = ParallelConfig(
        tp=tp,
        sequence_parallel=sequence_parallel,
        zero=zero,
        gather=gather,
        backend="gloo",
        timeout_s=600,
    )
    config.data.global_batch = GLOBAL_BATCH
    config.data.micro_batch = GLOBAL_BATCH // (dp * accumulation)
    config.optimizer.lr = 1e-3
    config.optimizer.weight_decay = 0.1
    config.optimizer.clip_grad = clip_grad
    config.optimizer.precision = precision
    config.schedule.warmup_steps = 2
    config.schedule.total_steps = 5
    config.schedule.min_lr = 1e-4
    config.loss.negatives = "global"
    return config


def global_batch(config: RunConfig, step: int) -> Batch:
    """The whole batch of optimizer step `step` (1-based), the same on every rank."""
    generator = torch.Generator().manual_seed(1000 + step)
    vision, text = config.model.vision, config.model.text
    size = vision.image_size
    images = torch.randn(GLOBAL_BATCH, vision.channels, size, size, generator=generator)
    tokens = torch.randint(
        1, text.vocab_size, (GLOBAL_BATCH, text.context_length), generator=generator
    )
    lengths = torch.randint(2, text.context_length + 1, (GLOBAL_BATCH,), generator=generator)
    return Batch(images, tokens, lengths)


def rank_micro_batches(config: RunConfig, ctx, step: int) -> list[Batch]:
    """This dp rank's rows of the step's batch, split into its micro-batches."""
    batch = global_batch(config, step)
    rows = GLOBAL_BATCH // ctx.dp
    start, micro = ctx.dp_rank * rows, config.data.micro_batch
    return [
        Batch(
            batch.images[first : first + micro],
            batch.tokens[first : first + micro],
            batch.lengths[first : first + micro],
        )
        for first in range(start, start + rows, micro)
    ]


@dataclass
class Trained:
    """What a few steps produced, in picklable form (numpy), for the parent process."""

    params: dict
    losses: list[float]
    grad_norms: list[float]
    lrs: list[float]
    skipped: list[bool]


class Run:
    """Model, sharding, optimizer and schedule of one layout, stepped on the test batches."""

    def __init__(self, config: RunConfig, ctx):
        self.config, self.ctx = config, ctx
        self.model = build_dual_encoder(config)
        self.grad_sync = shard_model(self.model, config, ctx)
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.record = Trained({}, [], [], [], [])

    def step(self, step: int, poison: bool = False) -> None:
        """Optimizer step `step` (1-based); `poison` makes its embeddings NaN."""
        micro_batches = rank_micro_batches(self.config, self.ctx, step)
        if poison:
            for batch in micro_batches:
                batch.images = batch.images * float("nan")
        output = train_step(self.model, micro_batches, self.config, self.ctx, self.grad_sync)
        result = clip_and_step(
            self.model, self.optimizer, self.scheduler, self.config, self.ctx, output.loss
        )
        self.record.losses.append(float(output.loss))
        self.record.grad_norms.append(result.grad_norm)
        self.record.lrs.append(result.lr)
        self.record.skipped.append(result.skipped)

    def finish(self) -> Trained:
        """The record with the full parameters gathered (collective)."""
        full = full_parameters(self.model, self.ctx)
        self.record.params = {name: tensor.numpy().copy() for name, tensor in full.items()}
        return self.record
