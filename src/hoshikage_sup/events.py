"""Lifecycle events: why every runner was started, stopped, evicted or replaced.

Every transition of a replica's lifecycle is recorded once, with its reason
(which request asked for a load, which model an eviction made room for and
whether for the count or for memory, the exit status and last error lines of
a crash...).  The log is a bounded ring buffer: `/admin/events` reads it and
can follow it live, the structured log gets one line per event, and
`/metrics` counts events by kind and reason.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator

from .logs import get_logger

log = get_logger("hoshikage.events")

# Events kept for /admin/events; older ones are only in the logs.
DEFAULT_CAPACITY = 2000


@dataclass(frozen=True)
class Event:
    seq: int  # increasing, so a client can ask for what came after the last one it saw
    time: float  # wall clock
    kind: str  # "loading", "ready", "load_failed", "evicting", "stopping", "stopped", "crashed", ...
    model: str
    reason: str  # the short why: "request", "count", "memory", "keep_alive", "signal"...
    replica: int | None = None
    pid: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)  # numbers and words behind the reason

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class EventLog:
    """A bounded, followable record of lifecycle events (one per supervisor)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self._events: deque[Event] = deque(maxlen=capacity)
        self._seq = itertools.count(1)
        self._changed = asyncio.Condition()
        self._waiters = 0
        self.counts: Counter[tuple[str, str]] = Counter()  # (kind, reason) → events

    def record(self, kind: str, model: str, reason: str, *, replica: int | None = None, pid: int | None = None,
               **detail: Any) -> Event:
        event = Event(seq=next(self._seq), time=time.time(), kind=kind, model=model, reason=reason,
                      replica=replica, pid=pid, detail=detail)
        self._events.append(event)
        self.counts[(kind, reason)] += 1
        log.info("event", kind=kind, model=model, reason=reason, replica=replica, pid=pid, **detail)
        if self._waiters:
            asyncio.ensure_future(self._notify())
        return event

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def recent(self, *, after: int = 0, model: str | None = None, limit: int | None = None) -> list[Event]:
        """Events with seq > `after` (for one model if given), oldest first, the last `limit`."""
        out = [e for e in self._events if e.seq > after and (model is None or e.model == model)]
        return out[-limit:] if limit else out

    async def follow(self, *, after: int = 0, model: str | None = None) -> AsyncIterator[Event]:
        """The events after `after`, then each new one as it is recorded, until cancelled."""
        last = after
        while True:
            for event in self.recent(after=last, model=model):
                last = event.seq
                yield event
            self._waiters += 1
            try:
                async with self._changed:
                    if not self.recent(after=last, model=model):
                        await self._changed.wait()
            finally:
                self._waiters -= 1
