"""Building a run's pieces from its configuration, resuming them, and saving them.

The order is fixed, because each step needs the one before: the tokenizer, the towers
(tensor-parallel, on the device), the data-parallel sharding (ZeRO-3 or replicated), the
optimizer over the sharded parameters, the schedule around the optimizer; then the latest
checkpoint is loaded into all of them, and only then is the data loader built at the saved
data position.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_ibxl.config import BatchLayout, RunConfig
from megatron_ibxl.parallel.setup import ParallelContext
from megatron_ibxl.training.loop import TrainState

logger = logging.getLogger(__name__)


@dataclass
class TrainingParts:
    """The built pieces of a run, before the loop starts."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    grad_sync: Any
    tokenizer: Any
    batch: BatchLayout
    make_loader: Callable[[dict | None], Any]
    """Builds this rank's training loader at a saved data position (None: the start)."""
    loader: Any = None
    """The loader, once built."""


def build_training(config: RunConfig, batch: BatchLayout, ctx: ParallelContext) -> TrainingParts:
    """Tokenizer, towers, sharding, optimizer and schedule (see the module doc for the order).

    Raises DataError for a tokenizer that cannot be read, and ConfigError where a piece
    rejects the configuration.
    """
    from megatron_ibxl.data.loader import build_train_loader
    from megatron_ibxl.data.tokenizer import load_tokenizer
    from megatron_ibxl.models import build_dual_encoder
    from megatron_ibxl.parallel.sharding import shard_model
    from megatron_ibxl.training.optimizer import build_optimizer
    from megatron_ibxl.training.schedule import build_scheduler

    tokenizer = load_tokenizer(config.data.tokenizer)
    model = build_dual_encoder(config).to(ctx.device)
    grad_sync = shard_model(model, config, ctx)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)

    def make_loader(position: dict | None):
        return build_train_loader(config, ctx.dp_rank, ctx.dp, tokenizer, position)

    return TrainingParts(model, optimizer, scheduler, grad_sync, tokenizer, batch, make_loader)


def checkpoint_root(config: RunConfig) -> Path:
    """RUN_DIR/checkpoints, where step_N folders are written."""
    return Path(config.logging.run_dir) / "checkpoints"


def resume(
    config: RunConfig, ctx: ParallelContext, parts: TrainingParts
) -> tuple[TrainState, dict | None]:
    """Load the run's latest checkpoint into the parts, when there is one and
    `checkpoint.resume` is on; else `checkpoint.load` (weights only) when set.

    Returns the training counters and the saved data position (None for a fresh start).
    Raises CheckpointError for a checkpoint that cannot be loaded.
    """
    from megatron_ibxl.training.checkpoint import find_latest, load_checkpoint

    run_dir = Path(config.logging.run_dir)
    latest = find_latest(run_dir) if config.checkpoint.resume else None
    if latest is not None:
        extra = load_checkpoint(latest, parts.model, parts.optimizer, parts.scheduler, ctx)
        state = TrainState.from_dict(extra.get("train_state", {}))
        saved_hash = extra.get("config_hash")
        if saved_hash and saved_hash != config.digest():
            logger.warning(
                "rank %d: resuming from %s, written under config hash %s; the config now "
                "hashes to %s (changed keys apply from here on)",
                ctx.rank,
                latest,
                saved_hash,
                config.digest(),
            )
        logger.info("resumed from %s at step %d", latest, state.step)
        return state, extra.get("loader")
    if config.checkpoint.load:
        load_checkpoint(Path(config.checkpoint.load), parts.model, None, None, ctx)
        logger.info("initialised weights from %s (step 0, fresh optimizer)", config.checkpoint.load)
    return TrainState(), None


def make_saver(
    config: RunConfig, ctx: ParallelContext, parts: TrainingParts
) -> Callable[[TrainState], None]:
    """A function that checkpoints the run at the current state (collective)."""
    from megatron_ibxl.training.checkpoint import save_checkpoint

    def save(state: TrainState) -> None:
        extra = {
            "train_state": state.to_dict(),
            "loader": parts.loader.state_dict(),
            "config_hash": config.digest(),
        }
        save_checkpoint(
            Path(config.logging.run_dir),
            state.step,
            parts.model,
            parts.optimizer,
            parts.scheduler,
            extra,
            config,
            ctx,
        )

    return save


_EVAL_NAMES = {
    "acc1": "zero_shot_top1",
    "acc5": "zero_shot_top5",
    "mean_per_class_recall": "zero_shot_mean_per_class_recall",
    "eval_time_s": "eval_time_s",
}
"""Metric names of the evaluation, as they appear in metrics.jsonl. Retrieval recalls keep
their names behind an `eval_` prefix; counts (images, classes) are left to the log line of
the evaluation itself, except unreadable images, which a run should notice."""


def _metrics_line_name(key: str) -> str | None:
    if key in _EVAL_NAMES:
        return _EVAL_NAMES[key]
    if "recall" in key or "unreadable" in key:
        return f"eval_{key}"
    return None


def evaluation_fn(
    config: RunConfig, ctx: ParallelContext, parts: TrainingParts
) -> Callable[[], dict[str, float]] | None:
    """Zero-shot evaluation on `eval.data` returning metrics-line keys (`zero_shot_top1`,
    ...), or None when `eval.task` is `none`. Collective over all ranks."""
    if config.eval.task == "none":
        return None
    from megatron_ibxl.evaluation import evaluate_zero_shot

    def evaluate() -> dict[str, float]:
        result = evaluate_zero_shot(parts.model, config, ctx, parts.tokenizer)
        return {
            _metrics_line_name(key): float(value)
            for key, value in result.items()
            if _metrics_line_name(key) and isinstance(value, (int, float))
        }

    return evaluate
