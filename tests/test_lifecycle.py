"""The replica state machine and the events it records, with fake runners."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from hoshikage_sup.pool import TRANSITIONS, ReplicaState
from httputil import post_json

DEADLINE = 60.0


def chat(model: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def test_transition_table_is_a_lifecycle():
    S = ReplicaState
    assert TRANSITIONS[S.GONE] == frozenset()  # nothing comes back from gone
    assert S.LOADING not in set().union(*TRANSITIONS.values())  # a replica starts loading, once
    assert TRANSITIONS[S.STOPPING] == {S.GONE}
    assert S.READY in TRANSITIONS[S.LOADING] and S.GONE in TRANSITIONS[S.READY]  # crash


async def test_every_transition_is_an_event_with_its_reason(make_server, http):
    h = await make_server({"a": {}, "b": {}}, server={"max_loaded_models": 1})
    sched = h.scheduler
    assert (await post_json(http, h.url + "/v1/chat/completions", chat("a")))[0] == 200
    assert (await post_json(http, h.url + "/v1/chat/completions", chat("b")))[0] == 200  # evicts a: count
    pid = sched.slots["b"].replicas[0].process.pid
    os.kill(pid, signal.SIGKILL)
    await sched.wait_until(lambda: sched.slots.get("b") and sched.slots["b"].ready
                           and sched.slots["b"].replicas[0].process.pid != pid, DEADLINE)
    events = [(e.kind, e.model, e.reason) for e in sched.events.recent()]
    assert events[:2] == [("loading", "a", "request"), ("ready", "a", "loaded")]
    assert ("evicting", "a", "count") in events
    assert ("draining", "a", "evict") in events
    assert ("stopping", "a", "evict") in events and ("stopped", "a", "evict") in events
    assert ("crashed", "b", "killed by signal SIGKILL") in events
    assert events[-2:] == [("loading", "b", "crash"), ("ready", "b", "loaded")]
    evicting = next(e for e in sched.events.recent() if e.kind == "evicting")
    assert evicting.detail["for_model"] == "b" and evicting.detail["max_loaded_models"] == 1
    crashed = next(e for e in sched.events.recent() if e.kind == "crashed")
    assert crashed.pid == pid and crashed.detail["code"] == -signal.SIGKILL


async def test_an_illegal_transition_is_refused(make_server, http):
    h = await make_server({"a": {}})
    assert (await post_json(http, h.url + "/v1/chat/completions", chat("a")))[0] == 200
    r = h.scheduler.slots["a"].replicas[0]
    with pytest.raises(RuntimeError, match="ready → loading is not a transition"):
        h.scheduler.pool.transition(r, ReplicaState.LOADING, "loading", "bug")
    assert r.state == ReplicaState.READY
    await asyncio.sleep(0)


async def test_a_replacement_after_a_crash_keeps_what_was_left_of_the_session(make_server, http):
    h = await make_server({"a": {"keep_alive": "20s"}})
    sched = h.scheduler
    assert (await post_json(http, h.url + "/v1/chat/completions", chat("a")))[0] == 200
    await sched.wait_until(lambda: sched.slots["a"].expires_at is not None, DEADLINE)
    expires = sched.slots["a"].expires_at
    await asyncio.sleep(1.5)
    pid = sched.slots["a"].replicas[0].process.pid
    os.kill(pid, signal.SIGKILL)
    await sched.wait_until(lambda: sched.slots.get("a") is not None and sched.slots["a"].ready
                           and sched.slots["a"].replicas[0].process.pid != pid
                           and sched.slots["a"].expires_at is not None, DEADLINE)
    assert abs(sched.slots["a"].expires_at - expires) < 0.5  # not a fresh 20 s from the restart


async def test_restart_without_downtime_under_steady_requests(make_server, http):
    h = await make_server({"a": {"parallel": 2}}, env={"FAKE_LOAD_DELAY": "0.5"})
    sched = h.scheduler
    assert (await post_json(http, h.url + "/v1/chat/completions", chat("a")))[0] == 200
    old = {r.process.pid for r in sched.slots["a"].replicas}
    results = []
    stop = asyncio.Event()

    async def client():
        while not stop.is_set():
            status, body, _ = await post_json(http, h.url + "/v1/chat/completions", chat("a", fake={"delay": 0.02}))
            results.append(status)

    clients = [asyncio.ensure_future(client()) for _ in range(3)]
    await asyncio.sleep(0.5)
    assert sched.restart("a")
    await sched.wait_until(lambda: sched.slots["a"].replicas and not
                           ({r.process.pid for r in sched.slots["a"].replicas} & old), DEADLINE)
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*clients)
    assert results and set(results) == {200}, results  # zero failed requests
    kinds = [(e.kind, e.reason) for e in sched.events.recent(model="a")]
    assert ("restarting", "restart") in kinds and ("stopped", "restart") in kinds
    assert sched.invariants() == []


async def test_unload_cancels_a_pending_crash_replacement(make_server, http):
    h = await make_server({"m": {"preload": True}}, model_env={"m": {"FAKE_CRASH_AFTER": "0.3"}})
    sched = h.scheduler
    await sched.wait_until(lambda: sched.counters["crashes"] >= 2, DEADLINE)  # now in backoff (1 s)
    spawned = len(h.spawner.processes)
    sched.unload("m")
    await asyncio.sleep(1.5)
    assert len(h.spawner.processes) == spawned and "m" not in sched.slots


@pytest.mark.model
async def test_restart_of_the_real_model_under_steady_load_fails_nothing(make_server, http):
    h = await make_server({"gemma": {"n_threads": 1, "chat_format": "gemma"}}, real=True)
    sched, url = h.scheduler, h.url
    results: list[int] = []
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            status, _, _ = await post_json(http, url + "/v1/completions", {"model": "gemma", "prompt": "Hi", "max_tokens": 2})
            results.append(status)

    status, _, _ = await post_json(http, url + "/v1/completions", {"model": "gemma", "prompt": "Hi", "max_tokens": 1})
    assert status == 200
    old = sched.slots["gemma"].replicas[0].process.pid
    clients = [asyncio.ensure_future(client()) for _ in range(2)]
    await asyncio.sleep(0.5)
    async with http.post(url + "/admin/models/gemma/restart") as r:
        assert r.status == 200, await r.text()
    await sched.wait_until(lambda: sched.slots["gemma"].replicas and all(
        x.process.pid != old for x in sched.slots["gemma"].replicas), DEADLINE)
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*clients)
    assert len(results) > 5 and set(results) == {200}, results  # zero failed requests
    print(f"restart under load: {len(results)} requests, {results.count(200)} succeeded")
