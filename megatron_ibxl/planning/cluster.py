"""Cluster description files (`launch/clusters/*.yaml`): schema, loading and validation.

A cluster file gives the planner everything it knows about the hardware: how many GPUs, how
much memory each has, how fast they compute, and two links, `nvlink` (inside a node; tensor
parallelism) and `infiniband` (between nodes; data and pipeline parallelism). Every value is
a plain number a user can look up or measure; each key is documented on the dataclass field
that holds it. Collective times follow the ring model (Thakur, Rabenseifner and Gropp 2005,
"Optimization of Collective Communication Operations in MPICH"):

    all-gather, reduce-scatter:  t = (n - 1) * latency + bytes * (n - 1) / n / busbw
    all-reduce:                  t = 2 (n - 1) * latency + bytes * 2 (n - 1) / n / busbw

with `bytes` the full buffer and busbw the bus bandwidth as nccl-tests defines it, so that a
measured busbw (benchmarks/comm_overhead.py, or nccl-tests) can be pasted in unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_ibxl.config import ConfigError


@dataclass(frozen=True)
class Link:
    """One kind of interconnect, as a ring collective over it sees it."""

    bus_bandwidth_gbps: float
    """Achieved bus bandwidth in GB/s (1e9 bytes/s) for large all-gathers and
    reduce-scatters, as nccl-tests reports busbw. Must be > 0."""
    latency_us: float
    """Time of one ring step in microseconds (a small-message collective over n ranks takes
    about (n - 1) * latency_us). Must be >= 0."""

    def ring_time_s(self, op: str, num_bytes: float, ranks: int) -> float:
        """Seconds of one ring collective over `ranks` ranks moving a `num_bytes` full buffer
        (the all-gather output, the reduce-scatter input, the all-reduce buffer); `p2p` is
        one point-to-point transfer of `num_bytes`."""
        if op == "p2p":
            return self.latency_us * 1e-6 + num_bytes / (self.bus_bandwidth_gbps * 1e9)
        if ranks <= 1 or num_bytes <= 0:
            return 0.0
        steps = (ranks - 1) * (2 if op == "all_reduce" else 1)
        wire_bytes = num_bytes * steps / ranks
        return steps * self.latency_us * 1e-6 + wire_bytes / (self.bus_bandwidth_gbps * 1e9)


@dataclass(frozen=True)
class OverlapModel:
    """Constants of the overlap model that are judgement, not datasheet: see
    megatron_ibxl/planning/comm.py for how they enter the exposed time."""

    tp_residual_fraction: float = 0.1
    """Fraction of a tensor-parallel collective that stays exposed even when a large enough
    GEMM runs beside it. The chunked ring-exchange overlap of Transformer Engine cannot hide
    its last chunk of a reduce-scatter (1/tp of it, 12.5% at tp=8; an all-gather's first
    chunk is local and costs nothing), and the communication kernels take SMs from the GEMM
    (a few percent). 0.1 is the mean of those; in [0, 1]."""
    dp_prefetch_layers: int = 1
    """Layers whose ZeRO-3 all-gather may be in flight ahead of the layer computing (FSDP2's
    default forward/backward prefetch is 1). Bounds the gathered-parameter buffers. >= 1."""


@dataclass(frozen=True)
class Cluster:
    """A GPU cluster as the planner sees it."""

    name: str
    """A label for reports."""
    num_nodes: int
    """Nodes in the job. >= 1."""
    gpus_per_node: int
    """GPUs per node, all on one NVLink domain. Tensor parallelism stays inside a node."""
    gpu_memory_gib: float
    """Memory per GPU the job may use, GiB (2^30 bytes), as nvidia-smi reports it."""
    reserved_memory_gib: float
    """Memory per GPU taken by what the planner does not model tensor by tensor: the CUDA
    context, NCCL and Transformer Engine communication buffers, allocator fragmentation.
    GiB, >= 0."""
    peak_bf16_tflops: float
    """Dense bf16 tensor-core peak per GPU in TFLOP/s (datasheet, without sparsity)."""
    achievable_flops_fraction: float
    """Fraction of the bf16 peak that a whole transformer layer sustains (GEMMs, attention
    and the memory-bound elementwise work together). Sets compute time. In (0, 1]."""
    gemm_flops_fraction: float
    """Fraction of peak a single large bf16 GEMM sustains. Sets how long a GEMM runs beside
    the collective it hides (a faster GEMM hides less). In (0, 1]."""
    nvlink: Link
    """The intra-node link (tensor parallelism; data parallelism when a dp group fits in a
    node)."""
    infiniband: Link
    """The inter-node link, per GPU (rail-optimised: one NIC per GPU)."""
    gemm_half_rows: int = 128
    """Rows (tokens, s * b) of a GEMM at which it reaches half of its large-size rate: the
    rate of a pass over M rows is fraction * peak * M / (M + gemm_half_rows), so that small
    micro-batches, which fill few tiles and waves of the GPU, are not planned at full speed.
    A rough fit of H100 bf16 GEMMs with k, n of a few thousand. >= 0."""
    layer_floor_us: float = 40.0
    """Shortest time of one layer's forward in microseconds (twice that for its backward):
    the kernel launches and framework work of a layer, which the GPU cannot go below when
    the micro-batch is tiny. >= 0."""
    peak_fp32_tflops: float = 0.0
    """Dense fp32 peak per GPU in TFLOP/s, used when optimizer.precision is fp32. 0 when
    unknown (planning an fp32 run on this cluster is then an error)."""
    attention_kernel: Literal["flash", "math"] = "flash"
    """`flash`: attention keeps only its inputs, output and a log-sum-exp for backward
    (FlashAttention-2, and torch SDPA's fused kernels). `math`: the softmax [n, s, s] per
    sample is kept too."""
    overlap: OverlapModel = field(default_factory=OverlapModel)
    """Judgement constants of the overlap model."""

    @property
    def world_size(self) -> int:
        """GPUs in the job."""
        return self.num_nodes * self.gpus_per_node

    def peak_flops(self, precision: str) -> float:
        """Dense peak FLOP/s per GPU for the compute dtype."""
        return (self.peak_bf16_tflops if precision == "bf16" else self.peak_fp32_tflops) * 1e12

    def flops_per_s(self, precision: str, rows: float, gemm: bool = False) -> float:
        """Sustained FLOP/s of work over `rows` tokens: a whole layer, or (`gemm`) one GEMM
        alone."""
        fraction = self.gemm_flops_fraction if gemm else self.achievable_flops_fraction
        return self.peak_flops(precision) * fraction * rows / (rows + self.gemm_half_rows)


_RANGES: dict[str, tuple[float, float, bool]] = {
    # key: (low, high, low_inclusive)
    "num_nodes": (1, float("inf"), True),
    "gpus_per_node": (1, float("inf"), True),
    "gpu_memory_gib": (0, float("inf"), False),
    "reserved_memory_gib": (0, float("inf"), True),
    "peak_bf16_tflops": (0, float("inf"), False),
    "peak_fp32_tflops": (0, float("inf"), True),
    "achievable_flops_fraction": (0, 1, False),
    "gemm_flops_fraction": (0, 1, False),
    "bus_bandwidth_gbps": (0, float("inf"), False),
    "latency_us": (0, float("inf"), True),
    "tp_residual_fraction": (0, 1, True),
    "gemm_half_rows": (0, float("inf"), True),
    "layer_floor_us": (0, float("inf"), True),
    "dp_prefetch_layers": (1, float("inf"), True),
}


def load_cluster(path: str | Path) -> Cluster:
    """Read and check a cluster YAML file.

    Raises ConfigError, one line per problem naming the file, the dotted key and a fix, for
    a missing file, invalid YAML, a missing or unknown key, a wrong type or a value out of
    range (a missing bandwidth, for example).
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a cluster file; pass a YAML file")
    if not path.is_file():
        raise ConfigError(f"{path}: cluster file not found; pass one of launch/clusters/*.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        reason = exc.__class__.__name__
        raise ConfigError(f"{path}: not valid YAML text ({reason}); fix the file") from None
    problems: list[str] = []
    cluster = _build(Cluster, raw, "", problems, str(path))
    if problems:
        raise ConfigError(problems)
    return cluster


def _build(cls: type, raw: Any, prefix: str, problems: list[str], source: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, recording every problem by dotted key."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        problems.append(f"{source}: {where} must be a mapping of keys, got {raw!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            problems.append(
                f"{source}: {prefix}{key}: unknown key; valid keys: {', '.join(sorted(fields))}"
            )
    kwargs = {}
    for name, spec in fields.items():
        key = f"{prefix}{name}"
        has_default = spec.default is not dataclasses.MISSING or (
            spec.default_factory is not dataclasses.MISSING
        )
        if name not in raw:
            if not has_default:
                problems.append(f"{source}: {key} is missing; {_hint(name)}")
            continue
        kwargs[name] = _coerce(hints[name], raw[name], key, problems, source)
    if any(v is None for v in kwargs.values()) or len(problems):
        return None
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str, problems: list[str], source: str) -> Any:
    name = key.rsplit(".", 1)[-1]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", problems, source)
    if typing.get_origin(hint) is Literal:
        if value not in typing.get_args(hint):
            shown = ", ".join(repr(a) for a in typing.get_args(hint))
            problems.append(f"{source}: {key}={value!r}: must be one of {shown}")
        return value
    if hint is str:
        return str(value)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or (hint is int and not isinstance(value, int)):
        problems.append(f"{source}: {key}={value!r}: expected {hint.__name__}; {_hint(name)}")
        return None
    low, high, inclusive = _RANGES[name]
    if not math.isfinite(value):
        problems.append(f"{source}: {key}={value!r}: must be a finite number; {_hint(name)}")
        return None
    if value > high or value < low or (value == low and not inclusive):
        bound = f"{'>=' if inclusive else '>'} {low:g}" + (
            f" and <= {high:g}" if high != float("inf") else ""
        )
        problems.append(f"{source}: {key}={value!r}: must be {bound}")
    return hint(value)


def _hint(name: str) -> str:
    """What a missing or mistyped key should hold."""
    hints = {
        "bus_bandwidth_gbps": "give the achieved bus bandwidth in GB/s (nccl-tests busbw, or "
        "run benchmarks/comm_overhead.py and pass --calibrate)",
        "latency_us": "give the per-ring-step latency in microseconds",
        "nvlink": "add a nvlink: {bus_bandwidth_gbps, latency_us} section",
        "infiniband": "add an infiniband: {bus_bandwidth_gbps, latency_us} section",
    }
    return hints.get(name, "see launch/clusters/h100-ndr400.yaml for the schema")
