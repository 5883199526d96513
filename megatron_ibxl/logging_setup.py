"""Console logging with the rank in every line, and quiet third-party import warnings."""

from __future__ import annotations

import logging
import sys
import warnings


def setup_logging(rank: int = 0, level: int = logging.INFO) -> None:
    """Log to stderr as `time [rank N] LEVEL module: message`.

    Warnings and errors pass on every rank; informational lines are left to the caller,
    which logs them from the rank that owns each value.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet_third_party_warnings()


def quiet_third_party_warnings() -> None:
    """Silence import-time notices of Megatron-core about Apex and Transformer Engine being
    absent (expected on CPU machines) so that real warnings stand out."""
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    warnings.filterwarnings("ignore", message=".*Apex.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="megatron")
    warnings.filterwarnings("ignore", category=FutureWarning, module="megatron")
