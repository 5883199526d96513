"""Contrastive losses (InfoNCE, sigmoid), serial and distributed over data parallelism."""

from megatron_ibxl.losses.contrastive import (
    LossOutput,
    all_gather_rows,
    clamp_logit_scale_,
    contrastive_loss,
    infonce_loss_serial,
    sigmoid_loss_serial,
)

__all__ = [
    "LossOutput",
    "all_gather_rows",
    "clamp_logit_scale_",
    "contrastive_loss",
    "infonce_loss_serial",
    "sigmoid_loss_serial",
]
