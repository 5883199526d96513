"""The warmup-cosine schedule, AdamW's parameter groups, and clipping on one process."""

import math

import pytest
import torch
from torch import nn

from megatron_ibxl.config import RunConfig
from megatron_ibxl.training.optimizer import build_optimizer, clip_and_step, global_grad_norm
from megatron_ibxl.training.schedule import build_scheduler, lr_at


def _config(lr=1.0, warmup=4, total=12, min_lr=0.1) -> RunConfig:
    config = RunConfig()
    config.optimizer.lr = lr
    config.schedule.warmup_steps = warmup
    config.schedule.total_steps = total
    config.schedule.min_lr = min_lr
    return config


def test_lr_formula_by_hand():
    # Warmup: step k of 4 uses k/4 of the peak, from (not at) 0.
    assert [lr_at(k, 1.0, 4, 12, 0.1) for k in (1, 2, 3, 4)] == [0.25, 0.5, 0.75, 1.0]
    # Cosine over the 8 steps after warmup: halfway (k=8) is the mean of peak and minimum.
    assert lr_at(8, 1.0, 4, 12, 0.1) == pytest.approx(0.55)
    # One step past warmup: 0.1 + 0.9 * (1 + cos(pi / 8)) / 2.
    assert lr_at(5, 1.0, 4, 12, 0.1) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 8)))
    # The end of the cosine and beyond stay at the minimum.
    assert lr_at(12, 1.0, 4, 12, 0.1) == pytest.approx(0.1)
    assert lr_at(50, 1.0, 4, 12, 0.1) == 0.1
    # No warmup: the cosine starts at the peak before step 1; step 1 is 1/10 along it.
    assert lr_at(1, 1.0, 0, 10, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 10)))


def test_scheduler_drives_the_optimizer_lr():
    config = _config()
    param = nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([param], lr=config.optimizer.lr)
    scheduler = build_scheduler(optimizer, config)
    seen = []
    for _ in range(14):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([lr_at(k, 1.0, 4, 12, 0.1) for k in range(1, 15)])

    # The state round-trips (it goes into checkpoints), skipped-step count included.
    scheduler.skipped_steps = 2
    state = scheduler.state_dict()
    other = build_scheduler(torch.optim.AdamW([nn.Parameter(torch.zeros(3))]), config)
    other.load_state_dict(state)
    assert other.last_epoch == 14 and other.skipped_steps == 2
    assert other.current_lr() == pytest.approx(0.1)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.norm = nn.LayerNorm(2)
        self.position_embeddings = nn.Parameter(torch.zeros(4, 2))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.logit_scale_max = math.log(100.0)


def test_weight_decay_groups():
    model = _Tiny()
    optimizer = build_optimizer(model, _config())
    decayed = [id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    # Only the linear weight is decayed: biases, norms, positions and the scale are not.
    assert decayed == [id(model.linear.weight)]
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.1, 0.0}
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def test_clip_to_the_global_norm_and_skip_non_finite():
    model = _Tiny()
    config = _config(lr=0.5, warmup=0)
    config.optimizer.clip_grad = 1.0
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    for param in model.parameters():
        param.grad = torch.full_like(param, 2.0)
    count = sum(p.numel() for p in model.parameters())
    # One process: the norm is that of all elements, 2 * sqrt(count).
    assert global_grad_norm(model) == pytest.approx(2.0 * math.sqrt(count))

    before = [p.detach().clone() for p in model.parameters()]
    result = clip_and_step(model, optimizer, scheduler, config, None, loss=float("nan"))
    assert result.skipped and result.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())
    assert scheduler.last_epoch == 0  # the schedule did not advance

    for param in model.parameters():
        param.grad = torch.full_like(param, 2.0)
    result = clip_and_step(model, optimizer, scheduler, config, None, loss=1.0)
    assert not result.skipped and result.lr == pytest.approx(lr_at(1, 0.5, 0, 12, 0.1))
    assert result.grad_norm == pytest.approx(2.0 * math.sqrt(count))
    assert scheduler.last_epoch == 1

    model.linear.weight.grad = torch.full_like(model.linear.weight, float("inf"))
    result = clip_and_step(model, optimizer, scheduler, config, None, loss=1.0)
    assert result.skipped and result.skipped_steps == 2 and math.isinf(result.grad_norm)


def test_the_step_clamps_the_logit_scale_it_updates():
    # Adam's first update moves each parameter by lr * sign(gradient) (eps aside): from 0.01
    # below ln 100 with lr 0.5 and a negative gradient, the unclamped value would be ln 100 +
    # 0.49. clip_and_step must leave the optimizer's copy at the clamp instead.
    model = _Tiny()
    with torch.no_grad():
        model.logit_scale.fill_(model.logit_scale_max - 0.01)
    config = _config(lr=0.5, warmup=0, total=1000)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    model.logit_scale.grad = torch.tensor(-1.0)

    result = clip_and_step(model, optimizer, scheduler, config, None, loss=1.0)
    assert not result.skipped
    assert model.logit_scale.item() <= model.logit_scale_max
    assert model.logit_scale.item() == pytest.approx(model.logit_scale_max, abs=1e-6)

    # The clamp does not pin it: a gradient pointing down brings it back below the limit
    # (by less than lr, since Adam's first moment still remembers the upward push).
    model.logit_scale.grad = torch.tensor(1.0)
    clip_and_step(model, optimizer, scheduler, config, None, loss=1.0)
    assert model.logit_scale.item() < model.logit_scale_max - 0.01


def test_clipping_scales_gradients_to_the_threshold():
    # With plain SGD at lr 1 the update is the clipped gradient itself: every element of the
    # constant gradient 2 is scaled by clip / norm = 1 / (2 sqrt(count)).
    model = _Tiny()
    config = _config(lr=1.0, warmup=0, min_lr=1.0)
    config.optimizer.clip_grad = 1.0
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = build_scheduler(optimizer, config)
    before = [p.detach().clone() for p in model.parameters()]
    for param in model.parameters():
        param.grad = torch.full_like(param, 2.0)
    count = sum(p.numel() for p in model.parameters())
    clip_and_step(model, optimizer, scheduler, config, None, loss=0.0)
    step = 2.0 / (2.0 * math.sqrt(count) + 1e-6)
    deltas = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, model.parameters())])
    # The logit scale is clamped after the update, but 2 - step stays far below ln 100.
    torch.testing.assert_close(deltas, torch.full_like(deltas, step))
    assert deltas.square().sum().sqrt().item() == pytest.approx(1.0, rel=1e-5)


def test_resume_keeps_the_configured_schedule_shape():
    # A run saved under total_steps=6 and resumed with total_steps=40 follows the new cosine:
    # after 6 steps the lr is lr_at(7, ...) of the 40-step schedule, not the saved minimum.
    model = torch.nn.Linear(2, 2)
    saved = build_scheduler(
        torch.optim.AdamW(model.parameters()), _config(lr=1.0, warmup=1, total=6, min_lr=0.01)
    )
    for _ in range(6):
        saved.step()
    resumed_config = _config(lr=1.0, warmup=1, total=40, min_lr=0.01)
    resumed = build_scheduler(torch.optim.AdamW(model.parameters()), resumed_config)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.last_epoch == 6 and resumed.total_steps == 40
    expected = lr_at(7, resumed_config.optimizer.lr, 1, 40, resumed_config.schedule.min_lr)
    assert resumed.get_last_lr() == [pytest.approx(expected)]
    assert expected > resumed_config.schedule.min_lr * 10
