"""The admin API (/admin/...) over HTTP, with fake runners (`make_server` in conftest.py).

Every endpoint's shape, its errors in OpenAI's shape, load and unload as
/admin/models sees them, runner output kept past a crash, follow streams that
deliver lines and events as they happen, and admin keys.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest

from hoshikage_sup import __version__
from hoshikage_sup.devices import CpuSource, SimulatedSource
from hoshikage_sup.events import EventLog
from hoshikage_sup.runnerlogs import runner_logs_of

DEADLINE = 20.0
MiB = 2**20
GiB = 2**30
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as s:
        yield s


async def get(http, url: str, **kw: Any) -> tuple[int, Any]:
    async with http.get(url, **kw) as r:
        return r.status, await r.json()


async def post(http, url: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
    async with http.post(url, json=body, **kw) as r:
        return r.status, await r.json()


def assert_error(body: Any, *, code: str | None = None, param: str | None = None) -> str:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]["message"]


async def eventually(check, what: str, timeout: float = DEADLINE):
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def read_line(response: aiohttp.ClientResponse) -> dict[str, Any]:
    raw = await asyncio.wait_for(response.content.readline(), DEADLINE)
    assert raw.endswith(b"\n"), raw
    return json.loads(raw)


def events_of(h) -> tuple[EventLog, bool]:
    """The scheduler's event log; one of our own (recorded by the test) where it keeps none."""
    log = getattr(h.scheduler, "events", None)
    if log is not None:
        return log, False
    log = EventLog()
    h.scheduler.events = log
    return log, True


# ------------------------------------------------------------------ status and models


async def test_status_and_models_shapes(make_server, http):
    h = await make_server({
        "a": {"aliases": ["a:1", "team/a"]},
        "b": {"keep_alive": "10m", "pinned": False},
        "p": {"pinned": True},
    })
    status, s = await get(http, h.url + "/admin/status")
    assert status == 200
    assert s["version"] == __version__ and s["host"] == "127.0.0.1" and s["port"] == h.server.port
    assert s["models_configured"] == 3 and s["models_loaded"] == 0
    assert s["requests_in_flight"] == 0 and s["requests_queued"] == 0
    assert s["uptime_seconds"] >= 0 and s["pid"] > 0 and s["max_loaded_models"] >= 1
    assert s["counters"]["requests"] == 0 and "loads" in s["counters"]

    status, body = await get(http, h.url + "/admin/models")
    assert status == 200
    by_name = {m["name"]: m for m in body["models"]}
    assert list(by_name) == ["a", "b", "p"]  # the config's order
    a = by_name["a"]
    assert a["aliases"] == ["a:1", "team/a"] and a["state"] == "unloaded" and a["loaded"] is False
    assert a["replicas"] == [] and a["memory"] is None and a["expires_at"] is None and a["configured"] is True
    assert a["keep_alive"] == "5m" and a["keep_alive_seconds"] == 300
    assert by_name["b"]["keep_alive"] == "10m"
    assert by_name["p"]["pinned"] is True and by_name["p"]["keep_alive"] == "forever"
    assert by_name["p"]["keep_alive_seconds"] is None  # strict JSON: no Infinity


async def test_load_and_unload_are_seen_in_models(make_server, http):
    h = await make_server({"a": {"aliases": ["team/a"]}, "b": {}}, devices=CpuSource())  # measures RSS
    status, r = await post(http, h.url + "/admin/models/team%2Fa/load", {"keep_alive": "1m"})
    assert status == 200, r
    m = r["model"]
    assert m["name"] == "a" and m["state"] == "idle" and m["loaded"] is True
    assert m["keep_alive"] == "1m" and 0 < m["expires_in"] <= 60 and m["expires_at"] > time.time()
    assert r["load_duration"] > 0 and r["total_duration"] >= r["load_duration"]
    (rep,) = m["replicas"]
    assert rep["index"] == 0 and rep["state"] == "ready" and rep["pid"] == h.spawner.of("a")[0].pid
    assert rep["in_flight"] == 0 and rep["served"] == 0 and rep["load_duration"] > 0
    assert rep["memory"]["estimate_bytes"] > 0 and rep["memory"]["measured_bytes"] > 0
    assert m["memory"]["estimate_bytes"] == rep["memory"]["estimate_bytes"]
    assert m["options"]["n_ctx"] == 256

    # Loading again answers at once: nothing was loaded for it.
    status, again = await post(http, h.url + "/admin/models/a/load")
    assert status == 200 and again["load_duration"] == 0 and again["model"]["replicas"][0]["pid"] == rep["pid"]

    _, body = await get(http, h.url + "/admin/models")
    states = {x["name"]: x["state"] for x in body["models"]}
    assert states == {"a": "idle", "b": "unloaded"}
    _, s = await get(http, h.url + "/admin/status")
    assert s["models_loaded"] == 1 and s["counters"]["loads"] == 1

    status, r = await post(http, h.url + "/admin/models/a/unload")
    assert status == 200 and r["model"]["state"] == "unloaded" and r["model"]["replicas"] == []
    assert h.spawner.of("a")[0].returncode is not None  # answered once the runner had stopped
    _, body = await get(http, h.url + "/admin/models")
    assert {x["name"]: x["state"] for x in body["models"]} == {"a": "unloaded", "b": "unloaded"}
    # Unloading what is not loaded is not an error.
    status, r = await post(http, h.url + "/admin/models/b/unload")
    assert status == 200 and r["model"]["state"] == "unloaded"


async def test_status_shows_each_device_beside_the_runners_memory(make_server, http):
    """What the status page draws: each device's total and free, and every
    model's estimate and measured memory per device."""
    src = SimulatedSource([(24 * GiB, 20 * GiB)], names=["Sim 24G"], system_total=64 * GiB,
                          system_available=48 * GiB)
    h = await make_server({"a": {}, "b": {"n_gpu_layers": 0}}, devices=src, memory={"limit": "16GiB"})
    for name in ("a", "b"):
        assert (await post(http, f"{h.url}/admin/models/{name}/load"))[0] == 200
    # Not measured yet: estimates only.
    status, s = await get(http, h.url + "/admin/status")
    assert status == 200 and abs(s["time"] - time.time()) < 5
    cpu, gpu = s["devices"]
    assert cpu == {
        "id": "cpu", "kind": "cpu", "gpu": None, "name": "System RAM", "total_bytes": 64 * GiB,
        "free_bytes": 48 * GiB, "reserve_bytes": GiB, "limit_bytes": 16 * GiB,
        "estimate_bytes": cpu["estimate_bytes"], "measured_bytes": None, "spare_bytes": 0,
    }
    assert gpu["id"] == "gpu0" and gpu["kind"] == "gpu" and gpu["gpu"] == 0 and gpu["name"] == "Sim 24G"
    assert gpu["total_bytes"] == 24 * GiB and gpu["free_bytes"] == 20 * GiB and gpu["measured_bytes"] is None
    _, body = await get(http, h.url + "/admin/models")
    by_name = {m["name"]: m for m in body["models"]}
    a = {d["device"]: d for d in by_name["a"]["memory"]["devices"]}
    b = {d["device"]: d for d in by_name["b"]["memory"]["devices"]}
    assert set(a) == {"cpu", "gpu0"} and set(b) == {"cpu"}  # "auto" put a's layers on the GPU, b stays on the CPU
    assert a["gpu0"]["gpu"] == 0 and a["cpu"]["gpu"] is None
    assert sum(d["estimate_bytes"] for d in a.values()) == by_name["a"]["memory"]["estimate_bytes"]
    assert gpu["estimate_bytes"] == a["gpu0"]["estimate_bytes"] > 0
    assert cpu["estimate_bytes"] == a["cpu"]["estimate_bytes"] + b["cpu"]["estimate_bytes"]
    assert all(d["measured_bytes"] is None for d in (*a.values(), *b.values()))

    # Measured: RSS and the GPU memory the driver reports for each runner.
    (pid_a,) = [p.pid for p in h.spawner.of("a")]
    (pid_b,) = [p.pid for p in h.spawner.of("b")]
    src.set_rss(pid_a, 300 * MiB)
    src.set_rss(pid_b, 200 * MiB)
    src.allocate(0, 700 * MiB, pid=pid_a)
    _, body = await get(http, h.url + "/admin/models")
    by_name = {m["name"]: m for m in body["models"]}
    a = {d["device"]: d for d in by_name["a"]["memory"]["devices"]}
    assert a["cpu"]["measured_bytes"] == 300 * MiB and a["gpu0"]["measured_bytes"] == 700 * MiB
    _, s = await get(http, h.url + "/admin/status")
    cpu, gpu = s["devices"]
    assert cpu["measured_bytes"] == 500 * MiB
    assert gpu["measured_bytes"] == 700 * MiB and gpu["free_bytes"] == 20 * GiB - 700 * MiB


async def test_unload_all_and_a_busy_model_drains(make_server, http):
    h = await make_server({"a": {}, "slow": {}}, model_env={"slow": {"FAKE_TOKEN_DELAY": "0.15", "FAKE_TOKENS": "12"}})
    for name in ("a", "slow"):
        assert (await post(http, f"{h.url}/admin/models/{name}/load"))[0] == 200
    chat = asyncio.ensure_future(post(http, h.url + "/v1/chat/completions", {"model": "slow", **CHAT}))

    async def busy():
        _, body = await get(http, h.url + "/admin/models")
        return next(m for m in body["models"] if m["name"] == "slow")["in_flight"] == 1

    await eventually(busy, "the slow request to be in flight")
    _, s = await get(http, h.url + "/admin/status")
    assert s["requests_in_flight"] == 1

    status, r = await post(http, h.url + "/admin/unload")
    assert status == 200
    by_name = {m["name"]: m for m in r["models"]}
    assert by_name["a"]["state"] == "unloaded"
    assert by_name["slow"]["state"] == "draining" and by_name["slow"]["draining"] == "unload"
    assert by_name["slow"]["in_flight"] == 1

    status, answer = await asyncio.wait_for(chat, DEADLINE)
    assert status == 200, answer  # a draining model finishes what it serves

    async def gone():
        _, body = await get(http, h.url + "/admin/models")
        return all(m["state"] == "unloaded" for m in body["models"])

    await eventually(gone, "the drained model to stop")
    status, r = await post(http, h.url + "/admin/unload")
    assert status == 200 and r == {"models": []}


async def test_errors_are_in_openai_shape(make_server, http):
    h = await make_server({"a": {}, "broken": {}}, model_env={"broken": {"FAKE_LOAD_FAIL": "bad magic 0x0"}})
    for method, path in (("POST", "/admin/models/nope/load"), ("POST", "/admin/models/nope/unload"),
                         ("GET", "/admin/models/nope/logs")):
        async with http.request(method, h.url + path) as r:
            assert r.status == 404
            assert "'nope'" in assert_error(await r.json(), code="model_not_found")
    status, body = await post(http, h.url + "/admin/models/a/load", {"keep_alive": "ten minutes"})
    assert status == 400 and "keep_alive" in assert_error(body, param="keep_alive")
    status, body = await post(http, h.url + "/admin/models/a/load", {"keepalive": "1m"})
    assert status == 400 and "keepalive" in assert_error(body, param="keepalive")
    status, body = await get(http, h.url + "/admin/models/a/logs?lines=-1")
    assert status == 400 and assert_error(body, param="lines")
    status, body = await get(http, h.url + "/admin/models/a/logs?follow=perhaps")
    assert status == 400 and assert_error(body, param="follow")
    status, body = await get(http, h.url + "/admin/restart")
    assert status == 404 and assert_error(body)
    status, body = await get(http, h.url + "/admin/models/a/load")  # GET on a POST route
    assert status == 405 and assert_error(body)
    assert not h.scheduler.slots  # none of that loaded anything

    # A load that fails says why, and what the runner printed stays readable.
    status, body = await post(http, h.url + "/admin/models/broken/load")
    assert status == 500 and "bad magic 0x0" in assert_error(body, code="model_load_failed")
    _, logs = await get(http, h.url + "/admin/models/broken/logs")
    errors = [line for line in logs["lines"] if line["error"]]
    assert any("error loading model: bad magic 0x0" in line["text"] for line in errors)
    assert all(line["pid"] == h.spawner.of("broken")[0].pid for line in logs["lines"])


# ------------------------------------------------------------------ runner logs


async def test_logs_of_a_crashed_runner_stay_readable(make_server, http):
    h = await make_server({"c": {}}, model_env={"c": {"FAKE_CRASH_AFTER": "0.3"}})
    assert (await post(http, h.url + "/admin/models/c/load"))[0] == 200
    first = h.spawner.of("c")[0]

    async def crashed():
        if first.returncode is None:
            return None
        status, body = await get(http, h.url + "/admin/models/c/logs")
        assert status == 200
        mine = [line for line in body["lines"] if line["pid"] == first.pid]
        return mine if any("GGML_ASSERT" in line["text"] for line in mine) else None

    lines = await eventually(crashed, "the runner to crash")
    assert first.returncode < 0  # aborted
    serving, = [line for line in lines if "fake runner serving" in line["text"]]
    assert serving["error"] is False and serving["replica"] == 0
    assert_line, = [line for line in lines if "GGML_ASSERT" in line["text"]]
    assert assert_line["error"] is True and assert_line["seq"] > serving["seq"]
    assert set(assert_line) == {"model", "seq", "time", "replica", "pid", "error", "text"}
    assert assert_line["model"] == "c"
    assert abs(assert_line["time"] - time.time()) < 60

    # lines=N is the last N; the secret of no runner is ever kept.
    _, body = await get(http, h.url + "/admin/models/c/logs?lines=1")
    assert len(body["lines"]) == 1 and body["lines"][0]["seq"] == body["last_seq"]
    kept = runner_logs_of(h.scheduler).for_model("c").recent()
    for process in h.spawner.of("c"):
        assert not any(process.auth_headers()["Authorization"].split()[1] in line.text for line in kept)
    # after=SEQ: only what came later
    _, later = await get(http, h.url + f"/admin/models/c/logs?after={assert_line['seq']}")
    assert all(line["seq"] > assert_line["seq"] for line in later["lines"])


async def test_follow_logs_receives_new_lines_live(make_server, http):
    h = await make_server({"a": {"aliases": ["a:1"]}})
    async with http.get(h.url + "/admin/models/a:1/logs", params={"follow": "1", "lines": "0"}) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("application/x-ndjson")
        load = asyncio.ensure_future(post(http, h.url + "/admin/models/a/load"))
        line = await read_line(r)
        assert line["model"] == "a" and line["replica"] == 0 and line["pid"] is not None  # the name, not the alias
        assert (await load)[0] == 200
        while "fake runner serving" not in line["text"]:
            line = await read_line(r)
        assert line["pid"] == h.spawner.of("a")[0].pid
    # The backlog comes first in a follow stream: lines=1 is the last line, then it waits.
    async with http.get(h.url + "/admin/models/a/logs", params={"follow": "1", "lines": "1"}) as r:
        first = await read_line(r)
        assert "fake runner serving" in first["text"]
    await asyncio.sleep(0.1)
    assert not runner_logs_of(h.scheduler).for_model("a")._waiters  # the follower left with its client


async def test_follow_ends_when_the_daemon_shuts_down(make_server, http):
    h = await make_server({"a": {}})
    async with http.get(h.url + "/admin/models/a/logs", params={"follow": "1"}) as r:
        assert r.status == 200
        t0 = time.monotonic()
        await asyncio.wait_for(h.server.runner.shutdown(), DEADLINE)
        assert await asyncio.wait_for(r.content.read(), DEADLINE) == b""  # ended, not cut
        assert time.monotonic() - t0 < 5


# ------------------------------------------------------------------ events


async def test_events_list_filter_and_follow(make_server, http):
    h = await make_server({"a": {}, "b": {}})
    log, ours = events_of(h)
    assert (await post(http, h.url + "/admin/models/a/load"))[0] == 200
    if ours:  # this scheduler records nothing: record what it just did, as it would
        log.record("loading", "a", "request", replica=0)
        log.record("ready", "a", "request", replica=0, pid=h.spawner.of("a")[0].pid)

    status, body = await get(http, h.url + "/admin/events")
    assert status == 200 and body["events"], body
    e = body["events"][-1]
    assert {"seq", "time", "kind", "model", "reason", "replica", "pid", "detail"} <= set(e)
    assert body["last_seq"] == e["seq"] and all(x["model"] == "a" for x in body["events"])
    _, only_b = await get(http, h.url + "/admin/events", params={"model": "b"})
    assert only_b["events"] == []
    _, later = await get(http, h.url + "/admin/events", params={"after": str(e["seq"])})
    assert later["events"] == []
    _, one = await get(http, h.url + "/admin/events", params={"limit": "1"})
    assert one["events"] == [e]
    status, missing = await get(http, h.url + "/admin/events", params={"model": "nope"})
    assert status == 404 and assert_error(missing, code="model_not_found")

    # follow: nothing old (after the last one), then b's events as they happen, not a's.
    params = {"follow": "1", "model": "b", "after": str(body["last_seq"])}
    async with http.get(h.url + "/admin/events", params=params) as r:
        assert r.status == 200
        load = asyncio.ensure_future(post(http, h.url + "/admin/models/b/load"))
        if ours:
            log.record("loading", "a", "request", replica=0)
            log.record("loading", "b", "request", replica=0)
        live = await read_line(r)
        assert live["model"] == "b" and live["seq"] > body["last_seq"]
        assert (await load)[0] == 200

    async with http.get(h.url + "/metrics") as r:
        text = await r.text()
    counted = [line for line in text.splitlines() if line.startswith("hoshikage_events_total{")]
    assert counted and all('kind="' in line and 'reason="' in line for line in counted)
    assert sum(float(line.rsplit(" ", 1)[1]) for line in counted) == sum(log.counts.values())


# ------------------------------------------------------------------ keys


async def test_admin_keys_guard_admin_and_api_keys_do_not(make_server, http):
    h = await make_server({"a": {}}, server={"admin_keys": ["adm-key"], "api_keys": ["api-key"]})
    bearer = lambda k: {"Authorization": f"Bearer {k}"}  # noqa: E731
    status, body = await get(http, h.url + "/admin/status")
    assert status == 401 and "missing API key" in assert_error(body, code="invalid_api_key")
    status, body = await get(http, h.url + "/admin/status", headers=bearer("api-key"))
    assert status == 401 and assert_error(body, code="invalid_api_key")
    status, body = await post(http, h.url + "/admin/models/a/load", headers={"x-api-key": "api-key"})
    assert status == 401 and not h.scheduler.slots
    assert (await get(http, h.url + "/admin/status", headers=bearer("adm-key")))[0] == 200
    assert (await get(http, h.url + "/admin/models", headers={"x-api-key": "adm-key"}))[0] == 200
    assert (await get(http, h.url + "/v1/models", headers=bearer("api-key")))[0] == 200


async def test_without_admin_keys_the_api_keys_open_admin(make_server, http):
    h = await make_server({"a": {}}, server={"api_keys": ["api-key"]})
    assert (await get(http, h.url + "/admin/status"))[0] == 401
    assert (await get(http, h.url + "/admin/status", headers={"Authorization": "Bearer api-key"}))[0] == 200
