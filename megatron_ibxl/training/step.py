"""One training step's forwards and backwards over its micro-batches (the optimizer is not run).

Shape letters: `b` pairs per data-parallel rank per micro-batch, `A` micro-batches per step
(gradient accumulation), `B` pairs in the contrastive batch, `d` shared embedding width.

`loss.negatives: global` makes the contrastive batch the whole global batch (B = b * dp * A)
under gradient accumulation, with the gradient-caching method of Gao et al. 2021 ("Scaling
Deep Contrastive Learning Batch Size under Memory Limited Setup", section 3):

1. embed every micro-batch without gradients and keep only the embeddings ([A * b, d]);
2. compute the full-batch loss from them and its gradient with respect to the embeddings
   (and to the logit scale and bias);
3. re-run each micro-batch with gradients, replaying the random state of its first pass so
   dropout draws the same masks, and back-propagate the cached embedding gradients.

Activations live for one micro-batch at a time, so memory grows with b, not with A. The
price is a second forward of every micro-batch. `loss.negatives: micro` runs one forward per
micro-batch and takes its negatives from the micro-batch across data-parallel ranks only
(B = b * dp); the step's loss is the mean of the micro-batch losses. A step of one
micro-batch takes that path in both modes, since there B = b * dp is the global batch.

Gradient convention (shared with the sharding code): after the step, each rank's `.grad`
summed over the data-parallel group equals the gradient of the global mean loss. The FSDP2
wrapper therefore reduces gradients with a sum (divide factor 1); without it, an all-reduce
SUM over the data-parallel group finishes the job.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import random as mcore_random
from torch import nn

from megatron_ibxl.config import RunConfig
from megatron_ibxl.losses.contrastive import LossOutput, contrastive_loss
from megatron_ibxl.parallel.setup import ParallelContext

logger = logging.getLogger(__name__)


class BatchLike(Protocol):
    """A micro-batch as the data loader yields it (megatron_ibxl.data's Batch)."""

    images: torch.Tensor
    """[b, c, H, W] augmented, normalised images."""
    tokens: torch.Tensor
    """[b, L] token ids."""
    lengths: torch.Tensor
    """[b] tokens per caption, end-of-text included."""


class GradSync(Protocol):
    """Hooks of the sharding code around each micro-batch that back-propagates.

    `before_backward(index, count)` is called before micro-batch `index` (0-based) of
    `count` runs its forward with gradients and its backward: FSDP2 turns gradient
    reduction on only for the last one and chooses whether to reshard after backward.
    `after_backward()` is called right after that backward (e.g. to all-reduce the
    gradients of sequence-parallel norms over tensor parallelism once the last one ran).
    The no-gradient pass of `loss.negatives: global` calls neither.
    """

    def before_backward(self, index: int, count: int) -> None:
        """Prepare gradient synchronisation for micro-batch `index` of `count`."""

    def after_backward(self) -> None:
        """Finish the micro-batch whose backward just ran."""


class NoGradSync:
    """The GradSync of an unsharded model: both hooks do nothing."""

    def before_backward(self, index: int, count: int) -> None:
        """Nothing to prepare."""

    def after_backward(self) -> None:
        """Nothing to finish."""


@dataclass
class StepOutput:
    """What one step measured; values are global (reduced over data parallelism)."""

    loss: float
    """Mean loss of the step's contrastive batch (the mean over micro-batches in `micro`)."""
    logit_scale: float
    """The inverse temperature the loss used: exp(clamped logit_scale)."""
    temperature: float
    """1 / logit_scale."""
    logit_bias: float | None
    """The sigmoid loss's bias; None for InfoNCE."""
    acc_i2t: float
    """Fraction of images whose top-1 text in the contrastive batch is their pair."""
    acc_t2i: float
    """Fraction of texts whose top-1 image in the contrastive batch is their pair."""
    contrastive_batch: int
    """B, pairs that each pair was contrasted with (itself included)."""
    micro_batches: int
    """Micro-batches accumulated in the step (A)."""

    def metrics(self) -> dict[str, float]:
        """The values to log, under their metric names (no units: all are ratios)."""
        values = {
            "loss": self.loss,
            "logit_scale": self.logit_scale,
            "temperature": self.temperature,
            "acc_i2t": self.acc_i2t,
            "acc_t2i": self.acc_t2i,
            "contrastive_batch": float(self.contrastive_batch),
        }
        if self.logit_bias is not None:
            values["logit_bias"] = self.logit_bias
        return values


def _copy_state(state):
    """A copy of one RNG state that later draws cannot change (tensor or Generator)."""
    if isinstance(state, torch.Tensor):
        return state.clone()
    if hasattr(state, "clone_state"):
        return state.clone_state()
    return copy.deepcopy(state)


@dataclass
class RngSnapshot:
    """Every random state a forward can draw from, to replay the forward exactly."""

    cpu: torch.Tensor
    """torch's default CPU generator state."""
    cuda: torch.Tensor | None
    """The current CUDA device's default generator state, None without CUDA."""
    tracker: dict
    """Megatron-core's RNG tracker states (model-parallel dropout), copied."""

    @classmethod
    def capture(cls) -> RngSnapshot:
        """Copy the current states."""
        tracker = mcore_random.get_cuda_rng_tracker().get_states()
        cuda = torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None
        states = {name: _copy_state(state) for name, state in tracker.items()}
        return cls(torch.get_rng_state(), cuda, states)

    def restore(self) -> None:
        """Put the states back as they were at capture (the snapshot stays reusable)."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)
        states = {name: _copy_state(state) for name, state in self.tracker.items()}
        mcore_random.get_cuda_rng_tracker().set_states(states)


def _forward(model: nn.Module, batch: BatchLike, device: torch.device):
    """Embed one micro-batch: ([b, d], [b, d]), L2-normalised, replicated over tp."""
    images = batch.images.to(device, non_blocking=True)
    tokens = batch.tokens.to(device, non_blocking=True)
    lengths = batch.lengths.to(device, non_blocking=True)
    return model(images, tokens, lengths)


def _scale_and_bias(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The clamped inverse temperature and the sigmoid bias, read right after a forward.

    Under FSDP2 the root module keeps its parameters unsharded after its forward, so both
    are the compute copies here, and their gradients reach the sharded master copies.
    """
    owner = getattr(model, "module", model)
    return owner.scale(), owner.logit_bias


def train_step(
    model: nn.Module,
    micro_batches: list[BatchLike],
    config: RunConfig,
    ctx: ParallelContext,
    grad_sync: GradSync | None = None,
) -> StepOutput:
    """Run the forwards and backwards of one optimizer step; leave gradients in `.grad`.

    Args:
        model: a DualEncoder (or a module with its interface: forward(images, tokens,
            lengths) -> (image_emb [b, d], text_emb [b, d]), `.scale()`, `.logit_bias`),
            possibly tensor-parallel and FSDP2-sharded. Gradients are accumulated into
            `.grad` (zero them before the step); the optimizer is not called.
        micro_batches: the A micro-batches of this rank, each of the same b pairs.
        config: the run; `loss.kind` and `loss.negatives` are read.
        ctx: the process's layout; the loss gathers over `ctx.dp_group` only.
        grad_sync: the sharding code's hooks; nothing is synchronised when None.

    Returns the step's global loss and in-batch metrics. After the step, each rank's
    gradient summed over the data-parallel group is the gradient of the global mean loss.
    Raises ValueError for an empty list of micro-batches.
    """
    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch; got an empty list")
    grad_sync = grad_sync or NoGradSync()
    group = ctx.dp_group if ctx.dp > 1 else None
    # With one micro-batch the micro-batch across dp IS the global batch: the one-pass path
    # gives the same loss and gradients without gradient caching's second forward.
    if config.loss.negatives == "global" and len(micro_batches) > 1:
        parts = _step_global(model, micro_batches, config, ctx.device, group, grad_sync)
    else:
        parts = _step_micro(model, micro_batches, config, ctx.device, group, grad_sync)
    return _summarize(parts, len(micro_batches), group)


@dataclass
class _StepParts:
    """Per-rank results of the loss calls of one step, before the reduction."""

    outputs: list[LossOutput]
    scale: torch.Tensor
    bias: torch.Tensor | None


def _step_global(model, micro_batches, config, device, group, grad_sync) -> _StepParts:
    """Gradient caching (Gao et al. 2021): embed all, differentiate the loss, replay.

    The paragraphs are the three phases of the method, so they stay in one function.
    """
    # Phase 1: embeddings of every micro-batch, no activations kept; remember the RNG.
    snapshots, image_parts, text_parts = [], [], []
    with torch.no_grad():
        for batch in micro_batches:
            snapshots.append(RngSnapshot.capture())
            image_emb, text_emb = _forward(model, batch, device)
            image_parts.append(image_emb.float())
            text_parts.append(text_emb.float())
        scale, bias = _scale_and_bias(model)

    # Phase 2: the full-batch loss on leaves, for the gradients of its inputs only.
    image_cache = torch.cat(image_parts).requires_grad_()  # A x [b, d] -> [A * b, d]
    text_cache = torch.cat(text_parts).requires_grad_()  # A x [b, d] -> [A * b, d]
    scale_leaf = scale.detach().float().requires_grad_()
    bias_leaf = bias.detach().float().requires_grad_() if bias is not None else None
    output = contrastive_loss(
        image_cache, text_cache, scale_leaf, bias_leaf, config.loss.kind, group
    )
    output.loss.backward()
    output.loss = output.loss.detach()
    image_grads = image_cache.grad.chunk(len(micro_batches))  # [A * b, d] -> A x [b, d]
    text_grads = text_cache.grad.chunk(len(micro_batches))  # [A * b, d] -> A x [b, d]
    del image_parts, text_parts, image_cache, text_cache

    # Phase 3: replay each micro-batch with gradients; the scalars' gradients go in once.
    count = len(micro_batches)
    for index, batch in enumerate(micro_batches):
        snapshots[index].restore()
        grad_sync.before_backward(index, count)
        image_emb, text_emb = _forward(model, batch, device)
        outputs = [image_emb, text_emb]
        grads = [image_grads[index].to(image_emb.dtype), text_grads[index].to(text_emb.dtype)]
        if index == count - 1:
            scale, bias = _scale_and_bias(model)
            if scale.requires_grad:
                outputs.append(scale)
                grads.append(scale_leaf.grad.to(scale.dtype).reshape(scale.shape))
            if bias is not None and bias.requires_grad and bias_leaf.grad is not None:
                outputs.append(bias)
                grads.append(bias_leaf.grad.to(bias.dtype).reshape(bias.shape))
        torch.autograd.backward(outputs, grads)
        grad_sync.after_backward()
    return _StepParts([output], scale_leaf.detach(), _detached(bias_leaf))


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return tensor.detach().float() if tensor is not None else None


def _step_micro(model, micro_batches, config, device, group, grad_sync) -> _StepParts:
    """One forward and backward per micro-batch; negatives from the micro-batch only."""
    count = len(micro_batches)
    outputs = []
    for index, batch in enumerate(micro_batches):
        grad_sync.before_backward(index, count)
        image_emb, text_emb = _forward(model, batch, device)
        scale, bias = _scale_and_bias(model)
        output = contrastive_loss(image_emb, text_emb, scale, bias, config.loss.kind, group)
        # The step's loss is the mean of the micro-batch losses.
        (output.loss / count).backward()
        grad_sync.after_backward()
        output.loss = output.loss.detach()
        outputs.append(output)
    return _StepParts(outputs, scale.detach().float(), _detached(bias))


def _summarize(step: _StepParts, count: int, group) -> StepOutput:
    """Reduce the per-rank shares over data parallelism into global metrics."""
    parts = step.outputs
    totals = torch.stack(
        [
            sum(part.loss for part in parts) / len(parts),
            sum(part.correct_i2t.float() for part in parts),
            sum(part.correct_t2i.float() for part in parts),
        ]
    ).double()
    if group is not None:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group)  # [3] -> [3]
    pairs_seen = sum(part.num_pairs for part in parts)
    scale_value = float(step.scale.reshape(()))
    bias_value = float(step.bias.reshape(())) if step.bias is not None else None
    return StepOutput(
        loss=float(totals[0]),
        logit_scale=scale_value,
        temperature=1.0 / scale_value,
        logit_bias=bias_value,
        acc_i2t=float(totals[1]) / pairs_seen,
        acc_t2i=float(totals[2]) / pairs_seen,
        contrastive_batch=parts[0].num_pairs,
        micro_batches=count,
    )
