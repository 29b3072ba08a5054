"""The lifecycle event log: bounded, filterable, followable."""

from __future__ import annotations

import asyncio

from hoshikage_sup.events import EventLog


async def test_events_are_bounded_counted_and_followed():
    events = EventLog(capacity=3)
    for i in range(5):
        events.record("loading", "a" if i % 2 else "b", "request", replica=0, n=i)
    assert [e.detail["n"] for e in events.recent()] == [2, 3, 4]  # the oldest went
    assert events.counts[("loading", "request")] == 5
    assert [e.model for e in events.recent(model="a")] == ["a"]
    last = events.recent()[-1].seq

    seen = []

    async def follow():
        async for e in events.follow(after=last, model="a"):
            seen.append(e)
            if len(seen) == 2:
                return

    task = asyncio.ensure_future(follow())
    await asyncio.sleep(0.05)
    events.record("crashed", "b", "signal")
    events.record("crashed", "a", "signal", code=-9)
    await asyncio.sleep(0.05)
    events.record("stopped", "a", "evict")
    await asyncio.wait_for(task, 5)
    assert [(e.kind, e.reason) for e in seen] == [("crashed", "signal"), ("stopped", "evict")]
    assert seen[0].to_json()["detail"] == {"code": -9}
    assert seen[0].seq < seen[1].seq
