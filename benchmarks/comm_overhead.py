"""Communication overhead benchmarks.

Mode `step`: compute, communication and exposed communication time of real training steps
of a run's configuration (benchmarks/comm_step.py has the code and the definitions):

    python -m torch.distributed.run --nproc_per_node 4 -m benchmarks.comm_overhead \\
        step --config launch/configs/demo-cpu.yaml --steps 5 --out step.json

Mode `collectives`: a sweep of all-gather, reduce-scatter and all-reduce over message sizes
(doubling from --min-bytes to --max-bytes) on the current backend (gloo on CPU, NCCL on GPUs)
and one kind of process group (the world, this rank's tensor-parallel group or its
data-parallel group). Run it under a launcher, from the repository root:

    python -m torch.distributed.run --nproc_per_node 8 -m benchmarks.comm_overhead \\
        collectives --group tp --tp 8 --out comm.json
    mpirun -np 16 -x MASTER_ADDR -x MASTER_PORT python -m benchmarks.comm_overhead \\
        collectives --group dp --tp 8

Definitions, as nccl-tests (NVIDIA's performance tests for NCCL) has them, with n the ranks
of the group and "bytes" the size of the full buffer:

    all-gather      bytes = the OUTPUT buffer (n shards of bytes/n each)
    reduce-scatter  bytes = the INPUT buffer (the output shard is bytes/n)
    all-reduce      bytes = the one buffer, reduced in place

    algbw = bytes / time
    busbw = algbw * (n - 1) / n        all-gather, reduce-scatter
    busbw = algbw * 2 * (n - 1) / n    all-reduce

busbw is the rate each rank's link must carry in a ring algorithm, so it is comparable
across ops and group sizes and against the hardware's link bandwidth. GB/s is 1e9 bytes/s.
Each buffer holds a whole number of elements per rank: the element count is rounded down to
a multiple of n (at least n), and the bytes reported are the bytes actually moved.

Timing: each op runs --warmup times, then --iters times back to back; every iteration is
timed on its own (CUDA events around the op on GPUs, the wall clock on CPU, where gloo is
synchronous), the median is taken on each rank, and the reported time is the maximum of
the medians over all ranks of the job (an all-reduce with MAX): the slowest rank sets the
pace of a step. With several groups (e.g. --group tp on 16 ranks with --tp 8) every group
runs its collective at the same time, as the groups of a training step do. The first
warm-up iteration of each op and size is checked against the expected values.

With --out FILE, rank 0 writes the JSON that `megatron-ibxl plan --calibrate FILE` reads:

    {"mode": "collectives", "backend": "gloo" | "nccl", "world_size": N,
     "group": "world" | "tp" | "dp", "group_size": n,
     "results": [{"op": "all_gather" | "reduce_scatter" | "all_reduce", "bytes": int,
                  "time_us": float, "algbw_gbps": float, "busbw_gbps": float}, ...]}
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_ibxl.errors import UserError

logger = logging.getLogger(__name__)

OPS = ("all_gather", "reduce_scatter", "all_reduce")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}

# torch 2.13 renamed the flat-tensor collectives (`*_single`) and deprecated the old names;
# older releases (the GPU machines' torch 2.11) have only the old ones.
_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


@dataclass
class CollectiveResult:
    """One op at one size: the row of the table and of the JSON `results` list."""

    op: str
    """`all_gather`, `reduce_scatter` or `all_reduce`."""
    bytes: int
    """Full buffer size in bytes, as nccl-tests counts it (see the module docstring)."""
    time_us: float
    """Median time of one op in microseconds, the maximum over ranks."""
    algbw_gbps: float
    """bytes / time in GB/s (1e9 bytes/s)."""
    busbw_gbps: float
    """algbw times the op's bus factor, in GB/s."""


def parse_size(text: str) -> int:
    """Bytes from `1024`, `1K`, `1KiB`, `256M`, `1G` (binary multiples)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:i?B)?\s*", text, flags=re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size; write bytes or a binary multiple such as 1K, 64M, 1G"
        )
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def format_size(num_bytes: int) -> str:
    """`1024` -> `1 KiB`; sizes that are not a whole number of a unit stay in bytes."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if num_bytes >= scale and num_bytes % scale == 0:
            return f"{num_bytes // scale} {unit}"
    return f"{num_bytes} B"


def sweep_sizes(min_bytes: int, max_bytes: int) -> list[int]:
    """Doubling sizes from min_bytes up to and including max_bytes."""
    sizes = []
    size = min_bytes
    while size <= max_bytes:
        sizes.append(size)
        size *= 2
    return sizes


def bus_factor(op: str, group_size: int) -> float:
    """busbw / algbw for an op over n ranks: (n-1)/n, or 2(n-1)/n for all-reduce."""
    ring = (group_size - 1) / group_size
    return 2 * ring if op == "all_reduce" else ring


def element_count(num_bytes: int, element_size: int, group_size: int) -> int:
    """Elements of the full buffer: num_bytes rounded down to a multiple of the group size,
    and at least one element per rank."""
    count = (num_bytes // element_size) // group_size * group_size
    return max(count, group_size)


@dataclass
class _Collective:
    """A ready-to-run collective on preallocated buffers, and a check of its result."""

    run: Callable[[], None]
    check: Callable[[], bool]
    reset: Callable[[], None]


def _make_collective(
    op: str, count: int, group: dist.ProcessGroup | None, device: torch.device, dtype
) -> _Collective:
    """Buffers and closures for one op over `count` elements of the full buffer."""
    n = dist.get_world_size(group)
    rank_value = float(dist.get_rank(group) + 1)
    rank_sum = n * (n + 1) / 2  # sum over the group of (group rank + 1)
    shard = count // n

    def close_to(tensor: torch.Tensor, value: float) -> bool:
        return bool(((tensor.float() - value).abs() <= 1e-2 * value).all())

    if op == "all_gather":
        send = torch.full((shard,), rank_value, device=device, dtype=dtype)
        recv = torch.empty(count, device=device, dtype=dtype)
        # Chunk j of the output is group rank j's shard, filled with j + 1.
        expected = torch.arange(1, n + 1, device=device, dtype=torch.float32)[:, None]
        return _Collective(
            run=lambda: _all_gather(recv, send, group=group),  # [B/n] -> [B]
            check=lambda: bool((recv.float().view(n, shard) == expected).all()),
            reset=lambda: None,
        )
    if op == "reduce_scatter":
        send = torch.full((count,), rank_value, device=device, dtype=dtype)
        recv = torch.empty(shard, device=device, dtype=dtype)
        return _Collective(
            run=lambda: _reduce_scatter(recv, send, group=group),  # [B] -> [B/n]
            check=lambda: close_to(recv, rank_sum),
            reset=lambda: None,
        )
    buffer = torch.full((count,), rank_value, device=device, dtype=dtype)

    # After the check, 1/n everywhere: repeated in-place sums stay near 1, never overflow.
    return _Collective(
        run=lambda: dist.all_reduce(buffer, group=group),  # [B] -> [B], in place
        check=lambda: close_to(buffer, rank_sum),
        reset=lambda: buffer.fill_(1.0 / n),
    )


def _time_iterations(run: Callable[[], None], iters: int, device: torch.device) -> list[float]:
    """Seconds of each of `iters` back-to-back runs."""
    if device.type != "cuda":
        seconds = []
        for _ in range(iters):
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
        return seconds

    # CUDA events on the current stream bracket the op: the NCCL stream waits for the
    # start event's stream and the current stream waits for the NCCL work to finish.
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(iters)
    ]
    for start, end in events:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def measure(
    op: str,
    num_bytes: int,
    group: dist.ProcessGroup | None,
    device: torch.device,
    dtype: torch.dtype,
    iters: int,
    warmup: int,
) -> tuple[int, float]:
    """Median seconds of one op on this rank, and the bytes actually moved.

    Raises RuntimeError when the first warm-up result is wrong (a broken transport).
    """
    n = dist.get_world_size(group)
    element_size = torch.empty((), dtype=dtype).element_size()
    count = element_count(num_bytes, element_size, n)
    collective = _make_collective(op, count, group, device, dtype)

    collective.run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if not collective.check():
        raise RuntimeError(f"{op} of {count * element_size} bytes returned wrong values")
    collective.reset()
    for _ in range(max(warmup - 1, 0)):
        collective.run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)

    seconds = _time_iterations(collective.run, iters, device)
    return count * element_size, statistics.median(seconds)


def to_result(op: str, num_bytes: int, seconds: float, group_size: int) -> CollectiveResult:
    """Bandwidths of one measurement, by the nccl-tests definitions."""
    algbw = num_bytes / seconds / 1e9
    return CollectiveResult(
        op=op,
        bytes=num_bytes,
        time_us=seconds * 1e6,
        algbw_gbps=algbw,
        busbw_gbps=algbw * bus_factor(op, group_size),
    )


def format_table(results: list[CollectiveResult]) -> str:
    """The human table: one row per size and op."""
    header = f"{'size':>9} {'bytes':>11}  {'op':<15}{'time_us':>12}{'algbw_GB/s':>12}"
    lines = [header + f"{'busbw_GB/s':>12}"]
    for row in results:
        lines.append(
            f"{format_size(row.bytes):>9} {row.bytes:>11}  {row.op:<15}{row.time_us:>12.1f}"
            f"{row.algbw_gbps:>12.3f}{row.busbw_gbps:>12.3f}"
        )
    return "\n".join(lines)


def _check_collectives_args(args: argparse.Namespace, world_size: int) -> None:
    """Raise UserError for a sweep that cannot run, before any group is started."""
    if args.min_bytes <= 0 or args.max_bytes < args.min_bytes:
        raise UserError(
            f"--min-bytes {args.min_bytes} / --max-bytes {args.max_bytes}: need "
            "0 < min-bytes <= max-bytes"
        )
    if args.iters < 1 or args.warmup < 0:
        raise UserError(
            f"--iters {args.iters} / --warmup {args.warmup}: need iters >= 1 and warmup >= 0"
        )
    if args.tp < 1 or world_size % args.tp:
        raise UserError(
            f"--tp {args.tp}: does not divide the world size {world_size}; use a divisor"
        )
    group_size = {"world": world_size, "tp": args.tp, "dp": world_size // args.tp}[args.group]
    if group_size < 2:
        raise UserError(
            f"--group {args.group} has {group_size} rank (world size {world_size}, --tp "
            f"{args.tp}); a collective needs 2 or more: launch more processes with torchrun "
            "--nproc_per_node N or mpirun -np N, or choose another --group/--tp"
        )


def run_collectives(args: argparse.Namespace) -> int:
    """The `collectives` mode: sweep, print the table on rank 0, write --out on rank 0."""
    from megatron_ibxl.config import ParallelConfig
    from megatron_ibxl.logging_setup import setup_logging
    from megatron_ibxl.parallel import detect_launch_env, init_parallel, shutdown_parallel

    launch = detect_launch_env()
    _check_collectives_args(args, launch.world_size)
    setup_logging(launch.rank)
    parallel = ParallelConfig(tp=args.tp, backend=args.backend, timeout_s=args.timeout_s)
    ctx = init_parallel(parallel, launch=launch)
    try:
        group = {"world": None, "tp": ctx.tp_group, "dp": ctx.dp_group}[args.group]
        group_size = dist.get_world_size(group)
        dtype = DTYPES[args.dtype]
        if ctx.rank == 0:
            logger.info(
                "collectives: backend=%s world_size=%d group=%s group_size=%d dtype=%s "
                "sizes=%s..%s iters=%d warmup=%d",
                ctx.backend,
                ctx.world_size,
                args.group,
                group_size,
                args.dtype,
                format_size(args.min_bytes),
                format_size(args.max_bytes),
                args.iters,
                args.warmup,
            )

        measured = []  # (op, bytes, this rank's median seconds)
        for num_bytes in sweep_sizes(args.min_bytes, args.max_bytes):
            for op in OPS:
                actual, seconds = measure(
                    op, num_bytes, group, ctx.device, dtype, args.iters, args.warmup
                )
                measured.append((op, actual, seconds))
            if ctx.rank == 0:
                logger.info("measured %s", format_size(num_bytes))

        # One all-reduce for the whole sweep: the slowest rank's median of every row.
        medians = torch.tensor([row[2] for row in measured], dtype=torch.float64)
        medians = medians.to(ctx.device)
        dist.all_reduce(medians, op=dist.ReduceOp.MAX)  # [rows] -> [rows], max over ranks
        results = [
            to_result(op, actual, seconds, group_size)
            for (op, actual, _), seconds in zip(measured, medians.tolist())
        ]
        if ctx.rank == 0:
            _report(args, ctx.backend, ctx.world_size, group_size, results)
    finally:
        shutdown_parallel()
    return 0


def _report(args, backend: str, world_size: int, group_size: int, results) -> None:
    """Print the table and write the JSON file (rank 0 only)."""
    print(
        f"# collectives backend={backend} world_size={world_size} group={args.group} "
        f"group_size={group_size} dtype={args.dtype} iters={args.iters} warmup={args.warmup}"
    )
    print(format_table(results), flush=True)
    if args.out is None:
        return
    payload = {
        "mode": "collectives",
        "backend": backend,
        "world_size": world_size,
        "group": args.group,
        "group_size": group_size,
        "results": [asdict(row) for row in results],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(partial, out)
    logger.info("wrote %s", out)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subcommand per benchmark mode."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.comm_overhead",
        description="Measure communication: collective bandwidth sweeps.",
    )
    sub = parser.add_subparsers(dest="mode", metavar="MODE", required=True)

    coll = sub.add_parser(
        "collectives",
        help="all-gather, reduce-scatter and all-reduce from --min-bytes to --max-bytes",
    )
    coll.add_argument(
        "--min-bytes",
        type=parse_size,
        default=1024,
        metavar="SIZE",
        help="smallest full-buffer size (default 1K)",
    )
    coll.add_argument(
        "--max-bytes",
        type=parse_size,
        default=256 * 1024**2,
        metavar="SIZE",
        help="largest full-buffer size (default 256M); sizes double",
    )
    coll.add_argument("--iters", type=int, default=20, help="timed iterations per op and size")
    coll.add_argument("--warmup", type=int, default=5, help="untimed iterations before them")
    coll.add_argument(
        "--group",
        choices=["world", "tp", "dp"],
        default="world",
        help="the world, this rank's tensor-parallel group, or its data-parallel group",
    )
    coll.add_argument("--tp", type=int, default=1, help="tensor-parallel size for tp/dp groups")
    coll.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="element type (nccl-tests' default is float32)",
    )
    coll.add_argument(
        "--backend",
        choices=["auto", "nccl", "gloo"],
        default="auto",
        help="auto: nccl with CUDA, gloo otherwise",
    )
    coll.add_argument(
        "--timeout-s",
        type=float,
        default=600.0,
        help="seconds a collective may wait before the job fails",
    )
    coll.add_argument(
        "--out", metavar="FILE", default=None, help="write the results as JSON (rank 0)"
    )
    coll.set_defaults(handler=run_collectives)
    _add_step_parser(sub)
    return parser


def _add_step_parser(sub) -> None:
    """The `step` mode's arguments (its code is benchmarks/comm_step.py)."""
    step = sub.add_parser(
        "step",
        help="compute vs communication vs exposed communication of real training steps",
    )
    step.add_argument("--config", required=True, metavar="FILE", help="the run's YAML file")
    step.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (repeatable), as `megatron-ibxl train --set`",
    )
    step.add_argument("--steps", type=int, default=5, help="measured optimizer steps")
    step.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    step.add_argument(
        "--method",
        choices=["auto", "timing", "profiler"],
        default="auto",
        help="timing: wall clock around collective waits (CPU, gloo); profiler: CUDA kernels "
        "from torch.profiler (NCCL); auto picks by the device",
    )
    step.add_argument("--json", action="store_true", help="print the JSON object, not a table")
    step.add_argument("--out", metavar="FILE", default=None, help="write the JSON object (rank 0)")
    step.set_defaults(handler=_run_step)


def _run_step(args: argparse.Namespace) -> int:
    from benchmarks.comm_step import run_step

    return run_step(args)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run the mode; a user error is one stderr line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UserError as error:
        from megatron_ibxl.parallel import detect_launch_env

        # Every process finds the same problem: the first one of each node says it.
        if detect_launch_env().local_rank == 0:
            print(f"error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
