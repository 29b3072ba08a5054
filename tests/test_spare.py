"""The warm spare runner (runner_pool) and the thread budget (n_threads = 0)."""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import sys
import time
from pathlib import Path

import pytest

from conftest import FakeSpawner
from hoshikage_sup import policy
from hoshikage_sup.process import RunnerLoadError, RunnerProcess, RunnerSpec
from hoshikage_sup.threads import FILE_NAME, ThreadBudget
from httputil import post_json


def fake_spec(**overrides) -> RunnerSpec:
    fields = dict(model_name="fake", model_path="/models/fake.gguf", n_ctx=256, n_threads=1)
    fields.update(overrides)
    return RunnerSpec(**fields)


def fake_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_")}
    env.update(settings)
    return env


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purposes
        return f.read().split(")")[-1].split()[0] != "Z"


async def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


class SpareSpawner(FakeSpawner):
    """FakeSpawner whose pool keeps spares: same command and environment for every model."""

    def __init__(self, command, env=None):
        super().__init__(command, env=env)
        self.spares: list[RunnerProcess] = []

    def spare(self) -> RunnerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_")}
        env.update(self.env)
        runtime_dir = self.server.runtime_dir if self.server is not None else None
        process = RunnerProcess(None, command=self.command, env=env, runtime_dir=runtime_dir)
        self.spares.append(process)
        return process


# ------------------------------------------------------------------ process level


async def test_a_spare_waits_then_loads_what_it_is_assigned(fake_runner_command) -> None:
    runner = RunnerProcess(None, command=fake_runner_command, env=fake_env())
    await runner.spawn()
    try:
        assert runner.state == "spare" and runner.pid and runner.name == "(spare)"
        await asyncio.sleep(0.3)  # it waits on stdin: no socket answer, still alive
        assert alive(runner.pid) and not await runner.health(timeout=0.2)
        with pytest.raises(RuntimeError):
            await runner.start()  # no spec yet
        runner.assign(fake_spec(model_name="late"), replica=2)
        assert runner.spawned_for is not None and runner.spawned_for >= 0.3
        await runner.start(load_timeout=30)
        assert runner.state == "ready" and runner.replica == 2
        async with runner.session.get(f"{runner.base_url}/health") as response:
            assert (await response.json())["model"] == "late"
        # load_duration counts from the settings line, not from the spawn
        assert runner.load_duration is not None and runner.load_duration < runner.spawned_for + 5
    finally:
        assert await runner.stop(grace=5) == 0


async def test_a_spare_that_dies_after_assign_fails_its_load_cleanly(fake_runner_command) -> None:
    runner = RunnerProcess(None, command=fake_runner_command, env=fake_env())
    await runner.spawn()
    runner.assign(fake_spec())
    os.kill(runner.pid, signal.SIGKILL)
    await runner.wait()
    with pytest.raises(RunnerLoadError, match="exited while loading.*SIGKILL"):
        await runner.start(load_timeout=30)


async def test_stopping_a_spare(fake_runner_command) -> None:
    calls = []
    runner = RunnerProcess(None, command=fake_runner_command, env=fake_env(), on_exit=lambda p, c: calls.append(c))
    await runner.spawn()
    pid = runner.pid
    await runner.stop(grace=5)
    assert runner.state == "exited" and len(calls) == 1 and not alive(pid)
    with pytest.raises(RuntimeError):
        runner.assign(fake_spec())


# ------------------------------------------------------------------ pool level


async def test_a_cold_request_takes_the_spare_and_a_new_one_follows(http, make_server, fake_runner_command) -> None:
    spawner = SpareSpawner(fake_runner_command)
    h = await make_server({"a": {}, "b": {}}, server={"runner_pool": 1}, spawner=spawner)
    pool = h.scheduler.pool
    await until(lambda: len(pool.spares) == 1)
    first = pool.spares[0]
    status, body, _ = await post_json(http, f"{h.url}/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 2})
    assert status == 200, body
    (replica,) = h.scheduler.slots["a"].replicas
    assert replica.process is first and replica.process.spec.model_name == "a"
    assert h.scheduler.counters["spares_used"] == 1
    assert not spawner.processes  # nothing was spawned the slow way
    await until(lambda: len(pool.spares) == 1 and pool.spares[0] is not first)
    second = pool.spares[0]
    status, _, _ = await post_json(http, f"{h.url}/v1/completions", {"model": "b", "prompt": "hi", "max_tokens": 2})
    assert status == 200
    assert h.scheduler.slots["b"].replicas[0].process is second
    assert [e.kind for e in h.scheduler.events.recent() if e.kind == "spare"]
    pids = [p.pid for p in spawner.spares]
    await h.server.shutdown()
    for pid in pids:
        assert not alive(pid), "shutdown left a spare behind"


async def test_a_dead_spare_is_replaced(http, make_server, fake_runner_command) -> None:
    spawner = SpareSpawner(fake_runner_command)
    h = await make_server({"a": {}}, server={"runner_pool": 1}, spawner=spawner)
    pool = h.scheduler.pool
    await until(lambda: len(pool.spares) == 1)
    dead = pool.spares[0]
    os.kill(dead.pid, signal.SIGKILL)
    await until(lambda: len(pool.spares) == 1 and pool.spares[0] is not dead)  # first failure: at once
    status, _, _ = await post_json(http, f"{h.url}/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 2})
    assert status == 200


async def test_runner_pool_zero_keeps_no_spare(http, make_server, fake_runner_command) -> None:
    spawner = SpareSpawner(fake_runner_command)
    h = await make_server({"a": {}}, server={"runner_pool": 0}, spawner=spawner)
    status, _, _ = await post_json(http, f"{h.url}/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 2})
    assert status == 200
    await asyncio.sleep(0.3)
    assert not spawner.spares and not h.scheduler.pool.spares and len(spawner.processes) == 1


async def test_spares_count_against_the_memory_limit(make_server, fake_runner_command) -> None:
    spawner = SpareSpawner(fake_runner_command)
    h = await make_server({"a": {}}, server={"runner_pool": 1}, spawner=spawner)
    pool = h.scheduler.pool
    await until(lambda: len(pool.spares) == 1)
    await until(lambda: pool.spare_bytes() > 0)
    # the planner counts what the pool holds beside its runners (RSS moves between two readings)
    assert h.scheduler.planner.extra_bytes == pool.extra_bytes and pool.extra_bytes() > 0


def test_spare_policy() -> None:
    assert policy.wants_spare(1, 0, starting=False, loads_in_progress=0, closed=False)
    assert not policy.wants_spare(1, 1, starting=False, loads_in_progress=0, closed=False)
    assert not policy.wants_spare(1, 0, starting=True, loads_in_progress=0, closed=False)
    assert not policy.wants_spare(1, 0, starting=False, loads_in_progress=1, closed=False)  # a load needs the CPU
    assert not policy.wants_spare(0, 0, starting=False, loads_in_progress=0, closed=False)
    assert not policy.wants_spare(1, 0, starting=False, loads_in_progress=0, closed=True)


# ------------------------------------------------------------------ thread budget


def test_a_due_spare_waits_for_a_quiet_moment() -> None:
    assert policy.spare_may_start(busy_runners=0, loads_in_progress=0, waited=0)
    assert not policy.spare_may_start(busy_runners=1, loads_in_progress=0, waited=0)  # a first token is on its way
    assert policy.spare_may_start(busy_runners=3, loads_in_progress=0, waited=policy.SPARE_PATIENCE)  # constant load
    assert not policy.spare_may_start(busy_runners=0, loads_in_progress=1, waited=60)  # never during a load


async def test_the_next_spare_starts_once_the_new_runner_has_answered(http, make_server, fake_runner_command) -> None:
    spawner = SpareSpawner(fake_runner_command, env={"FAKE_TOKEN_DELAY": "0.1"})
    h = await make_server({"a": {}}, server={"runner_pool": 1}, spawner=spawner)
    pool = h.scheduler.pool
    await until(lambda: len(pool.spares) == 1)
    task = asyncio.ensure_future(post_json(http, f"{h.url}/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 10}))
    await until(lambda: h.scheduler.slots.get("a") is not None and h.scheduler.slots["a"].replicas
                and h.scheduler.slots["a"].replicas[0].inflight > 0)
    await asyncio.sleep(0.5)  # generating: ten tokens take a second
    assert not task.done() and len(spawner.spares) == 1, "a spare spawned while the first answer was on its way"
    status, body, _ = await task
    assert status == 200, body
    await until(lambda: len(pool.spares) == 1 and len(spawner.spares) == 2)


def test_fair_share() -> None:
    assert policy.fair_share(2, 0) == 2 and policy.fair_share(2, 1) == 2
    assert policy.fair_share(2, 2) == 1 and policy.fair_share(2, 5) == 1  # never 0
    assert policy.fair_share(16, 3) == 5


def _share(path: Path) -> int:
    return struct.unpack("<I", path.read_bytes()[:4])[0]


def test_budget_file_follows_busy_runners(tmp_path: Path) -> None:
    budget = ThreadBudget(tmp_path, cpus=4)
    path = tmp_path / FILE_NAME
    assert budget.path == path and _share(path) == 4
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    budget.started()
    assert _share(path) == 4
    budget.started()
    assert _share(path) == 2
    budget.started()
    budget.started()
    assert _share(path) == 1
    for _ in range(3):
        budget.finished()
    assert _share(path) == 4
    budget.finished()
    budget.finished()  # never below zero
    assert budget.busy == 0 and _share(path) == 4
    budget.close()
    assert not path.exists()


async def test_busy_replicas_move_the_budget(http, make_server) -> None:
    h = await make_server({"a": {}, "b": {}}, model_env={"a": {"FAKE_TOKEN_DELAY": "0.2"},
                                                        "b": {"FAKE_TOKEN_DELAY": "0.2"}})
    budget = h.scheduler.pool.budget
    cpus = budget.cpus
    assert budget.path is not None and budget.path.parent == h.server.runtime_dir
    body = {"prompt": "hi", "max_tokens": 5}
    tasks = [asyncio.ensure_future(post_json(http, f"{h.url}/v1/completions", {**body, "model": m})) for m in ("a", "b")]
    await until(lambda: budget.busy == 2, timeout=15)
    assert _share(budget.path) == policy.fair_share(cpus, 2)
    for status, _, _ in await asyncio.gather(*tasks):
        assert status == 200
    await until(lambda: budget.busy == 0)
    assert _share(budget.path) == cpus
    # the fair-share runners were told where the budget is
    assert all(p.thread_budget == str(budget.path) for p in h.spawner.processes)


def test_runner_follows_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before each decode the runner applies the published share, once per change."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from llama_cpp import _internals

    from hoshikage_runner import threads as runner_threads

    decoded, applied = [], []
    monkeypatch.setattr(_internals.LlamaContext, "decode", lambda self, batch: decoded.append(batch) or 0)
    monkeypatch.setattr(llama_cpp, "llama_set_n_threads", lambda ctx, n, nb: applied.append((ctx, n, nb)))
    monkeypatch.setattr(runner_threads, "_budget", None)
    budget = ThreadBudget(tmp_path, cpus=2)
    runner_threads.install(str(budget.path))

    class Ctx:
        ctx = "ctx-pointer"

    ctx = Ctx()
    _internals.LlamaContext.decode(ctx, "batch-1")
    _internals.LlamaContext.decode(ctx, "batch-2")
    assert decoded == ["batch-1", "batch-2"] and applied == [("ctx-pointer", 2, 2)]
    budget.started()
    budget.started()
    _internals.LlamaContext.decode(ctx, "batch-3")
    assert applied[-1] == ("ctx-pointer", 1, 1) and len(applied) == 2
    budget.finished()
    _internals.LlamaContext.decode(ctx, "batch-4")
    assert applied[-1] == ("ctx-pointer", 2, 2) and len(applied) == 3
    budget.close()


@pytest.mark.model
async def test_real_spare_serves_a_cold_request(http, make_server) -> None:
    h = await make_server({"gemma": {"chat_format": "gemma"}}, server={"runner_pool": 1}, real=True)
    pool = h.scheduler.pool
    await until(lambda: len(pool.spares) == 1, timeout=30)
    spare = pool.spares[0]
    await asyncio.sleep(1.0)  # its imports are done by now
    status, body, _ = await post_json(http, f"{h.url}/v1/completions",
                                   {"model": "gemma", "prompt": "Once upon a time", "max_tokens": 3, "temperature": 0})
    assert status == 200, body
    replica = h.scheduler.slots["gemma"].replicas[0]
    assert replica.process is spare and replica.process.thread_budget == str(pool.budget.path)
    await until(lambda: len(pool.spares) == 1, timeout=30)  # the next spare, once the load is over


@pytest.mark.model
async def test_an_assigned_spare_imports_nothing_more(demo_model: Path) -> None:
    # Every module the runner needs to load and to serve is imported while it
    # waits as a spare: after "load this model" comes the load and nothing else.
    # (`python -X importtime` prints one line per module it imports.)
    lines: list[str] = []
    runner = RunnerProcess(None, command=[sys.executable, "-X", "importtime", "-m", "hoshikage_runner"],
                           output=lambda replica, pid, text, error: lines.append(text))
    await runner.spawn()
    try:
        await until(lambda: any(line.endswith("| hoshikage_runner.server") for line in lines), timeout=60)
        quiet = -1
        while quiet != len(lines):  # and then whatever warm_up imports
            quiet = len(lines)
            await asyncio.sleep(1.0)
        lines.clear()
        spec = RunnerSpec(model_name="demo", model_path=str(demo_model), n_ctx=256, n_threads=1, chat_format="gemma")
        runner.assign(spec, output=lambda replica, pid, text, error: lines.append(text))
        await runner.start(load_timeout=60)
        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        for path, body in [("/v1/completions", {"prompt": "Once", "max_tokens": 2, "stream": True}),
                           ("/v1/chat/completions", {**chat, "stream": True}),
                           ("/v1/completions", {"prompt": "Once", "max_tokens": 2}),
                           ("/v1/chat/completions", chat)]:
            async with runner.session.post(runner.base_url + path, json=body) as response:
                assert response.status == 200, await response.text()
                await response.read()
        imported = [line for line in lines if line.startswith("import time:")]
        assert not imported, imported
    finally:
        await runner.stop(grace=5)
