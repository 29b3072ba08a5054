"""The scheduler, the gateway and the OpenAI layer over HTTP, with fake runners.

Each test starts a whole supervisor in the test's event loop (`make_server`
in conftest.py) whose runners are tests/fake_runner.py: real processes that
speak llama_cpp.server's API without a model.  Timing assertions are only
ever lower bounds or orderings; `asyncio.wait_for` bounds guard against
deadlocks and are deliberately generous (the machine is small and shared).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import aiohttp
import psutil
import pytest

from hoshikage_sup.devices import SimulatedSource
from hoshikage_sup.gateway import InferenceRequest
from httputil import post_json

GiB = 2**30
DEADLINE = 60.0  # seconds: a bound against deadlocks, never a performance claim


# ------------------------------------------------------------------ helpers


def chat_body(model: str, text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


async def post(http: aiohttp.ClientSession, url: str, body: Any, path: str = "/v1/chat/completions"):
    """POST and return (status, parsed JSON body, headers)."""
    return await post_json(http, url + path, body)


async def chat(http, url, model, **extra) -> dict[str, Any]:
    status, body, _ = await post(http, url, chat_body(model, **extra))
    assert status == 200, body
    return body


async def wait_until(predicate, timeout: float = DEADLINE, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def ready_pids(sched, name: str) -> list[int]:
    slot = sched.slots.get(name)
    if slot is None:
        return []
    return [r.process.pid for r in slot.replicas if r.state == "ready"]


def loaded(sched) -> set[str]:
    return {name for name, s in sched.slots.items() if s.live_replicas()}


def assert_openai_error(body: Any, *, param: str | None = None, contains: str = "") -> str:
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    err = body["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    assert contains in err["message"], err
    return err["message"]


class SSE:
    """Reads server-sent events from a streaming response one at a time."""

    def __init__(self, response: aiohttp.ClientResponse):
        self.response = response
        self.buf = b""
        self.raw = b""

    async def next(self) -> bytes | None:
        """The next event's data, b"[DONE]" at the end, None at EOF."""
        while b"\n\n" not in self.buf:
            chunk = await self.response.content.readany()
            if not chunk:
                return None
            self.raw += chunk
            self.buf = (self.buf + chunk).replace(b"\r\n", b"\n")
        event, self.buf = self.buf.split(b"\n\n", 1)
        lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
        return b"\n".join(lines)


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as s:
        yield s


# ------------------------------------------------------------------ routing


async def test_routes_by_name_and_alias_and_lists_models(make_server, http):
    h = await make_server({"alpha": {"aliases": ["alpha:1b", "first"]}, "beta": {}})
    for requested, expected in (("alpha", "alpha"), ("alpha:1b", "alpha"), ("first", "alpha"), ("beta", "beta"),
                                ("beta:latest", "beta")):
        body = await chat(http, h.url, requested)
        assert body["model"] == expected, (requested, body)
        assert body["choices"][0]["message"]["content"]
    # Both models were served by their own runner; the aliases did not load a third.
    assert {p.spec.model_name for p in h.spawner.processes} == {"alpha", "beta"}
    assert len(h.spawner.processes) == 2

    status, body, _ = await post(http, h.url, {"model": "first", "prompt": "x", "max_tokens": 3}, "/v1/completions")
    assert status == 200 and body["model"] == "alpha" and body["object"] == "text_completion"

    async with http.get(h.url + "/v1/models") as r:
        assert r.status == 200
        listing = await r.json()
    assert listing["object"] == "list"
    ids = sorted(m["id"] for m in listing["data"])
    assert ids == sorted(["alpha", "alpha:1b", "first", "beta"])
    assert all(m["object"] == "model" for m in listing["data"])

    async with http.get(h.url + "/health") as r:
        assert r.status == 200
        health = await r.json()
    assert health["status"] == "ok"
    assert health["loaded"] == 2 and health["queued"] == 0


# ------------------------------------------------------------------ streaming


async def test_stream_passes_through_unbuffered_and_intact(make_server, http):
    h = await make_server({"m": {}})
    await chat(http, h.url, "m")  # load first, so only the stream is timed below
    words = [f" w{i}" for i in range(12)]
    delay = 0.15
    body = chat_body("m", stream=True, fake={"text": words, "delay": delay})
    async with http.post(h.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        sse = SSE(r)
        first = await sse.next()
        t_first = time.monotonic()
        assert first is not None and first != b"[DONE]"
        # The runner still has (nearly) every token to send: the stream is open.
        assert not r.content.at_eof()
        events = [first]
        while (data := await sse.next()) not in (None, b"[DONE]"):
            events.append(data)
        t_done = time.monotonic()
        assert data == b"[DONE]", "the stream must end with data: [DONE]"
        assert await sse.next() is None and sse.buf.strip() == b"", "nothing may follow [DONE]"
    # Events arrived one by one as the runner produced them, not in one piece
    # at the end: the last came at least most of the remaining delays later.
    assert t_done - t_first >= 0.5 * delay * (len(words) - 1)
    chunks = [json.loads(e) for e in events]  # every event is intact JSON
    assert len(chunks) == len(words) + 2  # role, one per token, finish
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "".join(words)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert {c["model"] for c in chunks} == {"m"}


async def test_client_leaving_mid_stream_frees_the_runner(make_server, http):
    h = await make_server({"m": {}})
    sched = h.scheduler
    # 2000 tokens at 50 ms: the whole stream would outlast DEADLINE.
    body = chat_body("m", stream=True, fake={"tokens": 2000, "delay": 0.05})
    async with http.post(h.url + "/v1/chat/completions", json=body) as r:
        assert await SSE(r).next()
        assert sched.slots["m"].refcount == 1
    # The client left: the lease comes back, and the runner stopped generating
    # (it serves one request at a time, so the next one would wait otherwise).
    await wait_until(lambda: sched.slots["m"].refcount == 0, what="the lease to be released")
    assert (await chat(http, h.url, "m", fake={"tokens": 2}))["model"] == "m"
    assert len(h.spawner.processes) == 1


async def test_client_leaving_a_non_streaming_request_keeps_the_runner_leased(make_server, http):
    # llama_cpp.server finishes a non-streaming generation whatever the client
    # does: until it has, its runner is busy and must not be handed out.
    h = await make_server({"m": {}})
    sched = h.scheduler
    gone = asyncio.create_task(post(http, h.url, chat_body("m", fake={"tokens": 20, "delay": 0.05})))
    await wait_until(lambda: "m" in sched.slots and sched.slots["m"].refcount == 1, what="the request to start")
    gone.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await gone
    nxt = asyncio.create_task(chat(http, h.url, "m", fake={"tokens": 1}))
    await wait_until(lambda: sched.queue_depth() == 1, what="the next request to queue")
    assert sched.slots["m"].refcount == 1  # still held for the abandoned generation
    assert (await asyncio.wait_for(nxt, DEADLINE))["model"] == "m"
    await sched.wait_idle(10)
    assert sched.slots["m"].refcount == 0 and len(h.spawner.processes) == 1


async def test_completion_stream_ends_with_done(make_server, http):
    h = await make_server({"m": {}})
    body = {"model": "m", "prompt": "x", "stream": True, "fake": {"text": ["a", "b", "c"]}}
    async with http.post(h.url + "/v1/completions", json=body) as r:
        assert r.status == 200
        sse = SSE(r)
        events = []
        while (data := await sse.next()) not in (None, b"[DONE]"):
            events.append(json.loads(data))
    assert data == b"[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events) == "abc"


# ------------------------------------------------------------------ queueing order


async def test_fifo_per_runner(make_server, http):
    h = await make_server({"m": {}})
    sched = h.scheduler
    done: list[int] = []

    async def one(i: int) -> None:
        await chat(http, h.url, "m", fake={"tokens": 3, "delay": 0.03})
        done.append(i)

    tasks = []
    for i in range(6):
        tasks.append(asyncio.create_task(one(i)))
        # Send the next one only once this one has reached the scheduler,
        # so the arrival order is the order of i.
        await wait_until(lambda: sched.counters["requests"] >= i + 1, what=f"request {i} to arrive")
    await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE)
    assert done == list(range(6))
    assert len(h.spawner.processes) == 1


# ------------------------------------------------------------------ sessions


async def test_idle_unload_after_keep_alive(make_server, http):
    h = await make_server({"short": {"keep_alive": 0.3}, "other": {}})
    sched = h.scheduler
    t_sent = time.monotonic()
    await chat(http, h.url, "short")
    [pid] = [p.pid for p in h.spawner.of("short")]
    await wait_until(lambda: "short" not in sched.slots, what="the idle model to unload")
    assert time.monotonic() - t_sent >= 0.3
    await wait_until(lambda: pid_gone(pid), timeout=10, what="the runner process to exit")
    assert sched.counters["expirations"] == 1

    # keep_alive 0 on the request: unloaded as soon as the request is done.
    await chat(http, h.url, "other", keep_alive=0)
    [pid] = [p.pid for p in h.spawner.of("other")]
    await wait_until(lambda: "other" not in sched.slots, timeout=10, what="keep_alive 0 to unload")
    await wait_until(lambda: pid_gone(pid), timeout=10, what="the runner process to exit")


async def test_keep_alive_duration_string_sets_the_session(make_server, http):
    h = await make_server({"m": {}})
    await chat(http, h.url, "m", keep_alive="10m")
    [snap] = h.scheduler.status().models
    assert snap.session == 600
    await chat(http, h.url, "m")  # no keep_alive: the session stays as it is
    [snap] = h.scheduler.status().models
    assert snap.session == 600 and snap.state == "idle"


# ------------------------------------------------------------------ errors


async def test_request_errors_have_the_openai_shape(make_server, http):
    h = await make_server({"m": {}, "emb": {"embedding": True}})
    status, body, _ = await post(http, h.url, chat_body("nope"))
    assert status == 404
    assert_openai_error(body, param="model", contains="nope")
    assert body["error"]["code"] == "model_not_found"

    status, body, _ = await post(http, h.url, {"messages": [{"role": "user", "content": "x"}]})
    assert status == 400
    assert_openai_error(body, param="model", contains="model")

    status, body, _ = await post(http, h.url, b"{not json")
    assert status == 400
    assert_openai_error(body, contains="JSON")

    status, body, _ = await post(http, h.url, chat_body("m", keep_alive="10"))
    assert status == 400
    assert_openai_error(body, param="keep_alive", contains="keep_alive")

    status, body, _ = await post(http, h.url, {"model": "m", "input": "x"}, "/v1/embeddings")
    assert status == 400
    assert_openai_error(body, param="model", contains="embedding")

    # The embedding model does serve them.
    status, body, _ = await post(http, h.url, {"model": "emb", "input": ["a", "b"]}, "/v1/embeddings")
    assert status == 200, body
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(isinstance(x, float) for x in body["data"][0]["embedding"])
    # None of the bad requests loaded anything.
    assert loaded(h.scheduler) == {"emb"}

    # An error from the runner itself comes back in OpenAI's shape; the 422
    # llama_cpp.server gives for bodies its models reject is a 400 like any other.
    status, body, _ = await post(http, h.url, chat_body("m", fake={"fail": 422}))
    assert status == 400
    assert_openai_error(body, contains="fake failure")
    assert (await chat(http, h.url, "m"))["model"] == "m"


async def test_load_failure_carries_the_runners_error(make_server, http):
    h = await make_server({"bad": {}, "good": {}}, model_env={"bad": {"FAKE_LOAD_FAIL": "tensor 'blk.7' is corrupt"}})
    status, body, _ = await post(http, h.url, chat_body("bad"))
    assert status >= 500
    message = assert_openai_error(body)
    assert "tensor 'blk.7' is corrupt" in message
    assert "bad" in message
    assert "bad" not in h.scheduler.slots and not h.scheduler.pending
    # The failure is the model's, not the server's.
    assert (await chat(http, h.url, "good"))["model"] == "good"


async def test_crash_mid_request_gives_502_and_the_replica_is_restarted(make_server, http):
    h = await make_server({"m": {"keep_alive": "10m"}})
    sched = h.scheduler
    await chat(http, h.url, "m")
    [old] = ready_pids(sched, "m")
    status, body, _ = await post(http, h.url, chat_body("m", fake={"crash": True, "tokens": 6, "delay": 0.02}))
    assert status == 502
    message = assert_openai_error(body)
    assert "GGML_ASSERT" in message  # the runner's last lines
    # It was not sent again: one crash, not one per retry.
    assert sched.counters["crashes"] == 1
    # Restarted proactively: a new replica becomes ready with no request asking.
    requests = sched.counters["requests"]
    await wait_until(lambda: ready_pids(sched, "m") not in ([], [old]), what="the replacement replica")
    assert sched.counters["requests"] == requests
    assert sched.counters["crashes"] == 1 and sched.counters["restarts"] == 1
    [new] = ready_pids(sched, "m")
    assert new != old and pid_gone(old)
    assert (await chat(http, h.url, "m"))["model"] == "m"
    assert ready_pids(sched, "m") == [new]


async def test_a_runner_that_keeps_crashing_is_restarted_with_a_growing_delay(make_server, http):
    h = await make_server({"m": {"preload": True}}, model_env={"m": {"FAKE_CRASH_AFTER": "0.3"}})
    sched = h.scheduler
    await wait_until(lambda: sched.counters["crashes"] >= 4, what="four crashes")
    events = sched.events.recent(model="m")
    crashes = [e.time for e in events if e.kind == "crashed"]
    restarts = [e.time for e in events if e.kind == "loading" and e.reason == "crash"]
    gaps = [start - crash for crash, start in zip(crashes, restarts)]
    # At once, then 1 s, then 2 s (policy.restart_delay); never given up on.
    assert gaps[0] < 0.5 and 0.9 <= gaps[1] < 1.9 and 1.9 <= gaps[2] < 3.5, gaps
    assert [e.detail["delay"] for e in events if e.kind == "backoff"][:2] == [1.0, 2.0]
    assert sched.counters["requests"] == 1  # the preload only: restarts need no request
    await sched.wait_until(lambda: sched.counters["crashes"] >= 5, DEADLINE)


async def test_a_model_that_keeps_failing_to_load_cools_down_with_retry_after(make_server, http):
    h = await make_server({"bad": {}, "good": {}}, model_env={"bad": {"FAKE_LOAD_FAIL": "tensor 'blk.7' is corrupt"}})
    for _ in range(3):
        status, body, _ = await post(http, h.url, chat_body("bad"))
        assert status == 500 and "blk.7" in assert_openai_error(body)
    status, body, headers = await post(http, h.url, chat_body("bad"))
    assert status == 503, body
    assert int(headers["Retry-After"]) >= 1
    message = assert_openai_error(body)
    assert "cooling down" in message and "blk.7" in message
    assert len(h.spawner.of("bad")) == 3  # no fourth load while cooling down
    assert (await chat(http, h.url, "good"))["model"] == "good"  # others unaffected
    await asyncio.sleep(int(headers["Retry-After"]) + 0.2)
    status, body, _ = await post(http, h.url, chat_body("bad"))
    assert status == 500 and len(h.spawner.of("bad")) == 4  # tried again after the cooldown


async def test_crash_mid_stream_ends_the_stream_with_an_error_event(make_server, http):
    h = await make_server({"m": {}})
    body = chat_body("m", stream=True, fake={"crash": True, "tokens": 6, "delay": 0.02})
    async with http.post(h.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200
        sse = SSE(r)
        events = []
        while (data := await sse.next()) not in (None, b"[DONE]"):
            events.append(json.loads(data))
    last = events[-1]
    assert "error" in last and "GGML_ASSERT" in last["error"]["message"], last
    assert (await chat(http, h.url, "m"))["model"] == "m"


# ------------------------------------------------------------------ eviction


class Stream:
    """A slow streaming chat request run in the background."""

    def __init__(self, http, url: str, model: str, tokens: int, delay: float, **extra: Any):
        self.body = chat_body(model, stream=True, fake={"tokens": tokens, "delay": delay}, **extra)
        self.http, self.url, self.tokens = http, url, tokens
        self.first = asyncio.Event()
        self.events: list[dict[str, Any]] = []
        self.done_at: float | None = None
        self.ended_with_done = False
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with self.http.post(self.url + "/v1/chat/completions", json=self.body) as r:
            assert r.status == 200, await r.text()
            sse = SSE(r)
            while (data := await sse.next()) not in (None, b"[DONE]"):
                self.events.append(json.loads(data))
                self.first.set()
            self.ended_with_done = data == b"[DONE]"
        self.done_at = time.monotonic()

    async def started(self) -> "Stream":
        await asyncio.wait_for(self.first.wait(), DEADLINE)
        return self

    async def finished(self) -> "Stream":
        await asyncio.wait_for(self.task, DEADLINE)
        return self

    async def leave(self) -> None:
        """The client goes away mid-stream."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    def complete(self) -> bool:
        """Every token arrived, then [DONE]: the runner was not stopped under it."""
        content = [e for e in self.events if e["choices"][0]["delta"].get("content")]
        return self.ended_with_done and len(content) == self.tokens and "error" not in self.events[-1]


async def timed_chat(http, url, model, **extra) -> float:
    await chat(http, url, model, **extra)
    return time.monotonic()


async def test_eviction_order_idle_then_shortest_session_then_name(make_server, http):
    h = await make_server(
        {"a": {"keep_alive": "10m"}, "b": {"keep_alive": "1m"}, "c": {"keep_alive": "5m"},
         "d": {"keep_alive": "5m"}, "e": {"keep_alive": "5m"}},
        server={"max_loaded_models": 2},
    )
    sched = h.scheduler
    await chat(http, h.url, "a")
    await chat(http, h.url, "b")
    assert loaded(sched) == {"a", "b"}
    await chat(http, h.url, "c")  # both idle: b has the shortest session
    assert loaded(sched) == {"a", "c"}
    await chat(http, h.url, "d")  # c (5m) goes before a (10m)
    assert loaded(sched) == {"a", "d"}
    await chat(http, h.url, "a", keep_alive="5m")  # a request's keep_alive sets the session
    await chat(http, h.url, "e")  # a and d: same session, so by name
    assert loaded(sched) == {"d", "e"}
    await chat(http, h.url, "d", keep_alive=-1)  # forever sorts last
    await chat(http, h.url, "b")
    assert loaded(sched) == {"d", "b"}
    assert sched.counters["evictions"] == 4
    # Every victim's runner process is gone.
    for p in h.spawner.processes:
        if p.pid not in (ready_pids(sched, "d") + ready_pids(sched, "b")):
            await wait_until(lambda p=p: pid_gone(p.pid), timeout=10, what=f"{p!r} to exit")


async def test_idle_victim_before_a_busy_one_with_a_shorter_session(make_server, http):
    h = await make_server({"a": {"keep_alive": "1m"}, "b": {"keep_alive": "10m"}, "c": {}},
                          server={"max_loaded_models": 2})
    sched = h.scheduler
    await chat(http, h.url, "b")
    s = await Stream(http, h.url, "a", tokens=20, delay=0.1).started()
    await chat(http, h.url, "c")
    assert sched.slots["a"].draining is None  # the busy model was not chosen
    assert loaded(sched) == {"a", "c"}
    await s.finished()
    assert s.complete()


async def test_pinned_model_is_never_evicted(make_server, http):
    h = await make_server({"aa": {"pinned": True, "preload": True}, "zz": {"keep_alive": -1}, "new": {}},
                          server={"max_loaded_models": 2})
    sched = h.scheduler
    await wait_until(lambda: ready_pids(sched, "aa"), what="the preloaded model")
    await chat(http, h.url, "zz")
    await chat(http, h.url, "aa", keep_alive=0)  # ignored: pinned models stay
    await chat(http, h.url, "new")  # aa sorts first by name, but it is pinned
    assert loaded(sched) == {"aa", "new"}
    assert sched.slots["aa"].session == float("inf")


async def test_serving_runner_is_drained_not_stopped(make_server, http):
    h = await make_server({"a": {}, "b": {}}, server={"max_loaded_models": 1})
    sched = h.scheduler
    await chat(http, h.url, "a")
    [a_pid] = ready_pids(sched, "a")
    s = await Stream(http, h.url, "a", tokens=15, delay=0.1).started()
    b = asyncio.create_task(timed_chat(http, h.url, "b"))
    await wait_until(lambda: sched.slots["a"].draining == "evict", what="a to be marked for eviction")
    assert not pid_gone(a_pid)
    b_done = await asyncio.wait_for(b, DEADLINE)
    await s.finished()
    assert s.complete(), s.events[-1]
    assert b_done >= s.done_at - 0.05  # b was served only once a's stream had ended
    assert loaded(sched) == {"b"} and pid_gone(a_pid)


async def test_an_idle_victim_exits_while_the_next_model_loads(make_server, http):
    # a takes its whole stop_timeout to exit (it ignores SIGTERM); b does not wait for that.
    # (6 s of it: b's load and answer stay well inside that on a busy machine.)
    h = await make_server({"a": {}, "b": {}}, server={"max_loaded_models": 1, "stop_timeout": 6},
                          model_env={"a": {"FAKE_IGNORE_SIGTERM": "1"}})
    sched = h.scheduler
    await chat(http, h.url, "a")
    [a_pid] = ready_pids(sched, "a")
    t0 = time.monotonic()
    await chat(http, h.url, "b")
    assert time.monotonic() - t0 < 5, "b waited for a's exit"
    assert not pid_gone(a_pid)  # a is still on its way out
    assert loaded(sched) == {"b"}
    def order():
        return [(e.kind, e.model) for e in sched.events.recent() if e.kind in ("loading", "stopped")]
    # the pid goes before the reaper records the exit: wait for the event itself
    await wait_until(lambda: ("stopped", "a") in order(), what="a's stopped event")
    assert pid_gone(a_pid)
    assert order().index(("loading", "b")) < order().index(("stopped", "a"))
    assert sched._loaded_count() == 1


async def test_loaded_models_are_served_while_a_load_waits_for_a_drain(make_server, http):
    # c is pinned so that the busy a is the only possible victim.
    h = await make_server({"a": {}, "b": {}, "c": {"pinned": True}}, server={"max_loaded_models": 2})
    sched = h.scheduler
    await chat(http, h.url, "c")
    s = await Stream(http, h.url, "a", tokens=2000, delay=0.05).started()  # outlasts the test
    b = asyncio.create_task(timed_chat(http, h.url, "b"))
    await wait_until(lambda: sched.slots["a"].draining == "evict", what="a to be marked for eviction")
    for _ in range(3):
        await chat(http, h.url, "c", fake={"tokens": 2})
        # c answered while b still waits behind a's stream.
        assert s.done_at is None and not b.done()
        assert any(p.model.name == "b" for p in sched.pending)
    await s.leave()  # a's client goes: a drains, b loads
    await asyncio.wait_for(b, DEADLINE)
    assert loaded(sched) == {"b", "c"}


async def test_victim_that_keeps_receiving_requests_cannot_stall_an_eviction(make_server, http):
    h = await make_server({"a": {}, "b": {}}, server={"max_loaded_models": 1})
    sched = h.scheduler
    s = await Stream(http, h.url, "a", tokens=10, delay=0.1).started()
    b = asyncio.create_task(timed_chat(http, h.url, "b"))
    await wait_until(lambda: sched.slots["a"].draining == "evict", what="a to be marked for eviction")
    more_a: list[asyncio.Task] = []
    while not b.done() and len(more_a) < 40:  # a keeps being asked for while it drains
        more_a.append(asyncio.create_task(timed_chat(http, h.url, "a", fake={"tokens": 2})))
        await asyncio.sleep(0.1)
    b_done = await asyncio.wait_for(b, DEADLINE)
    await s.finished()
    assert s.complete()
    a_done = await asyncio.wait_for(asyncio.gather(*more_a), DEADLINE)
    assert len(more_a) >= 3
    # The requests that arrived while a drained were served by a new runner of a,
    # after b had its turn (a's old runner was not kept alive by them).
    assert all(t >= b_done - 0.05 for t in a_done)
    assert len(h.spawner.of("a")) == 2


# Which model client i asks for.  With more models in use than fit, each
# request for a model that is not loaded costs a load (the victim is drained
# with its own queue behind it), so x and y get few requests and z most: the
# mix still keeps all three models contended, at a few loads, not forty.
PATTERN = "zzzzxzzzzzzzzzyzzzzz"


async def test_many_clients_over_three_models(make_server, http):
    h = await make_server({"x": {}, "y": {}, "z": {"keep_alive": -1}}, server={"max_loaded_models": 2})
    sched = h.scheduler
    violations: list[str] = []

    async def watch() -> None:
        while True:
            live = [n for n, s in sched.slots.items() if s.live_replicas()]
            if len(live) > 2:
                violations.append(f"{len(live)} models loaded: {live}")
            for s in sched.slots.values():
                for r in s.replicas:
                    if r.state in ("stopping", "gone") and r.inflight:
                        violations.append(f"{s.name} replica {r.index} {r.state} with {r.inflight} in flight")
            await asyncio.sleep(0.005)

    async def client(i: int) -> dict[str, Any]:
        await asyncio.sleep(0.02 * (i % 7))
        model = PATTERN[i % len(PATTERN)]
        if i % 4 == 0:
            s = Stream(http, h.url, model, tokens=4, delay=0.02)
            await s.finished()
            assert s.complete(), s.events[-1:]
            return {"model": model}
        return await chat(http, h.url, model, fake={"tokens": 3, "delay": 0.01})

    watcher = asyncio.create_task(watch())
    try:
        results = await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(40))), 120)
    finally:
        watcher.cancel()
    assert [r["model"] for r in results] == [PATTERN[i % len(PATTERN)] for i in range(40)]
    assert sched.counters["evictions"] >= 2  # all three models took turns
    assert not violations, violations[:5]
    await sched.wait_idle(10)
    assert not sched.pending
    assert all(s.refcount == 0 for s in sched.slots.values())
    assert all(r.inflight == 0 for s in sched.slots.values() for r in s.replicas)
    assert sched.counters["requests"] == 40


# ------------------------------------------------------------------ replicas and queue


async def test_parallel_replicas_serve_concurrent_requests(make_server, http):
    h = await make_server({"m": {"parallel": 2}})
    sched = h.scheduler
    seen: set[tuple[int, ...]] = set()
    # Both streams outlast the test (the second replica has to load meanwhile).
    s1 = await Stream(http, h.url, "m", tokens=2000, delay=0.05).started()
    s2 = Stream(http, h.url, "m", tokens=2000, delay=0.05)

    def both_busy() -> bool:
        busy = [r for r in sched.slots["m"].replicas if r.state == "ready" and r.inflight == 1]
        if len(busy) == 2:
            seen.add(tuple(sorted(r.process.pid for r in busy)))
            return True
        return False

    await wait_until(both_busy, what="two replicas serving at once")
    [pids] = seen
    assert len(set(pids)) == 2
    await s2.started()  # and its tokens flow
    await s1.leave()
    await s2.leave()
    await wait_until(lambda: sched.slots["m"].refcount == 0, what="both leases back")


async def test_queue_limit_and_disconnect_while_waiting(make_server, http):
    h = await make_server({"m": {}}, server={"max_queue": 2})
    sched = h.scheduler
    running = await Stream(http, h.url, "m", tokens=2000, delay=0.05).started()  # outlasts the test
    w1 = asyncio.create_task(chat(http, h.url, "m", fake={"tokens": 1}))
    await wait_until(lambda: sched.queue_depth() == 1, what="first waiter")
    w2 = asyncio.create_task(chat(http, h.url, "m", fake={"tokens": 1}))
    await wait_until(lambda: sched.queue_depth() == 2, what="second waiter")

    status, body, headers = await post(http, h.url, chat_body("m"))
    assert status == 503
    assert int(headers["Retry-After"]) >= 1
    assert_openai_error(body, contains="busy")
    assert "max_queue" in body["error"]["message"]

    w2.cancel()  # the client goes away while waiting
    await wait_until(lambda: sched.queue_depth() == 1, what="the gone client to leave the queue")
    w1.cancel()
    await wait_until(lambda: sched.queue_depth() == 0, what="the queue to empty")
    assert sched.slots["m"].refcount == 1  # only the running stream holds the runner
    await running.leave()
    await sched.wait_idle(10)
    assert sched.slots["m"].refcount == 0 and not sched.pending
    assert (await chat(http, h.url, "m"))["model"] == "m"
    assert len(h.spawner.processes) == 1


# ------------------------------------------------------------------ runner options


async def test_other_runner_options_reload_after_draining(make_server, http):
    h = await make_server({"m": {"n_ctx": 512}})
    sched, gw = h.scheduler, h.gateway
    await chat(http, h.url, "m")
    [old] = ready_pids(sched, "m")
    # Sampling options are not runner options: same runner.
    await chat(http, h.url, "m", temperature=0.1, top_p=0.5, seed=3, max_tokens=4)
    assert ready_pids(sched, "m") == [old]

    s = await Stream(http, h.url, "m", tokens=10, delay=0.1).started()
    req = InferenceRequest(model="m", kind="chat", body=chat_body("m", fake={"tokens": 2}),
                           runner_options={"n_ctx": 1024})

    async def bigger() -> dict[str, Any]:
        async with gw.open(req) as up:
            assert up.status == 200
            out = await up.json()
            out["pid"] = up.lease.replica.process.pid
            return out

    reload = asyncio.create_task(bigger())
    await wait_until(lambda: sched.slots["m"].draining == "reload", what="the slot to drain for a reload")
    result = await asyncio.wait_for(reload, DEADLINE)
    await s.finished()
    assert s.complete()  # the old runner finished its stream first
    assert result["pid"] != old and pid_gone(old)
    assert sched.slots["m"].options.n_ctx == 1024
    assert h.spawner.processes[-1].spec.n_ctx == 1024
    assert sched.counters["reloads"] >= 1
    # The same options again: no further reload.
    async with gw.open(req) as up:
        assert up.status == 200 and up.lease.replica.process.pid == result["pid"]


async def test_a_smaller_context_is_served_by_a_larger_runner(make_server, http):
    # Reloading for every num_ctx difference is the thrashing Ollama users know:
    # a request that asks for less context than the runner has is served by it.
    h = await make_server({"m": {"n_ctx": 512}})
    sched, gw = h.scheduler, h.gateway

    async def pid_for(n_ctx: int) -> int:
        req = InferenceRequest(model="m", kind="chat", body=chat_body("m", fake={"tokens": 1}),
                               runner_options={"n_ctx": n_ctx})
        async with gw.open(req) as up:
            assert up.status == 200
            await up.read()
            return up.lease.replica.process.pid

    small = await pid_for(512)
    big = await pid_for(2048)  # more context than loaded: reload
    assert big != small and sched.slots["m"].options.n_ctx == 2048
    assert await pid_for(1024) == big  # less: the larger runner serves it
    assert await pid_for(512) == big
    assert (await chat(http, h.url, "m"))["model"] == "m"  # the model's own n_ctx (512) too
    assert ready_pids(sched, "m") == [big] and sched.counters["reloads"] == 1


async def test_a_victim_with_a_queue_goes_after_one_without(make_server, http):
    # Both loaded models are busy; one also has a request waiting.  Evicting
    # that one would only mean loading it again next, so the other goes.
    h = await make_server({"a": {"keep_alive": "1m"}, "b": {"keep_alive": "10m"}, "c": {}},
                          server={"max_loaded_models": 2})
    sched = h.scheduler
    sa = await Stream(http, h.url, "a", tokens=30, delay=0.05).started()
    sb = await Stream(http, h.url, "b", tokens=30, delay=0.05).started()
    queued_a = asyncio.create_task(chat(http, h.url, "a", fake={"tokens": 1}))
    await wait_until(lambda: sched.queue_depth() == 1, what="a request queued for a")
    c = asyncio.create_task(chat(http, h.url, "c", fake={"tokens": 1}))
    await wait_until(lambda: any(s.draining for s in sched.slots.values()), what="a victim")
    # a has the shorter session, but a request waits for it: b is drained.
    assert sched.slots["b"].draining == "evict" and sched.slots["a"].draining is None
    await asyncio.wait_for(asyncio.gather(queued_a, c), DEADLINE)
    await sa.finished()
    await sb.finished()
    assert sa.complete() and sb.complete()


async def test_an_idle_model_expires_after_a_waiter_left_its_queue(make_server, http):
    # The idle countdown must start whenever a model becomes idle, also when
    # the request that was waiting for it went away instead of being served.
    h = await make_server({"m": {"keep_alive": "300ms"}})
    sched = h.scheduler
    running = await Stream(http, h.url, "m", tokens=20, delay=0.05).started()
    waiter = asyncio.create_task(chat(http, h.url, "m", fake={"tokens": 1}))
    await wait_until(lambda: sched.queue_depth() == 1, what="a waiter")
    waiter.cancel()
    await wait_until(lambda: sched.queue_depth() == 0, what="the waiter to leave")
    await running.finished()
    [pid] = [p.pid for p in h.spawner.processes]
    await wait_until(lambda: "m" not in sched.slots, timeout=10, what="the idle model to expire")
    await wait_until(lambda: pid_gone(pid), timeout=10, what="its runner to exit")


async def test_loading_a_model_is_not_counted_as_serving(make_server, http):
    h = await make_server({"m": {}})
    for _ in range(3):
        await h.gateway.load("m")
    [replica] = h.scheduler.slots["m"].replicas
    assert replica.served == 0 and replica.inflight == 0
    await chat(http, h.url, "m")
    assert replica.served == 1


# ------------------------------------------------------------------ GPUs (simulated)

MiB = 2**20
# A long context with small batches: the KV cache (~1 MiB per layer per 1k
# tokens) dominates, so the layer count that fits varies smoothly with VRAM.
GPU_MODEL = {"n_ctx": 16384, "n_batch": 64}


def gpu_estimate(demo_model, n_gpu_layers: int, split=None):
    from hoshikage_sup.gguf import load_model_info
    from hoshikage_sup.memory import estimate

    info = load_model_info(demo_model)
    return estimate(info, n_ctx=GPU_MODEL["n_ctx"], n_batch=GPU_MODEL["n_batch"], n_gpu_layers=n_gpu_layers,
                    tensor_split=split, flash_attn=True), info


async def test_auto_layers_partial_offload_under_limited_vram(make_server, http, demo_model):
    free = 800 * MiB
    sim = SimulatedSource([(8 * GiB, free)], system_total=64 * GiB)
    h = await make_server({"m": GPU_MODEL}, devices=sim)
    await chat(http, h.url, "m")
    [proc] = h.spawner.processes
    layers = proc.spec.n_gpu_layers
    full, info = gpu_estimate(demo_model, -1)
    assert 0 < layers < info.block_count + 1, layers  # some, not all
    assert proc.spec.tensor_split is None and proc.spec.flash_attn is True
    # As many as fit: one more layer would not.
    here, _ = gpu_estimate(demo_model, layers)
    more, _ = gpu_estimate(demo_model, layers + 1)
    assert here.gpu_bytes[0] <= free < more.gpu_bytes[0]
    [snap] = h.scheduler.status().models
    assert snap.replicas[0].estimate_gpu_bytes == {0: here.gpu_bytes[0]}


async def test_auto_layers_split_across_two_gpus(make_server, http, demo_model):
    # Neither GPU holds every layer alone; the two together do.
    sim = SimulatedSource([(8 * GiB, 800 * MiB), (8 * GiB, 800 * MiB)], system_total=64 * GiB)
    h = await make_server({"m": GPU_MODEL}, devices=sim)
    await chat(http, h.url, "m")
    [proc] = h.spawner.processes
    full, info = gpu_estimate(demo_model, -1)
    assert sum(full.gpu_bytes) > 800 * MiB
    assert proc.spec.n_gpu_layers == info.block_count + 1  # everything, the output layer included
    assert proc.spec.tensor_split == pytest.approx((0.5, 0.5))
    [snap] = h.scheduler.status().models
    per_gpu = snap.replicas[0].estimate_gpu_bytes
    assert set(per_gpu) == {0, 1} and all(b <= 800 * MiB for b in per_gpu.values())


class GpuDriver:
    """Makes fake runners use simulated VRAM: a runner takes its planned GPU
    memory once it is up and keeps it after it stops, until the test releases
    it (`sim.exit_process`), as a slow driver would."""

    def __init__(self, sim: SimulatedSource):
        self.sim = sim
        self.handle = None
        self.stopped_at: dict[str, float] = {}
        self.spawned_at: dict[str, float] = {}

    def __call__(self, proc) -> None:
        name = proc.spec.model_name
        self.spawned_at[name] = time.monotonic()
        start, stop = proc.start, proc.stop

        async def started(**kw):
            await start(**kw)
            for slot in self.handle.scheduler.slots.values():
                for r in slot.replicas:
                    if r.process is proc:
                        for gpu, nbytes in r.plan.gpu_bytes.items():
                            self.sim.allocate(gpu, nbytes, proc.pid)

        async def stopped(grace: float = 5.0):
            code = await stop(grace)
            self.stopped_at.setdefault(name, time.monotonic())
            return code

        proc.start, proc.stop = started, stopped


async def gpu_server(make_server, fake_runner_command, demo_model, models, **kw):
    """A server on one simulated GPU with room for one fully offloaded runner."""
    from conftest import FakeSpawner

    full, info = gpu_estimate(demo_model, -1)
    total = sum(full.gpu_bytes) + 100 * MiB
    sim = SimulatedSource([(total, total)], system_total=64 * GiB)
    driver = GpuDriver(sim)
    spawner = FakeSpawner(fake_runner_command)
    spawner.on_spawn = driver
    h = await make_server(models, devices=sim, spawner=spawner, **kw)
    driver.handle = h
    return h, sim, driver, info


async def test_next_load_waits_for_gpu_memory_and_loaded_models_keep_serving(
    make_server, http, fake_runner_command, demo_model
):
    # The driver keeps a's memory until the test lets it go.
    h, sim, driver, info = await gpu_server(
        make_server, fake_runner_command, demo_model,
        {"a": GPU_MODEL, "b": GPU_MODEL, "cpu": {"n_gpu_layers": 0, "pinned": True}},
        server={"max_loaded_models": 2}, memory={"recovery_timeout": 60, "recovery_poll": 0.05},
    )
    await chat(http, h.url, "cpu")
    await chat(http, h.url, "a")
    [a] = h.spawner.of("a")
    assert a.spec.n_gpu_layers == info.block_count + 1
    b = asyncio.create_task(chat(http, h.url, "b"))
    await wait_until(lambda: "a" in driver.stopped_at, what="a to be stopped")
    # While b waits for a's memory, the loaded model answers without waiting.
    for _ in range(3):
        await chat(http, h.url, "cpu", fake={"tokens": 1})
    assert not b.done() and "b" not in driver.spawned_at
    released = time.monotonic()
    sim.exit_process(a.pid, after=1.0, steps=4)  # 25% every 0.25 s: 75% back after 0.75 s
    await asyncio.wait_for(b, DEADLINE)
    assert driver.spawned_at["b"] - released >= 0.75
    # b got GPU layers, not the ~100 MiB that were free right after the stop.
    assert h.spawner.of("b")[0].spec.n_gpu_layers > 0


async def test_load_proceeds_after_the_recovery_timeout(make_server, http, fake_runner_command, demo_model):
    timeout = 1.0
    h, sim, driver, info = await gpu_server(
        make_server, fake_runner_command, demo_model,  # a's memory never comes back
        {"a": GPU_MODEL, "b": GPU_MODEL},
        server={"max_loaded_models": 1}, memory={"recovery_timeout": timeout, "recovery_poll": 0.05},
    )
    await chat(http, h.url, "a")
    await chat(http, h.url, "b")
    assert driver.spawned_at["b"] - driver.stopped_at["a"] >= timeout
    # The memory is still held: b was placed on what was free, the CPU.
    assert h.spawner.of("b")[0].spec.n_gpu_layers == 0



# ------------------------------------------------------------------ what can never load


def cpu_plan(demo_model, **model):
    """The planner's plan for a model on the demo GGUF, on a GPU-less machine."""
    from hoshikage_sup.config import parse_config
    from hoshikage_sup.planner import MemoryPlanner
    from hoshikage_sup.scheduler import RunnerOptions

    cfg = parse_config({"models": {"m": {"path": str(demo_model), "n_ctx": 256, **model}}})
    m = cfg.models["m"]
    return MemoryPlanner(cfg, SimulatedSource(system_total=64 * GiB)).plan(m, RunnerOptions.for_model(m), [])


async def test_no_room_beside_pinned_models_is_an_error_not_a_wait(make_server, http, demo_model):
    from hoshikage_sup.durations import format_size
    from hoshikage_sup.memory import RunnerFootprint, usage

    plan = cpu_plan(demo_model)
    one = RunnerFootprint(plan.weights_key, plan.weights_cpu, plan.cpu_bytes)
    alone, two = usage([one]).cpu_bytes, usage([one, one]).cpu_bytes
    limit = (alone + two) // 2  # x fits alone, not beside the pinned p
    h = await make_server({"p": {"pinned": True, "preload": True}, "x": {}},
                          memory={"limit": limit, "system_reserve": 0})
    await wait_until(lambda: ready_pids(h.scheduler, "p"), what="the preloaded model")
    status, body, _ = await asyncio.wait_for(post(http, h.url, chat_body("x")), 20)
    assert status == 507
    message = assert_openai_error(body, contains="pinned")
    assert format_size(limit - alone) in message  # what the limit leaves beside p
    assert loaded(h.scheduler) == {"p"} and not h.scheduler.pending


async def test_no_model_slot_beside_pinned_models_is_an_error_not_a_wait(make_server, http):
    h = await make_server({"p": {"pinned": True, "preload": True}, "x": {}}, server={"max_loaded_models": 1})
    await wait_until(lambda: ready_pids(h.scheduler, "p"), what="the preloaded model")
    status, body, _ = await asyncio.wait_for(post(http, h.url, chat_body("x")), 20)
    assert status >= 500
    assert_openai_error(body, contains="max_loaded_models")
    assert "'p'" in body["error"]["message"]
    assert loaded(h.scheduler) == {"p"} and not h.scheduler.pending
