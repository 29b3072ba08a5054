"""What a scheduling pass costs, counted (never timed), and that the walk
that skips waiting requests decides exactly like one that looks at each.

The scheduler counts the requests its passes look at (`stats["decisions"]`).
A pass must not look at every waiting request: a queue of N requests served
one at a time would then cost N²/2 looks in all.  The runners are in-process
stand-ins and the planner says yes (tests/test_expiry.py), so these tests
run in milliseconds.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from hoshikage_sup.config import parse_config
from hoshikage_sup.devices import ManualClock
from hoshikage_sup.scheduler import LOAD_WAITS, RunnerOptions, Scheduler
from test_expiry import FakeProcess, FakeTimer, YesPlanner


class StandIn(FakeProcess):
    load_path = None  # what the pool may read of a runner besides (nothing staged)
    thread_budget = None


def make_scheduler(tmp_path: Path, models: dict[str, dict[str, Any]], cls: type = Scheduler, **server: Any) -> Scheduler:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")  # the fake planner never reads it
    cfg = parse_config(
        {"server": {"max_queue": 100_000, **server}, "models": {n: {"path": str(gguf), **m} for n, m in models.items()}},
        base_dir=tmp_path,
    )
    return cls(cfg, YesPlanner(), spawn=lambda spec, index: StandIn(spec, index), timer=FakeTimer(),
               clock=ManualClock(1000.0))


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def queue_up(sched: Scheduler, name: str, n: int, **kw: Any) -> list[asyncio.Task]:
    tasks = [asyncio.ensure_future(sched.acquire(sched.config.models[name], **kw)) for _ in range(n)]
    await settle()
    return tasks


async def test_an_arrival_behind_a_waiting_queue_needs_no_pass(tmp_path):
    sched = make_scheduler(tmp_path, {"m": {}})
    lease = await sched.acquire(sched.config.models["m"])  # loads it; now its one runner is busy
    tasks = await queue_up(sched, "m", 1)
    passes = sched.stats["passes"]
    tasks += await queue_up(sched, "m", 100)  # behind one that waits: they wait too
    assert sched.stats["passes"] == passes and sched.queue_depth() == 101
    tasks += await queue_up(sched, "m", 1, keep_alive=60.0)  # sets the session: a pass
    assert sched.stats["passes"] == passes + 1 and sched.slots["m"].session == 60.0
    sched.release(lease)
    await settle()
    assert tasks[0].done()
    for t in tasks:
        t.cancel()
    await settle()
    assert sched.invariants() == []


def looks(sched: Scheduler) -> int:
    """Requests looked at by one more pass."""
    before = sched.stats["decisions"]
    sched.changed()
    return sched.stats["decisions"] - before


async def test_a_pass_over_a_deep_queue_looks_at_one_request(tmp_path):
    sched = make_scheduler(tmp_path, {"m": {}})
    lease = await sched.acquire(sched.config.models["m"])  # the one runner is busy
    tasks = await queue_up(sched, "m", 2000)
    assert sched.queue_depth() == 2000
    assert looks(sched) == 1  # the first waiting request stands for the others
    sched.release(lease)
    assert looks(sched) == 1
    for t in tasks:
        t.cancel()
    await settle()
    assert sched.queue_depth() == 0 and sched.invariants() == []


async def test_many_waiting_models_cost_nothing_while_loads_wait(tmp_path):
    """200 models with requests waiting, one may be loaded and it is busy: a
    pass looks at the busy model's first request and at the oldest load
    that waits, not at the 199 others behind it."""
    models = {f"m{i}": {} for i in range(200)}
    sched = make_scheduler(tmp_path, models, max_loaded_models=1)
    lease = await sched.acquire(sched.config.models["m0"])
    tasks = []
    for round_ in range(5):
        for i in range(200):
            tasks.append(asyncio.ensure_future(sched.acquire(sched.config.models[f"m{i}"])))
    await settle()
    assert sched.queue_depth() == 1000
    assert sched.slots["m0"].draining == "evict"  # the oldest waiting load made room
    assert looks(sched) <= 3
    sched.release(lease)
    await settle()
    for t in tasks:
        t.cancel()
    await settle()
    assert sched.invariants() == []


@pytest.mark.parametrize("keep_alive", [None, 60.0])
async def test_serving_a_queue_costs_linear_work(tmp_path, keep_alive):
    """Served one at a time, N requests cost O(N) looks in all; a pass over
    the whole queue each time would cost N²/2 (80,000 for N = 400)."""
    totals = {}
    for n in (100, 400):
        sched = make_scheduler(tmp_path, {"m": {}})
        lease = await sched.acquire(sched.config.models["m"])
        tasks = await queue_up(sched, "m", n, keep_alive=keep_alive)
        start = sched.stats["decisions"]
        served = 0
        while True:
            sched.release(lease)
            await settle()
            done = [t for t in tasks if t.done()]
            if not done:
                break
            assert len(done) == 1  # one runner: one request at a time, in order
            tasks.remove(done[0])
            lease = done[0].result()
            served += 1
        assert served == n and sched.queue_depth() == 0
        totals[n] = sched.stats["decisions"] - start
        assert totals[n] <= 3 * n, totals
    assert totals[400] <= 5 * totals[100], totals  # linear (quadratic would be 16x)


async def test_waiting_requests_set_the_session_in_arrival_order(tmp_path):
    """A waiting request with keep_alive sets the session even though the pass
    does not look at it; the latest one wins, and when it leaves the queue
    the one before it is in force again."""
    sched = make_scheduler(tmp_path, {"m": {}})
    lease = await sched.acquire(sched.config.models["m"])
    first = await queue_up(sched, "m", 3)  # no keep_alive
    minute = await queue_up(sched, "m", 3, keep_alive=60.0)
    await queue_up(sched, "m", 3)
    last = await queue_up(sched, "m", 1, keep_alive=7.0)
    slot = sched.slots["m"]
    assert slot.session == 7.0
    last[0].cancel()
    await settle()
    sched.changed()
    assert slot.session == 60.0
    for t in first + minute:
        t.cancel()
    await settle()
    sched.release(lease)
    await settle()
    assert sched.invariants() == []


async def test_a_reload_waits_for_the_load_the_requests_ahead_asked_for(tmp_path):
    """A request that needs a larger context than the runner being loaded for
    the requests ahead of it lets that load serve them first; draining it
    at once would load it again for them, and again for itself, for ever."""
    sched = make_scheduler(tmp_path, {"m": {"n_ctx": 256}})
    model = sched.config.models["m"]
    small = asyncio.ensure_future(sched.acquire(model, RunnerOptions.for_model(model, {"n_ctx": 128})))
    big = asyncio.ensure_future(sched.acquire(model, RunnerOptions.for_model(model, {"n_ctx": 512})))
    lease = await asyncio.wait_for(small, 5)
    assert lease.replica.slot.options.n_ctx == 128
    sched.release(lease)
    lease = await asyncio.wait_for(big, 5)
    assert lease.replica.slot.options.n_ctx == 512
    sched.release(lease)
    assert sched.counters["reloads"] == 1


# ------------------------------------------------------------------ the same decisions as a full walk


class FullWalk(Scheduler):
    """The pass as it was: a pass after every arrival, looking at every
    waiting request in arrival order."""

    def _arrive(self, p: Any, ahead: bool) -> bool:
        return False

    def _walk(self) -> None:
        loads_blocked = self.pool.recovering > 0
        for p in self.pending:
            if not p.queued:
                continue
            if p.future.done():
                self._dequeue(p)
                continue
            try:
                if self._decide(p, loads_blocked) == LOAD_WAITS:
                    loads_blocked = True
            except Exception as e:  # noqa: BLE001
                self._fail_pending(p, e)


async def run_scenario(tmp_path: Path, cls: type, seed: int) -> tuple[list, list]:
    rng = random.Random(seed)
    models = {f"m{i}": ({"parallel": 2} if i % 4 == 0 else {}) for i in range(8)}
    sched = make_scheduler(tmp_path / cls.__name__, models, cls, max_loaded_models=3)
    trace: list = []

    async def one(k: int) -> None:
        name = f"m{min(7, int(rng.expovariate(0.4)))}"
        model = sched.config.models[name]
        options = None
        if rng.random() < 0.15:
            options = RunnerOptions.for_model(model, {"n_ctx": rng.choice([128, 4096])})
        keep_alive = rng.choice([None, None, 0.0, 60.0, 300.0])
        load_only = rng.random() < 0.05
        for _ in range(rng.randint(0, 30)):
            await asyncio.sleep(0)
        task = asyncio.ensure_future(sched.acquire(model, options, keep_alive, load_only=load_only))
        if rng.random() < 0.1:
            for _ in range(rng.randint(0, 5)):
                await asyncio.sleep(0)
            task.cancel()
        try:
            lease = await task
        except asyncio.CancelledError:
            trace.append(("gone", k))
            return
        trace.append(("granted", k, name, lease.replica.index, lease.replica.slot.session))
        for _ in range(rng.randint(0, 4)):
            await asyncio.sleep(0)
        sched.release(lease)

    tasks = [asyncio.ensure_future(one(k)) for k in range(250)]
    done, stuck = await asyncio.wait(tasks, timeout=30)
    assert not stuck and sched.invariants() == []
    events = [(e.kind, e.model, e.reason) for e in sched.events.recent()]
    await sched.close()
    return trace, events


@pytest.mark.parametrize("seed", range(6))
async def test_the_walk_decides_like_a_full_walk(tmp_path, seed):
    """Same requests, same timing: the same grants, in the same order, with
    the same sessions, and the same loads, reloads and evictions."""
    (tmp_path / "Scheduler").mkdir()
    (tmp_path / "FullWalk").mkdir()
    ours = await run_scenario(tmp_path, Scheduler, seed)
    full = await run_scenario(tmp_path, FullWalk, seed)
    assert ours[0] == full[0]
    assert ours[1] == full[1]
