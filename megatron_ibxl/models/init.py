"""Seeded, tensor-parallel-independent initialisation; full-size gathering; weight-decay rules.

Every parameter is initialised by building its FULL-size tensor on CPU from a generator seeded
by (model.init_seed, parameter name), then copying this rank's shard into it. The same seed
therefore gives the same full-size model under any tensor-parallel size, and a TP=1 run and a
TP=N run start from the same weights.

Note on cost: each rank draws every full tensor it holds a shard of, as Megatron's own CPU
initialisation does. For the 30B model that is about 30e9 normal draws per rank at start-up
(minutes on a busy host); it happens once per run, and resuming from a checkpoint skips its
effect but not its cost.

Rules (std values follow Megatron-LM and CLIP):

| parameter | init |
| --- | --- |
| LayerNorm weight / bias, all linear biases | 1 / 0 |
| QKV, MLP-in, patch projection, class token, token embedding | normal(0, 0.02) |
| attention-out and MLP-out (residual branches) | normal(0, 0.02 / sqrt(2 * layers)) |
| position embeddings | normal(0, 0.01) |
| projection heads | Xavier-uniform |
| logit scale, logit bias | constants from the config (set by the DualEncoder) |
"""

from __future__ import annotations

import math
import zlib
from typing import Literal

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn

_STD = 0.02
_POSITION_STD = 0.01
_RESIDUAL_OUT = ("linear_proj.weight", "linear_fc2.weight")
_HEADS = ("image_head.weight", "text_head.weight")
_CONSTANTS = ("logit_scale", "logit_bias")
_NO_DECAY_KEYS = ("norm", "position_embeddings", "class_token", "logit_scale", "logit_bias")


def init_parameters(model: nn.Module, init_seed: int, num_layers: dict[str, int]) -> None:
    """Fill every parameter of `model` (except the logit constants) from `init_seed`.

    Args:
        model: a DualEncoder (or a tower) whose Megatron layers carry `tensor_model_parallel`
            and `partition_dim` on their sharded parameters.
        init_seed: model.init_seed.
        num_layers: layers per name prefix (`{"image_tower.": 48, "text_tower.": 64}`), for the
            scaled init of residual-branch outputs.
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.split(".")[-1] in _CONSTANTS:
                continue
            seed = (init_seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)
            generator = torch.Generator().manual_seed(seed)
            full = _full_tensor(name, param, tp, generator, num_layers)
            param.copy_(_shard(full, param, tp, tp_rank))


def _full_shape(param: torch.Tensor, tp: int) -> list[int]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp
    return shape


def _full_tensor(name, param, tp, generator, num_layers) -> torch.Tensor:
    """The full-size initial value of one parameter (fp32, CPU)."""
    shape = _full_shape(param, tp)
    leaf = name.split(".")[-1]
    if "norm" in name and leaf.endswith("weight"):
        return torch.ones(shape)
    if leaf.endswith("bias"):
        return torch.zeros(shape)
    if name.endswith(_HEADS):
        return nn.init.xavier_uniform_(torch.empty(shape), generator=generator)
    rows = getattr(param, "unpadded_rows", None)
    if rows is not None:
        # Draw only the real vocabulary rows, so they do not depend on the tp padding.
        real = torch.randn(rows, *shape[1:], generator=generator) * _STD
        return torch.cat([real, torch.zeros(shape[0] - rows, *shape[1:])])
    std = _STD
    if leaf == "position_embeddings":
        std = _POSITION_STD
    elif name.endswith(_RESIDUAL_OUT):
        layers = next((n for prefix, n in num_layers.items() if name.startswith(prefix)), 1)
        std = _STD / math.sqrt(2.0 * layers)
    return torch.randn(shape, generator=generator) * std


def _shard(full: torch.Tensor, param: torch.Tensor, tp: int, tp_rank: int) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return full
    return full.chunk(tp, dim=param.partition_dim)[tp_rank]


def shard_full_tensor(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This tp rank's shard of the full-size tensor `full` of `param` (the inverse of
    gather_full_parameters; pads vocabulary rows back with zeros when they were dropped)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rows = getattr(param, "unpadded_rows", None)
    shape = _full_shape(param, tp)
    if rows is not None and full.shape[0] < shape[0]:
        full = torch.cat([full, full.new_zeros(shape[0] - full.shape[0], *shape[1:])])
    return _shard(full, param, tp, parallel_state.get_tensor_model_parallel_rank())


def gather_full_parameters(
    model: nn.Module, which: Literal["data", "grad"] = "data"
) -> dict[str, torch.Tensor]:
    """Full-size copies of every parameter (or gradient) of `model`, by name.

    Tensor-parallel shards are all-gathered over the tp group along their `partition_dim`;
    replicated parameters are copied as they are. The token embedding loses its padding rows
    past `vocab_size`, so the result has the same shapes under any tp. A collective: every tp
    rank must call it. Gradients of sequence-parallel parameters are returned as this rank
    holds them (partial sums); all-reduce them over tp first to compare them.
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    result: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        value = param.detach() if which == "data" else param.grad
        if value is None:
            value = torch.zeros_like(param)
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(value) for _ in range(tp)]
            dist.all_gather(parts, value.contiguous(), group=group)
            value = torch.cat(parts, dim=param.partition_dim)  # tp x [.., h/tp, ..] -> [.., h, ..]
        rows = getattr(param, "unpadded_rows", None)
        if rows is not None:
            value = value[:rows]
        result[name] = value.detach().clone()
    return result


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """True for parameters AdamW must not decay: norms, biases, position embeddings, the class
    token, the logit scale and the logit bias."""
    return (
        param.ndim < 2
        or name.split(".")[-1].endswith("bias")
        or any(key in name for key in _NO_DECAY_KEYS)
    )
