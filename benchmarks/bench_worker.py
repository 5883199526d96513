"""The worker side and the driver side of benchmarks/throughput.py's measurement processes.

A worker (this engine in one interpreter, open_clip in another) builds its model once, says
`READY`, then answers one request per stdin line:

    run          time --warmup then --steps training steps; answer `RESULT {json}`
    profile N    profile N steps with torch.profiler; answer `RESULT {"profile": table}`
    quit         (or end of input) exit

so the driver can alternate the two engines round after round without paying their start-up
(minutes on a loaded machine) each time. Needs torch only: it runs beside open_clip in
`.venv-bench` as well as in the engine's `.venv`.
"""

from __future__ import annotations

import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

READY = "READY"
RESULT_PREFIX = "RESULT "
"""A worker's answer: this prefix, then its JSON."""

StepFn = Callable[[int], dict]
"""One training step on saved batch k; returns seconds by phase (`fwd_bwd`, `optimizer`)."""


def load_batches(path: str) -> list[SimpleNamespace]:
    """The pre-decoded batches: each has images [B, c, H, W], tokens [B, L], lengths [B]."""
    saved = torch.load(path)
    return [
        SimpleNamespace(images=images, tokens=tokens, lengths=lengths)
        for images, tokens, lengths in zip(saved["images"], saved["tokens"], saved["lengths"])
    ]


def set_threads(threads: int) -> None:
    """Intra-op and inter-op threads of this process."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # only settable before any parallel work; intra-op is what counts
        pass


def time_steps(step: StepFn, steps: int, warmup: int) -> dict[str, list[float]]:
    """Run `step(k)` warmup + steps times; wall milliseconds of each measured step
    (`step_ms`) and of each phase the step reports (`<phase>_ms`), and the CPU milliseconds
    the process used in each step (`step_cpu_ms`, all its threads)."""
    for k in range(warmup):
        step(k)
    times: dict[str, list[float]] = {"step_ms": [], "step_cpu_ms": []}
    for k in range(warmup, warmup + steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        phases = step(k)
        times["step_ms"].append(1e3 * (time.perf_counter() - start))
        times["step_cpu_ms"].append(1e3 * (time.process_time() - start_cpu))
        for name, seconds in phases.items():
            times.setdefault(f"{name}_ms", []).append(1e3 * seconds)
    return times


def profile_table(step: StepFn, steps: int, row_limit: int = 25) -> str:
    """torch.profiler (CPU) over `steps` steps: operators sorted by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for k in range(steps):
            step(k)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)


def summarize(times: dict[str, list[float]], global_batch: int) -> dict:
    """Medians of the step and phase times; pairs per wall second and per CPU second of
    the process (which other processes on a shared machine disturb far less), from the
    median step."""
    medians = {key: statistics.median(values) for key, values in times.items()}
    return {
        "pairs_per_s": global_batch / (medians["step_ms"] / 1e3),
        "pairs_per_cpu_s": global_batch / (medians["step_cpu_ms"] / 1e3),
        "median_ms": medians,
        "step_ms": times["step_ms"],
    }


def emit_result(result: dict) -> None:
    """Answer the driver (one stdout line)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def serve(step: StepFn, steps: int, warmup: int, describe: Callable[[dict], dict]) -> None:
    """Answer `run`, `profile N` and `quit` requests on stdin (see the module doc);
    `describe(times)` turns a run's times into its result."""
    print(READY, flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        if words[0] == "run":
            emit_result(describe(time_steps(step, steps, warmup)))
        elif words[0] == "profile":
            emit_result({"profile": profile_table(step, int(words[1]))})
        else:
            emit_result({"error": f"unknown request {line.strip()!r}"})


def worker_env(root: Path, threads: int) -> dict[str, str]:
    """The environment of a worker: the checkout importable, the thread counts pinned, no
    launcher variables inherited."""
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS=str(threads))
    env["MKL_NUM_THREADS"] = str(threads)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


class WorkerProcess:
    """The driver's handle on one serving worker."""

    def __init__(self, name: str, command: list[str], root: Path, threads: int):
        self.name = name
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._lines: queue.Queue[str | None] = queue.Queue()
        try:
            self._proc = subprocess.Popen(
                command,
                cwd=root,
                env=worker_env(root, threads),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                text=True,
            )
        except OSError as error:
            self._proc, self.failure = None, f"{type(error).__name__}: {error}"
            return
        self.failure = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def wait_ready(self, timeout_s: float) -> bool:
        """True once the worker said READY; False (with `failure` set) if it died first."""
        return self._answer(READY, timeout_s) is not None

    def request(self, line: str, timeout_s: float) -> dict:
        """Send one request; its answer, or {"error": why} when the worker failed."""
        if self.failure:
            return {"error": self.failure}
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()
        answer = self._answer(RESULT_PREFIX, timeout_s)
        return json.loads(answer[len(RESULT_PREFIX) :]) if answer else {"error": self.failure}

    def _answer(self, prefix: str, timeout_s: float) -> str | None:
        if self.failure:
            return None
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                self.failure = f"no answer within {timeout_s:.0f} s"
                return None
            if line is None:
                self.failure = f"exit {self._proc.wait()}: {self._last_error()}"
                return None
            if line.startswith(prefix):
                return line

    def _last_error(self) -> str:
        self._stderr.seek(0)
        lines = [line.strip() for line in self._stderr.read().splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line or line.startswith("error")]
        return (errors or lines or [""])[-1]

    def close(self) -> None:
        """Ask the worker to quit, and end it if it does not."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write("quit\n")
                self._proc.stdin.close()
                self._proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._stderr.close()
