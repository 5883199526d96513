"""A plan as the JSON object of `plan --json` and as the text table of `plan`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_ibxl.planning.memory import GIB

if TYPE_CHECKING:
    from megatron_ibxl.planning.plan import Plan


def plan_to_dict(plan: Plan) -> dict:
    """The documented JSON object: params, memory_gib, fits, flops, step time, mfu, comm,
    layout and the cluster constants used."""
    from megatron_ibxl.planning.plan import parameter_counts

    cost, batch, cluster, par = plan.stage, plan.batch, plan.cluster, plan.config.parallel
    step, world = plan.step_time_s, cluster.world_size
    peak = cluster.peak_flops(plan.config.optimizer.precision)
    memory = plan.memory.gib()
    memory["capacity"] = cluster.gpu_memory_gib
    comm = {
        "tp_s": cost.tp_s,
        "tp_exposed_s": cost.tp_exposed_s,
        "tp_bytes": cost.tp_bytes,
        "dp_s": cost.dp_s,
        "dp_exposed_s": cost.dp_exposed_s,
        "dp_bytes": cost.dp_bytes,
        "pp_s": cost.pp_s,
        "pp_exposed_s": cost.pp_s,
        "pp_bytes": cost.pp_bytes,
        "loss_s": cost.loss_s,
        "total_s": cost.tp_s + cost.dp_s + cost.pp_s,
        "exposed_s": plan.exposed_s,
        "overhead_fraction": plan.exposed_s / step,
    }
    return {
        "params": parameter_counts(plan.config, batch.tp),
        "memory_gib": memory,
        "fits": plan.fits,
        "flops_per_step": plan.model_flops,
        "flops_per_gpu": plan.model_flops / world,
        "hardware_flops_per_step": plan.hardware_flops,
        "hardware_flops_per_gpu": cost.hardware_flops,
        "step_time_s": step,
        "compute_s": cost.compute_s,
        "bubble_s": cost.bubble_s,
        "samples_per_s": batch.global_batch / step,
        "mfu": plan.mfu,
        "hfu": cost.hardware_flops / (step * peak),
        "comm": comm,
        "layout": {
            "world_size": world,
            "tp": batch.tp,
            "pp": batch.pp,
            "dp": batch.dp,
            "micro_batch": batch.micro_batch,
            "accumulation": batch.accumulation,
            "global_batch": batch.global_batch,
            "sequence_parallel": par.sequence_parallel,
            "zero": par.zero,
            "gather": par.gather,
            "recompute": par.recompute,
            "tp_comm_overlap": par.tp_comm_overlap,
            "negatives": plan.config.loss.negatives,
            "precision": plan.config.optimizer.precision,
        },
        "cluster": {
            "name": cluster.name,
            "nvlink_bus_bandwidth_gbps": cluster.nvlink.bus_bandwidth_gbps,
            "nvlink_latency_us": cluster.nvlink.latency_us,
            "infiniband_bus_bandwidth_gbps": cluster.infiniband.bus_bandwidth_gbps,
            "infiniband_latency_us": cluster.infiniband.latency_us,
            "peak_tflops": peak / 1e12,
            "achievable_flops_fraction": cluster.achievable_flops_fraction,
            "gemm_flops_fraction": cluster.gemm_flops_fraction,
            "tp_residual_fraction": cluster.overlap.tp_residual_fraction,
        },
    }


def _seconds(value: float) -> str:
    return f"{value * 1e3:9.1f} ms"


def format_plan(plan: Plan) -> str:
    """A human-readable report of one plan."""
    data = plan_to_dict(plan)
    lay, mem, comm, step = data["layout"], data["memory_gib"], data["comm"], plan.step_time_s
    lines = [
        f"layout   tp={lay['tp']} pp={lay['pp']} dp={lay['dp']} micro_batch={lay['micro_batch']}"
        f" accumulation={lay['accumulation']} zero={lay['zero']} gather={lay['gather']}"
        f" recompute={lay['recompute']} sp={lay['sequence_parallel']}"
        f" tp_comm_overlap={lay['tp_comm_overlap']} negatives={lay['negatives']}",
        f"cluster  {plan.cluster.name}: {lay['world_size']} GPUs, "
        f"NVLink {plan.cluster.nvlink.bus_bandwidth_gbps:g} GB/s, "
        f"InfiniBand {plan.cluster.infiniband.bus_bandwidth_gbps:g} GB/s bus bandwidth",
        "params   " + "  ".join(f"{k}={v / 1e9:.3f}B" for k, v in data["params"].items()),
        "memory   "
        + "  ".join(f"{k}={mem[k]:.2f}" for k in ("weights", "grads", "optimizer"))
        + "  "
        + "  ".join(
            f"{k}={mem[k]:.2f}" for k in ("activations", "workspace", "buffers", "reserved")
        )
        + f"  total={mem['total']:.2f} GiB of {mem['capacity']:g}"
        + ("  fits" if data["fits"] else "  DOES NOT FIT"),
        f"flops    model {data['flops_per_step']:.3e}/step, executed "
        f"{data['hardware_flops_per_gpu']:.3e}/GPU/step",
        f"step     {step:.3f} s  ({data['samples_per_s']:.0f} pairs/s)  MFU {data['mfu']:.1%}"
        f"  compute {data['compute_s']:.3f} s  pipeline bubble {data['bubble_s']:.3f} s",
        "comm                 total      exposed      bytes/GPU",
    ]
    for name, key in (("tensor (NVLink)", "tp"), ("data (ZeRO)", "dp"), ("pipeline", "pp")):
        lines.append(
            f"  {name:<16}{_seconds(comm[key + '_s'])}  {_seconds(comm[key + '_exposed_s'])}"
            f"  {comm[key + '_bytes'] / GIB:8.2f} GiB"
        )
    lines.append(
        f"  {'all':<16}{_seconds(comm['total_s'])}  {_seconds(comm['exposed_s'])}"
        f"  exposed = {comm['overhead_fraction']:.1%} of the step"
    )
    return "\n".join(lines)
