"""keep_alive expiry, driven by a fake timer and a manual clock.

The scheduler takes `timer=` (how an expiry is armed: `timer(delay, callback)`
returning something with `cancel()`) and `clock=` (wall time for
`expires_at`).  Here both are fakes, the runners are in-process stand-ins
that "load" at once and the planner says yes to everything, so every test
runs in milliseconds and sees exactly which timers are armed, with which
delay, and what happens when one fires.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any, Callable

import pytest

from hoshikage_sup.config import parse_config
from hoshikage_sup.devices import ManualClock
from hoshikage_sup.durations import FOREVER
from hoshikage_sup.scheduler import Fit, LoadPlan, Scheduler

# ------------------------------------------------------------------ fakes

_pids = itertools.count(900_000)


class FakeTimer:
    """Records armed timers; a test fires them by hand."""

    class Handle:
        def __init__(self, delay: float, callback: Callable[[], None]):
            self.delay = delay
            self.callback = callback
            self.cancelled = False
            self.fired = False

        def cancel(self) -> None:
            self.cancelled = True

        def fire(self) -> None:
            assert not self.cancelled, "a cancelled timer does not fire"
            self.fired = True
            self.callback()

    def __init__(self) -> None:
        self.handles: list[FakeTimer.Handle] = []

    def __call__(self, delay: float, callback: Callable[[], None]) -> "FakeTimer.Handle":
        h = FakeTimer.Handle(delay, callback)
        self.handles.append(h)
        return h

    def armed(self) -> list["FakeTimer.Handle"]:
        return [h for h in self.handles if not h.cancelled and not h.fired]


class FakeProcess:
    """What the scheduler uses of a RunnerProcess, without a process."""

    def __init__(self, spec: Any, index: int):
        self.spec = spec
        self.index = index
        self.pid = next(_pids)
        self.port = 1
        self.base_url = "http://127.0.0.1:1"
        self.load_duration = 0.0
        self.returncode: int | None = None
        self.on_exit = None
        self.stopped = False
        self.load_path: str | None = None  # set by RAM staging
        self.thread_budget: str | None = None  # set for fair-share runners

    async def start(self, load_timeout: float = 300.0) -> None:
        await asyncio.sleep(0)

    async def stop(self, grace: float = 5.0) -> int:
        self.stopped = True
        self.returncode = 0
        return 0

    def error_summary(self) -> str:
        return ""


class YesPlanner:
    """Every load fits; memory is not what these tests are about."""

    def plan(self, model, options, released) -> LoadPlan:
        return LoadPlan(
            n_gpu_layers=0, tensor_split=None, flash_attn=False, cache_type_k="f16", cache_type_v="f16",
            n_ctx=options.n_ctx, cpu_bytes=1, gpu_bytes={}, weights_key=str(model.path),
        )

    def fits(self, plan, keep, released) -> Fit:
        return Fit(True)

    def fits_alone(self, plan) -> Fit:
        return Fit(True)

    def gpu_free(self) -> dict[int, int]:
        return {}

    async def wait_for_recovery(self, replica, baseline) -> bool:
        return True

    def measure(self, replica) -> None:
        pass


class Harness:
    def __init__(self, sched: Scheduler, timer: FakeTimer, clock: ManualClock, spawned: list[FakeProcess]):
        self.sched, self.timer, self.clock, self.spawned = sched, timer, clock, spawned

    def model(self, name: str):
        return self.sched.config.models[name]

    async def acquire(self, name: str, keep_alive: float | None = None):
        return await asyncio.wait_for(self.sched.acquire(self.model(name), keep_alive=keep_alive), 10)

    async def settle(self) -> None:
        """Let stop tasks run."""
        for _ in range(20):
            await asyncio.sleep(0)


@pytest.fixture
def harness(tmp_path: Path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")  # the fake planner never reads it
    cfg = parse_config(
        {
            "server": {"keep_alive": "5m"},
            "models": {
                "m": {"path": str(gguf)},
                "own": {"path": str(gguf), "keep_alive": "90s"},
                "pair": {"path": str(gguf), "parallel": 2},
                "pin": {"path": str(gguf), "pinned": True},
            },
        },
        base_dir=tmp_path,
    )
    timer, clock, spawned = FakeTimer(), ManualClock(1000.0), []

    def spawn(spec, index):
        p = FakeProcess(spec, index)
        spawned.append(p)
        return p

    sched = Scheduler(cfg, YesPlanner(), spawn=spawn, timer=timer, clock=clock)
    return Harness(sched, timer, clock, spawned)


# ------------------------------------------------------------------ tests


async def test_timer_starts_when_refcount_reaches_zero(harness):
    h = harness
    lease = await h.acquire("m")
    slot = h.sched.slots["m"]
    assert h.timer.armed() == [] and slot.expires_at is None  # held: no expiry
    h.clock.advance(10)
    h.sched.release(lease)
    [t] = h.timer.armed()
    assert t.delay == 300  # [server] keep_alive = "5m"
    assert slot.expires_at == 1010 + 300
    assert slot.state() == "idle"


async def test_timer_starts_only_when_the_last_lease_is_released(harness):
    h = harness
    first = await h.acquire("pair")
    second = await h.acquire("pair")  # the first replica is busy: a second one serves it
    assert first.replica is not second.replica
    h.sched.release(first)
    assert h.timer.armed() == []  # one request still in flight
    h.sched.release(second)
    assert len(h.timer.armed()) == 1


async def test_new_request_cancels_the_timer(harness):
    h = harness
    h.sched.release(await h.acquire("m"))
    [t] = h.timer.armed()
    lease = await h.acquire("m")
    assert t.cancelled and h.timer.armed() == []
    assert h.sched.slots["m"].expires_at is None
    assert lease.replica.process is h.spawned[0]  # same runner, no reload
    h.sched.release(lease)
    [t2] = h.timer.armed()
    assert t2 is not t and t2.delay == 300


async def test_firing_unloads_the_idle_model(harness):
    h = harness
    h.sched.release(await h.acquire("m"))
    [t] = h.timer.armed()
    t.fire()
    await h.settle()
    assert "m" not in h.sched.slots
    assert h.spawned[0].stopped
    assert h.sched.counters["expirations"] == 1


async def test_a_stale_expiry_does_not_unload_a_busy_model(harness):
    h = harness
    h.sched.release(await h.acquire("m"))
    [t] = h.timer.armed()
    lease = await h.acquire("m")
    assert t.cancelled
    t.callback()  # a timer callback that raced with the new request
    await h.settle()
    assert h.sched.slots["m"].draining is None and not h.spawned[0].stopped
    h.sched.release(lease)
    assert h.sched.counters["expirations"] == 0


async def test_request_keep_alive_sets_the_session_and_absence_leaves_it(harness):
    h = harness
    h.sched.release(await h.acquire("m", keep_alive=60))
    [t] = h.timer.armed()
    assert t.delay == 60 and h.sched.slots["m"].session == 60
    h.sched.release(await h.acquire("m"))  # no keep_alive: the session stays 60 s
    [t] = h.timer.armed()
    assert t.delay == 60
    h.sched.release(await h.acquire("m", keep_alive=7200))
    [t] = h.timer.armed()
    assert t.delay == 7200
    assert h.sched.slots["m"].expires_at == h.clock() + 7200
    assert len(h.spawned) == 1  # a session change never reloads


async def test_model_keep_alive_is_the_default_session(harness):
    h = harness
    h.sched.release(await h.acquire("own"))
    [t] = h.timer.armed()
    assert t.delay == 90


async def test_negative_keep_alive_never_expires(harness):
    h = harness
    h.sched.release(await h.acquire("m", keep_alive=FOREVER))  # parse_keep_alive(-1) is FOREVER
    assert h.timer.armed() == []
    slot = h.sched.slots["m"]
    assert slot.expires_at is None and slot.state() == "idle"
    h.clock.advance(10**9)
    await h.settle()
    assert "m" in h.sched.slots
    # A later finite keep_alive makes it expire again.
    h.sched.release(await h.acquire("m", keep_alive=5))
    [t] = h.timer.armed()
    assert t.delay == 5


async def test_zero_keep_alive_unloads_as_soon_as_idle(harness):
    h = harness
    first = await h.acquire("pair", keep_alive=0)
    second = await h.acquire("pair")
    h.sched.release(first)
    await h.settle()
    assert h.sched.slots["pair"].draining is None  # still in use: stays
    h.sched.release(second)
    await h.settle()
    assert "pair" not in h.sched.slots
    assert all(p.stopped for p in h.spawned)
    assert h.timer.handles == []  # no timer was needed


async def test_pinned_models_ignore_keep_alive(harness):
    h = harness
    h.sched.release(await h.acquire("pin", keep_alive=0))
    await h.settle()
    slot = h.sched.slots["pin"]
    assert slot.session == FOREVER and slot.draining is None
    assert h.timer.armed() == [] and slot.expires_at is None
    h.sched.set_session("pin", 1)
    assert slot.session == FOREVER


async def test_set_session_rearms_an_idle_model(harness):
    h = harness
    h.sched.release(await h.acquire("m"))
    [t] = h.timer.armed()
    h.sched.set_session("m", 42)
    assert t.cancelled
    [t2] = h.timer.armed()
    assert t2.delay == 42


async def test_zero_keep_alive_serves_queued_requests_before_unloading(harness):
    # "Idle" means no request in flight *and* none waiting: a queued request for
    # the same model is served by the same runner, then the model unloads.
    h = harness
    first = await h.acquire("m", keep_alive=0)
    waiting = asyncio.ensure_future(h.acquire("m"))
    await h.settle()
    assert not waiting.done()
    h.sched.release(first)
    second = await asyncio.wait_for(waiting, 10)
    assert second.replica is first.replica and len(h.spawned) == 1
    h.sched.release(second)
    await h.settle()
    assert "m" not in h.sched.slots and h.spawned[0].stopped
