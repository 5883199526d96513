"""benchmarks/gpu_smoke.py at the reference sizes on one CUDA GPU."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_smoke_reference_blocks_and_fsdp_step():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "benchmarks.gpu_smoke", "--iters", "5", "--warmup", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)

    assert report["cpu_check"] is False and report["dtype"] == "bfloat16"
    for name, seq_padded in (("vision", 264), ("text", 80)):  # 257 and 77 padded to 8
        row = report["blocks"][name]
        assert row["seq_padded"] == seq_padded and row["micro_batch"] == 32
        assert math.isfinite(row["tflops"]) and row["tflops"] > 0
        if row["peak_fraction"] is not None:
            # Above the dense peak is impossible; below 5% would mean a fallback path
            # (fp32 math, CPU copies) rather than tensor-core GEMMs.
            assert 0.05 < row["peak_fraction"] < 1.0, row
    assert report["fsdp"]["losses_finite"] and report["fsdp"]["params_are_dtensors"]
