"""Process groups over gloo: membership, a tensor-parallel all-reduce, the device mesh."""

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ibxl.config import ParallelConfig
from megatron_ibxl.parallel import layout_table
from tests.helpers.dist import run_distributed


def _groups_and_sum(ctx):
    tp_members = dist.get_process_group_ranks(ctx.tp_group)
    dp_members = dist.get_process_group_ranks(ctx.dp_group)
    value = torch.tensor([float(ctx.rank + 1)])
    dist.all_reduce(value, group=parallel_state.get_tensor_model_parallel_group())
    mesh_tp = dist.get_process_group_ranks(ctx.mesh.get_group("tp"))
    mesh_dp = dist.get_process_group_ranks(ctx.mesh.get_group("dp"))
    return dict(
        tp=tp_members,
        dp=dp_members,
        sum=value.item(),
        mesh_tp=mesh_tp,
        mesh_dp=mesh_dp,
        coords=(ctx.pp_rank, ctx.dp_rank, ctx.tp_rank),
        table=layout_table(ctx),
    )


def _check(results, world_size, tp):
    for rank, out in enumerate(results):
        # Expected members from the rank formula: tensor parallel is the fastest dimension.
        first = rank - rank % tp
        expected_tp = list(range(first, first + tp))
        expected_dp = list(range(rank % tp, world_size, tp))
        assert out["tp"] == expected_tp == out["mesh_tp"]
        assert out["dp"] == expected_dp == out["mesh_dp"]
        # The all-reduce of (rank + 1) over the tp group sums those members' values.
        assert out["sum"] == sum(r + 1 for r in expected_tp)
        assert out["coords"] == (0, rank // tp, rank % tp)
        assert out["table"][rank] == (rank, 0, rank // tp, rank % tp)


def test_two_ranks_tp2(tmp_path):
    parallel = ParallelConfig(tp=2, backend="gloo", timeout_s=60)
    _check(run_distributed(_groups_and_sum, 2, tmp_path, parallel=parallel), 2, 2)


def test_four_ranks_tp2_dp2(tmp_path):
    parallel = ParallelConfig(tp=2, backend="gloo", timeout_s=60)
    _check(run_distributed(_groups_and_sum, 4, tmp_path, parallel=parallel), 4, 2)
