"""The gateway's HTTP client for runners: HTTP/1.1 over each runner's Unix socket.

Every request the supervisor proxies crosses this hop, and aiohttp's client
costs about as much CPU per request as aiohttp's server and the rest of the
supervisor together (URL parsing, request and response objects, a stream
reader, timers and connector bookkeeping for every call).  A runner is one
known peer that speaks one dialect (uvicorn answering POSTs with either a
Content-Length body or a chunked stream), so this client does only that:

- `RunnerConnections`: one per runner process, a stack of idle keep-alive
  connections (the most recently used first, so a few stay warm and the
  others age out), no limit on how many are open.  A connection idle for
  `KEEPALIVE_TIMEOUT` (process.py: well before the runner's own keep-alive
  ends) is closed instead of used, so a request is never sent on a connection
  the runner is closing.  A connection goes back to the stack only after its
  response was read to the end; anything else (an error, a client that left,
  a response not read) closes it.
- `Exchange`: one request on one connection.  `head` resolves with the
  `RunnerResponse` once the status line and headers are in; `done` resolves
  once the body has arrived to its end (or the connection failed), with
  nobody having to read it: a caller that gives up waiting can still learn
  when the runner has finished (`Gateway` holds the runner's lease until
  then).  Body bytes are handed over as they arrive, exactly as sent (chunked
  framing removed); reading from the runner pauses while more than
  `HIGH_WATER` bytes wait for a slow consumer.

Failures are aiohttp's exception types, so callers treat both clients
alike: a connection that cannot be made is a `ClientConnectorError`
(`RunnerUnreachable`; `process.RunnerGone` once the runner has exited), a
connection lost before or during the response a `ServerDisconnectedError`
or a `ClientPayloadError`, and `timeout` (the request's whole exchange) an
`asyncio.TimeoutError`.  A response read with `watch_stall(seconds)` fails
with `RunnerStalled` when the runner sends nothing for that long while the
reader waits for it (time the reader spends elsewhere does not count); one
timer per response, pushed back lazily, watches for that.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import aiohttp

from .process import KEEPALIVE_TIMEOUT, RunnerGone, RunnerUnreachable

# Body bytes buffered for a consumer before reading from the runner pauses.
HIGH_WATER = 64 * 1024
# A response head (status line and headers) longer than this is not a runner's.
MAX_HEAD = 64 * 1024
# Seconds to open a connection (a Unix socket: only a full backlog makes it wait).
CONNECT_TIMEOUT = 10.0


class RunnerStalled(Exception):
    """The runner sent nothing for the stall timeout while the reader waited."""


class RunnerResponse:
    """A runner's answer: status, headers (names in lower case) and the body as it arrives."""

    __slots__ = ("status", "headers", "_conn", "_exchange")

    def __init__(self, status: int, headers: dict[str, str], conn: "_Connection", exchange: "Exchange"):
        self.status = status
        self.headers = headers
        self._conn = conn
        self._exchange = exchange

    @property
    def content_type(self) -> str:
        """The media type without parameters, as aiohttp gives it ("application/octet-stream" if none)."""
        value = self.headers.get("content-type")
        if not value:
            return "application/octet-stream"
        return value.split(";", 1)[0].strip().lower()

    async def readany(self) -> bytes:
        """The body bytes that have arrived (waiting for some), b"" at its end."""
        return await self._conn.readany(self._exchange)

    def watch_stall(self, seconds: float | None) -> None:
        """From now on, fail reads with `RunnerStalled` after `seconds` of
        waiting without a byte from the runner (None: never)."""
        self._exchange.stall = seconds

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        while True:
            chunk = await self._conn.readany(self._exchange)
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)

    def close(self) -> None:
        """Done with it: the connection is reused if the body arrived to its end, else closed."""
        self._exchange.close()


class Exchange:
    """One request and its response on one connection."""

    __slots__ = ("conn", "head", "done", "error", "stall", "waiting_since", "_timer", "_stall_timer", "_closed")

    def __init__(self, conn: "_Connection", loop: asyncio.AbstractEventLoop, timeout: float | None):
        self.conn = conn
        self.head: asyncio.Future[RunnerResponse] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.error: BaseException | None = None  # why the exchange failed, once it has
        self.stall: float | None = None  # see RunnerResponse.watch_stall
        self.waiting_since: float | None = None  # loop time the reader began waiting for bytes
        self._stall_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._timer = loop.call_later(timeout, conn.timed_out, self) if timeout else None

    def finished(self, exc: BaseException | None) -> None:
        self.error = exc
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if not self.head.done():
            if exc is None:  # ended without a response: cannot happen with a complete head
                exc = aiohttp.ServerDisconnectedError()
            self.head.set_exception(exc)
            self.head.exception()  # nobody may be waiting any more: no "never retrieved"
        if not self.done.done():
            self.done.set_result(None)
        if exc is None and self._closed:
            self.conn.release()  # the caller let go before the end; the end came

    def close(self) -> None:
        """The caller is done with the response: reuse the connection if the
        response is complete, else close it (an unread or cut response)."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None and self.done.done():
            self._timer.cancel()
            self._timer = None
        if self.done.done() and self.conn.exchange is None:
            self.conn.release()
        else:
            self.conn.abort()

    def close_when_done(self) -> None:
        """The caller will not read the response, but the runner keeps working
        on it: read it to its end (discarding it), then reuse the connection."""
        if self._closed:
            return
        self._closed = True
        self.conn.discard = True
        self.conn.drop_buffered()
        if self.done.done() and self.conn.exchange is None:
            self.conn.release()

    def abort(self) -> None:
        """Cut the exchange (the runner sees its client go)."""
        self._closed = True
        self.conn.abort()


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection and the parser of its responses."""

    def __init__(self, pool: "RunnerConnections"):
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.lost = False
        self.idle_since = 0.0
        self.keep_alive = True
        self.discard = False  # the caller left: drop the body instead of buffering it
        self._buf = bytearray()
        self._state = "idle"  # idle | head | length | chunk-size | chunk-data | chunk-crlf | trailers | eof
        self._left = 0  # bytes left in the body (length) or the chunk (chunk-data)
        self._body: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    # -------------------------------------------------------- protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        self.pool.forget(self)
        if self.exchange is not None:
            if self._state in ("idle", "head"):
                error: BaseException = aiohttp.ServerDisconnectedError()
            else:
                error = aiohttp.ClientPayloadError(
                    "Response payload is not completed: the runner closed the connection"
                )
            self._fail(error)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def data_received(self, data: bytes) -> None:
        if self.exchange is None:
            self.abort()  # nothing asked: a runner that talks unprompted is not one to reuse
            return
        self._buf += data
        try:
            self._parse()
        except aiohttp.ClientError as e:
            self._fail(e)
            self.abort()

    def pause_writing(self) -> None:  # a request body bigger than the socket buffer: asyncio buffers it
        pass

    def resume_writing(self) -> None:
        pass

    # -------------------------------------------------------- requests

    def send(self, data: bytes, timeout: float | None) -> Exchange:
        exchange = Exchange(self, self.loop, timeout)
        self.exchange = exchange
        self._state = "head"
        self.keep_alive = True
        self.discard = False
        self._body.clear()
        self._buffered = 0
        assert self.transport is not None
        self.transport.write(data)
        return exchange

    def timed_out(self, exchange: Exchange) -> None:
        exchange._timer = None  # noqa: SLF001
        if self.exchange is exchange:
            self._fail(asyncio.TimeoutError())
            self.abort()

    def release(self) -> None:
        """Back to the pool, ready for the next request."""
        if self.lost or not self.keep_alive or self.exchange is not None or self._buf:
            self.abort()
            return
        self._body.clear()
        self._buffered = 0
        self.pool.put(self)

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()
        self.lost = True
        self.pool.forget(self)

    def drop_buffered(self) -> None:
        self._body.clear()
        self._buffered = 0
        if self._paused and self.transport is not None and not self.lost:
            self._paused = False
            self.transport.resume_reading()

    # -------------------------------------------------------- the body, for the response

    async def readany(self, exchange: Exchange) -> bytes:
        while True:
            if self._body:
                chunk = self._body.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered < HIGH_WATER // 2 and not self.lost:
                    self._paused = False
                    assert self.transport is not None
                    self.transport.resume_reading()
                return chunk
            if exchange.done.done():
                if exchange.error is not None:
                    raise exchange.error
                return b""
            waiter = self._waiter = self.loop.create_future()
            if exchange.stall is not None:
                exchange.waiting_since = now = self.loop.time()
                if exchange._stall_timer is None:  # noqa: SLF001
                    exchange._stall_timer = self.loop.call_at(now + exchange.stall, self._stall_check, exchange)  # noqa: SLF001
            try:
                await waiter
            finally:
                self._waiter = None
                exchange.waiting_since = None

    def _stall_check(self, exchange: Exchange) -> None:
        """The stall timer: due when the reader that was waiting then would have
        waited `stall` seconds; it moves on to the wait under way, if any."""
        exchange._stall_timer = None  # noqa: SLF001
        since, stall = exchange.waiting_since, exchange.stall
        if self.exchange is not exchange or since is None or stall is None:
            return  # nobody waits: the next wait arms it again
        due = since + stall
        if self.loop.time() < due:
            exchange._stall_timer = self.loop.call_at(due, self._stall_check, exchange)  # noqa: SLF001
            return
        self._fail(RunnerStalled(f"sent nothing for {stall:g} s"))
        self.abort()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _deliver_counted(self, buf: bytearray) -> bool:
        """Deliver up to the `_left` bytes still owed by a Content-Length body or
        a chunk; True once all of them have come."""
        take = bytes(buf[:self._left])
        del buf[:len(take)]
        self._left -= len(take)
        self._deliver(take)
        return self._left == 0

    def _deliver(self, chunk: bytes) -> None:
        if not chunk or self.discard:
            return
        self._body.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None and not self.lost:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    # -------------------------------------------------------- parsing

    def _fail(self, error: BaseException) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        self.exchange = None
        self.keep_alive = False
        exchange.finished(error)
        self._wake()

    def _end(self) -> None:
        """The response is complete."""
        exchange = self.exchange
        assert exchange is not None
        self._state = "eof"
        self.exchange = None
        exchange.finished(None)
        self._wake()

    def _parse(self) -> None:
        buf = self._buf
        while True:
            state = self._state
            if state == "head":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise aiohttp.ClientResponseError(None, (), message="response head too long")  # type: ignore[arg-type]
                    return
                self._head(bytes(buf[:end]))
                del buf[:end + 4]
            elif state == "length":
                if not buf:
                    return
                if self._deliver_counted(buf):
                    self._end()
                    return
            elif state == "chunk-size":
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 1024:
                        raise aiohttp.ClientPayloadError("invalid chunk size line")
                    return
                line = bytes(buf[:end]).split(b";", 1)[0].strip()
                del buf[:end + 2]
                try:
                    size = int(line, 16)
                except ValueError:
                    raise aiohttp.ClientPayloadError(f"invalid chunk size {line[:20]!r}") from None
                if size == 0:
                    self._state = "trailers"
                else:
                    self._left = size
                    self._state = "chunk-data"
            elif state == "chunk-data":
                if not buf:
                    return
                if self._deliver_counted(buf):
                    self._state = "chunk-crlf"
            elif state == "chunk-crlf":
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise aiohttp.ClientPayloadError("missing CRLF after a chunk")
                del buf[:2]
                self._state = "chunk-size"
            elif state == "trailers":
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[:end + 2]
                if end == 0:  # the empty line after the trailers (usually none)
                    self._end()
                    return
            else:  # idle or eof: bytes nobody asked for
                if buf:
                    raise aiohttp.ClientPayloadError("runner sent data after the response")
                return

    def _head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise aiohttp.ClientResponseError(None, (), message=f"invalid status line {lines[0][:80]!r}")  # type: ignore[arg-type]
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if status < 200:  # 100 Continue and the like: the real answer follows
            return
        connection = headers.get("connection", "").lower()
        self.keep_alive = parts[0] == "HTTP/1.1" and "close" not in connection
        exchange = self.exchange
        assert exchange is not None
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._state = "chunk-size"
        elif "content-length" in headers:
            try:
                self._left = int(headers["content-length"])
            except ValueError:
                raise aiohttp.ClientPayloadError("invalid Content-Length") from None
            self._state = "length"
        else:
            raise aiohttp.ClientPayloadError("response without Content-Length or chunked body")
        exchange.head.set_result(RunnerResponse(status, headers, self, exchange))
        if self._state == "length" and self._left == 0:
            self._end()


class RunnerConnections:
    """Keep-alive connections to one runner (see the module docstring)."""

    def __init__(self, process: Any):
        self.process = process
        self.path: str | None = process.socket_path
        self.loop = asyncio.get_running_loop()
        self.idle: list[_Connection] = []
        self.open: set[_Connection] = set()
        auth = process.auth_headers()
        self._head = "".join(f"{k}: {v}\r\n" for k, v in auth.items()).encode("latin-1")

    def put(self, conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        self.open.discard(conn)
        # An idle connection the runner closed: rare, so a linear removal is fine.
        if conn in self.idle:
            self.idle.remove(conn)

    def close(self) -> None:
        for conn in list(self.open):
            conn.abort()

    async def _connection(self) -> _Connection:
        if self.process.returncode is not None:
            raise RunnerGone(self.path)
        now = time.monotonic()
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.lost:
                continue
            if now - conn.idle_since >= KEEPALIVE_TIMEOUT:
                conn.abort()  # the runner may be closing it: not worth the risk
                # Those below it are older still.
                for old in idle:
                    old.abort()
                idle.clear()
                break
            return conn
        if self.path is None:
            raise RunnerGone(self.path)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                _, conn = await self.loop.create_unix_connection(lambda: _Connection(self), self.path)
        except asyncio.TimeoutError:
            raise
        except OSError as e:
            if self.process.returncode is not None:
                raise RunnerGone(self.path) from e
            raise RunnerUnreachable(self.path, e) from e
        self.open.add(conn)
        return conn

    async def post(self, path: str, body: bytes, *, headers: dict[str, str] | None = None,
                   timeout: float | None = None) -> Exchange:
        """Send a POST with a JSON body; returns the exchange at once (await `head`)."""
        conn = await self._connection()
        head = (f"POST {path} HTTP/1.1\r\nHost: runner\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n").encode("latin-1") + self._head
        if headers:
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
        return conn.send(head + b"\r\n" + body, timeout)
