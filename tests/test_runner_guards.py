"""The runner's request guards (hoshikage_runner.guards) against the real demo model.

Two real runners (one generative, one for embeddings, n_ctx 128 so that an
overflow is cheap) are started once for the module.  A failure in the middle
of a stream cannot be caused through the API, so that test serves the app
in-process (``build_app`` + httpx's ASGI transport) and makes the model's
decode fail after two tokens, as a llama_decode error would.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import httpx
import pytest
import pytest_asyncio

from hoshikage_sup.process import RunnerProcess, RunnerSpec

N_CTX = 128
# About 200 tokens: over the 128 asked for, under the 256 llama.cpp allocates for them.
LONG_TEXT = "word " * 200
TIMEOUT = aiohttp.ClientTimeout(total=60)
ENDPOINTS = {"chat": ("/v1/chat/completions", "messages"), "completions": ("/v1/completions", "prompt")}

in_module_loop = pytest.mark.asyncio(loop_scope="module")


def spec(model: Path, **overrides: Any) -> RunnerSpec:
    fields: dict[str, Any] = dict(model_name="demo", model_path=str(model), n_ctx=N_CTX, n_threads=1,
                                  chat_format="gemma")
    fields.update(overrides)
    return RunnerSpec(**fields)


def request_body(endpoint: str, text: str, **extra: Any) -> dict[str, Any]:
    if endpoint == "chat":
        return {"messages": [{"role": "user", "content": text}], **extra}
    return {"prompt": text, **extra}


def post(runner: RunnerProcess, path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
    """A request to the runner (use as ``async with``)."""
    return runner.session.post(runner.base_url + path, json=body, headers=headers, timeout=TIMEOUT)


def events(raw: bytes) -> list[str]:
    """The data of each event of an SSE body."""
    text = raw.decode().replace("\r\n", "\n")
    return [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def runner(demo_model: Path) -> AsyncIterator[RunnerProcess]:
    process = RunnerProcess(spec(demo_model))
    await process.start(load_timeout=120)
    yield process
    await process.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def embedder(demo_model: Path) -> AsyncIterator[RunnerProcess]:
    process = RunnerProcess(spec(demo_model, model_name="embed", embedding=True, pooling_type=1))
    await process.start(load_timeout=120)
    yield process
    await process.stop()


# ------------------------------------------------------------- context overflow


@pytest.mark.model
@in_module_loop
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "plain"])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
async def test_overflow_is_a_400_before_any_event(runner: RunnerProcess, endpoint: str, stream: bool) -> None:
    path, field = ENDPOINTS[endpoint]
    async with post(runner, path, request_body(endpoint, LONG_TEXT, stream=stream, max_tokens=20)) as response:
        raw = await response.read()
        assert response.status == 400, raw
        assert response.content_type == "application/json"
    assert not raw.startswith(b"data:")
    error = json.loads(raw)["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", field, "context_length_exceeded")
    message = error["message"]
    assert f"maximum context length is {N_CTX} tokens" in message
    prompt_tokens = int(re.search(rf"your {field} resulted in (\d+) tokens", message).group(1))
    assert N_CTX < prompt_tokens < 2 * N_CTX  # between the requested and llama.cpp's padded context
    assert "max_tokens asks for 20 more" in message


@pytest.mark.model
@in_module_loop
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
async def test_overflow_without_max_tokens_never_says_none(runner: RunnerProcess, endpoint: str) -> None:
    path, _ = ENDPOINTS[endpoint]
    async with post(runner, path, request_body(endpoint, LONG_TEXT, stream=True, max_tokens=None)) as response:
        assert response.status == 400
        message = (await response.json())["error"]["message"]
    assert "None" not in message and "max_tokens" not in message
    assert re.search(r"resulted in \d+ tokens", message) and f"{N_CTX} tokens" in message


@pytest.mark.model
@in_module_loop
async def test_generation_stops_at_the_requested_context(runner: RunnerProcess) -> None:
    """llama.cpp's padded context must not let a generation run past the runner's token buffer."""
    body = {"prompt": "word " * 95, "max_tokens": 100, "temperature": 0}
    async with post(runner, "/v1/completions", body) as response:
        result = await response.json()
        assert response.status == 200, result
    usage = result["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= N_CTX
    assert result["choices"][0]["finish_reason"] == "length"


@pytest.mark.model
@in_module_loop
async def test_other_early_failures_of_a_stream_get_their_status(runner: RunnerProcess) -> None:
    """What llama_cpp refuses when the generator starts is answered as without `stream`."""
    body = {"prompt": "Hello", "max_tokens": 4, "logprobs": 2, "stream": True}  # logits_all is off
    async with post(runner, "/v1/completions", body) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert "logprobs is not supported" in error["message"]


@pytest.mark.model
@in_module_loop
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "plain"])
@pytest.mark.parametrize("grammar, reason", [
    ("root ::= (", "expecting ')'"),
    ('root ::= <not-one-token> "x"', "is not exactly one token of this model's vocabulary"),
], ids=["syntax", "token"])
async def test_invalid_grammar_is_a_400(runner: RunnerProcess, stream: bool, grammar: str, reason: str) -> None:
    body = {"prompt": "Hello", "max_tokens": 4, "grammar": grammar, "stream": stream}
    async with post(runner, "/v1/completions", body) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "grammar")
    assert error["message"].startswith("invalid grammar at line 1") and reason in error["message"]
    # The runner survived it (llama.cpp would have crashed on that grammar).
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "grammar": 'root ::= "yes" | "no"'}
    async with post(runner, "/v1/chat/completions", body) as response:
        assert response.status == 200
        assert (await response.json())["choices"][0]["message"]["content"] in ("yes", "no")


@pytest.mark.model
@in_module_loop
async def test_a_normal_chat_still_streams_token_by_token(runner: RunnerProcess) -> None:
    body = {"messages": [{"role": "user", "content": "Count from one to ten."}], "max_tokens": 12,
            "temperature": 0, "stream": True}
    async with post(runner, "/v1/chat/completions", body) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        first = await response.content.readline()
        assert first.startswith(b"data: ")
        assert not response.content.at_eof()  # the first token came while the rest was still being generated
        rest = await response.read()
    data = events(first + rest)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all("error" not in c for c in chunks)
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks]
    assert sum(1 for d in deltas if d) >= 5  # one event per token, not one at the end
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


# ------------------------------------------------------------------- embeddings


@pytest.mark.model
@in_module_loop
async def test_embedding_over_the_context_is_a_400(embedder: RunnerProcess) -> None:
    async with post(embedder, "/v1/embeddings", {"input": ["a short one", LONG_TEXT]}) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert (error["param"], error["code"]) == ("input", "context_length_exceeded")
    tokens = int(re.match(r"input\[1\] is (\d+) tokens long", error["message"]).group(1))
    assert tokens > N_CTX and f"context length of {N_CTX} tokens" in error["message"]


@pytest.mark.model
@in_module_loop
async def test_embedding_is_truncated_when_the_request_allows_it(embedder: RunnerProcess) -> None:
    allowed = {"X-Hoshikage-Truncate": "true"}
    async with post(embedder, "/v1/embeddings", {"input": LONG_TEXT}, headers=allowed) as response:
        assert response.status == 200
        result = await response.json()
    assert len(result["data"]) == 1 and len(result["data"][0]["embedding"]) > 0
    assert result["usage"]["prompt_tokens"] == N_CTX


@pytest.mark.model
@in_module_loop
@pytest.mark.parametrize("given, reason", [
    ([], "'input' is an empty list"),
    ("", "input[0] is an empty string"),
    (["a", ""], "input[1] is an empty string"),
])
async def test_empty_embedding_input_is_a_400(embedder: RunnerProcess, given: Any, reason: str) -> None:
    async with post(embedder, "/v1/embeddings", {"input": given}) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["message"].startswith(reason) and error["param"] == "input"
    async with post(embedder, "/v1/embeddings", {"input": ["a", "b"]}) as response:  # and the runner is fine
        assert response.status == 200
        assert len((await response.json())["data"]) == 2


# --------------------------------------------------------- failure mid-stream


@pytest.fixture(scope="module")
def in_process_app(demo_model: Path) -> Any:
    """The runner's app built in this process, for failures the API cannot cause."""
    from hoshikage_runner import server

    saved = dict(os.environ)  # build_app drops settings-like variables from the environment
    try:
        app = server.build_app({"model": str(demo_model), "model_alias": "demo", "n_ctx": N_CTX, "n_threads": 1,
                                "n_threads_batch": 1, "chat_format": "gemma", "logits_all": False, "verbose": False})
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return app


def fail_decode_after(monkeypatch: pytest.MonkeyPatch, evals: int) -> None:
    """Make the loaded model's eval raise from its `evals`+1-th call (the prompt is the first)."""
    import llama_cpp.server.app as llama_app

    llama = llama_app._llama_proxy()
    real_eval = llama.eval
    calls = 0

    def eval(tokens: Any) -> None:
        nonlocal calls
        calls += 1
        if calls > evals:
            raise RuntimeError("llama_decode returned -1")
        real_eval(tokens)

    monkeypatch.setattr(llama, "eval", eval)


@pytest.mark.model
@in_module_loop
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
async def test_a_failure_mid_stream_ends_it_with_an_error_event(
    in_process_app: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], endpoint: str,
) -> None:
    fail_decode_after(monkeypatch, evals=3)  # the prompt and two tokens
    path, _ = ENDPOINTS[endpoint]
    transport = httpx.ASGITransport(app=in_process_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://runner", timeout=60) as client:
        body = request_body(endpoint, "Once upon a time", stream=True, max_tokens=20, temperature=0)
        response = await client.post(path, json=body)
    assert response.status_code == 200
    data = events(response.content)
    assert "[DONE]" not in data
    *chunks, last = [json.loads(d) for d in data]
    assert chunks and all("choices" in c for c in chunks)  # it had started
    expected = {"message": "llama_decode returned -1", "type": "server_error", "param": None, "code": None}
    assert last == {"error": expected}
    assert "RuntimeError: llama_decode returned -1" in capsys.readouterr().err  # logged, with its traceback


@pytest.mark.model
@in_module_loop
async def test_a_failure_before_the_first_event_is_a_500(in_process_app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fail_decode_after(monkeypatch, evals=0)  # the prompt's own decode
    transport = httpx.ASGITransport(app=in_process_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://runner", timeout=60) as client:
        body = request_body("chat", "Hello", stream=True, max_tokens=4)
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["message"] == "llama_decode returned -1"


# ------------------------------------------------------- the held headers, alone


async def test_keep_alive_comments_before_the_first_event_are_dropped() -> None:
    """Headers wait for the first event; a ping before it has nothing to keep alive."""
    from hoshikage_runner.guards import RequestGuard

    sse = [(b"content-type", b"text/event-stream; charset=utf-8")]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": sse})
        await send({"type": "http.response.body", "body": b": ping\r\n\r\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b": ping\r\n\r\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    await RequestGuard(app)({"type": "http", "headers": []}, receive, send)
    assert [m["type"] for m in sent] == ["http.response.start"] + ["http.response.body"] * 3
    assert [m["body"] for m in sent[1:]] == [b"data: 1\n\n", b": ping\r\n\r\n", b""]
