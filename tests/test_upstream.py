"""The gateway's HTTP client for runners (`upstream.py`), against a scripted
peer on a Unix socket, and what the OpenAI layer sends through it.

The peer answers each request with the bytes a test gives it, cut into
pieces as the test says, so framing (Content-Length, chunked, split
anywhere), keep-alive reuse, connection loss at each point, flow control
and the error types the gateway relies on are all seen directly.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from hoshikage_sup import sse, upstream
from hoshikage_sup.process import RunnerGone
from hoshikage_sup.upstream import RunnerConnections, RunnerStalled, RunnerUnreachable


class FakeProcess:
    """What RunnerConnections reads of a RunnerProcess."""

    def __init__(self, path: str):
        self.socket_path = path
        self.returncode: int | None = None

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": "Bearer sekrit"}


class Peer:
    """A scripted HTTP/1.1 server: `answers` is a list, one per request, of
    byte pieces to send (None: close the connection there)."""

    def __init__(self, path: str):
        self.path = path
        self.answers: list[list[bytes | None]] = []
        self.requests: list[bytes] = []
        self.connections = 0
        self.pause = 0.0  # seconds a b"PAUSE" piece waits
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> "Peer":
        self.server = await asyncio.start_unix_server(self._serve, self.path)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                for piece in self.answers.pop(0):
                    if piece is None:
                        writer.close()
                        return
                    if piece == b"PAUSE":
                        await asyncio.sleep(self.pause)
                        continue
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.001)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client went, or the test is over
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        len(body), extra, body)


def chunked(*chunks: bytes, trailer: bytes = b"") -> bytes:
    out = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n"
    for c in chunks:
        out += b"%x\r\n%s\r\n" % (len(c), c)
    return out + b"0\r\n" + trailer + b"\r\n"


def pieces(data: bytes, rng: random.Random) -> list[bytes | None]:
    out: list[bytes | None] = []
    i = 0
    while i < len(data):
        n = rng.randint(1, 7)
        out.append(data[i:i + n])
        i += n
    return out


@pytest.fixture
async def peer(tmp_path: Path):
    p = await Peer(str(tmp_path / "r.sock")).start()
    yield p
    await p.close()


async def exchange(conns: RunnerConnections, body: bytes = b'{"a":1}', **kw: Any) -> tuple[int, str, bytes]:
    ex = await conns.post("/v1/completions", body, **kw)
    response = await ex.head
    try:
        return response.status, response.content_type, await response.read()
    finally:
        response.close()


async def test_requests_reuse_one_connection_and_carry_the_secret(peer):
    conns = RunnerConnections(FakeProcess(peer.path))
    peer.answers = [[ok(b'{"x":1}')], [ok(b'{"x":2}')], [ok(b"")]]
    assert await exchange(conns) == (200, "application/json", b'{"x":1}')
    assert await exchange(conns, b'{"b":2}', headers={"X-Hoshikage-Truncate": "true"}) == (200, "application/json", b'{"x":2}')
    assert await exchange(conns) == (200, "application/json", b"")
    assert peer.connections == 1
    first, second, _ = peer.requests
    assert first.startswith(b"POST /v1/completions HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer sekrit\r\n" in first and b"\r\nContent-Length: 7\r\n" in first
    assert first.endswith(b'\r\n\r\n{"a":1}')
    assert b"\r\nX-Hoshikage-Truncate: true\r\n" in second and second.endswith(b'{"b":2}')


@pytest.mark.parametrize("seed", range(5))
async def test_bodies_split_anywhere_arrive_whole(peer, seed):
    rng = random.Random(seed)
    events = [b'data: {"n": %d}\r\n\r\n' % i for i in range(20)] + [b"data: [DONE]\r\n\r\n"]
    peer.answers = [pieces(chunked(*events, trailer=b"x-t: 1\r\n"), rng), pieces(ok(b"y" * 1000), rng)]
    conns = RunnerConnections(FakeProcess(peer.path))
    status, ctype, body = await exchange(conns)
    assert (status, ctype, body) == (200, "text/event-stream", b"".join(events))
    assert await exchange(conns) == (200, "application/json", b"y" * 1000)
    assert peer.connections == 1  # both read to their end: the connection was kept


async def test_a_connection_closed_by_the_runner_is_not_reused(peer):
    conns = RunnerConnections(FakeProcess(peer.path))
    peer.answers = [[ok(b"1", b"connection: close\r\n"), None], [ok(b"2")]]
    assert (await exchange(conns))[2] == b"1"
    assert (await exchange(conns))[2] == b"2"
    assert peer.connections == 2


async def test_losing_the_connection_is_reported_as_aiohttp_does(peer, tmp_path):
    conns = RunnerConnections(FakeProcess(peer.path))
    peer.answers = [[None]]  # closed before any answer: the request may be sent again
    ex = await conns.post("/v1/completions", b"{}")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await ex.head
    peer.answers = [[ok(b"0123456789")[:-4], None]]  # closed in the body
    ex = await conns.post("/v1/completions", b"{}")
    response = await ex.head
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    response.close()
    assert ex.done.done()

    gone = FakeProcess(str(tmp_path / "nothing.sock"))
    with pytest.raises(aiohttp.ClientConnectorError) as refused:
        await RunnerConnections(gone).post("/v1/completions", b"{}")
    assert isinstance(refused.value, RunnerUnreachable)
    gone.returncode = 1
    with pytest.raises(RunnerGone):
        await RunnerConnections(gone).post("/v1/completions", b"{}")


async def test_the_timeout_covers_the_whole_exchange(peer):
    conns = RunnerConnections(FakeProcess(peer.path))
    peer.answers = [[ok(b"late")[:-2]]]  # the head and half the body, then nothing
    ex = await conns.post("/v1/completions", b"{}", timeout=0.2)
    response = await ex.head
    with pytest.raises(asyncio.TimeoutError):
        await response.read()
    response.close()


async def test_an_idle_connection_past_the_keep_alive_is_not_used(peer, monkeypatch):
    conns = RunnerConnections(FakeProcess(peer.path))
    peer.answers = [[ok(b"1")], [ok(b"2")]]
    await exchange(conns)
    for conn in conns.idle:
        conn.idle_since -= upstream.KEEPALIVE_TIMEOUT
    await exchange(conns)
    assert peer.connections == 2


async def test_an_unread_response_closes_its_connection_and_a_dropped_one_finishes(peer):
    conns = RunnerConnections(FakeProcess(peer.path))
    peer.answers = [[ok(b"x" * 100)[:80], ok(b"x" * 100)[80:]], [ok(b"slow")[:40], ok(b"slow")[40:]], [ok(b"3")]]
    ex = await conns.post("/v1/completions", b"{}")
    (await ex.head).close()  # not read to its end: the connection cannot be trusted for another request
    ex = await conns.post("/v1/completions", b"{}")
    ex.close_when_done()  # the caller left; the answer is read and dropped
    await asyncio.wait_for(ex.done, 5)
    assert (await exchange(conns))[2] == b"3"
    assert peer.connections == 2  # the second connection came back after the dropped answer


async def test_a_slow_reader_pauses_the_runner(peer):
    conns = RunnerConnections(FakeProcess(peer.path))
    big = bytes(range(256)) * 2048  # 512 KiB, far above HIGH_WATER
    peer.answers = [[chunked(*[big[i:i + 8192] for i in range(0, len(big), 8192)])]]
    ex = await conns.post("/v1/completions", b"{}")
    response = await ex.head
    await asyncio.sleep(0.3)  # let the peer write what it can
    conn = ex.conn
    assert conn._paused  # noqa: SLF001 - buffered past HIGH_WATER: reading stopped
    assert conn._buffered <= upstream.HIGH_WATER + 256 * 1024  # noqa: SLF001 - at most one read past it
    got = await response.read()
    assert got == big
    response.close()


async def _first_chunk_then_silence(conns, peer, pause: float, stall: float):
    """A response whose runner sends chunk "a", stays silent for `pause`, then sends "b";
    watched for `stall` seconds of silence, with "a" already read."""
    peer.answers = [[chunked(b"a", b"b")[:-13], b"PAUSE", chunked(b"a", b"b")[-13:]]]
    peer.pause = pause
    ex = await conns.post("/v1/completions", b"{}")
    response = await ex.head
    response.watch_stall(stall)
    assert await response.readany() == b"a"
    return response


async def test_only_waiting_on_a_silent_runner_is_a_stall(peer):
    conns = RunnerConnections(FakeProcess(peer.path))
    # Silent for 0.3 s between two chunks, while the reader is busy elsewhere for 0.6 s: no stall.
    response = await _first_chunk_then_silence(conns, peer, pause=0.3, stall=0.45)
    await asyncio.sleep(0.6)
    assert await response.read() == b"b"
    response.close()
    # Silent for longer than the stall timeout while the reader waits: a stall.
    response = await _first_chunk_then_silence(conns, peer, pause=2.0, stall=0.3)
    with pytest.raises(RunnerStalled):
        await response.readany()
    response.close()


# ------------------------------------------------------------------ sse.runs


@pytest.mark.parametrize("seed", range(20))
async def test_runs_give_the_bytes_and_events_split_gives(seed):
    rng = random.Random(seed)
    events = []
    for i in range(rng.randint(1, 30)):
        kind = rng.random()
        if kind < 0.1:
            events.append(b": ping\r\n\r\n")
        elif kind < 0.15:
            events.append(b'data: {"error": {"message": "x"}}\r\n\r\n')
        elif kind < 0.2:
            events.append(b"data: [DONE]\r\n\r\n")
        elif kind < 0.25:
            events.append(b"data: a\ndata: b\n\n\n")
        else:
            events.append(b'data: {"choices": [{"text": "%d"}]}\r\n\r\n' % i)
    stream = b"".join(events) + b"data: cut"
    chunks = [stream[i:i + n] for i, n in _cuts(len(stream), rng)]

    async def feed():
        for c in chunks:
            yield c

    split = [e async for e in sse.split(feed())]
    runs = [r async for r in sse.runs(feed())]
    assert b"".join(run for run, _ in runs) == b"".join(raw for raw, _ in split)
    flat = [e for run, evs in runs for e in (evs if evs is not None else sse.events_of(run))]
    assert flat == split
    for run, evs in runs:
        if evs is None:
            assert b"[DONE]" not in run and b'"error"' not in run


def _cuts(n: int, rng: random.Random):
    i = 0
    while i < n:
        k = rng.randint(1, 40)
        yield i, k
        i += k


# ------------------------------------------------------------------ what the OpenAI layer sends


async def test_an_unchanged_body_goes_to_the_runner_as_the_client_sent_it(make_server, http):
    h = await make_server({"m": {"aliases": ["m:latest"]}})
    sent: list[bytes] = []
    original = h.gateway.post_to_runner

    async def record(process, path, body, **kw):
        sent.append(body)
        return await original(process, path, body, **kw)

    h.gateway.post_to_runner = record
    raw = b'{ "prompt" : "h\\u00e9", "model":"m", "max_tokens": 2 ,"temperature":1}'
    async with http.post(h.url + "/v1/completions", data=raw, headers={"Content-Type": "application/json"}) as r:
        assert r.status == 200 and (await r.json())["model"] == "m"
    assert sent[-1] == raw  # nothing to change: the very bytes

    # An alias, our own keep_alive, a seed llama.cpp cannot take: the body is encoded again.
    for body, expect in (
        ({"model": "m:latest", "prompt": "x"}, {"model": "m", "prompt": "x"}),
        ({"model": "m", "prompt": "x", "keep_alive": "5m"}, {"model": "m", "prompt": "x"}),
        ({"model": "m", "prompt": "x", "seed": -1}, {"model": "m", "prompt": "x", "seed": 0xFFFFFFFF}),
        ({"model": "m", "prompt": "x", "stop": ["", "z"]}, {"model": "m", "prompt": "x", "stop": ["z"]}),
    ):
        async with http.post(h.url + "/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
        assert json.loads(sent[-1]) == expect
