"""Stopping a run cleanly, and never hanging when a peer rank dies.

Two mechanisms live here:

- `StopSignal`: SIGTERM and SIGUSR1 (SLURM pre-emption, `#SBATCH --signal=USR1@300`, and
  torchrun forwarding its own SIGTERM) only set a flag; so does a first SIGINT (Ctrl-C), and
  a second one, a moment later, aborts without a checkpoint. The loop asks `should_stop()` at
  every step boundary; the flag is all-reduced (MAX) over the whole world, so when any rank
  was signalled every rank stops after the same step, writes the checkpoint and exits 0.
- `Watchdog`: a daemon thread that ends the process with an error naming this rank when a
  phase (a training step, an evaluation, a checkpoint write) runs past `parallel.timeout_s`.
  Gloo and NCCL already time out a single collective after that many seconds; the watchdog
  also catches a stall between collectives and a collective library that does not honour its
  timeout, so a dead or hung peer can never leave the job silently waiting.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from megatron_ibxl import stop_request
from megatron_ibxl.stop_request import STOP_SIGNALS

logger = logging.getLogger(__name__)


EXIT_HUNG = 3
"""Exit code of a process ended by the watchdog."""

SIGINT_REPEAT_S = 1.0
"""A SIGINT this long after the first stop signal aborts; sooner, it is the same Ctrl-C
delivered twice (by the terminal and by a launcher that forwards it) and changes nothing."""


class StopSignal:
    """A flag set by SIGTERM / SIGUSR1 and agreed on by every rank at step boundaries."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._received_at = float("-inf")
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Route the stop signals and SIGINT to this flag (main thread only, as Python
        requires); a signal caught earlier by `stop_request.catch_early` counts as
        received."""
        for signum in (*STOP_SIGNALS, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        self.received = self.received or stop_request.received

    def uninstall(self) -> None:
        """Restore the handlers that were in place before `install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame) -> None:
        now = time.monotonic()
        if self.received is None:
            self.received, self._received_at = signal.Signals(signum).name, now
            again = " (Ctrl-C again to abort without one)" if signum == signal.SIGINT else ""
            # Not through logging: a handler may interrupt a logging call holding its lock.
            sys.stderr.write(
                f"received {self.received}; stopping after the current step with a "
                f"checkpoint{again}\n"
            )
        elif signum == signal.SIGINT and now - self._received_at > SIGINT_REPEAT_S:
            raise KeyboardInterrupt

    def should_stop(self, device: torch.device) -> bool:
        """True on every rank when any rank has received a stop signal.

        One all-reduce of a single element over the default (world) group; collective, so
        every rank must call it at the same step.
        """
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # [1] -> [1], over the world
        return bool(flag.item() > 0)


class Watchdog:
    """End the process, with an error naming the rank, when a phase outlives its budget.

    Args:
        rank_label: how this process is named in the error, e.g. `rank 3 (tp 1, dp 1)`.
        timeout_s: the budget of one phase, normally `parallel.timeout_s`.
        explain: called when the watchdog fires; returns a clause for the error line (which
            peers went silent). None adds nothing.
        poll_s: how often the thread looks at the clock.
    """

    def __init__(
        self,
        rank_label: str,
        timeout_s: float,
        explain: Callable[[], str] | None = None,
        poll_s: float = 0.5,
    ) -> None:
        self.rank_label = rank_label
        self.explain = explain
        self.timeout_s = timeout_s
        self.poll_s = min(poll_s, max(timeout_s / 10, 0.05))
        self._phase: str | None = None
        self._deadline = float("inf")
        self._budget_s = timeout_s
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ibxl-watchdog", daemon=True)

    def start(self) -> Watchdog:
        """Start the watching thread; returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (at the end of the run)."""
        self._stopped.set()

    @contextmanager
    def phase(self, name: str, budget_s: float | None = None) -> Iterator[None]:
        """Watch the enclosed block under the label `name` (e.g. `train step 12`), for
        `budget_s` seconds (`timeout_s` when None)."""
        budget_s = self.timeout_s if budget_s is None else budget_s
        with self._lock:
            self._phase, self._deadline = name, time.monotonic() + budget_s
            self._budget_s = budget_s
        try:
            yield
        finally:
            with self._lock:
                self._phase, self._deadline = None, float("inf")

    def _watch(self) -> None:
        while not self._stopped.wait(self.poll_s):
            with self._lock:
                phase, late = self._phase, time.monotonic() > self._deadline
                budget_s = self._budget_s
            if late:
                self._fire(phase, budget_s)

    def _fire(self, phase: str | None, budget_s: float) -> None:
        why = f"; {self.explain()}" if self.explain is not None else ""
        logger.error(
            "%s: %s did not finish within %g s (parallel.timeout_s=%g); a peer rank has "
            "probably died or hung in a collective%s. Ending this process (exit %d); check "
            "the other ranks' logs, then rerun to resume from the last complete checkpoint",
            self.rank_label,
            phase,
            budget_s,
            self.timeout_s,
            why,
            EXIT_HUNG,
        )
        flush_logs()
        os._exit(EXIT_HUNG)


def flush_logs() -> None:
    """Flush every logging handler and the standard streams (before `os._exit`)."""
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
    sys.stdout.flush()
    sys.stderr.flush()
