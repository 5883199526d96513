"""Memory per process of replicated data parallelism (zero 0) against ZeRO-3 (zero 3).

    .venv/bin/python -m torch.distributed.run --nproc_per_node 4 -m benchmarks.sharding_memory \\
        --config launch/configs/demo-cpu.yaml --set parallel.zero=3 --out runs/bench/mem-z3.json

Builds the model of --config (with its --set overrides), shards it by `parallel.zero`, and
trains --steps optimizer steps on random batches of the config's shapes (train_step, clipped
AdamW), then reports per process:

- `model_state_mib`: bytes of this process's parameters, gradients (before they are freed)
  and AdamW moments, summed over its local tensors (shards under zero 3): the memory ZeRO-3
  divides by dp;
- `unsharded_params_peak_mib`: the most parameter bytes present unsharded at once during a
  step, sampled after every module's forward (zero 0: always the whole tensor-parallel shard
  of the model; zero 3 with `parallel.gather: step`: it too, for the whole step; with
  `microbatch`: a few layers at a time);
- `peak_rss_mib`, `rss_growth_mib`: the process's peak resident memory (getrusage) and its
  growth from just before the model was built; these include the interpreter, torch and
  allocator caching, so differences at toy size are within their noise.

Rank 0 prints one JSON line per rank, and writes them to --out when given.
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_ibxl.config import load_config, validate
from megatron_ibxl.parallel import init_parallel, shutdown_parallel
from megatron_ibxl.parallel.sharding import local_tensor, shard_model
from megatron_ibxl.training.optimizer import build_optimizer, clip_and_step
from megatron_ibxl.training.schedule import build_scheduler
from megatron_ibxl.training.step import train_step

_MIB = 1024.0 * 1024.0


class _Batch:
    def __init__(self, config, rows: int, generator: torch.Generator):
        vision, text = config.model.vision, config.model.text
        size = vision.image_size
        self.images = torch.randn(rows, vision.channels, size, size, generator=generator)
        shape = (rows, text.context_length)
        self.tokens = torch.randint(1, text.vocab_size, shape, generator=generator)
        self.lengths = torch.randint(2, text.context_length + 1, (rows,), generator=generator)


def _rss_mib() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / _MIB


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _model_state_bytes(model, optimizer) -> dict[str, int]:
    params = [local_tensor(p) for p in model.parameters()]
    grads = [local_tensor(p.grad) for p in model.parameters() if p.grad is not None]
    moments = [
        local_tensor(value)
        for state in optimizer.state.values()
        for key, value in state.items()
        if key in ("exp_avg", "exp_avg_sq")
    ]
    return {"params": _bytes(params), "grads": _bytes(grads), "adam": _bytes(moments)}


def _track_unsharded(model) -> dict[str, float]:
    """After every submodule's forward, note the bytes of parameters registered unsharded
    (FSDP2 swaps gathered tensors in for its DTensor shards while it needs them)."""
    peak = {"mib": 0.0}

    def hook(module, inputs, outputs):
        unsharded = (p for p in model.parameters() if not hasattr(p, "to_local"))
        peak["mib"] = max(peak["mib"], _bytes(unsharded) / _MIB)

    for module in model.modules():
        module.register_forward_hook(hook)
    return peak


def main() -> None:
    """Parse the arguments, train a few steps, report memory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)

    config = load_config(args.config, args.overrides)
    ctx = init_parallel(config.parallel, seed=0)
    layout = validate(config, ctx.world_size)
    from megatron_ibxl.models import build_dual_encoder

    rss_before = _rss_mib()
    model = build_dual_encoder(config)
    grad_sync = shard_model(model, config, ctx)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)

    generator = torch.Generator().manual_seed(ctx.dp_rank)
    unsharded = _track_unsharded(model)
    state = {}
    for _ in range(args.steps):
        micro = [_Batch(config, layout.micro_batch, generator) for _ in range(layout.accumulation)]
        output = train_step(model, micro, config, ctx, grad_sync)
        state = _model_state_bytes(model, optimizer)  # gradients are still there
        clip_and_step(model, optimizer, scheduler, config, ctx, output.loss)
    state["adam"] = _model_state_bytes(model, optimizer)["adam"]

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    report = {
        "rank": ctx.rank,
        "zero": config.parallel.zero,
        "gather": config.parallel.gather,
        "tp": ctx.tp,
        "dp": ctx.dp,
        "model_state_mib": round(sum(state.values()) / _MIB, 3),
        **{f"{key}_mib": round(value / _MIB, 3) for key, value in state.items()},
        **{f"{key}_bytes": value for key, value in state.items()},
        "unsharded_params_peak_mib": round(unsharded["mib"], 3),
        "peak_rss_mib": round(peak, 1),
        "rss_growth_mib": round(peak - rss_before, 1),
    }
    reports = [None] * ctx.world_size
    dist.all_gather_object(reports, report)
    if ctx.rank == 0:
        lines = "\n".join(json.dumps(r) for r in reports) + "\n"
        print(lines, end="")  # the benchmark's result, one JSON object per rank
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(lines)
    shutdown_parallel()


if __name__ == "__main__":
    main()
