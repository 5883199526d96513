"""The stop signals of a training process, caught from the moment the command starts.

`megatron-ibxl train` imports torch and Megatron-core (seconds) and joins the process groups
before its training loop can act on SIGTERM or SIGUSR1. `catch_early` is installed by the CLI
first thing, so a signal in that window is remembered instead of killing the process;
`training.signals.StopSignal` takes it over and the run stops after its first step, with a
checkpoint and exit code 0, as it would later. Kept free of heavy imports for that reason.
"""

from __future__ import annotations

import signal
import sys

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""Signals that ask the run to checkpoint and exit 0."""

received: str | None = None
"""The name of the first stop signal caught by `catch_early`, if any."""


def _record(signum: int, _frame) -> None:
    global received
    if received is None:
        received = signal.Signals(signum).name
        # Not through logging: the handler may interrupt a logging call holding its lock.
        sys.stderr.write(f"received {received} while starting; stopping after the first step\n")


def catch_early() -> None:
    """Remember the stop signals until the training loop's own handler is installed."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _record)
