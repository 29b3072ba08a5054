"""Scheduling policy as pure functions over plain data.

The scheduler (scheduler.py) owns the state and the processes; the choices
it makes are here, where they can be read in one place and tested in
milliseconds without a process or an event loop:

- `eviction_order`: which loaded models go first when something must make room;
- `pick_replica`: which free runner of a model serves the next request;
- `wants_another_replica`: whether a model should start one more runner;
- `restart_delay`: how long to wait before replacing a runner that crashed,
  and `in_cooldown`: whether a model that keeps failing to load rests;
- `fair_share`: how many threads each CPU runner generating right now gets;
- `wants_spare`: whether to keep a warm spare runner process ready.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, TypeVar

from .durations import FOREVER

# Crash restarts: at once, then 1 s doubling to 30 s for a runner that keeps
# crashing; a runner that stayed up this long resets the count.
RESTART_BACKOFF_FIRST = 1.0
RESTART_BACKOFF_MAX = 30.0
HEALTHY_RESET = 60.0
# Loads that fail this many times in a row put the model in a cooldown of
# restart_delay(failures): its requests get 503 + Retry-After meanwhile.
COOLDOWN_AFTER = 3


@dataclass(frozen=True)
class Candidate:
    """A loaded model as eviction sees it."""

    name: str
    refcount: int  # requests in flight
    session: float  # keep_alive seconds; FOREVER for "forever"
    waiting: bool  # requests are queued for it


def eviction_order(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Idle first, then those no request is waiting for (evicting a model with
    a queue only means loading it again next), then the shortest session
    ("forever" last), then by name.  Pinned, loading and draining models are
    not candidates at all; the caller leaves them out."""
    return sorted(candidates, key=lambda c: (c.refcount > 0, c.waiting, c.session == FOREVER, c.session, c.name))


@dataclass(frozen=True)
class ReplicaLoad:
    """A runner of a model as replica choice sees it."""

    index: int
    available: bool  # ready, holds no lease, its model not draining
    inflight: int
    served: int


R = TypeVar("R")


def pick_replica(replicas: Sequence[tuple[R, ReplicaLoad]]) -> R | None:
    """The available replica with the fewest requests, ties to the one that
    served fewest (spreading the page cache and the wear); None if none is free."""
    free = [(r, load) for r, load in replicas if load.available]
    if not free:
        return None
    return min(free, key=lambda pair: (pair[1].inflight, pair[1].served))[0]


def wants_another_replica(live: Sequence[ReplicaLoad], parallel: int, loading: bool) -> bool:
    """One more runner only when every live one is busy, none is still
    loading, and the model allows more (`parallel`)."""
    if loading or len(live) >= parallel:
        return False
    return all(r.inflight > 0 for r in live)


def restart_delay(consecutive_failures: int) -> float:
    """Seconds before replacing a runner after its `consecutive_failures`-th
    failure in a row: the first at once, then 1, 2, 4 ... up to 30 s."""
    if consecutive_failures <= 1:
        return 0.0
    return min(RESTART_BACKOFF_MAX, RESTART_BACKOFF_FIRST * 2 ** (consecutive_failures - 2))


def failures_after(previous: int, healthy_for: float | None) -> int:
    """The count of failures in a row once one more happened, given how long
    the runner had been up (None: it never came up)."""
    if healthy_for is not None and healthy_for >= HEALTHY_RESET:
        return 1
    return previous + 1


def in_cooldown(consecutive_load_failures: int) -> bool:
    return consecutive_load_failures >= COOLDOWN_AFTER


def fair_share(cpus: int, busy: int) -> int:
    """Threads for each of `busy` CPU runners generating at once on `cpus`
    cores: all of them for one alone, an equal part each otherwise, never
    fewer than one (oversubscribing beats starving a runner)."""
    return max(1, cpus // max(1, busy))


# How long a new spare waits for a quiet moment before starting anyway.
SPARE_PATIENCE = 10.0


def spare_may_start(busy_runners: int, loads_in_progress: int, waited: float,
                    patience: float = SPARE_PATIENCE) -> bool:
    """Whether a spare that is due may spawn now.  Its imports (a third of a
    second of CPU) wait for a moment with no runner generating and no model
    loading: on 2 cores a spare spawned as a runner turned ready held that
    runner's first token back by about a second.  Under constant load it
    starts anyway after `patience` seconds, but never during a load."""
    return loads_in_progress == 0 and (busy_runners == 0 or waited >= patience)


def wants_spare(pool_size: int, spares: int, starting: bool, loads_in_progress: int, closed: bool) -> bool:
    """Start a spare runner process when fewer than `pool_size` wait, none is
    starting, and no model is loading right now: a spare's imports (a third
    of a second of CPU) would slow the load someone is waiting for."""
    return not closed and not starting and loads_in_progress == 0 and spares < pool_size
