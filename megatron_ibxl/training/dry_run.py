"""`megatron-ibxl train --dry-run`: validate a config and describe the layout, no training."""

from __future__ import annotations

import json
import logging
import sys

from megatron_ibxl.config import load_config, validate
from megatron_ibxl.errors import UserError
from megatron_ibxl.models.param_count import count_parameters
from megatron_ibxl.parallel.launcher_env import detect_launch_env
from megatron_ibxl.training.preflight import check_inputs

logger = logging.getLogger(__name__)


def rank_layout(world_size: int, tp: int, pp: int) -> list[dict[str, int]]:
    """Which global rank holds which (pp, dp, tp) coordinate (tensor parallel fastest)."""
    dp = world_size // (tp * pp)
    return [
        {"rank": r, "pp": r // (tp * dp), "dp": (r // tp) % dp, "tp": r % tp}
        for r in range(world_size)
    ]


def describe(config, world_size: int) -> dict:
    """The dry-run report: layout, batch, parameter counts and, where the planner exists,
    its memory estimate."""
    batch = validate(config, world_size)
    counts = count_parameters(config.model, config.parallel.tp, config.loss.kind)
    report = {
        "config_hash": config.digest(),
        "world_size": world_size,
        "layout": {
            "tp": batch.tp,
            "pp": batch.pp,
            "dp": batch.dp,
            "sequence_parallel": config.parallel.sequence_parallel,
            "zero": config.parallel.zero,
            "accumulation": batch.accumulation,
            "micro_batch": batch.micro_batch,
            "global_batch": batch.global_batch,
        },
        "params": {
            "vision": counts.vision,
            "text": counts.text,
            "heads": counts.heads,
            "total": counts.total,
        },
        "ranks": rank_layout(world_size, batch.tp, batch.pp),
    }
    memory = _memory_estimate(config, world_size)
    if memory is not None:
        report["memory_gib"] = memory
    return report


def _memory_estimate(config, world_size: int) -> dict | None:
    try:
        from megatron_ibxl.planning.memory import estimate_memory_gib
    except ImportError:
        return None
    return estimate_memory_gib(config, world_size)


def run(args) -> int:
    """Load and validate `args.config` for the launcher's world size and print the report."""
    config = load_config(args.config, args.overrides)
    world_size = args.world_size
    if world_size is None:
        world_size = detect_launch_env().world_size
    report = describe(config, world_size)
    # A layout is often checked on a machine without the job's data: missing inputs are
    # reported (stderr and `input_problems`), not fatal, unless --check-inputs asks.
    try:
        check_inputs(config)
        report["input_problems"] = []
    except UserError as exc:
        if getattr(args, "check_inputs", False):
            raise
        report["input_problems"] = str(exc).splitlines()
    if detect_launch_env().rank == 0:
        for problem in report["input_problems"]:
            sys.stderr.write(f"megatron-ibxl train: warning: {problem}\n")
        print(json.dumps(report, indent=2), file=sys.stdout)
    return 0
