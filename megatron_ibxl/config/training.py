"""Optimizer, schedule and loss sections."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass
class OptimizerConfig:
    """AdamW with fp32 master weights."""

    lr: float = 5e-4
    """Peak learning rate, reached at the end of warmup. Must be > 0."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay; not applied to norms, biases, position embeddings, the class
    token, the logit scale or the sigmoid bias."""
    clip_grad: float = 1.0
    """Clip the global gradient norm (over all shards) to this value; 0 disables clipping."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """Compute dtype. Master weights, optimizer state and gradient reduction stay fp32."""


@dataclass
class ScheduleConfig:
    """Linear warmup, then cosine decay to `min_lr`."""

    warmup_steps: int = 5000
    """Optimizer steps of linear warmup from 0 to `optimizer.lr`."""
    total_steps: int = 100000
    """Optimizer steps of the run; the cosine reaches `min_lr` here. Must exceed warmup."""
    min_lr: float = 1e-6
    """Learning rate at the end of the cosine; at most `optimizer.lr`."""


@dataclass
class LossConfig:
    """The contrastive objective."""

    kind: Literal["infonce", "sigmoid"] = "infonce"
    """Symmetric InfoNCE (CLIP) or the pairwise sigmoid loss (SigLIP)."""
    negatives: Literal["global", "micro"] = "global"
    """`global`: negatives are the whole global batch, also under gradient accumulation
    (embeddings cached, then each micro-batch re-run with gradients). `micro`: negatives are
    the micro-batch across data-parallel ranks only."""
    sigmoid_logit_scale_init: float = math.log(10.0)
    """Sigmoid loss: initial log inverse temperature (SigLIP: ln 10)."""
    sigmoid_bias_init: float = -10.0
    """Sigmoid loss: initial learnable bias (SigLIP: -10)."""
