"""Faults: a job killed while writing a checkpoint, damaged or foreign checkpoint folders, and
a step whose loss is NaN."""

import json
import os
import shutil
import signal
import time

import numpy as np
import torch
import torch.distributed as dist

from megatron_ibxl.config import ParallelConfig
from megatron_ibxl.errors import CheckpointError, UserError
from megatron_ibxl.parallel import LaunchEnv, init_parallel
from megatron_ibxl.parallel.sharding import full_parameters
from megatron_ibxl.training import checkpoint
from megatron_ibxl.training.checkpoint import find_latest, load_checkpoint, save_checkpoint
from tests.distributed.train_helpers import Run, make_config
from tests.helpers.dist import run_distributed, worker_context

WORLD = 2


def _parallel() -> ParallelConfig:
    return ParallelConfig(tp=1, backend="gloo", timeout_s=600)


# A job killed in the middle of writing step 4's checkpoint.


def _train_then_hang(rank, store, run_dir, marker_dir):
    """Save step 2, then hang inside step 4's save after the data files are written."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    launch = LaunchEnv(rank, WORLD, rank, "127.0.0.1", 0, "test")
    ctx = init_parallel(_parallel(), seed=0, launch=launch, init_method=f"file://{store}")
    config = make_config(dp=ctx.dp, zero=3)
    run = Run(config, ctx)
    for step in (1, 2):
        run.step(step)
    save_checkpoint(run_dir, 2, run.model, run.optimizer, run.scheduler, {}, config, ctx)
    full = full_parameters(run.model, ctx)
    if rank == 0:
        np.savez(marker_dir / "step2.npz", **{k: v.numpy() for k, v in full.items()})
    for step in (3, 4):
        run.step(step)

    write_rank_state = checkpoint._write_rank_state

    def write_and_hang(*args):
        write_rank_state(*args)
        (marker_dir / f"writing-{rank}").touch()
        time.sleep(600)

    checkpoint._write_rank_state = write_and_hang
    save_checkpoint(run_dir, 4, run.model, run.optimizer, run.scheduler, {}, config, ctx)


def _load_previous(ctx, run_dir):
    config = make_config(dp=ctx.dp, zero=3)
    config.checkpoint.keep_last = 1
    run = Run(config, ctx)
    try:
        interrupted = run_dir / "checkpoints" / ".tmp-step_4"
        load_checkpoint(interrupted, run.model, run.optimizer, run.scheduler, ctx)
        interrupted_error = ""
    except CheckpointError as error:
        interrupted_error = str(error)
    latest = find_latest(run_dir)
    extra = load_checkpoint(latest, run.model, run.optimizer, run.scheduler, ctx)
    params = {k: v.numpy().copy() for k, v in full_parameters(run.model, ctx).items()}
    run.step(3)
    save_checkpoint(run_dir, 3, run.model, run.optimizer, run.scheduler, {}, config, ctx)
    return latest.name, extra["step"], params, interrupted_error


def test_killed_write_nan_step_and_damaged_checkpoints(tmp_path):
    """One job is killed while writing step 4's checkpoint; new processes then resume from
    step 2, skip a NaN step, and reject damaged or foreign checkpoint folders."""
    run_dir, marker_dir = tmp_path / "run", tmp_path / "markers"
    marker_dir.mkdir()
    context = worker_context()
    store = tmp_path / "store-killed"
    procs = [
        context.Process(target=_train_then_hang, args=(rank, store, run_dir, marker_dir))
        for rank in range(WORLD)
    ]
    for proc in procs:
        proc.start()
    try:
        deadline = time.monotonic() + 900
        while not all((marker_dir / f"writing-{r}").exists() for r in range(WORLD)):
            assert all(p.is_alive() for p in procs), "a rank died before the hang point"
            assert time.monotonic() < deadline, "ranks never reached step 4's save"
            time.sleep(0.5)
    finally:
        for proc in procs:
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(timeout=30)

    checkpoints = run_dir / "checkpoints"
    # Step 4's files are there, under the temporary name only; `latest` still names step 2.
    assert any((checkpoints / ".tmp-step_4").glob("*.distcp"))
    assert not (checkpoints / "step_4").exists()
    assert (checkpoints / "latest").read_text().strip() == "step_2"
    assert find_latest(run_dir) == checkpoints / "step_2"

    # New processes: load what `latest` names, then the NaN step and the damaged folders.
    (tmp_path / "reload").mkdir()
    results = run_distributed(
        _reload_then_faults,
        WORLD,
        tmp_path / "reload",
        run_dir,
        tmp_path / "damaged",
        parallel=_parallel(),
        timeout_s=1800,
    )
    name, step, params, interrupted_error = results[0][0]
    assert (name, step) == ("step_2", 2)
    assert "incomplete" in interrupted_error and ".tmp-step_4" in interrupted_error
    saved = np.load(marker_dir / "step2.npz")
    for key in saved.files:
        assert np.array_equal(params[key], saved[key]), key
    # The next save cleared the interrupted write and, with keep_last=1, the old step.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_3"]
    _check_faults([faults for _, faults in results])


def _reload_then_faults(ctx, run_dir, root):
    return _load_previous(ctx, run_dir), _faults(ctx, root)


# Damaged and foreign folders, and a NaN loss.


def _damage(root, good):
    """Copies of a good checkpoint with one thing wrong each; rank 0 writes them."""
    cases = {}
    truncated = root / "truncated"
    shutil.copytree(good, truncated)
    data = sorted(truncated.glob("*.distcp"))[0]
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    cases["truncated"] = (truncated, f"{data.name} has")

    interrupted = root / "interrupted"
    shutil.copytree(good, interrupted)
    (interrupted / "meta.json").unlink()
    cases["interrupted"] = (interrupted, "incomplete")

    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "pytorch_model.bin").write_bytes(b"\0" * 64)
    cases["foreign"] = (foreign, "not a megatron-ibxl checkpoint")

    other_format = root / "other_format"
    shutil.copytree(good, other_format)
    meta = json.loads((other_format / "meta.json").read_text())
    meta["format"] = "someone-else/v3"
    (other_format / "meta.json").write_text(json.dumps(meta))
    cases["other_format"] = (other_format, "format 'someone-else/v3'")

    cases["missing"] = (root / "does-not-exist", "no such directory")
    return cases


def _faults(ctx, root):
    config = make_config(dp=ctx.dp, zero=3)
    poisoned, clean = Run(config, ctx), Run(config, ctx)

    # NaN loss in step 3: skipped, nothing changes, training goes on.
    for step in (1, 2):
        poisoned.step(step)
        clean.step(step)
    before = {k: v.clone() for k, v in full_parameters(poisoned.model, ctx).items()}
    poisoned.step(3, poison=True)
    after = full_parameters(poisoned.model, ctx)
    unchanged = all(torch.equal(before[k], after[k]) for k in before)
    for step in (4, 5):
        poisoned.step(step)
        clean.step(step)  # the clean run never sees batch 3
    final_poisoned = full_parameters(poisoned.model, ctx)
    final_clean = full_parameters(clean.model, ctx)
    same_as_clean = all(torch.equal(final_poisoned[k], final_clean[k]) for k in final_clean)

    # Damaged checkpoints: every rank raises the same one-line error.
    good = save_checkpoint(root, 5, clean.model, clean.optimizer, clean.scheduler, {}, config, ctx)
    cases = _damage(root, good) if ctx.rank == 0 else None
    holder = [cases]
    dist.broadcast_object_list(holder, src=0)
    errors = {}
    for label, (path, _) in holder[0].items():
        try:
            load_checkpoint(path, clean.model, clean.optimizer, clean.scheduler, ctx)
        except CheckpointError as error:
            errors[label] = (str(error), str(path), isinstance(error, UserError))

    # A checkpoint of another model shape.
    wider = make_config(dp=ctx.dp, zero=3)
    wider.model.embed_dim = 12
    other = Run(wider, ctx)
    try:
        load_checkpoint(good, other.model, None, None, ctx)
    except CheckpointError as error:
        errors["other_model"] = (str(error), str(good), True)
    expected = {label: text for label, (_, text) in holder[0].items()}
    expected["other_model"] = "different model config"
    return (
        poisoned.record,
        unchanged,
        same_as_clean,
        poisoned.scheduler.skipped_steps,
        errors,
        expected,
    )


def _check_faults(results):
    """A NaN step is skipped and training continues; bad folders give one-line errors."""
    for record, unchanged, same_as_clean, skipped_steps, errors, expected in results:
        assert record.skipped == [False, False, True, False, False]
        assert not np.isfinite(record.losses[2])
        assert skipped_steps == 1
        assert unchanged, "a skipped step changed the weights"
        # Skipping leaves weights, AdamW state and schedule exactly as they were, so the run
        # continues as one that never saw batch 3.
        assert same_as_clean
        assert record.lrs[3] == record.lrs[2]
        assert set(errors) == set(expected)
        for label, (message, path, is_user_error) in errors.items():
            assert is_user_error
            assert "\n" not in message, f"{label}: not one line: {message!r}"
            assert path in message, f"{label}: path missing from {message!r}"
            assert expected[label] in message, f"{label}: {message!r}"
