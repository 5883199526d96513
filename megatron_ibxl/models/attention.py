"""Core attention for the local layer spec: FlashAttention-2 on CUDA when installed, torch SDPA
otherwise.

Shapes: `s` sequence, `b` pairs per rank per micro-batch, `n` attention heads (`n/tp` on each
tensor-parallel rank), `hn` head width, `h` hidden width.

The module takes the place of Megatron-core's `DotProductAttention` (which allocates its score
buffer on a CUDA device) inside Megatron's `SelfAttention`, with the same constructor and
forward arguments. Query, key and value arrive as `[s, b, n/tp, hn]`; the context leaves as
`[s, b, n/tp * hn]`. Attention is never sequence-parallel: Megatron's column-parallel QKV
projection has already gathered the whole sequence.

Mask contract shared by both towers and both layer specs: `attention_mask` is a boolean
`[b, 1, 1, s]` key-padding mask, True where the key is padding and must be ignored (Megatron's
and Transformer Engine's convention). Padding is always a suffix of the sequence. Causality is
not in the mask: it comes from the layer's `attn_mask_type` (`causal` or `padding_causal`).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

try:  # FlashAttention-2 is a CUDA-only optional extra.
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    HAVE_FLASH_ATTN = True
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = flash_attn_varlen_func = None
    HAVE_FLASH_ATTN = False

_CAUSAL_TYPES = (AttnMaskType.causal, AttnMaskType.padding_causal)
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


class LocalCoreAttention(MegatronModule):
    """Softmax attention over this rank's heads, masked by key padding and optional causality.

    Constructor arguments are those Megatron's `SelfAttention` passes to its core attention;
    `attention_type`, `cp_comm_type` and `pg_collection` are accepted and unused (no context
    parallelism). The tensor-parallel size comes from `config.tensor_model_parallel_size`.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        tp = config.tensor_model_parallel_size
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.heads_per_rank = divide(config.num_attention_heads, tp)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """Attend. query/key/value `[s, b, n/tp, hn]`, attention_mask `[b, 1, 1, s]` or None;
        returns `[s, b, n/tp * hn]`."""
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("LocalCoreAttention takes neither bias nor packed input")
        causal = (attn_mask_type or self.attn_mask_type) in _CAUSAL_TYPES
        dropout_p = self.dropout_p if self.training else 0.0

        # Without sequence parallelism the activations are replicated over tp but the heads
        # are not, so dropout draws from the per-rank model-parallel RNG stream, as Megatron
        # does; under sequence parallelism the whole block already runs in that stream.
        forks = dropout_p > 0 and not self.config.sequence_parallel
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if forks else contextlib.nullcontext()
        with rng:
            use_flash = HAVE_FLASH_ATTN and query.is_cuda and query.dtype in _FLASH_DTYPES
            attend = _flash_attention if use_flash else _sdpa_attention
            context = attend(
                query, key, value, attention_mask, causal, dropout_p, self.softmax_scale
            )
        s, b = context.shape[:2]
        return context.reshape(s, b, self.heads_per_rank * self.head_dim)  # [s, b, n/tp * hn]


def _sdpa_attention(query, key, value, attention_mask, causal, dropout_p, scale):
    """torch SDPA; returns `[s, b, n/tp, hn]`."""
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [s, b, n, hn] -> [b, n, s, hn]
    allowed = None
    if attention_mask is not None:
        allowed = ~attention_mask  # [b, 1, 1, s], True where the key takes part
        if causal:
            s = q.shape[2]
            lower = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
            allowed = allowed & lower  # [b, 1, 1, s] & [s, s] -> [b, 1, s, s]
    context = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=allowed,
        dropout_p=dropout_p,
        is_causal=causal and allowed is None,
        scale=scale,
    )  # [b, n, s, hn]
    return context.permute(2, 0, 1, 3)  # [b, n, s, hn] -> [s, b, n, hn]


def _flash_attention(query, key, value, attention_mask, causal, dropout_p, scale):
    """FlashAttention-2 (varlen over the real tokens when there is padding); padded query rows
    come back as zeros. Returns `[s, b, n/tp, hn]`."""
    s, b, n, hn = query.shape
    q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [s, b, n, hn] -> [b, s, n, hn]
    if attention_mask is None:
        context = flash_attn_func(
            q.contiguous(), k.contiguous(), v.contiguous(), dropout_p, scale, causal=causal
        )  # [b, s, n, hn]
        return context.transpose(0, 1)

    # Unpad: keep the real tokens of every sequence, packed, with cumulative offsets.
    keep = ~attention_mask.reshape(b, s)  # [b, 1, 1, s] -> [b, s]
    lengths = keep.sum(dim=1, dtype=torch.int32)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    index = keep.reshape(-1).nonzero().squeeze(1)
    q, k, v = (t.reshape(b * s, n, hn).index_select(0, index) for t in (q, k, v))  # [t, n, hn]
    packed = flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, s, s, dropout_p, scale, causal=causal
    )  # [t, n, hn]
    context = packed.new_zeros(b * s, n, hn).index_copy(0, index, packed)
    return context.reshape(b, s, n, hn).transpose(0, 1)  # [b, s, n, hn] -> [s, b, n, hn]
