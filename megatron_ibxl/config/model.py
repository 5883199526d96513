"""Model section: the vision tower, the text tower and the shared embedding."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class VisionConfig:
    """A ViT image tower."""

    image_size: int = 224
    """Input side in pixels (square images). Must divide by `patch_size`."""
    patch_size: int = 14
    """Patch side in pixels; the sequence is (image_size / patch_size)^2 patches."""
    channels: int = 3
    """Input channels (3 for RGB)."""
    hidden: int = 4096
    """Transformer width h. Must divide by `num_heads`."""
    num_layers: int = 48
    """Transformer blocks."""
    num_heads: int = 32
    """Attention heads n. `parallel.tp` must divide it."""
    mlp_hidden: int = 16384
    """MLP inner width. `parallel.tp` must divide it."""
    patch_embed: Literal["conv", "linear"] = "conv"
    """Patch embedding: a strided convolution, or a linear layer over flattened patches."""
    use_class_token: bool = True
    """Prepend a learned class token to the patch sequence."""
    pool: Literal["cls", "mean"] = "cls"
    """Pooling: the class token (needs `use_class_token`), or the mean over real patches."""

    @property
    def num_patches(self) -> int:
        """Patches per image (0 when the image size does not divide by the patch size)."""
        if self.patch_size <= 0 or self.image_size % self.patch_size:
            return 0
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq_length(self) -> int:
        """Tokens per image: patches plus the class token."""
        return self.num_patches + int(self.use_class_token)


@dataclass
class TextConfig:
    """A causal transformer text tower, pooled at the end-of-text token."""

    vocab_size: int = 50257
    """Tokenizer vocabulary. The embedding table is padded (see `vocab_pad_multiple`)."""
    vocab_pad_multiple: int = 128
    """The embedding table is padded to a multiple of lcm(vocab_pad_multiple, parallel.tp),
    so that its rows split evenly over the tensor-parallel ranks. For tp a power of two up to
    this multiple the padded size does not depend on tp, so checkpoints reshard across tp."""
    context_length: int = 77
    """Tokens per caption, end-of-text included."""
    hidden: int = 5120
    """Transformer width h. Must divide by `num_heads`."""
    num_layers: int = 64
    """Transformer blocks."""
    num_heads: int = 40
    """Attention heads n. `parallel.tp` must divide it."""
    mlp_hidden: int = 20480
    """MLP inner width. `parallel.tp` must divide it."""

    def padded_vocab_size(self, tp: int) -> int:
        """Rows of the embedding table under tensor parallel size `tp`."""
        multiple = math.lcm(self.vocab_pad_multiple, tp)
        return -(-self.vocab_size // multiple) * multiple


@dataclass
class ModelConfig:
    """The dual encoder: two towers, two projection heads and a learnable temperature."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    """Image tower."""
    text: TextConfig = field(default_factory=TextConfig)
    """Text tower."""
    embed_dim: int = 1024
    """Shared embedding width d that both projection heads map to."""
    logit_scale_init: float = math.log(1 / 0.07)
    """Initial log of the inverse temperature (CLIP: ln(1/0.07))."""
    logit_scale_max: float = math.log(100.0)
    """Clamp of the log inverse temperature (CLIP: ln 100)."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP, in [0, 1)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities, in [0, 1)."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    init_seed: int = 1234
    """Seed of the weight initialisation; the same seed gives the same full-size weights under
    any tensor-parallel size."""
