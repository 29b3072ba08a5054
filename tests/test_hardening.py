"""No request, client or runner can break the daemon for others.

One regression test per way it broke before (absurd numbers poisoning the
scheduler, one client's options failing others, keep_alive breaking
/api/ps, streams that ended as if they had succeeded, a grammar crashing a
runner, client errors answered as 5xx), plus API keys.  Supervisors run in
the test's event loop with fake runners (tests/fake_runner.py), except the
grammar test, which needs llama.cpp's real parser behind the runner.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
from typing import Any

import aiohttp
import pytest

from httputil import post_json

DEADLINE = 60.0  # a bound against hangs, never a performance claim


def chat_body(model: str, text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def openai_error(body: Any) -> dict[str, Any]:
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    err = body["error"]
    assert set(err) >= {"message", "type", "param", "code"} and isinstance(err["message"], str), err
    return err


def ollama_error(body: Any) -> str:
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
    return body["error"]


async def sse_events(resp: aiohttp.ClientResponse) -> list[bytes]:
    raw = (await resp.read()).replace(b"\r\n", b"\n")
    out = []
    for event in raw.split(b"\n\n"):
        data = b"\n".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:"))
        if data:
            out.append(data)
    return out


async def all_is_well(h, http) -> None:
    """The scheduler's invariants hold and both APIs still serve."""
    await h.scheduler.wait_idle(DEADLINE)
    assert h.scheduler.invariants() == []
    async with http.get(h.url + "/api/ps") as r:
        assert r.status == 200, await r.text()
    for model in h.server.config.models:
        status, body, _ = await post_json(http, h.url + "/v1/chat/completions", chat_body(model))
        assert status == 200, body


# ------------------------------------------------------------------ 1. one request poisons nothing


async def test_an_absurd_num_ctx_is_a_400_and_everyone_else_goes_on(make_server, http):
    h = await make_server({"m1": {}, "m2": {}})
    await post_json(http, h.url + "/v1/chat/completions", chat_body("m1"))  # m1 loaded, m2 not
    for model in ("m1", "m2"):
        body = {"model": model, "prompt": "hi", "stream": False, "options": {"num_ctx": 10**400}}
        status, answer, _ = await post_json(http, h.url + "/api/generate", body)
        assert status == 400, answer
        message = ollama_error(answer)
        assert "num_ctx" in message and "from 1 to" in message and "401 digits" in message, message
    status, answer, _ = await post_json(http, h.url + "/v1/chat/completions", chat_body("m1", max_tokens=10**400))
    assert status == 400 and openai_error(answer)["param"] == "max_tokens"
    await all_is_well(h, http)


async def test_a_failure_while_deciding_fails_that_request_alone(make_server, http, monkeypatch):
    """Whatever goes wrong inside the scheduling pass for one request (here a
    planner that blows up on one num_ctx, and a keep_alive step that blows up
    for a loaded model) answers that request and leaves the pass, the leases
    and every other request alone."""
    h = await make_server({"m1": {}, "m2": {}})
    planner = h.scheduler.planner
    real_plan = planner.plan

    def plan(model, options, released):
        if options.n_ctx == 777:
            raise OverflowError("int too large to convert to float")
        return real_plan(model, options, released)

    monkeypatch.setattr(planner, "plan", plan)
    real_keep_alive = h.scheduler._apply_keep_alive

    def apply_keep_alive(slot, p):
        if p.keep_alive == 4242:
            raise RuntimeError("a bug")
        return real_keep_alive(slot, p)

    monkeypatch.setattr(h.scheduler, "_apply_keep_alive", apply_keep_alive)
    await post_json(http, h.url + "/v1/chat/completions", chat_body("m1"))
    ordinary = [asyncio.ensure_future(post_json(http, h.url + "/v1/chat/completions", chat_body(m, fake={"delay": 0.05})))
                for m in ("m1", "m2", "m1", "m2")]
    poisoned = await asyncio.gather(
        post_json(http, h.url + "/api/generate", {"model": "m2", "prompt": "x", "stream": False, "options": {"num_ctx": 777}}),
        post_json(http, h.url + "/v1/chat/completions", chat_body("m1", keep_alive=4242)),
    )
    (s1, b1, _), (s2, b2, _) = poisoned
    assert s1 == 500 and "int too large" in ollama_error(b1)
    assert s2 == 500 and "a bug" in openai_error(b2)["message"]
    for status, body, _ in await asyncio.gather(*ordinary):
        assert status == 200, body
    assert h.scheduler.counters["scheduling_errors"] >= 1  # the bug; the planner error is a load error
    await all_is_well(h, http)


# ------------------------------------------------------------------ 2. one client's options fail only that client


async def test_options_that_cannot_fit_fail_only_their_request_and_keep_the_runner(make_server, http):
    # The config allows any context, so num_ctx 10^9 passes the edge and meets
    # the memory planner: it cannot fit (terabytes of KV cache) and must fail
    # alone, without draining the loaded runner or failing the others.
    h = await make_server({"m": {"max_num_ctx": 10**9}})
    await post_json(http, h.url + "/v1/chat/completions", chat_body("m"))
    pid = h.scheduler.slots["m"].replicas[0].process.pid
    busy = asyncio.ensure_future(post_json(http, h.url + "/v1/chat/completions", chat_body("m", fake={"tokens": 10, "delay": 0.05})))
    await asyncio.sleep(0.1)
    queued = [asyncio.ensure_future(post_json(http, h.url + "/v1/chat/completions", chat_body("m"))) for _ in range(3)]
    status, body, _ = await post_json(
        http, h.url + "/api/chat",
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": False, "options": {"num_ctx": 10**9}},
    )
    assert status == 507, body
    assert "does not fit" in ollama_error(body)
    for status, body, _ in await asyncio.gather(busy, *queued):
        assert status == 200, body
    assert [r.process.pid for r in h.scheduler.slots["m"].replicas] == [pid]  # never drained for it
    status, body, _ = await post_json(
        http, h.url + "/api/generate", {"model": "m", "prompt": "x", "options": {"num_batch": 2**40}, "stream": False}
    )
    assert status == 400 and "num_batch" in ollama_error(body)
    assert [r.process.pid for r in h.scheduler.slots["m"].replicas] == [pid]
    await all_is_well(h, http)


# ------------------------------------------------------------------ 3. keep_alive cannot break /api/ps


@pytest.mark.parametrize("keep_alive", [1e12, 1e308, 2**70, "99999999999h"])
async def test_an_absurd_keep_alive_is_forever_and_ps_still_answers(make_server, http, keep_alive):
    h = await make_server({"m": {}})
    status, body, _ = await post_json(http, h.url + "/v1/chat/completions", chat_body("m", keep_alive=keep_alive))
    assert status == 200, body
    async with http.get(h.url + "/api/ps") as r:
        assert r.status == 200
        ps = await r.json()
    assert ps["models"][0]["keep_alive"] == "forever"
    assert ps["models"][0]["expires_at"].startswith("2")


# ------------------------------------------------------------------ 4. streams end honestly


async def test_a_stream_that_fails_before_its_first_event_gets_a_status_not_a_200(make_server, http):
    h = await make_server({"m": {}})
    # The runner refuses the request (as it does a prompt over the context).
    for path, body in (
        ("/v1/chat/completions", chat_body("m", stream=True, fake={"fail": 400})),
        ("/v1/completions", {"model": "m", "prompt": "x", "stream": True, "fake": {"fail": 400}}),
    ):
        status, answer, _ = await post_json(http, h.url + path, body)
        assert status == 400, answer
        assert openai_error(answer)["type"] == "invalid_request_error"
    # The runner dies before its first event: 502 with the reason, not an empty 200.
    status, answer, _ = await post_json(
        http, h.url + "/v1/completions", {"model": "m", "prompt": "x", "stream": True, "fake": {"tokens": 1, "crash": True}}
    )
    assert status == 502, answer
    assert "GGML_ASSERT" in openai_error(answer)["message"]
    await all_is_well(h, http)


async def test_a_stream_cut_after_it_began_ends_with_an_error_event_and_done(make_server, http):
    h = await make_server({"m": {}})
    async with http.post(h.url + "/v1/chat/completions", json=chat_body("m", stream=True, fake={"tokens": 6, "crash": True})) as r:
        assert r.status == 200
        events = await sse_events(r)
    assert events[-1] == b"[DONE]", events
    err = openai_error(json.loads(events[-2]))
    assert err["type"] == "server_error" and "GGML_ASSERT" in err["message"]
    assert all("choices" in json.loads(e) for e in events[:-2])
    await all_is_well(h, http)


async def test_a_runner_error_body_is_rewrapped_in_the_apis_shape(make_server, http):
    h = await make_server({"m": {}})
    for fail, expected in ((500, 502), (422, 400), (404, 404)):
        status, answer, _ = await post_json(http, h.url + "/v1/chat/completions", chat_body("m", fake={"fail": fail}))
        assert status == expected, answer
        err = openai_error(answer)
        assert "fake failure requested by the test" in err["message"]
    await all_is_well(h, http)


# ------------------------------------------------------------------ 6. client errors are 4xx


async def test_client_mistakes_are_4xx_in_the_apis_shape(make_server, http):
    h = await make_server({"m": {}, "e": {"embedding": True}})
    deep = "[" * 5000 + "]" * 5000
    for path in ("/v1/chat/completions", "/api/chat"):
        status, answer, _ = await post_json(http, h.url + path, '{"model": "m", "messages": ' + deep + "}")
        assert status == 400, answer
        message = ollama_error(answer) if path.startswith("/api/") else openai_error(answer)["message"]
        assert "deep" in message or "nest" in message, message
    for raw in (b'{"model": "m", "messages": [], "temperature": NaN}', b'{"model": "m", "x": "\\ud800"}'):
        status, answer, _ = await post_json(http, h.url + "/v1/chat/completions", raw)
        assert status == 400, answer
        openai_error(answer)
    async with http.post(h.url + "/v1/chat/completions", data=json.dumps(chat_body("m")).encode(),
                         headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}) as r:
        assert r.status == 400, await r.text()
        assert "gzip" in openai_error(await r.json())["message"]
    async with http.post(h.url + "/v1/chat/completions", data=gzip.compress(json.dumps(chat_body("m")).encode()),
                         headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}) as r:
        assert r.status == 200, await r.text()
    async with http.post(h.url + "/api/chat", data=b"\x0b\x03\x80{}\x03",
                         headers={"Content-Type": "application/json", "Content-Encoding": "br"}) as r:
        assert r.status == 415, await r.text()
        ollama_error(await r.json())
    for path, body in (("/v1/embeddings", {"model": "e", "input": []}), ("/api/embed", {"model": "e", "input": [""]})):
        status, answer, _ = await post_json(http, h.url + path, body)
        assert status == 400, answer
    await all_is_well(h, http)


# ------------------------------------------------------------------ 8. API keys


async def test_api_keys_guard_the_apis_but_not_health(make_server, http):
    h = await make_server({"m": {}}, server={"api_keys": ["k-one", "k-two"]})
    async with http.get(h.url + "/health") as r:
        assert r.status == 200
    async with http.get(h.url + "/") as r:
        assert r.status == 200 and await r.text() == "Ollama is running"
    for headers in ({}, {"Authorization": "Bearer nope"}, {"x-api-key": "k-one "[:-2]}, {"Authorization": "Basic k-one"}):
        async with http.get(h.url + "/v1/models", headers=headers) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert openai_error(await r.json())["code"] == "invalid_api_key"
        async with http.get(h.url + "/api/tags", headers=headers) as r:
            assert r.status == 401
            ollama_error(await r.json())
        async with http.get(h.url + "/metrics", headers=headers) as r:
            assert r.status == 401
    for headers in ({"Authorization": "Bearer k-one"}, {"x-api-key": "k-two"}):
        async with http.get(h.url + "/v1/models", headers=headers) as r:
            assert r.status == 200
        async with http.post(h.url + "/api/chat", headers=headers, json={
                "model": "m", "messages": [{"role": "user", "content": "x"}], "stream": False}) as r:
            assert r.status == 200, await r.text()


async def test_no_keys_is_open(make_server, http):
    h = await make_server({"m": {}})
    async with http.get(h.url + "/v1/models") as r:
        assert r.status == 200


# ------------------------------------------------------------------ 8. slow clients


async def test_slow_and_idle_clients_are_cut_off_and_others_are_served(make_server, http):
    h = await make_server({"m": {}}, server={
        "header_timeout": "0.5s", "body_timeout": "0.5s", "body_deadline": "1.5s", "idle_timeout": "0.5s",
    })
    port = h.server.port

    async def slow(kind: str) -> float:
        """Open a connection that misbehaves; seconds until the server closes it."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        t0 = asyncio.get_running_loop().time()
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        try:
            if kind == "headers":  # one header byte at a time
                for b in head:
                    writer.write(bytes([b]))
                    await writer.drain()
                    await asyncio.sleep(0.1)
            elif kind == "body":  # a body at one byte per 0.3 s: never idle long, never done
                writer.write(head + b"Content-Length: 1000\r\n\r\n")
                for _ in range(1000):
                    writer.write(b" ")
                    await writer.drain()
                    await asyncio.sleep(0.3)
            else:  # connect and say nothing
                await reader.read()
        except (ConnectionError, OSError):
            pass
        else:
            await reader.read()  # whatever the server said before closing
        writer.close()
        return asyncio.get_running_loop().time() - t0

    tasks = [asyncio.ensure_future(slow(k)) for k in ("headers", "body", "idle") for _ in range(30)]
    await asyncio.sleep(0.2)
    status, body, _ = await post_json(http, h.url + "/v1/chat/completions", chat_body("m"))
    assert status == 200, body
    cut = await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE)
    assert max(cut) < 10, cut  # every one closed by a limit (1.5 s at most here), none held
    await all_is_well(h, http)


# ------------------------------------------------------------------ 5. a grammar cannot crash a runner


@pytest.mark.model
async def test_grammars_that_crashed_the_runner_are_400s_on_the_real_model(make_server, http):
    """Each of these once killed the runner (SIGSEGV at set-up, or an abort
    while sampling); now they are 400s and the same runner goes on serving."""
    h = await make_server({"gemma": {"n_threads": 1, "chat_format": "gemma"}}, real=True)
    server = h.server
    url = h.url
    ok = {"model": "gemma", "prompt": "Answer yes or no:", "max_tokens": 4, "grammar": 'root ::= "yes" | "no"'}
    status, body, _ = await post_json(http, url + "/v1/completions", ok)
    assert status == 200, body
    assert body["choices"][0]["text"] in ("yes", "no")
    pid = server.scheduler.slots["gemma"].replicas[0].process.pid
    for grammar in ("root ::= (", "root ::= foo", "root ::= [z-a]", 'root ::= "\\x00"', "root ::= <[999999]>"):
        for path, extra in (("/v1/completions", {"prompt": "x"}),
                            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
            status, body, _ = await post_json(http, url + path, {"model": "gemma", "max_tokens": 4,
                                                                 "grammar": grammar, **extra})
            assert status == 400, (grammar, body)
            assert body["error"]["param"] == "grammar", body
    status, body, _ = await post_json(http, url + "/v1/completions", ok)
    assert status == 200, body
    assert server.scheduler.slots["gemma"].replicas[0].process.pid == pid
    assert server.scheduler.counters["crashes"] == 0

    # A runner that dies without a word (SIGSEGV mid-generation) is
    # explained by its exit, not by the timing lines it printed before.
    long = asyncio.ensure_future(post_json(http, url + "/v1/completions", {
        "model": "gemma", "prompt": "Count:", "max_tokens": 200, "temperature": 0}))
    await asyncio.sleep(0.5)
    os.kill(pid, signal.SIGSEGV)
    status, body, _ = await long
    assert status == 502, body
    message = body["error"]["message"]
    assert "SIGSEGV" in message, message
    assert "llama_perf" not in message and "time =" not in message, message


# ------------------------------------------------------------------ 4. overflow on the real model, every endpoint


@pytest.mark.model
async def test_a_prompt_over_the_context_is_a_400_with_the_numbers_everywhere(make_server, http):
    h = await make_server({"gemma": {"n_threads": 1, "chat_format": "gemma"},
                           "emb": {"n_threads": 1, "embedding": True}}, real=True)
    server, url = h.server, h.url
    long = "star light " * 400  # about 800 tokens, over n_ctx 256
    cases = [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": long}], "stream": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": long}]}),
        ("/v1/completions", {"prompt": long, "stream": True}),
        ("/api/chat", {"messages": [{"role": "user", "content": long}]}),  # Ollama streams by default
        ("/api/generate", {"prompt": long, "stream": False}),
    ]
    for path, body in cases:
        status, answer, headers = await post_json(http, url + path, {"model": "gemma", **body})
        assert status == 400, (path, body.get("stream"), answer)
        message = ollama_error(answer) if path.startswith("/api/") else openai_error(answer)["message"]
        assert "256" in message and "None" not in message, message
        assert headers["Content-Type"].startswith("application/json")
    for path, body in (("/v1/embeddings", {"input": long}), ("/api/embed", {"input": [long]})):
        status, answer, _ = await post_json(http, url + path, {"model": "emb", **body})
        assert status == 400, (path, answer)
        status, answer, _ = await post_json(http, url + path, {"model": "emb", "truncate": True, **body})
        assert status == 200, (path, answer)
    assert server.scheduler.counters["crashes"] == 0
