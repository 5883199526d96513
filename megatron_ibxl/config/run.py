"""Evaluation, logging and checkpoint sections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class EvalConfig:
    """Zero-shot evaluation during and after training."""

    task: Literal["none", "imagenet", "coco"] = "none"
    """`imagenet`: zero-shot classification of an ImageFolder tree; `coco`: retrieval."""
    data: str = ""
    """The evaluation data folder (an ImageFolder root, or a COCO folder)."""
    classes: str = ""
    """A class-name file for ImageFolder sets other than ImageNet-1K (one `folder<TAB>name`
    per line); empty means the ImageNet-1K names shipped with the package."""
    templates: str = ""
    """A prompt-template file (one template a line, `{}` for the class name); empty means
    the ImageNet templates shipped with the package."""
    every_steps: int = 0
    """Evaluate every N optimizer steps; 0 evaluates only at the end."""
    batch_size: int = 64
    """Images or captions per rank per evaluation batch."""


@dataclass
class LoggingConfig:
    """Where the run writes and how it reports."""

    run_dir: str = "runs/default"
    """Metrics, TensorBoard events, checkpoints and plots go here."""
    log_every: int = 1
    """Write a metrics line every N optimizer steps."""
    tensorboard: bool = True
    """Write TensorBoard event files under run_dir/tb."""
    wandb: bool = False
    """Also log to Weights & Biases (only when the package is installed)."""
    wandb_project: str = "megatron-ibxl"
    """Weights & Biases project name."""
    progress: Literal["auto", "bar", "plain"] = "auto"
    """Progress bar on a terminal, plain lines otherwise (`auto`)."""


@dataclass
class CheckpointConfig:
    """Distributed checkpoints under run_dir/checkpoints/step_N."""

    every_steps: int = 1000
    """Save every N optimizer steps (and at the end, and on SIGTERM/SIGUSR1); 0: end only."""
    keep_last: int = 3
    """Keep this many most recent checkpoints; older ones are deleted. At least 1."""
    resume: bool = True
    """Resume from run_dir/checkpoints/latest when it exists."""
    load: str = ""
    """Initialise from this checkpoint directory instead (weights only), when not resuming."""
