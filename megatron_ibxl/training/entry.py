"""`megatron-ibxl train`: build everything from the configuration, resume, train, exit.

Launched once per rank by `launch/torchrun.sh`, `launch/mpirun.sh` or `launch/slurm.sbatch`.
In order: join the process groups, announce the run once (the start-up block), build the
towers, shard them, build the optimizer, schedule and data, resume from the run's latest
checkpoint, then train. SIGTERM or SIGUSR1 makes every rank finish its step, checkpoint and
exit 0. A peer that dies or hangs ends every process with an error naming the rank within
`parallel.timeout_s`, never a silent wait.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import traceback
import warnings
from pathlib import Path

import torch

from megatron_ibxl.config import BatchLayout, RunConfig, load_config, validate
from megatron_ibxl.errors import UserError
from megatron_ibxl.logging_setup import setup_logging
from megatron_ibxl.parallel import (
    detect_launch_env,
    init_parallel,
    layout_table,
    shutdown_parallel,
)
from megatron_ibxl.parallel.heartbeat import Heartbeat, default_store, describe_silent
from megatron_ibxl.parallel.setup import ParallelContext
from megatron_ibxl.training.loop import Trainer, train
from megatron_ibxl.training.metrics import MetricsWriter
from megatron_ibxl.training.preflight import check_inputs
from megatron_ibxl.training.signals import StopSignal, Watchdog, flush_logs

logger = logging.getLogger(__name__)

EXIT_FAILED = 1
"""Exit code of a rank whose training failed (a collective error, a crash)."""

_COLLECTIVE_HINTS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket")


def _quiet_known_warnings() -> None:
    """Hide third-party notices that every rank would print and that say nothing about this
    run: Megatron-core's CUDA-only tuning hints (on CPU), a deprecation inside Megatron's own
    config defaults, and torch's renaming of the collectives FSDP2 calls internally."""
    for pattern in (
        ".*CUDA_DEVICE_MAX_CONNECTIONS.*",
        ".*cuda_graph_scope.*",
        ".*all_gather_into_tensor.* is deprecated.*",
        ".*reduce_scatter_tensor.* is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def rank_label(ctx: ParallelContext, rank: int | None = None) -> str:
    """`rank 3 (tp 1, dp 1, pp 0)`: how a process (this one when `rank` is None) is named in
    warnings and errors."""
    if rank is None:
        return f"rank {ctx.rank} (tp {ctx.tp_rank}, dp {ctx.dp_rank}, pp {ctx.pp_rank})"
    _, pp_rank, dp_rank, tp_rank = layout_table(ctx)[rank]
    return f"rank {rank} (tp {tp_rank}, dp {dp_rank}, pp {pp_rank})"


def run(args) -> int:
    """Train from `args.config` with `args.overrides`; returns the process exit code.

    User errors (config, data, checkpoint) raise UserError for the CLI to print. Any other
    failure after the process groups are up (a peer died, a collective timed out) is logged
    on this rank with its coordinates and ends the process at once with EXIT_FAILED, since
    tearing down a broken process group can itself hang.
    """
    launch = detect_launch_env()
    _quiet_known_warnings()
    setup_logging(launch.rank, logging.INFO if launch.rank == 0 else logging.WARNING)
    try:
        config = load_config(args.config, args.overrides)
        batch = validate(config, launch.world_size)
        check_inputs(config)
    except UserError as exc:
        # Every rank finds the same problem before the process groups start: the first rank
        # of each node reports it, the others only exit with the same code.
        exc.report = launch.local_rank == 0
        raise
    done = _completed_step(config)
    if done is not None:
        logger.info(
            "run already complete at step %d of %d; nothing to train (%s)",
            done,
            config.schedule.total_steps,
            config.logging.run_dir,
        )
        return 0

    ctx = init_parallel(config.parallel, seed=config.data.seed, launch=launch)
    logging.getLogger().setLevel(logging.INFO if ctx.owns_metrics else logging.WARNING)
    heartbeat = Heartbeat(default_store(), ctx.rank, ctx.world_size).start()

    def silent_peers() -> str:
        return describe_silent(heartbeat.silent_ranks(), lambda rank: rank_label(ctx, rank))

    watchdog = Watchdog(rank_label(ctx), config.parallel.timeout_s, silent_peers).start()
    try:
        code = _train(config, batch, ctx, watchdog, args.config)
    except UserError:
        watchdog.stop()
        heartbeat.stop()
        shutdown_parallel()
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure must end this rank visibly
        _fail(ctx, exc, silent_peers)
    watchdog.stop()
    heartbeat.stop()
    shutdown_parallel()
    return code


def _completed_step(config: RunConfig) -> int | None:
    """The step of the run's latest checkpoint when it has reached schedule.total_steps (so
    there is nothing to train), else None. Read from the file system alone, the same on
    every rank, before any process group is started."""
    from megatron_ibxl.training.checkpoint import find_latest

    if not config.checkpoint.resume:
        return None
    latest = find_latest(config.logging.run_dir)
    if latest is None:
        return None
    try:
        step = int(latest.name.removeprefix("step_"))
    except ValueError:
        return None
    return step if step >= config.schedule.total_steps else None


def _fail(ctx: ParallelContext, exc: BaseException, silent_peers) -> None:
    """Log why this rank ends, naming it (and, after a failed collective, the peers that went
    silent: `silent_peers()`), and leave without touching the process group."""
    text = f"{type(exc).__name__}: {exc}".strip()
    if isinstance(exc, KeyboardInterrupt):
        logger.error("%s: interrupted", rank_label(ctx))
    elif isinstance(exc, RuntimeError) and any(h in text.lower() for h in _COLLECTIVE_HINTS):
        logger.error(
            "%s: a collective failed, so a peer rank has probably died or hung: %s; %s. "
            "Ending this process; rerun to resume from the last complete checkpoint",
            rank_label(ctx),
            text.splitlines()[0],
            silent_peers(),
        )
    else:
        logger.error("%s: training failed:\n%s", rank_label(ctx), traceback.format_exc())
    flush_logs()
    os._exit(130 if isinstance(exc, KeyboardInterrupt) else EXIT_FAILED)


def _train(
    config: RunConfig, batch: BatchLayout, ctx: ParallelContext, watchdog: Watchdog, path: str
) -> int:
    """Build the pieces, resume, run the loop. An orchestrator: its paragraphs are the
    start-up phases, announced once on the owning rank."""
    from megatron_ibxl.training.build import build_training, evaluation_fn, make_saver, resume

    run_dir = Path(config.logging.run_dir)
    _lock_run_dir(run_dir, ctx)
    if ctx.owns_metrics:
        _announce(config, batch, ctx, path)

    # Installed first, so that a signal during the build stops the run after its first step.
    stop = StopSignal()
    stop.install()
    # Building initialises every full-size weight on each rank (minutes at 30B): a wider budget.
    with watchdog.phase("building the model, optimizer and data", 4 * config.parallel.timeout_s):
        parts = build_training(config, batch, ctx)
        state, position = resume(config, ctx, parts)
        parts.loader = parts.make_loader(position)
    if ctx.owns_metrics:  # only once the checkpoint was accepted by this configuration
        _write_resolved_config(config, run_dir, path)

    total = config.schedule.total_steps
    if state.step >= total:  # a checkpoint past total_steps loaded via find_latest's fallback
        logger.info("run already complete at step %d of %d; nothing to train", state.step, total)
        parts.loader.close()
        return 0
    writer = MetricsWriter(
        run_dir, config.logging, ctx.owns_metrics, state.step, total, config.to_dict()
    )
    trainer = Trainer(
        config=config,
        ctx=ctx,
        batch=batch,
        model=parts.model,
        optimizer=parts.optimizer,
        scheduler=parts.scheduler,
        grad_sync=parts.grad_sync,
        loader=parts.loader,
        tokenizer=parts.tokenizer,
        writer=writer,
        stop=stop,
        watchdog=watchdog,
        save=make_saver(config, ctx, parts),
        evaluate=evaluation_fn(config, ctx, parts),
    )
    try:
        result = train(trainer, state)
    finally:
        # The stop handler stays installed through the teardown: a late SIGTERM changes
        # nothing, and only a second Ctrl-C a moment after the first aborts it.
        writer.close()
        parts.loader.close()
    logger.info("%s at step %d (%.1f s of training)", result.reason, state.step, state.train_s)
    return 0


_RUN_LOCK: list = []
"""The open lock file of this process's run folder, held until the process exits."""


def _lock_run_dir(run_dir: Path, ctx: ParallelContext) -> None:
    """Create RUN_DIR and hold an exclusive lock on RUN_DIR/.lock (on the metrics-owning
    rank), so that a second job started on the same folder stops with an error instead of
    interleaving checkpoints and metrics with the first. Every rank agrees on the outcome.

    The lock is flock(2): local file systems and NFS/Lustre mounts with flock support honour
    it; on a file system without it the check passes and guards nothing."""
    import fcntl

    import torch.distributed as dist

    busy = False
    if ctx.owns_metrics:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / ".lock", "a")  # noqa: SIM115 - held for the process lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _RUN_LOCK.append(handle)
        except OSError:
            handle.close()
            busy = True
    flag = torch.tensor([1.0 if busy else 0.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # [1] -> [1], over the world
    if flag.item() > 0:
        error = UserError(
            f"logging.run_dir={run_dir}: another training job is using this folder (it holds "
            f"{run_dir / '.lock'}); wait for it to end or choose another logging.run_dir"
        )
        error.report = busy
        raise error


def _write_resolved_config(config: RunConfig, run_dir: Path, path: str) -> None:
    """RUN_DIR/config.json: the resolved configuration and its hash, for reruns and tools.
    The record of a different configuration that was there is kept as config.<hash>.json."""
    record = {"config_hash": config.digest(), "source": str(path), "config": config.to_dict()}
    current = run_dir / "config.json"
    if current.is_file():
        try:
            old_hash = json.loads(current.read_text()).get("config_hash")
        except (json.JSONDecodeError, AttributeError):
            old_hash = "unreadable"
        if old_hash and old_hash != record["config_hash"]:
            os.replace(current, run_dir / f"config.{old_hash}.json")
    tmp = run_dir / "config.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, run_dir / "config.json")


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in ("megatron-core", "megatron-ibxl", "nvidia-dali-cuda120"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} absent")
    return ", ".join(parts)


def _announce(config: RunConfig, batch: BatchLayout, ctx: ParallelContext, path: str) -> None:
    """The start-up block: config and hash, versions, layout, parameters, batch, FLOPs."""
    from megatron_ibxl.models.param_count import count_parameters

    counts = count_parameters(config.model, config.parallel.tp, config.loss.kind)
    par = config.parallel
    lines = [
        f"config {path} hash {config.digest()} (resolved: {config.logging.run_dir}/config.json)",
        f"versions: {_versions()}; backend {ctx.backend}, device {ctx.device}",
        f"layout: world {ctx.world_size} = tp {ctx.tp} x pp {ctx.pp} x dp {ctx.dp}; "
        f"sequence_parallel {par.sequence_parallel}, zero {par.zero}, gather {par.gather}, "
        f"recompute {par.recompute}, timeout {par.timeout_s:g} s",
        *_layout_lines(ctx),
        f"parameters: vision {counts.vision:,}, text {counts.text:,}, heads {counts.heads:,}, "
        f"total {counts.total:,}",
        f"batch: global {batch.global_batch} pairs = micro {batch.micro_batch} x dp {batch.dp} "
        f"x accumulation {batch.accumulation}; loss {config.loss.kind}, negatives "
        f"{config.loss.negatives}",
        f"compute: {_tflop_per_step(config, batch):.4g} TFLOP per optimizer step (model "
        "FLOPs of forward and backward over all ranks, as the planner counts them)",
        f"schedule: {config.schedule.total_steps} steps, warmup {config.schedule.warmup_steps}, "
        f"lr {config.optimizer.lr:g} -> {config.schedule.min_lr:g}",
    ]
    for line in lines:
        logger.info(line)


def _tflop_per_step(config: RunConfig, batch: BatchLayout) -> float:
    from megatron_ibxl.planning.flops import model_flops_per_step
    from megatron_ibxl.planning.shapes import tower_shapes

    flops = model_flops_per_step(
        tower_shapes(config, batch.tp),
        config.model.embed_dim,
        batch.global_batch,
        config.loss.negatives,
        batch.micro_batch,
        batch.accumulation,
        batch.dp,
    )
    return flops / 1e12


def _layout_lines(ctx: ParallelContext, limit: int = 16) -> list[str]:
    """Which rank holds which (pp, dp, tp) coordinate; the rule alone for large jobs."""
    from megatron_ibxl.parallel import layout_table

    rule = "  rank = pp * (dp_size * tp_size) + dp * tp_size + tp (tensor parallel fastest)"
    if ctx.world_size > limit:
        return [rule]
    rows = layout_table(ctx)
    return [rule] + [f"  rank {r}: pp {p} dp {d} tp {t}" for r, p, d, t in rows]
