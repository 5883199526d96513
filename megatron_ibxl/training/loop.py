"""The training loop: step, log, evaluate, checkpoint, and stop when asked.

Every rank runs the same sequence of collectives in the same order: the train step, the
stop-flag all-reduce, evaluation (when due) and the checkpoint (when due). Only the rank that
owns the metrics writes them. Shape letters: b pairs per dp rank per micro-batch, B pairs in
the contrastive batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from megatron_ibxl.config import BatchLayout, RunConfig
from megatron_ibxl.errors import UserError
from megatron_ibxl.parallel.setup import ParallelContext
from megatron_ibxl.training.metrics import MetricsWriter, memory_gib
from megatron_ibxl.training.signals import StopSignal, Watchdog

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Counters carried across steps and, through the checkpoint, across restarts."""

    step: int = 0
    """Optimizer steps completed."""
    samples: int = 0
    """Pairs trained on (global, all data-parallel ranks)."""
    skipped_steps: int = 0
    """Optimizer steps skipped for a non-finite gradient."""
    train_s: float = 0.0
    """Seconds spent in training steps (evaluation and checkpoints excluded)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain form, stored in the checkpoint's extra state."""
        return {
            "step": self.step,
            "samples": self.samples,
            "skipped_steps": self.skipped_steps,
            "train_s": self.train_s,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """Inverse of `to_dict`; missing counters start at zero."""
        return cls(
            step=int(data.get("step", 0)),
            samples=int(data.get("samples", 0)),
            skipped_steps=int(data.get("skipped_steps", 0)),
            train_s=float(data.get("train_s", 0.0)),
        )


@dataclass
class Trainer:
    """What the loop needs, built by `training.entry` from the configuration."""

    config: RunConfig
    ctx: ParallelContext
    batch: BatchLayout
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    grad_sync: Any
    loader: Any
    tokenizer: Any
    writer: MetricsWriter
    stop: StopSignal
    watchdog: Watchdog
    save: Callable[[TrainState], None]
    """Writes a checkpoint of the current state (collective)."""
    evaluate: Callable[[], dict[str, float]] | None = None
    """Zero-shot evaluation (collective), or None when `eval.task` is `none`."""
    _window: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LoopResult:
    """How the loop ended."""

    state: TrainState
    reason: str
    """`finished` (reached schedule.total_steps) or `stopped` (a stop signal)."""


def train(trainer: Trainer, state: TrainState) -> LoopResult:
    """Run optimizer steps until `schedule.total_steps`, or until any rank is signalled.

    An orchestrator: each iteration is one step, then its bookkeeping (metrics, evaluation,
    checkpoint) on the steps they are due. Collective on every rank.
    """
    config = trainer.config
    total = config.schedule.total_steps
    _reset_window(trainer, state)
    while state.step < total:
        with trainer.watchdog.phase(f"train step {state.step + 1}"):
            step_metrics = _one_step(trainer, state)
            stop = trainer.stop.should_stop(trainer.ctx.device)
        last = state.step == total
        trainer.writer.progress(
            state.step, step_metrics["loss"], step_metrics["lr"], step_metrics["samples_per_s"]
        )

        eval_every = config.eval.every_steps
        eval_due = trainer.evaluate is not None and (
            last or (eval_every and state.step % eval_every == 0)
        )
        if eval_due:
            with trainer.watchdog.phase(f"evaluation after step {state.step}"):
                try:
                    step_metrics.update(trainer.evaluate())
                except UserError:
                    # Unusable evaluation data (the same on every rank): keep the training
                    # done so far, then report it.
                    with trainer.watchdog.phase(f"checkpoint of step {state.step}"):
                        trainer.save(state)
                    raise

        if eval_due or last or stop or state.step % config.logging.log_every == 0:
            _log(trainer, state, step_metrics)

        every = config.checkpoint.every_steps
        if last or stop or (every and state.step % every == 0):
            with trainer.watchdog.phase(f"checkpoint of step {state.step}"):
                trainer.save(state)
        if stop:
            source = trainer.stop.received or "a stop signal on another rank"
            logger.warning(
                "rank %d: %s: checkpointed step %d, exiting 0",
                trainer.ctx.rank,
                source,
                state.step,
            )
            return LoopResult(state, "stopped")
    return LoopResult(state, "finished")


def _one_step(trainer: Trainer, state: TrainState) -> dict[str, Any]:
    """Fetch the micro-batches, run forwards/backwards and the optimizer; return the step's
    metrics (global values, the same on every rank)."""
    from megatron_ibxl.training.optimizer import clip_and_step
    from megatron_ibxl.training.step import train_step

    start = time.perf_counter()
    micro_batches = [next(trainer.loader) for _ in range(trainer.batch.accumulation)]
    data_s = time.perf_counter() - start

    # Gradients, then the clipped AdamW step, the logit-scale clamp and the schedule.
    trainer.optimizer.zero_grad(set_to_none=True)
    output = train_step(
        trainer.model, micro_batches, trainer.config, trainer.ctx, trainer.grad_sync
    )
    result = clip_and_step(
        trainer.model,
        trainer.optimizer,
        trainer.scheduler,
        trainer.config,
        trainer.ctx,
        loss=output.loss,
    )

    step_s = time.perf_counter() - start
    state.step += 1
    state.samples += trainer.batch.global_batch
    state.skipped_steps = result.skipped_steps
    state.train_s += step_s
    window = trainer._window
    window["steps"] += 1
    window["seconds"] += step_s
    window["data_s"] += data_s
    metrics: dict[str, Any] = output.metrics()
    metrics.update(
        lr=result.lr,
        grad_norm=result.grad_norm,
        samples_per_s=trainer.batch.global_batch / step_s,
        step_time_ms=1000.0 * step_s,
    )
    return metrics


def _reset_window(trainer: Trainer, state: TrainState) -> None:
    trainer._window = {"steps": 0, "seconds": 0.0, "data_s": 0.0, "start_step": state.step}


def _log(trainer: Trainer, state: TrainState, step_metrics: dict[str, Any]) -> None:
    """Average the window since the last line, gather cross-rank counters, write the line."""
    window = trainer._window
    steps, seconds = max(window["steps"], 1), max(window["seconds"], 1e-9)
    remaining = trainer.config.schedule.total_steps - state.step
    # The contract's keys first, so every line starts the same way.
    metrics: dict[str, Any] = {"step": state.step}
    for key in ("loss", "lr", "grad_norm"):
        metrics[key] = step_metrics[key]
    metrics.update(step_metrics)
    metrics.update(
        samples_per_s=steps * trainer.batch.global_batch / seconds,
        step_time_ms=1000.0 * seconds / steps,
        data_time_ms=1000.0 * window["data_s"] / steps,
        samples=state.samples,
        skipped_steps=state.skipped_steps,
        train_s=state.train_s,
        eta_s=remaining * seconds / steps,
    )
    metrics.update(_data_skips(trainer))
    metrics.update(memory_gib(trainer.ctx.device))
    trainer.writer.log(metrics)
    _reset_window(trainer, state)


def _data_skips(trainer: Trainer) -> dict[str, int]:
    """Samples the data left out: `data_samples_skipped` counts those dropped from the index
    (unreadable or unusable, the same count on every rank), `data_decode_errors` the images
    replaced after a decoder error, summed over the data-parallel ranks. Collective over the
    dp group: every rank calls it on the same steps."""
    stats = trainer.loader.stats
    count = torch.tensor([float(stats.decode_errors)], device=trainer.ctx.device)
    if trainer.ctx.dp > 1:
        dist.all_reduce(count, group=trainer.ctx.dp_group)  # [1] -> [1], summed over dp
    return {
        "data_samples_skipped": int(stats.samples_skipped),
        "data_decode_errors": int(count.item()),
    }
