"""`plan --calibrate FILE`: replace a cluster link's constants by measured ones.

FILE is the JSON that `benchmarks/comm_overhead.py collectives --out FILE` writes:

    {"mode": "collectives", "backend": "gloo" | "nccl", "world_size": N,
     "group": "world" | "tp" | "dp", "group_size": n,
     "results": [{"op": "all_gather" | "reduce_scatter" | "all_reduce", "bytes": int,
                  "time_us": float, "algbw_gbps": float, "busbw_gbps": float}, ...]}

Group `tp` describes the NVLink link, `dp` and `world` the InfiniBand link. The bus bandwidth
is the mean busbw over the ops at the largest size measured (where the ring is bandwidth
bound); the per-step latency is the median over the ops at the smallest size of the time
left after the bandwidth term, divided by the ring steps of the op ((n - 1), or 2 (n - 1)
for all-reduce), matching Link.ring_time_s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from megatron_ibxl.errors import UserError
from megatron_ibxl.planning.cluster import Cluster, Link

logger = logging.getLogger(__name__)

_OPS = ("all_gather", "reduce_scatter", "all_reduce")
_LINK_OF_GROUP = {"tp": "nvlink", "dp": "infiniband", "world": "infiniband"}


@dataclass(frozen=True)
class Calibration:
    """What a benchmark file says about one link."""

    link: str
    """`nvlink` or `infiniband`."""
    bus_bandwidth_gbps: float
    """Mean busbw at the largest size, GB/s."""
    latency_us: float
    """Per ring step, microseconds."""
    backend: str
    """`gloo` or `nccl`: gloo numbers describe CPUs and sockets, not GPU links."""
    group_size: int
    """Ranks of the measured group."""


def _fail(path: Path, what: str) -> UserError:
    return UserError(
        f"{path}: {what}; pass the JSON written by "
        "`python -m benchmarks.comm_overhead collectives --out FILE`"
    )


def _rows(path: Path, data: dict) -> list[dict]:
    results = data.get("results")
    if not isinstance(results, list) or not results:
        raise _fail(path, "results: missing or empty")
    for index, row in enumerate(results):
        if not isinstance(row, dict) or row.get("op") not in _OPS:
            raise _fail(path, f"results[{index}].op: must be one of {', '.join(_OPS)}")
        for key in ("bytes", "time_us", "busbw_gbps"):
            value = row.get(key)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or value <= 0:
                raise _fail(
                    path, f"results[{index}].{key}={value!r}: must be a finite positive number"
                )
    return results


def read_calibration(path: str | Path) -> Calibration:
    """Parse and check a collective benchmark JSON file.

    Raises UserError naming the file and the key for a missing file, invalid JSON, another
    mode, an unknown group, a group of fewer than 2 ranks, or a malformed result row.
    """
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "calibration file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _fail(path, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("mode") != "collectives":
        raise _fail(path, "mode: expected 'collectives'")
    group, size = data.get("group"), data.get("group_size")
    if group not in _LINK_OF_GROUP:
        raise _fail(path, f"group={group!r}: must be one of tp, dp, world")
    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise _fail(path, f"group_size={size!r}: must be an integer >= 2")
    rows = _rows(path, data)

    largest = max(row["bytes"] for row in rows)
    busbw = statistics.fmean(row["busbw_gbps"] for row in rows if row["bytes"] == largest)
    smallest = min(row["bytes"] for row in rows)
    latencies = []
    for row in (r for r in rows if r["bytes"] == smallest):
        steps = (size - 1) * (2 if row["op"] == "all_reduce" else 1)
        wire_s = row["bytes"] * steps / size / (busbw * 1e9)
        latencies.append(max(0.0, row["time_us"] * 1e-6 - wire_s) / steps * 1e6)
    return Calibration(
        link=_LINK_OF_GROUP[group],
        bus_bandwidth_gbps=busbw,
        latency_us=statistics.median(latencies),
        backend=str(data.get("backend", "unknown")),
        group_size=size,
    )


def apply_calibration(cluster: Cluster, path: str | Path) -> Cluster:
    """`cluster` with the link measured in `path` replaced by the measured constants."""
    measured = read_calibration(path)
    if measured.backend != "nccl":
        logger.warning(
            "%s was measured with backend %s: its bandwidths describe that machine's "
            "processes, not GPU links; the plan uses them as given",
            path,
            measured.backend,
        )
    link = Link(measured.bus_bandwidth_gbps, measured.latency_us)
    logger.info(
        "calibrated %s from %s: bus bandwidth %.3f GB/s, latency %.2f us per ring step",
        measured.link,
        path,
        link.bus_bandwidth_gbps,
        link.latency_us,
    )
    return dataclasses.replace(cluster, **{measured.link: link})
