"""Memory per GPU: sharded training state, gathered parameters, activations.

Shape letters: b pairs per data-parallel rank per micro-batch, B pairs in the contrastive
batch, s sequence, h hidden, f MLP width, n heads, d shared embedding, t tensor-parallel
size, A micro-batches per step (accumulation).

Training state (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models", section 3.1): mixed-precision Adam keeps (2 + 2 + K) * Psi bytes
for Psi parameters, fp16 weights and gradients plus K = 12 bytes of fp32 master weights,
momentum and variance; ZeRO-3 divides all of it by the data-parallel size Nd. Here, per
parameter: bf16 weights 2 + fp32 master 4 + Adam moments 8 + fp32 gradients 4 (this engine
reduces gradients in fp32), so 18 * Psi / Nd under `parallel.zero: 3`. With fp32 compute the
weights are the master copy: 4 + 8 + 4. Psi is the parameters of one tensor-parallel rank of
one pipeline stage.

ZeRO-3 also holds unsharded copies:
- `parallel.gather: step` gathers the bf16 parameters once and keeps them across the A
  micro-batches, and accumulates unsharded fp32 gradients across them (FSDP2 with gradient
  sync off and an fp32 reduce dtype does this), reduce-scattering once: 2 * Psi + 4 * Psi.
- `parallel.gather: microbatch` holds only the layers in flight: the one computing, the
  prefetched ones and, in backward, one layer's unsharded gradient.

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", section 4): one layer stores sbh(34 + 5ns/h) bytes with 16-bit activations and
dropout on; sbh(10 + 24/t + 5ns/ht) with tensor parallelism; sbh(34 + 5ns/h)/t with tensor
and sequence parallelism; 34sbh/t with selective recomputation; 2sbh/t with full
recomputation (the layer input only). The 34 is, in bytes per sbh:
  LayerNorm inputs 2+2, QKV input 2, Q and K 4, V 2, projection input 2, fc1 input 2,
  GeLU input 8 and output 8 (2f/h each), two dropout masks 1+1;
and the 5ns/h is the softmax 2, its dropout mask 1 and the dropout output 2, per n*s*s.
Adapted honestly to this model: the dropout masks are counted only when dropout is on; with
`attention_kernel: flash` the [n, s, s] softmax is never stored (FlashAttention-2 keeps a
log-sum-exp of 4 bytes per n*s instead) so selective recomputation saves nothing more; the
element size follows optimizer.precision; f need not be 4h. Each tower adds its final
LayerNorm input and, for vision, the pixels kept for the patch projection's weight gradient.
Pipeline stage p of P under 1F1B holds min(P - p, A) micro-batches in flight
(Korthikanti et al., section 4.2.3). Under full recomputation the backward of a layer
re-creates that layer's activations, so one layer's worth without recomputation (the
largest) is added once as `workspace`: without it the estimate of the demo model's peak
falls 45% short of the measured one (tests/unit/test_planner_memory_real.py).

The contrastive loss adds its buffers (fp32): the local embeddings and their gradients, the
gathered [B, d] embeddings, and logits plus their gradients for both directions. They are
added to the activations (conservative: under global negatives they live between the two
passes and only the cached gradients persist).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from megatron_ibxl.config import BatchLayout, RunConfig, validate
from megatron_ibxl.planning.cluster import Cluster
from megatron_ibxl.planning.shapes import TowerShape, stage_layers, tower_shapes

GIB = 2**30
"""Bytes per GiB."""
LOSS_BYTES = 4
"""Bytes per element of embeddings and logits in the loss (fp32)."""
REDUCE_BYTES = 4
"""Bytes per gradient element in the data-parallel reduction and its buffers (fp32)."""


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per GPU, on the pipeline stage that needs the most."""

    weights: float
    """Model weights: bf16 copy plus fp32 master, sharded by dp under ZeRO-3."""
    grads: float
    """fp32 gradients: the sharded gradient, plus under `gather: step` with A > 1 the
    unsharded gradient accumulated across micro-batches."""
    optimizer: float
    """Adam first and second moments, fp32."""
    activations: float
    """Tensors saved for backward by the micro-batches in flight, plus loss buffers."""
    workspace: float
    """Transient tensors of the backward that the model counts: under full recomputation
    one layer's re-created activations (0 otherwise)."""
    buffers: float
    """Gathered (unsharded) parameters of the layers in flight or, under `gather: step`, of
    the whole stage; in-flight unsharded gradients of `gather: microbatch`."""
    reserved: float
    """CUDA context, NCCL buffers and fragmentation: the cluster's reserved_memory_gib."""

    @property
    def total(self) -> float:
        """Sum of the parts."""
        return sum(getattr(self, f.name) for f in fields(self))

    def gib(self) -> dict[str, float]:
        """The parts and the total in GiB."""
        out = {f.name: getattr(self, f.name) / GIB for f in fields(self)}
        out["total"] = self.total / GIB
        return out


def element_bytes(precision: str) -> int:
    """Bytes per activation or compute-dtype weight element."""
    return 2 if precision == "bf16" else 4


def layer_activation_bytes(
    tower: TowerShape,
    micro_batch: int,
    tp: int,
    sequence_parallel: bool,
    recompute: str,
    attention_kernel: str = "flash",
    precision: str = "bf16",
    hidden_dropout: float = 0.0,
    attention_dropout: float = 0.0,
) -> float:
    """Bytes one transformer layer keeps for backward for one micro-batch on one rank
    (Korthikanti et al. 2022, with the adaptations in the module docstring)."""
    e = element_bytes(precision)
    s, b, h, f, n = tower.seq, micro_batch, tower.hidden, tower.mlp_hidden, tower.heads
    sbh = s * b * h
    sp = sequence_parallel and tp > 1
    if recompute == "full":
        return e * sbh / (tp if sp else 1)

    # Replicated over t without sequence parallelism: LayerNorm inputs and outputs, masks.
    replicated = 4 * e * sbh + (2 * sbh if hidden_dropout > 0 else 0)
    # Split over t by the column-parallel layers: Q, K, V, projection input, GeLU in/out.
    split = 4 * e * sbh + 2 * e * s * b * f
    if attention_kernel == "flash":
        split += 4 * n * s * b  # fp32 log-sum-exp per head and token
    elif recompute == "none":
        split += e * n * s * s * b  # softmax
        if attention_dropout > 0:
            split += (1 + e) * n * s * s * b  # mask and dropped probabilities
    if sp:
        return (replicated + split) / tp
    return replicated + split / tp


def _layer_bytes(config: RunConfig, batch: BatchLayout, tower, recompute: str, kernel: str):
    """layer_activation_bytes for `tower` under the layout of `config` and `batch`."""
    return layer_activation_bytes(
        tower,
        batch.micro_batch,
        batch.tp,
        config.parallel.sequence_parallel,
        recompute,
        kernel,
        config.optimizer.precision,
        config.model.hidden_dropout,
        config.model.attention_dropout,
    )


def _tower_extra_bytes(tower: TowerShape, micro_batch: int, tp: int, sp: bool, e: int) -> float:
    """Per micro-batch outside the blocks: final LayerNorm input [s, b, h] (split over t
    under sequence parallelism), pooled features and head input [b, h], and the pixels."""
    final_norm = e * tower.seq * micro_batch * tower.hidden / (tp if sp and tp > 1 else 1)
    return final_norm + 2 * e * micro_batch * tower.hidden + e * micro_batch * tower.input_elements


def loss_buffer_bytes(config: RunConfig, batch: BatchLayout) -> float:
    """fp32 loss buffers on one rank: local embeddings and gradients, gathered embeddings
    and their gradients, logits and their gradients, both towers and directions."""
    d, b = config.model.embed_dim, batch.micro_batch
    if config.loss.negatives == "global":
        rows, cols = b * batch.accumulation, batch.global_batch
    else:
        rows, cols = b, b * batch.dp
    embeddings = 2 * (2 * rows * d + 2 * cols * d)  # [rows, d] and [cols, d], with grads
    logits = 2 * 2 * rows * cols  # [rows, cols] per direction, with grads
    return LOSS_BYTES * (embeddings + logits)


def stage_params(towers: tuple[TowerShape, ...], pp: int, stage: int) -> tuple[int, int]:
    """(parameters of pipeline stage `stage` on one tensor-parallel rank, parameters of its
    largest ZeRO-3 unit). Embeddings sit on the first stage, heads on the last."""
    total, largest = 0, 0
    for tower in towers:
        layers = stage_layers(tower, pp, stage)
        total += layers * tower.layer_params_rank
        largest = max(largest, tower.layer_params_rank if layers else 0)
        if stage == 0:
            total += tower.embed_params_rank
            largest = max(largest, tower.embed_params_rank)
        if stage == pp - 1:
            total += tower.final_params_rank
    return total, largest


def _state_bytes(params: int, largest_unit: int, config: RunConfig, batch: BatchLayout, prefetch):
    """(weights, grads, optimizer, buffers) bytes for `params` parameters on this rank."""
    e = element_bytes(config.optimizer.precision)
    master = 4 if config.optimizer.precision == "bf16" else 0
    par = config.parallel
    if par.zero == 0:
        return (e + master) * params, REDUCE_BYTES * params, 8 * params, 0.0
    shard = params / batch.dp
    weights, grads, optimizer = (e + master) * shard, REDUCE_BYTES * shard, 8 * shard
    if par.gather == "step":
        accumulated = REDUCE_BYTES * params if batch.accumulation > 1 else 0.0
        return weights, grads + accumulated, optimizer, float(e * params)
    # Layers in flight: the one computing, the prefetched ones, and in backward one layer's
    # unsharded gradient in the compute dtype and in the fp32 reduce dtype.
    in_flight = (prefetch + 1) * e * largest_unit + (e + REDUCE_BYTES) * largest_unit
    return weights, grads, optimizer, float(in_flight)


def stage_memory(
    config: RunConfig, batch: BatchLayout, stage: int, cluster: Cluster | None = None
) -> MemoryBreakdown:
    """Memory per GPU on pipeline stage `stage` of the layout `batch` (from validate) for
    `config`, with the cluster's attention kernel, reserve and prefetch depth (FlashAttention,
    no reserve and prefetch 1 when `cluster` is None)."""
    par = config.parallel
    towers = tower_shapes(config, batch.tp)
    kernel = cluster.attention_kernel if cluster else "flash"
    prefetch = cluster.overlap.dp_prefetch_layers if cluster else 1
    reserved = cluster.reserved_memory_gib * GIB if cluster else 0.0
    e = element_bytes(config.optimizer.precision)
    sp = par.sequence_parallel

    params, largest = stage_params(towers, batch.pp, stage)
    weights, grads, optimizer, buffers = _state_bytes(params, largest, config, batch, prefetch)

    per_micro, workspace = 0.0, 0.0
    for tower in towers:
        layers = stage_layers(tower, batch.pp, stage)
        per_micro += layers * _layer_bytes(config, batch, tower, par.recompute, kernel)
        if par.recompute == "full" and layers:
            workspace = max(workspace, _layer_bytes(config, batch, tower, "none", kernel))
        if stage in (0, batch.pp - 1):
            per_micro += _tower_extra_bytes(tower, batch.micro_batch, batch.tp, sp, e)
    activations = min(batch.pp - stage, batch.accumulation) * per_micro
    if stage == batch.pp - 1:
        activations += loss_buffer_bytes(config, batch)
    return MemoryBreakdown(weights, grads, optimizer, activations, workspace, buffers, reserved)


def memory_per_gpu(
    config: RunConfig, batch: BatchLayout, cluster: Cluster | None = None
) -> MemoryBreakdown:
    """Memory per GPU on the pipeline stage that needs the most."""
    stages = [stage_memory(config, batch, p, cluster) for p in range(batch.pp)]
    return max(stages, key=lambda m: m.total)


def estimate_memory_gib(config: RunConfig, world_size: int) -> dict:
    """Per-GPU memory breakdown in GiB (weights, grads, optimizer, activations, workspace,
    buffers, reserved, total) for `config` on `world_size` processes, assuming FlashAttention-style
    attention and no framework reserve. Used by `megatron-ibxl train --dry-run`.

    Raises ConfigError when `config` is not valid for `world_size`.
    """
    batch = validate(config, world_size)
    return memory_per_gpu(config, batch).gib()
