"""RunnerProcess: one child's lifecycle, against the fake runner and (marked `model`) the real one."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from hoshikage_sup.process import (
    OUTPUT_TAIL_BYTES,
    RunnerLoadError,
    RunnerProcess,
    RunnerSpec,
    describe_returncode,
)
from hoshikage_sup.threads import usable_cpus

HAS_LLAMA = importlib.util.find_spec("llama_cpp") is not None
needs_llama = pytest.mark.skipif(not HAS_LLAMA, reason="llama_cpp is not installed")

# A stand-in supervisor for the "SIGKILLed supervisor leaves no runner" tests.
SUPERVISOR_SCRIPT = """
import asyncio, json, sys
import structlog
from hoshikage_sup.process import RunnerProcess, RunnerSpec

structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout is for the pid

async def main():
    spec = RunnerSpec(**json.loads(sys.argv[1]))
    runner = RunnerProcess(spec, command=json.loads(sys.argv[2]))
    await runner.start(load_timeout=60)
    print(runner.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def fake_spec(**overrides: Any) -> RunnerSpec:
    fields: dict[str, Any] = dict(model_name="fake", model_path="/models/fake.gguf", n_ctx=256, n_threads=1)
    fields.update(overrides)
    return RunnerSpec(**fields)


def fake_env(**settings: str) -> dict[str, str]:
    """The test's environment without stray FAKE_* settings, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_")}
    env.update(settings)
    return env


class ExitRecorder:
    """An on_exit callback that remembers its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[RunnerProcess, int]] = []

    def __call__(self, runner: RunnerProcess, returncode: int) -> None:
        self.calls.append((runner, returncode))


def is_gone(pid: int) -> bool:
    """No such process, or only a zombie (holds no memory, sockets or files)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_gone(pid):
            return True
        await asyncio.sleep(0.05)
    return is_gone(pid)


# ----------------------------------------------------------------- spec


def test_settings_line_carries_spec_fd_and_secret() -> None:
    spec = fake_spec(n_threads=0, tensor_split=(0.5, 0.5), type_k=8, type_v=8, flash_attn=True)
    settings = spec.settings(7, "s" * 43, "/run/x/thread-budget")
    assert settings["fd"] == 7 and settings["secret"] == "s" * 43
    assert settings["model_alias"] == "fake" and settings["model"] == "/models/fake.gguf"
    # 0 = a fair share: start with every usable core, then follow the budget file
    assert settings["n_threads"] == settings["n_threads_batch"] == usable_cpus()
    assert settings["thread_budget"] == "/run/x/thread-budget"
    assert fake_spec(n_threads=3).settings(7, "s", "/run/x/thread-budget")["thread_budget"] is None
    assert settings["tensor_split"] == [0.5, 0.5]
    assert (settings["type_k"], settings["type_v"], settings["flash_attn"]) == (8, 8, True)
    json.dumps(settings)  # must be one JSON line


def test_describe_returncode() -> None:
    assert describe_returncode(1) == "exit status 1"
    assert describe_returncode(-9) == "killed by signal SIGKILL"
    assert describe_returncode(None) == "still running"


# ----------------------------------------------------------- fake runner


async def test_start_health_and_stop(fake_runner_command: list[str]) -> None:
    exits = ExitRecorder()
    runner = RunnerProcess(fake_spec(), on_exit=exits, command=fake_runner_command, env=fake_env())
    assert runner.state == "new"
    await runner.start(load_timeout=30)
    try:
        assert runner.state == "ready" and runner.pid and runner.socket_path
        assert runner.load_duration is not None and runner.load_duration > 0
        assert runner.started_at is not None and runner.ready_at is not None
        assert await runner.health()
        async with runner.session.get(f"{runner.base_url}/health") as response:
            body = await response.json()
        assert body == {"status": "ok", "model": "fake", "pid": runner.pid}
    finally:
        code = await runner.stop(grace=5)
    assert code == 0  # SIGTERM → clean exit
    assert runner.state == "exited" and runner.returncode == 0
    assert runner.session.closed and not os.path.exists(runner.socket_path)
    assert not os.path.exists(os.path.dirname(runner.socket_path))  # its own directory: none was given
    assert exits.calls == [(runner, 0)]
    assert not await runner.health()
    assert await runner.stop() == 0 and await runner.wait() == 0  # idempotent
    assert len(exits.calls) == 1
    assert await wait_gone(runner.pid, 2)


async def test_stop_kills_a_child_that_ignores_sigterm(fake_runner_command: list[str]) -> None:
    runner = RunnerProcess(fake_spec(), command=fake_runner_command, env=fake_env(FAKE_IGNORE_SIGTERM="1"))
    await runner.start(load_timeout=30)
    began = time.monotonic()
    stops = await asyncio.gather(runner.stop(grace=0.5), runner.stop(grace=0.5))
    assert stops == [-signal.SIGKILL, -signal.SIGKILL]
    assert time.monotonic() - began >= 0.5
    assert await wait_gone(runner.pid, 2)


async def test_load_failure_surfaces_the_error_line(fake_runner_command: list[str]) -> None:
    exits = ExitRecorder()
    env = fake_env(FAKE_LOAD_FAIL="tensor 'blk.0.attn_q.weight' has wrong shape")
    runner = RunnerProcess(fake_spec(), on_exit=exits, command=fake_runner_command, env=env)
    with pytest.raises(RunnerLoadError) as caught:
        await runner.start(load_timeout=30)
    message = str(caught.value)
    assert "tensor 'blk.0.attn_q.weight' has wrong shape" in message
    assert "error: failed to load model /models/fake.gguf" in message
    assert "exit status 1" in message and "'fake'" in message
    assert caught.value.returncode == 1 and caught.value.model == "fake"
    assert runner.state == "exited" and runner.ready_at is None
    assert exits.calls == [(runner, 1)]  # once, before start() raised
    assert "wrong shape" in runner.error_summary()


async def test_load_timeout_kills_a_silent_child(fake_runner_command: list[str]) -> None:
    exits = ExitRecorder()
    runner = RunnerProcess(fake_spec(), on_exit=exits, command=fake_runner_command, env=fake_env(FAKE_LOAD_DELAY="60"))
    began = time.monotonic()
    with pytest.raises(RunnerLoadError, match="no progress for 0.5 s"):
        await runner.start(load_timeout=0.5)
    assert time.monotonic() - began < 5
    assert runner.state == "exited" and runner.returncode == -signal.SIGKILL
    assert len(exits.calls) == 1
    assert await wait_gone(runner.pid, 2)


async def test_output_resets_the_load_timeout(fake_runner_command: list[str]) -> None:
    """Like Ollama: a load that keeps making progress is not timed out."""
    env = fake_env(FAKE_LOAD_DELAY="3.5", FAKE_LOAD_PROGRESS="0.25")
    runner = RunnerProcess(fake_spec(), command=fake_runner_command, env=env)
    await runner.start(load_timeout=2.0)  # generous: the child's imports are silent too
    try:
        assert runner.load_duration is not None and runner.load_duration >= 3.5
    finally:
        await runner.stop()


async def test_on_exit_reports_a_crash_after_ready(fake_runner_command: list[str]) -> None:
    exits = ExitRecorder()
    runner = RunnerProcess(fake_spec(), on_exit=exits, command=fake_runner_command, env=fake_env(FAKE_CRASH_AFTER="0.3"))
    await runner.start(load_timeout=30)
    code = await asyncio.wait_for(runner.wait(), 10)
    assert code == -signal.SIGABRT
    assert exits.calls == [(runner, code)]
    assert runner.state == "exited" and runner.ready_at is not None and not runner.stop_requested
    assert "GGML_ASSERT" in runner.error_summary()
    assert await runner.stop() == code  # stopping an exited runner is a no-op
    assert len(exits.calls) == 1


async def test_output_tail_is_bounded(fake_runner_command: list[str]) -> None:
    runner = RunnerProcess(fake_spec(), command=fake_runner_command, env=fake_env(FAKE_NOISE_BYTES="50000"))
    await runner.start(load_timeout=30)
    await runner.stop()
    tail = runner.output_tail()
    assert 0 < len(tail.encode()) <= OUTPUT_TAIL_BYTES
    assert "fake runner serving fake" in tail  # the newest output is what is kept
    assert "fake runner serving" not in runner.error_summary()  # routine lines explain nothing
    assert len(runner.error_summary().splitlines()) <= 10


async def test_cancelling_start_leaves_no_process(fake_runner_command: list[str]) -> None:
    exits = ExitRecorder()
    runner = RunnerProcess(fake_spec(), on_exit=exits, command=fake_runner_command, env=fake_env(FAKE_LOAD_DELAY="60"))
    task = asyncio.ensure_future(runner.start(load_timeout=120))
    while runner.pid is None:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert runner.state == "exited" and runner.returncode == -signal.SIGKILL
    assert exits.calls == [(runner, -signal.SIGKILL)]
    assert await wait_gone(runner.pid, 2)


async def test_stop_during_load_fails_start(fake_runner_command: list[str]) -> None:
    runner = RunnerProcess(fake_spec(), command=fake_runner_command, env=fake_env(FAKE_LOAD_DELAY="60"))
    task = asyncio.ensure_future(runner.start(load_timeout=120))
    while runner.pid is None:
        await asyncio.sleep(0.02)
    assert await runner.stop(grace=2) == -signal.SIGTERM  # SIGTERM's default action while loading
    with pytest.raises(RunnerLoadError, match="stopped while loading"):
        await task


async def test_spawn_failure_is_a_load_error() -> None:
    exits = ExitRecorder()
    runner = RunnerProcess(fake_spec(), on_exit=exits, command=["/nonexistent/python3"])
    with pytest.raises(RunnerLoadError, match="cannot start runner"):
        await runner.start()
    assert runner.state == "exited" and runner.pid is None
    assert exits.calls == []  # no process ever existed
    assert runner.session.closed and not os.path.exists(runner.socket_path)


async def test_fake_runner_serves_one_generation_at_a_time(fake_runner_command: list[str]) -> None:
    """The fake behaves like llama_cpp.server: serialised generations, lock-free /health."""
    runner = RunnerProcess(fake_spec(), command=fake_runner_command, env=fake_env())
    await runner.start(load_timeout=30)
    try:
        session, url = runner.session, runner.base_url
        body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                "fake": {"tokens": 20, "delay": 0.1}}
        async with session.post(url + "/v1/chat/completions", json=body) as stream:
            first = await stream.content.readline()
            assert first.startswith(b"data: ")
            assert await runner.health(timeout=1.5)
            models = asyncio.ensure_future(session.get(url + "/v1/models"))
            rest = (await stream.read()).decode()
        events = [line[6:] for line in (first.decode() + rest).splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks).startswith("Hello")
        remaining = [line for line in rest.splitlines() if '"content"' in line]
        assert len(remaining) >= 5  # /health answered while the generation was still running
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert all(c["model"] == "fake" for c in chunks)
        async with await models as response:
            assert (await response.json())["data"][0]["id"] == "fake"
        async with session.post(url + "/v1/completions", json={"prompt": "a b", "max_tokens": 3}) as response:
            result = await response.json()
        assert result["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
        assert result["choices"][0]["finish_reason"] == "length"
        assert result["model"] == "/models/fake.gguf"  # no "model" asked: the path, as llama_cpp.server does
        async with session.post(url + "/v1/embeddings", json={"input": "x"}) as response:
            assert response.status == 500  # not loaded with embedding=True
    finally:
        await runner.stop()


def _start_supervisor(spec: RunnerSpec, command: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    """Run SUPERVISOR_SCRIPT in its own process; return it and the runner pid it printed."""
    fields = {k: v for k, v in spec.__dict__.items()}
    supervisor = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR_SCRIPT, json.dumps(fields), json.dumps(command)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    assert supervisor.stdout is not None
    ready, _, _ = select.select([supervisor.stdout], [], [], 60)
    line = supervisor.stdout.readline() if ready else ""
    if not line.strip().isdigit():
        supervisor.kill()
        supervisor.wait()
        pytest.fail(f"supervisor did not report a runner pid (got {line!r})")
    return supervisor, int(line)


def _sigkill_and_expect_runner_gone(supervisor: subprocess.Popen[str], runner_pid: int, within: float) -> None:
    assert not is_gone(runner_pid)
    supervisor.send_signal(signal.SIGKILL)
    supervisor.wait(5)
    if supervisor.stdout is not None:
        supervisor.stdout.close()
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and not is_gone(runner_pid):
        time.sleep(0.05)
    if not is_gone(runner_pid):
        os.kill(runner_pid, signal.SIGKILL)
        pytest.fail(f"runner {runner_pid} outlived its SIGKILLed supervisor by {within} s")


@pytest.mark.parametrize("guard", ["pdeathsig", "stdin"])
def test_sigkilled_supervisor_leaves_no_fake_runner(fake_runner_command: list[str], guard: str) -> None:
    """Both guards work on their own: a runner that ignores SIGTERM still sees stdin close."""
    env = fake_env(FAKE_IGNORE_SIGTERM="1") if guard == "stdin" else fake_env()
    supervisor, runner_pid = _start_supervisor(fake_spec(), fake_runner_command, env)
    _sigkill_and_expect_runner_gone(supervisor, runner_pid, within=5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_runner_leaves_at_once_when_its_supervisor_is_already_gone() -> None:
    """The window between fork and prctl: a supervisor that died there is noticed."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    code = "from hoshikage_runner.lifeline import install_parent_death_signal as f; f(); print('stayed')"
    alive = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                           env={**os.environ, "HOSHIKAGE_SUPERVISOR_PID": str(os.getpid())})
    assert alive.stdout.strip() == "stayed"
    gone = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "HOSHIKAGE_SUPERVISOR_PID": str(dead.pid)})
    assert gone.returncode == 0 and gone.stdout == ""


# ----------------------------------------------------------- real runner


def real_spec(model: Path | str, **overrides: Any) -> RunnerSpec:
    # One thread: these tests check behaviour, not speed, and llama.cpp slows down
    # badly when its threads outnumber the free cores (a busy CI machine).
    fields: dict[str, Any] = dict(model_name="demo", model_path=str(model), n_ctx=512, n_threads=1, chat_format="gemma")
    fields.update(overrides)
    return RunnerSpec(**fields)


@needs_llama
async def test_real_runner_reports_a_missing_model(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model.gguf"
    # CONFIG_FILE would make create_app() ignore our settings; the runner scrubs it.
    env = {**os.environ, "CONFIG_FILE": str(tmp_path / "no-such-config.json")}
    runner = RunnerProcess(real_spec(missing), env=env)
    with pytest.raises(RunnerLoadError) as caught:
        await runner.start(load_timeout=60)
    message = str(caught.value)
    assert "error: failed to load model" in message
    assert "Model path does not exist" in message and str(missing) in message
    assert caught.value.returncode == 1


@needs_llama
async def test_real_runner_reports_invalid_settings(tmp_path: Path) -> None:
    runner = RunnerProcess(real_spec(tmp_path / "x.gguf", n_batch=0))
    with pytest.raises(RunnerLoadError, match=r"error: invalid runner settings: n_batch"):
        await runner.start(load_timeout=60)


@pytest.mark.model
async def test_real_runner_health_answers_during_a_stream(demo_model: Path) -> None:
    """/health skips the model lock, and other requests do not cut a stream short."""
    runner = RunnerProcess(real_spec(demo_model))
    await runner.start(load_timeout=120)
    try:
        session, url = runner.session, runner.base_url
        body = {"prompt": "Once upon a time", "max_tokens": 24, "stream": True, "temperature": 0}
        async with session.post(url + "/v1/completions", json=body) as stream:
            first = await stream.content.readline()
            assert first.startswith(b"data: ")
            assert await runner.health(timeout=5.0)
            # /v1/models waits behind the generation; with llama_cpp.server's default
            # interrupt_requests=True it would also end the stream at the next token.
            models = asyncio.ensure_future(session.get(url + "/v1/models"))
            await asyncio.sleep(0.1)
            rest = (await stream.read()).decode()
        events = [line[6:] for line in rest.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        # Most of the generation was still to come when /health answered.
        assert sum(1 for c in chunks if c["choices"][0]["text"]) >= 10
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")  # not interrupted
        async with await models as response:
            assert (await response.json())["data"][0]["id"] == "demo"
    finally:
        await runner.stop()
    assert runner.returncode == 0


@pytest.mark.model
def test_sigkilled_supervisor_leaves_no_real_runner(demo_model: Path) -> None:
    supervisor, runner_pid = _start_supervisor(real_spec(demo_model), [sys.executable, "-m", "hoshikage_runner"], dict(os.environ))
    _sigkill_and_expect_runner_gone(supervisor, runner_pid, within=5)
