"""The watchdog: runners that hang are noticed, killed and replaced.

A runner that is SIGSTOPped (or wedged in a driver) keeps its socket open
and its process alive; only its lock-free /health stops answering.  A
runner whose generation stalls keeps answering /health, but its stream sends
nothing.  Either way the request it holds fails cleanly, the runner is
replaced, and requests queued behind it are served by the replacement.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import aiohttp
import pytest

from httputil import post_json

DEADLINE = 60.0
FAST = {"health_interval": "0.2s", "health_timeout": "1s"}


def chat(model: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


async def read_stream(resp: aiohttp.ClientResponse) -> list[bytes]:
    raw = (await resp.read()).replace(b"\r\n", b"\n")
    return [b"\n".join(line[5:].strip() for line in e.split(b"\n") if line.startswith(b"data:"))
            for e in raw.split(b"\n\n") if e.strip()]


async def test_a_stopped_runner_is_killed_and_replaced_and_the_queue_moves_on(make_server, http):
    h = await make_server({"m": {}}, server=FAST)
    sched = h.scheduler
    assert (await post_json(http, h.url + "/v1/chat/completions", chat("m")))[0] == 200
    pid = sched.slots["m"].replicas[0].process.pid
    async with http.post(h.url + "/v1/chat/completions",
                         json=chat("m", stream=True, fake={"tokens": 400, "delay": 0.05})) as r:
        assert r.status == 200
        await r.content.readany()  # the stream is running
        queued = [asyncio.ensure_future(post_json(http, h.url + "/v1/chat/completions", chat("m")))
                  for _ in range(3)]
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        events = await asyncio.wait_for(read_stream(r), DEADLINE)
    failed_after = time.monotonic() - stopped_at
    assert events[-1] == b"[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["type"] == "server_error" and "SIGKILL" in err["message"], err
    for status, body, _ in await asyncio.wait_for(asyncio.gather(*queued), DEADLINE):
        assert status == 200, body
    served_after = time.monotonic() - stopped_at
    new_pid = sched.slots["m"].replicas[0].process.pid
    assert new_pid != pid
    kinds = [(e.kind, e.reason.split(":")[0]) for e in sched.events.recent(model="m")]
    assert ("killing", "watchdog") in kinds and ("crashed", "watchdog") in kinds
    assert failed_after < 10, failed_after  # health_timeout 1 s plus probing; a bound, not a claim
    print(f"SIGSTOP: in-flight failed after {failed_after:.2f} s, queue served after {served_after:.2f} s")
    assert sched.invariants() == []


async def test_a_stalled_stream_fails_with_504_and_its_runner_is_replaced(make_server, http):
    h = await make_server({"m": {}}, server={"stall_timeout": "1s"})
    sched = h.scheduler
    assert (await post_json(http, h.url + "/v1/chat/completions", chat("m")))[0] == 200
    pid = sched.slots["m"].replicas[0].process.pid
    async with http.post(h.url + "/v1/chat/completions",
                         json=chat("m", stream=True, fake={"tokens": 3, "delay": 4})) as r:
        assert r.status == 200
        queued = asyncio.ensure_future(post_json(http, h.url + "/v1/chat/completions", chat("m")))
        events = await asyncio.wait_for(read_stream(r), DEADLINE)
    assert events[-1] == b"[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == "timeout" and "stall_timeout" in err["message"], err
    status, body, _ = await asyncio.wait_for(queued, DEADLINE)
    assert status == 200, body
    assert sched.slots["m"].replicas[0].process.pid != pid
    assert ("killing", "stall") in [(e.kind, e.reason.split(":")[0]) for e in sched.events.recent(model="m")]


async def test_healthy_runners_are_left_alone(make_server, http):
    h = await make_server({"m": {}}, server=FAST)
    sched = h.scheduler
    assert (await post_json(http, h.url + "/v1/chat/completions", chat("m")))[0] == 200
    pid = sched.slots["m"].replicas[0].process.pid
    # A long generation keeps /health answering: busy is not hung.
    status, body, _ = await post_json(http, h.url + "/v1/chat/completions", chat("m", fake={"tokens": 30, "delay": 0.1}))
    assert status == 200, body
    await asyncio.sleep(1.5)
    assert sched.slots["m"].replicas[0].process.pid == pid
    assert not [e for e in sched.events.recent() if e.kind == "killing"]


async def test_a_runner_that_answers_health_but_never_generates_is_found_by_the_probe(make_server, http):
    # FAKE_HANG_AFTER=1: the first generation works, every later one hangs, /health still answers.
    h = await make_server({"m": {}}, server={**FAST, "probe_interval": "0.3s"}, env={"FAKE_HANG_AFTER": "1"})
    sched = h.scheduler
    assert (await post_json(http, h.url + "/v1/chat/completions", chat("m")))[0] == 200
    pid = sched.slots["m"].replicas[0].process.pid
    await sched.wait_until(lambda: sched.slots.get("m") is not None and sched.slots["m"].ready
                           and sched.slots["m"].replicas[0].process.pid != pid, DEADLINE)
    assert ("killing", "probe") in [(e.kind, e.reason.split(":")[0]) for e in sched.events.recent(model="m")]
    assert sched.counters["requests"] == 1  # probes are not requests
    assert sched.invariants() == []


async def test_request_timeout_is_not_taken_for_a_stall(make_server, http):
    h = await make_server({"m": {}}, server={"request_timeout": "1s", "stall_timeout": "30s"})
    sched = h.scheduler
    assert (await post_json(http, h.url + "/v1/chat/completions", chat("m")))[0] == 200
    pid = sched.slots["m"].replicas[0].process.pid
    async with http.post(h.url + "/v1/chat/completions",
                         json=chat("m", stream=True, fake={"tokens": 20, "delay": 0.2})) as r:
        events = await asyncio.wait_for(read_stream(r), DEADLINE)
    err = json.loads(events[-2])["error"]
    assert err["code"] == "timeout" and "request_timeout" in err["message"], err
    await asyncio.sleep(0.3)
    assert sched.slots["m"].replicas[0].process.pid == pid  # a slow answer is not a wedged runner
    assert not [e for e in sched.events.recent() if e.kind == "killing"]
