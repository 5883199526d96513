"""Run configuration: typed dataclasses per YAML section, loading, overrides, validation."""

from megatron_ibxl.config.core import RunConfig, load_config
from megatron_ibxl.config.data import DataConfig
from megatron_ibxl.config.errors import ConfigError
from megatron_ibxl.config.model import ModelConfig, TextConfig, VisionConfig
from megatron_ibxl.config.parallel import ParallelConfig
from megatron_ibxl.config.run import CheckpointConfig, EvalConfig, LoggingConfig
from megatron_ibxl.config.training import LossConfig, OptimizerConfig, ScheduleConfig
from megatron_ibxl.config.validate import BatchLayout, validate

__all__ = [
    "BatchLayout",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LoggingConfig",
    "LossConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "RunConfig",
    "ScheduleConfig",
    "TextConfig",
    "VisionConfig",
    "load_config",
    "validate",
]
