"""The logit scale never exceeds its clamp under ZeRO-3 and bf16 mixed precision (2 ranks).

An AdamW step with a large learning rate pushes the log scale past ln 100; the clamp, called
right after `optimizer.step()`, must bring back the copy the optimizer keeps (fp32), so
that the next forward, which computes from a bf16 copy of it, never sees a larger value.
Two placements of the scale are covered:

- `replicated`: the engine's layout. `shard_model` shards everything else with FSDP2 and
  keeps the scalar parameters out of FSDP2 (it cannot shard a 0-d tensor): the optimizer
  owns the plain fp32 parameter. The update is the engine's own `clip_and_step`.
- `dtensor`: the scale as a 1-element parameter that FSDP2 does shard: the optimizer owns the
  fp32 local shard of a DTensor (one element on dp rank 0, empty on dp rank 1) while the
  forward computes from the gathered bf16 copy.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from megatron_ibxl.config import RunConfig
from megatron_ibxl.losses import clamp_logit_scale_
from megatron_ibxl.models import build_dual_encoder
from megatron_ibxl.parallel.sharding import shard_model
from megatron_ibxl.training.optimizer import build_optimizer, clip_and_step
from megatron_ibxl.training.schedule import build_scheduler
from megatron_ibxl.training.step import train_step
from tests.helpers.dist import run_distributed

MAXIMUM = math.log(100.0)


def clamp_config() -> RunConfig:
    """The toy model, one step of 2 micro-batches, bf16 compute from fp32 master weights."""
    config = RunConfig()
    vision, text = config.model.vision, config.model.text
    vision.image_size, vision.patch_size = 16, 8
    vision.hidden, vision.num_layers, vision.num_heads, vision.mlp_hidden = 32, 2, 4, 64
    text.vocab_size, text.vocab_pad_multiple, text.context_length = 64, 8, 8
    text.hidden, text.num_layers, text.num_heads, text.mlp_hidden = 32, 2, 4, 64
    config.model.embed_dim = 16
    config.model.logit_scale_init = MAXIMUM - 0.05  # just below the clamp
    config.parallel.zero, config.parallel.gather = 3, "step"
    config.optimizer.precision = "bf16"
    config.loss.negatives = "global"
    return config


def micro_batches(dp_rank: int, seed: int) -> list[SimpleNamespace]:
    generator = torch.Generator().manual_seed(seed * 10 + dp_rank)
    return [
        SimpleNamespace(
            images=torch.randn(4, 3, 16, 16, generator=generator),
            tokens=torch.randint(0, 64, (4, 8), generator=generator),
            lengths=torch.randint(2, 9, (4,), generator=generator),
        )
        for _ in range(2)
    ]


def master_copy(model) -> torch.Tensor:
    """What the optimizer holds for the log scale on this rank."""
    param = model.logit_scale
    return param.to_local() if hasattr(param, "to_local") else param


def master_grad(model) -> torch.Tensor:
    """This rank's gradient of that copy (the local shard of a DTensor gradient)."""
    grad = model.logit_scale.grad
    return grad.to_local() if hasattr(grad, "to_local") else grad


def record_forward_scales(model) -> list[float]:
    """Inverse temperatures the loss is computed with (from the compute copy, as the step
    reads them)."""
    seen: list[float] = []
    original = model.scale

    def scale():
        value = original()
        seen.append(float(value.detach().float().max()))
        return value

    model.scale = scale
    return seen


def _place(model, config, ctx, placement: str):
    if placement == "replicated":
        return shard_model(model, config, ctx)
    # A 1-element scale: FSDP2 shards it like any other parameter.
    model.logit_scale = nn.Parameter(model.logit_scale.detach().reshape(1))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fully_shard(model, mesh=ctx.mesh["dp"], mp_policy=policy)
    return None


def _engine_update(model, config, ctx, grad_sync, before_clamp: list[float]) -> None:
    """The engine's own update (`clip_and_step`: AdamW on every parameter, then the clamp),
    with the scale's gradient made negative so that its first Adam update, lr * sign, is
    upward. `before_clamp` receives the value right after `optimizer.step()`."""
    with torch.no_grad():
        grad = model.logit_scale.grad
        grad.copy_(-grad.abs().clamp_min(1e-3))
    config.optimizer.lr, config.optimizer.clip_grad = 0.5, 0.0
    config.schedule.warmup_steps, config.schedule.total_steps = 0, 1000
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    step = optimizer.step

    def step_and_record(*args, **kwargs):
        result = step(*args, **kwargs)
        before_clamp.extend(float(v) for v in master_copy(model).detach().reshape(-1))
        return result

    optimizer.step = step_and_record
    result = clip_and_step(model, optimizer, scheduler, config, ctx, loss=1.0)
    assert not result.skipped


def _hand_update(model, before_clamp: list[float]) -> None:
    """AdamW on the scale alone, then `clamp_logit_scale_` (for the DTensor placement, which
    the engine does not use)."""
    # Adam's first update is lr * sign(gradient): point it upward whatever the sign.
    gradient = float(master_grad(model).sum())
    optimizer = torch.optim.AdamW(
        [model.logit_scale], lr=0.5, weight_decay=0.0, maximize=gradient > 0
    )
    optimizer.step()
    before_clamp.extend(float(v) for v in master_copy(model).detach().reshape(-1))
    clamp_logit_scale_(model)
    optimizer.zero_grad()


def _clamp_run(ctx, placement: str):
    """Two steps: the first pushes past the clamp and is clamped, the second runs at it."""
    config = clamp_config()
    model = build_dual_encoder(config)
    grad_sync = _place(model, config, ctx, placement)
    seen = record_forward_scales(model)

    train_step(model, micro_batches(ctx.dp_rank, 0), config, ctx, grad_sync)
    before_clamp: list[float] = []
    if placement == "replicated":
        _engine_update(model, config, ctx, grad_sync, before_clamp)
    else:
        _hand_update(model, before_clamp)
    after_clamp = [float(v) for v in master_copy(model).detach().reshape(-1)]

    step_seen_from = len(seen)
    output = train_step(model, micro_batches(ctx.dp_rank, 1), config, ctx, grad_sync)
    gradient_at_clamp = float(master_grad(model).abs().sum())
    return dict(
        dtype=str(master_copy(model).dtype),
        is_dtensor=hasattr(model.logit_scale, "to_local"),
        before_clamp=before_clamp,
        after_clamp=after_clamp,
        seen=seen,
        seen_after_clamp=seen[step_seen_from:],
        temperature=output.temperature,
        gradient_at_clamp=gradient_at_clamp,
    )


def _both_placements(ctx):
    return {placement: _clamp_run(ctx, placement) for placement in ("replicated", "dtensor")}


@pytest.fixture(scope="module")
def clamp_runs(tmp_path_factory):
    results = run_distributed(_both_placements, 2, tmp_path_factory.mktemp("clamp"), timeout_s=600)
    return {p: [by_rank[p] for by_rank in results] for p in ("replicated", "dtensor")}


@pytest.mark.parametrize("placement", ["replicated", "dtensor"])
def test_the_optimizer_copy_is_clamped_and_the_forward_never_sees_more(clamp_runs, placement):
    runs = clamp_runs[placement]
    assert runs[0]["is_dtensor"] == (placement == "dtensor")
    for rank, run in enumerate(runs):
        assert run["dtype"] == "torch.float32", f"rank {rank}: the master copy is fp32"
        # The update really went past the clamp (lr 0.5 from 0.05 below it) ...
        assert all(v > MAXIMUM + 0.4 for v in run["before_clamp"]), (rank, run)
        # ... and the clamp brought the optimizer's copy back to at most ln 100.
        assert all(MAXIMUM - 1e-6 < v <= MAXIMUM for v in run["after_clamp"]), (rank, run)
        # Every scale the loss used, before and after the update, is at most exp(ln 100).
        assert run["seen"] and max(run["seen"]) <= 100.0, (rank, run["seen"])
        assert run["temperature"] >= 1 / 100 - 1e-6
    # In the dtensor placement the element lives on dp rank 0 and rank 1's shard is empty.
    owners = [len(run["after_clamp"]) for run in runs]
    assert owners == ([1, 1] if placement == "replicated" else [1, 0])


@pytest.mark.parametrize("placement", ["replicated", "dtensor"])
def test_the_scale_still_learns_at_the_clamp(clamp_runs, placement):
    # At the clamp the gradient of exp(min(x, max)) is exp(x) times the loss gradient, not
    # zero: a scale sitting at the limit can still come down.
    # (In the dtensor placement only dp rank 0 holds the element and its gradient.)
    gradients = [run["gradient_at_clamp"] for run in clamp_runs[placement]]
    assert gradients[0] > 0
    assert gradients[1] > 0 if placement == "replicated" else gradients[1] == 0


def test_dp_ranks_agree_on_the_clamped_value(clamp_runs):
    replicated = clamp_runs["replicated"]
    assert replicated[0]["after_clamp"] == replicated[1]["after_clamp"]
