"""Cluster files, calibration files and layouts the planner must refuse, each by key name;
the calibration maths; the memory estimate the dry run prints."""

import json
from pathlib import Path

import pytest
import yaml

from megatron_ibxl.config import ConfigError, load_config
from megatron_ibxl.errors import UserError
from megatron_ibxl.planning.calibrate import apply_calibration, read_calibration
from megatron_ibxl.planning.cluster import load_cluster
from megatron_ibxl.planning.memory import estimate_memory_gib
from megatron_ibxl.planning.plan import plan_layout
from megatron_ibxl.training.dry_run import describe

ROOT = Path(__file__).resolve().parents[2]
H100 = ROOT / "launch" / "clusters" / "h100-ndr400.yaml"
REFERENCE = ROOT / "launch" / "configs" / "ibxl-30b-h100x512.yaml"
DEMO = ROOT / "launch" / "configs" / "demo-cpu.yaml"


def _cluster_file(tmp_path, edit):
    raw = yaml.safe_load(H100.read_text())
    edit(raw)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_shipped_cluster_files_load():
    h100 = load_cluster(H100)
    assert (h100.world_size, h100.peak_bf16_tflops) == (512, 989)
    assert 360 <= h100.nvlink.bus_bandwidth_gbps <= 450
    assert 40 <= h100.infiniband.bus_bandwidth_gbps <= 45
    h200 = load_cluster(ROOT / "launch" / "clusters" / "h200-ndr400.yaml")
    assert h200.gpu_memory_gib > h100.gpu_memory_gib


def test_missing_bandwidth(tmp_path):
    path = _cluster_file(tmp_path, lambda raw: raw["infiniband"].pop("bus_bandwidth_gbps"))
    with pytest.raises(ConfigError, match=r"infiniband\.bus_bandwidth_gbps is missing"):
        load_cluster(path)


def test_missing_link(tmp_path):
    path = _cluster_file(tmp_path, lambda raw: raw.pop("nvlink"))
    with pytest.raises(ConfigError, match=r"nvlink is missing"):
        load_cluster(path)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("achievable_flops_fraction", 1.5, r"achievable_flops_fraction=1\.5: must be > 0"),
        ("gpus_per_node", 0, r"gpus_per_node=0: must be >= 1"),
        ("peak_bf16_tflops", "fast", r"peak_bf16_tflops='fast': expected float"),
        ("attention_kernel", "xformers", r"attention_kernel='xformers': must be one of"),
        ("nvlnk", {}, r"nvlnk: unknown key"),
    ],
)
def test_bad_cluster_values(tmp_path, key, value, message):
    path = _cluster_file(tmp_path, lambda raw: raw.__setitem__(key, value))
    with pytest.raises(ConfigError, match=message):
        load_cluster(path)


def test_negative_bandwidth(tmp_path):
    path = _cluster_file(tmp_path, lambda raw: raw["nvlink"].__setitem__("bus_bandwidth_gbps", -1))
    with pytest.raises(ConfigError, match=r"nvlink\.bus_bandwidth_gbps=-1: must be > 0"):
        load_cluster(path)


@pytest.mark.parametrize(
    "link, key", [("nvlink", "bus_bandwidth_gbps"), ("infiniband", "latency_us")]
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_link_constants(tmp_path, link, key, value):
    path = _cluster_file(tmp_path, lambda raw: raw[link].__setitem__(key, value))
    with pytest.raises(ConfigError, match=rf"{link}\.{key}=(nan|inf): must be a finite number"):
        load_cluster(path)


def test_cluster_file_that_is_not_text_or_not_a_file(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ConfigError, match="not valid YAML text"):
        load_cluster(binary)
    with pytest.raises(ConfigError, match="is a folder, not a cluster file"):
        load_cluster(tmp_path)


def test_missing_cluster_file(tmp_path):
    with pytest.raises(ConfigError, match="cluster file not found"):
        load_cluster(tmp_path / "nope.yaml")


def test_layout_that_does_not_divide_the_cluster(tmp_path):
    cluster = load_cluster(_cluster_file(tmp_path, lambda raw: raw.__setitem__("num_nodes", 3)))
    config = load_config(REFERENCE, ["parallel.pp=16"])
    # 24 GPUs do not divide by tp * pp = 8 * 16.
    with pytest.raises(ConfigError, match=r"parallel\.tp \* parallel\.pp = 8 \* 16"):
        plan_layout(config, cluster)


def test_tp_beyond_a_node():
    with pytest.raises(ConfigError, match=r"parallel\.tp=16: tensor parallelism must stay"):
        plan_layout(load_config(REFERENCE, ["parallel.tp=16"]), load_cluster(H100))


def test_global_batch_not_dividing():
    with pytest.raises(ConfigError, match=r"data\.global_batch=1000"):
        plan_layout(load_config(REFERENCE, ["data.global_batch=1000"]), load_cluster(H100))


def test_fp32_without_fp32_peak(tmp_path):
    cluster = load_cluster(_cluster_file(tmp_path, lambda raw: raw.pop("peak_fp32_tflops")))
    with pytest.raises(ConfigError, match=r"optimizer\.precision='fp32'.*peak_fp32_tflops"):
        plan_layout(load_config(REFERENCE, ["optimizer.precision=fp32"]), cluster)


def test_pipeline_is_planned_though_the_engine_runs_pp1():
    plan = plan_layout(load_config(REFERENCE, ["parallel.pp=2"]), load_cluster(H100))
    # dp halves; the 1F1B bubble is (pp - 1) micro-batch times; stage 0 holds pp = 2
    # micro-batches of activations for half of the layers.
    assert (plan.batch.pp, plan.batch.dp, plan.batch.accumulation) == (2, 32, 32)
    assert plan.stage.bubble_s > 0 and plan.stage.pp_s > 0


# --- calibration -------------------------------------------------------------------------


def _bench(tmp_path, group="tp", n=4, rows=None, **top):
    # A ring of n ranks at 20 GB/s with 5 us per step: time = (n-1) * 5 us + bytes (n-1)/n / bw.
    def row(op, size):
        steps = (n - 1) * (2 if op == "all_reduce" else 1)
        seconds = steps * 5e-6 + size * steps / n / 20e9
        algbw = size / seconds / 1e9
        return {
            "op": op,
            "bytes": size,
            "time_us": seconds * 1e6,
            "algbw_gbps": algbw,
            "busbw_gbps": algbw * steps / n,
        }

    ops = ("all_gather", "reduce_scatter", "all_reduce")
    if rows is None:
        rows = [row(op, size) for op in ops for size in (1024, 1 << 20, 1 << 30)]
    data = {
        "mode": "collectives",
        "backend": "nccl",
        "world_size": n,
        "group": group,
        "group_size": n,
        "results": rows,
    }
    data.update(top)
    path = tmp_path / "comm.json"
    path.write_text(json.dumps(data))
    return path


def test_calibration_recovers_a_ring(tmp_path):
    measured = read_calibration(_bench(tmp_path))
    assert measured.link == "nvlink"
    # At 1 GiB the latency term is 15 us of ~40 ms: busbw within 0.1% of 20 GB/s.
    assert measured.bus_bandwidth_gbps == pytest.approx(20.0, rel=1e-3)
    # At 1 KiB: latency recovered after subtracting the bandwidth term.
    assert measured.latency_us == pytest.approx(5.0, rel=1e-2)


def test_calibration_replaces_the_right_link(tmp_path):
    cluster = load_cluster(H100)
    dp = apply_calibration(cluster, _bench(tmp_path, group="dp"))
    assert dp.infiniband.bus_bandwidth_gbps == pytest.approx(20.0, rel=1e-3)
    assert dp.nvlink == cluster.nvlink
    world = apply_calibration(cluster, _bench(tmp_path, group="world"))
    assert world.infiniband.bus_bandwidth_gbps == pytest.approx(20.0, rel=1e-3)


@pytest.mark.parametrize(
    "top, rows, message",
    [
        ({"mode": "throughput"}, None, "mode: expected 'collectives'"),
        ({"group": "pp"}, None, "group='pp'"),
        ({"group_size": 1}, None, "group_size=1"),
        ({}, [], "results: missing or empty"),
        ({}, [{"op": "broadcast", "bytes": 1, "time_us": 1, "busbw_gbps": 1}], "results[0].op"),
        ({}, [{"op": "all_gather", "bytes": 1, "time_us": 0, "busbw_gbps": 1}], "time_us=0"),
        (
            {},
            [{"op": "all_gather", "bytes": 1, "time_us": 1, "busbw_gbps": float("nan")}],
            "busbw_gbps=nan: must be a finite positive number",
        ),
    ],
)
def test_bad_calibration_files(tmp_path, top, rows, message):
    path = _bench(tmp_path, rows=rows, **top)
    with pytest.raises(UserError) as info:
        read_calibration(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_calibration_not_json(tmp_path):
    path = tmp_path / "comm.json"
    path.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_calibration(path)


# --- the dry run's memory estimate -------------------------------------------------------


def test_estimate_memory_gib_and_dry_run():
    config = load_config(DEMO)
    memory = estimate_memory_gib(config, 4)
    keys = {"weights", "grads", "optimizer", "activations", "workspace", "buffers", "reserved"}
    keys.add("total")
    assert set(memory) == keys
    assert memory["total"] == pytest.approx(sum(memory[k] for k in keys - {"total"}))
    report = describe(config, 4)
    assert report["memory_gib"] == memory
    with pytest.raises(ConfigError):
        estimate_memory_gib(config, 3)
