"""The command line: help works, bad configs give one line on stderr and exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.train_helpers import demo_data_dir

ROOT = Path(__file__).resolve().parents[2]
DEMO = "launch/configs/demo-cpu.yaml"


def _cli(*args, env=None):
    exe = Path(sys.executable).parent / "megatron-ibxl"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "megatron_ibxl.cli"]
    return subprocess.run(
        [*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
    )


def test_help_lists_subcommands():
    proc = _cli("--help")
    assert proc.returncode == 0
    for name in ("train", "eval", "plan", "make-demo-data", "train-tokenizer", "plot"):
        assert name in proc.stdout


def test_train_help():
    proc = _cli("train", "--help")
    assert proc.returncode == 0
    assert "--dry-run" in proc.stdout and "--set" in proc.stdout


def _demo_inputs() -> list[str]:
    """`--set` items pointing the demo config at demo data built for this test session."""
    data = demo_data_dir()
    items = [f"data.train_shards={data / 'train.txt'}", f"data.tokenizer={data / 'tokenizer.json'}"]
    items += [f"eval.data={data / 'heldout'}", f"eval.classes={data / 'classes.tsv'}"]
    items += [f"eval.templates={data / 'templates.txt'}"]
    return [arg for item in items for arg in ("--set", item)]


def test_dry_run_prints_layout():
    proc = _cli("train", "--config", DEMO, "--dry-run", "--world-size", "4", *_demo_inputs())
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["layout"]["dp"] == 2 and report["layout"]["accumulation"] == 2
    # Rank 3 under tp=2: tensor parallel is fastest, so it is dp 1, tp 1.
    assert report["ranks"][3] == {"rank": 3, "pp": 0, "dp": 1, "tp": 1}


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["parallel.tp=3"], "world size 4"),
        (["parallel.tp=4", "model.vision.num_heads=2"], "model.vision.num_heads=2"),
        (["data.global_batch=100"], "data.global_batch=100"),
        (["parallel.tp=1", "parallel.sequence_parallel=true"], "parallel.sequence_parallel"),
        (["model.vision.image_size=33"], "model.vision.image_size=33"),
        (["model.text.num_heads=5"], "model.text.num_heads=5"),
        (["parallel.bogus=1"], "parallel.bogus"),
        (["parallel.tp=x"], "parallel.tp='x'"),
    ],
)
def test_bad_config_exits_2(overrides, key):
    args = ["train", "--config", DEMO, "--dry-run", "--world-size", "4"]
    for item in overrides:
        args += ["--set", item]
    proc = _cli(*args)
    assert proc.returncode == 2
    assert key in proc.stderr
    assert "Traceback" not in proc.stderr
    assert all(
        line.startswith("megatron-ibxl train: error: ") for line in proc.stderr.strip().splitlines()
    )


def test_world_size_zero_is_reported_as_zero():
    proc = _cli("train", "--config", DEMO, "--dry-run", "--world-size", "0")
    assert proc.returncode == 2
    assert "world size 0: must be at least 1" in proc.stderr


def test_unparsable_yaml_exits_2(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("parallel: {tp: 2\n")
    proc = _cli("train", "--config", str(bad), "--dry-run")
    assert proc.returncode == 2
    assert "not valid YAML" in proc.stderr and "Traceback" not in proc.stderr


def test_unusable_output_paths_are_one_line(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    proc = _cli("make-demo-data", str(a_file / "data"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "a_file/data" in proc.stderr and "Not a directory" in proc.stderr


def test_dry_run_checks_the_input_files(tmp_path):
    # Shards that do not exist, a tokenizer with more ids than the text vocabulary, missing
    # evaluation data: one line each. A dry run lists them as warnings (a layout is often
    # checked away from the data); with --check-inputs, as a train launch does, they fail.
    args = ["train", "--config", DEMO, "--dry-run", "--world-size", "4", *_demo_inputs()]
    args += ["--set", f"data.train_shards={tmp_path / 'train-{0000..0003}.tar'}"]
    args += ["--set", "model.text.vocab_size=100", "--set", f"eval.data={tmp_path / 'nope'}"]
    listed = _cli(*args)
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)["input_problems"]) == 3
    assert listed.stderr.count("megatron-ibxl train: warning: ") == 3

    proc = _cli(*args, "--check-inputs")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert all(line.startswith("megatron-ibxl train: error: ") for line in lines), lines
    assert "4 of 4 shards do not exist" in lines[0]
    assert "ids but model.text.vocab_size=100" in lines[1]
    assert "eval.data=" in lines[2] and "does not exist" in lines[2]
    assert len(lines) == 3
