"""Floating-point operations of the dual encoder: per layer, per micro-batch, per step.

Counting follows Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
Clusters Using Megatron-LM" (section 5.1 and appendix): a matmul of [m, k] by [k, n] costs
2mkn FLOPs; a transformer layer's forward over b sequences of s tokens is

    QKV 6bsh^2 + attention scores 2bs^2h + attention over values 2bs^2h
    + output projection 2bsh^2 + MLP 4bshf          (= 24bsh^2 + 4bs^2h when f = 4h)

and backward costs twice the forward, so one step of a model of l layers without
recomputation is 72 B s l h^2 (1 + s/6h + V/12hl) (their equation, V/12hl being the
language-model head). Full activation recomputation runs the forward again: the factor 72
becomes 96. Adapted to this model:

- Two towers, each counted with its own s, h, f and l; there is no vocabulary head (the text
  tower is pooled at the end-of-text token), so the V term is absent. The patch projection
  is a [b*256, 3*14*14] by [3*14*14, h] matmul whose backward is the weight gradient only
  (pixels need no gradient): twice its forward, not three times.
- Selective recomputation repeats only the attention core (4bs^2h), full recomputation the
  whole layer forward.
- Two linear heads ([b, h] by [h, d]) and the contrastive logits: with global negatives the
  rank owning b*A pairs computes logits_i2t [bA, B] and logits_t2i [bA, B], each a
  [bA, d] by [d, B] matmul, once per step; with micro negatives each micro-batch computes
  [b, d] by [d, b*dp] twice.
- `loss.negatives: global` embeds every micro-batch once more without gradients: one extra
  forward per micro-batch, counted as hardware work, not as model FLOPs.

Model FLOPs (for MFU) count forward plus backward at the model's real sequence lengths (257,
77); hardware FLOPs add recomputation, the no-gradient pass and the sequence padding.
Attention is counted in full also for the causal text tower, as MFU conventions do.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ibxl.planning.shapes import TowerShape

BACKWARD_FACTOR = 2
"""Backward FLOPs per forward FLOP of a GEMM with trainable weights: the input gradient and
the weight gradient, each as large as the forward (Narayanan et al. 2021)."""


@dataclass(frozen=True)
class LayerFlops:
    """Forward FLOPs of one transformer layer over one micro-batch, whole layer (divide by
    t for one tensor-parallel rank)."""

    qkv: float
    """[s*b, h] @ [h, 3h]: 6bsh^2."""
    proj: float
    """Attention output projection [s*b, h] @ [h, h]: 2bsh^2."""
    fc1: float
    """[s*b, h] @ [h, f]: 2bshf."""
    fc2: float
    """[s*b, f] @ [f, h]: 2bshf."""
    attention: float
    """Scores [s, h/n] @ [h/n, s] and values [s, s] @ [s, h/n] per head: 4bs^2h."""

    @property
    def gemm(self) -> float:
        """The four weight GEMMs."""
        return self.qkv + self.proj + self.fc1 + self.fc2

    @property
    def forward(self) -> float:
        """The whole layer forward."""
        return self.gemm + self.attention


def layer_flops(seq: int, hidden: int, mlp_hidden: int, micro_batch: int) -> LayerFlops:
    """Forward FLOPs of one layer of width h = `hidden`, MLP width f = `mlp_hidden`, over
    b = `micro_batch` sequences of s = `seq` tokens (Narayanan et al. 2021, generalised to
    f != 4h)."""
    s, h, f, b = seq, hidden, mlp_hidden, micro_batch
    return LayerFlops(
        qkv=6.0 * b * s * h * h,
        proj=2.0 * b * s * h * h,
        fc1=2.0 * b * s * h * f,
        fc2=2.0 * b * s * h * f,
        attention=4.0 * b * s * s * h,
    )


def recompute_flops(layer: LayerFlops, recompute: str) -> float:
    """Forward FLOPs repeated in backward: the attention core (`selective`), the whole layer
    (`full`) or nothing."""
    return {"none": 0.0, "selective": layer.attention, "full": layer.forward}[recompute]


def tower_layer(tower: TowerShape, micro_batch: int, padded: bool = True) -> LayerFlops:
    """Layer FLOPs of `tower` at its computed (padded) or its model sequence length."""
    seq = tower.seq if padded else tower.seq_model
    return layer_flops(seq, tower.hidden, tower.mlp_hidden, micro_batch)


def head_flops(tower: TowerShape, embed_dim: int, micro_batch: int) -> float:
    """Forward FLOPs of one projection head: [b, h] @ [h, d]."""
    return 2.0 * micro_batch * tower.hidden * embed_dim


def loss_flops_per_rank(
    negatives: str, embed_dim: int, micro_batch: int, accumulation: int, dp: int
) -> float:
    """Forward plus backward FLOPs of the contrastive logits on one data-parallel rank per
    optimizer step (both directions, the backward twice the forward)."""
    if negatives == "global":
        rows, cols, times = micro_batch * accumulation, micro_batch * accumulation * dp, 1
    else:
        rows, cols, times = micro_batch, micro_batch * dp, accumulation
    # [rows, d] @ [d, cols] -> [rows, cols], once per direction.
    forward = 2 * (2.0 * rows * embed_dim * cols)
    return times * forward * (1 + BACKWARD_FACTOR)


def model_flops_per_step(
    towers: tuple[TowerShape, ...],
    embed_dim: int,
    global_batch: int,
    negatives: str,
    micro_batch: int,
    accumulation: int,
    dp: int,
) -> float:
    """Model FLOPs of one optimizer step over the whole cluster: forward and backward of
    both towers at their real sequence lengths, the heads and the logits; no recomputation,
    no no-gradient pass, no padding. The numerator of MFU."""
    per_sample = 0.0
    for tower in towers:
        layer = tower_layer(tower, 1, padded=False)
        per_sample += tower.layers * layer.forward * (1 + BACKWARD_FACTOR)
        per_sample += tower.input_gemm_flops * 2  # weight gradient only
        per_sample += head_flops(tower, embed_dim, 1) * (1 + BACKWARD_FACTOR)
    loss = dp * loss_flops_per_rank(negatives, embed_dim, micro_batch, accumulation, dp)
    return global_batch * per_sample + loss
