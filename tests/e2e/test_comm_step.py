"""The `step` mode of benchmarks/comm_overhead.py: real training steps on 2 gloo processes
under torchrun, its JSON, the interval arithmetic of its NCCL path, and its one-line errors."""

import json
import math
import statistics
import subprocess
import sys

import pytest

from benchmarks import comm_overhead, comm_step
from tests.e2e.train_helpers import DEMO_CONFIG, ROOT, free_port, tiny_overrides

TIMES = ("step_ms", "compute_ms", "comm_ms", "exposed_comm_ms")


def _step_command(tmp_path, out, steps):
    # tp=1 on 2 processes: dp=2 with ZeRO-3 (FSDP2 all-gathers and reduce-scatters over dp),
    # 32 pairs per step = micro-batch 8 x dp 2 x accumulation 2.
    overrides = tiny_overrides(
        tmp_path / "run", parallel__tp=1, parallel__sequence_parallel="false"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(free_port()), "-m", "benchmarks.comm_overhead", "step"]
    cmd += ["--config", str(DEMO_CONFIG), "--steps", str(steps), "--warmup", "1"]
    for item in overrides:
        cmd += ["--set", item]
    return cmd + ["--json", "--out", str(out)]


def _env():
    import os

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def test_step_mode_on_two_gloo_processes(tmp_path):
    out, steps = tmp_path / "step.json", 3
    proc = subprocess.run(
        _step_command(tmp_path, out, steps),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,  # ~1 min alone; several minutes on a loaded 2-core machine
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == report  # --json on stdout

    assert (report["mode"], report["method"], report["backend"]) == ("step", "timing", "gloo")
    assert "comm_ms = exposed_comm_ms" in report["method_note"]
    layout = report["layout"]
    assert (report["world_size"], layout["tp"], layout["dp"], layout["zero"]) == (2, 1, 2, 3)
    assert (layout["micro_batch"], layout["accumulation"], layout["global_batch"]) == (8, 2, 32)

    rows = report["steps"]
    assert [row["step"] for row in rows] == list(range(steps))
    for row in rows:
        for key in (*TIMES, "step_ms_max"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert 0 < row["overhead_fraction"] < 1
        assert row["overhead_fraction"] == pytest.approx(row["exposed_comm_ms"] / row["step_ms"])
        # gloo blocks the caller: all communication is exposed, the rest is compute.
        assert row["comm_ms"] == pytest.approx(row["exposed_comm_ms"])
        assert row["compute_ms"] + row["exposed_comm_ms"] == pytest.approx(row["step_ms"])
        assert row["step_ms_max"] >= row["step_ms"] - 1e-6  # the slowest rank vs the mean
        assert sum(row["comm_by_op_ms"].values()) == pytest.approx(row["comm_ms"])
        # ZeRO-3 over dp gathers parameters and reduce-scatters gradients over the dp ranks.
        assert {"all_gather@dp", "reduce_scatter@dp"} <= set(row["comm_by_op_ms"])
        assert "async_wait" not in row["comm_by_op_ms"]

    for key in TIMES:
        assert report["median"][key] == pytest.approx(statistics.median(r[key] for r in rows))
    # pairs per second from the slowest rank's median step
    expected_rate = 32 / (statistics.median(r["step_ms_max"] for r in rows) / 1e3)
    assert report["samples_per_s"] == pytest.approx(expected_rate)


def test_interval_arithmetic_by_hand():
    # [0, 3] and [2, 5] merge into [0, 5]; [7, 8] stays apart; an empty [9, 9] disappears.
    assert comm_step.merge_intervals([(2, 5), (0, 3), (7, 8), (9, 9)]) == [(0, 5), (7, 8)]
    assert comm_step.covered_length([(2, 5), (0, 3), (7, 8)]) == 6
    # Of [0, 10], compute covers [2, 4] and [3, 6] (= [2, 6]) and [9, 12]: 10 - 4 - 1 = 5.
    assert comm_step.uncovered_length([(0, 10)], [(2, 4), (3, 6), (9, 12)]) == 5


def test_kernel_breakdown_nccl_overlap_by_hand():
    kernels = [
        ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgs)", 0.0, 10.0),
        ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevKernelArgs)", 8.0, 12.0),
        ("ampere_sgemm_128x64_tn", 2.0, 5.0),
        ("void at::native::vectorized_elementwise_kernel<4>", 11.0, 20.0),
        ("Memcpy HtoD (Pageable -> Device)", 0.0, 30.0),  # neither compute nor comm
    ]
    comm, exposed, compute = comm_step.kernel_breakdown(kernels)
    # comm = [0, 12] -> 12; compute = [2, 5] + [11, 20] -> 3 + 9 = 12;
    # exposed = 12 - overlap([2, 5]: 3, [11, 12]: 1) = 8.
    assert (comm, exposed, compute) == (12.0, 8.0, 12.0)
    by_family = comm_step._nccl_by_name(kernels)
    assert by_family == {"AllGather": 10.0 / 1e3, "ReduceScatter": 4.0 / 1e3}


def _main(argv, monkeypatch, capsys):
    for key in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    code = comm_overhead.main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def test_zero_steps_is_a_one_line_error(monkeypatch, capsys):
    argv = ["step", "--config", str(DEMO_CONFIG), "--steps", "0"]
    code, err = _main(argv, monkeypatch, capsys)
    assert code == 2
    assert len(err) == 1 and "--steps 0" in err[0]


def test_missing_config_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    code, err = _main(["step", "--config", str(tmp_path / "nope.yaml")], monkeypatch, capsys)
    assert code == 2
    assert len(err) == 1 and "--config" in err[0] and "nope.yaml" in err[0]


def test_profiler_method_without_cuda_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(comm_step.torch.cuda, "is_available", lambda: False)
    argv = ["step", "--config", str(DEMO_CONFIG), "--method", "profiler"]
    code, err = _main(argv, monkeypatch, capsys)
    assert code == 2
    assert len(err) == 1 and "--method profiler" in err[0] and "timing" in err[0]
