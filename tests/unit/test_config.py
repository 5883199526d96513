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


def test_a_config_that_is_not_utf8(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"parallel:\n  tp: 2\n\xff\xfe garbage\n")
    # 0xff is the 19th byte: "parallel:\n" is 10 bytes, "  tp: 2\n" 8 more.
    with pytest.raises(ConfigError) as info:
        load_config(binary)
    assert info.value.problems == [
        f"{binary}: not UTF-8 text (byte 0xff at offset 18); pass a YAML file saved as UTF-8"
    ]


def test_a_config_path_that_is_a_folder_or_unreadable(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"is a folder, not a config file"):
        load_config(tmp_path)
    locked = tmp_path / "locked.yaml"
    locked.write_text("parallel:\n  tp: 1\n")

    # Tests may run as root, which reads any file whatever its mode: refuse the read itself.
    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(locked), "read_bytes", refuse)
    with pytest.raises(ConfigError) as info:
        load_config(locked)
    (problem,) = info.value.problems
    assert problem.startswith(f"{locked}: cannot read the config file (Permission denied)")


def test_a_control_character_names_its_line(tmp_path):
    bad = tmp_path / "nul.yaml"
    bad.write_text("parallel:\n  tp: 1\n  pp: 1\x00\n")
    with pytest.raises(ConfigError, match=r"nul\.yaml: not valid YAML at line 3: .*#x0000"):
        load_config(bad)


def test_a_key_given_twice_names_its_dotted_path_and_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text(
        "model:\n"  # line 1
        "  vision:\n"
        "    hidden: 128\n"  # line 3
        "    patch_size: 8\n"
        "    hidden: 256\n"  # line 5
        "parallel: {tp: 1, tp: 2}\n"  # line 6, both in one flow mapping
        "data:\n"  # line 7
        "  seed: 1\n"
        "data:\n"  # line 9
        "  seed: 2\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [p.split(" is given twice ")[0] for p in info.value.problems] == [
        f"{path}: model.vision.hidden",
        f"{path}: parallel.tp",
        f"{path}: data",
    ]
    assert "(line 3 and line 5)" in info.value.problems[0]
    assert "(both on line 6)" in info.value.problems[1]
    assert "(line 7 and line 9)" in info.value.problems[2]


def test_merge_keys_and_set_overrides_are_not_duplicates(tmp_path):
    # A key written next to `<<: *anchor` replaces the merged one, and `--set` replaces a key
    # of the file: neither is a key written twice in one mapping.
    path = tmp_path / "merged.yaml"
    path.write_text(
        "model:\n"
        "  vision: &tower\n"
        "    hidden: 128\n"
        "    num_heads: 4\n"
        "  text:\n"
        "    <<: *tower\n"
        "    hidden: 256\n"
        "parallel:\n"
        "  tp: 2\n"
    )
    config = load_config(path, ["parallel.tp=1", "model.vision.hidden=64"])
    assert (config.model.vision.hidden, config.model.vision.num_heads) == (64, 4)
    assert (config.model.text.hidden, config.model.text.num_heads) == (256, 4)
    assert config.parallel.tp == 1


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.vision.image_size=0", "model.vision.image_size=0: must be at least 1"),
        ("model.vision.image_size=-32", "model.vision.image_size=-32: must be at least 1"),
        ("model.vision.channels=0", "model.vision.channels=0: must be at least 1"),
        ("model.vision.patch_size=-4", "model.vision.patch_size=-4: must be at least 1"),
        ("model.text.vocab_size=0", "model.text.vocab_size=0: must be at least 1"),
        ("model.text.vocab_pad_multiple=0", "model.text.vocab_pad_multiple=0: must be at least"),
        ("model.embed_dim=-1", "model.embed_dim=-1: must be at least 1"),
        ("model.norm_eps=0", "model.norm_eps=0.0: must be a finite number > 0"),
        ("optimizer.eps=-1e-8", "optimizer.eps=-1e-08: must be a finite number > 0"),
        ("data.micro_batch=0", "data.micro_batch=0: must be at least 1"),
        ("data.global_batch=0", "data.global_batch=0: must be a multiple of"),
        ("data.num_threads=0", "data.num_threads=0: must be >= 1"),
        ("data.num_threads=-2", "data.num_threads=-2: must be >= 1"),
        ("data.min_image_side=0", "data.min_image_side=0: must be >= 1"),
        ("data.prefetch=-1", "data.prefetch=-1: must be >= 0"),
        ("eval.batch_size=0", "eval.batch_size=0: must be at least 1"),
        ("eval.batch_size=-64", "eval.batch_size=-64: must be at least 1"),
        ("eval.every_steps=-1", "eval.every_steps=-1: must be >= 0"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last=0: must be >= 1"),
        ("schedule.warmup_steps=-1", "schedule.warmup_steps=-1: must be >= 0"),
        ("parallel.tp=0", "parallel.tp=0: must be at least 1"),
    ],
)
def test_sizes_and_counts_below_their_bound_are_one_line_each(override, expected):
    problems = _problems([override], world_size=4)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


@pytest.mark.parametrize(
    "override",
    [
        # 0 is documented as meaning something for each of these, so it is accepted.
        "eval.every_steps=0",  # evaluate only at the end
        "checkpoint.every_steps=0",  # save only at the end
        "schedule.warmup_steps=0",  # no warmup
        "data.prefetch=0",  # prepare each micro-batch inside next()
        "data.shuffle_window_shards=0",  # shuffle all samples of the epoch together
        "data.randaugment_n=0",  # RandAugment off
        "data.seed=0",
        # The smallest positive value of each newly bounded field.
        "eval.batch_size=1",
        "data.num_threads=1",
        "checkpoint.keep_last=1",
    ],
)
def test_zero_where_documented_and_the_smallest_positive_values_validate(override):
    validate(load_config(DEMO, [override]), 4)
