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


def _dry_run(overrides: list[str], world_size: int = 4) -> subprocess.CompletedProcess:
    args = ["train", "--config", DEMO, "--dry-run", "--world-size", str(world_size)]
    for item in overrides:
        args += ["--set", item]
    return _cli(*args)


NO_TP = ["parallel.tp=1", "parallel.sequence_parallel=false"]
"""The demo at tp 1 (dp 4, no accumulation), where a head count need not divide by tp."""


@pytest.mark.parametrize(
    "overrides, world_size, key",
    [
        (["parallel.tp=4"], 6, "world size 6"),
        (["parallel.tp=4", "model.vision.num_heads=2"], 4, "model.vision.num_heads=2"),
        (["data.global_batch=100"], 4, "data.global_batch=100"),
        (NO_TP + ["parallel.sequence_parallel=true"], 4, "parallel.sequence_parallel"),
        (["model.vision.image_size=33"], 4, "model.vision.image_size=33"),
        (NO_TP + ["model.text.num_heads=3"], 4, "model.text.num_heads=3"),
        (["parallel.bogus=1"], 4, "parallel.bogus"),
        (["parallel.tp=x"], 4, "parallel.tp='x'"),
    ],
)
def test_bad_config_exits_2(overrides, world_size, key):
    proc = _dry_run(overrides, world_size)
    assert proc.returncode == 2
    _assert_one_error_line(proc.stderr, key)


def test_every_problem_is_its_own_line():
    # Five heads at tp 2: they divide neither the hidden width 128 nor by tp.
    proc = _dry_run(["model.text.num_heads=5"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and all(
        line.startswith("megatron-ibxl train: error: ") for line in lines
    )
    assert "does not divide model.text.hidden=128" in lines[0]
    assert "parallel.tp=2: does not divide model.text.num_heads=5" in lines[1]


def _assert_one_error_line(stderr: str, key: str) -> None:
    """Exactly one line on stderr: the error prefix and the key it names, no traceback."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("megatron-ibxl train: error: ") and key in lines[0], stderr


@pytest.mark.parametrize(
    "text, key",
    [
        ("parallel:\n  tp: 2\n  pipeline: 1\n", "parallel.pipeline"),
        ("bogus_section:\n  x: 1\n", "bogus_section"),
        ("parallel:\n  tp: two\n", "parallel.tp='two'"),
        ("data:\n  micro_batch: [32]\n", "data.micro_batch"),
        ("- just\n- a list\n", "mapping"),
    ],
)
def test_bad_keys_and_types_in_the_yaml_file_exit_2(tmp_path, text, key):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    proc = _cli("train", "--config", str(path), "--dry-run", "--world-size", "2")
    assert proc.returncode == 2
    _assert_one_error_line(proc.stderr, key)


def test_world_size_zero_is_reported_as_zero():
    proc = _cli("train", "--config", DEMO, "--dry-run", "--world-size", "0")
    assert proc.returncode == 2
    assert "world size 0: must be at least 1" in proc.stderr


def test_unparsable_yaml_exits_2(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("parallel: {tp: 2\n")
    proc = _cli("train", "--config", str(bad), "--dry-run")
    assert proc.returncode == 2
    _assert_one_error_line(proc.stderr, "not valid YAML")


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


def test_check_inputs_opens_every_shard(tmp_path):
    # Files that exist but are not tar files fail before any process group, as the loader
    # would fail on them after the model is built: an empty file, random bytes, a tar cut
    # inside its first header. One good shard beside them shows that only the bad ones count.
    data = demo_data_dir()
    good = str(data / (data / "train.txt").read_text().split()[0])
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "noise.tar").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "cut.tar").write_bytes(Path(good).read_bytes()[:100])
    listing = tmp_path / "shards.txt"
    names = [good] + [str(tmp_path / n) for n in ("empty.tar", "noise.tar", "cut.tar")]
    listing.write_text("\n".join(names) + "\n")
    args = ["train", "--config", DEMO, "--dry-run", "--world-size", "4", *_demo_inputs()]
    proc = _cli(*args, "--set", f"data.train_shards={listing}", "--check-inputs")
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("megatron-ibxl train: error: data.train_shards="), line
    assert "3 of 4 shards are not tar files" in line and "empty.tar" in line, line


def test_a_taken_rendezvous_port_is_one_line(tmp_path):
    # Two launcher-less jobs on one host default to the same MASTER_PORT; the second must say
    # so and how to fix it, not print the rendezvous traceback.
    import os
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        args = ["train", "--config", DEMO, *_demo_inputs(), "--set", "parallel.tp=1"]
        args += ["--set", "parallel.sequence_parallel=false"]
        args += ["--set", f"logging.run_dir={tmp_path / 'run'}"]
        proc = _cli(*args, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"127.0.0.1:{port}" in errors[0] and "set MASTER_PORT" in errors[0], errors[0]


def _one_error_line(stderr: str, command: str) -> str:
    """The single stderr line of a failed command: its error prefix, no traceback."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"megatron-ibxl {command}: error: "), stderr
    return lines[0]


@pytest.mark.parametrize(
    "command, extra",
    [
        ("train", ["--dry-run"]),
        ("plan", ["--cluster", "launch/clusters/h100-ndr400.yaml"]),
        ("eval", ["--checkpoint", "ckpt", "--task", "imagenet", "--data", "images"]),
    ],
)
def test_a_config_that_is_not_utf8_is_one_line(tmp_path, command, extra):
    path = tmp_path / "s6.yaml"
    path.write_bytes(b"\xff\xfe garbage")
    proc = _cli(command, "--config", str(path), *extra)
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc.stderr, command)
    assert f"{path}: not UTF-8 text (byte 0xff at offset 0)" in line, line


def test_a_config_path_that_is_a_folder_is_one_line(tmp_path):
    proc = _cli("train", "--config", str(tmp_path), "--dry-run")
    assert proc.returncode == 2, proc.stderr
    assert f"{tmp_path}: is a folder, not a config file" in _one_error_line(proc.stderr, "train")


def test_a_key_given_twice_in_the_yaml_file_is_one_line(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("model:\n  vision:\n    hidden: 128\n    hidden: 256\n")
    proc = _cli("train", "--config", str(path), "--dry-run", "--world-size", "2")
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc.stderr, "train")
    assert f"{path}: model.vision.hidden is given twice (line 3 and line 4)" in line, line


@pytest.mark.parametrize(
    "override",
    ["model.vision.image_size=0", "model.vision.image_size=-224", "eval.batch_size=0"]
    + ["data.num_threads=0"],
)
def test_non_positive_sizes_exit_2_naming_the_field(override):
    proc = _dry_run([override])
    assert proc.returncode == 2
    _assert_one_error_line(proc.stderr, override)


def test_plot_skips_lines_that_are_not_utf8(tmp_path):
    good = [json.dumps({"step": s, "loss": 4.0 - s, "lr": 1e-3}) for s in (1, 2)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(good[0].encode() + b"\n\xff\xfe\x00\x80garbage\n" + good[1].encode())
    proc = _cli("plot", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert "skipped 1 malformed line(s) (first: line 2)" in proc.stderr, proc.stderr

    # Nothing but undecodable bytes: one error line after the warning that counts them.
    metrics.write_bytes(b"\xff\xfe garbage\n\x80\x81\x82\n")
    proc = _cli("plot", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "skipped 2 malformed line(s)" in proc.stderr, proc.stderr
    assert errors[0].startswith("megatron-ibxl plot: error: ") and "no metrics lines" in errors[0]


def test_check_inputs_reads_the_evaluation_data_and_the_run_folder(tmp_path):
    # Evaluation data that exists but is in no usable layout, and a run folder under a file:
    # found before training, not at the first evaluation or the first write.
    (tmp_path / "heldout" / "not-a-class").mkdir(parents=True)
    (tmp_path / "a_file").write_text("")
    args = ["train", "--config", DEMO, "--dry-run", "--world-size", "4", *_demo_inputs()]
    args += ["--set", f"eval.data={tmp_path / 'heldout'}"]
    args += ["--set", f"logging.run_dir={tmp_path / 'a_file' / 'run'}", "--check-inputs"]
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "heldout" in lines[0] and "not-a-class" in lines[0], lines[0]
    assert lines[0].endswith("or set eval.task=none"), lines[0]
    assert "logging.run_dir=" in lines[1] and "is a file, not a folder" in lines[1], lines[1]


def test_data_commands_refuse_empty_inputs(tmp_path):
    # A tar with members but no caption cannot teach a tokenizer anything; an empty output
    # folder name would write the demo data into the current folder.
    import tarfile

    with tarfile.open(tmp_path / "nocaptions.tar", "w") as tar:
        info = tarfile.TarInfo("a.jpg")
        info.size = 0
        tar.addfile(info)
    out = tmp_path / "tokenizer.json"
    proc = _cli("train-tokenizer", "--shards", str(tmp_path / "nocaptions.tar"), "--out", str(out))
    assert proc.returncode == 2 and "no caption in 1 shards" in proc.stderr, proc.stderr
    assert not out.exists()
    proc = _cli("make-demo-data", "")
    assert proc.returncode == 2 and "OUT_DIR is empty" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1


def test_a_folder_given_as_a_shard_is_named_as_one(tmp_path):
    args = ["train", "--config", DEMO, "--dry-run", "--world-size", "4", *_demo_inputs()]
    proc = _cli(*args, "--set", f"data.train_shards={tmp_path}", "--check-inputs")
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert f"{tmp_path} is a folder" in line, line
