"""Contrastive losses of the dual encoder, serial and distributed over data parallelism.

Shape letters: `b` rows (pairs) this data-parallel rank owns in one loss call (one micro-batch,
or all of its micro-batches under `loss.negatives: global`), `B` pairs in the contrastive
batch (b times the data-parallel size), `d` shared embedding width.

Two objectives:

- Symmetric InfoNCE with a learnable temperature (CLIP: Radford et al. 2021, "Learning
  Transferable Visual Models From Natural Language Supervision", Figure 3): cross-entropy of
  the image-to-text and text-to-image logits against the matching pair, averaged.
- The pairwise sigmoid loss with a learnable temperature and bias (SigLIP: Zhai et al. 2023,
  "Sigmoid Loss for Language Image Pre-Training", Algorithm 1): one binary label per
  image-text pair, +1 for the matching pair and -1 for every other, normalised by B.

Distribution. Each data-parallel rank computes the loss rows of its own pairs against the
embeddings of the whole contrastive batch, gathered over the data-parallel group by an
all-gather whose backward reduce-scatters (sums) the embedding gradients back to the rank
that produced them. A rank's loss is its share of the global mean: (1/B) * sum over its rows,
so summing the ranks' losses (and their gradients) gives the global loss (and its gradient).
No rank ever holds the B x B logit matrix, only its [b, B] block. Tensor-parallel ranks of
one data-parallel group hold the same embeddings and compute the same share; the loss is never
reduced over tensor parallelism, so no pair is counted twice.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

LossKind = Literal["infonce", "sigmoid"]


@dataclass
class LossOutput:
    """One rank's share of a contrastive loss and its in-batch retrieval counts."""

    loss: torch.Tensor
    """Scalar; this rank's share of the global mean loss (differentiable). Sum over the
    data-parallel group to get the loss of the contrastive batch."""
    correct_i2t: torch.Tensor
    """Scalar count (no gradient): own images whose top-1 text in the batch is their pair."""
    correct_t2i: torch.Tensor
    """Scalar count (no gradient): own texts whose top-1 image in the batch is their pair."""
    num_pairs: int
    """B, the pairs of the contrastive batch."""


class _AllGatherRows(torch.autograd.Function):
    """Concatenate every rank's rows; the backward sums the gradients back to their owner."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        rows = rows.contiguous()
        gathered = rows.new_empty((world * rows.shape[0], *rows.shape[1:]))
        dist.all_gather_single(gathered, rows, group=group)  # [b, d] -> [B, d]
        return gathered

    @staticmethod
    def backward(ctx, grad_gathered: torch.Tensor):
        world = dist.get_world_size(ctx.group)
        grad_gathered = grad_gathered.contiguous()
        grad_rows = grad_gathered.new_empty(
            (grad_gathered.shape[0] // world, *grad_gathered.shape[1:])
        )
        # Every rank's loss depends on every row: the owner's gradient is the sum.
        dist.reduce_scatter_single(
            grad_rows, grad_gathered, op=dist.ReduceOp.SUM, group=ctx.group
        )  # [B, d] -> [b, d]
        return grad_rows, None


def all_gather_rows(rows: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-gather `rows` [b, d] over `group` into [B, d] in group-rank order, with autograd.

    The backward reduce-scatters with a sum: each rank receives the gradient of the sum of
    all ranks' losses with respect to its own rows. Every rank must pass the same b. With
    `group` None or of size 1 the rows are returned unchanged.
    """
    if group is None or dist.get_world_size(group) == 1:
        return rows
    return _AllGatherRows.apply(rows, group)


def infonce_loss_serial(
    image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE over a whole batch on one process (the reference).

    Args:
        image_emb, text_emb: [B, d] L2-normalised embeddings; row i of each is pair i.
        scale: scalar (shape [] or [1]) inverse temperature exp(logit_scale).

    Returns the mean over the B pairs of (CE image->text + CE text->image) / 2 (CLIP eq. in
    Radford et al. 2021, Figure 3).
    """
    scale = scale.reshape(())
    logits_i2t = scale * image_emb @ text_emb.t()  # [B, d] @ [d, B] -> [B, B]
    labels = torch.arange(image_emb.shape[0], device=image_emb.device)
    loss_i2t = F.cross_entropy(logits_i2t, labels)
    loss_t2i = F.cross_entropy(logits_i2t.t(), labels)  # [B, B] -> [B, B] (text rows)
    return (loss_i2t + loss_t2i) / 2


def sigmoid_loss_serial(
    image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Pairwise sigmoid loss over a whole batch on one process (the reference).

    Args:
        image_emb, text_emb: [B, d] L2-normalised embeddings; row i of each is pair i.
        scale: scalar inverse temperature exp(logit_scale); bias: scalar learnable bias.

    Returns -(1/B) * sum over all B^2 pairs (i, j) of log sigmoid(z_ij * (scale * x_i . y_j +
    bias)), z_ij = +1 when i == j else -1 (SigLIP, Zhai et al. 2023, Algorithm 1).
    """
    logits = scale.reshape(()) * image_emb @ text_emb.t() + bias.reshape(())  # [B, B]
    signs = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]


def contrastive_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    kind: LossKind,
    group: dist.ProcessGroup | None,
) -> LossOutput:
    """This rank's share of the contrastive loss of the batch spread over `group`.

    Args:
        image_emb, text_emb: [b, d] this rank's L2-normalised embeddings (pair i is row i of
            both), replicated over tensor-parallel ranks. Computed in float32 whatever the
            input dtype.
        scale: scalar inverse temperature (already clamped), replicated.
        bias: scalar sigmoid bias, or None for InfoNCE.
        kind: `infonce` or `sigmoid`.
        group: the data-parallel group the batch is spread over (rank order = row order);
            None for a single process.

    Returns a LossOutput whose loss summed over `group` is the mean loss of the B pairs.
    Raises ValueError for an unknown kind or a sigmoid loss without a bias.
    """
    image_emb, text_emb, scale = image_emb.float(), text_emb.float(), scale.float().reshape(())
    rank = dist.get_rank(group) if group is not None else 0
    rows = image_emb.shape[0]
    labels = rank * rows + torch.arange(rows, device=image_emb.device)  # [b] global column ids
    if kind == "infonce":
        return _infonce_distributed(image_emb, text_emb, scale, labels, group)
    if kind == "sigmoid":
        if bias is None:
            raise ValueError("the sigmoid loss needs the model's logit_bias; got None")
        return _sigmoid_distributed(image_emb, text_emb, scale, bias.float(), labels, group)
    raise ValueError(f"loss.kind={kind!r}: must be 'infonce' or 'sigmoid'")


def _infonce_distributed(image_emb, text_emb, scale, labels, group) -> LossOutput:
    """Rows of both directions owned by this rank, against all B columns (CLIP)."""
    image_emb_all = all_gather_rows(image_emb, group)  # [b, d] -> [B, d]
    text_emb_all = all_gather_rows(text_emb, group)  # [b, d] -> [B, d]
    num_pairs = image_emb_all.shape[0]

    logits_i2t = scale * image_emb @ text_emb_all.t()  # [b, d] @ [d, B] -> [b, B]
    logits_t2i = scale * text_emb @ image_emb_all.t()  # [b, d] @ [d, B] -> [b, B]
    loss_i2t = F.cross_entropy(logits_i2t, labels, reduction="sum")
    loss_t2i = F.cross_entropy(logits_t2i, labels, reduction="sum")
    # A share of the global mean: summing the ranks' shares gives (mean_i2t + mean_t2i) / 2.
    loss = (loss_i2t + loss_t2i) / (2 * num_pairs)

    with torch.no_grad():
        correct_i2t = (logits_i2t.argmax(dim=1) == labels).sum()
        correct_t2i = (logits_t2i.argmax(dim=1) == labels).sum()
    return LossOutput(loss, correct_i2t, correct_t2i, num_pairs)


def _sigmoid_distributed(image_emb, text_emb, scale, bias, labels, group) -> LossOutput:
    """This rank's image rows against all B texts: a [b, B] block of the SigLIP loss.

    Only the texts are gathered: the block covers every pair (i, j) with image i owned here,
    so the blocks of all ranks tile the B x B pairs exactly once.
    """
    text_emb_all = all_gather_rows(text_emb, group)  # [b, d] -> [B, d]
    num_pairs = text_emb_all.shape[0]
    logits = scale * image_emb @ text_emb_all.t() + bias.reshape(())  # [b, d] @ [d, B] -> [b, B]
    rows = torch.arange(logits.shape[0], device=logits.device)
    signs = -torch.ones_like(logits)
    signs[rows, labels] = 1.0  # +1 on this block's part of the diagonal
    loss = -F.logsigmoid(signs * logits).sum() / num_pairs

    with torch.no_grad():
        correct_i2t = (logits.argmax(dim=1) == labels).sum()
        correct_t2i = _column_top1_correct(logits, rows, labels, group)
    return LossOutput(loss, correct_i2t, correct_t2i, num_pairs)


def _column_top1_correct(logits, rows, labels, group) -> torch.Tensor:
    """Texts owned here whose best image over all ranks is their pair (no extra gather).

    The best image of text j is the column maximum of the full logit matrix: each rank's
    column maxima over its rows are combined with an all-reduce MAX of B numbers.
    """
    column_max = logits.max(dim=0).values  # [b, B] -> [B]
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(column_max, op=dist.ReduceOp.MAX, group=group)  # [B] -> [B]
    return (logits[rows, labels] >= column_max[labels]).sum()


def find_logit_scale_owner(model: nn.Module) -> nn.Module:
    """The module that holds `logit_scale` (the model itself or the first submodule that does).

    Raises ValueError when no module has a `logit_scale` parameter.
    """
    for module in model.modules():
        if isinstance(getattr(module, "logit_scale", None), nn.Parameter):
            return module
    raise ValueError(f"{type(model).__name__} has no logit_scale parameter to clamp")


def clamp_logit_scale_(model: nn.Module) -> None:
    """Clamp the model's log inverse temperature in place to its `logit_scale_max`.

    Call it right after `optimizer.step()`. It clamps the tensor the optimizer owns: the
    parameter itself when it is a plain tensor (replicated, fp32), or this rank's local shard
    when FSDP2 has sharded it into a DTensor (the fp32 master copy under mixed precision; a
    rank whose shard is empty has nothing to do). The compute copy of the next forward is
    cast from it. The bound is the largest value of the parameter's dtype that does not
    exceed the limit (fp32 rounds ln 100 up by 6e-8 otherwise). Only an upper bound is
    applied (CLIP clamps the scale at 100, Radford et al. 2021, section 2.5).
    """
    owner = find_logit_scale_owner(model)
    parameter = owner.logit_scale
    local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
    with torch.no_grad():
        local.clamp_(max=_largest_at_most(float(owner.logit_scale_max), local.dtype))


def _largest_at_most(limit: float, dtype: torch.dtype) -> float:
    """The largest number of `dtype` that is <= `limit`."""
    value = torch.tensor(limit, dtype=torch.float64).to(dtype)
    if float(value) > limit:
        value = torch.nextafter(value, torch.tensor(-math.inf, dtype=dtype))
    return float(value)
