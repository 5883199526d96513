"""AdamW with decay and no-decay groups, and the clipped, skip-on-non-finite optimizer step.

The gradient norm clipped against is the true global norm of the whole model: every element
of every parameter counted exactly once, however the parameter is laid out. A rank adds the
squares of its local gradient piece only where it is that piece's one owner:

- a parameter split over tp (Megatron's `tensor_model_parallel`) contributes from every tp
  rank; one replicated over tp (norms, row-parallel biases, heads, positions, the logit
  scale) only from tp rank 0;
- a parameter sharded over dp by FSDP2 (zero 3) contributes from every dp rank; one
  replicated over dp (zero 0, and the scalars FSDP2 leaves alone) only from dp rank 0.

The sum of squares is then all-reduced over all ranks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from megatron_ibxl.config import RunConfig
from megatron_ibxl.parallel.setup import ParallelContext
from megatron_ibxl.parallel.sharding import local_tensor, param_placement, reshard_parameters

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did."""

    grad_norm: float
    """Global gradient norm before clipping (over all tp and dp shards); may be inf or nan."""
    skipped: bool
    """True when the loss or the norm was not finite: no update, gradients dropped."""
    lr: float
    """Learning rate of this step (the one applied, or that would have been)."""
    skipped_steps: int
    """Steps skipped so far in the run (kept in the schedule's state, so in checkpoints)."""


def _default_no_weight_decay(name: str, param: torch.Tensor) -> bool:
    from megatron_ibxl.models import no_weight_decay

    return no_weight_decay(name, param)


def build_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.AdamW:
    """AdamW over `model`'s parameters (after `shard_model`: its fp32 master shards).

    Two groups by `model.no_weight_decay(name, param)` (megatron_ibxl.models.no_weight_decay
    when the model has no such method): `weight_decay` is `optimizer.weight_decay` for the
    decay group and 0 for norms, biases, position embeddings, the class token, the logit scale
    and bias. Each group is split once more into sharded (DTensor) and plain parameters, since
    AdamW's multi-tensor path cannot mix the two. Betas and eps from `config.optimizer`.
    """
    rule = getattr(model, "no_weight_decay", None) or _default_no_weight_decay
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (not rule(name, param), isinstance(param, DTensor))
        groups.setdefault(key, []).append(param)

    opt = config.optimizer
    param_groups = [
        {"params": params, "weight_decay": opt.weight_decay if decay else 0.0}
        for (decay, _), params in sorted(groups.items(), key=lambda item: item[0], reverse=True)
    ]
    return torch.optim.AdamW(
        param_groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps, weight_decay=0.0
    )


def global_grad_norm(model: nn.Module, ctx: ParallelContext | None = None) -> float:
    """The L2 norm of all gradients of `model` over every tp and dp shard, each element counted
    once (see the module doc). Collective over all ranks. Missing gradients count as zero."""
    return _norm_and_flag(model, ctx, 0.0)[0]


def _layout(ctx: ParallelContext | None) -> tuple[int, int, int]:
    """(tp, tp_rank, dp_rank), from Megatron-core's state when there is no context."""
    if ctx is not None:
        return ctx.tp, ctx.tp_rank, ctx.dp_rank
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1, 0, 0
    return (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )


def _norm_and_flag(
    model: nn.Module, ctx: ParallelContext | None, flag: float
) -> tuple[float, float]:
    """(global gradient norm, `flag` summed over ranks) from one all-reduce."""
    tp, tp_rank, dp_rank = _layout(ctx)
    squares: list[torch.Tensor] = []
    for param in model.parameters():
        if param.grad is None:
            continue
        placement = param_placement(param, tp)
        owns_tp = placement.tp_dim is not None or tp_rank == 0
        owns_dp = placement.dp_sharded or dp_rank == 0
        if owns_tp and owns_dp:
            squares.append(local_tensor(param.grad).detach().double().square().sum())
    total = torch.stack(squares).sum() if squares else torch.zeros((), dtype=torch.float64)
    reduced = torch.stack([total, torch.tensor(flag, dtype=torch.float64)])  # [2]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)  # sum of squares and flags over ranks
    return math.sqrt(reduced[0].item()), reduced[1].item()


def _clip_(model: nn.Module, max_norm: float, norm: float) -> None:
    """Scale every local gradient by max_norm / norm when the norm exceeds max_norm."""
    coefficient = max_norm / (norm + 1e-6)
    if coefficient >= 1.0:
        return
    grads = [local_tensor(p.grad) for p in model.parameters() if p.grad is not None]
    torch._foreach_mul_(grads, coefficient)


def clip_and_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    config: RunConfig,
    ctx: ParallelContext | None = None,
    loss: float | None = None,
) -> StepResult:
    """Clip to `optimizer.clip_grad` by the global norm, step AdamW and the schedule.

    Collective over all ranks. When `loss` (the step's global loss; ignored when None) or the
    gradient norm is not finite on any rank, the step is skipped on every rank: gradients are
    dropped, weights, optimizer state and schedule stay as they were, the skip is counted and
    logged. Otherwise: clip, `optimizer.step()`, clamp the logit scale, advance the schedule.
    Gradients are zeroed in both cases.
    """
    lr = float(optimizer.param_groups[0]["lr"])
    reshard_parameters(model)
    loss_bad = 0.0 if loss is None or math.isfinite(loss) else 1.0
    norm, bad_ranks = _norm_and_flag(model, ctx, loss_bad)
    if bad_ranks > 0 or not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        scheduler.skipped_steps = getattr(scheduler, "skipped_steps", 0) + 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        logger.warning(
            "rank %d: step skipped: loss=%s grad_norm=%s not finite (skipped_steps=%d)",
            rank,
            loss,
            norm,
            scheduler.skipped_steps,
        )
        return StepResult(norm, True, lr, scheduler.skipped_steps)

    if config.optimizer.clip_grad > 0:
        _clip_(model, config.optimizer.clip_grad, norm)
    optimizer.step()
    _clamp_logit_scale(model)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(norm, False, lr, getattr(scheduler, "skipped_steps", 0))


def _clamp_logit_scale(model: nn.Module) -> None:
    """The loss module's clamp of the temperature, where the model has one."""
    from megatron_ibxl.losses import clamp_logit_scale_

    if isinstance(getattr(model, "logit_scale", None), torch.Tensor):
        clamp_logit_scale_(model)
