"""`megatron-ibxl plan`: one layout's prediction, or a ranked search of layouts.

megatron-ibxl plan --config FILE --cluster FILE [--json] [--set k=v ...]
megatron-ibxl plan --config FILE --cluster FILE --search [--json]
megatron-ibxl plan --config FILE --cluster FILE --calibrate comm.json [--json]
"""

from __future__ import annotations

import json
import logging
import sys

from megatron_ibxl.config import load_config
from megatron_ibxl.planning.calibrate import apply_calibration
from megatron_ibxl.planning.cluster import load_cluster
from megatron_ibxl.planning.plan import plan_layout
from megatron_ibxl.planning.report import format_plan, plan_to_dict
from megatron_ibxl.planning.search import explain, search_layouts

logger = logging.getLogger(__name__)

SHOWN = 5
"""Layouts printed by --search."""


def _search_output(config, cluster, as_json: bool) -> str:
    result = search_layouts(config, cluster)
    best = result.ranked[:SHOWN]
    header = (
        f"{result.considered} valid layouts on {cluster.world_size} GPUs, "
        f"{result.rejected_memory} do not fit in {cluster.gpu_memory_gib:g} GiB, "
        f"{len(result.ranked)} ranked by predicted step time"
    )
    if as_json:
        rows = [
            dict(plan_to_dict(p), rank=i + 1, reason=explain(p, best[0]))
            for i, p in enumerate(best)
        ]
        return json.dumps(
            {
                "considered": result.considered,
                "rejected_memory": result.rejected_memory,
                "fitting": len(result.ranked),
                "best": rows,
            },
            indent=2,
        )
    if not best:
        return header + "\nno layout fits; add GPUs or lower the global batch"
    blocks = [header]
    for rank, plan in enumerate(best, start=1):
        blocks.append(f"#{rank}  {explain(plan, best[0])}\n{format_plan(plan)}")
    return "\n\n".join(blocks)


def run(args) -> int:
    """Plan `args.config` on `args.cluster` (or search layouts) and print the report.

    Raises ConfigError or UserError (one line each, exit 2 from the CLI) for a bad config,
    cluster file, calibration file, or a layout that does not divide the cluster.
    """
    config = load_config(args.config, args.overrides)
    cluster = load_cluster(args.cluster)
    if args.calibrate:
        cluster = apply_calibration(cluster, args.calibrate)
    if args.search:
        print(_search_output(config, cluster, args.json), file=sys.stdout)
        return 0
    plan = plan_layout(config, cluster)
    if args.json:
        print(json.dumps(plan_to_dict(plan), indent=2), file=sys.stdout)
    else:
        print(format_plan(plan), file=sys.stdout)
    return 0
