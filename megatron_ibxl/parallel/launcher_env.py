"""Where this process sits in the job, read from the launcher's environment.

Launchers recognised, in order: torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), Open MPI (OMPI_COMM_WORLD_*), MPICH / Intel MPI / PMI (PMI_RANK, PMI_SIZE,
MPI_LOCALRANKID or PMI_LOCAL_RANK), and SLURM srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
SLURM_JOB_NODELIST). Without any of them the process is a job of one.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    """The process's place in the job and how to reach the rendezvous."""

    rank: int
    """Global rank, 0 .. world_size - 1."""
    world_size: int
    """Number of processes in the job."""
    local_rank: int
    """Rank among the processes of this node (selects the GPU)."""
    master_addr: str
    """Host of rank 0, where the TCP rendezvous listens."""
    master_port: int
    """Port of the TCP rendezvous."""
    launcher: str
    """`torchrun`, `openmpi`, `mpich`, `slurm` or `none`."""


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int | None:
    for name in names:
        if env.get(name, "") != "":
            try:
                return int(env[name])
            except ValueError:
                raise ValueError(
                    f"environment variable {name}={env[name]!r}: expected an "
                    "integer; check the launcher"
                ) from None
    return default


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `gpu[003-005,9],cpu1` -> `gpu003`."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        return "127.0.0.1"
    prefix, ranges = head.group(1), head.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def detect_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read rank, world size, local rank and rendezvous from the launcher's variables."""
    env = os.environ if env is None else env
    port = _int(env, "MASTER_PORT", default=DEFAULT_PORT)
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            _int(env, "RANK"),
            _int(env, "WORLD_SIZE"),
            _int(env, "LOCAL_RANK", default=0),
            env.get("MASTER_ADDR", "127.0.0.1"),
            port,
            "torchrun",
        )
    if "OMPI_COMM_WORLD_RANK" in env:
        return LaunchEnv(
            _int(env, "OMPI_COMM_WORLD_RANK"),
            _int(env, "OMPI_COMM_WORLD_SIZE"),
            _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", default=0),
            env.get("MASTER_ADDR", ""),
            port,
            "openmpi",
        )
    if "PMI_RANK" in env:
        return LaunchEnv(
            _int(env, "PMI_RANK"),
            _int(env, "PMI_SIZE"),
            _int(env, "MPI_LOCALRANKID", "PMI_LOCAL_RANK", default=0),
            env.get("MASTER_ADDR", ""),
            port,
            "mpich",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", ""))
        addr = env.get("MASTER_ADDR") or (first_slurm_host(nodelist) if nodelist else "127.0.0.1")
        return LaunchEnv(
            _int(env, "SLURM_PROCID"),
            _int(env, "SLURM_NTASKS"),
            _int(env, "SLURM_LOCALID", default=0),
            addr,
            port,
            "slurm",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", port, "none")


def resolve_mpi_master(launch: LaunchEnv) -> LaunchEnv:
    """Under mpirun without MASTER_ADDR, broadcast rank 0's host name over MPI."""
    if launch.master_addr or launch.launcher not in ("openmpi", "mpich"):
        return launch
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError(
            "launched by mpirun without MASTER_ADDR and mpi4py is not "
            "installed; export MASTER_ADDR=<host of rank 0>"
        ) from None
    host = socket.gethostname() if launch.rank == 0 else None
    host = MPI.COMM_WORLD.bcast(host, root=0)
    return LaunchEnv(
        launch.rank, launch.world_size, launch.local_rank, host, launch.master_port, launch.launcher
    )
