"""The Ollama layer (/api/...) over HTTP, with fake runners (`make_server` in conftest.py).

Shapes are checked against the fields Ollama documents and its python client
parses (ollama/_types.py); the client itself (`ollama.AsyncClient`) also reads
a few answers here.  What the layer sends to a runner is observed by wrapping
the gateway's call to a runner (`Recorder`), which can also add the fake
runner's per-request `"fake"` instructions to the body.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import re
import time
from datetime import datetime
from typing import Any

import aiohttp
import ollama
import pytest

from hoshikage_sup.api import ollama_shapes as shapes
from hoshikage_sup.config import ModelConfig
from hoshikage_sup.devices import CpuSource
from httputil import post_json

DEADLINE = 60.0
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)$")
FINAL_FIELDS = {"model", "created_at", "done", "done_reason", "total_duration", "load_duration",
                "eval_count", "eval_duration"}
MODELS = {
    "gemma": {"aliases": ["gemma3:270m"], "chat_format": "gemma", "options": {"temperature": 0.5, "top_k": 7}},
    "embed": {"embedding": True},
}


class Recorder:
    """Wraps `Gateway.post_to_runner` (the gateway's call to a runner): records
    (path, body) of every runner call and merges `inject` into the body as `"fake"`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.inject: dict[str, Any] = {}

    def wrap(self, gateway: Any) -> None:
        original = gateway.post_to_runner

        async def post(process: Any, path: str, body: bytes, **kw: Any):
            sent = json.loads(body)
            self.calls.append((path, copy.deepcopy(sent)))
            if self.inject:
                body = json.dumps({**sent, "fake": self.inject}).encode()
            return await original(process, path, body, **kw)

        gateway.post_to_runner = post

    def last(self) -> tuple[str, dict[str, Any]]:
        return self.calls[-1]


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as s:
        yield s


@pytest.fixture
async def srv(make_server):
    handle = await make_server(MODELS)
    handle.recorder = Recorder()
    handle.recorder.wrap(handle.gateway)
    return handle


async def post(http, url: str, path: str, body: Any) -> tuple[int, Any, Any]:
    return await post_json(http, url + path, body)


async def ndjson(http, url: str, path: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], Any]:
    """POST a streaming request; every line must be one complete JSON object."""
    async with http.post(url + path, json=body) as r:
        assert r.status == 200, await r.text()
        raw = await r.read()
        headers = r.headers
    assert raw.endswith(b"\n"), raw
    lines = [json.loads(line) for line in raw.split(b"\n")[:-1]]
    assert all(isinstance(x, dict) for x in lines)
    return lines, headers


def check_final(obj: dict[str, Any], model: str, reason: str = "stop") -> None:
    assert obj["done"] is True and obj["done_reason"] == reason, obj
    assert FINAL_FIELDS <= set(obj), obj
    assert obj["model"] == model
    assert RFC3339.match(obj["created_at"]), obj["created_at"]
    for key in ("total_duration", "load_duration", "eval_count", "eval_duration"):
        assert isinstance(obj[key], int) and obj[key] >= 0, (key, obj)
    assert obj["total_duration"] >= obj["eval_duration"]


def check_error(status: int, body: Any, expect: int, contains: str = "") -> str:
    assert status == expect, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], str), body
    assert contains in body["error"], body
    return body["error"]


async def ps(http, url) -> list[dict[str, Any]]:
    async with http.get(url + "/api/ps") as r:
        assert r.status == 200
        return (await r.json())["models"]


# ------------------------------------------------------------------ probes and listings


async def test_root_and_version(srv, http):
    for method in ("GET", "HEAD"):
        async with http.request(method, srv.url + "/") as r:
            assert r.status == 200
            assert (await r.text()) == ("Ollama is running" if method == "GET" else "")
    async with http.get(srv.url + "/api/version") as r:
        assert isinstance((await r.json())["version"], str)


async def test_tags_lists_every_name_and_alias(srv, http, demo_model):
    async with http.get(srv.url + "/api/tags") as r:
        assert r.status == 200
        models = (await r.json())["models"]
    names = [m["name"] for m in models]
    assert names == ["gemma", "gemma3:270m", "embed"]
    for m in models:
        assert m["model"] == m["name"]
        assert m["size"] == demo_model.stat().st_size
        assert re.fullmatch(r"[0-9a-f]{64}", m["digest"])
        assert RFC3339.match(m["modified_at"])
        assert m["details"] == {"parent_model": "", "format": "gguf", "family": "gemma3", "families": ["gemma3"],
                                "parameter_size": "268M", "quantization_level": "Q4_K_M"}
    # Ollama's own client parses it
    listed = await ollama.AsyncClient(host=srv.url).list()
    assert [m.model for m in listed.models] == names
    assert listed.models[0].details.family == "gemma3"


async def test_show(srv, http):
    status, body, _ = await post(http, srv.url, "/api/show", {"model": "gemma3:270m"})
    assert status == 200, body
    assert body["capabilities"] == ["completion"]
    assert body["details"]["family"] == "gemma3"
    info = body["model_info"]
    assert info["general.architecture"] == "gemma3"
    assert info["gemma3.context_length"] == 32768
    assert info["general.parameter_count"] > 200_000_000
    assert "tokenizer.ggml.tokens" in info and info["tokenizer.ggml.tokens"] is None  # not materialised
    params = dict(line.split(None, 1) for line in body["parameters"].splitlines())
    assert params == {"num_ctx": "256", "temperature": "0.5", "top_k": "7"}
    assert body["template"] == "gemma"
    assert "FROM " in body["modelfile"]
    assert RFC3339.match(body["modified_at"])
    # the legacy `name` field, and an embedding model's capabilities
    status, body, _ = await post(http, srv.url, "/api/show", {"name": "embed"})
    assert status == 200 and body["capabilities"] == ["embedding"]
    shown = await ollama.AsyncClient(host=srv.url).show("gemma")
    assert shown.modelinfo["general.architecture"] == "gemma3" and shown.capabilities == ["completion"]
    check_error(*(await post(http, srv.url, "/api/show", {"model": "nope"}))[:2], 404, "model 'nope' not found")


# ------------------------------------------------------------------ generate


async def test_generate_not_streamed(srv, http):
    status, body, headers = await post(
        http, srv.url, "/api/generate",
        {"model": "gemma3:270m", "prompt": "Why is the sky blue?", "system": "Be brief.", "stream": False},
    )
    assert status == 200, body
    assert headers["Content-Type"].startswith("application/json")
    check_final(body, "gemma3:270m")
    assert body["response"] == "Hello from the fake runner, one token"  # FAKE_TOKENS=8 words
    assert body["eval_count"] == 8 and body["prompt_eval_count"] >= 1
    assert "context" not in body
    # non-raw: the chat endpoint, system + user, so the model's chat format applies
    path, sent = srv.recorder.last()
    assert path == "/v1/chat/completions"
    assert sent["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Why is the sky blue?"}]
    assert sent["stream"] is False and sent["model"] == "gemma"


async def test_generate_streams_ndjson_line_by_line(make_server, http):
    handle = await make_server(MODELS, env={"FAKE_TOKEN_DELAY": "0.25", "FAKE_TOKENS": "6"})
    async with http.post(handle.url + "/api/generate", json={"model": "gemma", "prompt": "hi"}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/x-ndjson"
        t0 = time.monotonic()
        first = json.loads(await r.content.readline())
        t_first = time.monotonic() - t0
        rest = [json.loads(line) for line in (await r.read()).split(b"\n") if line]
        t_all = time.monotonic() - t0
    # the first token arrived as a complete line long before generation ended
    assert first["done"] is False and first["response"] == "Hello"
    assert t_all - t_first >= 0.25 * 4, (t_first, t_all)
    lines = [first, *rest]
    assert all(x["done"] is False and set(x) == {"model", "created_at", "response", "done"} for x in lines[:-1])
    assert "".join(x["response"] for x in lines) == "Hello from the fake runner,"
    final = lines[-1]
    check_final(final, "gemma")
    assert final["response"] == "" and final["eval_count"] == 6
    assert final["eval_duration"] >= 0.2 * 5 * 1e9  # first token to last
    assert final["prompt_eval_duration"] > 0


async def test_raw_generate_goes_to_completions_unchanged(srv, http):
    status, body, _ = await post(
        http, srv.url, "/api/generate",
        {"model": "gemma", "prompt": "<start_of_turn>user\nhi", "raw": True, "system": "ignored", "stream": False,
         "options": {"num_predict": 3}},
    )
    assert status == 200, body
    check_final(body, "gemma", "length")
    assert body["eval_count"] == 3
    path, sent = srv.recorder.last()
    assert path == "/v1/completions"
    assert sent["prompt"] == "<start_of_turn>user\nhi" and sent["max_tokens"] == 3
    # a suffix is a fill-in-the-middle request: /v1/completions with `suffix`
    lines, _ = await ndjson(http, srv.url, "/api/generate", {"model": "gemma", "prompt": "def f(", "suffix": "):"})
    check_final(lines[-1], "gemma")
    path, sent = srv.recorder.last()
    assert path == "/v1/completions" and sent["suffix"] == "):" and sent["stream"] is True


async def test_options_are_translated(srv, http):
    options = {
        "temperature": 0.1, "top_p": 0.5, "min_p": 0.01, "seed": 42, "repeat_penalty": 1.3,
        "presence_penalty": 0.2, "frequency_penalty": 0.4, "mirostat": 2, "mirostat_tau": 4.0,
        "mirostat_eta": 0.2, "stop": ["\n\n", "User:"], "num_predict": -1,
        "typical_p": 0.9, "tfs_z": 1.0, "repeat_last_n": 64, "no_such_option": 1,  # ignored
    }
    status, body, _ = await post(http, srv.url, "/api/chat", {
        "model": "gemma", "stream": False, "format": "json", "options": options,
        "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200, body
    _, sent = srv.recorder.last()
    expected = {
        "temperature": 0.1, "top_p": 0.5, "min_p": 0.01, "seed": 42, "repeat_penalty": 1.3,
        "presence_penalty": 0.2, "frequency_penalty": 0.4, "mirostat_mode": 2, "mirostat_tau": 4.0,
        "mirostat_eta": 0.2, "stop": ["\n\n", "User:"], "max_tokens": None,
        "top_k": 7,  # from the model's options table, under the request's
    }
    assert {k: sent.get(k) for k in expected} == expected
    assert sent["response_format"] == {"type": "json_object"}
    for ignored in ("typical_p", "tfs_z", "repeat_last_n", "no_such_option", "options"):
        assert ignored not in sent
    # a JSON schema, and the model's defaults when the request has none
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    await post(http, srv.url, "/api/chat", {"model": "gemma", "stream": False, "format": schema,
                                            "messages": [{"role": "user", "content": "hi"}]})
    _, sent = srv.recorder.last()
    assert sent["response_format"] == {"type": "json_object", "schema": schema}
    assert sent["temperature"] == 0.5 and sent["top_k"] == 7 and sent["max_tokens"] is None


async def test_num_predict_stops_with_length(srv, http):
    lines, _ = await ndjson(http, srv.url, "/api/chat", {
        "model": "gemma", "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 2}})
    assert [x["message"] for x in lines[:-1]] == [{"role": "assistant", "content": "Hello"},
                                                  {"role": "assistant", "content": " from"}]
    check_final(lines[-1], "gemma", "length")
    assert lines[-1]["eval_count"] == 2 and lines[-1]["message"] == {"role": "assistant", "content": ""}


# ------------------------------------------------------------------ chat


async def test_chat_streamed_and_not(srv, http):
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]
    lines, headers = await ndjson(http, srv.url, "/api/chat", {"model": "gemma", "messages": messages})
    assert headers["Content-Type"] == "application/x-ndjson"
    assert all(set(x) == {"model", "created_at", "message", "done"} for x in lines[:-1])
    assert "".join(x["message"]["content"] for x in lines) == "Hello from the fake runner, one token"
    check_final(lines[-1], "gemma")
    _, sent = srv.recorder.last()
    assert sent["messages"] == messages and sent["stream"] is True

    status, body, _ = await post(http, srv.url, "/api/chat", {"model": "gemma", "messages": messages, "stream": False})
    assert status == 200
    check_final(body, "gemma")
    assert body["message"] == {"role": "assistant", "content": "Hello from the fake runner, one token"}
    assert body["eval_count"] == 8

    client = ollama.AsyncClient(host=srv.url)
    reply = await client.chat("gemma", messages=messages, options={"num_predict": 3})
    assert reply.message.content == "Hello from the" and reply.done_reason == "length"
    parts = [p async for p in await client.chat("gemma", messages=messages, stream=True)]
    assert parts[-1].done and parts[-1].eval_count == 8


async def test_chat_tools_are_translated_both_ways(srv, http):
    tools = [{"type": "function", "function": {"name": "weather", "description": "d",
                                               "parameters": {"type": "object", "properties": {}}}}]
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "sunny", "tool_name": "weather"},
    ]
    status, body, _ = await post(http, srv.url, "/api/chat", {"model": "gemma", "messages": messages, "tools": tools,
                                                               "stream": False})
    assert status == 200, body
    _, sent = srv.recorder.last()
    assert sent["tools"] == tools
    call = sent["messages"][1]["tool_calls"][0]
    assert call["type"] == "function" and call["function"] == {"name": "weather", "arguments": '{"city": "Oslo"}'}
    assert sent["messages"][2] == {"role": "tool", "content": "sunny", "tool_call_id": call["id"]}


def test_tool_call_shapes():
    assert shapes.ollama_tool_calls([{"id": "x", "type": "function",
                                      "function": {"name": "f", "arguments": '{"a": 1}'}}]) == [
        {"function": {"name": "f", "arguments": {"a": 1}}}]
    acc = shapes.ToolCallAccumulator()
    acc.add([{"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a"'}}])
    acc.add([{"index": 0, "function": {"arguments": ': 2}'}}])
    assert acc.result() == [{"function": {"name": "f", "arguments": {"a": 2}}}]
    assert shapes.ollama_tool_calls([{"function": {"name": "f", "arguments": "not json"}}]) == [
        {"function": {"name": "f", "arguments": {"_raw": "not json"}}}]


# ------------------------------------------------------------------ load, unload, runner options


async def test_empty_prompt_loads_and_keep_alive_0_unloads(srv, http):
    status, body, _ = await post(http, srv.url, "/api/generate", {"model": "gemma", "stream": False})
    assert status == 200, body
    assert body["done"] is True and body["done_reason"] == "load" and body["response"] == ""
    assert body["load_duration"] > 0
    [entry] = await ps(http, srv.url)
    assert entry["name"] == "gemma" and entry["state"] == "idle" and len(entry["pids"]) == 1
    assert srv.recorder.calls == []  # loading sends nothing to the runner

    lines, _ = await ndjson(http, srv.url, "/api/generate", {"model": "gemma3:270m", "prompt": "", "keep_alive": 0})
    assert len(lines) == 1 and lines[0]["done_reason"] == "unload" and lines[0]["model"] == "gemma3:270m"
    assert await ps(http, srv.url) == []

    # chat: empty messages, the same way
    status, body, _ = await post(http, srv.url, "/api/chat", {"model": "gemma", "messages": [], "stream": False})
    assert body["done_reason"] == "load" and body["message"] == {"role": "assistant", "content": ""}
    assert [m["name"] for m in await ps(http, srv.url)] == ["gemma"]
    status, body, _ = await post(http, srv.url, "/api/chat", {"model": "gemma", "keep_alive": "0s", "stream": False})
    assert body["done_reason"] == "unload"
    assert await ps(http, srv.url) == []


async def test_ps_shape_and_keep_alive(srv, http):
    await post(http, srv.url, "/api/generate", {"model": "gemma", "keep_alive": "10m", "stream": False})
    [entry] = await ps(http, srv.url)
    for key in ("name", "model", "size", "size_vram", "digest", "details", "expires_at", "context_length"):
        assert key in entry, key
    assert entry["size"] > 0 and entry["size_vram"] == 0 and entry["context_length"] == 256
    assert entry["keep_alive"] == "10m" and entry["requests_in_flight"] == 0
    expires = datetime.fromisoformat(entry["expires_at"].replace("Z", "+00:00"))
    assert 500 < expires.timestamp() - time.time() <= 600
    assert entry["estimate_bytes"] > 0 and entry["replicas"][0]["pid"] == entry["pids"][0]
    # negative keep_alive: "forever", shown far in the future as Ollama does
    await post(http, srv.url, "/api/generate", {"model": "gemma", "keep_alive": -1, "stream": False})
    [entry] = await ps(http, srv.url)
    assert entry["keep_alive"] == "forever"
    assert int(entry["expires_at"][:4]) > 2200
    listed = await ollama.AsyncClient(host=srv.url).ps()
    assert listed.models[0].name == "gemma" and listed.models[0].context_length == 256


async def test_ps_shows_the_trained_context_for_n_ctx_zero(make_server, http):
    h = await make_server({"full": {"n_ctx": 0}}, devices=CpuSource())  # real RSS, read with psutil
    await post(http, h.url, "/api/generate", {"model": "full", "stream": False})
    [entry] = await ps(http, h.url)
    assert entry["context_length"] == 32768  # Gemma 3 270M's trained context, from the GGUF
    assert entry["measured_bytes"] > 0


async def test_num_ctx_change_reloads_the_runner(srv, http):
    await post(http, srv.url, "/api/generate", {"model": "gemma", "stream": False})
    [before] = await ps(http, srv.url)
    status, body, _ = await post(http, srv.url, "/api/generate", {
        "model": "gemma", "prompt": "hi", "stream": False, "options": {"num_ctx": 512, "num_predict": 1}})
    assert status == 200, body
    [after] = await ps(http, srv.url)
    assert after["context_length"] == 512 and before["context_length"] == 256
    assert after["pids"] != before["pids"]
    assert body["load_duration"] > 0  # this request waited for the reload
    # same options again: no reload
    await post(http, srv.url, "/api/generate", {"model": "gemma", "prompt": "hi", "stream": False,
                                                "options": {"num_ctx": 512, "num_predict": 1}})
    [again] = await ps(http, srv.url)
    assert again["pids"] == after["pids"]


# ------------------------------------------------------------------ embeddings


async def test_embed_and_embeddings(srv, http):
    status, body, _ = await post(http, srv.url, "/api/embed", {"model": "embed", "input": ["a b", "c"]})
    assert status == 200, body
    assert set(body) >= {"model", "embeddings", "total_duration", "load_duration", "prompt_eval_count"}
    assert body["model"] == "embed" and len(body["embeddings"]) == 2
    for v in body["embeddings"]:
        assert len(v) == 8 and math.isclose(math.hypot(*v), 1.0, rel_tol=1e-6)  # normalised like Ollama
    status, one, _ = await post(http, srv.url, "/api/embed", {"model": "embed", "input": "a b", "dimensions": 4})
    assert len(one["embeddings"]) == 1 and len(one["embeddings"][0]) == 4
    assert math.isclose(math.hypot(*one["embeddings"][0]), 1.0, rel_tol=1e-6)
    # the older endpoint: one vector, as the runner made it (not normalised)
    status, old, _ = await post(http, srv.url, "/api/embeddings", {"model": "embed", "prompt": "a b"})
    assert status == 200 and set(old) == {"embedding"}
    assert not math.isclose(math.hypot(*old["embedding"]), 1.0)
    assert shapes.normalize(old["embedding"]) == pytest.approx(body["embeddings"][0])
    # empty input loads the model and embeds nothing
    status, empty, _ = await post(http, srv.url, "/api/embed", {"model": "embed", "input": []})
    assert status == 200 and empty["embeddings"] == []
    res = await ollama.AsyncClient(host=srv.url).embed("embed", ["x"])
    assert len(res.embeddings) == 1
    # a model that is not an embedding model
    check_error(*(await post(http, srv.url, "/api/embed", {"model": "gemma", "input": "x"}))[:2], 400, "embedding")


def test_per_token_embeddings_are_mean_pooled():
    assert shapes.pool([[1.0, 2.0], [3.0, 6.0]]) == [2.0, 4.0]
    assert shapes.pool([1, 2]) == [1.0, 2.0]
    assert shapes.normalize([3.0, 4.0]) == [0.6, 0.8]


# ------------------------------------------------------------------ errors


async def test_error_shapes_and_codes(srv, http):
    url = srv.url
    check_error(*(await post(http, url, "/api/generate", b"{nope"))[:2], 400, "invalid JSON")
    check_error(*(await post(http, url, "/api/generate", {"prompt": "x"}))[:2], 400, "model is required")
    check_error(*(await post(http, url, "/api/chat", {"model": "x:1", "messages": []}))[:2], 404)
    assert (await post(http, url, "/api/chat", {"model": "x:1"}))[1] == {"error": "model 'x:1' not found"}
    msg = check_error(*(await post(http, url, "/api/generate", {"model": "gemma", "keep_alive": "10"}))[:2], 400)
    assert "keep_alive" in msg
    check_error(*(await post(http, url, "/api/generate", {"model": "gemma", "prompt": "x",
                                                           "options": {"temperature": "hot"}}))[:2], 400, "temperature")
    check_error(*(await post(http, url, "/api/generate", {"model": "gemma", "prompt": "x", "stream": "yes"}))[:2], 400, "stream")
    check_error(*(await post(http, url, "/api/generate", {"model": "gemma", "prompt": "x", "format": "xml"}))[:2],
                400, "format")
    check_error(*(await post(http, url, "/api/chat", {"model": "gemma", "messages": [
        {"role": "user", "content": "what is this?", "images": ["aGVsbG8="]}]}))[:2], 400, "vision")
    for path in ("/api/pull", "/api/push", "/api/create", "/api/copy"):
        check_error(*(await post(http, url, path, {"model": "gemma"}))[:2], 501, "config")
    async with http.delete(url + "/api/delete", json={"model": "gemma"}) as r:
        check_error(r.status, await r.json(), 501, "config")
    check_error(*(await post(http, url, "/api/nothing", {}))[:2], 404)
    with pytest.raises(ollama.ResponseError) as e:
        await ollama.AsyncClient(host=url).generate("nope", "hi")
    assert e.value.status_code == 404 and e.value.error == "model 'nope' not found"


async def test_runner_error_status_is_passed_on(srv, http):
    srv.recorder.inject = {"fail": 400}
    status, body, _ = await post(http, srv.url, "/api/generate", {"model": "gemma", "prompt": "x", "stream": False})
    check_error(status, body, 400, "fake failure requested by the test")
    srv.recorder.inject = {"fail": 500}
    status, body, _ = await post(http, srv.url, "/api/chat", {"model": "gemma", "messages": [{"role": "user", "content": "x"}]})
    check_error(status, body, 502, "fake failure")  # the runner failed: Bad Gateway


async def test_failure_after_streaming_began_is_the_last_line(srv, http):
    srv.recorder.inject = {"crash": True, "tokens": 6, "delay": 0.05}
    lines, _ = await ndjson(http, srv.url, "/api/chat", {"model": "gemma", "messages": [{"role": "user", "content": "x"}]})
    assert len(lines) >= 2
    assert all(x["done"] is False for x in lines[:-1])
    assert set(lines[-1]) == {"error"} and "gemma" in lines[-1]["error"]
    srv.recorder.inject = {"crash": True, "tokens": 6, "delay": 0.05}
    with pytest.raises(ollama.ResponseError):
        async for _ in await ollama.AsyncClient(host=srv.url).generate("gemma", "x", stream=True):
            pass


async def test_queue_full_is_503(make_server, http):
    handle = await make_server(MODELS, server={"max_queue": 1}, env={"FAKE_TOKEN_DELAY": "0.2"})
    url = handle.url
    await post(http, url, "/api/generate", {"model": "gemma", "stream": False})  # loaded
    busy = asyncio.ensure_future(post(http, url, "/api/generate", {"model": "gemma", "prompt": "a", "stream": False}))
    deadline = time.monotonic() + DEADLINE
    while handle.scheduler.slots["gemma"].refcount == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    waiting = asyncio.ensure_future(post(http, url, "/api/generate", {"model": "gemma", "prompt": "b", "stream": False}))
    while handle.scheduler.queue_depth() == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    status, body, headers = await post(http, url, "/api/generate", {"model": "gemma", "prompt": "c", "stream": False})
    check_error(status, body, 503, "busy")
    assert (await busy)[0] == 200 and (await waiting)[0] == 200


# ------------------------------------------------------------------ pure shapes


def test_rfc3339_like_go():
    assert shapes.rfc3339(ns=1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123456789Z"
    assert shapes.rfc3339(ns=1_700_000_000_500_000_000) == "2023-11-14T22:13:20.5Z"
    assert shapes.rfc3339(ns=1_700_000_000_000_000_000) == "2023-11-14T22:13:20Z"


def test_options_translation_rules(tmp_path):
    model = ModelConfig(name="m", path=tmp_path, options={"num_ctx": 8192, "temperature": 0.3, "stop": "x"})
    sampling, runner = shapes.translate_options(
        {"num_ctx": 4096, "num_batch": 64, "num_thread": 2, "num_gpu": 0, "num_predict": 10, "top_k": 5.0}, model)
    assert runner == {"n_ctx": 4096, "n_batch": 64, "n_threads": 2, "n_gpu_layers": 0}
    assert sampling == {"max_tokens": 10, "temperature": 0.3, "stop": ["x"], "top_k": 5}
    # runner options from the model table are not applied (the table sets n_ctx itself)
    assert shapes.translate_options(None, model)[1] == {}
    assert shapes.translate_options({"num_gpu": -1}, model)[1] == {"n_gpu_layers": "auto"}
    for bad in ({"num_ctx": 0}, {"top_k": 1.5}, {"seed": True}, {"stop": [1]}):
        with pytest.raises(Exception) as e:
            shapes.translate_options(bad, model)
        assert getattr(e.value, "status", None) == 400
