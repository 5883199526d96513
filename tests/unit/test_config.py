"""Config loading and validation: each bad configuration names its key."""

import pytest

from megatron_ibxl.config import ConfigError, load_config, validate

REFERENCE = "launch/configs/ibxl-30b-h100x512.yaml"
DEMO = "launch/configs/demo-cpu.yaml"


def _problems(overrides, world_size=8, path=DEMO):
    with pytest.raises(ConfigError) as info:
        validate(load_config(path, overrides), world_size)
    return info.value.problems


def test_shipped_configs_validate():
    reference = validate(load_config(REFERENCE), 512)
    # 32,768 pairs = 32 per rank per micro-batch * dp 64 * 16 micro-batches.
    assert (reference.tp, reference.dp, reference.accumulation) == (8, 64, 16)
    demo = validate(load_config(DEMO), 4)
    # 128 pairs = 32 per micro-batch * dp 2 * accumulation 2.
    assert (demo.tp, demo.dp, demo.accumulation) == (2, 2, 2)


def test_overrides_are_typed():
    config = load_config(DEMO, ["parallel.tp=1", "optimizer.lr=1e-4", "loss.negatives=micro"])
    assert config.parallel.tp == 1
    assert config.optimizer.lr == pytest.approx(1e-4)
    assert config.loss.negatives == "micro"


def test_unknown_key():
    with pytest.raises(ConfigError, match=r"parallel\.tpp: unknown key"):
        load_config(DEMO, ["parallel.tpp=2"])


def test_unknown_section():
    with pytest.raises(ConfigError, match=r"^modle: unknown key"):
        load_config(DEMO, ["modle.x=1"])


def test_wrong_type():
    with pytest.raises(ConfigError, match=r"parallel\.tp='two': expected int"):
        load_config(DEMO, ["parallel.tp=two"])


def test_bad_enum():
    with pytest.raises(ConfigError, match=r"parallel\.recompute='some': must be one of"):
        load_config(DEMO, ["parallel.recompute=some"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match=r"expected dotted\.key=value"):
        load_config(DEMO, ["parallel.tp"])


def test_world_not_divisible_by_tp_pp():
    (problem,) = _problems(["parallel.tp=4"], world_size=6)
    assert "world size 6 does not divide by parallel.tp * parallel.pp" in problem


def test_heads_not_divisible_by_tp():
    problems = _problems(["parallel.tp=8", "model.vision.num_heads=4"], world_size=8)
    assert any(
        p.startswith("parallel.tp=8: does not divide model.vision.num_heads=4") for p in problems
    )


def test_hidden_not_divisible_by_heads():
    problems = _problems(["model.text.num_heads=6"], world_size=4)
    assert any(
        p.startswith("model.text.num_heads=6: does not divide model.text.hidden=128")
        for p in problems
    )


def test_image_not_divisible_by_patch():
    problems = _problems(["model.vision.image_size=30"], world_size=4)
    assert any(p.startswith("model.vision.image_size=30") for p in problems)


def test_global_batch_mismatch():
    (problem,) = _problems(["data.global_batch=100"], world_size=4)
    assert problem.startswith("data.global_batch=100: must be a multiple of data.micro_batch")


def test_accumulation_disagrees():
    (problem,) = _problems(["data.accumulation=3"], world_size=4)
    assert problem.startswith("data.accumulation=3")
    assert "data.accumulation=2" in problem


def test_sequence_parallel_needs_tp():
    (problem,) = _problems(
        ["parallel.tp=1", "parallel.sequence_parallel=true", "data.global_batch=256"], world_size=4
    )
    assert problem.startswith("parallel.sequence_parallel=true needs parallel.tp > 1")


def test_all_problems_reported_together():
    problems = _problems(["parallel.tp=3", "data.global_batch=7", "optimizer.lr=0"], world_size=4)
    keys = " ".join(problems)
    assert "world size 4" in keys and "optimizer.lr=0" in keys


def test_yaml_that_does_not_parse(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  vision: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML at line"):
        load_config(bad)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_non_positive_sizes_and_non_finite_rates():
    problems = _problems(
        [
            "model.vision.hidden=-128",
            "model.text.num_layers=0",
            "optimizer.lr=.inf",
            "optimizer.weight_decay=-1",
        ],
        world_size=4,
    )
    text = "\n".join(problems)
    assert "model.vision.hidden=-128: must be at least 1" in text
    assert "model.text.num_layers=0: must be at least 1" in text
    assert "optimizer.lr=inf: must be a finite number > 0" in text
    assert "optimizer.weight_decay=-1.0: must be finite and >= 0" in text


@pytest.mark.parametrize(
    "override, expected",
    [
        ("schedule.total_steps=-5", "schedule.total_steps=-5: must be at least 1"),
        ("model.vision.patch_size=0", "model.vision.patch_size=0: must be at least 1"),
        ("logging.log_every=0", "logging.log_every=0: must be at least 1"),
        ("checkpoint.every_steps=-1", "checkpoint.every_steps=-1: must be >= 0"),
        ("model.text.context_length=1", "model.text.context_length=1: must be at least 2"),
    ],
)
def test_each_bad_value_is_blamed_on_its_own_key(override, expected):
    problems = _problems([override], world_size=4)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_a_contrastive_batch_needs_two_pairs():
    one_pair = ["parallel.tp=1", "parallel.sequence_parallel=false", "data.micro_batch=1"]
    problems = _problems([*one_pair, "data.global_batch=1"], world_size=1)
    assert "a contrastive batch of 1 pair has no negatives" in problems[0]
    # Two pairs in one step are enough, whether from accumulation (global negatives)...
    validate(load_config(DEMO, [*one_pair, "data.global_batch=2"]), 1)
    # ...but `micro` negatives only see one micro-batch across dp.
    micro = [*one_pair, "data.global_batch=2", "loss.negatives=micro"]
    assert "(loss.negatives=micro)" in _problems(micro, world_size=1)[0]
