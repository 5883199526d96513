"""Process groups, device mesh, launcher environments, and applying TP/SP/FSDP."""

from megatron_ibxl.parallel.launcher_env import LaunchEnv, detect_launch_env
from megatron_ibxl.parallel.setup import (
    ParallelContext,
    init_parallel,
    layout_table,
    shutdown_parallel,
)

__all__ = [
    "LaunchEnv",
    "ParallelContext",
    "detect_launch_env",
    "init_parallel",
    "layout_table",
    "shutdown_parallel",
]
