"""Parallel section: how the ranks are laid out and how the model is sharded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ParallelConfig:
    """Tensor, pipeline and data parallelism. Data parallel size is derived:
    world_size / (tp * pp)."""

    tp: int = 1
    """Tensor-parallel size (ranks of one node). Divides both towers' heads and MLP widths."""
    pp: int = 1
    """Pipeline-parallel size. The towers are not pipelined yet: only 1 is accepted."""
    sequence_parallel: bool = False
    """Shard LayerNorm and dropout activations along the sequence over the tp group.
    Needs tp > 1; sequences are padded to a multiple of tp and the padding is masked."""
    zero: Literal[0, 3] = 3
    """0: replicated data parallelism. 3: parameters, gradients and optimizer state sharded
    over the data-parallel ranks (FSDP2 over the dp dimension of the device mesh)."""
    gather: Literal["step", "microbatch"] = "step"
    """With zero 3 and gradient accumulation: gather parameters once per optimizer step
    (`step`) or again in every micro-batch (`microbatch`, less memory, more traffic)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation checkpointing: none, the attention core only, or the whole layer."""
    tp_comm_overlap: bool = False
    """Overlap tensor-parallel collectives with GEMMs where the layers support it
    (Transformer Engine on GPUs; ignored with the local layers)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Collective backend; `auto` is nccl when CUDA is present and gloo otherwise."""
    timeout_s: float = 600.0
    """Seconds a collective may wait before every process ends with an error naming the
    rank that failed. Must be > 0."""
