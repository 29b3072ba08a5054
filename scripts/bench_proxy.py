#!/usr/bin/env python3
"""What the supervisor itself costs: proxy throughput, added latency, scheduling at scale.

    python scripts/bench_proxy.py proxy [--duration 10] [--clients 64] [--stream] [--repeat N]
    python scripts/bench_proxy.py latency [--requests 500] [--repeat N]
    python scripts/bench_proxy.py scale [--models 200] [--requests 5000] [--max-loaded 4] [--repeat N]

Each subcommand prints the dict its function returns as JSON (with
--repeat, every run and the medians); the functions (`bench_proxy`,
`bench_added_latency`, `bench_scale`) are plain calls for other benchmark
scripts.

`proxy` and `latency` start the supervisor the way a user does
(``python -m hoshikage_sup serve --config FILE``) with every model pointing
at a tiny placeholder GGUF.  The runner command is not a config setting (the
supervisor always runs ``python -m hoshikage_runner``), so the runner is
swapped through the environment: a directory on PYTHONPATH holds a
``hoshikage_runner`` package whose ``__main__`` is the *lean runner* below and
whose other modules are the real ones (its ``__path__`` extends to the real
package).  The lean runner speaks the runner protocol (parent-death signal,
stdin lifeline, the settings line, the inherited listening Unix socket, the
bearer secret, a lock-free ``/health``) and answers a completion at once,
from a raw asyncio HTTP/1.1 server, so nearly all the CPU it leaves goes to
the supervisor.  ``runner="fake"`` uses tests/fake_runner.py instead (aiohttp,
FAKE_TOKENS=1, no delays).

The load generator is a raw asyncio HTTP/1.1 keep-alive client (one
connection per simulated client): aiohttp's client would eat a good part of
the two cores it is measuring.  Supervisor, runner and load generator share
the machine; each figure dict says how the CPU was split over the measured
window: `supervisor_cpu_s`, `runner_cpu_s` (its runner processes),
`loadgen_cpu_s` (this process), `other_cpu_s` (everything else the machine
ran meanwhile) out of `machine_capacity_cpu_s` (seconds x cores).  On a
shared machine `other_cpu_s` says how far the figures are from a quiet one.

The slow-callback count comes from a second run of the supervisor with
PYTHONASYNCIODEBUG=1 (asyncio's debug mode, slow_callback_duration 0.1 s):
asyncio logs one "Executing <...> took N seconds" line per callback that
held the event loop longer, and those lines are counted.  Debug mode makes
everything slower, so throughput is measured in a run without it.

`scale` runs in-process: the Scheduler with stand-in runners that load in a
moment and serve at once, the real memory planner on a simulated 64 GiB
machine, and every request going through `Scheduler.acquire`/`release`, as
the scheduler tests do (200 real runner processes would measure process
start-up, not scheduling).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent
FAKE_RUNNER = ROOT / "tests" / "fake_runner.py"
# A second bearer token the lean runner accepts besides the supervisor's, so the
# latency benchmark can reach the runner directly (the real secret never leaves
# the supervisor).
DIRECT_SECRET_ENV = "BENCH_DIRECT_SECRET"
TOKENS_ENV = "BENCH_TOKENS"

try:
    import hoshikage_sup  # noqa: F401
except ImportError:  # run with an interpreter where the project is not installed
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT / "runners"))


# ====================================================================== lean runner
# Runs in the runner process: keep it free of heavy imports.


_WORDS = ("Hello", " from", " the", " lean", " runner", ".")


def _http_response(status: int, body: bytes, content_type: bytes = b"application/json") -> bytes:
    reason = {200: b"OK", 401: b"Unauthorized", 404: b"Not Found", 422: b"Unprocessable Entity"}.get(status, b"Error")
    return (b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n"
            % (status, reason, content_type, len(body))) + body


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _LeanRunnerProtocol(asyncio.Protocol):
    """One connection: HTTP/1.1 requests one after another (keep-alive)."""

    def __init__(self, settings: dict[str, Any], secrets: set[bytes], tokens: int):
        self.settings = settings
        self.secrets = secrets
        self.tokens = tokens
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1").split("\r\n")
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            method, path = head[0].split(" ")[:2]
            self.handle(method, path, headers, body)

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        assert self.transport is not None
        write = self.transport.write
        if method == "GET" and path == "/health":
            write(_http_response(200, b'{"status":"ok","model":%s,"pid":%d}' % (
                json.dumps(self.settings["model_alias"]).encode(), os.getpid())))
            return
        auth = headers.get("authorization", "")
        if not auth.startswith("Bearer ") or auth[7:].encode() not in self.secrets:
            write(_http_response(401, b'{"error":{"message":"missing or invalid runner secret",'
                                      b'"type":"invalid_request_error","param":null,"code":"invalid_api_key"}}'))
            return
        if method != "POST" or path not in ("/v1/completions", "/v1/chat/completions"):
            write(_http_response(404, b'{"detail":"Not Found"}'))
            return
        try:
            req = json.loads(body)
        except ValueError:
            write(_http_response(422, b'{"error":{"message":"invalid JSON","type":"invalid_request_error",'
                                      b'"param":null,"code":null}}'))
            return
        chat = path == "/v1/chat/completions"
        model = req.get("model") or self.settings["model"]
        n = self.tokens
        if req.get("max_tokens"):
            n = min(n, int(req["max_tokens"]))
        words = [_WORDS[i % len(_WORDS)] for i in range(n)]
        created = int(time.time())
        finish = "length" if req.get("max_tokens") and n >= int(req["max_tokens"]) else "stop"
        if not req.get("stream"):
            text = "".join(words)
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                          "finish_reason": finish}
                obj = {"id": "chatcmpl-lean", "object": "chat.completion", "created": created, "model": model,
                       "choices": [choice]}
            else:
                obj = {"id": "cmpl-lean", "object": "text_completion", "created": created, "model": model,
                       "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
            obj["usage"] = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
            write(_http_response(200, json.dumps(obj).encode()))
            return
        write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
              b"cache-control: no-store\r\ntransfer-encoding: chunked\r\n\r\n")
        events = []
        if chat:
            base = {"id": "chatcmpl-lean", "model": model, "created": created, "object": "chat.completion.chunk"}
            events.append({**base, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                                "finish_reason": None}]})
            for w in words:
                events.append({**base, "choices": [{"index": 0, "delta": {"content": w}, "logprobs": None,
                                                    "finish_reason": None}]})
            events.append({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}]})
        else:
            base = {"id": "cmpl-lean", "object": "text_completion", "created": created, "model": model}
            for w in words:
                events.append({**base, "choices": [{"text": w, "index": 0, "logprobs": None, "finish_reason": None}]})
            events.append({**base, "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": finish}]})
        # One write per event, as sse-starlette does (CRLF line ends like it, too).
        for e in events:
            write(_chunk(b"data: " + json.dumps(e).encode() + b"\r\n\r\n"))
        write(_chunk(b"data: [DONE]\r\n\r\n") + b"0\r\n\r\n")


def lean_runner_main() -> int:
    """`python -m hoshikage_runner`, benchmark edition (see the module docstring)."""
    from hoshikage_runner.lifeline import Lifeline, fail

    lifeline = Lifeline.install()
    settings = lifeline.read_settings()
    settings.setdefault("model_alias", settings.get("model"))
    if not isinstance(settings.get("model"), str):
        fail("invalid runner settings: model: Field required")
    secrets = {settings["secret"].encode()}
    if os.environ.get(DIRECT_SECRET_ENV):
        secrets.add(os.environ[DIRECT_SECRET_ENV].encode())
    tokens = int(os.environ.get(TOKENS_ENV) or 1)

    async def serve() -> None:
        sock = socket.socket(fileno=settings["fd"])
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(lambda: _LeanRunnerProtocol(settings, secrets, tokens), sock=sock)
        print(f"fake runner serving {settings['model_alias']} on {sock.getsockname()}", file=sys.stderr, flush=True)
        done = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, done.set)
        loop.add_signal_handler(signal.SIGINT, done.set)
        await done.wait()
        server.close()

    asyncio.run(serve())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ====================================================================== set-up


def _gguf_string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def write_tiny_gguf(path: Path) -> Path:
    """A valid GGUF header (a two-layer 'llama', no real weights) for the planner to read."""
    u32, string = 4, 8
    kvs = [
        ("general.architecture", string, "llama"),
        ("general.name", string, "bench"),
        ("llama.context_length", u32, 4096),
        ("llama.block_count", u32, 2),
        ("llama.embedding_length", u32, 32),
        ("llama.feed_forward_length", u32, 64),
        ("llama.attention.head_count", u32, 4),
        ("llama.attention.head_count_kv", u32, 2),
    ]
    tensors = [("token_embd.weight", (32, 64), 0), ("output_norm.weight", (32,), 0)]
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)))
    for key, vtype, value in kvs:
        out += _gguf_string(key) + struct.pack("<I", vtype)
        out += _gguf_string(value) if vtype == string else struct.pack("<I", value)
    offset = 0
    sizes = []
    for name, shape, ttype in tensors:
        out += _gguf_string(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
        out += struct.pack("<IQ", ttype, offset)
        size = 4
        for d in shape:
            size *= d
        sizes.append(size)
        offset += (size + 31) // 32 * 32
    out += b"\0" * (-len(out) % 32)
    for size in sizes:
        out += b"\0" * ((size + 31) // 32 * 32)
    path.write_bytes(bytes(out))
    return path


def _shadow_runner_package(where: Path, runner: str) -> Path:
    """A PYTHONPATH entry whose `hoshikage_runner` runs our runner and is the real package otherwise."""
    import hoshikage_runner

    real = Path(hoshikage_runner.__file__).resolve().parent
    pkg = where / "hoshikage_runner"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(
        f"# Benchmark shim: runs a stand-in runner; every other module is the real one.\n"
        f"__path__.append({str(real)!r})\n"
    )
    if runner == "lean":
        main = (f"import sys\nsys.path.insert(0, {str(SCRIPTS)!r})\n"
                f"from bench_proxy import lean_runner_main\nsys.exit(lean_runner_main())\n")
    elif runner == "fake":
        main = f"import runpy\nrunpy.run_path({str(FAKE_RUNNER)!r}, run_name='__main__')\n"
    else:
        raise ValueError(f"runner must be 'lean' or 'fake', got {runner!r}")
    (pkg / "__main__.py").write_text(main)
    return where


class Supervisor:
    """`python -m hoshikage_sup serve --config FILE` in a subprocess, with stand-in runners."""

    def __init__(self, models: int = 1, *, runner: str = "lean", debug: bool = False, tokens: int = 1,
                 server: dict[str, Any] | None = None, profile: str | None = None):
        self.tmp = tempfile.TemporaryDirectory(prefix="hoshikage-bench-")
        tmp = Path(self.tmp.name)
        gguf = write_tiny_gguf(tmp / "tiny.gguf")
        settings = {"host": "127.0.0.1", "port": 0, "max_queue": 10000, "max_connections": 4096,
                    "runtime_dir": str(tmp), "log_level": "info", **(server or {})}
        lines = ["[server]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
        for i in range(models):
            lines += [f"[models.m{i}]", f"path = {json.dumps(str(gguf))}", "n_ctx = 256"]
        self.config = tmp / "config.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.direct_secret = "bench-" + os.urandom(12).hex()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HOSHIKAGE_", "FAKE_"))}
        shadow = _shadow_runner_package(tmp / "shadow", runner)
        env["PYTHONPATH"] = os.pathsep.join([str(shadow), *filter(None, [env.get("PYTHONPATH")])])
        env[DIRECT_SECRET_ENV] = self.direct_secret
        env[TOKENS_ENV] = str(tokens)
        env.update(FAKE_TOKENS=str(tokens), FAKE_TOKEN_DELAY="0")
        env.pop("PYTHONASYNCIODEBUG", None)
        if debug:
            env["PYTHONASYNCIODEBUG"] = "1"
        self.stdout = open(tmp / "supervisor.log", "w+b")
        self.stderr = open(tmp / "supervisor.err", "w+b")
        argv = [sys.executable]
        if profile:
            argv += ["-m", "cProfile", "-o", profile]
        argv += ["-m", "hoshikage_sup", "serve", "--config", str(self.config)]
        self.proc = subprocess.Popen(argv, env=env, stdout=self.stdout, stderr=self.stderr, cwd=str(tmp))
        self.port = self._wait_for("listening", 30.0)["port"]
        self.url = f"http://127.0.0.1:{self.port}"

    def log_lines(self) -> list[dict[str, Any]]:
        self.stdout.flush()
        out = []
        for line in Path(self.stdout.name).read_bytes().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def stderr_text(self) -> str:
        self.stderr.flush()
        return Path(self.stderr.name).read_text(errors="replace")

    def _wait_for(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_lines():
                if line.get("event") == event:
                    return line
            if self.proc.poll() is not None:
                raise RuntimeError(f"supervisor exited ({self.proc.returncode}): {self.stderr_text()[-2000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"no {event!r} line from the supervisor in {timeout} s")

    def runner_socket(self, model: str = "m0") -> str:
        for line in self.log_lines():
            if line.get("event") == "runner ready" and line.get("socket") and line.get("model") == model:
                return line["socket"]
        raise RuntimeError("no runner socket in the supervisor's log")

    def slow_callbacks(self) -> list[str]:
        return re.findall(r"Executing .*? took [\d.]+ seconds", self.stderr_text())

    def cpu_seconds(self) -> tuple[float, float]:
        """(supervisor, its runners) CPU seconds so far."""
        import psutil

        p = psutil.Process(self.proc.pid)
        t = p.cpu_times()
        mine = t.user + t.system
        self.last_user_system = (t.user, t.system)
        kids = 0.0
        for c in p.children(recursive=True):
            try:
                ct = c.cpu_times()
                kids += ct.user + ct.system
            except psutil.Error:
                pass
        return mine, kids

    def close(self) -> int:
        from bench_serving import stop  # here: the lean runner imports this module and not that one

        stop(self.proc)
        self.stdout.close()
        self.stderr.close()
        self.tmp.cleanup()
        return self.proc.returncode

    def __enter__(self) -> "Supervisor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ====================================================================== load generator


class _Client(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; `request()` sends one prepared request and
    returns the whole response (Content-Length or chunked bodies)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future[bytes] | None = None
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = exc or ConnectionResetError("connection closed")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.lost)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is None:
            return
        n = self._complete()
        if n:
            resp = bytes(self.buf[:n])
            del self.buf[:n]
            w, self.waiter = self.waiter, None
            w.set_result(resp)

    def _complete(self) -> int:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return 0
        head = bytes(buf[:end]).lower()
        i = head.find(b"\r\ncontent-length:")
        if i >= 0:
            j = head.find(b"\r\n", i + 2)
            total = end + 4 + int(head[i + 17:j if j >= 0 else len(head)])
            return total if len(buf) >= total else 0
        if b"transfer-encoding: chunked" in head:
            k = buf.find(b"\r\n0\r\n\r\n", end + 2)
            return k + 7 if k >= 0 else 0
        return 0  # until the connection closes: not used by either server

    async def request(self, raw: bytes) -> bytes:
        if self.lost is not None or self.transport is None:
            raise ConnectionResetError("connection closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter


def _request(path: str, body: dict[str, Any], *, host: str = "127.0.0.1", auth: str | None = None) -> bytes:
    payload = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
    if auth:
        head += f"Authorization: Bearer {auth}\r\n"
    return (head + "\r\n").encode() + payload


def _ok(resp: bytes, stream: bool) -> bool:
    if not resp.startswith(b"HTTP/1.1 200"):
        return False
    return b"data: [DONE]" in resp if stream else b'"choices"' in resp


async def _connect(port: int | None = None, path: str | None = None) -> _Client:
    loop = asyncio.get_running_loop()
    if path is not None:
        _, client = await loop.create_unix_connection(_Client, path)
    else:
        _, client = await loop.create_connection(_Client, "127.0.0.1", port)
        sock = client.transport.get_extra_info("socket") if client.transport else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client


def _machine_busy() -> float:
    """CPU seconds all cores have spent busy since boot (everything but idle and iowait)."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 3)


async def _load(port: int, raw: bytes, stream: bool, clients: int, warmup: float, duration: float,
                sup: Supervisor | None) -> dict[str, Any]:
    conns = [await _connect(port) for _ in range(clients)]
    latencies: list[float] = []
    errors = 0
    measuring = False
    stop_at = 0.0
    marks: dict[str, Any] = {}

    async def client(c: _Client) -> None:
        nonlocal errors
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at and measuring:
                return
            try:
                resp = await c.request(raw)
            except OSError:
                errors += measuring
                return
            t1 = time.perf_counter()
            if measuring and t1 <= stop_at:
                if _ok(resp, stream):
                    latencies.append(t1 - t0)
                else:
                    errors += 1

    loop = asyncio.get_running_loop()
    stop_at = float("inf")
    tasks = [loop.create_task(client(c)) for c in conns]
    await asyncio.sleep(warmup)
    measuring = True
    start = time.perf_counter()
    stop_at = start + duration
    cpu0 = sup.cpu_seconds() if sup else (0.0, 0.0)
    us0 = sup.last_user_system if sup else (0.0, 0.0)
    me0 = time.process_time()
    busy0 = _machine_busy()
    await asyncio.sleep(duration)
    cpu1 = sup.cpu_seconds() if sup else (0.0, 0.0)
    us1 = sup.last_user_system if sup else (0.0, 0.0)
    me1 = time.process_time()
    busy1 = _machine_busy()
    elapsed = time.perf_counter() - start
    await asyncio.wait(tasks, timeout=30)
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    n = len(latencies)
    marks.update(
        requests=n, errors=errors, seconds=round(elapsed, 3), rps=round(n / elapsed, 1),
        p50_ms=_ms(_pct(latencies, 0.5)), p99_ms=_ms(_pct(latencies, 0.99)),
        supervisor_cpu_s=round(cpu1[0] - cpu0[0], 3),
        supervisor_user_s=round(us1[0] - us0[0], 3), supervisor_system_s=round(us1[1] - us0[1], 3),
        runner_cpu_s=round(cpu1[1] - cpu0[1], 3),
        loadgen_cpu_s=round(me1 - me0, 3),
        # Everything else the machine ran meanwhile (other work on it), and the cores' capacity.
        other_cpu_s=round((busy1 - busy0) - (cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1]) - (me1 - me0), 3),
        machine_capacity_cpu_s=round(elapsed * (os.cpu_count() or 1), 3),
    )
    if n:
        marks["supervisor_cpu_ms_per_request"] = round((cpu1[0] - cpu0[0]) / n * 1000, 4)
        marks["runner_cpu_ms_per_request"] = round((cpu1[1] - cpu0[1]) / n * 1000, 4)
        marks["loadgen_cpu_ms_per_request"] = round((me1 - me0) / n * 1000, 4)
    return marks


def _warm(sup: Supervisor, raw: bytes, stream: bool) -> None:
    """One request: loads the model (the first spawn is not what is measured)."""

    async def one() -> bytes:
        c = await _connect(sup.port)
        try:
            return await asyncio.wait_for(c.request(raw), 60)
        finally:
            if c.transport:
                c.transport.close()

    resp = asyncio.run(one())
    if not _ok(resp, stream):
        raise RuntimeError(f"warm-up request failed: {resp[:500]!r}")


def bench_proxy(duration: float = 10, clients: int = 64, stream: bool = False, *, runner: str = "lean",
                warmup: float = 1.0, debug: bool = True, tokens: int = 1,
                profile: str | None = None) -> dict[str, Any]:
    """Requests/s through the supervisor to an instant runner, `clients` keep-alive
    connections each sending 1-token /v1/completions back to back.

    Returns requests/s, p50/p99 latency, CPU seconds of the supervisor, the
    runner and the load generator over the measured window (and per request),
    errors, and, from a second run under asyncio debug mode (`debug`), the
    slow-callback warnings it logged (`slow_callbacks`) and its requests/s.
    `profile`: write a cProfile of the (non-debug) supervisor to this path."""
    body = {"model": "m0", "prompt": "hi", "max_tokens": 1}
    if stream:
        body["stream"] = True
    raw = _request("/v1/completions", body)
    result: dict[str, Any] = {"clients": clients, "stream": stream, "runner": runner, "tokens": tokens,
                              "cores": os.cpu_count()}
    with Supervisor(runner=runner, tokens=tokens, profile=profile) as sup:
        _warm(sup, raw, stream)
        result.update(asyncio.run(_load(sup.port, raw, stream, clients, warmup, duration, sup)))
        result["slow_callbacks_without_debug"] = len(sup.slow_callbacks())
    if debug:
        with Supervisor(runner=runner, tokens=tokens, debug=True) as sup:
            _warm(sup, raw, stream)
            d = asyncio.run(_load(sup.port, raw, stream, clients, warmup, duration, sup))
            slow = sup.slow_callbacks()
        result["slow_callbacks"] = len(slow)
        result["slow_callback_examples"] = slow[:5]
        result["debug_rps"] = d["rps"]
        result["debug_errors"] = d["errors"]
    return result


# ====================================================================== added latency


async def _sequential(client: _Client, raw: bytes, n: int, stream: bool) -> tuple[list[float], int]:
    out, errors = [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        resp = await client.request(raw)
        t1 = time.perf_counter()
        if _ok(resp, stream):
            out.append(t1 - t0)
        else:
            errors += 1
    return out, errors


def bench_added_latency(requests: int = 500, *, stream: bool = False, rounds: int = 10) -> dict[str, Any]:
    """One client, one request at a time: a 1-token completion through the
    supervisor and straight to its (lean) runner over the runner's Unix socket,
    alternating in `rounds` batches so drift on a busy machine hits both alike.
    The difference is what the supervisor adds."""
    body = {"model": "m0", "prompt": "hi", "max_tokens": 1}
    if stream:
        body["stream"] = True
    via_sup = _request("/v1/completions", body)
    with Supervisor(runner="lean") as sup:
        _warm(sup, via_sup, stream)
        direct = _request("/v1/completions", body, host="runner", auth=sup.direct_secret)
        path = sup.runner_socket("m0")

        async def run() -> dict[str, Any]:
            a = await _connect(sup.port)
            b = await _connect(path=path)
            sup_lat: list[float] = []
            run_lat: list[float] = []
            errors = 0
            await _sequential(a, via_sup, 50, stream)  # warm both paths
            await _sequential(b, direct, 50, stream)
            per = max(1, requests // rounds)
            for _ in range(rounds):
                x, e1 = await _sequential(a, via_sup, per, stream)
                y, e2 = await _sequential(b, direct, per, stream)
                sup_lat += x
                run_lat += y
                errors += e1 + e2
            for c in (a, b):
                if c.transport:
                    c.transport.close()
            s50, s99 = _pct(sup_lat, 0.5), _pct(sup_lat, 0.99)
            r50, r99 = _pct(run_lat, 0.5), _pct(run_lat, 0.99)
            return {
                "requests": len(sup_lat), "stream": stream, "errors": errors,
                "supervisor_p50_ms": _ms(s50), "supervisor_p99_ms": _ms(s99),
                "runner_p50_ms": _ms(r50), "runner_p99_ms": _ms(r99),
                "added_p50_ms": _ms(s50 - r50) if s50 is not None and r50 is not None else None,
                "added_p99_ms": _ms(s99 - r99) if s99 is not None and r99 is not None else None,
            }

        return asyncio.run(run())


# ====================================================================== scale


class _StandInProcess:
    """What the scheduler and the pool use of a RunnerProcess, without a process."""

    _pids = iter(range(3_000_000, 4_000_000))

    def __init__(self, spec: Any, index: int, load_delay: float):
        self.spec = spec
        self.index = index
        self.pid = next(self._pids)
        self.returncode: int | None = None
        self.on_exit = None
        self.load_duration = 0.0
        self.stop_requested = False
        self.state = "new"
        self.load_path = None
        self.thread_budget = None
        self._delay = load_delay

    async def start(self, load_timeout: float = 300.0) -> None:
        self.state = "starting"
        await asyncio.sleep(self._delay)
        self.load_duration = self._delay
        self.state = "ready"

    async def spawn(self) -> None:
        self.state = "spare"

    async def stop(self, grace: float = 5.0) -> int:
        self.stop_requested = True
        self.returncode = 0
        self.state = "exited"
        return 0

    def kill(self) -> None:
        self.returncode = -9

    async def health(self, timeout: float = 1.0) -> bool:
        return True

    async def probe(self, timeout: float = 1.0) -> bool:
        return True

    def error_summary(self) -> str:
        return ""


def bench_scale(models: int = 200, requests: int = 5000, max_loaded: int = 4, *, load_delay: float = 0.002,
                serve_delay: float = 0.0, seed: int = 1) -> dict[str, Any]:
    """`requests` requests spread over `models` configured models, all queued at
    once, with at most `max_loaded` loaded: every one must complete.  Measures
    the scheduling passes (count, median/p99 seconds each) and the decisions
    (requests looked at by a pass), loads and evictions."""
    import random

    from hoshikage_sup.config import parse_config
    from hoshikage_sup.devices import SimulatedSource
    from hoshikage_sup.logs import setup_logging
    from hoshikage_sup.planner import MemoryPlanner
    from hoshikage_sup.scheduler import Scheduler

    setup_logging("warning", json=True, stream=open(os.devnull, "w"))
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="hoshikage-scale-") as tmp:
        gguf = write_tiny_gguf(Path(tmp) / "tiny.gguf")
        table = {
            "server": {"max_loaded_models": max_loaded, "max_queue": requests + 1, "keep_alive": "5m"},
            "models": {f"m{i}": {"path": str(gguf), "n_ctx": 256} for i in range(models)},
        }
        cfg = parse_config(table, base_dir=Path(tmp))
        planner = MemoryPlanner(cfg, SimulatedSource(system_total=64 * 2**30))

        async def run() -> dict[str, Any]:
            sched = Scheduler(cfg, planner, spawn=lambda spec, index: _StandInProcess(spec, index, load_delay))
            passes: list[float] = []
            original = sched._pass  # noqa: SLF001

            def timed_pass() -> None:
                t0 = time.perf_counter()
                original()
                passes.append(time.perf_counter() - t0)

            sched._pass = timed_pass  # type: ignore[method-assign]  # noqa: SLF001
            names = [f"m{i}" for i in range(models)]
            done = failed = 0

            async def one(name: str) -> None:
                nonlocal done, failed
                try:
                    lease = await sched.acquire(cfg.models[name])
                except Exception:  # noqa: BLE001 - counted
                    failed += 1
                    return
                if serve_delay:
                    await asyncio.sleep(serve_delay)
                else:
                    await asyncio.sleep(0)
                sched.release(lease)
                done += 1

            order = [names[i % models] for i in range(requests)]
            rng.shuffle(order)
            t0 = time.perf_counter()
            tasks = [asyncio.ensure_future(one(name)) for name in order]
            finished, stuck = await asyncio.wait(tasks, timeout=600)
            wall = time.perf_counter() - t0
            for t in stuck:
                t.cancel()
            problems = sched.invariants()
            decisions = getattr(sched, "stats", {}).get("decisions")  # requests the passes looked at
            result = {
                "models": models, "requests": requests, "max_loaded": max_loaded,
                "completed": done, "failed": failed, "stuck": len(stuck), "wall_s": round(wall, 3),
                "passes": len(passes), "pass_total_s": round(sum(passes), 3),
                "pass_median_us": round(statistics.median(passes) * 1e6, 1) if passes else None,
                "pass_p99_us": round(_pct(passes, 0.99) * 1e6, 1) if passes else None,
                "pass_max_us": round(max(passes) * 1e6, 1) if passes else None,
                "decisions": decisions,
                "us_per_decision": round(sum(passes) / decisions * 1e6, 2) if decisions else None,
                "loads": sched.counters["loads"], "evictions": sched.counters["evictions"],
                "invariant_problems": problems[:5],
            }
            await sched.close()
            return result

        return asyncio.run(run())


# ====================================================================== command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("proxy", help="requests/s through the supervisor to an instant runner")
    a.add_argument("--duration", type=float, default=10)
    a.add_argument("--clients", type=int, default=64)
    a.add_argument("--stream", action="store_true")
    a.add_argument("--runner", choices=("lean", "fake"), default="lean")
    a.add_argument("--no-debug", action="store_true", help="skip the asyncio debug-mode run")
    a.add_argument("--profile", metavar="FILE", help="cProfile the supervisor into FILE")
    b = sub.add_parser("latency", help="what the supervisor adds to one request")
    b.add_argument("--requests", type=int, default=500)
    b.add_argument("--stream", action="store_true")
    c = sub.add_parser("scale", help="many models, a deep queue, few loaded")
    c.add_argument("--models", type=int, default=200)
    c.add_argument("--requests", type=int, default=5000)
    c.add_argument("--max-loaded", type=int, default=4)
    for sp in (a, b, c):
        sp.add_argument("--repeat", type=int, default=1, help="run N times; print each run and the medians")
    args = p.parse_args(argv)

    def once() -> dict[str, Any]:
        if args.what == "proxy":
            return bench_proxy(args.duration, args.clients, args.stream, runner=args.runner, debug=not args.no_debug,
                               profile=args.profile)
        if args.what == "latency":
            return bench_added_latency(args.requests, stream=args.stream)
        return bench_scale(args.models, args.requests, args.max_loaded)

    runs = [once() for _ in range(max(1, args.repeat))]
    if len(runs) == 1:
        print(json.dumps(runs[0], indent=2))
    else:
        print(json.dumps({"runs": runs, "median": medians(runs)}, indent=2))
    return 0


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each numeric figure over several runs."""
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [r.get(key) for r in runs]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = statistics.median(values)
    return out


if __name__ == "__main__":
    sys.exit(main())
