"""`megatron-ibxl eval` before the model: checkpoint resolution and one-line user errors."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ibxl.config import ConfigError
from megatron_ibxl.errors import CheckpointError
from megatron_ibxl.evaluation.entry import _eval_config, resolve_checkpoint
from tests.helpers.eval_fixtures import make_karpathy

ROOT = Path(__file__).resolve().parents[2]
DEMO = "launch/configs/demo-cpu.yaml"
ONE_PROCESS = ["--set", "parallel.tp=1", "--set", "parallel.sequence_parallel=false"]


def _complete(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text("{}")
    return folder


def test_resolve_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    step_5 = _complete(run_dir / "checkpoints" / "step_5")
    step_10 = _complete(run_dir / "checkpoints" / "step_10")
    assert resolve_checkpoint(str(step_5)) == step_5
    # Without a `latest` pointer: the highest complete step, numerically (10 > 5).
    assert resolve_checkpoint(str(run_dir / "checkpoints")) == step_10
    (run_dir / "checkpoints" / "latest").write_text("step_5\n")
    assert resolve_checkpoint(str(run_dir / "checkpoints")) == step_5
    assert resolve_checkpoint(str(run_dir)) == step_5


def test_resolve_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        resolve_checkpoint(str(tmp_path / "absent"))
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint found"):
        resolve_checkpoint(str(tmp_path / "checkpoints"))


def _eval(*args):
    cmd = [sys.executable, "-m", "megatron_ibxl.cli", "eval", "--config", DEMO, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _assert_one_line_error(proc, key):
    assert proc.returncode == 2, proc.stderr
    assert key in proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors and all(line.startswith("megatron-ibxl eval: error: ") for line in errors)


def test_cli_data_in_no_layout(tmp_path):
    args = ["--checkpoint", str(tmp_path), "--task", "coco", "--data", str(tmp_path)]
    proc = _eval(*args, *ONE_PROCESS)
    _assert_one_line_error(proc, "expected a COCO folder with dataset_coco.json")


def test_cli_missing_checkpoint(tmp_path):
    data = make_karpathy(tmp_path / "coco")
    args = ["--checkpoint", str(tmp_path / "nope"), "--task", "coco", "--data", str(data)]
    proc = _eval(*args, *ONE_PROCESS)
    _assert_one_line_error(proc, "checkpoint folder not found")


def _args(*overrides, **fields):
    values = dict(config=str(ROOT / DEMO), overrides=list(overrides), task="coco", data="d")
    return argparse.Namespace(**(values | dict(classes=None, templates=None) | fields))


def test_eval_config_checks():
    one = ["parallel.tp=1", "parallel.sequence_parallel=false"]
    # The demo layout (tp=2) cannot run on one process: validation names the world size.
    with pytest.raises(ConfigError, match="world size 1"):
        _eval_config(_args(), world_size=1)
    with pytest.raises(ConfigError, match="data.tokenizer is empty"):
        _eval_config(_args(*one, "data.tokenizer="), world_size=1)
    # The training batch layout is not checked: an accumulation that only fits the training
    # world size still evaluates on 3 processes.
    config = _eval_config(_args(*one, "data.accumulation=7", classes="c.tsv"), world_size=3)
    assert config.data.accumulation == 7
    assert (config.eval.task, config.eval.data, config.eval.classes) == ("coco", "d", "c.tsv")
