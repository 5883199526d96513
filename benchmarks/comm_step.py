"""Mode `step` of benchmarks/comm_overhead.py: where real training steps spend their time.

Runs optimizer steps of a configuration exactly as `megatron-ibxl train` does (the pieces of
`megatron_ibxl.training.build.build_training`, then `train_step` and `clip_and_step` on each
step's micro-batches) and splits every step into

    step_ms          wall time of the step (forwards, backwards, collectives, optimizer);
                     the micro-batches are fetched before it starts (reported as data_ms)
    comm_ms          time the collectives took
    exposed_comm_ms  time the step waited on collectives that no computation hid
    compute_ms       the rest of the step
    overhead_fraction = exposed_comm_ms / step_ms

with one of two methods, named in the output:

- `timing` (CPU, gloo): every `Work.wait` on the training thread is timed with the wall
  clock. Each synchronous collective of torch.distributed ends in such a wait, so this
  catches the tensor-parallel all-reduces and all-gathers of Megatron-core, FSDP2's
  all-gathers and reduce-scatters, and the loss and norm all-reduces alike. gloo runs a
  collective while the caller waits (no streams), so the time waited is the time the
  collective took: comm_ms = exposed_comm_ms, and compute_ms = step_ms - exposed_comm_ms.
  The time includes waiting for the slowest rank to arrive. A wait that is not inside a
  synchronous collective is counted under `async_wait`: a collective started with
  `async_op=True` and waited on later, such as the all-gather that Megatron-core's
  sequence-parallel linear layers start in backward before computing the input gradient.
  gloo progresses those on its own thread while the caller computes, so only their waited
  part is seen, and with sequence parallelism comm_ms is a lower bound (exposed_comm_ms
  is still exact).
- `profiler` (CUDA, NCCL): torch.profiler records the kernels of each step. Kernels whose
  name contains `nccl` are communication, every other kernel is compute (memory copies and
  sets are neither). comm_ms is the length of the union of communication kernels,
  compute_ms that of compute kernels, and exposed_comm_ms the part of the communication
  union during which no compute kernel ran on any stream. Note: written for NCCL and tested
  only through its interval arithmetic on CPU; no GPU run has checked the kernel names.

Each rank measures its own steps; the reported step values are the means over ranks (so
compute_ms + exposed_comm_ms = step_ms holds in the output), with `step_ms_max` the slowest
rank's step, and the medians are taken over the measured steps.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_ibxl.errors import UserError

logger = logging.getLogger(__name__)

Interval = tuple[float, float]

_OP_NAMES = {
    "all_gather_single": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "_all_gather_base": "all_gather",
    "all_gather": "all_gather",
    "reduce_scatter_single": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter",
    "reduce_scatter": "reduce_scatter",
}
"""torch.distributed's function names (old and new) folded into one name per collective."""

_STEP_KEYS = ("step_ms", "compute_ms", "comm_ms", "exposed_comm_ms", "data_ms")


@dataclass
class StepBreakdown:
    """One rank's (or the ranks' mean) split of one step; times in milliseconds."""

    step: int
    step_ms: float
    compute_ms: float
    comm_ms: float
    exposed_comm_ms: float
    data_ms: float
    """Fetching the step's micro-batches, before the step's clock starts."""
    comm_by_op_ms: dict[str, float] = field(default_factory=dict)
    """comm_ms split by `op@group` (group: tp, dp, world or other)."""
    step_ms_max: float | None = None
    """The slowest rank's step_ms (in the reported, rank-averaged rows only)."""

    @property
    def overhead_fraction(self) -> float:
        """exposed_comm_ms / step_ms."""
        return self.exposed_comm_ms / self.step_ms if self.step_ms > 0 else 0.0

    def to_dict(self) -> dict:
        """The JSON row, with overhead_fraction."""
        row = asdict(self)
        row["overhead_fraction"] = self.overhead_fraction
        if row["step_ms_max"] is None:
            del row["step_ms_max"]
        return row


def merge_intervals(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, non-overlapping intervals covering the same points as `intervals`."""
    merged: list[list[float]] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


def covered_length(intervals: Iterable[Interval]) -> float:
    """Length of the union of `intervals`."""
    return sum(end - start for start, end in merge_intervals(intervals))


def uncovered_length(intervals: Iterable[Interval], cover: Iterable[Interval]) -> float:
    """Length of the union of `intervals` that the union of `cover` does not overlap."""
    cover = merge_intervals(cover)
    total = 0.0
    for start, end in merge_intervals(intervals):
        hidden = sum(max(0.0, min(end, c_end) - max(start, c_start)) for c_start, c_end in cover)
        total += (end - start) - hidden
    return total


def kernel_breakdown(kernels: Iterable[tuple[str, float, float]]) -> tuple[float, float, float]:
    """(comm, exposed comm, compute) lengths from `(name, start, end)` GPU kernels: names
    containing `nccl` are communication; `Memcpy`/`Memset` entries are ignored."""
    comm, compute = [], []
    for name, start, end in kernels:
        lowered = name.lower()
        if lowered.startswith(("memcpy", "memset")):
            continue
        (comm if "nccl" in lowered else compute).append((start, end))
    return covered_length(comm), uncovered_length(comm, compute), covered_length(compute)


class GroupNames:
    """Names a process group `tp`, `dp` or `world` by its ranks (FSDP2's device mesh and
    Megatron-core hold different group objects over the same ranks); else `other`."""

    def __init__(self, tp_group, dp_group):
        self._known = {}
        for name, group in (("tp", tp_group), ("dp", dp_group), ("world", None)):
            if group is not None or name == "world":
                self._known.setdefault(tuple(self._ranks(group)), name)
        self._cache: dict[int, str] = {}

    @staticmethod
    def _ranks(group) -> list[int]:
        if group is None:
            return list(range(dist.get_world_size()))
        return dist.get_process_group_ranks(group)

    def name(self, group) -> str:
        """`tp`, `dp`, `world` or `other`; the narrowest name wins when two name the same ranks."""
        key = id(group)
        if key not in self._cache:
            self._cache[key] = self._known.get(tuple(self._ranks(group)), "other")
        return self._cache[key]


class WaitTimer:
    """Wall-clock seconds the installing thread spends in `torch.distributed.Work.wait`,
    by `op@group` of the synchronous collective that waited (`async_wait` otherwise).

    Works by replacing `Work.wait` on the class while installed; other threads pass through
    untimed.
    """

    def __init__(self, groups: GroupNames):
        self.groups = groups
        self.seconds: dict[str, float] = {}
        self._thread = threading.get_ident()
        self._original: Callable | None = None

    def install(self) -> None:
        """Start timing waits."""
        self._original = original = dist.Work.wait
        timer = self

        def timed_wait(work, *args, **kwargs):
            if threading.get_ident() != timer._thread:
                return original(work, *args, **kwargs)
            start = time.perf_counter()
            try:
                return original(work, *args, **kwargs)
            finally:
                label = timer._label(sys._getframe(1))
                seconds = time.perf_counter() - start
                timer.seconds[label] = timer.seconds.get(label, 0.0) + seconds

        dist.Work.wait = timed_wait

    def uninstall(self) -> None:
        """Put the original `Work.wait` back."""
        if self._original is not None:
            dist.Work.wait = self._original
            self._original = None

    def reset(self) -> dict[str, float]:
        """The seconds by label since the last reset, and start a new count."""
        taken, self.seconds = self.seconds, {}
        return taken

    def _label(self, frame) -> str:
        """`op@group` from the nearest torch.distributed collective on the stack."""
        for _ in range(8):
            if frame is None:
                break
            code = frame.f_code
            if code.co_filename.endswith("distributed_c10d.py") and code.co_name != "wait":
                op = _OP_NAMES.get(code.co_name, code.co_name)
                return f"{op}@{self.groups.name(frame.f_locals.get('group'))}"
            frame = frame.f_back
        return "async_wait"


def check_step_args(args) -> None:
    """Raise UserError for a `step` run that cannot measure anything."""
    if args.steps < 1 or args.warmup < 0:
        raise UserError(
            f"--steps {args.steps} / --warmup {args.warmup}: need steps >= 1 and warmup >= 0"
        )
    if not Path(args.config).is_file():
        raise UserError(f"--config {args.config}: no such file; pass a run YAML")


def run_step(args) -> int:
    """The `step` mode: build the run, time warm-up plus measured steps, report on rank 0."""
    from megatron_ibxl.config import load_config, validate
    from megatron_ibxl.logging_setup import setup_logging
    from megatron_ibxl.parallel import detect_launch_env, init_parallel, shutdown_parallel

    check_step_args(args)
    method = _choose_method(args.method)
    launch = detect_launch_env()
    setup_logging(launch.rank)
    config = load_config(args.config, args.overrides)
    batch = validate(config, launch.world_size)
    ctx = init_parallel(config.parallel, seed=config.data.seed, launch=launch)
    try:
        rows, note = _measure(args, config, batch, ctx, method)
        per_rank = [None] * ctx.world_size
        dist.all_gather_object(per_rank, [asdict(row) for row in rows])
        if ctx.rank == 0:
            report = build_report(args, config, batch, ctx, method, note, per_rank)
            _emit(report, args.out, args.json)
    finally:
        shutdown_parallel()
    return 0


def _choose_method(requested: str) -> str:
    """`profiler` with CUDA, `timing` without; a method the machine cannot use is an error."""
    has_cuda = torch.cuda.is_available()
    method = requested if requested != "auto" else ("profiler" if has_cuda else "timing")
    if method == "profiler" and not has_cuda:
        raise UserError(
            "--method profiler: times CUDA kernels and this machine has no CUDA device; use "
            "--method timing (or auto) on CPU"
        )
    if method == "timing" and has_cuda:
        raise UserError(
            "--method timing: on CUDA a wait returns before the NCCL kernel ends, so host "
            "timing would not see it; use --method profiler (or auto)"
        )
    return method


def _measure(args, config, batch, ctx, method) -> tuple[list[StepBreakdown], str]:
    """Build the run's pieces and measure --steps steps after --warmup; this rank's rows."""
    from megatron_ibxl.training.build import build_training

    parts = build_training(config, batch, ctx)
    loader = parts.make_loader(None)

    def fetch() -> tuple[list, float]:
        start = time.perf_counter()
        micro_batches = [next(loader) for _ in range(batch.accumulation)]
        return micro_batches, 1e3 * (time.perf_counter() - start)

    def run(micro_batches) -> None:
        _train_one_step(parts, config, ctx, micro_batches)

    for _ in range(args.warmup):
        run(fetch()[0])
    if method == "timing":
        return _measure_timing(args.steps, ctx, fetch, run)
    return _measure_profiler(args.steps, ctx, fetch, run)


def _train_one_step(parts, config, ctx, micro_batches) -> None:
    """What `megatron_ibxl.training.loop` does in one step, less the bookkeeping."""
    from megatron_ibxl.training.optimizer import clip_and_step
    from megatron_ibxl.training.step import train_step

    parts.optimizer.zero_grad(set_to_none=True)
    output = train_step(parts.model, micro_batches, config, ctx, parts.grad_sync)
    clip_and_step(parts.model, parts.optimizer, parts.scheduler, config, ctx, loss=output.loss)


def _measure_timing(steps, ctx, fetch, run) -> tuple[list[StepBreakdown], str]:
    timer = WaitTimer(GroupNames(ctx.tp_group, ctx.dp_group))
    rows = []
    timer.install()
    try:
        for index in range(steps):
            micro_batches, data_ms = fetch()
            dist.barrier()  # every rank starts the step together: no skew from data loading
            timer.reset()
            start = time.perf_counter()
            run(micro_batches)
            step_ms = 1e3 * (time.perf_counter() - start)
            by_op = {label: 1e3 * s for label, s in sorted(timer.reset().items())}
            comm_ms = sum(by_op.values())
            rows.append(
                StepBreakdown(index, step_ms, step_ms - comm_ms, comm_ms, comm_ms, data_ms, by_op)
            )
    finally:
        timer.uninstall()
    note = (
        "timing: wall clock around every Work.wait on the training thread. gloo collectives "
        "block the caller, so comm_ms = exposed_comm_ms (including waiting for the slowest rank)"
    )
    if any("async_wait" in row.comm_by_op_ms for row in rows):
        # Megatron's sequence-parallel backward starts its all-gather with async_op=True and
        # computes before waiting: gloo runs it meanwhile, and only the wait is seen here.
        note += (
            "; async_wait is the waited part of collectives started with async_op=True (on "
            "gloo they progress while the caller computes), so for them comm_ms is a lower "
            "bound"
        )
    return rows, note


def _measure_profiler(steps, ctx, fetch, run) -> tuple[list[StepBreakdown], str]:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    walls, data = [], []
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with profile(activities=activities) as prof:
        for index in range(steps):
            micro_batches, data_ms = fetch()
            dist.barrier()
            torch.cuda.synchronize(ctx.device)
            start = time.perf_counter()
            with record_function(f"ibxl_step_{index}"):
                run(micro_batches)
                torch.cuda.synchronize(ctx.device)
            walls.append(1e3 * (time.perf_counter() - start))
            data.append(data_ms)

    events = prof.events()
    windows = {e.name: (e.time_range.start, e.time_range.end) for e in events}
    kernels = [
        (e.name, e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type == DeviceType.CUDA
    ]
    rows = []
    for index in range(steps):
        lo, hi = windows[f"ibxl_step_{index}"]
        inside = [k for k in kernels if lo <= k[1] < hi]
        comm_us, exposed_us, compute_us = kernel_breakdown(inside)
        times_ms = (compute_us / 1e3, comm_us / 1e3, exposed_us / 1e3)
        rows.append(
            StepBreakdown(index, walls[index], *times_ms, data[index], _nccl_by_name(inside))
        )
    note = (
        "profiler: CUDA kernels from torch.profiler; comm = union of NCCL kernels, exposed = "
        "the part of it not overlapped by any compute kernel, compute = union of the others"
    )
    return rows, note


def _nccl_by_name(kernels: list[tuple[str, float, float]]) -> dict[str, float]:
    """Milliseconds of NCCL kernels by kernel family (`ncclDevKernel_AllGather_RING_LL` ->
    `AllGather`), summed (not a union)."""
    totals: dict[str, float] = {}
    for name, start, end in kernels:
        if "nccl" not in name.lower():
            continue
        base = name.split("(")[0].split("_")
        family = base[1] if len(base) > 1 else base[0]
        totals[family] = totals.get(family, 0.0) + (end - start) / 1e3
    return totals


def average_over_ranks(per_rank: list[list[dict]]) -> list[StepBreakdown]:
    """Step by step, the mean over ranks of every time (and of every op label), with the
    slowest rank's step_ms as step_ms_max."""
    rows = []
    for index, same_step in enumerate(zip(*per_rank)):
        mean = {key: statistics.fmean(r[key] for r in same_step) for key in _STEP_KEYS}
        labels = sorted({label for r in same_step for label in r["comm_by_op_ms"]})
        by_op = {
            label: statistics.fmean(r["comm_by_op_ms"].get(label, 0.0) for r in same_step)
            for label in labels
        }
        step_max = max(r["step_ms"] for r in same_step)
        rows.append(StepBreakdown(index, comm_by_op_ms=by_op, step_ms_max=step_max, **mean))
    return rows


def median_row(rows: list[StepBreakdown]) -> dict:
    """The median over steps of every value (overhead_fraction: median of the per-step ones)."""
    keys = (*_STEP_KEYS, "step_ms_max", "overhead_fraction")
    medians = {key: statistics.median(getattr(row, key) for row in rows) for key in keys}
    labels = sorted({label for row in rows for label in row.comm_by_op_ms})
    medians["comm_by_op_ms"] = {
        label: statistics.median(row.comm_by_op_ms.get(label, 0.0) for row in rows)
        for label in labels
    }
    return medians


def build_report(args, config, batch, ctx, method, note, per_rank) -> dict:
    """The JSON object of the `step` mode."""
    rows = average_over_ranks(per_rank)
    median = median_row(rows)
    return {
        "mode": "step",
        "method": method,
        "method_note": note,
        "backend": ctx.backend,
        "device": str(ctx.device.type),
        "torch": torch.__version__,
        "world_size": ctx.world_size,
        "config": str(args.config),
        "overrides": list(args.overrides),
        "layout": {
            "tp": ctx.tp,
            "pp": ctx.pp,
            "dp": ctx.dp,
            "sequence_parallel": config.parallel.sequence_parallel,
            "zero": config.parallel.zero,
            "gather": config.parallel.gather,
            "micro_batch": batch.micro_batch,
            "accumulation": batch.accumulation,
            "global_batch": batch.global_batch,
            "negatives": config.loss.negatives,
            "precision": config.optimizer.precision,
        },
        "warmup_steps": args.warmup,
        "ranks": "step values are means over ranks; step_ms_max is the slowest rank",
        "load_avg_1m": os.getloadavg()[0],
        "steps": [row.to_dict() for row in rows],
        "median": median,
        "samples_per_s": batch.global_batch / (median["step_ms_max"] / 1e3),
    }


def format_step_table(report: dict) -> str:
    """The human table of a `step` report: one row per step, then the median."""
    header = (
        f"{'step':>6}{'step_ms':>10}{'compute_ms':>12}{'comm_ms':>10}{'exposed_ms':>12}"
        f"{'overhead':>10}{'data_ms':>10}"
    )
    lines = [header]
    for row in [*report["steps"], {**report["median"], "step": "median"}]:
        lines.append(
            f"{row['step']!s:>6}{row['step_ms']:>10.1f}{row['compute_ms']:>12.1f}"
            f"{row['comm_ms']:>10.1f}{row['exposed_comm_ms']:>12.1f}"
            f"{row['overhead_fraction']:>10.3f}{row['data_ms']:>10.1f}"
        )
    by_op = report["median"]["comm_by_op_ms"]
    lines.append("median comm by op: " + ", ".join(f"{k} {v:.1f} ms" for k, v in by_op.items()))
    return "\n".join(lines)


def _emit(report: dict, out: str | None, as_json: bool) -> None:
    """Print the table (or, with --json, the JSON object) on stdout; write --out atomically."""
    if as_json:
        print(json.dumps(report), flush=True)
    else:
        _print_table(report)
    if out is None:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(partial, path)
    logger.info("wrote %s", path)


def _print_table(report: dict) -> None:
    layout = report["layout"]
    print(
        f"# step method={report['method']} backend={report['backend']} "
        f"world_size={report['world_size']} tp={layout['tp']} dp={layout['dp']} "
        f"zero={layout['zero']} global_batch={layout['global_batch']} "
        f"load_avg_1m={report['load_avg_1m']:.1f}"
    )
    print(f"# {report['method_note']}")
    print(format_step_table(report), flush=True)
