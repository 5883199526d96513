"""Sequence padding, key-padding masks and pooling for the towers.

Shapes: `s` sequence (real tokens; `s_pad` after padding), `b` pairs per rank per
micro-batch, `h` hidden width.

Padding rules. Under sequence parallelism Megatron-core splits the sequence evenly over the
tensor-parallel ranks, so a tower pads its sequence with zero rows at the end to a multiple of
tp. Every padded position (and, in the text tower, every position at or after a caption's
length) is a masked key in attention and is never pooled. Because padded keys are masked and
every other operation is per token, the real positions compute exactly what they would
without padding.

Text pooling is at the end-of-text position of each caption, `lengths - 1`, read from the true
lengths the data pipeline supplies. It is not found by an argmax over token ids: in a GPT-2
style vocabulary the end-of-text id is the highest id, padding often reuses it, and a caption
truncated to the context length has no end-of-text token at all.
"""

from __future__ import annotations

import torch


def padded_length(s: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is at least `s`."""
    return -(-s // multiple) * multiple


def pad_sequence(hidden: torch.Tensor, s_pad: int) -> torch.Tensor:
    """Append zero rows along the sequence: `[s, b, h] -> [s_pad, b, h]`."""
    s = hidden.shape[0]
    if s_pad == s:
        return hidden
    pad = hidden.new_zeros(s_pad - s, *hidden.shape[1:])
    return torch.cat([hidden, pad], dim=0)  # [s, b, h] ++ [s_pad - s, b, h] -> [s_pad, b, h]


def key_padding_mask(lengths: torch.Tensor, s_pad: int) -> torch.Tensor:
    """Boolean `[b, 1, 1, s_pad]`, True at positions `>= lengths` (keys to ignore)."""
    positions = torch.arange(s_pad, device=lengths.device)
    return (positions[None, :] >= lengths[:, None])[:, None, None, :]  # [b, s_pad] -> [b,1,1,s_pad]


def pool_at_lengths(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Row `lengths[i] - 1` of sequence i: `[s, b, h], [b] -> [b, h]`."""
    batch = torch.arange(hidden.shape[1], device=hidden.device)
    return hidden[lengths.to(hidden.device) - 1, batch]  # [s, b, h] -> [b, h]


def pool_mean(hidden: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Mean over rows `start .. start + count - 1` (the real patches): `[s, b, h] -> [b, h]`."""
    return hidden[start : start + count].mean(dim=0)  # [count, b, h] -> [b, h]


def check_lengths(lengths: torch.Tensor, context: int) -> None:
    """Raise ValueError unless every length is in 1..context (asynchronously on CUDA, where a
    host check would stall the stream)."""
    valid = (lengths >= 1) & (lengths <= context)
    if lengths.is_cuda:
        torch._assert_async(valid.all(), "text lengths must be in 1..tokens.shape[1]")
    elif not bool(valid.all()):
        raise ValueError(
            f"text lengths must be in 1..{context} (tokens.shape[1]); got {lengths.tolist()}"
        )
