"""Shared fixtures for the whole test suite."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
DEFAULT_DEMO_MODEL = TESTS.parent / ".cache/models/gemma3-270m-q4_k_m.gguf"


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The demo GGUF (Gemma 3 270M Q4_K_M); HOSHIKAGE_DEMO_MODEL overrides; skips if absent."""
    path = Path(os.environ.get("HOSHIKAGE_DEMO_MODEL") or DEFAULT_DEMO_MODEL)
    if not path.is_file():
        pytest.skip(f"demo model not found at {path}")
    return path


@pytest.fixture(scope="session")
def fake_runner_command() -> list[str]:
    """Command that starts tests/fake_runner.py, for RunnerProcess(command=...)."""
    return [sys.executable, str(TESTS / "fake_runner.py")]


@pytest.fixture
async def http():
    """An aiohttp client session with a generous overall bound (against hangs)."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60.0)) as s:
        yield s


# ------------------------------------------------------------------ supervisor harness
# A whole supervisor (Server: scheduler, gateway, API layers) in the test's event
# loop, with runners spawned from tests/fake_runner.py.


class FakeSpawner:
    """A `spawn=` callable for Server/Scheduler that starts the fake runner.

    `env` applies to every runner, `model_env[name]` to the runners of one
    model (FAKE_* settings, see tests/fake_runner.py).  Every process spawned
    is kept in `processes`; `on_spawn(process)` (if set) runs for each one,
    which tests use to simulate what a runner does to a device.  Runner
    sockets go in `server.runtime_dir` (`make_server` sets `server`), and
    runner output goes to the model's log in the scheduler's registry
    (`runnerlogs.runner_logs_of`), as the scheduler's own spawn does.
    """

    def __init__(self, command: list[str], env: dict[str, str] | None = None,
                 model_env: dict[str, dict[str, str]] | None = None):
        self.command = command
        self.env = {"FAKE_TOKEN_DELAY": "0.02", **(env or {})}
        self.model_env = model_env or {}
        self.processes: list = []
        self.on_spawn = None
        self.server = None

    def __call__(self, spec, index: int):
        from hoshikage_sup.process import RunnerProcess
        from hoshikage_sup.runnerlogs import runner_logs_of

        env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_")}
        env.update(self.env)
        env.update(self.model_env.get(spec.model_name, {}))
        runtime_dir = self.server.runtime_dir if self.server is not None else None
        scheduler = self.server.scheduler if self.server is not None else None
        output = runner_logs_of(scheduler).for_model(spec.model_name).append if scheduler is not None else None
        process = RunnerProcess(spec, replica=index, command=self.command, env=env, runtime_dir=runtime_dir,
                                output=output)
        self.processes.append(process)
        if self.on_spawn is not None:
            self.on_spawn(process)
        return process

    def of(self, model: str) -> list:
        return [p for p in self.processes if p.spec.model_name == model]


class ServerHandle:
    """A started in-process supervisor: `url`, `scheduler`, `spawner`, `server`."""

    def __init__(self, server, spawner):
        self.server = server
        self.spawner = spawner
        self.url = f"http://127.0.0.1:{server.port}"

    @property
    def scheduler(self):
        return self.server.scheduler

    @property
    def gateway(self):
        from hoshikage_sup.api.common import CONTEXT

        return self.server.runner.app[CONTEXT].gateway


@pytest.fixture
async def make_server(tmp_path, demo_model, fake_runner_command):
    """Factory: `await make_server({"a": {...model table...}}, server={...}, memory={...},
    devices=..., env={...}, model_env={"a": {...}}, real=False)` -> ServerHandle.
    With `real=True` the runners are the real ones (llama_cpp.server on the
    demo model): mark such tests `@pytest.mark.model`.

    Every model's `path` defaults to the demo GGUF (the planner reads its
    metadata; the fake runner never loads it) and `n_ctx` to 256.  `devices`
    defaults to a SimulatedSource without GPUs and 64 GiB of RAM, so memory
    never limits a test that is not about memory.  Servers are shut down at
    teardown.
    """
    from hoshikage_sup.config import parse_config
    from hoshikage_sup.devices import SimulatedSource
    from hoshikage_sup.server import Server

    started: list[ServerHandle] = []

    async def make(models, *, server=None, memory=None, devices=None, env=None, model_env=None, spawner=None,
                   real=False):
        table = {
            "server": {"host": "127.0.0.1", "port": 0, **(server or {})},
            "memory": dict(memory or {}),
            "models": {name: {"path": str(demo_model), "n_ctx": 256, **m} for name, m in models.items()},
        }
        cfg = parse_config(table, base_dir=tmp_path)
        if not real:
            spawner = spawner or FakeSpawner(fake_runner_command, env=env, model_env=model_env)
        if devices is None:
            devices = SimulatedSource(system_total=64 * 2**30)
        srv = Server(cfg, devices=devices, spawn=spawner)  # spawn None (real=True): the real runner
        if isinstance(spawner, FakeSpawner):
            spawner.server = srv
        await srv.startup()
        handle = ServerHandle(srv, spawner)
        started.append(handle)
        return handle

    yield make
    for handle in reversed(started):
        await handle.server.shutdown()
