"""Rank, world size, local rank and rendezvous from each launcher's variables."""

from megatron_ibxl.parallel.launcher_env import detect_launch_env, first_slurm_host


def test_torchrun():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "node0",
        "MASTER_PORT": "1234",
    }
    launch = detect_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank) == (3, 8, 1)
    assert (launch.master_addr, launch.master_port, launch.launcher) == ("node0", 1234, "torchrun")


def test_openmpi():
    env = {
        "OMPI_COMM_WORLD_RANK": "5",
        "OMPI_COMM_WORLD_SIZE": "16",
        "OMPI_COMM_WORLD_LOCAL_RANK": "5",
        "MASTER_ADDR": "h0",
    }
    launch = detect_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (
        5,
        16,
        5,
        "openmpi",
    )


def test_mpich_pmi():
    env = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0"}
    launch = detect_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (
        2,
        4,
        0,
        "mpich",
    )
    # Without MASTER_ADDR the MPI path asks rank 0 for its host over MPI.
    assert launch.master_addr == ""


def test_slurm():
    env = {
        "SLURM_PROCID": "9",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[007-008]",
    }
    launch = detect_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank) == (9, 16, 1)
    assert launch.master_addr == "gpu007" and launch.launcher == "slurm"


def test_no_launcher():
    launch = detect_launch_env({})
    assert (launch.rank, launch.world_size, launch.launcher) == (0, 1, "none")


def test_slurm_host_lists():
    assert first_slurm_host("a01,a02") == "a01"
    assert first_slurm_host("gpu[3,5-9]") == "gpu3"
    assert first_slurm_host("single") == "single"
