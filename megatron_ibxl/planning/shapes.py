"""The two towers reduced to the numbers the planner's formulas need.

Shape letters (as everywhere in megatron-ibxl): b pairs per data-parallel rank per
micro-batch, B pairs in the contrastive batch, s sequence, h hidden, d shared embedding,
n heads; f is the MLP width and t the tensor-parallel size.

Under sequence parallelism each tower's sequence is padded to a multiple of t (the padded
tokens are masked but still computed and stored), so the hardware sees `seq` tokens while
the model's useful work is `seq_model` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ibxl.config import RunConfig


@dataclass(frozen=True)
class TowerShape:
    """One tower: sizes, and the parameters one tensor-parallel rank holds."""

    name: str
    """`vision` or `text`."""
    seq: int
    """Tokens per sample as computed (s, padded to a multiple of t under sequence
    parallelism)."""
    seq_model: int
    """Tokens per sample the model needs (257 = 256 patches + class token; 77)."""
    hidden: int
    """h."""
    mlp_hidden: int
    """f."""
    heads: int
    """n."""
    layers: int
    """Transformer blocks."""
    layer_params_rank: int
    """Parameters of one block held by one tensor-parallel rank."""
    embed_params_rank: int
    """Input embedding parameters on one rank (patch or token table, positions, class)."""
    final_params_rank: int
    """Final LayerNorm and projection head parameters on one rank (replicated over t)."""
    input_elements: int
    """Elements per sample of the tower input kept for backward (pixels for the patch
    embedding's weight gradient; 0 for token ids)."""
    input_gemm_flops: int
    """Forward FLOPs per sample of the input embedding (the patch projection; 0 for a
    table lookup)."""


def layer_params_per_rank(hidden: int, mlp_hidden: int, tp: int) -> int:
    """Parameters of one transformer block on one tensor-parallel rank.

    Column-parallel QKV (3h^2 + 3h) and fc1 (hf + f) and row-parallel projection and fc2
    weights (h^2 + hf) split over t; the two row-parallel biases and two LayerNorms (6h)
    are replicated. At t = 1 this is param_count.layer_params: 4h^2 + 2hf + 9h + f.
    """
    h, f = hidden, mlp_hidden
    return (4 * h * h + 2 * h * f + 3 * h + f) // tp + 6 * h


def _pad(seq: int, tp: int, sequence_parallel: bool) -> int:
    if not sequence_parallel or tp <= 1:
        return seq
    return -(-seq // tp) * tp


def tower_shapes(config: RunConfig, tp: int) -> tuple[TowerShape, TowerShape]:
    """The vision and text towers of `config` under tensor-parallel size `tp`."""
    model, sp = config.model, config.parallel.sequence_parallel
    vision, text, d = model.vision, model.text, model.embed_dim
    patch_inputs = vision.channels * vision.patch_size**2
    vision_shape = TowerShape(
        name="vision",
        seq=_pad(vision.seq_length, tp, sp),
        seq_model=vision.seq_length,
        hidden=vision.hidden,
        mlp_hidden=vision.mlp_hidden,
        heads=vision.num_heads,
        layers=vision.num_layers,
        layer_params_rank=layer_params_per_rank(vision.hidden, vision.mlp_hidden, tp),
        # Patch projection, class token and positions are small and replicated over t.
        embed_params_rank=(patch_inputs + 1) * vision.hidden
        + vision.hidden * int(vision.use_class_token)
        + vision.seq_length * vision.hidden,
        final_params_rank=2 * vision.hidden + vision.hidden * d + 1,
        input_elements=vision.channels * vision.image_size**2,
        input_gemm_flops=2 * vision.num_patches * patch_inputs * vision.hidden,
    )
    text_shape = TowerShape(
        name="text",
        seq=_pad(text.context_length, tp, sp),
        seq_model=text.context_length,
        hidden=text.hidden,
        mlp_hidden=text.mlp_hidden,
        heads=text.num_heads,
        layers=text.num_layers,
        layer_params_rank=layer_params_per_rank(text.hidden, text.mlp_hidden, tp),
        # The token table is vocabulary-parallel; positions are replicated.
        embed_params_rank=text.padded_vocab_size(tp) * text.hidden // tp
        + text.context_length * text.hidden,
        final_params_rank=2 * text.hidden + text.hidden * d,
        input_elements=0,
        input_gemm_flops=0,
    )
    return vision_shape, text_shape


def stage_layers(tower: TowerShape, pp: int, stage: int) -> int:
    """Blocks of `tower` on pipeline stage `stage` when each tower is cut into `pp` runs of
    consecutive blocks (earlier stages take the remainder)."""
    base, extra = divmod(tower.layers, pp)
    return base + int(stage < extra)
