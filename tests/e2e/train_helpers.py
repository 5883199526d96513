"""Shared pieces of the end-to-end training tests: tiny configs, launches, metrics reading.

The tests train `launch/configs/demo-cpu.yaml` shrunk by `--set` overrides (one layer per
tower, width 32, 32 pairs per step) on the real digits demo data, on 4 CPU processes.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = ROOT / "launch" / "configs" / "demo-cpu.yaml"
WORLD = 4


@functools.cache
def demo_data_dir() -> Path:
    """The digits demo data, built once per test session in a temporary folder."""
    from megatron_ibxl.data.demo import make_demo_data

    out = Path(tempfile.mkdtemp(prefix="ibxl-demo-data-"))
    make_demo_data(out)
    return out


def tiny_overrides(run_dir: Path, **changes) -> list[str]:
    """`--set` items that shrink the demo config to a few-second run writing to `run_dir`.

    Keyword arguments override single keys, written with `__` for the dots
    (`schedule__total_steps=12`).
    """
    data = demo_data_dir()
    values = {
        "model.vision.hidden": 32,
        "model.vision.num_layers": 1,
        "model.vision.num_heads": 2,
        "model.vision.mlp_hidden": 64,
        "model.text.hidden": 32,
        "model.text.num_layers": 1,
        "model.text.num_heads": 2,
        "model.text.mlp_hidden": 64,
        "model.embed_dim": 16,
        "data.train_shards": data / "train.txt",
        "data.tokenizer": data / "tokenizer.json",
        "data.micro_batch": 8,
        "data.global_batch": 32,
        "data.randaugment_n": 0,
        "optimizer.lr": 3e-3,
        "schedule.warmup_steps": 1,
        "schedule.total_steps": 8,
        "eval.data": data / "heldout",
        "eval.classes": data / "classes.tsv",
        "eval.templates": data / "templates.txt",
        "eval.every_steps": 0,
        "eval.batch_size": 128,
        "checkpoint.every_steps": 4,
        "logging.run_dir": run_dir,
        "logging.log_every": 1,
        "logging.progress": "plain",
        "parallel.timeout_s": 60,
    }
    for key, value in changes.items():
        values[key.replace("__", ".")] = value
    return [f"{key}={value}" for key, value in values.items()]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _torchrun_command(overrides: list[str], nproc: int) -> tuple[list[str], dict[str, str]]:
    cmd = ["bash", str(ROOT / "launch" / "torchrun.sh"), str(DEMO_CONFIG)]
    for item in overrides:
        cmd += ["--set", item]
    env = _env(NPROC_PER_NODE=str(nproc), MASTER_PORT=str(free_port()), PYTHON=sys.executable)
    return cmd, env


def torchrun(overrides: list[str], timeout_s: float = 240) -> subprocess.CompletedProcess:
    """`launch/torchrun.sh demo-cpu.yaml --set ...` on 4 local processes, output captured."""
    cmd, env = _torchrun_command(overrides, WORLD)
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )


def torchrun_popen(overrides: list[str], nproc: int, log: Path) -> subprocess.Popen:
    """`launch/torchrun.sh` started in the background on `nproc` processes, as the leader of
    a process group of its own (as a terminal's foreground job is, so `os.killpg` acts like
    Ctrl-C); stdout and stderr go to `log`."""
    cmd, env = _torchrun_command(overrides, nproc)
    out = open(log, "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out, process_group=0)


def spawn_ranks(overrides: list[str], log_dir: Path) -> list[subprocess.Popen]:
    """Start the 4 ranks as separate processes, as srun would (no torchrun agent between
    them), so each one's exit code and log can be checked. Logs: log_dir/rank_N.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    cmd = [sys.executable, "-m", "megatron_ibxl.cli", "train", "--config", str(DEMO_CONFIG)]
    for item in overrides:
        cmd += ["--set", item]
    procs = []
    for rank in range(WORLD):
        env = _env(
            RANK=str(rank),
            WORLD_SIZE=str(WORLD),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        log = open(log_dir / f"rank_{rank}.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log))
    return procs


def rank_log(log_dir: Path, rank: int) -> str:
    """What rank `rank` printed."""
    return (log_dir / f"rank_{rank}.log").read_text()


def stop_all(procs: list[subprocess.Popen]) -> None:
    """Kill whatever is still running (test clean-up)."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def metrics_lines(run_dir: Path) -> list[dict]:
    """Every line of metrics.jsonl parsed as JSON (a line that does not parse fails)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for(predicate, timeout_s: float, procs: list[subprocess.Popen], what: str) -> None:
    """Poll `predicate()` until true; fail early when a process exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        exited = [p.returncode for p in procs if p.poll() is not None]
        if exited:
            raise AssertionError(f"a rank exited (codes {exited}) before {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the step_N folders under RUN_DIR/checkpoints."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in root.glob("step_*") if p.name[5:].isdigit())


def checkpoint_tensors(path: Path, scratch: Path) -> dict:
    """Every tensor of a step_N checkpoint (model and optimizer state), at full shape, read
    with torch.distributed.checkpoint's own converter, without the engine."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = scratch / f"{path.parent.parent.name}-{path.name}.pt"
    dcp_to_torch_save(str(path), str(out))
    return torch.load(out, weights_only=True)
