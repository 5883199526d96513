"""Parameter counts of the dual encoder computed from its configuration alone.

The planner uses these counts; a test checks them against instantiated models. Per
transformer layer of width h and MLP width f (Megatron-core local layer spec, with biases):

    2 LayerNorms 4h + QKV (3h^2 + 3h) + output projection (h^2 + h) + MLP (2hf + f + h)
    = 4h^2 + 2hf + 9h + f
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ibxl.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts (full model, not per rank)."""

    vision: int
    """Image tower: patch embedding, class token, positions, layers, final norm."""
    text: int
    """Text tower: padded token embedding, positions, layers, final norm."""
    heads: int
    """Both projection heads, the logit scale, and the sigmoid bias when used."""

    @property
    def total(self) -> int:
        """All parameters."""
        return self.vision + self.text + self.heads


def layer_params(hidden: int, mlp_hidden: int) -> int:
    """Parameters of one transformer layer (formula in the module docstring)."""
    return 4 * hidden * hidden + 2 * hidden * mlp_hidden + 9 * hidden + mlp_hidden


def count_parameters(model: ModelConfig, tp: int = 1, loss_kind: str = "infonce") -> ParamCounts:
    """Count the parameters of the dual encoder described by `model` under tensor parallel
    size `tp` (which sets the padding of the vocabulary), without allocating anything."""
    vision, text = model.vision, model.text
    patch_embed = vision.channels * vision.patch_size**2 * vision.hidden + vision.hidden
    vision_count = (
        patch_embed
        + vision.hidden * int(vision.use_class_token)
        + vision.seq_length * vision.hidden
        + vision.num_layers * layer_params(vision.hidden, vision.mlp_hidden)
        + 2 * vision.hidden
    )
    text_count = (
        text.padded_vocab_size(tp) * text.hidden
        + text.context_length * text.hidden
        + text.num_layers * layer_params(text.hidden, text.mlp_hidden)
        + 2 * text.hidden
    )
    heads = (vision.hidden + text.hidden) * model.embed_dim + 1 + int(loss_kind == "sigmoid")
    return ParamCounts(vision_count, text_count, heads)
