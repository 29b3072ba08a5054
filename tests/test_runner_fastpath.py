"""The runner's fast path for streamed completions and chats (hoshikage_runner.fastpath), on the real demo model.

Two real runners are started once for the module: one as the supervisor
starts it (fast path installed) and one with the fast path left out, which
is llama_cpp.server's own path.  Every comparison sends the same request to
both, one after the other, and never a request to only one of them: what
llama.cpp computes for a prompt depends on which prefix of it is still
cached from the request before, so both runners must go through the same
requests in the same order.  The streams must then be the same bytes, ids
and ``created`` aside (and the keep-alive comments sse-starlette sends every
15 s of a slow stream).

What cannot be seen from outside (that the fast path really serves a plain
stream and hands the rest off, that a client going away stops the
generation, that requests wait for each other) is checked on an app built
in this process and served by uvicorn on a loopback port.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from hoshikage_sup.process import RunnerProcess, RunnerSpec

N_CTX = 512
TIMEOUT = aiohttp.ClientTimeout(total=120)
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
PROMPT = "Once upon a time"
# The runner as the supervisor starts it, but without the fast path: llama_cpp.server's own routes.
WITHOUT_FAST_PATH = (
    "import hoshikage_runner.fastpath as f; f.install = lambda app: None; "
    "import runpy; runpy.run_module('hoshikage_runner', run_name='__main__')"
)

in_module_loop = pytest.mark.asyncio(loop_scope="module")
pytestmark = pytest.mark.model


def spec(model: Path) -> RunnerSpec:
    return RunnerSpec(model_name="demo", model_path=str(model), n_ctx=N_CTX, n_threads=1, chat_format="gemma")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def runners(demo_model: Path) -> AsyncIterator[tuple[RunnerProcess, RunnerProcess]]:
    """(fast, plain): the same model behind the fast path and behind llama_cpp.server's own path."""
    fast = RunnerProcess(spec(demo_model))
    plain = RunnerProcess(spec(demo_model), command=[sys.executable, "-c", WITHOUT_FAST_PATH])
    await asyncio.gather(fast.start(load_timeout=120), plain.start(load_timeout=120))
    try:
        yield fast, plain
    finally:
        await asyncio.gather(fast.stop(), plain.stop())


class Answer:
    """A runner's answer: status, the headers that matter, the body with ids, times and pings taken out."""

    HEADERS = ("content-type", "cache-control", "connection", "x-accel-buffering", "content-length")

    def __init__(self, status: int, headers: Any, raw: bytes) -> None:
        self.status = status
        self.headers = {k: headers.get(k) for k in self.HEADERS}
        self.raw = raw
        body = re.sub(rb": ping - [^\n]*\n\n", b"", raw)
        body = re.sub(rb'"id": ?"(chat)?cmpl-[0-9a-f-]{36}"', rb'"id": "\1cmpl-ID"', body)
        self.body = re.sub(rb'"created": ?\d+', b'"created": 0', body)

    def key(self) -> tuple[Any, ...]:
        return self.status, self.headers, self.body

    @property
    def events(self) -> list[str]:
        text = self.raw.decode()
        assert "\r" not in text
        return [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]

    @property
    def chunks(self) -> list[dict[str, Any]]:
        events = self.events
        assert events[-1] == "[DONE]"
        return [json.loads(e) for e in events[:-1]]

    @property
    def texts(self) -> list[str]:
        """The text of every chunk but the last (the one with the finish reason)."""
        out = []
        for chunk in self.chunks:
            choice = chunk["choices"][0]
            if choice["finish_reason"] is None:
                out.append(choice["text"] if "text" in choice else choice["delta"].get("content"))
        return [t for t in out if t is not None]

    @property
    def finish_reason(self) -> str:
        return self.chunks[-1]["choices"][0]["finish_reason"]


async def ask(runner: RunnerProcess, path: str, body: Any) -> Answer:
    async with runner.session.post(runner.base_url + path, json=body, timeout=TIMEOUT) as response:
        return Answer(response.status, response.headers, await response.read())


async def both(runners: tuple[RunnerProcess, RunnerProcess], path: str, body: Any) -> tuple[Answer, Answer]:
    """The same request to the fast runner, then to the plain one; their answers must be the same."""
    fast, plain = runners
    a = await ask(fast, path, body)
    b = await ask(plain, path, body)
    assert a.key() == b.key()
    return a, b


def completion(**extra: Any) -> dict[str, Any]:
    return {"prompt": PROMPT, "stream": True, "temperature": 0, **extra}


def chat(content: str = "Count from one to ten.", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "stream": True, "temperature": 0, **extra}


# ------------------------------------------------------------------ the same events as llama_cpp.server


@in_module_loop
async def test_greedy_completion(runners: Any) -> None:
    fast, _ = await both(runners, COMPLETIONS, completion(max_tokens=48))
    assert fast.status == 200 and fast.headers["content-type"] == "text/event-stream; charset=utf-8"
    chunks = fast.chunks
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert len(fast.texts) == 48 and all(fast.texts)  # one event per token (plain English text)
    assert fast.finish_reason == "length"
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"] == [{"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}]


@in_module_loop
async def test_greedy_chat(runners: Any) -> None:
    fast, _ = await both(runners, CHAT, chat(max_tokens=40))
    chunks = fast.chunks
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[0]["id"].startswith("chatcmpl-") and {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert fast.texts and fast.finish_reason in ("length", "stop")
    assert chunks[-1]["choices"][0]["delta"] == {}


@in_module_loop
@pytest.mark.parametrize("max_tokens", [1, 5])
async def test_max_tokens(runners: Any, max_tokens: int) -> None:
    prompt = "The capital of France is Paris. The capital of Italy is"
    fast, _ = await both(runners, COMPLETIONS, completion(prompt=prompt, max_tokens=max_tokens))
    assert len(fast.texts) == max_tokens and fast.finish_reason == "length"


@in_module_loop
async def test_stop_sequences(runners: Any) -> None:
    """Stops inside one token, across two tokens, at a token's start, and the first of several.

    The text without stops is asked for twice: the first time, the prompt
    is evaluated after whatever the request before left in the cache, and
    from then on after the same cached prefix, as the requests with stops
    will be (a greedy text can differ between the two).
    """
    await both(runners, COMPLETIONS, completion(max_tokens=40))
    full, _ = await both(runners, COMPLETIONS, completion(max_tokens=40))
    texts = full.texts
    text = "".join(texts)
    k = next(i for i in range(5, len(texts) - 1) if len(texts[i]) >= 3 and len(texts[i + 1]) >= 3)
    start = len("".join(texts[:k]))
    across = texts[k][-2:] + texts[k + 1][:2]  # the end of one token and the start of the next
    stops = {
        "across": across,
        "inside": texts[k][1:3],
        "token": texts[k + 1],
        "several": ["no such text", texts[k + 1][:2], texts[k]],
    }
    for name, stop in stops.items():
        fast, _ = await both(runners, COMPLETIONS, completion(max_tokens=40, stop=stop))
        assert "".join(fast.texts) == text[:cut_at(texts, [stop] if isinstance(stop, str) else stop)], name
        assert fast.finish_reason == "stop", name
    assert text.index(across) < start + len(texts[k])  # it does start in token k


def cut_at(texts: list[str], stops: list[str]) -> int:
    """Where llama_cpp cuts a text at its stop strings: generation stops after the first token that
    completes one of them, and the text ends where the earliest of the strings then present begins."""
    text = "".join(texts)
    end = min(text.index(s) + len(s) for s in stops if s in text)
    seen = ""
    for piece in texts:
        seen += piece
        if len(seen) >= end:
            break
    return min(seen.index(s) for s in stops if s in seen)


@in_module_loop
async def test_chat_stop(runners: Any) -> None:
    fast, _ = await both(runners, CHAT, chat(max_tokens=40, stop=["\n", "5"]))
    assert fast.finish_reason == "stop"


@in_module_loop
@pytest.mark.parametrize("sampling", [
    {"temperature": 0.9, "seed": 42},
    {"temperature": 0.8, "seed": 7, "repeat_penalty": 1.3, "top_k": 20, "top_p": 0.9, "min_p": 0.1},
    {"temperature": 0, "repeat_penalty": 1.5},
    {"temperature": 0, "repeat_penalty": 1.0},
    {"temperature": 0.7, "seed": 3, "frequency_penalty": 0.5, "presence_penalty": 0.3},
    {"temperature": 0.8, "seed": 5, "mirostat_mode": 2},
], ids=["seed", "penalty-and-filters", "greedy-penalty", "no-penalty", "frequency-presence", "mirostat"])
async def test_sampling_means_the_same(runners: Any, sampling: dict[str, Any]) -> None:
    """The same tokens for greedy decoding and for a fixed seed, penalties included."""
    await both(runners, COMPLETIONS, completion(max_tokens=32, **sampling))
    await both(runners, CHAT, chat("Write a short poem.", max_tokens=24, **sampling))


@in_module_loop
async def test_multibyte_text(runners: Any) -> None:
    for prompt in ("日本語の文章を書いてください。東京は", "Emoji story: 😀"):
        fast, _ = await both(runners, COMPLETIONS, completion(prompt=prompt, max_tokens=40, temperature=0.7, seed=1))
        assert fast.texts


@in_module_loop
async def test_include_usage_is_ignored_as_llama_cpp_server_does(runners: Any) -> None:
    """llama_cpp.server has no ``stream_options``: no usage chunk is added, with or without it."""
    options = {"stream_options": {"include_usage": True}}
    for path, body in ((COMPLETIONS, completion(max_tokens=6, **options)), (CHAT, chat(max_tokens=6, **options))):
        fast, _ = await both(runners, path, body)
        assert all("usage" not in c for c in fast.chunks)


@in_module_loop
@pytest.mark.parametrize("path, body", [
    (COMPLETIONS, completion(max_tokens=6, logprobs=2)),  # 400: the runner has no logits_all
    (COMPLETIONS, completion(max_tokens=6, echo=True)),
    (COMPLETIONS, completion(max_tokens=6, logit_bias={"1": -100})),
    (COMPLETIONS, completion(max_tokens=6, grammar='root ::= "yes" | "no"')),
    (COMPLETIONS, completion(max_tokens=6, min_tokens=2)),
    (COMPLETIONS, completion(max_tokens=6, prompt=[PROMPT])),
    (COMPLETIONS, completion(max_tokens=6, stream=False)),
    (CHAT, chat(max_tokens=6, stream=False)),
    (CHAT, chat(max_tokens=6, response_format={"type": "json_object"})),
    (CHAT, chat(max_tokens=6, logprobs=True, top_logprobs=2)),
    (COMPLETIONS, completion(max_tokens=6, prompt="word " * 600)),  # 400 before any event: over the context
    (CHAT, chat(max_tokens="six")),  # 400 from the request model
], ids=["logprobs", "echo", "logit_bias", "grammar", "min_tokens", "prompt-list", "completion-not-streamed",
        "chat-not-streamed", "response_format", "chat-logprobs", "overflow", "invalid"])
async def test_what_the_fast_path_hands_off_or_refuses_is_answered_the_same(runners: Any, path: str,
                                                                           body: dict[str, Any]) -> None:
    fast, _ = await both(runners, path, body)
    if body.get("stream") and fast.status == 200:
        assert fast.events[-1] == "[DONE]"


# ------------------------------------------------------------------ in this process


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(demo_model: Path) -> AsyncIterator[str]:
    """The runner's app built in this process (fast path included), served on a loopback port; its URL."""
    import uvicorn

    from hoshikage_runner import server

    saved = dict(os.environ)  # build_app drops settings-like variables from the environment
    try:
        app = server.build_app({"model": str(demo_model), "model_alias": "demo", "n_ctx": N_CTX, "n_threads": 1,
                                "n_threads_batch": 1, "chat_format": "gemma", "logits_all": False,
                                "verbose": False})
    finally:
        os.environ.clear()
        os.environ.update(saved)
    sock = _free_socket()
    config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False)
    uv = uvicorn.Server(config)
    task = asyncio.ensure_future(uv.serve(sockets=[sock]))
    while not uv.started:
        await asyncio.sleep(0.01)
    try:
        yield "http://127.0.0.1:%d" % sock.getsockname()[1]
    finally:
        uv.should_exit = True
        await task
        sock.close()


def _llama() -> Any:
    import llama_cpp.server.app as llama_app

    return llama_app._llama_proxy()


def _count_evals(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the loaded model's evals (the prompt is one, then one per token)."""
    llama = _llama()
    real_eval = llama.eval
    calls = [0]

    def eval(tokens: Any) -> None:
        calls[0] += 1
        real_eval(tokens)

    monkeypatch.setattr(llama, "eval", eval)
    return calls


@in_module_loop
async def test_plain_streams_take_the_fast_path_and_the_rest_is_handed_off(
    served: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A plain stream never reaches llama_cpp's _create_completion; logprobs or no stream does."""
    import llama_cpp

    original = llama_cpp.Llama._create_completion
    used: list[bool] = []

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        used.append(True)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(llama_cpp.Llama, "_create_completion", spy)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        for path, body in ((COMPLETIONS, completion(max_tokens=4)), (CHAT, chat(max_tokens=4))):
            async with http.post(served + path, json=body) as response:
                assert response.status == 200
                assert (await response.read()).endswith(b"data: [DONE]\n\n")
        assert not used
        for path, body in ((COMPLETIONS, completion(max_tokens=4, stream=False)),
                           (CHAT, chat(max_tokens=4, logprobs=False, grammar='root ::= "yes"'))):
            async with http.post(served + path, json=body) as response:
                assert response.status == 200
                await response.read()
            assert used
            used.clear()


@in_module_loop
async def test_a_client_that_goes_away_stops_the_generation(served: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import llama_cpp.server.app as llama_app

    calls = _count_evals(monkeypatch)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        response = await http.post(served + COMPLETIONS, json=completion(max_tokens=400))
        assert response.status == 200
        for _ in range(3):
            assert (await response.content.readline()).startswith(b"data: ")
            await response.content.readline()
        response.close()  # drop the connection mid-stream
    deadline = time.monotonic() + 60
    while llama_app.llama_inner_lock.locked() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not llama_app.llama_inner_lock.locked()
    assert 3 <= calls[0] < 60  # stopped a few tokens after the client left, not after 400
    # and the model is free for the next request
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        async with http.post(served + COMPLETIONS, json=completion(max_tokens=3)) as response:
            assert response.status == 200 and (await response.read()).endswith(b"data: [DONE]\n\n")


@in_module_loop
async def test_requests_are_served_one_at_a_time(served: str) -> None:
    """The model lock is held for a whole stream: a second stream starts after the first has ended."""

    async def stream(body: dict[str, Any]) -> list[tuple[float, bytes]]:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            async with http.post(served + COMPLETIONS, json=body) as response:
                assert response.status == 200
                return [(time.monotonic(), line) async for line in response.content if line.startswith(b"data: ")]

    first = asyncio.ensure_future(stream(completion(max_tokens=20)))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(stream(completion(prompt="Hello there", max_tokens=20)))
    a, b = await first, await second
    assert a[-1][1].startswith(b"data: [DONE]") and b[-1][1].startswith(b"data: [DONE]")
    assert a[-1][0] <= b[0][0]


@in_module_loop
async def test_a_slow_stream_gets_keep_alive_comments(served: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Like sse-starlette: a ping comment every 15 s, here shortened; clients skip comments."""
    from hoshikage_runner import fastpath

    monkeypatch.setattr(fastpath, "PING_INTERVAL", 0.05)
    llama = _llama()
    real_eval = llama.eval

    def slow_eval(tokens: Any) -> None:
        time.sleep(0.06)
        real_eval(tokens)

    monkeypatch.setattr(llama, "eval", slow_eval)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        async with http.post(served + COMPLETIONS, json=completion(max_tokens=6)) as response:
            raw = await response.read()
    assert re.search(rb"\n\n: ping - [^\n]+\n\n", raw) and raw.endswith(b"data: [DONE]\n\n")
    data = [line for line in raw.split(b"\n") if line.startswith(b"data: ")]
    assert len(data) == 8  # six tokens, the finish, [DONE]


# ------------------------------------------------------------------ the generation alone


def _fast_chunks(llama: Any, options: dict[str, Any]) -> list[dict[str, Any]]:
    from hoshikage_runner import fastpath

    job = fastpath.Job(chat=False, body=None, kwargs={})
    fastpath.stream_completion(job, llama, fastpath.Vocabulary(llama), dict(options))
    events = [chunk.decode() for chunk in job.chunks]
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    return [json.loads(e[len("data: "):]) for e in events]


def _original_chunks(llama: Any, options: dict[str, Any]) -> list[dict[str, Any]]:
    return list(llama.create_completion(stream=True, **options))


def _same_chunks(llama: Any, options: dict[str, Any]) -> list[dict[str, Any]]:
    """Both generations from an empty cache; their chunks, ids and times aside, must be equal."""

    def normal(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**c, "id": None, "created": None} for c in chunks]

    llama.reset()
    fast = _fast_chunks(llama, options)
    llama.reset()
    original = _original_chunks(llama, options)
    assert normal(fast) == normal(original)
    return fast


@in_module_loop
async def test_an_end_of_generation_token_stops_it(served: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo model (a base model) hardly ever ends a text: make one of the tokens it writes an end."""
    import llama_cpp.llama_cpp as llama_low

    llama = _llama()
    options = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0}
    texts = [c["choices"][0]["text"] for c in _same_chunks(llama, options)[:-1]]
    ends = [llama.tokenize(t.encode(), add_bos=False) for t in texts[4:]]
    end = next(ids[0] for ids in ends if len(ids) == 1)
    real = llama_low.llama_vocab_is_eog
    monkeypatch.setattr(llama_low, "llama_vocab_is_eog", lambda vocab, token: token == end or real(vocab, token))
    chunks = _same_chunks(llama, options)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and 4 <= len(chunks) - 1 < 16


@in_module_loop
async def test_stopping_criteria(served: str) -> None:
    """A chat format's stopping criteria (a GGUF template stops on its end-of-turn token) are honoured."""
    import llama_cpp

    llama = _llama()
    prompt = llama.tokenize(PROMPT.encode())
    greedy = _same_chunks(llama, {"prompt": prompt, "max_tokens": 12, "temperature": 0})
    texts = [c["choices"][0]["text"] for c in greedy]
    stop_ids = {llama.tokenize(texts[5].encode(), add_bos=False)[0]}

    def after_five(tokens: Any, logits: Any) -> bool:
        return len(tokens) >= len(prompt) + 5

    def on_token(tokens: Any, logits: Any) -> bool:
        return tokens[-1] in stop_ids

    for criterion in (after_five, on_token):
        options = {"prompt": prompt, "max_tokens": 12, "temperature": 0,
                   "stopping_criteria": llama_cpp.StoppingCriteriaList([criterion])}
        chunks = _same_chunks(llama, options)
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_greedy_takes_the_first_largest_logit_and_leaves_nan_to_llama_cpp() -> None:
    import numpy as np

    from hoshikage_runner.fastpath import _greedy

    assert _greedy(np.array([0.5, 2.0, -1.0, 2.0], dtype=np.float32)) == 1  # llama.cpp's greedy: the first of ties
    assert _greedy(np.array([0.5, np.nan, 3.0], dtype=np.float32)) == -1  # its sampler decides
