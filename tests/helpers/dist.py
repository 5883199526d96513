"""Run a function on N CPU processes joined over gloo, for distributed tests.

The processes rendezvous through a file store in the test's temporary folder (no fixed
port). They are forked from a fork server that has imported torch, Megatron-core and the
engine once per test session (multiprocessing's "forkserver" with preloaded modules), so a
test does not pay the ~9 s of CPU those imports take in every process it starts; the
server itself never computes, so nothing is forked with live threads.

The first failure is re-raised in the test with its rank and traceback; a run that
exceeds its timeout kills every process and fails.
"""

from __future__ import annotations

import os
import queue
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from megatron_ibxl.config import ParallelConfig
from megatron_ibxl.parallel import LaunchEnv, init_parallel, shutdown_parallel


def _entry(rank, world_size, store, fn, parallel, seed, args, results):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    try:
        launch = LaunchEnv(rank, world_size, rank, "127.0.0.1", 0, "test")
        ctx = init_parallel(parallel, seed=seed, launch=launch, init_method=f"file://{store}")
        try:
            results.put((rank, "ok", fn(ctx, *args)))
        finally:
            shutdown_parallel()
    except BaseException:  # noqa: BLE001 - reported to the parent with the rank
        results.put((rank, "error", traceback.format_exc()))


PRELOADED = (
    "torch",
    "megatron.core.parallel_state",
    "megatron_ibxl.models",
    "megatron_ibxl.parallel.sharding",
    "megatron_ibxl.training.step",
    "megatron_ibxl.training.checkpoint",
    "tests.helpers.dist",
)
"""Modules the fork server imports once; the processes forked from it start with them."""


def worker_context():
    """The multiprocessing context of test processes: a fork server with PRELOADED."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOADED))
    return context


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    tmp_path: Path,
    *args: Any,
    parallel: ParallelConfig | None = None,
    seed: int = 0,
    timeout_s: float = 240.0,
) -> list[Any]:
    """Call `fn(ctx, *args)` on `world_size` processes; return their results by rank.

    `fn` must be a module-level function (it is pickled by name). `parallel` gives the
    layout (tp=1 when None); `ctx` is the process's ParallelContext.
    """
    parallel = parallel or ParallelConfig(tp=1, backend="gloo", timeout_s=60)
    context = worker_context()
    results = context.Queue()
    store = Path(tmp_path) / f"store-{os.getpid()}-{id(fn)}"
    procs = [
        context.Process(
            target=_entry, args=(rank, world_size, store, fn, parallel, seed, args, results)
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    outputs: dict[int, Any] = {}
    try:
        while len(outputs) < world_size:
            try:
                rank, status, value = results.get(timeout=timeout_s)
            except queue.Empty:
                raise AssertionError(
                    f"distributed run timed out after {timeout_s} s; "
                    f"ranks {sorted(set(range(world_size)) - set(outputs))} "
                    "did not finish"
                ) from None
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            outputs[rank] = value
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return [outputs[r] for r in range(world_size)]
