"""The text tower: a causal transformer on Megatron-core's TransformerBlock, pooled at the
end-of-text position.

Shapes: `b` pairs per rank per micro-batch, `s` tokens per caption (`s_pad` after padding to a
multiple of tp; `s_pad/tp` per rank under sequence parallelism), `h` hidden width, `n` heads.

tokens [b, s] -> vocabulary-parallel embedding (all-reduced over tp) + positions -> [s, b, h]
-> pad -> scatter over tp (SP only) -> TransformerBlock (causal, final LayerNorm)
-> gather (SP only) -> row lengths-1 of each caption -> [b, h]

The token embedding is Megatron-core's `VocabParallelEmbedding`: its rows are the vocabulary
padded to a multiple of `vocab_pad_multiple * tp` (as Megatron-LM pads it), split evenly over
the tensor-parallel ranks. Rows past `vocab_size` are never looked up.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import VocabParallelEmbedding
from megatron.core.transformer.transformer_block import TransformerBlock
from torch import nn

from megatron_ibxl.config import ModelConfig, ParallelConfig
from megatron_ibxl.models.layer_specs import (
    LayerBackend,
    skip_init,
    tower_block_spec,
    tower_transformer_config,
)
from megatron_ibxl.models.pooling import (
    check_lengths,
    key_padding_mask,
    pad_sequence,
    padded_length,
    pool_at_lengths,
)


class TextTower(nn.Module):
    """Causal text tower; `forward(tokens, lengths)` returns the pooled `[b, h]`, replicated
    over tp.

    Args:
        model: the model section (reads `text`, dropouts, `norm_eps`).
        parallel: the parallel section (reads `sequence_parallel`, `recompute`).
        tp: tensor-parallel size of the current Megatron-core parallel state.
        backend: `te` or `local` layer spec (models/layer_specs.py).
    """

    def __init__(
        self, model: ModelConfig, parallel: ParallelConfig, tp: int, backend: LayerBackend
    ):
        super().__init__()
        text = model.text
        self.text = text
        self.tp = tp
        self.transformer_config = tower_transformer_config(
            hidden=text.hidden,
            num_layers=text.num_layers,
            num_heads=text.num_heads,
            mlp_hidden=text.mlp_hidden,
            model=model,
            parallel=parallel,
            tp=tp,
            backend=backend,
        )
        self.sequence_parallel = self.transformer_config.sequence_parallel
        self.word_embeddings = VocabParallelEmbedding(
            text.padded_vocab_size(tp),
            text.hidden,
            init_method=skip_init,
            config=self.transformer_config,
        )
        # Lets gather_full_parameters drop the tp-dependent padding rows.
        self.word_embeddings.weight.unpadded_rows = text.vocab_size
        self.position_embeddings = nn.Parameter(torch.zeros(text.context_length, text.hidden))
        self.block = TransformerBlock(
            self.transformer_config, tower_block_spec(text.num_layers, True, backend)
        )

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens `[b, s]` (s <= context_length), lengths `[b]` in 1..s (real tokens, the
        end-of-text token included) -> pooled `[b, h]` at position lengths - 1.

        Raises ValueError for a caption longer than the context or a length out of range.
        """
        b, s = tokens.shape
        if s > self.text.context_length:
            raise ValueError(
                f"tokens have {s} positions; model.text.context_length is "
                f"{self.text.context_length}"
            )
        check_lengths(lengths, s)
        embedded = self.word_embeddings(tokens)  # [b, s] -> [b, s, h], all-reduced over tp
        embedded = embedded + self.position_embeddings[:s].to(embedded.dtype)  # + [s, h]
        hidden = embedded.transpose(0, 1).contiguous()  # [b, s, h] -> [s, b, h]

        s_pad = padded_length(s, self.tp) if self.sequence_parallel else s
        mask = key_padding_mask(lengths.to(hidden.device), s_pad)  # [b, 1, 1, s_pad]
        hidden = pad_sequence(hidden, s_pad)  # [s_pad, b, h]
        if self.sequence_parallel:
            hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden)  # [s_pad/tp,b,h]
        hidden = self.block(hidden, attention_mask=mask)
        if self.sequence_parallel:
            # Replicated consumers downstream: split the gradient, do not reduce-scatter it.
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False
            )  # [s_pad/tp, b, h] -> [s_pad, b, h]
        return pool_at_lengths(hidden, lengths)  # [s_pad, b, h] -> [b, h]
