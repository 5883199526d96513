"""The image tower: a ViT on Megatron-core's TransformerBlock.

Shapes: `b` pairs per rank per micro-batch, `s` sequence (patches plus the class token;
`s_pad` after padding to a multiple of tp; `s_pad/tp` per rank under sequence parallelism),
`h` hidden width, `c` channels, `p` patch side, `n` heads.

images [b, c, H, W] -> patches [s, b, h] (+ positions) -> pad -> scatter over tp (SP only)
-> TransformerBlock (pre-norm layers, final LayerNorm) -> gather (SP only) -> pool -> [b, h]

The pooled output is replicated over the tensor-parallel ranks. The class token, positions
and patch embedding are replicated parameters that see the whole sequence on every rank, so
their gradients are complete without any tensor-parallel reduction.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_block import TransformerBlock
from torch import nn

from megatron_ibxl.config import ModelConfig, ParallelConfig
from megatron_ibxl.models.layer_specs import (
    LayerBackend,
    tower_block_spec,
    tower_transformer_config,
)
from megatron_ibxl.models.pooling import key_padding_mask, pad_sequence, padded_length, pool_mean


class PatchEmbedding(nn.Module):
    """Patches of `p x p` pixels to h-wide tokens, by a strided convolution or by a linear layer
    over flattened patches (flattened in (channel, row, column) order, the convolution's weight
    layout, so the two hold the same numbers)."""

    def __init__(self, kind: str, channels: int, patch: int, hidden: int):
        super().__init__()
        self.kind, self.patch = kind, patch
        if kind == "conv":
            self.proj = nn.Conv2d(channels, hidden, kernel_size=patch, stride=patch, bias=True)
        else:
            self.proj = nn.Linear(channels * patch * patch, hidden, bias=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images `[b, c, H, W]` -> tokens `[s, b, h]` with s = (H/p) * (W/p), row-major."""
        if self.kind == "conv":
            grid = self.proj(images)  # [b, c, H, W] -> [b, h, H/p, W/p]
            return grid.flatten(2).permute(2, 0, 1)  # [b, h, H/p, W/p] -> [s, b, h]
        b, c, height, width = images.shape
        p = self.patch
        patches = images.reshape(b, c, height // p, p, width // p, p)
        patches = patches.permute(2, 4, 0, 1, 3, 5)  # -> [H/p, W/p, b, c, p, p]
        patches = patches.reshape(-1, b, c * p * p)  # -> [s, b, c*p*p]
        return self.proj(patches)  # [s, b, c*p*p] @ [c*p*p, h] -> [s, b, h]


class VisionTower(nn.Module):
    """ViT image tower; `forward(images)` returns the pooled `[b, h]`, replicated over tp.

    Args:
        model: the model section (reads `vision`, dropouts, `norm_eps`).
        parallel: the parallel section (reads `sequence_parallel`, `recompute`).
        tp: tensor-parallel size of the current Megatron-core parallel state.
        backend: `te` or `local` layer spec (models/layer_specs.py).
    """

    def __init__(
        self, model: ModelConfig, parallel: ParallelConfig, tp: int, backend: LayerBackend
    ):
        super().__init__()
        vision = model.vision
        self.vision = vision
        self.tp = tp
        self.transformer_config = tower_transformer_config(
            hidden=vision.hidden,
            num_layers=vision.num_layers,
            num_heads=vision.num_heads,
            mlp_hidden=vision.mlp_hidden,
            model=model,
            parallel=parallel,
            tp=tp,
            backend=backend,
        )
        self.sequence_parallel = self.transformer_config.sequence_parallel
        self.patch_embed = PatchEmbedding(
            vision.patch_embed, vision.channels, vision.patch_size, vision.hidden
        )
        self.class_token = (
            nn.Parameter(torch.zeros(vision.hidden)) if vision.use_class_token else None
        )
        self.position_embeddings = nn.Parameter(torch.zeros(vision.seq_length, vision.hidden))
        self.block = TransformerBlock(
            self.transformer_config, tower_block_spec(vision.num_layers, False, backend)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images `[b, c, H, W]` (H = W = model.vision.image_size) -> pooled `[b, h]`."""
        vision = self.vision
        expected = (vision.channels, vision.image_size, vision.image_size)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be [b, {expected}]; got {list(images.shape)}")
        tokens = self.patch_embed(images)  # [s_patches, b, h]
        b = tokens.shape[1]
        if self.class_token is not None:
            cls = self.class_token.to(tokens.dtype).expand(1, b, -1)  # [h] -> [1, b, h]
            tokens = torch.cat([cls, tokens], dim=0)  # -> [s, b, h]
        tokens = tokens + self.position_embeddings.to(tokens.dtype)[:, None, :]  # + [s, 1, h]

        hidden = self._run_block(tokens)  # [s, b, h]
        if vision.pool == "cls":
            return hidden[0]  # [s, b, h] -> [b, h]
        return pool_mean(hidden, int(vision.use_class_token), vision.num_patches)

    def _run_block(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pad to a multiple of tp (under sequence parallelism), mask the padding, run the
        block, and return the real rows `[s, b, h]`, whole on every tp rank."""
        s, b, _ = tokens.shape
        s_pad = padded_length(s, self.tp) if self.sequence_parallel else s
        lengths = torch.full((b,), s, dtype=torch.long, device=tokens.device)
        mask = key_padding_mask(lengths, s_pad)  # [b, 1, 1, s_pad]
        hidden = pad_sequence(tokens, s_pad)  # [s_pad, b, h]
        if self.sequence_parallel:
            hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden)  # [s_pad/tp,b,h]
        hidden = self.block(hidden, attention_mask=mask)
        if self.sequence_parallel:
            # The pooled rows feed replicated heads: every rank's gradient is already whole, so
            # the backward splits it rather than reduce-scattering it.
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False
            )  # [s_pad/tp, b, h] -> [s_pad, b, h]
        return hidden[:s]
