"""Run under a launcher (torchrun, mpirun): start the groups from the launcher's environment,
check a tensor-parallel all-reduce and print one JSON line per rank."""

import json
import sys

import torch
import torch.distributed as dist

from megatron_ibxl.config import ParallelConfig
from megatron_ibxl.parallel import detect_launch_env, init_parallel, shutdown_parallel


def main() -> None:
    tp = int(sys.argv[1])
    launch = detect_launch_env()
    ctx = init_parallel(ParallelConfig(tp=tp, backend="gloo", timeout_s=60), launch=launch)
    value = torch.tensor([float(ctx.rank + 1)])
    dist.all_reduce(value, group=ctx.tp_group)
    out = {
        "launcher": launch.launcher,
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "tp": dist.get_process_group_ranks(ctx.tp_group),
        "dp": dist.get_process_group_ranks(ctx.dp_group),
        "sum": value.item(),
    }
    print("PROBE " + json.dumps(out), flush=True)
    shutdown_parallel()


if __name__ == "__main__":
    main()
