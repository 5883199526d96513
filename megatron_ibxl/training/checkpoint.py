"""Distributed checkpoints: model, optimizer, schedule, data position and RNG, reshardable.

Layout of `RUN_DIR/checkpoints/`:

    step_N/            one complete checkpoint
      .metadata, *.distcp   torch.distributed.checkpoint (DCP) files: parameters, AdamW state
      rng/rank_R.pt    each rank's random-number-generator states and its `extra`
      meta.json        written last: format, step, layout, schedule, extra, file sizes
    latest             the name of the newest complete checkpoint, replaced atomically
    .tmp-step_N/       a checkpoint being written (renamed to step_N only when complete)

Resharding. Every rank's piece of a parameter is a box of the full tensor: tensor parallelism
cuts the full tensor along Megatron's `partition_dim` into tp equal chunks, and FSDP2 (zero 3)
cuts this rank's chunk along dim 0 into dp chunks (torch.chunk semantics). Each piece is saved
as a DTensor on a ("tp", "dp") device mesh, with placements [Shard(partition_dim) or
Replicate(), Shard(0) or Replicate()] in that order, so that the dp split nests inside the tp
split as it does in memory. DCP records the boxes and reads any other layout's boxes back
from them, so a checkpoint loads under another tp or dp size. The full shapes do not depend
on the layout (the padded vocabulary is a multiple of lcm(pad, tp)). AdamW's moments are
saved the same way, keyed by parameter name.

Errors a user can cause (a missing, interrupted, truncated or foreign directory, one of
another model, or files whose bytes changed after they were written) raise CheckpointError
with one line naming the path, the problem and what to do, on every rank at once: each rank's
own file checks end in one agreement (an all-reduce) before DCP's collectives, and DCP itself
gathers every rank's read errors, so no rank is left waiting for one that failed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core.tensor_parallel import random as mcore_random
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from megatron_ibxl.config import RunConfig
from megatron_ibxl.errors import CheckpointError
from megatron_ibxl.parallel.setup import ParallelContext
from megatron_ibxl.parallel.sharding import (
    ParamPlacement,
    as_piece,
    layout_mesh,
    local_tensor,
    param_placement,
    reshard_parameters,
)

logger = logging.getLogger(__name__)

FORMAT = "megatron-ibxl/dcp-v1"
"""The `format` field of meta.json; anything else is a foreign checkpoint."""
META = "meta.json"
LATEST = "latest"
_TMP_PREFIX = ".tmp-"
_OPTIM_KEYS = ("exp_avg", "exp_avg_sq")


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _named_params(model: nn.Module, tp: int) -> dict[str, tuple[nn.Parameter, ParamPlacement]]:
    return {name: (p, param_placement(p, tp)) for name, p in model.named_parameters()}


def _model_state(params, mesh) -> dict[str, torch.Tensor]:
    return {
        f"model/{name}": as_piece(local_tensor(p).detach(), placement, mesh)
        for name, (p, placement) in params.items()
    }


def _optimizer_state(optimizer, params, mesh) -> dict[str, torch.Tensor]:
    """AdamW's moments as pieces like their parameters'; `step` as a replicated scalar."""
    state = {}
    for name, (param, placement) in params.items():
        entry = optimizer.state.get(param, {})
        for key in _OPTIM_KEYS:
            if key in entry:
                state[f"optim/{name}/{key}"] = as_piece(local_tensor(entry[key]), placement, mesh)
        if "step" in entry:
            state[f"optim/{name}/step"] = torch.as_tensor(entry["step"]).detach().float().cpu()
    return state


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    extra: dict[str, Any],
    config: RunConfig,
    ctx: ParallelContext,
) -> Path:
    """Write `run_dir/checkpoints/step_<step>` and point `latest` at it. Collective.

    Args:
        model, optimizer: after `shard_model` / `build_optimizer` (any zero, tp, dp).
        scheduler: its `state_dict()` must be JSON-able (WarmupCosineSchedule's is).
        extra: JSON-able run state (counters, the data loader's position). Each rank's own
            is kept and returned to the same rank by `load_checkpoint`; rank 0's is also in
            meta.json and is what every rank gets back under another layout.
        config: `checkpoint.keep_last` complete checkpoints are kept, older ones deleted.

    The files are written under a temporary name; rank 0 renames the folder only after every
    rank has finished, then replaces `latest`. A process killed before that leaves the
    previous checkpoint and `latest` untouched. Returns the checkpoint's path.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step}"
    tmp = root / f"{_TMP_PREFIX}step_{step}"
    if ctx.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    _barrier()

    reshard_parameters(model)
    mesh = layout_mesh(ctx)
    params = _named_params(model, ctx.tp)
    state: dict[str, Any] = _model_state(params, mesh)
    state.update(_optimizer_state(optimizer, params, mesh))
    dcp.save(state, checkpoint_id=str(tmp))
    _write_rank_state(tmp, ctx, extra)
    _barrier()

    if ctx.rank == 0:
        meta = {
            "format": FORMAT,
            "step": int(step),
            "layout": {"tp": ctx.tp, "dp": ctx.dp, "pp": ctx.pp, "world_size": ctx.world_size},
            "zero": config.parallel.zero,
            "params": {name: list(pl.full_shape) for name, (_, pl) in params.items()},
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "extra": extra,
            "files": _file_sizes(tmp),
        }
        _commit(tmp, final, meta)
        _prune(root, config.checkpoint.keep_last, keep=final.name)
    _barrier()
    logger.info("checkpoint of step %d written to %s", step, final)
    return final


def _write_rank_state(tmp: Path, ctx: ParallelContext, extra: dict[str, Any]) -> None:
    """This rank's `extra` and RNG states (CPU, CUDA, Megatron's tracker, Python, NumPy)."""
    states: dict[str, Any] = {
        "extra": extra,
        "cpu": torch.get_rng_state(),
        "tracker": mcore_random.get_cuda_rng_tracker().get_states(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        states["numpy"] = (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached)
    except ImportError:
        pass
    torch.save(states, tmp / "rng" / f"rank_{ctx.rank:05d}.pt")


def _file_sizes(folder: Path) -> dict[str, int]:
    return {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def _commit(tmp: Path, final: Path, meta: dict[str, Any]) -> None:
    """Rank 0, once every rank's files are written: meta.json, rename, then `latest`."""
    _write_atomically(tmp / META, json.dumps(meta, indent=1))
    if final.exists():
        # Saving a step again (a resumed run): move the old one aside before the rename.
        old = final.with_name(f"{_TMP_PREFIX}old-{final.name}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _write_atomically(final.parent / LATEST, final.name + "\n")


def _step_of(path: Path) -> int:
    try:
        return int(path.name.removeprefix("step_"))
    except ValueError:
        return -1


def _prune(root: Path, keep_last: int, keep: str) -> None:
    """Delete complete checkpoints older than the newest `keep_last` (never `keep`)."""
    complete = sorted(
        (p for p in root.glob("step_*") if (p / META).is_file() and _step_of(p) >= 0),
        key=_step_of,
    )
    for path in complete[: max(len(complete) - max(keep_last, 1), 0)]:
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)
            logger.info("deleted old checkpoint %s (checkpoint.keep_last=%d)", path, keep_last)


def find_latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of `run_dir`: the one `latest` names, or, when that
    file is missing or names no complete checkpoint, the highest complete step_N. None when
    there is none."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if (named / META).is_file():
            return named
        logger.warning("%s names %s, which is not a complete checkpoint", pointer, named)
    complete = [p for p in root.glob("step_*") if (p / META).is_file() and _step_of(p) >= 0]
    return max(complete, key=_step_of) if complete else None


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler,
    ctx: ParallelContext,
) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` under any tp / dp layout. Collective.

    Args:
        path: a step_N folder (see `find_latest`), or a copy of one under another name.
        model: built and sharded for the current layout; its parameters are overwritten.
        optimizer: None loads the model only (evaluation, initialisation) and reads neither
            AdamW's state nor the rng/ files, which may then be missing; otherwise AdamW's
            state, the schedule and the RNG states are restored too (a resume).
        scheduler: the schedule to restore, or None.

    RNG states carry over only into the layout that wrote them. Under another tp / dp size
    no rank's stream has a counterpart, so every generator is reseeded from the step instead
    (deterministic, but not the stream the original run would have drawn), with a warning.

    Returns the `extra` this rank saved on a resume (rank 0's under another layout, and when
    loading weights only), with `step` set to the checkpoint's step.
    Raises CheckpointError (one line, every rank) for a missing, incomplete, truncated,
    foreign or damaged directory or one written for another model.
    """
    path = Path(path)
    resume = optimizer is not None
    reshard_parameters(model)
    # Resuming must find exactly this model's parameters; loading weights only may leave
    # checkpoint parameters unused (a sigmoid loss's bias, say). Every file this rank reads on
    # its own is read before the agreement, so that all ranks stop together.
    meta, problem = _inspect(path, model, ctx.tp, resume=resume)
    saved, own = set(), None
    if problem is None:
        saved, own, problem = _read_own_files(path, meta, ctx, resume)
    _agree_or_raise(path, problem)

    mesh = layout_mesh(ctx)
    params = _named_params(model, ctx.tp)
    targets: dict[str, Any] = {
        f"model/{name}": as_piece(torch.zeros_like(local_tensor(p)), pl, mesh)
        for name, (p, pl) in params.items()
    }
    if resume:
        targets.update(_optimizer_targets(saved, optimizer, params, mesh))
    try:
        dcp.load(targets, checkpoint_id=str(path))
    except CheckpointException as error:
        # DCP gathers the read errors of all ranks and raises this (a BaseException) on each
        # alike, so rank 0 says it for all of them. An interrupt inside the read stays one.
        if not all(isinstance(inner, Exception) for inner, _ in error.failures.values()):
            raise
        raise _undecodable(path, error, resume, report=ctx.rank == 0) from None
    except Exception as error:  # noqa: BLE001 - one line, on the rank where it happened
        raise _undecodable(path, error, resume, report=True) from None

    with torch.no_grad():
        for name, (param, _) in params.items():
            local_tensor(param).copy_(targets[f"model/{name}"].to_local())
    if optimizer is not None:
        _fill_optimizer(optimizer, params, targets)
        if scheduler is not None and meta.get("scheduler") is not None:
            scheduler.load_state_dict(meta["scheduler"])
            for group in optimizer.param_groups:
                group["lr"] = scheduler.get_last_lr()[0]
    extra = meta.get("extra") or {}
    if resume:
        _restore_rng(own, meta, ctx, path)
        if own is not None:
            extra = own.get("extra", extra)
    logger.info("loaded checkpoint %s (step %d)", path, meta["step"])
    return {**extra, "step": int(meta["step"])}


def _optimizer_targets(saved: set[str], optimizer, params, mesh) -> dict[str, Any]:
    """Zero pieces for every AdamW state entry the checkpoint holds (`saved`: DCP's keys),
    shaped like the parameter's piece in the current layout."""
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    targets: dict[str, Any] = {}
    for name, (param, placement) in params.items():
        if id(param) not in owned:
            continue
        for key in _OPTIM_KEYS:
            if f"optim/{name}/{key}" in saved:
                piece = torch.zeros_like(local_tensor(param))
                targets[f"optim/{name}/{key}"] = as_piece(piece, placement, mesh)
        if f"optim/{name}/step" in saved:
            targets[f"optim/{name}/step"] = torch.zeros(())
    return targets


def _fill_optimizer(optimizer, params, targets) -> None:
    """Install the loaded moments as AdamW state, as DTensors where the parameter is one."""
    for name, (param, _) in params.items():
        if f"optim/{name}/step" not in targets:
            continue
        entry: dict[str, torch.Tensor] = {"step": targets[f"optim/{name}/step"].clone()}
        for key in _OPTIM_KEYS:
            loaded = targets.get(f"optim/{name}/{key}")
            if loaded is not None:
                value = torch.zeros_like(param, memory_format=torch.preserve_format)
                local_tensor(value).copy_(loaded.to_local())
                entry[key] = value
        optimizer.state[param] = entry


def _inspect(
    path: Path, model: nn.Module, tp: int, resume: bool = False
) -> tuple[dict[str, Any], str | None]:
    """(meta, None) for a complete checkpoint of this model, else ({}, what is wrong). A
    resume needs exactly this model's parameters and the rng/ files too."""
    if not path.exists():
        return {}, "no such directory; pass a step_N folder under RUN_DIR/checkpoints"
    if not path.is_dir():
        return {}, "is a file, not a checkpoint directory"
    if not (path / META).is_file():
        if (path / ".metadata").is_file() or path.name.startswith(_TMP_PREFIX):
            return {}, f"incomplete (no {META}: its write was interrupted); use the previous one"
        return {}, f"not a megatron-ibxl checkpoint (no {META})"
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as error:
        return {}, f"{META} is unreadable ({error})"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        return {}, f"not a megatron-ibxl checkpoint (format {found!r}, expected {FORMAT!r})"
    problem = _check_files(path, meta.get("files", {}), resume)
    return meta, problem or _check_params(meta, model, tp, exact=resume)


def _check_files(path: Path, files: dict[str, int], resume: bool) -> str | None:
    """What is wrong with the files meta.json lists (the rng/ ones only for a resume)."""
    advice = _advice(path, resume)
    for name, size in files.items():
        if not resume and name.startswith("rng/"):
            continue
        file = path / name
        if not file.is_file():
            return f"file {name} is missing (truncated or partly deleted checkpoint){advice}"
        actual = file.stat().st_size
        if actual != size:
            return f"file {name} has {actual} bytes, {size} were written (truncated){advice}"
    return None


def _read_own_files(
    path: Path, meta: dict[str, Any], ctx: ParallelContext, resume: bool
) -> tuple[set[str], dict | None, str | None]:
    """DCP's saved keys and, for a resume, this rank's RNG file (None under another layout);
    or what is wrong with them."""
    try:
        saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    except Exception as error:  # noqa: BLE001 - any decoding failure means damaged bytes
        problem = f"file .metadata cannot be read ({_summary(error)}){_advice(path, resume)}"
        return set(), None, problem
    try:
        return saved, _rank_state(path, meta, ctx) if resume else None, None
    except Exception as error:  # noqa: BLE001 - any decoding failure means damaged bytes
        name = f"rng/rank_{ctx.rank:05d}.pt"
        return saved, None, f"file {name} cannot be read ({_summary(error)}){_advice(path, True)}"


def _check_params(meta: dict[str, Any], model: nn.Module, tp: int, exact: bool) -> str | None:
    saved = meta.get("params", {})
    unused = sorted(set(saved) - {name for name, _ in model.named_parameters()})
    if exact and unused:
        return (
            f"holds parameter {unused[0]} that this model lacks (written for a different model, "
            "e.g. another loss.kind); resume it with the configuration that wrote it"
        )
    for name, param in model.named_parameters():
        if name not in saved:
            return f"has no parameter {name} (written for a different model)"
        full_shape = list(param_placement(param, tp).full_shape)
        if saved[name] != full_shape:
            return (
                f"parameter {name} has shape {saved[name]} there but {full_shape} in this "
                "model (different model config)"
            )
    return None


def _advice(path: Path, resume: bool) -> str:
    """What to do about a damaged checkpoint, for a resume or for loading weights only."""
    if resume:
        return (
            f"; move {path.name} out of {path.parent} so that the run resumes from the "
            "previous complete checkpoint, or set checkpoint.resume=false to start over"
        )
    return (
        f"; load the previous complete checkpoint instead, or move {path.name} out of "
        f"{path.parent} so that this checkpoints folder resolves to the previous one"
    )


def _undecodable(path: Path, error: BaseException, resume: bool, report: bool):
    """The CheckpointError for data files that passed the size checks but do not load."""
    failure = CheckpointError(
        f"checkpoint {path}: its data files cannot be decoded ({_summary(error)}) though "
        f"their sizes are as written: they were damaged after writing{_advice(path, resume)}"
    )
    failure.report = report
    return failure


def _summary(error: BaseException) -> str:
    """`Type: first sentence` of an exception, of the lowest failing rank's for DCP's
    CheckpointException (which carries every rank's)."""
    failures = error.failures if isinstance(error, CheckpointException) else None
    if failures:
        rank = min(failures)
        return f"rank {rank}: {_summary(failures[rank][0])}"
    lines = str(error).strip().splitlines()
    text = lines[0].split(". ")[0][:160] if lines else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _agree_or_raise(path: Path, problem: str | None) -> None:
    """Raise on every rank when any rank found a problem, so that no rank waits in a
    collective the others never reach."""
    flag = torch.tensor([1.0 if problem else 0.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if problem:
        raise CheckpointError(f"checkpoint {path}: {problem}")
    if flag.item() > 0:
        error = CheckpointError(f"checkpoint {path}: rejected by another rank (see its error)")
        error.report = False  # the rank that found the problem says what it is
        raise error


def _rank_state(path: Path, meta: dict[str, Any], ctx: ParallelContext) -> dict | None:
    """This rank's own file, when the checkpoint was written by this very layout."""
    layout = {"tp": ctx.tp, "dp": ctx.dp, "pp": ctx.pp, "world_size": ctx.world_size}
    file = path / "rng" / f"rank_{ctx.rank:05d}.pt"
    if meta.get("layout") != layout:
        return None
    # Plain containers and tensors only: damaged bytes fail to decode instead of running code.
    states = torch.load(file, weights_only=True)
    if not isinstance(states, dict) or not {"cpu", "tracker", "python"} <= set(states):
        raise ValueError("not a state file of this engine")
    return states


def _restore_rng(states: dict | None, meta: dict[str, Any], ctx, path: Path) -> None:
    """Each rank's generators from its own file, when the layout is the one that wrote them;
    otherwise reseed from the step (see load_checkpoint)."""
    if states is None:
        _reseed(int(meta["step"]), ctx)
        logger.warning(
            "rank %d: checkpoint %s was written with layout %s, this run is tp=%d dp=%d: RNG "
            "states cannot carry over, reseeded deterministically from step %d",
            ctx.rank,
            path,
            meta.get("layout"),
            ctx.tp,
            ctx.dp,
            meta["step"],
        )
        return
    torch.set_rng_state(states["cpu"])
    mcore_random.get_cuda_rng_tracker().set_states(states["tracker"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    if "numpy" in states:
        import numpy as np

        kind, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))


def _reseed(step: int, ctx: ParallelContext) -> None:
    """Seeds from the step, following init_parallel's pattern: the default generator alike
    on every rank, the tracker's states distinct per tensor-parallel rank."""
    base = step * 1_000_003 + 7
    torch.manual_seed(base)
    random.seed(base)
    tracker = mcore_random.get_cuda_rng_tracker()
    names = list(tracker.get_states())
    tracker.reset()
    for index, name in enumerate(names):
        tracker.add(name, base + 2718 + ctx.tp_rank + 7919 * (index + 1))
    try:
        import numpy as np

        np.random.seed(base % 2**32)
    except ImportError:
        pass
