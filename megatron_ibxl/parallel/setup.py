"""Start and stop the process groups of a run.

Rank layout (Megatron-core's default order, tensor parallel fastest):

    global rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

Worked example, 8 ranks with tp=2, pp=1 (dp=4):

    tp groups: [0, 1] [2, 3] [4, 5] [6, 7]      (one node's NVLink domain in practice)
    dp groups: [0, 2, 4, 6] [1, 3, 5, 7]        (across nodes, over InfiniBand)

The torch DeviceMesh has dimensions ("pp", "dp", "tp") over the same ranks, so FSDP2 over
`mesh["dp"]` shards across exactly Megatron-core's data-parallel groups.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megatron_ibxl.config import ParallelConfig
from megatron_ibxl.errors import LaunchError
from megatron_ibxl.parallel.launcher_env import LaunchEnv, detect_launch_env, resolve_mpi_master
from megatron_ibxl.parallel.rng import install_cpu_rng_tracker

logger = logging.getLogger(__name__)


@dataclass
class ParallelContext:
    """What a process knows about the layout once the groups are up."""

    rank: int
    """Global rank."""
    world_size: int
    """Processes in the job."""
    local_rank: int
    """Rank on this node."""
    tp: int
    """Tensor-parallel size."""
    pp: int
    """Pipeline-parallel size."""
    dp: int
    """Data-parallel size."""
    tp_rank: int
    """This process's coordinate in its tensor-parallel group."""
    pp_rank: int
    """This process's pipeline stage."""
    dp_rank: int
    """This process's coordinate in its data-parallel group."""
    device: torch.device
    """`cuda:<local_rank>` with nccl, `cpu` with gloo."""
    mesh: DeviceMesh
    """Device mesh with named dimensions ("pp", "dp", "tp")."""
    backend: str
    """`nccl` or `gloo`."""

    @property
    def tp_group(self) -> dist.ProcessGroup:
        """Megatron-core's tensor-parallel group of this rank."""
        return parallel_state.get_tensor_model_parallel_group()

    @property
    def dp_group(self) -> dist.ProcessGroup:
        """Megatron-core's data-parallel group of this rank."""
        return parallel_state.get_data_parallel_group()

    @property
    def owns_metrics(self) -> bool:
        """True on the rank that logs replicated values: first tp rank, last pp stage, dp 0."""
        return self.tp_rank == 0 and self.pp_rank == self.pp - 1 and self.dp_rank == 0


def choose_backend(requested: str) -> str:
    """`nccl` when CUDA is present (or asked for), else `gloo`."""
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_parallel(
    parallel: ParallelConfig,
    seed: int = 0,
    launch: LaunchEnv | None = None,
    init_method: str | None = None,
) -> ParallelContext:
    """Start the default process group, Megatron-core's parallel state and the device mesh.

    Args:
        parallel: the layout (tp, pp, backend, collective timeout).
        seed: seed of the default generator and of the model-parallel RNG tracker.
        launch: the process's place in the job; read from the environment when None.
        init_method: a rendezvous URL (`file://...` in tests); TCP to the master otherwise.

    Raises RuntimeError when the world size does not divide by tp * pp, and LaunchError
    when the rendezvous fails (its port taken, its master unreachable).
    """
    launch = resolve_mpi_master(launch or detect_launch_env())
    backend = choose_backend(parallel.backend)
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank)
    if init_method is None:
        init_method = f"tcp://{launch.master_addr}:{launch.master_port}"
    timeout = datetime.timedelta(seconds=parallel.timeout_s)
    if not dist.is_initialized():
        try:
            dist.init_process_group(
                backend,
                init_method=init_method,
                rank=launch.rank,
                world_size=launch.world_size,
                timeout=timeout,
            )
        except (dist.DistNetworkError, dist.DistStoreError) as exc:
            raise _rendezvous_error(exc, init_method, parallel.timeout_s) from None

    # Megatron-core groups first, then a mesh over the same ranks in the same order.
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        distributed_timeout_minutes=max(1, int(parallel.timeout_s // 60)),
        create_gloo_process_groups=False,
    )
    dp = launch.world_size // (parallel.tp * parallel.pp)
    device_type = "cuda" if backend == "nccl" else "cpu"
    mesh = init_device_mesh(
        device_type, (parallel.pp, dp, parallel.tp), mesh_dim_names=("pp", "dp", "tp")
    )

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if backend == "gloo":
        install_cpu_rng_tracker(seed, tp_rank)
    else:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
    device = torch.device(f"cuda:{launch.local_rank}") if backend == "nccl" else torch.device("cpu")
    return ParallelContext(
        rank=launch.rank,
        world_size=launch.world_size,
        local_rank=launch.local_rank,
        tp=parallel.tp,
        pp=parallel.pp,
        dp=dp,
        tp_rank=tp_rank,
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=device,
        mesh=mesh,
        backend=backend,
    )


def _rendezvous_error(exc: Exception, init_method: str, timeout_s: float) -> LaunchError:
    """One line for a rendezvous that failed: the address, the cause, what to change."""
    text = str(exc)
    if "EADDRINUSE" in text or "address already in use" in text.lower():
        return LaunchError(
            f"rendezvous {init_method}: the port is already in use (another job on this "
            "host?); set MASTER_PORT to a free port"
        )
    cause = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return LaunchError(
        f"rendezvous {init_method}: could not join within parallel.timeout_s={timeout_s:g} "
        f"({cause}); check MASTER_ADDR and MASTER_PORT, and that rank 0 has started"
    )


def layout_table(ctx: ParallelContext) -> list[tuple[int, int, int, int]]:
    """(global rank, pp, dp, tp) for every rank, from the rank formula in the module doc."""
    rows = []
    for rank in range(ctx.world_size):
        tp_rank = rank % ctx.tp
        dp_rank = (rank // ctx.tp) % ctx.dp
        pp_rank = rank // (ctx.tp * ctx.dp)
        rows.append((rank, pp_rank, dp_rank, tp_rank))
    return rows


def shutdown_parallel() -> None:
    """Destroy Megatron-core's groups and the default group; safe to call twice."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
