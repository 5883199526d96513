"""Distributed checkpoints: exact resume in new processes, resharding into other layouts,
keep_last pruning and the `latest` pointer.

References are independent runs: the uninterrupted six steps for the resume, and the
embeddings computed by the writing layout itself for the reshard.
"""

import json

import numpy as np
import torch

from megatron_ibxl.config import ParallelConfig
from megatron_ibxl.training.checkpoint import find_latest, load_checkpoint, save_checkpoint
from tests.distributed.train_helpers import Run, global_batch, make_config, relayout
from tests.helpers.dist import run_distributed

_TIMEOUT_S = 1800
"""Generous: process start-up dominates, and takes minutes on a loaded two-core machine."""


def _parallel(tp: int) -> ParallelConfig:
    return ParallelConfig(tp=tp, backend="gloo", timeout_s=600)


def _folder(tmp_path, name: str):
    """One folder per process group (the helper's rendezvous file must not be reused)."""
    folder = tmp_path / name
    folder.mkdir()
    return folder


# Resume: 6 steps straight versus 3 steps, new processes, 3 more.


def _resume_config(ctx):
    config = make_config(tp=ctx.tp, dp=ctx.dp, zero=3, accumulation=2, dropout=0.1)
    config.schedule.total_steps = 6
    config.checkpoint.keep_last = 2
    return config


def _straight(ctx):
    run = Run(_resume_config(ctx), ctx)
    for step in range(1, 7):
        run.step(step)
    return run.finish()


def _first_half(ctx, run_dir):
    config = _resume_config(ctx)
    run = Run(config, ctx)
    for step in range(1, 4):
        run.step(step)
        extra = {"step": step, "samples": 8 * step, "data": {"epoch": 0, "offset": 8 * step}}
        save_checkpoint(run_dir, step, run.model, run.optimizer, run.scheduler, extra, config, ctx)
    return run.finish()


def _second_half_then_straight(ctx, run_dir, store):
    """Resume and finish; then, in a fresh process group with a fresh start's seeds, the
    uninterrupted reference run."""
    config = _resume_config(ctx)
    run = Run(config, ctx)
    extra = load_checkpoint(find_latest(run_dir), run.model, run.optimizer, run.scheduler, ctx)
    for step in range(extra["step"] + 1, 7):
        run.step(step)
    resumed = run.finish()
    return resumed, extra, _straight(relayout(ctx, 1, store))


def test_resume_is_exact(tmp_path):
    run_dir = tmp_path / "run"
    run_distributed(
        _first_half, 2, _folder(tmp_path, "b"), run_dir, parallel=_parallel(1), timeout_s=_TIMEOUT_S
    )
    checkpoints = run_dir / "checkpoints"
    # keep_last=2 pruned step_1; `latest` names the newest.
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_2", "step_3"]
    assert (checkpoints / "latest").read_text().strip() == "step_3"
    meta = json.loads((checkpoints / "step_3" / "meta.json").read_text())
    assert meta["layout"] == {"tp": 1, "dp": 2, "pp": 1, "world_size": 2}

    results = run_distributed(
        _second_half_then_straight,
        2,
        _folder(tmp_path, "c"),
        run_dir,
        tmp_path / "store-straight",
        parallel=_parallel(1),
        timeout_s=_TIMEOUT_S,
    )
    resumed, extra, straight = results[0]
    assert extra == {"step": 3, "samples": 24, "data": {"epoch": 0, "offset": 24}}
    # Identical, not merely close: same layout, same reduction order, restored RNG streams
    # (dropout 0.1 draws from them), restored AdamW moments and schedule position.
    assert resumed.losses == straight.losses[3:]
    assert resumed.lrs == straight.lrs[3:]
    for name, value in straight.params.items():
        assert np.array_equal(resumed.params[name], value), name


# Reshard: written with tp=2 dp=2 (zero 3), read with tp=1 dp=4 (zero 3) and tp=1 dp=1 (zero 0).


def _probe_embeddings(run) -> dict[str, np.ndarray]:
    """Embeddings of a fixed probe batch (every rank embeds all of it)."""
    batch = global_batch(run.config, 99)
    with torch.no_grad():
        image_emb, text_emb = run.model(batch.images, batch.tokens, batch.lengths)
    return {"image": image_emb.float().numpy().copy(), "text": text_emb.float().numpy().copy()}


def _write_then_read(ctx, run_dir, store):
    """Write with tp=2 dp=2; then, over the same processes, read with tp=1 dp=4."""
    config = make_config(tp=ctx.tp, dp=ctx.dp, zero=3)
    run = Run(config, ctx)
    for step in (1, 2):
        run.step(step)
    save_checkpoint(run_dir, 2, run.model, run.optimizer, run.scheduler, {}, config, ctx)
    after_two = _probe_embeddings(run)
    run.step(3)
    written = (after_two, _probe_embeddings(run))
    return written, _read(relayout(ctx, 1, store), run_dir, 3)


def _read(ctx, run_dir, zero):
    config = make_config(tp=ctx.tp, dp=ctx.dp, zero=zero)
    path = run_dir / "checkpoints" / "step_2"
    weights_only = Run(config, ctx)
    load_checkpoint(path, weights_only.model, None, None, ctx)
    run = Run(config, ctx)
    extra = load_checkpoint(path, run.model, run.optimizer, run.scheduler, ctx)
    after_two = _probe_embeddings(run)
    run.step(3)
    return _probe_embeddings(weights_only), after_two, _probe_embeddings(run), extra


def test_reshard_into_other_layouts(tmp_path):
    run_dir = tmp_path / "run"
    four = run_distributed(
        _write_then_read,
        4,
        _folder(tmp_path, "w"),
        run_dir,
        tmp_path / "store-read",
        parallel=_parallel(2),
        timeout_s=_TIMEOUT_S,
    )
    (expected_two, expected_three), _ = four[0]
    one = run_distributed(
        _read, 1, _folder(tmp_path, "r"), run_dir, 0, parallel=_parallel(1), timeout_s=_TIMEOUT_S
    )
    # fp32 with another tp (split GEMMs, other all-reduce order): a few ulps of O(1) values.
    close = dict(rtol=1e-5, atol=2e-6)
    for reads in ([read for _, read in four], one):
        for weights_only, after_two, after_three, extra in reads:
            assert extra["step"] == 2
            for key in ("image", "text"):
                np.testing.assert_allclose(weights_only[key], expected_two[key], **close)
                np.testing.assert_allclose(after_two[key], expected_two[key], **close)
                # One more step from the loaded AdamW moments and schedule lands where the
                # writing layout's third step did.
                np.testing.assert_allclose(after_three[key], expected_three[key], **close)
