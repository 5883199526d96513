"""A run configuration checked against a cluster: the layout the planner works on."""

from __future__ import annotations

import dataclasses

from megatron_ibxl.config import BatchLayout, ConfigError, RunConfig, validate
from megatron_ibxl.planning.cluster import Cluster


def _divisors(n: int) -> str:
    return "{" + ", ".join(str(d) for d in range(1, n + 1) if n % d == 0) + "}"


def resolve_layout(config: RunConfig, cluster: Cluster) -> BatchLayout:
    """Validate `config` for every GPU of `cluster` and return its batch layout.

    Pipeline parallelism, which the engine does not run yet, is accepted here: the rest of
    the configuration is validated as if pp were 1 on world_size / pp processes (the same
    dp). Raises ConfigError naming the key and a fix when the layout does not divide the
    cluster, tensor parallelism would leave a node, or the cluster lacks a peak for the
    compute dtype.
    """
    world, par = cluster.world_size, config.parallel
    tp, pp = par.tp, par.pp
    problems: list[str] = []
    if tp >= 1 and (tp > cluster.gpus_per_node or cluster.gpus_per_node % tp):
        problems.append(
            f"parallel.tp={tp}: tensor parallelism must stay inside one node of "
            f"gpus_per_node={cluster.gpus_per_node} ({cluster.name}); use tp in "
            f"{_divisors(cluster.gpus_per_node)}"
        )
    layers = min(config.model.vision.num_layers, config.model.text.num_layers)
    if pp < 1 or pp > layers:
        problems.append(
            f"parallel.pp={pp}: must be between 1 and the smaller tower's layers ({layers})"
        )
    elif tp >= 1 and world % (tp * pp):
        problems.append(
            f"cluster {cluster.name} has {world} GPUs ({cluster.num_nodes} nodes x "
            f"{cluster.gpus_per_node}), which does not divide by parallel.tp * parallel.pp = "
            f"{tp} * {pp} = {tp * pp}; use tp * pp in {_divisors(world)}"
        )
    if config.optimizer.precision == "fp32" and cluster.peak_fp32_tflops <= 0:
        problems.append(
            f"optimizer.precision='fp32': cluster {cluster.name} gives no peak_fp32_tflops; "
            "add it to the cluster file or plan with optimizer.precision=bf16"
        )
    if problems:
        raise ConfigError(problems)

    flat = dataclasses.replace(config, parallel=dataclasses.replace(par, pp=1))
    batch = validate(flat, world // pp)
    return dataclasses.replace(batch, pp=pp)
