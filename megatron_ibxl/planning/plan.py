"""Predict one optimizer step of a layout on a cluster: memory, FLOPs, time, communication.

The step is built from passes over sharding units (each tower's input embedding, its
layers, its final norm and head) on one GPU of the pipeline stage that takes longest:

    loss.negatives: global   A no-gradient forwards, the loss, A forwards, A backwards
    loss.negatives: micro    A forwards and A backwards, a loss per micro-batch

A unit's time is its FLOPs at the cluster's achievable rate plus the exposed part of its
tensor-parallel collectives; passes that move data-parallel traffic (which ones depends on
parallel.zero and parallel.gather) are simulated on the link (comm.py), the others are the
sum of their units. Pipeline parallelism adds the 1F1B bubble, (pp - 1) micro-batch times,
and its point-to-point transfers. Known omissions, each small for large models: the
optimizer update (memory-bound, about 1 ms at 1 GB of sharded state on an H100), LayerNorm
and pooling collectives, the data loader (assumed hidden behind compute).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_ibxl.config import BatchLayout, RunConfig
from megatron_ibxl.models.param_count import count_parameters
from megatron_ibxl.planning.cluster import Cluster, Link
from megatron_ibxl.planning.comm import simulate_pass, tp_layer_time
from megatron_ibxl.planning.flops import (
    BACKWARD_FACTOR,
    head_flops,
    loss_flops_per_rank,
    model_flops_per_step,
    recompute_flops,
    tower_layer,
)
from megatron_ibxl.planning.layout import resolve_layout
from megatron_ibxl.planning.memory import (
    LOSS_BYTES,
    REDUCE_BYTES,
    MemoryBreakdown,
    element_bytes,
    memory_per_gpu,
)
from megatron_ibxl.planning.shapes import stage_layers, tower_shapes


@dataclass
class Unit:
    """One sharding unit on one GPU, per micro-batch."""

    name: str
    """e.g. `vision.layer` or `text.embed`."""
    forward_s: float
    """Forward compute plus exposed tensor-parallel time."""
    backward_s: float
    """Backward (with recomputation) plus exposed tensor-parallel time."""
    params: int
    """Parameters this rank holds of the unit (the ZeRO-3 gather size before sharding)."""


@dataclass
class StageCost:
    """Per-step totals of one pipeline stage on one GPU. The step is the sum of compute_s,
    tp_exposed_s, dp_exposed_s, pp_s and bubble_s."""

    step_s: float = 0.0
    """Predicted seconds per optimizer step."""
    compute_s: float = 0.0
    """Seconds of compute alone (cluster.flops_per_s, the layer floor)."""
    hardware_flops: float = 0.0
    """FLOPs executed (recomputation, no-gradient pass and padding included)."""
    tp_s: float = 0.0
    """Tensor-parallel collectives, serialised."""
    tp_exposed_s: float = 0.0
    """What overlap leaves of them."""
    tp_bytes: float = 0.0
    """Their full-buffer bytes (nccl-tests' "bytes")."""
    dp_s: float = 0.0
    """Data-parallel link busy time: ZeRO gathers and reductions, loss collectives."""
    dp_exposed_s: float = 0.0
    """What overlap leaves of them (the loss collectives are all exposed)."""
    dp_bytes: float = 0.0
    """Their full-buffer bytes."""
    pp_s: float = 0.0
    """Point-to-point transfers of pipeline parallelism (all exposed)."""
    pp_bytes: float = 0.0
    """Their bytes."""
    bubble_s: float = 0.0
    """Idle time of the 1F1B pipeline bubble."""
    loss_s: float = 0.0
    """Contrastive loss: logits compute plus its collectives."""
    units: list[Unit] = field(default_factory=list)
    """The stage's sharding units, forward order."""


@dataclass
class Plan:
    """Everything `megatron-ibxl plan` reports for one layout."""

    config: RunConfig
    """The configuration planned."""
    cluster: Cluster
    """The cluster, calibrated or not."""
    batch: BatchLayout
    """tp, pp, dp, micro-batch, accumulation, global batch."""
    memory: MemoryBreakdown
    """Per GPU, on the stage that needs the most."""
    stage: StageCost
    """The pipeline stage with the longest step."""
    model_flops: float
    """Model FLOPs per step, whole cluster (flops.model_flops_per_step)."""
    hardware_flops: float
    """FLOPs executed per step, whole cluster (recomputation, no-gradient pass, padding)."""

    @property
    def step_time_s(self) -> float:
        """Predicted seconds per optimizer step."""
        return self.stage.step_s

    @property
    def exposed_s(self) -> float:
        """Communication time that overlap does not hide."""
        return self.stage.tp_exposed_s + self.stage.dp_exposed_s + self.stage.pp_s

    @property
    def fits(self) -> bool:
        """Whether the memory per GPU fits the cluster's GPUs."""
        return self.memory.total <= self.cluster.gpu_memory_gib * 2**30

    @property
    def mfu(self) -> float:
        """Model FLOPs utilisation: model FLOPs / (step time * GPUs * peak)."""
        peak = self.cluster.peak_flops(self.config.optimizer.precision)
        return self.model_flops / (self.step_time_s * self.cluster.world_size * peak)

    def to_dict(self) -> dict:
        """The JSON object of `plan --json`."""
        from megatron_ibxl.planning.report import plan_to_dict

        return plan_to_dict(self)


def _dp_link(cluster: Cluster, batch: BatchLayout) -> Link:
    """dp groups are ranks t apart; inside one node only when t * dp fits in it."""
    inside = batch.tp * batch.dp <= cluster.gpus_per_node
    return cluster.nvlink if inside else cluster.infiniband


def _pp_link(cluster: Cluster, batch: BatchLayout) -> Link:
    """Neighbouring stages are t * dp ranks apart."""
    inside = batch.tp * batch.dp < cluster.gpus_per_node
    return cluster.nvlink if inside else cluster.infiniband


@dataclass
class MicroTotals:
    """Per micro-batch on one GPU of a stage: FLOPs, compute seconds and tensor-parallel
    communication, split into the forward and the backward (with recomputation)."""

    forward_flops: float = 0.0
    """FLOPs of one forward."""
    backward_flops: float = 0.0
    """FLOPs of one backward, recomputation included."""
    forward_s: float = 0.0
    """Compute seconds of one forward."""
    backward_s: float = 0.0
    """Compute seconds of one backward."""
    tp_forward: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    """Tensor-parallel seconds, exposed seconds and bytes of the forward."""
    tp_backward: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    """The same for the backward."""

    def add_unit(self, count: int, forward: tuple[float, float], backward: tuple[float, float]):
        """Add `count` units of (FLOPs, seconds) forward and backward."""
        self.forward_flops += count * forward[0]
        self.forward_s += count * forward[1]
        self.backward_flops += count * backward[0]
        self.backward_s += count * backward[1]


def _embed_unit(config, cluster: Cluster, batch: BatchLayout, tower, totals) -> Unit:
    """The input embedding of `tower` (first stage). The patch projection over
    [b * patches, 3 * p * p] is replicated over t and its backward is the weight gradient
    only; token lookups cost no FLOPs."""
    b = batch.micro_batch
    flops = tower.input_gemm_flops * b
    rows = tower.seq_model * b
    seconds = flops / cluster.flops_per_s(config.optimizer.precision, rows)
    totals.add_unit(1, (flops, seconds), (flops, seconds))
    return Unit(f"{tower.name}.embed", seconds, seconds, tower.embed_params_rank)


def _head_unit(config, cluster: Cluster, batch: BatchLayout, tower, totals) -> Unit:
    """The final norm and projection head of `tower` (last stage): [b, h] @ [h, d]."""
    b = batch.micro_batch
    flops = head_flops(tower, config.model.embed_dim, b)
    seconds = flops / cluster.flops_per_s(config.optimizer.precision, b)
    totals.add_unit(1, (flops, seconds), (2 * flops, 2 * seconds))
    return Unit(f"{tower.name}.head", seconds, 2 * seconds, tower.final_params_rank)


def _stage_units(config: RunConfig, cluster: Cluster, batch: BatchLayout, stage: int):
    """The sharding units of `stage` in forward order and their per-micro-batch totals."""
    par, precision = config.parallel, config.optimizer.precision
    b, tp, e = batch.micro_batch, batch.tp, element_bytes(precision)
    sp = par.sequence_parallel and tp > 1
    floor_s = cluster.layer_floor_us * 1e-6
    units: list[Unit] = []
    totals = MicroTotals()
    for tower in tower_shapes(config, tp):
        if stage == 0:
            units.append(_embed_unit(config, cluster, batch, tower, totals))

        rows = tower.seq * b  # the GEMMs' M: the gathered sequence of the micro-batch
        rate = cluster.flops_per_s(precision, rows)
        layer = tower_layer(tower, b)
        tp_time = tp_layer_time(
            layer,
            e * rows * tower.hidden,
            tp,
            cluster.nvlink,
            cluster.flops_per_s(precision, rows, gemm=True),
            sp,
            par.recompute,
            par.tp_comm_overlap,
            cluster.overlap.tp_residual_fraction,
        )
        forward = layer.forward / tp
        backward = (BACKWARD_FACTOR * layer.forward + recompute_flops(layer, par.recompute)) / tp
        forward_s = max(forward / rate, floor_s)
        backward_s = max(backward / rate, 2 * floor_s)
        layers = stage_layers(tower, batch.pp, stage)
        units += [
            Unit(
                f"{tower.name}.layer",
                forward_s + tp_time.forward_exposed_s,
                backward_s + tp_time.backward_exposed_s,
                tower.layer_params_rank,
            )
            for _ in range(layers)
        ]
        totals.add_unit(layers, (forward, forward_s), (backward, backward_s))
        forward_tp = (tp_time.forward_s, tp_time.forward_exposed_s, tp_time.forward_bytes)
        backward_tp = (tp_time.backward_s, tp_time.backward_exposed_s, tp_time.backward_bytes)
        for k in range(3):
            totals.tp_forward[k] += layers * forward_tp[k]
            totals.tp_backward[k] += layers * backward_tp[k]
        if stage == batch.pp - 1:
            units.append(_head_unit(config, cluster, batch, tower, totals))
    return units, totals


def _phases(config: RunConfig, batch: BatchLayout) -> list[tuple[int, str, bool, bool]]:
    """(count, pass, gathers, reductions) for the passes of one step on one stage."""
    a, par = batch.accumulation, config.parallel
    extra_forward = config.loss.negatives == "global"
    if par.zero == 3 and par.gather == "microbatch":
        phases = [(a, "forward", True, False)] * (2 if extra_forward else 1)
        return phases + [(a, "backward", True, True)]
    gathered_once = par.zero == 3  # gather: step, parameters stay resident
    forwards = [(1, "forward", gathered_once, False), (a - 1, "forward", False, False)]
    if extra_forward:
        forwards += [(a, "forward", False, False)]
    return forwards + [(a - 1, "backward", False, False), (1, "backward", False, True)]


def _run_phases(config, cluster, batch, units: list[Unit], cost: StageCost) -> None:
    """Add the simulated passes of one step to `cost`."""
    link, dp, par = _dp_link(cluster, batch), batch.dp, config.parallel
    e = element_bytes(config.optimizer.precision)
    prefetch = None if par.gather == "step" else cluster.overlap.dp_prefetch_layers
    reduce_op = "reduce_scatter" if par.zero == 3 else "all_reduce"
    for count, kind, gathers, reductions in _phases(config, batch):
        if count == 0:
            continue
        order = units if kind == "forward" else units[::-1]
        compute = [u.forward_s if kind == "forward" else u.backward_s for u in order]
        gather = [link.ring_time_s("all_gather", e * u.params, dp) for u in order]
        reduce = [link.ring_time_s(reduce_op, REDUCE_BYTES * u.params, dp) for u in order]
        span, busy = simulate_pass(
            compute,
            gather if gathers and dp > 1 else None,
            reduce if reductions and dp > 1 else None,
            prefetch,
        )
        cost.step_s += count * span
        cost.dp_s += count * busy
        cost.dp_exposed_s += count * (span - sum(compute))
        if dp > 1:
            moved = (e if gathers else 0) + (REDUCE_BYTES if reductions else 0)
            cost.dp_bytes += count * moved * sum(u.params for u in units)


def _loss_cost(config: RunConfig, cluster: Cluster, batch: BatchLayout, cost: StageCost):
    """The contrastive loss on the last stage: logits compute and embedding collectives."""
    b, a, dp, d = batch.micro_batch, batch.accumulation, batch.dp, config.model.embed_dim
    flops = loss_flops_per_rank(config.loss.negatives, d, b, a, dp)
    local_rows = b * a if config.loss.negatives == "global" else b
    rate = cluster.flops_per_s(config.optimizer.precision, local_rows, gemm=True)
    rows, times = (b * a * dp, 1) if config.loss.negatives == "global" else (b * dp, a)
    message = LOSS_BYTES * 2 * rows * d  # [B, d] of both towers, and later their gradients
    link = _dp_link(cluster, batch)
    comm = times * (
        link.ring_time_s("all_gather", message, dp)
        + link.ring_time_s("reduce_scatter", message, dp)
    )
    cost.loss_s = flops / rate + comm
    cost.step_s += cost.loss_s
    cost.compute_s += flops / rate
    cost.hardware_flops += flops
    cost.dp_s += comm
    cost.dp_exposed_s += comm
    cost.dp_bytes += 2 * times * message if dp > 1 else 0.0


def _pipeline_cost(config, cluster, batch, units: list[Unit], cost: StageCost) -> None:
    """1F1B bubble and point-to-point transfers of pipeline parallelism."""
    if batch.pp == 1:
        return
    sp = config.parallel.sequence_parallel and batch.tp > 1
    e = element_bytes(config.optimizer.precision)
    message = sum(
        e * t.seq * batch.micro_batch * t.hidden / (batch.tp if sp else 1)
        for t in tower_shapes(config, batch.tp)
    )  # [s/t, b, h] of both towers at a stage boundary
    forwards = 2 if config.loss.negatives == "global" else 1
    transfers = (batch.accumulation + batch.pp - 1) * (forwards + 1)
    cost.pp_s = transfers * _pp_link(cluster, batch).ring_time_s("p2p", message, 2)
    cost.pp_bytes = transfers * message
    per_micro = sum(forwards * u.forward_s + u.backward_s for u in units)
    cost.bubble_s = (batch.pp - 1) * per_micro
    cost.step_s += cost.pp_s + cost.bubble_s


def _stage_cost(config, cluster, batch, stage: int) -> StageCost:
    """Step time and its parts on one GPU of pipeline stage `stage`."""
    cost = StageCost()
    units, totals = _stage_units(config, cluster, batch, stage)
    cost.units = units
    # Forwards per micro-batch: the gradient pass, plus the no-gradient embedding pass of
    # global negatives (same work and collectives as a forward without recomputation).
    forwards = batch.accumulation * (2 if config.loss.negatives == "global" else 1)
    backwards = batch.accumulation
    cost.hardware_flops = forwards * totals.forward_flops + backwards * totals.backward_flops
    cost.compute_s = forwards * totals.forward_s + backwards * totals.backward_s
    cost.tp_s = forwards * totals.tp_forward[0] + backwards * totals.tp_backward[0]
    cost.tp_exposed_s = forwards * totals.tp_forward[1] + backwards * totals.tp_backward[1]
    cost.tp_bytes = forwards * totals.tp_forward[2] + backwards * totals.tp_backward[2]
    _run_phases(config, cluster, batch, units, cost)
    if stage == batch.pp - 1:
        _loss_cost(config, cluster, batch, cost)
    _pipeline_cost(config, cluster, batch, units, cost)
    return cost


def plan_layout(config: RunConfig, cluster: Cluster) -> Plan:
    """Predict memory, FLOPs, step time and communication of `config` on `cluster`.

    Raises ConfigError when the layout does not fit the cluster's shape (see
    layout.resolve_layout) or the configuration is invalid.
    """
    batch = resolve_layout(config, cluster)
    stages = [_stage_cost(config, cluster, batch, p) for p in range(batch.pp)]
    slowest = max(stages, key=lambda c: c.step_s)
    towers = tower_shapes(config, batch.tp)
    model_flops = model_flops_per_step(
        towers,
        config.model.embed_dim,
        batch.global_batch,
        config.loss.negatives,
        batch.micro_batch,
        batch.accumulation,
        batch.dp,
    )
    memory = memory_per_gpu(config, batch, cluster)
    hardware = sum(c.hardware_flops for c in stages) * batch.tp * batch.dp
    return Plan(config, cluster, batch, memory, slowest, model_flops, hardware)


def parameter_counts(config: RunConfig, tp: int) -> dict[str, int]:
    """Full-model parameter counts (models.param_count)."""
    counts = count_parameters(config.model, tp, config.loss.kind)
    return {
        "vision": counts.vision,
        "text": counts.text,
        "heads": counts.heads,
        "total": counts.total,
    }
