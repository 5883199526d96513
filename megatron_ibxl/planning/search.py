"""`plan --search`: enumerate layouts for one model, cluster and global batch; rank them.

Enumerated: tp over the divisors of gpus_per_node (sequence parallelism on when tp > 1),
pp in {1, 2, 4, 8}, zero in {0, 3}, the micro-batch over powers of two (and the config's
own value) that divide the global batch per data-parallel rank, recompute in {none,
selective, full}, gather in {step, microbatch} under zero 3. Tensor-parallel overlap is
always on when tp > 1: in the model (comm.py) switching it off never shortens a step. The
model, the global batch, the loss and the precision are the config's. Layouts the config
validation rejects (tp not dividing the heads, a batch that does not divide) are skipped;
those that do not fit in memory are counted and dropped; the rest are ranked by predicted
step time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_ibxl.config import ConfigError, RunConfig
from megatron_ibxl.planning.cluster import Cluster
from megatron_ibxl.planning.plan import Plan, plan_layout

PIPELINE_SIZES = (1, 2, 4, 8)
"""Pipeline sizes tried (planner only: the engine runs pp = 1)."""


@dataclass
class SearchResult:
    """The outcome of a search."""

    ranked: list[Plan]
    """Layouts that fit, fastest first."""
    considered: int
    """Valid layouts planned."""
    rejected_memory: int
    """Valid layouts that do not fit in GPU memory."""


def _candidates(config: RunConfig, cluster: Cluster):
    """Every configuration variant to try."""
    world = cluster.world_size
    tps = [t for t in range(1, cluster.gpus_per_node + 1) if cluster.gpus_per_node % t == 0]
    for tp in tps:
        for pp in PIPELINE_SIZES:
            if world % (tp * pp):
                continue
            per_rank = config.data.global_batch // (world // (tp * pp))
            micro = {2**k for k in range(12) if 2**k <= per_rank} | {config.data.micro_batch}
            for zero in (0, 3):
                for gather in ("step", "microbatch") if zero == 3 else ("step",):
                    for recompute in ("none", "selective", "full"):
                        for micro_batch in sorted(micro):
                            parallel = dataclasses.replace(
                                config.parallel,
                                tp=tp,
                                pp=pp,
                                zero=zero,
                                gather=gather,
                                recompute=recompute,
                                sequence_parallel=tp > 1,
                                tp_comm_overlap=tp > 1,
                            )
                            data = dataclasses.replace(
                                config.data, micro_batch=micro_batch, accumulation=None
                            )
                            yield dataclasses.replace(config, parallel=parallel, data=data)


def search_layouts(config: RunConfig, cluster: Cluster) -> SearchResult:
    """Plan every candidate layout of `config` on `cluster` and rank those that fit."""
    fitting: list[Plan] = []
    considered = rejected = 0
    for candidate in _candidates(config, cluster):
        try:
            plan = plan_layout(candidate, cluster)
        except ConfigError:
            continue
        considered += 1
        if plan.fits:
            fitting.append(plan)
        else:
            rejected += 1
    fitting.sort(key=lambda p: p.step_time_s)
    return SearchResult(fitting, considered, rejected)


def _components(plan: Plan) -> dict[str, float]:
    """Where a step's time goes, for comparing two plans."""
    cost = plan.stage
    return {
        "compute": cost.compute_s,
        "exposed tensor-parallel comm": cost.tp_exposed_s,
        "exposed data-parallel comm": cost.dp_exposed_s,
        "pipeline bubble and transfers": cost.bubble_s + cost.pp_s,
    }


def _knobs(plan: Plan) -> dict[str, object]:
    par = plan.config.parallel
    return {
        "tp": par.tp,
        "pp": par.pp,
        "zero": par.zero,
        "gather": par.gather,
        "recompute": par.recompute,
        "micro_batch": plan.batch.micro_batch,
    }


PIPELINE_NOTE = "; pp > 1: planner only, `train` runs pp = 1"
"""Appended to a searched layout with pipeline stages, which the engine cannot train yet."""


def explain(plan: Plan, best: Plan) -> str:
    """Why `plan` ranks where it does against the fastest plan `best`, and whether `train`
    can run it."""
    note = PIPELINE_NOTE if plan.batch.pp > 1 else ""
    return _why(plan, best) + note


def _why(plan: Plan, best: Plan) -> str:
    free_gib = plan.cluster.gpu_memory_gib - plan.memory.total / 2**30
    exposed = plan.exposed_s / plan.step_time_s
    if plan is best:
        ours = _components(plan)
        biggest = max((k for k in ours if k != "compute"), key=ours.get)
        return (
            f"fastest; {exposed:.1%} of the step is exposed communication, mostly "
            f"{biggest} ({ours[biggest]:.3f} s); {free_gib:.1f} GiB free per GPU"
        )
    ours, theirs = _components(plan), _components(best)
    deltas = sorted(((ours[k] - theirs[k], k) for k in ours), reverse=True)
    losses = [f"{k} +{d:.3f} s" for d, k in deltas if d > 1e-4][:2]
    gains = [f"{-d:.3f} s of {k}" for d, k in deltas[::-1] if d < -1e-4][:1]
    changed = [f"{k}={v}" for k, v in _knobs(plan).items() if _knobs(best)[k] != v]
    text = f"+{plan.step_time_s - best.step_time_s:.3f} s vs #1 ({', '.join(changed)}): "
    text += ", ".join(losses) or "no slower part"
    if gains:
        text += f"; saves {gains[0]}"
    return text + f"; {free_gib:.1f} GiB free"
