"""`megatron-ibxl plan` as a user runs it: JSON keys, text report, search, calibration and the
one-line errors with exit code 2. A few runs go through the installed command in a
subprocess; the rest call the same entry point, `megatron_ibxl.cli.main`, in this process
(each subprocess pays several seconds of torch and Megatron-core imports)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_ibxl.cli import main

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = "launch/configs/ibxl-30b-h100x512.yaml"
H100 = "launch/clusters/h100-ndr400.yaml"


def _cli(*args):
    exe = Path(sys.executable).parent / "megatron-ibxl"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "megatron_ibxl.cli"]
    return subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _main(capsys, *args):
    """Run the command in-process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def base():
    """The reference plan, from the installed command."""
    proc = _cli("plan", "--config", REFERENCE, "--cluster", H100, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _errors(proc):
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("megatron-ibxl plan: error: ")]
    return errors, "Traceback" in proc.stderr


def test_plan_json_has_the_documented_keys(base):
    data = base
    for dotted in (
        "params.vision params.text params.heads params.total memory_gib.weights "
        "memory_gib.grads memory_gib.optimizer memory_gib.activations memory_gib.buffers "
        "memory_gib.total fits flops_per_step step_time_s mfu comm.tp_s comm.dp_s comm.pp_s "
        "comm.exposed_s comm.overhead_fraction layout.tp layout.pp layout.dp "
        "layout.accumulation comm.total_s comm.tp_bytes comm.dp_bytes flops_per_gpu"
    ).split():
        node = data
        for part in dotted.split("."):
            assert part in node, dotted
            node = node[part]
    assert data["fits"] is True
    assert data["comm"]["exposed_s"] <= data["comm"]["total_s"]
    assert 0 < data["mfu"] < 1


def test_overrides_change_the_plan(base, capsys):
    code, out, _ = _main(
        capsys,
        "plan",
        "--config",
        REFERENCE,
        "--cluster",
        H100,
        "--json",
        "--set",
        "parallel.gather=microbatch",
    )
    assert code == 0
    again = json.loads(out)
    assert again["layout"]["accumulation"] == base["layout"]["accumulation"]
    assert again["comm"]["dp_s"] > base["comm"]["dp_s"]
    assert again["comm"]["overhead_fraction"] > base["comm"]["overhead_fraction"]


def test_text_report_and_search(capsys):
    code, out, _ = _main(capsys, "plan", "--config", REFERENCE, "--cluster", H100)
    assert code == 0
    assert "exposed =" in out and "fits" in out
    proc = _cli("plan", "--config", REFERENCE, "--cluster", H100, "--search", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert len(data["best"]) == 5
    times = [row["step_time_s"] for row in data["best"]]
    assert times == sorted(times)
    assert data["best"][0]["reason"].startswith("fastest")
    assert all("vs #1" in row["reason"] for row in data["best"][1:])


def test_calibrate_uses_measured_bandwidth(tmp_path, base, capsys):
    # A dp-group sweep whose largest size reached 21 GB/s, half the file's 42 GB/s.
    rows = [
        {"op": op, "bytes": size, "time_us": t, "algbw_gbps": bw, "busbw_gbps": bw}
        for op in ("all_gather", "reduce_scatter")
        for size, t, bw in ((4096, 30.0, 0.14), (1 << 28, 12800.0, 21.0))
    ]
    path = tmp_path / "comm.json"
    path.write_text(
        json.dumps(
            {
                "mode": "collectives",
                "backend": "nccl",
                "world_size": 16,
                "group": "dp",
                "group_size": 2,
                "results": rows,
            }
        )
    )
    code, out, _ = _main(
        capsys, "plan", "--config", REFERENCE, "--cluster", H100, "--json", "--calibrate", path
    )
    assert code == 0
    data = json.loads(out)
    assert data["cluster"]["infiniband_bus_bandwidth_gbps"] == 21.0
    assert (
        data["cluster"]["nvlink_bus_bandwidth_gbps"] == base["cluster"]["nvlink_bus_bandwidth_gbps"]
    )
    assert data["comm"]["dp_s"] > 1.9 * base["comm"]["dp_s"]


def test_missing_bandwidth_exits_2(tmp_path):
    raw = yaml.safe_load((ROOT / H100).read_text())
    del raw["nvlink"]["bus_bandwidth_gbps"]
    bad = tmp_path / "cluster.yaml"
    bad.write_text(yaml.safe_dump(raw))
    proc = _cli("plan", "--config", REFERENCE, "--cluster", str(bad))
    errors, traceback = _errors(proc)
    assert proc.returncode == 2 and not traceback
    assert len(errors) == 1 and "nvlink.bus_bandwidth_gbps is missing" in errors[0]


def _one_error(code, err) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("megatron-ibxl plan: error: ")
    return lines[0]


def test_layout_not_dividing_the_cluster_exits_2(capsys):
    code, _, err = _main(
        capsys, "plan", "--config", REFERENCE, "--cluster", H100, "--set", "parallel.pp=3"
    )
    assert "parallel.tp * parallel.pp = 8 * 3" in _one_error(code, err)


def test_bad_calibration_file_exits_2(tmp_path, capsys):
    path = tmp_path / "comm.json"
    path.write_text(json.dumps({"mode": "collectives", "group": "tp", "group_size": 8}))
    code, _, err = _main(
        capsys, "plan", "--config", REFERENCE, "--cluster", H100, "--calibrate", path
    )
    assert "results: missing or empty" in _one_error(code, err)
