"""ZeRO-3 (FSDP2 over dp) with and without tensor parallelism and gradient accumulation ends
five fp32 AdamW steps with the same parameters as one process with replicated data
parallelism (zero 0) on the same global batches.

The reference is an independent computation: one process, no sharding, no tensor
parallelism, the whole global batch in one micro-batch. Clipping is active (the clip
threshold is below every step's gradient norm), so the global norm must also be the true
one: a norm that counted tp-replicated parameters twice, or missed a dp shard, would clip
by a different factor and move the parameters apart.

Tolerance: fp32 with different reduction orders (all-gathers, reduce-scatters, split GEMMs
under tp) differs in the last bits of each gradient; AdamW normalises the update, so after
five steps parameters agree to about 1e-7 relative. 1e-5 relative leaves room for that and
is still far below one step's update (lr 1e-3 against weights of order 0.02-1).
"""

import numpy as np

from megatron_ibxl.config import ParallelConfig
from tests.distributed.train_helpers import Run, make_config
from tests.helpers.dist import run_distributed

STEPS = 5
CLIP = 0.05


def _train(ctx, zero: int, gather: str, accumulation: int):
    config = make_config(
        tp=ctx.tp, dp=ctx.dp, zero=zero, gather=gather, accumulation=accumulation, clip_grad=CLIP
    )
    run = Run(config, ctx)
    for step in range(1, STEPS + 1):
        run.step(step)
    return run.finish()


def _relative_error(value: np.ndarray, reference: np.ndarray) -> float:
    scale = max(float(np.linalg.norm(reference)), 1e-12)
    return float(np.linalg.norm(value.astype(np.float64) - reference)) / scale


def _assert_matches(trained, reference, label: str) -> None:
    assert trained.params.keys() == reference.params.keys(), label
    worst = max(
        (_relative_error(trained.params[name], reference.params[name]), name)
        for name in reference.params
    )
    assert worst[0] < 1e-5, f"{label}: {worst[1]} differs by {worst[0]:.2e} relative"
    np.testing.assert_allclose(trained.grad_norms, reference.grad_norms, rtol=1e-5)
    np.testing.assert_allclose(trained.losses, reference.losses, rtol=1e-5)
    assert trained.lrs == reference.lrs


def _fresh(tmp_path, label: str):
    """A folder per process group: the helper's rendezvous file must not be reused."""
    folder = tmp_path / label.replace(" ", "_").replace("=", "")
    folder.mkdir()
    return folder


def _parallel(tp: int) -> ParallelConfig:
    return ParallelConfig(tp=tp, backend="gloo", timeout_s=600)


def test_zero3_layouts_match_single_process(tmp_path):
    reference = run_distributed(
        _train, 1, _fresh(tmp_path, "reference"), 0, "step", 1, timeout_s=900
    )[0]
    # Clipping is active in every step of every layout (they share the reference's norms).
    assert min(reference.grad_norms) > CLIP
    assert not any(reference.skipped)
    # The parameters moved: five steps are not a no-op.
    assert reference.lrs[0] > 0

    layouts = [
        ("dp=2 zero3", 2, 1, "step", 1),
        ("dp=2 zero3 tp=2", 4, 2, "step", 1),
        ("dp=4 zero3 accumulation=2", 4, 1, "step", 2),
        ("dp=2 zero3 accumulation=2 gather=microbatch", 2, 1, "microbatch", 2),
    ]
    for label, world, tp, gather, accumulation in layouts:
        results = run_distributed(
            _train,
            world,
            _fresh(tmp_path, label),
            3,
            gather,
            accumulation,
            parallel=_parallel(tp),
            timeout_s=900,
        )
        for rank, trained in enumerate(results):
            _assert_matches(trained, reference, f"{label} rank {rank}")
