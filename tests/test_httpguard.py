"""Slow, idle, too many and malformed clients against `httpguard`.

A tiny aiohttp app (the project's error middleware, a handler that reads its
body with read_body + parse_json_object, a slow streaming handler) runs under
GuardedAppRunner on a free port with short limits; raw sockets play the slow
clients.  Timing bounds are generous on purpose: they catch hangs on a busy
machine, they are not performance claims.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import resource
import struct
import time
import zlib
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from hoshikage_sup.app import error_middleware
from hoshikage_sup.errors import BadRequest, PayloadTooLarge
from hoshikage_sup.httpguard import ConnectionLimits, GuardedAppRunner, _Inflater, parse_json_object, read_body

HEADER_TIMEOUT = 0.5
IDLE_TIMEOUT = 0.5
BODY_TIMEOUT = 0.5
BODY_DEADLINE = 1.5
MAX_SIZE = 4 * 1024**2
LIMITS = ConnectionLimits(header_timeout=HEADER_TIMEOUT, idle_timeout=IDLE_TIMEOUT, max_connections=1000)
MARGIN = 2.5  # added to every "closed within" bound
STREAM_CHUNKS = 12
STREAM_INTERVAL = 0.25  # 12 x 0.25 s = 3 s, longer than every limit above


# ---------------------------------------------------------------- the app


async def echo(request: web.Request) -> web.Response:
    raw = await read_body(request, max_size=MAX_SIZE, body_timeout=BODY_TIMEOUT, body_deadline=BODY_DEADLINE)
    body = parse_json_object(raw)
    return web.json_response({"keys": sorted(body), "size": len(raw)})


async def stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    await resp.prepare(request)
    for i in range(STREAM_CHUNKS):
        await resp.write(f"chunk {i}\n".encode())
        await asyncio.sleep(STREAM_INTERVAL)
    await resp.write_eof()
    return resp


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def make_app() -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    app.router.add_post("/v1/echo", echo)
    app.router.add_post("/api/echo", echo)
    app.router.add_get("/v1/stream", stream)
    app.router.add_get("/health", health)
    return app


@pytest.fixture
async def serve():
    """start(limits) -> (runner, port); every server is cleaned up afterwards."""
    runners: list[GuardedAppRunner] = []

    async def start(limits: ConnectionLimits = LIMITS) -> tuple[GuardedAppRunner, int]:
        runner = GuardedAppRunner(make_app(), limits=limits, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)  # 300 connects at once
        await site.start()
        runners.append(runner)
        return runner, runner.addresses[0][1]

    yield start
    for runner in runners:
        await runner.cleanup()


# ---------------------------------------------------------------- raw clients


def request_head(method: str, path: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_response(reader: asyncio.StreamReader, timeout: float = 5.0) -> tuple[int, dict[str, str], Any] | None:
    """One response (status, lower-cased headers, JSON or bytes body), or None if the server closed first."""
    try:
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)}
            raw = await reader.readexactly(int(headers.get("content-length", "0")))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    try:
        body: Any = json.loads(raw)
    except ValueError:
        body = raw
    return status, headers, body


async def wait_closed(reader: asyncio.StreamReader, limit: float) -> tuple[float, bytes]:
    """Seconds until the server closes the connection, and what it sent before."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    data = b""
    try:
        async with asyncio.timeout(limit):
            while chunk := await reader.read(65536):
                data += chunk
    except ConnectionError:
        pass
    except TimeoutError:
        pytest.fail(f"connection still open after {limit:.1f} s")
    return loop.time() - start, data


async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes, interval: float) -> None:
    """Send one byte every `interval` seconds until done or the server closed."""
    for i in range(len(data)):
        if reader.at_eof() or writer.is_closing():
            return
        try:
            writer.write(data[i : i + 1])
            await writer.drain()
        except (ConnectionError, OSError):
            return
        await asyncio.sleep(interval)


def parse_raw_response(data: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, raw = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)}
    return int(lines[0].split()[1]), headers, json.loads(raw)


def assert_openai_error(body: Any, code: str | None = None, contains: str = "") -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and contains in err["message"], err
    if code is not None:
        assert err["code"] == code, err


def assert_ollama_error(body: Any, contains: str = "") -> None:
    assert isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], str), body
    assert contains in body["error"], body


async def wait_for(predicate, limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(0.02)


async def post(port: int, path: str, data: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "application/json", **(headers or {})}) as r:
            raw = await r.read()
            try:
                return r.status, json.loads(raw)
            except ValueError:
                return r.status, raw


# ---------------------------------------------------------------- request head and idle limits


async def test_slowloris_headers_are_cut_at_header_timeout(serve):
    _, port = await serve()
    head = request_head("POST", "/v1/echo", {"X-Padding": "a" * 200})

    async def one(at_once: bytes, slowly: bytes) -> tuple[float, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(at_once)
        sender = asyncio.create_task(trickle(reader, writer, slowly, 0.2))
        elapsed, data = await wait_closed(reader, HEADER_TIMEOUT + MARGIN)
        sender.cancel()
        writer.close()
        return elapsed, data

    # byte by byte from the start; and a request line at once, then the headers
    # byte by byte (the 408 then knows the path, and so the error shape)
    ollama = head.replace(b"/v1/echo", b"/api/echo")
    line_end = ollama.index(b"\r\n") + 2
    (t_openai, d_openai), (t_ollama, d_ollama) = await asyncio.gather(one(b"", head), one(ollama[:line_end], ollama[line_end:]))
    for elapsed in (t_openai, t_ollama):
        # not reset by each byte: cut near header_timeout, not after the ~45 s the head would take
        assert HEADER_TIMEOUT - 0.1 <= elapsed <= HEADER_TIMEOUT + MARGIN
    if d_openai:  # a 408 before the close (or a bare close if the reset beat it)
        status, _, body = parse_raw_response(d_openai)
        assert status == 408
        assert_openai_error(body, "request_timeout", "header_timeout")
    if d_ollama:
        status, _, body = parse_raw_response(d_ollama)
        assert status == 408
        assert_ollama_error(body, "header_timeout")


async def test_silent_connection_closed_at_header_timeout(serve):
    _, port = await serve(ConnectionLimits(header_timeout=0.5, idle_timeout=30, max_connections=10))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    elapsed, data = await wait_closed(reader, 0.5 + MARGIN)
    assert elapsed >= 0.4 and data == b""
    writer.close()


async def test_idle_keepalive_closed_and_busy_keepalive_kept(serve):
    _, port = await serve(ConnectionLimits(header_timeout=5.0, idle_timeout=0.5, max_connections=10))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(3):  # requests 0.3 s apart keep one connection alive
        writer.write(request_head("GET", "/health"))
        status, headers, body = await read_response(reader)
        assert status == 200 and body == {"status": "ok"}
        await asyncio.sleep(0.3)
    elapsed, data = await wait_closed(reader, 0.5 + MARGIN)
    assert data == b"" and elapsed <= 0.5 + MARGIN
    writer.close()


@pytest.mark.parametrize(
    "header_timeout, idle_timeout",
    [
        (0.5, 5.0),  # header_timeout, not idle_timeout, ends a head that started
        (1.0, 0.5),  # a head that starts just before idle_timeout gets its full header_timeout
    ],
)
async def test_slow_head_on_keepalive_connection_is_cut_from_its_first_byte(serve, header_timeout, idle_timeout):
    _, port = await serve(ConnectionLimits(header_timeout=header_timeout, idle_timeout=idle_timeout, max_connections=10))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_head("GET", "/health"))
    assert (await read_response(reader))[0] == 200
    await asyncio.sleep(0.3)  # idle, within idle_timeout
    started = time.monotonic()
    sender = asyncio.create_task(trickle(reader, writer, request_head("GET", "/health", {"X-Padding": "a" * 100}), 0.2))
    _, data = await wait_closed(reader, header_timeout + MARGIN)
    elapsed = time.monotonic() - started
    sender.cancel()
    writer.close()
    assert header_timeout - 0.1 <= elapsed <= header_timeout + MARGIN
    if data:
        assert parse_raw_response(data)[0] == 408


async def test_bad_request_line_and_long_headers_answer_json(serve):
    _, port = await serve()
    for raw in (b"GARBAGE\r\n\r\n", b"GET /health HTTP/1.1\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n", b"GET /health HTTP/1.1\r\nBad\x01Header: x\r\n\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        response = await read_response(reader)
        assert response is not None
        status, headers, body = response
        assert status == 400 and headers["content-type"].startswith("application/json")
        assert_openai_error(body, contains="invalid HTTP request")
        writer.close()


# ---------------------------------------------------------------- connection count


async def test_max_connections_answers_503_json_and_spares_existing(serve):
    runner, port = await serve(ConnectionLimits(header_timeout=5.0, idle_timeout=5.0, max_connections=5))
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
    await wait_for(lambda: runner.active_connections == 5)

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_head("GET", "/health"))
    response = await read_response(reader)
    assert response is not None
    status, headers, body = response
    assert status == 503 and headers["retry-after"] == "1" and headers["content-type"].startswith("application/json")
    assert_openai_error(body, "server_busy", "max_connections")
    elapsed, _ = await wait_closed(reader, MARGIN)
    writer.close()
    assert runner.server.rejected_connections == 1

    for r, w in conns:  # the five accepted connections still work
        w.write(request_head("GET", "/health"))
        assert (await read_response(r))[0] == 200
    for _, w in conns:
        w.close()
    await wait_for(lambda: runner.active_connections == 0)

    async with aiohttp.ClientSession() as http:  # room again
        async with http.get(f"http://127.0.0.1:{port}/health") as r:
            assert r.status == 200


async def test_connection_count_returns_to_zero(serve):
    runner, port = await serve(ConnectionLimits(header_timeout=5.0, idle_timeout=5.0, max_connections=40))

    async def client(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        kind = i % 4
        if kind == 0:
            writer.write(request_head("GET", "/health"))
            await read_response(reader)
        elif kind == 1:
            writer.write(b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
            await asyncio.sleep(0.05)
        elif kind == 2:
            writer.write(b"GET /hea")
            await asyncio.sleep(0.05)
        writer.close()  # kind 3: open, close at once

    for _ in range(3):
        await asyncio.gather(*(client(i) for i in range(100)))
    await wait_for(lambda: runner.active_connections == 0)

    # full house, then ten more: all ten refused, and none of them counted
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(40)]
    await wait_for(lambda: runner.active_connections == 40)
    rejected = runner.server.rejected_connections
    extra = [await asyncio.open_connection("127.0.0.1", port) for _ in range(10)]
    for reader, _ in extra:
        response = await read_response(reader)
        assert response is not None and response[0] == 503
    assert runner.server.rejected_connections == rejected + 10
    assert runner.active_connections == 40
    for _, writer in held + extra:
        writer.close()
    await wait_for(lambda: runner.active_connections == 0 and not runner.server._rejecting)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/health") as r:
            assert r.status == 200


async def test_300_half_sent_connections_are_all_cut(serve):
    runner, port = await serve()
    loop = asyncio.get_running_loop()
    started = loop.time()
    clients: list[asyncio.StreamWriter] = []

    async def idle() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        clients.append(writer)
        return (await wait_closed(reader, 10))[0]

    async def slow_head() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        clients.append(writer)
        sender = asyncio.create_task(trickle(reader, writer, request_head("POST", "/v1/echo", {"X-Pad": "a" * 100}), 0.2))
        elapsed = (await wait_closed(reader, 10))[0]
        sender.cancel()
        return elapsed

    async def slow_body() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        clients.append(writer)
        writer.write(request_head("POST", "/v1/echo", {"Content-Length": "1000", "Content-Type": "application/json"}))
        sender = asyncio.create_task(trickle(reader, writer, b"{" + b" " * 999, 0.3))
        elapsed = (await wait_closed(reader, 10))[0]
        sender.cancel()
        return elapsed

    tasks = [asyncio.create_task(f()) for f in (idle, slow_head, slow_body) for _ in range(100)]
    await wait_for(lambda: len(clients) == 300, 10)
    opened = loop.time() - started
    peak = runner.active_connections
    t0 = loop.time()
    async with aiohttp.ClientSession() as http:  # an ordinary client is served meanwhile
        async with http.post(f"http://127.0.0.1:{port}/v1/echo", json={"model": "x"}) as r:
            assert r.status == 200 and (await r.json())["keys"] == ["model"]
    normal = loop.time() - t0
    await asyncio.gather(*tasks)
    all_cut = loop.time() - started
    for w in clients:
        w.close()
    await wait_for(lambda: runner.active_connections == 0)
    print(
        f"\n300 half-sent connections opened in {opened:.2f} s ({peak} open at once), all cut after {all_cut:.2f} s;"
        f" a normal request meanwhile took {normal * 1000:.0f} ms"
    )
    assert normal < 3.0
    assert all_cut < BODY_DEADLINE + 6.0


# ---------------------------------------------------------------- request bodies


async def test_slow_body_cut_at_deadline(serve):
    _, port = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_head("POST", "/v1/echo", {"Content-Length": "100", "Content-Type": "application/json"}))
    sender = asyncio.create_task(trickle(reader, writer, b"{" + b" " * 99, 0.3))  # within body_timeout
    elapsed, data = await wait_closed(reader, BODY_DEADLINE + MARGIN)
    sender.cancel()
    writer.close()
    assert BODY_DEADLINE - 0.1 <= elapsed <= BODY_DEADLINE + MARGIN
    if data:
        status, headers, body = parse_raw_response(data)
        assert status == 408 and headers.get("connection", "").lower() == "close"
        assert_openai_error(body, "request_timeout", "body_deadline")


@pytest.mark.parametrize("path", ["/v1/echo", "/api/echo"])
async def test_stalled_body_is_408_then_closed(serve, path):
    _, port = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_head("POST", path, {"Content-Length": "100"}) + b'{"a": ')
    started = time.monotonic()
    response = await read_response(reader, BODY_TIMEOUT + MARGIN)
    assert response is not None
    status, _, body = response
    assert status == 408
    if path.startswith("/api/"):
        assert_ollama_error(body, "body_timeout")
    else:
        assert_openai_error(body, "request_timeout", "body_timeout")
    assert BODY_TIMEOUT - 0.1 <= time.monotonic() - started
    await wait_closed(reader, MARGIN)  # closed without waiting for the rest
    writer.close()


def gzip_members(data: bytes) -> bytes:
    half = len(data) // 2
    return gzip.compress(data[:half]) + gzip.compress(data[half:])


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


async def test_gzip_and_deflate_bodies_are_decoded(serve):
    _, port = await serve()
    payload = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi " * 5000}]}).encode()
    variants = {
        "gzip": gzip.compress(payload),
        "x-gzip": gzip.compress(payload),
        "GZip": gzip_members(payload),
        "deflate": zlib.compress(payload),
        "Deflate ": raw_deflate(payload),
        "identity": payload,
        "gzip, identity": gzip.compress(payload),
        "deflate, gzip": gzip.compress(zlib.compress(payload)),
    }
    for encoding, data in variants.items():
        status, body = await post(port, "/v1/echo", data, {"Content-Encoding": encoding})
        assert (status, body) == (200, {"keys": ["messages", "model"], "size": len(payload)}), encoding
    status, body = await post(port, "/v1/echo", b"", {"Content-Encoding": "gzip"})
    assert status == 400
    assert_openai_error(body, contains="empty")


async def test_invalid_encoded_bodies_are_400_naming_the_encoding(serve):
    _, port = await serve()
    payload = b'{"model": "m"}'
    cases = [
        ("gzip", b"this is not gzip at all"),
        ("gzip", gzip.compress(payload)[:-6]),  # truncated
        ("gzip", gzip.compress(payload) + b"trailing"),
        ("deflate", b"\x00\x01garbage that is not deflate"),
        ("deflate", zlib.compress(payload)[:-3]),
    ]
    for encoding, data in cases:
        status, body = await post(port, "/v1/echo", data, {"Content-Encoding": encoding})
        assert status == 400, (encoding, data, body)
        assert_openai_error(body, contains=f"not valid {encoding}")
    status, body = await post(port, "/api/echo", b"nope", {"Content-Encoding": "gzip"})
    assert status == 400
    assert_ollama_error(body, "gzip")


async def test_unsupported_encodings_are_415(serve):
    _, port = await serve()
    for encoding in ("br", "zstd", "compress", "gzip, br", "gzip, gzip, gzip, gzip"):
        status, body = await post(port, "/v1/echo", b"{}", {"Content-Encoding": encoding})
        assert status == 415, encoding
        assert_openai_error(body, "unsupported_media_type", "gzip, x-gzip, deflate")
    status, body = await post(port, "/api/echo", b"{}", {"Content-Encoding": "br"})
    assert status == 415
    assert_ollama_error(body, "br")


@pytest.mark.parametrize("encoding", ["gzip", "deflate-zlib", "deflate-raw"])
def test_inflater_byte_by_byte_and_at_the_limit(encoding):
    data = json.dumps({"x": "y" * 1000}).encode()
    coded = {"gzip": gzip.compress, "deflate-zlib": zlib.compress, "deflate-raw": raw_deflate}[encoding](data)
    coding = encoding.split("-")[0]
    inflater = _Inflater(coding, len(data))  # exactly at the limit
    out = b"".join(inflater.feed(coded[i : i + 1]) for i in range(len(coded))) + inflater.finish()
    assert out == data
    inflater = _Inflater(coding, len(data) - 1)
    with pytest.raises(PayloadTooLarge):
        inflater.feed(coded)
        inflater.finish()
    inflater = _Inflater(coding, len(data))
    inflater.feed(coded[:-4])
    with pytest.raises(BadRequest, match="truncated"):
        inflater.finish()


def gzip_bomb(gib: int = 1) -> bytes:
    """A valid gzip of `gib` GiB of zeros (about 1 MiB), built from one repeated
    full-flush deflate block instead of compressing a GiB."""
    mib = bytes(1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    c.compress(mib)
    c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH)  # self-contained after a full flush
    end = c.flush()
    crc = 0
    for _ in range(gib * 1024):
        crc = zlib.crc32(mib, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    return header + block * (gib * 1024) + end + struct.pack("<II", crc, (gib << 30) & 0xFFFFFFFF)


async def test_gzip_bomb_is_413_without_inflating(serve):
    _, port = await serve()
    bomb = gzip_bomb(1)
    assert len(bomb) < MAX_SIZE
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, high-water mark
    started = time.monotonic()
    status, body = await post(port, "/v1/echo", bomb, {"Content-Encoding": "gzip"})
    elapsed = time.monotonic() - started
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    assert status == 413
    assert_openai_error(body, "payload_too_large", "decompressed")
    assert grown < 200 * 1024**2, f"peak memory grew by {grown / 2**20:.0f} MiB"
    assert elapsed < 10


async def test_oversized_bodies_are_413(serve):
    _, port = await serve()
    # Content-Length over the limit: answered before any of the body is sent
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_head("POST", "/api/echo", {"Content-Length": str(100 * 1024**2)}))
    response = await read_response(reader)
    assert response is not None and response[0] == 413
    assert_ollama_error(response[2], "max_body_size")
    writer.close()
    # chunked, no Content-Length: cut while reading
    async def chunks():
        for _ in range(MAX_SIZE // 65536 + 4):
            yield b" " * 65536
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{port}/v1/echo", data=chunks()) as r:
            assert r.status == 413
            assert_openai_error(await r.json(), "payload_too_large", "max_body_size")


BAD_JSON = {
    "nan": (b'{"temperature": NaN}', "NaN"),
    "infinity": (b'{"temperature": Infinity}', "Infinity"),
    "minus_infinity": (b'{"t": [-Infinity]}', "-Infinity"),
    "overflow": (b'{"temperature": 1e400}', "out of range"),
    "lone_surrogate": (b'{"prompt": "a\\ud800b"}', "surrogate"),
    "lone_surrogate_key": (b'{"\\udc00": 1}', "surrogate"),
    "depth_101": (b'{"a": ' + b"[" * 100 + b"]" * 100 + b"}", "nested too deeply"),
    "depth_5000": (b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
    "depth_100000": (b'{"a": ' + b'{"a": ' * 100000 + b"1" + b"}" * 100001, "nested too deeply"),
    "not_object": (b"[1, 2]", "got array"),
    "invalid": (b'{"a": 1,}', "char 8"),
    "utf8": (b'{"a": "\xff"}', "UTF-8"),
    "empty": (b"", "empty"),
}


async def test_bad_json_is_400_json_over_http(serve):
    _, port = await serve()
    for name, (raw, contains) in BAD_JSON.items():
        status, body = await post(port, "/v1/echo", raw)
        assert status == 400, name
        assert_openai_error(body, contains=contains)
    status, body = await post(port, "/api/echo", BAD_JSON["nan"][0])
    assert status == 400
    assert_ollama_error(body, "NaN")


@pytest.mark.parametrize("name", sorted(BAD_JSON))
def test_parse_json_object_rejects(name):
    raw, contains = BAD_JSON[name]
    with pytest.raises(BadRequest) as info:
        parse_json_object(raw)
    assert contains in info.value.message and info.value.status == 400


def test_parse_json_object_accepts():
    assert parse_json_object(b'{"a": 10' + b"0" * 400 + b"}")["a"] == 10**401  # big ints stay
    assert parse_json_object(b'{"e": "\\ud83d\\ude00", "x": 1e308, "y": -2.5e-300}')["e"] == "\U0001F600"
    deep = b'{"a": ' + b"[" * 99 + b"]" * 99 + b"}"  # 100 levels with the top object
    assert parse_json_object(deep)
    with pytest.raises(BadRequest):
        parse_json_object(deep, max_depth=99)


def test_parse_json_object_is_fast_on_a_large_ordinary_body():
    body = {"model": "m", "messages": [{"role": "user", "content": "hello world " * 2600} for _ in range(1000)]}
    raw = json.dumps(body).encode()
    assert len(raw) > 29 * 1024**2
    started = time.perf_counter()
    assert parse_json_object(raw) == body
    assert time.perf_counter() - started < 3.0  # about 0.1 s on an idle machine


# ---------------------------------------------------------------- responses are not limited


async def test_long_streaming_response_is_not_cut(serve):
    _, port = await serve()
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/v1/stream") as r:
            assert r.status == 200
            text = (await r.read()).decode()
    assert text.splitlines() == [f"chunk {i}" for i in range(STREAM_CHUNKS)]
    assert time.monotonic() - started >= STREAM_CHUNKS * STREAM_INTERVAL * 0.9
