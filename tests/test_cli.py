"""The `hoshikage` command line against a live daemon (`make_server`) and against none.

Most commands run `main([...])` in a thread while the daemon serves in the
test's event loop; following (`-f`) and the missing daemon also run as a real
process (`python -m hoshikage_sup`), to see Ctrl-C end a follow with status 0
and that no traceback ever reaches the terminal.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import sys
from pathlib import Path

import pytest
import structlog

from hoshikage_sup import __version__
from hoshikage_sup.cli import DEFAULT_URL, daemon_url, main

DEADLINE = 20.0
SRC = Path(__file__).resolve().parent.parent / "src"


@pytest.fixture(autouse=True)
def no_daemon_env(monkeypatch):
    for name in ("HOSHIKAGE_URL", "HOSHIKAGE_API_KEY", "HOSHIKAGE_CONFIG", "HOSHIKAGE_HOST", "HOSHIKAGE_PORT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def daemon_logs_elsewhere():
    """The in-process daemon logs to stdout by default, which is where the command line prints."""
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=io.StringIO()))
    yield
    structlog.reset_defaults()


async def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run the command line in a thread; (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = await asyncio.to_thread(main, list(argv))
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def spawn(*argv: str) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOSHIKAGE_")}
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hoshikage_sup", *argv, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def test_status_list_load_ps_unload(make_server, capsys):
    h = await make_server({"gemma": {"aliases": ["gemma3:270m"]}, "embed": {"embedding": True, "keep_alive": "10m"}})
    url = ["--url", h.url]

    code, out, err = await cli(capsys, "status", *url)
    assert code == 0 and err == ""
    assert f"hoshikage {__version__} at {h.url}" in out and f"127.0.0.1:{h.server.port}" in out
    assert "0 loaded of 2 configured" in out and "0 in flight, 0 queued" in out and "requests 0" in out
    code, out, _ = await cli(capsys, "status", *url, "--json")
    assert code == 0 and json.loads(out)["models_configured"] == 2

    code, out, _ = await cli(capsys, "list", *url)
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["NAME", "ALIASES", "STATE", "KEEP_ALIVE", "PINNED"]
    assert rows[0].split() == ["gemma", "gemma3:270m", "unloaded", "5m", "no"]
    assert rows[1].split() == ["embed", "-", "unloaded", "10m", "no"]
    code, out, _ = await cli(capsys, "list", *url, "--json")
    assert [m["name"] for m in json.loads(out)["models"]] == ["gemma", "embed"]

    code, out, _ = await cli(capsys, "ps", *url)
    assert code == 0 and out.split() == ["NAME", "STATE", "REPLICAS", "PIDS", "SIZE", "UNTIL"]

    code, out, err = await cli(capsys, "load", "gemma3:270m", "--keep-alive", "10m", *url)
    assert code == 0, err
    pid = h.spawner.of("gemma")[0].pid
    assert out.startswith(f"gemma: idle (1 replica, pid {pid}, size ") and "keep_alive 10m), loaded in " in out
    code, out, _ = await cli(capsys, "load", "gemma", "--keep-alive", "-1", *url)  # a number: seconds
    assert code == 0 and "keep_alive forever" in out and out.rstrip().endswith("was already loaded")

    code, out, _ = await cli(capsys, "ps", *url)
    assert code == 0
    header, row = out.splitlines()
    assert row.split()[:4] == ["gemma", "idle", "1/1", str(pid)] and row.split()[-1] == "forever"
    code, out, _ = await cli(capsys, "ps", *url, "--json")
    (m,) = json.loads(out)["models"]
    assert m["name"] == "gemma" and m["replicas"][0]["pid"] == pid

    code, out, err = await cli(capsys, "restart", "gemma", *url)
    assert code == 0, err
    new_pid = h.scheduler.slots["gemma"].replicas[-1].process.pid
    assert new_pid != pid and "restarted in " in out
    await h.scheduler.wait_until(lambda: [r.process.pid for r in h.scheduler.slots["gemma"].replicas] == [new_pid], 30)
    code, out, err = await cli(capsys, "restart", "embed", *url)
    assert code == 1 and "not loaded" in err

    code, out, _ = await cli(capsys, "unload", "gemma", *url)
    assert code == 0 and out == "gemma: unloaded\n"
    code, out, _ = await cli(capsys, "load", "embed", *url, "--json")
    assert code == 0 and json.loads(out)["model"]["state"] == "idle"
    code, out, _ = await cli(capsys, "unload", "--all", *url)
    assert code == 0 and out == "embed: unloaded\n"
    code, out, _ = await cli(capsys, "unload", "--all", *url)
    assert code == 0 and out == "no model was loaded\n"


async def test_daemon_errors_exit_1_with_its_message(make_server, capsys):
    h = await make_server({"a": {}})
    code, out, err = await cli(capsys, "load", "nope", "--url", h.url)
    assert (code, out, err) == (1, "", "hoshikage: model 'nope' not found\n")
    code, out, err = await cli(capsys, "load", "a", "--keep-alive", "soon", "--url", h.url)
    assert code == 1 and out == "" and err.startswith("hoshikage: invalid keep_alive: ") and err.count("\n") == 1
    code, _, err = await cli(capsys, "logs", "nope", "--url", h.url)
    assert code == 1 and "not found" in err


async def test_usage_errors_exit_2(capsys):
    for argv in (["unload"], ["unload", "a", "--all"], ["logs"], ["logs", "a", "-n", "-3"], ["frobnicate"]):
        code, out, err = await cli(capsys, *argv)
        assert code == 2 and out == "" and "usage: hoshikage" in err, argv
    code, out, err = await cli(capsys, "status", "--url", "localhost:11434")
    assert (code, out) == (2, "") and err == "hoshikage: invalid daemon URL 'localhost:11434': expected http://HOST:PORT\n"


async def test_logs_and_events(make_server, capsys):
    h = await make_server({"a": {}})
    url = ["--url", h.url]
    assert (await cli(capsys, "load", "a", *url))[0] == 0
    pid = h.spawner.of("a")[0].pid

    code, out, _ = await cli(capsys, "logs", "a", *url)
    assert code == 0
    serving = [line for line in out.splitlines() if "fake runner serving a" in line]
    assert len(serving) == 1 and f" a#0[{pid}]: fake runner serving a" in serving[0]
    code, out, _ = await cli(capsys, "logs", "a", "-n", "1", *url)
    assert code == 0 and len(out.splitlines()) == 1
    code, out, _ = await cli(capsys, "logs", "a", *url, "--json")
    body = json.loads(out)
    assert body["model"] == "a" and any(line["pid"] == pid for line in body["lines"])

    if getattr(h.scheduler, "events", None) is None:  # a scheduler that records nothing: record its load
        from hoshikage_sup.events import EventLog

        h.scheduler.events = EventLog()
        h.scheduler.events.record("ready", "a", "request", replica=0, pid=pid, load_seconds=0.4)
    code, out, _ = await cli(capsys, "events", *url)
    assert code == 0 and out
    for line in out.splitlines():
        assert " a#0" in line and "reason=" in line
    code, out, _ = await cli(capsys, "events", "--model", "a", "-n", "1", *url, "--json")
    (e,) = json.loads(out)["events"]
    assert e["model"] == "a"


async def test_follow_until_ctrl_c(make_server):
    h = await make_server({"a": {}})
    proc = await spawn("logs", "a", "-f", "--url", h.url)
    try:
        loading = asyncio.ensure_future(h.gateway.load("a"))
        line = await asyncio.wait_for(proc.stdout.readline(), DEADLINE)
        while b"fake runner serving a" not in line:
            line = await asyncio.wait_for(proc.stdout.readline(), DEADLINE)
        assert f" a#0[{h.spawner.of('a')[0].pid}]: ".encode() in line
        await loading
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), DEADLINE)
        err = await proc.stderr.read()
        assert code == 0 and b"Traceback" not in err, err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    proc = await spawn("events", "-f", "--json", "--model", "a", "--url", h.url)
    try:
        await asyncio.sleep(0.5)  # the follow is open, or about to be
        if getattr(h.scheduler, "events", None) is None:
            pytest.skip("this scheduler records no events")
        h.gateway.unload("a")
        line = await asyncio.wait_for(proc.stdout.readline(), DEADLINE)
        assert json.loads(line)["model"] == "a"
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), DEADLINE) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_api_keys(make_server, capsys, monkeypatch):
    h = await make_server({"a": {}}, server={"admin_keys": ["adm"], "api_keys": ["api"]})
    code, _, err = await cli(capsys, "status", "--url", h.url)
    assert code == 1 and err.startswith("hoshikage: missing API key")
    code, _, err = await cli(capsys, "status", "--url", h.url, "--api-key", "api")
    assert (code, err) == (1, "hoshikage: invalid API key\n")
    assert (await cli(capsys, "status", "--url", h.url, "--api-key", "adm"))[0] == 0
    monkeypatch.setenv("HOSHIKAGE_API_KEY", "adm")
    monkeypatch.setenv("HOSHIKAGE_URL", h.url)
    assert (await cli(capsys, "list"))[0] == 0


async def test_no_daemon_one_line_exit_1(capsys):
    url = f"http://127.0.0.1:{closed_port()}"
    for argv in (["status"], ["ps", "--json"], ["load", "a"], ["logs", "a", "-f"], ["events", "-f"]):
        code, out, err = await cli(capsys, *argv, "--url", url)
        assert (code, out, err) == (1, "", f"hoshikage: no daemon at {url}: connection refused\n"), argv

    proc = await spawn("ps", "--url", url)
    out, err = await asyncio.wait_for(proc.communicate(), DEADLINE)
    assert proc.returncode == 1 and out == b""
    assert err.decode() == f"hoshikage: no daemon at {url}: connection refused\n"


def test_daemon_url_order(tmp_path, demo_model):
    config = tmp_path / "h.toml"
    config.write_text(f'[server]\nhost = "0.0.0.0"\nport = 12345\n[models.a]\npath = "{demo_model}"\n')
    assert daemon_url(None, None, {}) == DEFAULT_URL == "http://127.0.0.1:11434"
    assert daemon_url(None, str(config), {}) == "http://127.0.0.1:12345"
    assert daemon_url(None, None, {"HOSHIKAGE_CONFIG": str(config), "HOSHIKAGE_PORT": "9"}) == "http://127.0.0.1:9"
    assert daemon_url(None, str(config), {"HOSHIKAGE_URL": "http://h:1"}) == "http://h:1"
    assert daemon_url("http://x:2", str(config), {"HOSHIKAGE_URL": "http://h:1"}) == "http://x:2"
    moved = tmp_path / "moved.toml"  # only [server] is read: a model file it cannot see does not matter
    moved.write_text('[server]\nport = 8\n[models.a]\npath = "/nowhere/a.gguf"\n')
    assert daemon_url(None, str(moved), {}) == "http://127.0.0.1:8"
    v6 = tmp_path / "v6.toml"
    v6.write_text('[server]\nhost = "::"\nport = 7\n')
    assert daemon_url(None, str(v6), {}) == "http://[::1]:7"


async def test_a_bad_config_for_the_address_exits_2(tmp_path, capsys):
    code, out, err = await cli(capsys, "status", "--config", str(tmp_path / "missing.toml"))
    assert code == 2 and out == "" and err.startswith("hoshikage: config error: ") and "does not exist" in err
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nport = "high"\n')
    code, out, err = await cli(capsys, "status", "--config", str(bad))
    assert code == 2 and out == "" and "server.port" in err
