"""Learning-rate schedule: linear warmup, then cosine decay to `schedule.min_lr`.

With peak `optimizer.lr` = L, warmup W, total T and minimum m, the k-th optimizer step
(k = 1, 2, ...) uses

    lr(k) = L * k / W                                       for k <= W (linear from 0)
    lr(k) = m + (L - m) * (1 + cos(pi * (k - W) / (T - W))) / 2   for W < k <= T
    lr(k) = m                                               for k > T

(the cosine of Loshchilov & Hutter 2017, "SGDR", eq. 5, without restarts). A skipped step
(non-finite loss or gradient norm) does not advance the schedule.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler

from megatron_ibxl.config import RunConfig


def lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float) -> float:
    """The learning rate of optimizer step `step` (1-based), by the formula in the module doc."""
    if warmup_steps > 0 and step <= warmup_steps:
        return peak_lr * step / warmup_steps
    if step > total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineSchedule(LRScheduler):
    """Sets every param group's lr to `lr_at(last_epoch + 1, ...)`.

    `last_epoch` counts completed optimizer steps (0 before the first). `skipped_steps`
    counts steps skipped for a non-finite loss or gradient norm; both are in `state_dict()`
    and so in checkpoints.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        peak_lr: float,
        warmup_steps: int,
        total_steps: int,
        min_lr: float,
    ):
        self.peak_lr = peak_lr
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr = min_lr
        self.skipped_steps = 0
        super().__init__(optimizer)

    def current_lr(self) -> float:
        """The learning rate the next optimizer step uses."""
        return lr_at(
            self.last_epoch + 1, self.peak_lr, self.warmup_steps, self.total_steps, self.min_lr
        )

    def get_lr(self) -> list[float]:
        """One learning rate per param group (all the same)."""
        return [self.current_lr() for _ in self.optimizer.param_groups]

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the step counters of a checkpoint but keep this schedule's shape (peak,
        warmup, total, minimum) from the config, so a run resumed with a longer
        `schedule.total_steps` follows the new cosine instead of the saved one. The saved
        state may come from another number of param groups (zero 0 and zero 3 group the
        parameters differently); every group gets the same lr."""
        shape = {k: getattr(self, k) for k in ("peak_lr", "warmup_steps", "total_steps", "min_lr")}
        base_lrs = self.base_lrs
        super().load_state_dict(state_dict)
        self.__dict__.update(shape)
        self.base_lrs = base_lrs
        self._last_lr = self.get_lr()


def build_scheduler(optimizer: torch.optim.Optimizer, config: RunConfig) -> WarmupCosineSchedule:
    """The warmup-cosine schedule of `config.schedule` around `optimizer` (peak
    `config.optimizer.lr`). The optimizer's lr is set for the first step right away."""
    schedule = config.schedule
    return WarmupCosineSchedule(
        optimizer,
        peak_lr=config.optimizer.lr,
        warmup_steps=schedule.warmup_steps,
        total_steps=schedule.total_steps,
        min_lr=schedule.min_lr,
    )
