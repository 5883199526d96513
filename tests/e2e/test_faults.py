"""Faults during training: a rank that dies, and a pre-emption signal.

The 4 ranks are started as separate processes with the launcher's environment variables (as
srun does, with no torchrun agent that would kill the survivors for us), so the test sees
what each process does on its own: its exit code, its last words and when it stopped.
"""

import os
import signal
import time

import pytest
import torch

from megatron_ibxl.training.checkpoint import find_latest
from tests.e2e.train_helpers import (
    WORLD,
    checkpoint_steps,
    checkpoint_tensors,
    metrics_lines,
    rank_log,
    spawn_ranks,
    stop_all,
    tiny_overrides,
    torchrun,
    torchrun_popen,
    wait_for,
)

TIMEOUT_S = 20
"""parallel.timeout_s of these runs: the longest a survivor may wait for a dead peer."""


def _killed_run_overrides(run_dir):
    # The fallback loader: its augmentation is seeded per sample position, so a resumed run
    # sees the same pixels as an uninterrupted one (DALI's random stream restarts).
    return tiny_overrides(
        run_dir,
        schedule__total_steps=12,
        checkpoint__every_steps=2,
        eval__task="none",
        parallel__timeout_s=TIMEOUT_S,
        data__loader="torch",
    )


def test_killed_rank_ends_every_process_and_rerun_resumes(tmp_path):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    overrides = _killed_run_overrides(run_dir)
    procs = spawn_ranks(overrides, logs)
    try:
        wait_for(lambda: 4 in checkpoint_steps(run_dir), 180, procs, "checkpoint step_4")
        victim = 3
        procs[victim].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        # Every survivor must end by itself, non-zero, within the collective timeout (plus
        # slack for a loaded machine), never hang.
        for rank, proc in enumerate(procs):
            proc.wait(timeout=TIMEOUT_S + 60)
            if rank != victim:
                assert proc.returncode != 0, f"rank {rank} exited 0 after its peer died"
        assert time.monotonic() - killed_at < TIMEOUT_S + 60
    finally:
        stop_all(procs)

    for rank in range(WORLD):
        if rank == victim:
            continue
        log = rank_log(logs, rank)
        # The error names the rank that reports it, with its coordinates.
        assert f"[rank {rank}] ERROR" in log and f"rank {rank} (tp {rank % 2}" in log, log[-3000:]
        # ... in one line that says what happened and what to do, not a traceback.
        (error,) = [line for line in log.splitlines() if f"[rank {rank}] ERROR" in line]
        assert "a peer rank has probably died or hung" in error, error
        # ... naming the rank that died (rank 3 is tp 1, dp 1 in this 2 x 2 layout).
        assert "silent: rank 3 (tp 1, dp 1, pp 0) has stopped sending heartbeats" in error, error
        assert "rerun to resume from the last complete checkpoint" in error, error
        assert "Traceback" not in log.split(error, 1)[1], log[-3000:]

    # The rerun resumes from the last complete checkpoint and finishes.
    latest = find_latest(run_dir)
    assert latest is not None
    resumed_step = int(latest.name.removeprefix("step_"))
    assert resumed_step >= 4
    rerun = torchrun(overrides)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert f"resumed from {latest}" in rerun.stderr
    rows = metrics_lines(run_dir)
    assert [row["step"] for row in rows] == list(range(1, 13)), rows  # lines past it rewritten

    # Against the same run never interrupted: every logged loss and gradient norm, before
    # and after the resume, and every tensor of the final checkpoint (weights and AdamW
    # moments) are identical.
    reference_dir = tmp_path / "reference"
    reference = torchrun(_killed_run_overrides(reference_dir))
    assert reference.returncode == 0, reference.stderr[-4000:]
    expected = metrics_lines(reference_dir)
    for key in ("loss", "grad_norm", "lr"):
        assert [row[key] for row in rows] == [row[key] for row in expected], key
    resumed = checkpoint_tensors(run_dir / "checkpoints" / "step_12", tmp_path)
    uninterrupted = checkpoint_tensors(reference_dir / "checkpoints" / "step_12", tmp_path)
    assert resumed.keys() == uninterrupted.keys()
    tensors = [k for k, v in uninterrupted.items() if isinstance(v, torch.Tensor)]
    assert any(k.startswith("model/") for k in tensors), sorted(uninterrupted)[:5]
    differing = [k for k in tensors if not torch.equal(resumed[k], uninterrupted[k])]
    assert not differing, differing


def test_hung_rank_ends_every_other_process_within_the_timeout(tmp_path):
    # A stopped process keeps its sockets open, so its peers get no connection error: only
    # the collective timeout and the watchdog (parallel.timeout_s) can end their wait.
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    overrides = tiny_overrides(
        run_dir,
        schedule__total_steps=200,
        checkpoint__every_steps=0,
        eval__task="none",
        parallel__timeout_s=TIMEOUT_S,
    )
    procs = spawn_ranks(overrides, logs)
    victim = 3
    try:
        wait_for(lambda: len(metrics_lines(run_dir)) >= 2, 180, procs, "two logged steps")
        procs[victim].send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        for rank, proc in enumerate(procs):
            if rank != victim:
                proc.wait(timeout=TIMEOUT_S + 60)
                assert proc.returncode != 0, f"rank {rank} exited 0 while its peer hung"
        waited_s = time.monotonic() - stopped_at
    finally:
        stop_all(procs)

    # Slack over the timeout: the watchdog polls every 0.5 s, and a loaded machine is slow.
    assert waited_s < TIMEOUT_S + 30, waited_s
    for rank in range(WORLD):
        if rank != victim:
            log = rank_log(logs, rank)
            assert f"[rank {rank}] ERROR" in log and f"rank {rank} (tp {rank % 2}" in log, log[
                -3000:
            ]
            # The stopped rank is named: its heartbeat thread stopped with it.
            assert "silent: rank 3 (tp 1, dp 1, pp 0) has stopped" in log, log[-3000:]


def test_sigterm_checkpoints_and_exits_zero(tmp_path):
    # SIGUSR1 (SLURM's pre-emption warning) takes the same path; the unit test of the stop
    # flag covers that it is caught.
    signum = signal.SIGTERM
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    overrides = tiny_overrides(
        run_dir, schedule__total_steps=200, checkpoint__every_steps=0, eval__task="none"
    )
    procs = spawn_ranks(overrides, logs)
    try:
        wait_for(lambda: len(metrics_lines(run_dir)) >= 2, 180, procs, "two logged steps")
        # Signal one rank only: the stop flag is all-reduced, so every rank stops together.
        procs[2].send_signal(signum)
        codes = [proc.wait(timeout=120) for proc in procs]
    finally:
        stop_all(procs)

    assert codes == [0] * WORLD, [rank_log(logs, r)[-2000:] for r in range(WORLD)]
    last_step = metrics_lines(run_dir)[-1]["step"]
    assert 2 <= last_step < 200
    # checkpoint.every_steps=0: the only checkpoint is the one the signal asked for.
    assert checkpoint_steps(run_dir) == [last_step]
    assert f"received {signal.Signals(signum).name}" in rank_log(logs, 2)
    for rank in range(WORLD):
        assert f"checkpointed step {last_step}, exiting 0" in rank_log(logs, rank)


@pytest.mark.parametrize("how", ["kill -TERM", "Ctrl-C"])
def test_a_stop_sent_to_the_launch_script_checkpoints_and_exits_zero(tmp_path, how):
    # What a user's `kill` or a scheduler does to the job's launcher (SIGTERM to the script),
    # and what a terminal's Ctrl-C does (SIGINT to the script's whole process group):
    # launch/torchrun.sh passes the signal to the training processes, once, instead of
    # letting torchrun kill them.
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        run_dir, schedule__total_steps=200, checkpoint__every_steps=0, eval__task="none"
    )
    launcher = torchrun_popen(overrides, nproc=2, log=tmp_path / "launcher.log")
    try:
        wait_for(lambda: len(metrics_lines(run_dir)) >= 2, 180, [launcher], "two logged steps")
        if how == "Ctrl-C":
            os.killpg(launcher.pid, signal.SIGINT)
        else:
            launcher.send_signal(signal.SIGTERM)
        code = launcher.wait(timeout=120)
    finally:
        stop_all([launcher])

    log = (tmp_path / "launcher.log").read_text()
    assert code == 0, log[-3000:]
    last_step = metrics_lines(run_dir)[-1]["step"]
    assert 2 <= last_step < 200
    assert checkpoint_steps(run_dir) == [last_step]
    assert f"checkpointed step {last_step}, exiting 0" in log
