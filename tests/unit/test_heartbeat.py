"""Heartbeats name the peer that went silent (parallel/heartbeat.py).

Three ranks beat into one in-memory store from this process; stopping one rank's beat is
what a killed or stopped process looks like to the others.
"""

import threading
import time

import pytest
import torch.distributed as dist

from megatron_ibxl.parallel.heartbeat import Heartbeat, describe_silent

INTERVAL_S = 0.05


@pytest.fixture
def beats():
    """Ranks 0, 1 and 2 of a 3-rank job, beating into one fresh store; stopped afterwards."""
    store = dist.HashStore()
    ranks = [Heartbeat(store, rank, 3, interval_s=INTERVAL_S).start() for rank in range(3)]
    yield ranks
    for beat in ranks:
        beat.stop()


def _die(beat):
    """What a killed or stopped process does: its beat stops, and it leaves no mark."""
    beat._stopped.set()


def test_the_rank_that_stops_beating_is_the_one_named(beats):
    _die(beats[2])
    assert beats[0].silent_ranks(grace_s=0.5, linger_s=0) == [2]
    assert beats[1].silent_ranks(grace_s=0.5, linger_s=0) == [2]
    # A rank never reports itself, even when its own beat has stopped; ranks 0 and 1
    # have marked themselves as ending by now (they asked), so they are not named either.
    assert beats[2].silent_ranks(grace_s=0.5, linger_s=0) == []


def test_no_silent_rank_when_every_peer_beats(beats):
    assert beats[0].silent_ranks(grace_s=0.5, linger_s=0) == []


class _DeadStore(dist.HashStore):
    """A store whose host has gone: every read fails."""

    def add(self, key, value):
        if value == 0:
            raise RuntimeError("Connection reset by peer")
        return super().add(key, value)


def test_an_unreadable_store_gives_no_answer_instead_of_raising():
    beat = Heartbeat(_DeadStore(), 0, 2, interval_s=INTERVAL_S).start()
    try:
        assert beat.silent_ranks(grace_s=0.1, linger_s=0, limit_s=2) is None
    finally:
        beat.stop()


def test_descriptions_name_the_ranks_or_say_what_is_known():
    def label(rank):
        return f"rank {rank} (tp {rank % 2})"

    assert describe_silent([3], label) == (
        "silent: rank 3 (tp 1) has stopped sending heartbeats (dead or stopped)"
    )
    many = describe_silent(list(range(1, 11)), label)
    assert "rank 8 (tp 0)" in many and "rank 9" not in many and "and 2 more have" in many
    assert "alive but stuck" in describe_silent([], label)
    assert "rendezvous store cannot be read" in describe_silent(None, label)


def test_a_peer_that_ended_on_its_own_is_not_named(beats):
    # Rank 1 failed a moment earlier because of the same dead rank 2 and has already gone;
    # only rank 2, which left no mark, is the silent one.
    beats[1].silent_ranks(grace_s=0.0, linger_s=0)  # rank 1 on its way out: marks itself
    beats[1].stop()
    _die(beats[2])
    assert beats[0].silent_ranks(grace_s=0.5, linger_s=0) == [2]


def test_a_rank_lingers_until_its_live_peers_have_asked(beats):
    # The process hosting the store must not take it away while a peer is still asking.
    _die(beats[2])
    started = time.monotonic()
    asker = threading.Thread(target=lambda: time.sleep(0.6) or beats[1].silent_ranks(0, 0))
    asker.start()
    assert beats[0].silent_ranks(grace_s=0.2, linger_s=5) == [2]
    waited_s = time.monotonic() - started
    asker.join()
    assert 0.6 <= waited_s < 5, waited_s
