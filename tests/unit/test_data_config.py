"""Validation of the data fields the data layer added."""

from __future__ import annotations

import pytest

from megatron_ibxl.config import ConfigError, RunConfig, validate


def _config(**data) -> RunConfig:
    config = RunConfig()
    config.data.micro_batch, config.data.global_batch = 4, 8
    for key, value in data.items():
        setattr(config.data, key, value)
    return config


@pytest.mark.parametrize(
    ("field", "value", "key"),
    [
        ("seed", -1, "data.seed"),
        ("shuffle_window_shards", -2, "data.shuffle_window_shards"),
        ("prefetch", -1, "data.prefetch"),
        ("min_image_side", 0, "data.min_image_side"),
        ("max_aspect_ratio", 0.5, "data.max_aspect_ratio"),
    ],
)
def test_bad_data_field_is_named(field, value, key):
    with pytest.raises(ConfigError, match=key):
        validate(_config(**{field: value}), world_size=2)


def test_defaults_pass():
    validate(_config(), world_size=2)
