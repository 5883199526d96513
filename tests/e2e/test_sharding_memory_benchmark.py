"""benchmarks/sharding_memory.py on the demo model at dp=2: zero 3 holds half of zero 0's
parameters, gradients and AdamW moments per process (checked against the parameter count
of the config, computed without building a model)."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

from megatron_ibxl.config import load_config
from megatron_ibxl.models.param_count import count_parameters

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "launch" / "configs" / "demo-cpu.yaml"
LAYOUT = ["parallel.tp=1", "parallel.sequence_parallel=false"]
MIB = 1024.0 * 1024.0


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _measure(zero: int, tmp_path: Path) -> list[dict]:
    out = tmp_path / f"zero{zero}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(_port()), "-m", "benchmarks.sharding_memory"]
    cmd += ["--config", str(DEMO), "--steps", "1", "--out", str(out)]
    for item in [*LAYOUT, f"parallel.zero={zero}"]:
        cmd += ["--set", item]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_zero3_halves_the_model_state_of_zero0_at_dp2(tmp_path):
    config = load_config(DEMO, LAYOUT)
    total = count_parameters(config.model, tp=1).total
    params_bytes = total * 4  # fp32

    zero0, zero3 = _measure(0, tmp_path), _measure(3, tmp_path)
    for report in zero0:
        assert report["params_bytes"] == report["grads_bytes"] == params_bytes
        assert report["adam_bytes"] == 2 * params_bytes
    # Sharded over 2 ranks: the two shards add up to the model, plus the 0-d logit scale,
    # which FSDP2 cannot split and both ranks hold.
    for key, factor in (("params_bytes", 1), ("grads_bytes", 1), ("adam_bytes", 2)):
        assert sum(report[key] for report in zero3) == factor * (params_bytes + 4), key
    for report in zero3:
        assert math.isclose(report["model_state_mib"], 2 * params_bytes / MIB, rel_tol=1e-2)
        assert report["peak_rss_mib"] > report["model_state_mib"]
