"""Which peer went silent: per-rank heartbeats in the job's rendezvous store.

When a rank dies, its peers only learn that a collective failed ("connection closed by
peer") or timed out; neither names the rank. So every rank counts beats into its own key of
the rendezvous store (`ibxl/heartbeat/<rank>`, one `add` per `interval_s`), from a daemon
thread that a hung main thread does not stop but a dead or stopped process does. A rank that
is about to end first leaves a mark (`ibxl/ended/<rank>`), then reads every counter twice,
`grace_s` apart: the ranks whose counter did not move and that left no mark are the silent
ones. The mark keeps a peer that failed a moment earlier because of the same dead rank, and
already exited, from being named in its place. Having answered, it leaves a second mark
(`ibxl/asked/<rank>`) and lingers until every live peer has answered too (at most
`linger_s`), since the process hosting the store may be among them and its exit would take
the store away from the others. Counters, not wall-clock times, so clocks of different nodes
need not agree.

The store is the one the default process group rendezvoused through (TCP on the master, or
torchrun's agent store). If the process hosting it died, nothing can be read and the answer
says so.
"""

from __future__ import annotations

import logging
import threading
import time

import torch.distributed as dist

logger = logging.getLogger(__name__)

_KEY = "ibxl/heartbeat/{rank}"
_ENDED = "ibxl/ended/{rank}"
_ASKED = "ibxl/asked/{rank}"


class Heartbeat:
    """Beat this rank's counter in `store` every `interval_s` seconds, from a daemon thread.

    Args:
        store: the job's key-value store (`default_store()` in a training process).
        rank: this process's global rank.
        world_size: processes in the job.
        interval_s: seconds between beats.
    """

    def __init__(
        self, store: dist.Store, rank: int, world_size: int, interval_s: float = 1.0
    ) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.interval_s = interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="ibxl-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        """Beat once now (so every key exists), then keep beating; returns self."""
        self.store.add(_KEY.format(rank=self.rank), 1)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and leave this rank's mark: it ended on its own, it did not die."""
        self._stopped.set()
        self._mark(_ENDED)
        self._mark(_ASKED)

    def _mark(self, key: str) -> None:
        try:
            self.store.set(key.format(rank=self.rank), "1")
        except Exception:  # noqa: BLE001 - the store's host died; nobody is left to ask
            pass

    def _unmarked(self, key: str, ranks: list[int]) -> list[int]:
        return [r for r in ranks if not self.store.check([key.format(rank=r)])]

    def _beat(self) -> None:
        key = _KEY.format(rank=self.rank)
        while not self._stopped.wait(self.interval_s):
            try:
                self.store.add(key, 1)
            except Exception:  # noqa: BLE001 - the store's host died; nothing left to tell
                return

    def silent_ranks(
        self, grace_s: float | None = None, linger_s: float = 15.0, limit_s: float = 15.0
    ) -> list[int] | None:
        """The other ranks whose counter did not move during `grace_s` (3 beats by default)
        and that did not end on their own.

        Called on the way out of a failing process: it leaves this rank's mark first (while
        this rank keeps beating), so peers asking the same question do not name it; then waits
        up to `linger_s` for the live peers to have their answer. Returns None when the store
        could not be read within `limit_s` (its host is gone). Never raises, never blocks
        longer than about `grace_s + linger_s + limit_s`.
        """
        self._mark(_ENDED)
        grace_s = 3 * self.interval_s if grace_s is None else grace_s
        answer: list[list[int] | None] = [None]

        def query() -> None:
            try:
                before = self._read_all()
                time.sleep(grace_s)
                after = self._read_all()
            except Exception:  # noqa: BLE001 - the store's host died: the answer stays None
                return
            still = [r for r in range(self.world_size) if r != self.rank and after[r] == before[r]]
            try:
                silent = self._unmarked(_ENDED, still)
                self._mark(_ASKED)
                answer[0] = silent
                live = [r for r in range(self.world_size) if r != self.rank and r not in silent]
                deadline = time.monotonic() + linger_s
                while self._unmarked(_ASKED, live) and time.monotonic() < deadline:
                    time.sleep(self.interval_s)
            except Exception:  # noqa: BLE001 - the store's host died: the answer stays None
                return

        thread = threading.Thread(target=query, name="ibxl-heartbeat-query", daemon=True)
        thread.start()
        thread.join(grace_s + linger_s + limit_s)
        return answer[0]

    def _read_all(self) -> list[int]:
        # add(key, 0) reads a counter without waiting for it, unlike get().
        return [self.store.add(_KEY.format(rank=r), 0) for r in range(self.world_size)]


def default_store() -> dist.Store:
    """The store the default process group rendezvoused through."""
    return dist.distributed_c10d._get_default_store()


def describe_silent(silent: list[int] | None, label_of) -> str:
    """One sentence naming the silent ranks, for an error line.

    Args:
        silent: `Heartbeat.silent_ranks()`'s answer.
        label_of: rank -> its label, e.g. `rank 3 (tp 1, dp 1, pp 0)`.
    """
    if silent is None:
        return (
            "the rendezvous store cannot be read, so the process hosting it (global rank 0, "
            "or the launcher's agent) has probably died"
        )
    if not silent:
        return "every other rank still sends heartbeats, so a peer is alive but stuck"
    names = ", ".join(label_of(rank) for rank in silent[:8])
    more = f" and {len(silent) - 8} more" if len(silent) > 8 else ""
    verb = "has" if len(silent) == 1 else "have"
    return f"silent: {names}{more} {verb} stopped sending heartbeats (dead or stopped)"
