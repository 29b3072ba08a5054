"""Scheduling policy: pure functions over plain data, no processes."""

from __future__ import annotations

from hoshikage_sup import policy
from hoshikage_sup.durations import FOREVER
from hoshikage_sup.policy import Candidate, ReplicaLoad


def test_eviction_order():
    c = [
        Candidate("busy", 1, 60, False),
        Candidate("forever", 0, FOREVER, False),
        Candidate("queued", 0, 10, True),
        Candidate("long", 0, 600, False),
        Candidate("short-b", 0, 30, False),
        Candidate("short-a", 0, 30, False),
    ]
    assert [x.name for x in policy.eviction_order(c)] == ["short-a", "short-b", "long", "forever", "queued", "busy"]


def test_pick_replica():
    loads = [("r0", ReplicaLoad(0, False, 1, 5)), ("r1", ReplicaLoad(1, True, 0, 9)), ("r2", ReplicaLoad(2, True, 0, 3))]
    assert policy.pick_replica(loads) == "r2"  # free, and served the fewest
    assert policy.pick_replica(loads[:1]) is None


def test_wants_another_replica():
    busy, idle = ReplicaLoad(0, False, 1, 0), ReplicaLoad(1, True, 0, 0)
    assert policy.wants_another_replica([busy], parallel=2, loading=False)
    assert not policy.wants_another_replica([busy, idle], parallel=3, loading=False)  # one is free
    assert not policy.wants_another_replica([busy], parallel=1, loading=False)  # at the limit
    assert not policy.wants_another_replica([busy], parallel=2, loading=True)  # one is on its way
    assert policy.wants_another_replica([], parallel=1, loading=False)


def test_restart_backoff_and_cooldown():
    assert [policy.restart_delay(n) for n in range(1, 9)] == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert policy.failures_after(5, healthy_for=61.0) == 1  # it had been up a while: start over
    assert policy.failures_after(5, healthy_for=3.0) == 6
    assert policy.failures_after(2, healthy_for=None) == 3
    assert not policy.in_cooldown(2) and policy.in_cooldown(3)
