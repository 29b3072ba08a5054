"""Graceful shutdown (SIGTERM/SIGINT) and reload (SIGHUP).

Shutdown: a stream in flight finishes with every token and `[DONE]`, a
request arriving during the drain gets a 503 JSON "shutting down", nobody
can connect any more, and no runner is left behind; a generation longer than
`shutdown_timeout` (or cut short by a second signal) ends with the API's
error event.  In-process tests run a Server with fake runners; the `model`
tests run `hoshikage serve` as a real process with the demo model and real
signals, and check its exit status.

Reload: `Server.reload()` re-reads the file with the same environment and
flags; what can change live does, what cannot is reported, an invalid file
changes nothing.  SIGHUP does the same in a real process, whose runner for
an unchanged model keeps its pid.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from conftest import FakeSpawner
from hoshikage_sup.config import load_config
from hoshikage_sup.devices import SimulatedSource
from hoshikage_sup.server import Server
from httputil import post_json

DEADLINE = 60.0


def timeout() -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=DEADLINE)


def chat(model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


def long_stream(model: str, tokens: int, delay: float) -> dict:
    """A fake runner's streamed completion of `tokens` tokens, `delay` s apart: "w0 w1 ..."."""
    return {"model": model, "prompt": "x", "stream": True,
            "fake": {"text": [f"w{i} " for i in range(tokens)], "delay": delay}}


async def first_event(resp: aiohttp.ClientResponse) -> dict:
    assert resp.status == 200, await resp.text()
    while True:
        line = (await resp.content.readline()).decode()
        assert line, "the stream ended before its first event"
        if line.startswith("data: "):
            return json.loads(line[len("data: "):])


def events_of(raw: str) -> list[Any]:
    """The `data:` payloads of an SSE body: parsed JSON, or the string "[DONE]"."""
    out: list[Any] = []
    for line in raw.splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def text_of(events: list[Any]) -> str:
    return "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict) and e.get("choices"))


def runners_gone(processes) -> None:
    for p in processes:
        assert p.returncode is not None, f"runner {p.pid} still running"
        assert not psutil.pid_exists(p.pid) or psutil.Process(p.pid).status() == psutil.STATUS_ZOMBIE


async def wait_until(predicate, what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {limit} s"
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------ shutdown, in process


async def test_a_stream_in_flight_finishes_and_new_requests_get_503(make_server):
    h = await make_server({"m": {}}, server={"shutdown_timeout": "20s"})
    async with aiohttp.ClientSession(timeout=timeout()) as streamer, \
            aiohttp.ClientSession(timeout=timeout()) as openai_client, \
            aiohttp.ClientSession(timeout=timeout()) as ollama_client:
        for client in (openai_client, ollama_client):  # each holds a kept-alive connection
            async with client.get(h.url + "/health") as r:
                assert r.status == 200
        resp = await streamer.post(h.url + "/v1/completions", json=long_stream("m", 12, 0.1))
        first = await first_event(resp)
        processes = list(h.spawner.processes)

        stopping = asyncio.create_task(h.server.shutdown())
        await wait_until(lambda: h.server.draining, "the drain")
        assert h.server.status_text() == "shutting down: 1 request in flight"

        # Requests on open connections: 503 in the API's shape, and the connection closes.
        status, body, headers = await post_json(openai_client, h.url + "/v1/chat/completions", chat("m"))
        assert status == 503, body
        assert body["error"]["code"] == "shutting_down" and "shutting down" in body["error"]["message"]
        assert headers.get("Connection", "").lower() == "close"
        status, body, _ = await post_json(ollama_client, h.url + "/api/generate", {"model": "m", "prompt": "hi"})
        assert status == 503 and body == {"error": "the server is shutting down"}
        # New connections: nobody listens any more.
        async with aiohttp.ClientSession(timeout=timeout()) as fresh:
            with pytest.raises(aiohttp.ClientConnectorError):
                await fresh.get(h.url + "/health")
        assert not stopping.done(), "shutdown did not wait for the stream"

        events = [first] + events_of((await resp.read()).decode())
        assert not [e for e in events if isinstance(e, dict) and "error" in e]
        assert events[-1] == "[DONE]"
        assert text_of(events) == "".join(f"w{i} " for i in range(12))
        await asyncio.wait_for(stopping, 10)
    runners_gone(processes)
    assert not h.server.runtime_dir.exists()


async def test_a_generation_longer_than_shutdown_timeout_ends_with_an_error_event(make_server):
    h = await make_server({"m": {}}, server={"shutdown_timeout": "0.5s"})
    async with aiohttp.ClientSession(timeout=timeout()) as streamer:
        resp = await streamer.post(h.url + "/v1/completions", json=long_stream("m", 100, 0.05))
        await first_event(resp)
        processes = list(h.spawner.processes)
        started = time.monotonic()
        await asyncio.wait_for(h.server.shutdown(), 15)
        elapsed = time.monotonic() - started
        # shutdown_timeout, then the runner's own stop (the fake runner gives its requests 1 s)
        assert 0.5 <= elapsed < 4.0, elapsed
        events = events_of((await resp.read()).decode())
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and errors[0]["error"]["type"] == "server_error", events[-3:]
    assert events[-1] == "[DONE]" and events[-2] is errors[0]
    assert len(text_of(events)) < len("".join(f"w{i} " for i in range(100)))
    runners_gone(processes)


async def test_a_second_signal_stops_waiting(make_server):
    """Real signals, to this process: the first starts the drain, the second ends it."""
    h = await make_server({"m": {}}, server={"shutdown_timeout": "30s"})
    main_loop = asyncio.create_task(h.server.main_loop())
    await asyncio.sleep(0)  # main_loop has installed its signal handlers
    async with aiohttp.ClientSession(timeout=timeout()) as streamer:
        resp = await streamer.post(h.url + "/v1/completions", json=long_stream("m", 200, 0.05))
        await first_event(resp)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(main_loop, 5)
        stopping = asyncio.create_task(h.server.shutdown())
        await wait_until(lambda: h.server.draining, "the drain")
        await asyncio.sleep(0.3)
        assert not stopping.done()
        started = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stopping, 10)
        assert time.monotonic() - started < 4.0
        events = events_of((await resp.read()).decode())
    assert events[-1] == "[DONE]" and "error" in events[-2]


async def test_a_followed_event_log_does_not_hold_the_drain(make_server):
    h = await make_server({"m": {}}, server={"shutdown_timeout": "20s"})
    async with aiohttp.ClientSession(timeout=timeout()) as follower:
        resp = await follower.get(h.url + "/admin/events?follow=1")
        if resp.status == 404:
            pytest.skip("this build has no /admin/events")
        assert resp.status == 200
        started = time.monotonic()
        await asyncio.wait_for(h.server.shutdown(), 10)
        assert time.monotonic() - started < 3.0
        await asyncio.wait_for(resp.read(), 5)  # the stream has ended


# ------------------------------------------------------------------ reload, in process


@pytest.fixture
async def file_server(tmp_path, fake_runner_command):
    """Factory: `await file_server(toml_text, host=, port=, env=)` -> a started Server
    read from a file (as the CLI reads it), with fake runners."""
    started: list[Server] = []

    async def make(text: str, *, host: str | None = None, port: int | None = None,
                   env: dict[str, str] | None = None) -> Server:
        path = tmp_path / "hoshikage.toml"
        path.write_text(text)
        env = env or {}
        cfg = load_config(path, env, host=host, port=port)
        spawner = FakeSpawner(fake_runner_command)
        srv = Server(cfg, devices=SimulatedSource(system_total=64 * 2**30), spawn=spawner,
                     path=path, host=host, port=port, env=env)
        spawner.server = srv
        await srv.startup()
        started.append(srv)
        return srv

    yield make
    for srv in reversed(started):
        await srv.shutdown()


def toml(server: dict[str, Any], models: dict[str, dict[str, Any]]) -> str:
    lines = ["[server]"] + [f"{k} = {json.dumps(v)}" for k, v in server.items()]
    for name, table in models.items():
        lines += ["", f"[models.{name}]"] + [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


async def test_reload_applies_what_can_change_and_reports_the_rest(file_server, tmp_path, demo_model):
    keys = tmp_path / "keys"
    keys.write_text("first-key\n")
    model = {"path": str(demo_model), "n_ctx": 256}
    base = {"host": "127.0.0.1", "port": 0, "api_keys_file": str(keys), "max_connections": 100}
    srv = await file_server(toml(base, {"m": model}))
    url = f"http://127.0.0.1:{srv.port}"
    first = {"Authorization": "Bearer first-key"}
    second = {"Authorization": "Bearer second-key"}
    async with aiohttp.ClientSession(timeout=timeout()) as http:
        async with http.post(url + "/v1/chat/completions", json=chat("m"), headers=first) as r:
            assert r.status == 200
        pid = srv.scheduler.slots["m"].replicas[0].process.pid

        keys.write_text("second-key\n")
        changed = {**base, "host": "0.0.0.0", "port": 1234, "idle_timeout": "5s", "header_timeout": "3s",
                   "max_connections": 50, "keep_alive": "1h", "shutdown_timeout": "2s", "max_body_size": "4KiB"}
        (tmp_path / "hoshikage.toml").write_text(toml(changed, {"m": model, "n": model}))
        result = srv.reload()
        assert result["ok"] and result["problems"] == []
        assert result["models"]["added"] == ["n"] and result["models"]["unchanged"] == ["m"]
        assert result["restart_needed"] == [
            "server.host: 127.0.0.1 -> 0.0.0.0", "server.port: 0 -> 1234", "server.idle_timeout: 30.0 -> 5.0",
        ]
        # what runs is what the config says: the settings that need a restart keep their running values
        assert (srv.config.server.host, srv.config.server.port, srv.config.server.idle_timeout) == ("127.0.0.1", 0, 30.0)
        assert srv.config.server.shutdown_timeout == 2.0
        limits = srv.runner.server.limits
        assert (limits.header_timeout, limits.max_connections, limits.idle_timeout) == (3.0, 50, 30.0)

        async with http.post(url + "/v1/chat/completions", json=chat("m"), headers=first) as r:
            assert r.status == 401  # the keys file was read again
        async with http.post(url + "/v1/chat/completions", json=chat("n"), headers=second) as r:
            assert r.status == 200, await r.text()  # a new model, served
        async with http.post(url + "/v1/chat/completions", json={**chat("m"), "pad": "x" * 5000}, headers=second) as r:
            assert r.status == 413  # the API layers read the new config
        async with http.get(url + "/api/ps", headers=second) as r:
            ps = {m["name"]: m for m in (await r.json())["models"]}
        assert ps["m"]["pids"] == [pid] and ps["m"]["keep_alive"] == "1h"


async def test_reload_reads_the_file_with_the_same_flags_and_environment(file_server, tmp_path, demo_model):
    model = {"path": str(demo_model), "n_ctx": 256}
    # The file says port 1 and keep_alive 5m; the flag (port 0) and the environment win, at start and on reload.
    text = toml({"host": "127.0.0.1", "port": 1, "keep_alive": "5m"}, {"m": model})
    srv = await file_server(text, port=0, env={"HOSHIKAGE_KEEP_ALIVE": "2h"})
    assert srv.config.server.keep_alive == 7200
    (tmp_path / "hoshikage.toml").write_text(text.replace('"5m"', '"10m"'))
    result = srv.reload()
    assert result["ok"] and result["restart_needed"] == [], result
    assert srv.config.server.port == 0 and srv.config.server.keep_alive == 7200


async def test_an_invalid_config_changes_nothing(file_server, tmp_path, demo_model):
    model = {"path": str(demo_model), "n_ctx": 256}
    srv = await file_server(toml({"host": "127.0.0.1", "port": 0}, {"m": model}))
    running = srv.config
    (tmp_path / "hoshikage.toml").write_text(
        toml({"host": "127.0.0.1", "port": 0, "shutdown_timeout": "0s"},
             {"m": {**model, "n_ctx": "big"}, "n": {"path": str(tmp_path / "missing.gguf")}}))
    result = srv.reload()
    assert not result["ok"] and result["models"] == {}
    problems = "\n".join(result["problems"])
    for key in ("server.shutdown_timeout", "models.m.n_ctx", "models.n.path"):
        assert key in problems
    assert srv.config is running and srv.context.gateway.config is running
    async with aiohttp.ClientSession(timeout=timeout()) as http:
        status, body, _ = await post_json(http, f"http://127.0.0.1:{srv.port}/v1/chat/completions", chat("m"))
        assert status == 200, body


async def test_reload_without_a_file_is_rejected(make_server):
    h = await make_server({"m": {}})  # built from a table, not a file
    result = h.server.reload()
    assert not result["ok"] and "not read from a file" in result["problems"][0]


# ------------------------------------------------------------------ a real daemon, real signals


SMALL = {"n_ctx": 512, "n_threads": 1}  # one thread per runner on a small shared machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """`python -m hoshikage_sup serve --config FILE` with its JSON log in a file,
    and a datagram socket as its $NOTIFY_SOCKET.  The port is in the file, so
    a reload reads the same port."""

    def __init__(self, tmp: Path, models: dict[str, dict[str, Any]], server: dict[str, Any] | None = None):
        self.config = tmp / "hoshikage.toml"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = {"host": "127.0.0.1", "port": self.port, **(server or {})}
        self.write(models)
        self.notify_dir = tempfile.mkdtemp(prefix="hk-", dir="/tmp")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(os.path.join(self.notify_dir, "notify"))
        self.notify.setblocking(False)
        self.notes: list[str] = []
        self.log_path = tmp / "serve.log"
        self.log = open(self.log_path, "wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HOSHIKAGE_", "FAKE_", "WATCHDOG_"))}
        env.update(PYTHONUNBUFFERED="1", NOTIFY_SOCKET=os.path.join(self.notify_dir, "notify"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hoshikage_sup", "serve", "--config", str(self.config)],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )

    def write(self, models: dict[str, dict[str, Any]], server: dict[str, Any] | None = None) -> None:
        self.config.write_text(toml({**self.server, **(server or {})}, models))

    def notifications(self) -> list[str]:
        while True:
            try:
                self.notes.append(self.notify.recv(65536).decode())
            except BlockingIOError:
                return self.notes

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.output().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if isinstance(e, dict) and e.get("event") == name:
                out.append(e)
        return out

    async def wait_event(self, name: str, count: int = 1, limit: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + limit
        while len(self.events(name)) < count:
            assert self.proc.poll() is None, f"hoshikage serve exited with {self.proc.returncode}:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {name!r} log line within {limit} s:\n{self.output()}"
            await asyncio.sleep(0.05)
        return self.events(name)[count - 1]

    async def wait_healthy(self, http: aiohttp.ClientSession, limit: float = 30.0) -> None:
        deadline = time.monotonic() + limit
        while True:
            assert self.proc.poll() is None, f"hoshikage serve exited with {self.proc.returncode}:\n{self.output()}"
            try:
                async with http.get(self.url + "/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, f"no /health within {limit} s:\n{self.output()}"
            await asyncio.sleep(0.1)

    def wait(self, limit: float = 30.0) -> int:
        try:
            return self.proc.wait(limit)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"hoshikage serve still running {limit} s after SIGTERM:\n{self.output()}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()
        self.notify.close()
        shutil.rmtree(self.notify_dir, ignore_errors=True)


@pytest.fixture
def daemons():
    started: list[Daemon] = []

    def make(*args, **kwargs) -> Daemon:
        d = Daemon(*args, **kwargs)
        started.append(d)
        return d

    yield make
    for d in started:
        d.close()


async def ps(http: aiohttp.ClientSession, url: str) -> dict[str, dict[str, Any]]:
    async with http.get(url + "/api/ps") as r:
        assert r.status == 200
        return {m["name"]: m for m in (await r.json())["models"]}


@pytest.mark.model
async def test_sigterm_lets_a_stream_finish_then_exits_0(daemons, tmp_path, demo_model):
    d = daemons(tmp_path, {"gemma": {"path": str(demo_model), **SMALL}}, server={"shutdown_timeout": "30s"})
    body = {"model": "gemma", "prompt": "1, 2, 3, 4, 5,", "max_tokens": 40, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession(timeout=timeout()) as streamer, aiohttp.ClientSession(timeout=timeout()) as other:
        await d.wait_healthy(other)  # and `other` keeps its connection open
        resp = await streamer.post(d.url + "/v1/completions", json=body)
        first = await first_event(resp)
        (runner,) = (await ps(other, d.url))["gemma"]["pids"]
        d.proc.send_signal(signal.SIGTERM)
        while True:  # once the drain has begun, the open connection gets a 503
            async with other.get(d.url + "/health") as r:
                if r.status == 503:
                    answer = await r.json()
                    break
                assert r.status == 200
            await asyncio.sleep(0.02)
        assert answer["error"]["code"] == "shutting_down"
        async with aiohttp.ClientSession(timeout=timeout()) as fresh:
            with pytest.raises(aiohttp.ClientConnectorError):
                await fresh.get(d.url + "/health")
        events = [first] + events_of((await resp.read()).decode())
    assert not [e for e in events if isinstance(e, dict) and "error" in e], events[-3:]
    assert events[-1] == "[DONE]"
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]][-1] == "length"
    assert d.wait() == 0
    assert not psutil.pid_exists(runner)
    assert d.events("stopped")[-1]["drained"] is True
    notes = d.notifications()
    assert notes[0] == "READY=1" and "STOPPING=1" in notes
    assert "READY=1" not in notes[notes.index("STOPPING=1"):]


@pytest.mark.model
async def test_sighup_reloads_and_keeps_unchanged_runners(daemons, tmp_path, demo_model):
    gemma = {"path": str(demo_model), **SMALL}
    d = daemons(tmp_path, {"gemma": gemma}, server={"keep_alive": "5m"})
    small = {"prompt": "Hi", "max_tokens": 1}
    async with aiohttp.ClientSession(timeout=timeout()) as http:
        await d.wait_healthy(http)
        status, body, _ = await post_json(http, d.url + "/v1/completions", {"model": "gemma", **small})
        assert status == 200, body
        before = (await ps(http, d.url))["gemma"]
        assert before["keep_alive"] == "5m"

        # A new model and a new keep_alive default.
        d.write({"gemma": gemma, "gemma-b": gemma}, server={"keep_alive": "10m"})
        d.proc.send_signal(signal.SIGHUP)
        reloaded = await d.wait_event("reloaded")
        assert reloaded["added"] == ["gemma-b"] and reloaded["restart_needed"] == []
        after = (await ps(http, d.url))["gemma"]
        assert after["pids"] == before["pids"] and after["keep_alive"] == "10m"
        status, body, _ = await post_json(http, d.url + "/v1/completions", {"model": "gemma-b", **small})
        assert status == 200, body

        # An invalid file: rejected, logged, the running config goes on serving.
        d.config.write_text(d.config.read_text().replace('n_ctx = 512', 'n_ctx = "big"'))
        d.proc.send_signal(signal.SIGHUP)
        await d.wait_event("reload rejected: the running config stays")
        problems = [e["problem"] for e in d.events("reload: config error")]
        assert problems and all("n_ctx" in p for p in problems), problems
        for name in ("gemma", "gemma-b"):
            status, body, _ = await post_json(http, d.url + "/v1/completions", {"model": name, **small})
            assert status == 200, body
        assert (await ps(http, d.url))["gemma"]["pids"] == before["pids"]

    notes = d.notifications()
    reloads = [i for i, n in enumerate(notes) if n.startswith("RELOADING=1\nMONOTONIC_USEC=")]
    assert len(reloads) == 2, notes
    for i in reloads:
        assert "READY=1" in notes[i + 1:], notes
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait() == 0


async def test_reload_through_the_admin_api_under_steady_load(file_server, tmp_path, demo_model):
    """The admin endpoint and `hoshikage reload` do what SIGHUP does: under a
    steady stream of requests, the unchanged model keeps its runner, the
    changed one restarts without a failed request, and a broken file is a 400
    that changes nothing."""
    from hoshikage_sup.cli import main

    model = {"path": str(demo_model), "n_ctx": 256}
    base = {"host": "127.0.0.1", "port": 0}
    srv = await file_server(toml(base, {"same": model, "changed": model}))
    url = f"http://127.0.0.1:{srv.port}"
    sched = srv.scheduler
    results: list[int] = []
    stop = asyncio.Event()
    async with aiohttp.ClientSession(timeout=timeout()) as http:
        async def client(name: str) -> None:
            while not stop.is_set():
                async with http.post(url + "/v1/chat/completions", json=chat(name)) as r:
                    await r.read()
                    results.append(r.status)

        clients = [asyncio.ensure_future(client(n)) for n in ("same", "changed", "changed")]
        await sched.wait_until(lambda: "same" in sched.slots and "changed" in sched.slots and sched.slots["changed"].ready, 30)
        pids = {n: sched.slots[n].replicas[0].process.pid for n in ("same", "changed")}
        (tmp_path / "hoshikage.toml").write_text(toml(base, {"same": model, "changed": {**model, "n_ctx": 512}}))
        code = await asyncio.to_thread(main, ["reload", "--url", url])
        assert code == 0
        await sched.wait_until(lambda: all(r.process.pid != pids["changed"] for r in sched.slots["changed"].replicas), 30)
        (tmp_path / "hoshikage.toml").write_text("[server\n")
        async with http.post(url + "/admin/reload") as r:
            assert r.status == 400
            assert "TOML syntax error" in (await r.json())["error"]["message"]
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*clients)
    assert results and set(results) == {200}, sorted(set(results))
    assert sched.slots["same"].replicas[0].process.pid == pids["same"]
    assert sched.slots["changed"].replicas[0].plan.n_ctx == 512
