"""Checkpoints whose files keep their sizes but not their bytes, and checkpoints without the
RNG files: two processes must reach the same decision, in one line, without waiting forever.

The damaged copies are made from one good checkpoint of two data-parallel ranks (zero 3), so
each rank's shards lie in its own `__R_0.distcp` file. Damaging only rank 1's file makes only
rank 1's read fail; both ranks must still raise. Weights-only loading (evaluation,
`checkpoint.load`) needs no RNG file; a resume does.
"""

import os
import shutil

import torch
import torch.distributed as dist

from megatron_ibxl.config import ParallelConfig
from megatron_ibxl.errors import CheckpointError
from megatron_ibxl.parallel.sharding import full_parameters
from megatron_ibxl.training.checkpoint import load_checkpoint, save_checkpoint
from tests.distributed.train_helpers import Run, make_config
from tests.helpers.dist import run_distributed

WORLD = 2


def _scramble(file) -> None:
    """Random bytes of the file's own length: the size checks cannot see it."""
    file.write_bytes(os.urandom(file.stat().st_size))


def _damaged_copies(good, root) -> dict:
    """label -> step folder; each a copy of `good` with one thing changed."""

    def copy(label):
        folder = root / label / "checkpoints" / good.name
        shutil.copytree(good, folder)
        return folder

    cases = {"all_data": copy("all_data"), "rank1_data": copy("rank1_data")}
    for data in cases["all_data"].glob("*.distcp"):
        _scramble(data)
    _scramble(cases["rank1_data"] / "__1_0.distcp")
    cases["metadata"] = copy("metadata")
    _scramble(cases["metadata"] / ".metadata")
    cases["rank1_rng"] = copy("rank1_rng")
    _scramble(cases["rank1_rng"] / "rng" / "rank_00001.pt")
    cases["no_rng"] = copy("no_rng")
    shutil.rmtree(cases["no_rng"] / "rng")
    return cases


def _attempt(path, run, resume: bool):
    """(message, reported) of the CheckpointError, or (None, None) when the load succeeds."""
    optimizer, scheduler = (run.optimizer, run.scheduler) if resume else (None, None)
    try:
        load_checkpoint(path, run.model, optimizer, scheduler, run.ctx)
    except CheckpointError as error:
        return str(error), error.report
    return None, None


def _save_then_load_damaged(ctx, root):
    config = make_config(dp=ctx.dp, zero=3)
    trained = Run(config, ctx)
    trained.step(1)
    good = save_checkpoint(
        root / "good", 1, trained.model, trained.optimizer, trained.scheduler, {}, config, ctx
    )
    expected = {k: v.clone() for k, v in full_parameters(trained.model, ctx).items()}
    if ctx.rank == 0:
        _damaged_copies(good, root)
    dist.barrier()

    outcomes = {}
    for label in ("all_data", "rank1_data", "metadata", "rank1_rng", "no_rng"):
        path = root / label / "checkpoints" / good.name
        for resume in (True, False):
            outcomes[label, resume] = _attempt(path, Run(config, ctx), resume)

    # Weights only, with no RNG file: the trained parameters come back exactly.
    fresh = Run(config, ctx)
    step = load_checkpoint(
        root / "no_rng" / "checkpoints" / good.name, fresh.model, None, None, ctx
    )
    loaded = full_parameters(fresh.model, ctx)
    same = all(torch.equal(loaded[k], expected[k]) for k in expected)
    return outcomes, step["step"], same


def test_damaged_bytes_and_missing_rng_files(tmp_path):
    parallel = ParallelConfig(tp=1, backend="gloo", timeout_s=120)
    results = run_distributed(
        _save_then_load_damaged, WORLD, tmp_path, tmp_path, parallel=parallel, timeout_s=1200
    )
    by_rank = [outcomes for outcomes, _, _ in results]
    for rank, (_, step, same) in enumerate(results):
        assert step == 1 and same, f"rank {rank}: weights-only load without rng/ differs"

    def folder(label):
        return str(tmp_path / label / "checkpoints" / "step_1")

    # Data files that do not decode: every rank raises, even when only rank 1's file is bad,
    # with one line that names the step folder and says what to do for the purpose at hand.
    for label in ("all_data", "rank1_data", "metadata"):
        for resume in (True, False):
            messages = [outcomes[label, resume][0] for outcomes in by_rank]
            for message in messages:
                assert message is not None, f"{label} resume={resume}: loaded"
                assert "\n" not in message and folder(label) in message, message
                assert "cannot be" in message and "move step_1 out of" in message, message
                assert ("checkpoint.resume=false" in message) == resume, message
            # The same line on both ranks. A data file's failure comes from DCP on every
            # rank at once, so rank 0 alone reports it; .metadata each rank reads itself.
            assert messages[0] == messages[1]
            reported = [o[label, resume][1] for o in by_rank]
            assert reported == ([True, True] if label == "metadata" else [True, False]), label
        assert ".metadata cannot be read" in by_rank[0]["metadata", resume][0]
    # Only rank 1's read failed, and rank 0 stopped too.
    assert "(rank 1: " in by_rank[0]["rank1_data", False][0]

    # A damaged RNG file of rank 1: a resume stops on both ranks, rank 1 says why (rank 0
    # leaves the message to it); loading weights only does not read it.
    message, reported = by_rank[1]["rank1_rng", True]
    assert "rng/rank_00001.pt cannot be read" in message and folder("rank1_rng") in message
    assert reported and "checkpoint.resume=false" in message
    message, reported = by_rank[0]["rank1_rng", True]
    assert "rejected by another rank" in message and not reported
    assert all(o["rank1_rng", False] == (None, None) for o in by_rank)

    # No RNG files at all: a resume needs them, loading weights only does not.
    for outcomes in by_rank:
        message, reported = outcomes["no_rng", True]
        assert "rng/rank_0000" in message and "is missing" in message and reported
        assert outcomes["no_rng", False] == (None, None)
