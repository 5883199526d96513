"""Communication of a step and how much of it overlap hides.

Shape letters: b pairs per rank per micro-batch, s sequence, h hidden, f MLP width, t
tensor-parallel size. Collective times use the ring model of `Link.ring_time_s` with
nccl-tests' bus bandwidth (cluster.py).

The overlap model, stated once:

1. Tensor parallelism (per layer, per micro-batch, NVLink). With sequence parallelism a
   layer runs 4 collectives forward (all-gather [s/t, b, h] -> [s, b, h] before QKV and fc1,
   reduce-scatter after the projection and fc2) and 6 backward (the gradient all-gathers of
   the two row-parallel GEMMs, the re-gather of the two column-parallel inputs for their
   weight gradients, the reduce-scatter of the two input gradients); the message is the
   full [s, b, h] tensor. Without sequence parallelism it runs 2 all-reduces each way.
   Full recomputation repeats the forward ones. Each collective can hide only behind the
   GEMM that produces or consumes it (the chunked communication-GEMM overlap of Transformer
   Engine, `parallel.tp_comm_overlap`), or, for the backward of column-parallel layers,
   behind the other gradient GEMM (Megatron-core's asynchronous re-gather and gradient
   reduction, always on). A collective of c seconds beside a GEMM of g seconds leaves
   exposed
        max(0, c - g) + r * min(c, g)
   with r = `overlap.tp_residual_fraction` of the cluster file; with nothing to hide
   behind, all of c is exposed. The exposed time lengthens the layer.

2. Data parallelism (ZeRO-3 over InfiniBand, or NVLink when a dp group fits in a node).
   Each layer (and each tower's embedding) is one sharding unit with its own all-gather
   (compute dtype) and reduce-scatter (fp32). A pass over the units is simulated with one
   queue on the link: a unit computes once its gather has arrived; a gather may start
   `overlap.dp_prefetch_layers` units ahead (without limit under `gather: step`, whose
   parameters stay resident anyway); a unit's reduce-scatter is queued when its backward
   ends. So the first gather of a pass and the last reduce-scatter are exposed by
   construction, and a gather longer than the layer it hides behind shows its excess.
   Exposed time of a pass = its makespan - its compute.

3. Loss: the gather of embeddings over dp and the reduction of their gradients, exposed.

4. Pipeline parallelism: each micro-batch receives its input activations and its output
   gradient ([s, b, h] per tower, split over t under sequence parallelism) as
   point-to-point transfers that the non-interleaved 1F1B schedule waits for: exposed.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from megatron_ibxl.planning.cluster import Link
from megatron_ibxl.planning.flops import LayerFlops


@dataclass(frozen=True)
class Collective:
    """One tensor-parallel collective of a layer and the GEMM work that can hide it."""

    op: str
    """`all_gather`, `reduce_scatter` or `all_reduce`."""
    phase: str
    """`forward` or `backward`."""
    hide_flops: float
    """Whole-layer GEMM FLOPs it can run beside (divide by t per rank); 0 when none."""
    needs_te: bool
    """True when the hiding needs `parallel.tp_comm_overlap` (Transformer Engine)."""


def tp_collectives(layer: LayerFlops, sequence_parallel: bool, recompute: str) -> list[Collective]:
    """The tensor-parallel collectives of one layer and one micro-batch, with the GEMM each
    may hide behind (overlap model, point 1)."""
    if sequence_parallel:
        forward = [
            Collective("all_gather", "forward", layer.qkv, True),  # [s/t,b,h] -> [s,b,h]
            Collective("reduce_scatter", "forward", layer.proj, True),  # [s,b,h] -> [s/t,b,h]
            Collective("all_gather", "forward", layer.fc1, True),
            Collective("reduce_scatter", "forward", layer.fc2, True),
        ]
        backward = [
            Collective("all_gather", "backward", 2 * layer.fc2, True),  # fc2 output grad
            Collective("all_gather", "backward", layer.fc1, False),  # re-gather, fc1 dgrad
            Collective("reduce_scatter", "backward", layer.fc1, False),  # beside fc1 wgrad
            Collective("all_gather", "backward", 2 * layer.proj, True),  # proj output grad
            Collective("all_gather", "backward", layer.qkv, False),  # re-gather, qkv dgrad
            Collective("reduce_scatter", "backward", layer.qkv, False),  # beside qkv wgrad
        ]
    else:
        forward = [
            Collective("all_reduce", "forward", 0.0, False),  # after proj, [s,b,h]
            Collective("all_reduce", "forward", 0.0, False),  # after fc2
        ]
        backward = [
            Collective("all_reduce", "backward", layer.fc1, False),  # input grad of fc1
            Collective("all_reduce", "backward", layer.qkv, False),  # input grad of qkv
        ]
    if recompute == "full":
        backward += [Collective(c.op, "backward", c.hide_flops, c.needs_te) for c in forward]
    return forward + backward


@dataclass(frozen=True)
class TpTime:
    """Tensor-parallel communication of one layer and one micro-batch, seconds."""

    forward_s: float
    """All forward collectives, serialised."""
    backward_s: float
    """All backward collectives (with full recomputation's repeat), serialised."""
    forward_exposed_s: float
    """What overlap leaves of the forward ones."""
    backward_exposed_s: float
    """What overlap leaves of the backward ones."""
    forward_bytes: float
    """Full-buffer bytes of the forward collectives."""
    backward_bytes: float
    """Full-buffer bytes of the backward collectives."""


def tp_layer_time(
    layer: LayerFlops,
    message_bytes: float,
    tp: int,
    link: Link,
    gemm_flops_per_s: float,
    sequence_parallel: bool,
    recompute: str,
    tp_comm_overlap: bool,
    residual: float,
) -> TpTime:
    """Total and exposed tensor-parallel time of one layer (overlap model, point 1).

    `message_bytes` is the full [s, b, h] activation; `gemm_flops_per_s` the rate of one
    GEMM on one GPU; `residual` the cluster's tp_residual_fraction."""
    totals = {"forward": [0.0, 0.0, 0.0], "backward": [0.0, 0.0, 0.0]}  # time, exposed, bytes
    if tp <= 1:
        return TpTime(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    for coll in tp_collectives(layer, sequence_parallel, recompute):
        comm_s = link.ring_time_s(coll.op, message_bytes, tp)
        hidden_by = coll.hide_flops / tp / gemm_flops_per_s
        if coll.hide_flops == 0 or (coll.needs_te and not tp_comm_overlap):
            exposed = comm_s
        else:
            exposed = max(0.0, comm_s - hidden_by) + residual * min(comm_s, hidden_by)
        row = totals[coll.phase]
        row[0] += comm_s
        row[1] += exposed
        row[2] += message_bytes
    fwd, bwd = totals["forward"], totals["backward"]
    return TpTime(fwd[0], bwd[0], fwd[1], bwd[1], fwd[2], bwd[2])


def simulate_pass(
    compute_s: list[float],
    gather_s: list[float] | None,
    reduce_s: list[float] | None,
    prefetch: int | None,
) -> tuple[float, float]:
    """Makespan and link-busy time of one pass over sharding units (overlap model, point 2).

    Unit i computes for compute_s[i] once its gather (gather_s[i], if gathers are needed)
    has arrived; the gather of unit i may be issued once unit i - prefetch - 1 has finished
    computing (at once when `prefetch` is None); a reduction of reduce_s[i] is queued when
    unit i finishes. One link serves gathers and reductions in the order they are issued,
    a gather first on a tie. Returns (seconds from the start of the pass until both the
    compute and the link are done, seconds the link was busy).
    """
    n = len(compute_s)
    queue: list[tuple[float, int, int, float, str]] = []  # release, priority, unit, s, kind
    done: dict[int, float] = {}
    compute_end: list[float] = []
    link_free, clock, busy, issued = 0.0, 0.0, 0.0, 0

    for i in range(n):
        while gather_s is not None and issued < n and (prefetch is None or issued <= i + prefetch):
            k = issued - prefetch - 1 if prefetch is not None else -1
            release = compute_end[k] if k >= 0 else 0.0
            heapq.heappush(queue, (release, 0, issued, gather_s[issued], "gather"))
            issued += 1
        # Serve the link in issue order until this unit's parameters have arrived.
        while gather_s is not None and i not in done:
            release, _, unit, seconds, kind = heapq.heappop(queue)
            link_free = max(link_free, release) + seconds
            busy += seconds
            if kind == "gather":
                done[unit] = link_free
        clock = max(clock, done.get(i, 0.0)) + compute_s[i]
        compute_end.append(clock)
        if reduce_s is not None:
            heapq.heappush(queue, (clock, 1, i, reduce_s[i], "reduce"))

    while queue:
        release, _, _, seconds, _ = heapq.heappop(queue)
        link_free = max(link_free, release) + seconds
        busy += seconds
    return max(clock, link_free), busy
