"""The collectives sweep of benchmarks/comm_overhead.py: 2 gloo processes under torchrun,
its JSON format, the nccl-tests bandwidth factors, and its one-line user errors."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import comm_overhead

ROOT = Path(__file__).resolve().parents[2]
OPS = {"all_gather", "reduce_scatter", "all_reduce"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def test_collectives_two_gloo_processes_under_torchrun(tmp_path):
    out = tmp_path / "comm.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "benchmarks.comm_overhead",
        "collectives",
        "--min-bytes",
        "1K",
        "--max-bytes",
        "4K",
        "--iters",
        "3",
        "--warmup",
        "1",
        "--backend",
        "gloo",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "busbw_GB/s" in proc.stdout  # the human table, from rank 0

    report = json.loads(out.read_text())
    assert set(report) == {"mode", "backend", "world_size", "group", "group_size", "results"}
    assert report["mode"] == "collectives"
    assert report["backend"] == "gloo"
    assert (report["world_size"], report["group"], report["group_size"]) == (2, "world", 2)

    # 1, 2 and 4 KiB of float32 split evenly over 2 ranks, so no size is rounded.
    sizes = sorted({row["bytes"] for row in report["results"]})
    assert sizes == [1024, 2048, 4096]
    for size in sizes:
        assert {row["op"] for row in report["results"] if row["bytes"] == size} == OPS
    assert len(report["results"]) == 3 * len(sizes)

    # nccl-tests factors for n = 2: all-gather and reduce-scatter (n-1)/n = 1/2,
    # all-reduce 2(n-1)/n = 1.
    expected_factor = {"all_gather": 0.5, "reduce_scatter": 0.5, "all_reduce": 1.0}
    for row in report["results"]:
        assert set(row) == {"op", "bytes", "time_us", "algbw_gbps", "busbw_gbps"}
        for key in ("time_us", "algbw_gbps", "busbw_gbps"):
            assert math.isfinite(row[key]) and row[key] > 0, row
        # algbw in GB/s = bytes / (time_us * 1e-6 s) / 1e9 bytes per GB.
        assert row["algbw_gbps"] == pytest.approx(row["bytes"] / (row["time_us"] * 1e-6) / 1e9)
        assert row["busbw_gbps"] / row["algbw_gbps"] == pytest.approx(expected_factor[row["op"]])


def test_bus_factor_and_element_count_by_hand():
    # n = 8: (8-1)/8 = 0.875 for all-gather and reduce-scatter, twice that for all-reduce.
    assert comm_overhead.bus_factor("all_gather", 8) == pytest.approx(0.875)
    assert comm_overhead.bus_factor("reduce_scatter", 8) == pytest.approx(0.875)
    assert comm_overhead.bus_factor("all_reduce", 8) == pytest.approx(1.75)
    # 1 KiB of float32 over 3 ranks: 256 elements round down to 255 (85 per rank).
    assert comm_overhead.element_count(1024, 4, 3) == 255
    # Fewer bytes than one element per rank: one element each.
    assert comm_overhead.element_count(4, 4, 8) == 8
    assert comm_overhead.sweep_sizes(1024, 5000) == [1024, 2048, 4096]
    assert comm_overhead.parse_size("256M") == 256 * 1024 * 1024
    assert comm_overhead.parse_size("1KiB") == 1024


def _run_main(argv, monkeypatch, capsys):
    for key in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    code = comm_overhead.main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def test_one_process_is_a_one_line_error(monkeypatch, capsys):
    code, err = _run_main(["collectives"], monkeypatch, capsys)
    assert code == 2
    assert len(err) == 1 and "--group world has 1 rank" in err[0] and "torchrun" in err[0]


def test_tp_not_dividing_world_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    code = comm_overhead.main(["collectives", "--group", "tp", "--tp", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "--tp 3" in err[0] and "world size 4" in err[0]


def test_bad_size_range_is_a_one_line_error(monkeypatch, capsys):
    argv = ["collectives", "--min-bytes", "1M", "--max-bytes", "1K"]
    code, err = _run_main(argv, monkeypatch, capsys)
    assert code == 2
    assert len(err) == 1 and "--min-bytes" in err[0]
