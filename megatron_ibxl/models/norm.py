"""LayerNorm for the local layer spec that works under sequence parallelism.

Shapes: `s` sequence (`s/tp` per rank under sequence parallelism), `b` pairs per rank per
micro-batch, `h` hidden width.

Megatron-core's `WrappedTorchNorm` refuses to build with sequence parallelism, and Apex's
fused norm is not available here. This norm is a plain LayerNorm whose parameters carry
Megatron's `sequence_parallel` attribute: under sequence parallelism each tensor-parallel rank
normalises only its `s/tp` slice, so its weight and bias gradients are partial sums that the
sharding code all-reduces over the tensor-parallel group (as Megatron's own finalize step does
for every parameter marked this way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn


class TowerLayerNorm(nn.Module):
    """LayerNorm over the last dimension with Megatron's sequence-parallel marking.

    Args:
        config: the tower's TransformerConfig (reads `sequence_parallel`, `params_dtype`).
        hidden_size: h, the normalised width.
        eps: added to the variance.

    The parameters are replicated over the tensor-parallel group; with
    `config.sequence_parallel` they carry `sequence_parallel = True`.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        dtype = config.params_dtype
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype))
        for param in (self.weight, self.bias):
            param.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Normalise `hidden` ([s, b, h], or [s/tp, b, h] under sequence parallelism)."""
        return F.layer_norm(hidden, (hidden.shape[-1],), self.weight, self.bias, self.eps)
