"""systemd notifications, read from a real Unix datagram socket.

$NOTIFY_SOCKET points at a socket the test binds (in a short /tmp path: a
Unix socket path must fit in 108 bytes) and every datagram the supervisor
sends is recorded with its arrival time, so the tests check what systemd
would see: READY=1 once listening, STATUS= as models load, WATCHDOG=1 at
half of $WATCHDOG_USEC, RELOADING=1 with MONOTONIC_USEC= then READY=1 around
a reload, STOPPING=1 when shutdown starts.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import time
from typing import Callable

import aiohttp
import pytest

from hoshikage_sup import sdnotify
from hoshikage_sup.server import Server
from httputil import post_json

DEADLINE = 30.0
WATCHDOG_USEC = 400_000  # pings every 0.2 s


class NotifyListener:
    """The systemd side of the protocol: a bound datagram socket and what arrived on it."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="hk-", dir="/tmp")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages: list[tuple[float, str]] = []  # (monotonic arrival time, datagram)
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 65536)
            self.messages.append((time.monotonic(), data.decode()))

    def texts(self) -> list[str]:
        return [m for _, m in self.messages]

    def statuses(self) -> list[str]:
        return [m[len("STATUS="):] for m in self.texts() if m.startswith("STATUS=")]

    def pings(self) -> list[float]:
        return [t for t, m in self.messages if m == "WATCHDOG=1"]

    async def wait_for(self, predicate: Callable[[list[str]], bool], what: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.texts()):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s; got {self.texts()}")
            await asyncio.sleep(0.02)

    def close(self) -> None:
        self._task.cancel()
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
async def listener(monkeypatch):
    lst = NotifyListener()
    monkeypatch.setenv("NOTIFY_SOCKET", lst.path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield lst
    lst.close()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as s:
        yield s


def chat(model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


def write_config(path, demo_model) -> None:
    """The same config make_server builds for {"gemma": {}}, as a file a reload can read."""
    path.write_text(
        '[server]\nhost = "127.0.0.1"\nport = 0\n\n'
        f'[models.gemma]\npath = "{demo_model}"\nn_ctx = 256\n'
    )


async def test_ready_status_watchdog_reload_and_stopping(listener, make_server, http, monkeypatch, tmp_path, demo_model):
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.setattr(Server, "status_interval", 0.05)
    h = await make_server({"gemma": {}})
    await listener.wait_for(lambda t: "READY=1" in t, "READY=1")
    await listener.wait_for(lambda t: "STATUS=no model loaded; 0 queued" in t, "STATUS before any load")

    status, body, _ = await post_json(http, h.url + "/v1/chat/completions", chat("gemma"))
    assert status == 200, body
    await listener.wait_for(
        lambda t: "STATUS=serving 1 model: gemma (idle); 0 queued" in t, "STATUS after the load")
    statuses = listener.statuses()
    assert all(a != b for a, b in zip(statuses, statuses[1:])), f"a STATUS line was sent again unchanged: {statuses}"

    # The watchdog: pinged at half of WATCHDOG_USEC, again and again.
    await asyncio.sleep(1.0)
    pings = listener.pings()
    assert len(pings) >= 5, pings
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    interval = WATCHDOG_USEC / 1e6 / 2
    assert all(interval * 0.5 < g < interval * 2 for g in gaps[1:]), gaps
    assert interval * 0.8 < sorted(gaps)[len(gaps) // 2] < interval * 1.5, gaps

    # A reload: RELOADING=1 and MONOTONIC_USEC= in one datagram, then READY=1.
    config = tmp_path / "hoshikage.toml"
    write_config(config, demo_model)
    h.server.path = config
    before = len(listener.messages)
    result = h.server.reload()
    assert result["ok"], result
    assert result["models"]["unchanged"] == ["gemma"]
    await listener.wait_for(lambda t: "READY=1" in t[before:], "READY=1 after the reload")
    after = listener.texts()[before:]
    reloading = [m for m in after if m.startswith("RELOADING=1")]
    assert len(reloading) == 1, after
    fields = dict(line.split("=", 1) for line in reloading[0].split("\n"))
    assert abs(int(fields["MONOTONIC_USEC"]) - sdnotify.monotonic_usec()) < 5_000_000
    assert after.index(reloading[0]) < after.index("READY=1")

    # Shutdown: STOPPING=1 first, and no ping once it is over.
    before = len(listener.messages)
    await h.server.shutdown()
    stopping = [m for m in listener.texts()[before:] if m != "WATCHDOG=1"]
    assert stopping[0] == "STOPPING=1", stopping
    assert "STATUS=shutting down: 0 requests in flight" in stopping
    await asyncio.sleep(0.05)  # let the last datagrams arrive
    count = len(listener.pings())
    await asyncio.sleep(0.5)
    assert len(listener.pings()) == count, "the watchdog went on pinging after shutdown"
    assert "READY=1" not in listener.texts()[before:]


async def test_a_rejected_reload_still_says_ready(listener, make_server, tmp_path):
    h = await make_server({"gemma": {}})
    await listener.wait_for(lambda t: "READY=1" in t and any(m.startswith("STATUS=") for m in t), "start-up")
    config = tmp_path / "broken.toml"
    config.write_text("[server\n")
    h.server.path = config
    before = len(listener.messages)
    result = h.server.reload()
    assert not result["ok"] and "TOML syntax error" in result["problems"][0]
    await listener.wait_for(lambda t: "READY=1" in t[before:], "READY=1 after a rejected reload")
    assert listener.texts()[before].startswith("RELOADING=1\nMONOTONIC_USEC=")


async def test_watchdog_meant_for_another_process_is_not_pinged(listener, make_server, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.setenv("WATCHDOG_PID", "1")
    await make_server({"gemma": {}})
    await listener.wait_for(lambda t: "READY=1" in t, "READY=1")
    await asyncio.sleep(0.5)
    assert listener.pings() == []


async def test_watchdog_for_this_process(listener, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == pytest.approx(0.05)
    for value in ("", "0", "-5", "soon"):
        assert sdnotify.watchdog_interval({"WATCHDOG_USEC": value}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "100000", "WATCHDOG_PID": "x"}) is None


async def test_status_is_one_line(listener):
    assert sdnotify.status("two\nlines  and\tspaces")
    await listener.wait_for(lambda t: t, "a datagram")
    assert listener.texts() == ["STATUS=two lines and spaces"]


async def test_abstract_socket(monkeypatch):
    name = f"hoshikage-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1")
        assert s.recv(100) == b"READY=1"


def test_without_systemd_nothing_is_sent(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.enabled()
    assert not sdnotify.notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert not sdnotify.notify("READY=1")  # dropped, never raised
