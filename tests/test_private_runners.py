"""Nothing reaches a runner except through the supervisor.

Runners listen on a Unix socket in the supervisor's private runtime
directory and require the per-runner secret on every request but
``GET /health``.  Each runner test runs against the fake runner and (marked
`model`) the real one, spawned by a whole in-process supervisor.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import aiohttp
import psutil
import pytest
import structlog

from conftest import FakeSpawner
from hoshikage_sup.api.common import CONTEXT
from hoshikage_sup.config import parse_config
from hoshikage_sup.devices import SimulatedSource
from hoshikage_sup.process import RunnerGone, RunnerProcess, RunnerSpec
from hoshikage_sup.runtime import RuntimeDirError, create_runtime_dir, remove_runtime_dir
from hoshikage_sup.server import Server
from httputil import post_json

GUARDED = [
    ("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("GET", "/v1/models", None),
    ("POST", "/extras/tokenize", {"input": "Hello"}),
    ("GET", "/docs", None),
    ("GET", "/redoc", None),
    ("GET", "/openapi.json", None),
    ("GET", "/docs/oauth2-redirect", None),
]
DOCS = ["/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"]


def secret_of(runner: RunnerProcess) -> str:
    scheme, _, secret = runner.session.headers["Authorization"].partition(" ")
    assert scheme == "Bearer" and len(secret) >= 32
    return secret


async def direct(runner: RunnerProcess, method: str, path: str, body: Any = None,
                 authorization: str | None = None) -> tuple[int, Any]:
    """A request straight to the runner's socket, as another local process would send it."""
    headers = {"Authorization": authorization} if authorization is not None else {}
    assert runner.socket_path is not None
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=runner.socket_path)) as session:
        async with session.request(method, "http://runner" + path, json=body, headers=headers) as response:
            try:
                return response.status, await response.json(content_type=None)
            except ValueError:
                return response.status, await response.text()


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.model)])
async def served(request, make_server, fake_runner_command) -> AsyncIterator[tuple[Any, RunnerProcess]]:
    """A supervisor with model "m" loaded: (its handle, the runner process)."""
    command = fake_runner_command if request.param == "fake" else [sys.executable, "-m", "hoshikage_runner"]
    h = await make_server({"m": {"n_threads": 1}}, spawner=FakeSpawner(command))
    await asyncio.wait_for(h.gateway.load("m"), 120)
    [runner] = h.spawner.processes
    assert runner.state == "ready"
    yield h, runner


async def test_requests_without_the_secret_are_refused(served) -> None:
    _, runner = served
    for method, path, body in GUARDED:
        for authorization in (None, "Bearer wrong-secret", secret_of(runner), f"Basic {secret_of(runner)}"):
            status, answer = await direct(runner, method, path, body, authorization)
            assert status == 401, (method, path, authorization, answer)
            error = answer["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
    status, answer = await direct(runner, "GET", "/health")
    assert status == 200 and answer["status"] == "ok" and answer["pid"] == runner.pid


async def test_the_secret_opens_the_api_but_not_the_docs(served) -> None:
    h, runner = served
    secret = f"Bearer {secret_of(runner)}"
    status, answer = await direct(runner, "POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 2}, secret)
    assert status == 200, answer
    assert answer["choices"][0]["text"] is not None
    status, answer = await direct(runner, "GET", "/v1/models", None, secret)
    assert status == 200 and answer["data"][0]["id"] == "m"
    for path in DOCS:
        status, _ = await direct(runner, "GET", path, None, secret)
        assert status == 404, path
    # The supervisor itself goes through: the gateway uses the runner's session.
    async with aiohttp.ClientSession() as http:
        status, answer, _ = await post_json(http, h.url + "/v1/completions",
                                            {"model": "m", "prompt": "Hello", "max_tokens": 2})
    assert status == 200, answer


async def test_socket_and_directory_are_private(served) -> None:
    h, runner = served
    assert runner.socket_path is not None
    path = Path(runner.socket_path)
    assert path.parent == h.server.runtime_dir
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    st = os.lstat(path.parent)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == os.geteuid()
    assert len(os.fsencode(runner.socket_path)) <= 107


async def test_secret_is_not_in_argv_or_environment(served) -> None:
    _, runner = served
    secret = secret_of(runner).encode()
    assert runner.pid is not None
    for name in ("cmdline", "environ"):
        data = Path(f"/proc/{runner.pid}/{name}").read_bytes()
        assert data and secret not in data, name


async def test_runner_has_no_tcp_listener(served) -> None:
    _, runner = served
    process = psutil.Process(runner.pid)
    listening = [c for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening == []
    unix = [c.laddr for c in process.net_connections(kind="unix")]
    assert runner.socket_path in unix


# ------------------------------------------------------------------ lifecycle


def is_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def refuses(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    finally:
        probe.close()
    return False


def fake_spec() -> RunnerSpec:
    return RunnerSpec(model_name="fake", model_path="/models/fake.gguf", n_ctx=256, n_threads=1)


def fake_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_")}
    env.update(settings)
    return env


async def test_runtime_dir_is_removed_after_shutdown(tmp_path, demo_model, fake_runner_command) -> None:
    cfg = parse_config({"server": {"host": "127.0.0.1", "port": 0},
                        "models": {"m": {"path": str(demo_model), "n_ctx": 256}}}, base_dir=tmp_path)
    spawner = FakeSpawner(fake_runner_command)
    server = Server(cfg, devices=SimulatedSource(system_total=64 * 2**30), spawn=spawner)
    spawner.server = server
    await server.startup()
    try:
        runtime_dir = server.runtime_dir
        assert runtime_dir is not None and runtime_dir.is_dir()
        assert runtime_dir.name.startswith(f"hoshikage-{os.getpid()}-")
        assert server.runner is not None
        await asyncio.wait_for(server.runner.app[CONTEXT].gateway.load("m"), 60)
        [runner] = spawner.processes
        assert runner.socket_path is not None and os.path.exists(runner.socket_path)
    finally:
        await server.shutdown()
    assert not runtime_dir.exists()
    assert runner.returncode is not None and runner.session.closed


async def test_a_dead_runner_refuses_connections(fake_runner_command) -> None:
    """The gateway retries a request only when the runner never had it: every way
    of reaching a dead runner must be a ClientConnectorError."""
    runner = RunnerProcess(fake_spec(), command=fake_runner_command, env=fake_env())
    await runner.start(load_timeout=30)
    assert runner.socket_path is not None and runner.pid is not None
    path = runner.socket_path
    os.kill(runner.pid, signal.SIGKILL)
    # Blocking the loop, so the exit is not handled yet: the socket file is still
    # there, and once the kernel has closed the dead runner's descriptors (its
    # other threads can outlive the main one by a moment) it refuses.
    deadline = time.monotonic() + 10
    while not refuses(path):
        assert time.monotonic() < deadline, "a SIGKILLed runner's socket still accepts connections"
        time.sleep(0.01)
    assert is_gone(runner.pid) and os.path.exists(path)
    await asyncio.wait_for(runner.wait(), 10)
    # Reaped: the socket file is gone, and a connection attempt fails to connect.
    assert not os.path.exists(path)
    with pytest.raises(aiohttp.ClientConnectorError) as caught:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path)) as session:
            await session.get("http://runner/health")
    assert isinstance(caught.value.os_error, FileNotFoundError)
    # The runner's own session is closed: a request through it is refused the same way.
    assert runner.session.closed
    with pytest.raises(aiohttp.ClientConnectorError) as refused:
        await runner.post("/v1/completions", json={"prompt": "x"})
    assert isinstance(refused.value, RunnerGone) and "runner has exited" in str(refused.value)
    assert not await runner.health()


async def test_the_settings_line_is_never_logged(fake_runner_command) -> None:
    with structlog.testing.capture_logs() as logs:
        runner = RunnerProcess(fake_spec(), command=fake_runner_command, env=fake_env())
        await runner.start(load_timeout=30)
        await runner.stop()
    secret = secret_of(runner)
    assert logs and secret not in repr(logs)
    assert secret not in runner.output_tail()


async def test_a_runner_refuses_a_settings_line_without_a_secret(fake_runner_command) -> None:
    """The child side: a runner that was given no secret does not serve at all."""
    proc = await asyncio.create_subprocess_exec(
        *fake_runner_command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env=fake_env(),
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b'{"model": "/m.gguf", "fd": 0}\n')  # stdin stays open: EOF would end it with 0
    out = await asyncio.wait_for(proc.stdout.read(), 30)
    assert await asyncio.wait_for(proc.wait(), 30) == 1
    proc.stdin.close()
    assert b"error: settings: 'secret' must be" in out


# ------------------------------------------------------------------ runtime directory


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: pytest's own are too long for Unix sockets."""
    path = Path(tempfile.mkdtemp(prefix="hk-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_runtime_dirs_are_fresh_private_and_unique(short_tmp) -> None:
    base = short_tmp / "run"
    first, second = create_runtime_dir(base), create_runtime_dir(base)
    try:
        assert first != second and first.parent == base == second.parent
        for d in (first, second):
            assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700 and os.lstat(d).st_uid == os.geteuid()
            assert d.name.startswith(f"hoshikage-{os.getpid()}-")
        assert stat.S_IMODE(os.lstat(base).st_mode) == 0o700  # created for us
    finally:
        remove_runtime_dir(first)
        remove_runtime_dir(second)
    assert not first.exists() and not second.exists()


def test_runtime_dir_defaults_to_xdg_runtime_dir(short_tmp, monkeypatch) -> None:
    xdg = short_tmp / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    d = create_runtime_dir(None)
    try:
        assert d.parent == xdg
    finally:
        remove_runtime_dir(d)
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    d = create_runtime_dir(None)
    try:
        assert d.parent == Path(tempfile.gettempdir())
    finally:
        remove_runtime_dir(d)


def test_an_unsafe_runtime_dir_is_refused(short_tmp, monkeypatch) -> None:
    shared = short_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(RuntimeDirError, match="writable by group or others without the sticky bit"):
        create_runtime_dir(shared)
    shared.chmod(0o1777)  # like /tmp: others may not replace what is ours
    remove_runtime_dir(create_runtime_dir(shared))

    theirs = short_tmp / "theirs"
    theirs.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(theirs, 65534, 65534)
    else:
        monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)
    with pytest.raises(RuntimeDirError, match="not by us"):
        create_runtime_dir(theirs)
    monkeypatch.undo()

    link = short_tmp / "link"
    link.symlink_to(short_tmp)
    with pytest.raises(RuntimeDirError, match="symbolic link"):
        create_runtime_dir(link)


def test_a_runtime_dir_too_long_for_a_socket_is_refused(tmp_path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with pytest.raises(RuntimeDirError, match="too long for Unix sockets.* more than the 107 allowed"):
        create_runtime_dir(deep)
    assert not deep.parent.exists()  # refused before anything was created


def test_remove_runtime_dir_takes_leftover_sockets(short_tmp) -> None:
    d = create_runtime_dir(short_tmp)
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(d / "r1.sock"))
    leftover.close()
    remove_runtime_dir(d)
    assert not d.exists()


def test_a_dead_supervisors_directory_is_swept(short_tmp) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = short_tmp / f"hoshikage-{dead.pid}-abcd1234"
    stale.mkdir(mode=0o700)
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(stale / "r1.sock"))
    leftover.close()
    (stale / "thread-budget").write_bytes(b"\0" * 4096)  # a killed supervisor's thread budget
    alive = short_tmp / f"hoshikage-{os.getppid()}-abcd1234"  # a supervisor that still runs
    alive.mkdir(mode=0o700)
    mine = create_runtime_dir(short_tmp)
    try:
        assert not stale.exists() and alive.exists() and mine.exists()
    finally:
        remove_runtime_dir(mine)
