"""End to end: `hoshikage serve` as a real process, the real demo model, the official `openai` client.

Each server's output (JSON log lines: stdout is a file) goes to a file in
the test's tmp dir; the part written during a test is printed at its
teardown, which pytest shows only when the test fails.  The scheduler's
decisions are read back from those log lines (`loaded`, `evicting`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest

pytestmark = pytest.mark.model

REQUEST_TIMEOUT = 120.0  # a bound against hangs on a busy 2-core machine, not a performance claim
# One thread per runner: on a small shared machine, runners whose thread pools
# compete for the same cores slow each other down by orders of magnitude.
SMALL = {"n_ctx": 512, "n_threads": 1}


# ------------------------------------------------------------------ the server process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def write_config(path: Path, tables: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for table, keys in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in keys.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


class ServeProcess:
    """`python -m hoshikage_sup serve` with its output in a file."""

    def __init__(self, tmp: Path, tables: dict[str, dict[str, Any]]):
        self.config = write_config(tmp / "hoshikage.toml", tables)
        self.log_path = tmp / "serve.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.shown = 0
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HOSHIKAGE_", "FAKE_"))}
        env["PYTHONUNBUFFERED"] = "1"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hoshikage_sup", "serve", "--config", str(self.config), "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )

    def wait_healthy(self, timeout: float = 60.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"hoshikage serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if json.load(r).get("status") == "ok":
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"hoshikage serve did not answer /health within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def new_output(self) -> str:
        """What was written since the last call."""
        text = self.output()
        out, self.shown = text[self.shown:], len(text)
        return out

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

    def runner_pid(self, model: str) -> int:
        """pid of the runner most recently loaded for `model`."""
        loaded = [e for e in self.events("loaded") if e.get("model") == model]
        assert loaded, f"no 'loaded' log line for {model}"
        return int(loaded[-1]["pid"])

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="x", timeout=REQUEST_TIMEOUT, max_retries=0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def demo_gguf(demo_model) -> Path:
    """The demo GGUF (conftest's `demo_model` skips when it is absent)."""
    return demo_model


@pytest.fixture(scope="module")
def served(demo_gguf, tmp_path_factory):
    """One server for the API tests: `gemma` (chat) and `gemma-embed` (embeddings)."""
    srv = ServeProcess(
        tmp_path_factory.mktemp("serve"),
        {
            "server": {"host": "127.0.0.1", "keep_alive": "5m"},
            "models.gemma": {"path": str(demo_gguf), "chat_format": "gemma", "aliases": ["gemma3:270m"], **SMALL},
            "models.gemma-embed": {"path": str(demo_gguf), "embedding": True, **SMALL},
        },
    )
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def server_log(served):
    """Print what the server logged during the test (pytest shows it on failure)."""
    served.new_output()
    yield served
    print(f"---- hoshikage serve output ({served.log_path}) ----")
    print(served.new_output())


MESSAGES = [{"role": "user", "content": "Name three stars."}]


# ------------------------------------------------------------------ the OpenAI API


def test_models_list_names_and_aliases(server_log):
    ids = sorted(m.id for m in server_log.client().models.list().data)
    assert ids == ["gemma", "gemma-embed", "gemma3:270m"]


def test_chat_non_streaming_by_name_and_alias(server_log):
    client = server_log.client()
    for name in ("gemma", "gemma3:270m"):
        reply = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=8, temperature=0)
        assert reply.model == "gemma"
        assert reply.choices[0].message.role == "assistant"
        assert reply.choices[0].message.content
        assert reply.usage.completion_tokens >= 1
    # One runner served both names.
    assert len([e for e in server_log.events("loaded") if e["model"] == "gemma"]) == 1


def test_chat_streaming(server_log):
    stream = server_log.client().chat.completions.create(
        model="gemma", messages=MESSAGES, max_tokens=12, temperature=0, stream=True
    )
    chunks = list(stream)
    assert len(chunks) >= 3
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completions(server_log):
    reply = server_log.client().completions.create(model="gemma", prompt="The brightest star is", max_tokens=8,
                                                   temperature=0)
    assert reply.model == "gemma"
    assert reply.choices[0].text


def test_embeddings(server_log):
    result = server_log.client().embeddings.create(model="gemma-embed", input=["a star", "a planet"])
    assert [d.index for d in result.data] == [0, 1]
    vector = result.data[0].embedding
    assert len(vector) == 640 and all(isinstance(x, float) for x in vector)  # Gemma 3 270M: n_embd 640
    assert result.data[0].embedding != result.data[1].embedding


def test_embeddings_are_one_vector_of_floats_per_input(server_log):
    # The demo GGUF declares no pooling: the runner is started with mean pooling.
    result = server_log.client().embeddings.create(model="gemma-embed", input="a star")
    vector = result.data[0].embedding
    assert len(vector) > 0 and all(isinstance(x, float) for x in vector)


def test_bad_requests_are_400s_naming_the_field(server_log):
    # llama_cpp.server itself answers these with a 500; the runner classifies them.
    client = server_log.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gemma", messages=MESSAGES, max_tokens="many")  # type: ignore[arg-type]
    assert e.value.status_code == 400
    assert e.value.body["param"] == "max_tokens" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="gemma", prompt="Hi", max_tokens=2, logprobs=2)
    assert "logprobs" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="gemma", prompt="word " * 3000, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    # The runner is unharmed.
    assert client.completions.create(model="gemma", prompt="Hi", max_tokens=2).choices[0].text is not None


def test_unknown_model_is_not_found(server_log):
    with pytest.raises(openai.NotFoundError) as e:
        server_log.client().chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=2)
    assert "no-such-model" in str(e.value)


def test_keep_alive_zero_unloads_after_the_request(server_log):
    client = server_log.client()
    client.chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=2)
    pid = server_log.runner_pid("gemma")
    assert not gone(pid)
    client.chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=2, extra_body={"keep_alive": 0})
    wait_for(lambda: gone(pid), 30, "the runner to unload after keep_alive 0")
    # The next request loads it again.
    reply = client.chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=2)
    assert reply.choices[0].message.content is not None
    assert server_log.runner_pid("gemma") != pid


# ------------------------------------------------------------------ supervisor death


def test_sigkilled_supervisor_leaves_no_runner(demo_gguf, tmp_path):
    srv = ServeProcess(tmp_path, {
        "server": {"host": "127.0.0.1"},
        "models.gemma": {"path": str(demo_gguf), "chat_format": "gemma", **SMALL},
    })
    children: list[psutil.Process] = []
    try:
        srv.wait_healthy()
        srv.client().chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=2)
        children = psutil.Process(srv.proc.pid).children(recursive=True)
        runner = srv.runner_pid("gemma")
        assert runner in [c.pid for c in children]
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(10)
        wait_for(lambda: all(gone(c.pid) for c in children), 5, "the runner to exit after its supervisor died")
    except BaseException:
        print(srv.output())
        raise
    finally:
        srv.stop()
        for c in children:  # never leave a runner behind a failed test
            if not gone(c.pid):
                c.kill()


# ------------------------------------------------------------------ memory limit on the CPU


def measure_runner(demo_gguf: Path, n_ctx: int, n_batch: int, requests: int) -> Any:
    """Start one real runner as the supervisor would, send it `requests` chat
    requests like the test's, and return its memory as the planner measures it."""
    import asyncio

    from hoshikage_sup.devices import CpuSource
    from hoshikage_sup.process import RunnerProcess, RunnerSpec

    async def run():
        spec = RunnerSpec(model_name="calibrate", model_path=str(demo_gguf), n_ctx=n_ctx,
                          n_threads=SMALL["n_threads"], n_batch=n_batch, chat_format="gemma")
        proc = RunnerProcess(spec)
        await proc.start(load_timeout=120)
        try:
            for _ in range(requests):
                body = {"model": "x", "messages": MESSAGES, "max_tokens": 4, "temperature": 0}
                async with proc.session.post(proc.base_url + "/v1/chat/completions", json=body) as r:
                    assert r.status == 200, await r.text()
            return CpuSource().process_memory(proc.pid)
        finally:
            await proc.stop()

    return asyncio.run(run())


def test_memory_limit_evicts_by_the_rules_and_refuses_what_never_fits(demo_gguf, tmp_path):
    from hoshikage_sup.config import parse_config
    from hoshikage_sup.devices import CpuSource
    from hoshikage_sup.durations import format_size
    from hoshikage_sup.memory import RunnerFootprint, usage
    from hoshikage_sup.planner import MemoryPlanner
    from hoshikage_sup.scheduler import RunnerOptions

    # Three names on one GGUF with different n_ctx.  With n_batch 256 all three
    # round up to the same 512 KV cells, so the planner gives them the same
    # estimate and one limit can fit exactly two of any three.
    n_batch = 256
    sessions = {"ctx-300": (300, "10m"), "ctx-400": (400, "20m"), "ctx-512": (512, "30m")}
    models = {
        f"models.{name}": {"path": str(demo_gguf), "chat_format": "gemma", "n_ctx": n_ctx, "n_batch": n_batch,
                           "n_threads": SMALL["n_threads"], "keep_alive": keep}
        for name, (n_ctx, keep) in sessions.items()
    }
    models["models.huge"] = {"path": str(demo_gguf), "n_ctx": 32768}

    # The planner counts a candidate by its estimate and a running runner by
    # what it measures (RSS, its file-backed part shared between runners of one
    # GGUF).  Measure a runner like the ones the test will run, then put the
    # limit halfway between "two running + one more" and "one running + one more".
    cfg = parse_config({"models": {k.split(".", 1)[1]: v for k, v in models.items()}}, base_dir=tmp_path)
    planner = MemoryPlanner(cfg, CpuSource())
    plans = [planner.plan(cfg.models[n], RunnerOptions.for_model(cfg.models[n]), []) for n in sessions]
    assert len({p.cpu_bytes for p in plans}) == 1, [p.cpu_bytes for p in plans]
    plan = plans[0]
    candidate = RunnerFootprint(plan.weights_key, plan.weights_cpu, plan.cpu_bytes)
    running = RunnerFootprint.measured(plan.weights_key, measure_runner(demo_gguf, 512, n_batch, requests=3))
    one_more = usage([running, candidate]).cpu_bytes
    two_more = usage([running, running, candidate]).cpu_bytes
    limit = (one_more + two_more) // 2
    print(f"calibration: runner rss {running.cpu_bytes} (shared {running.weights_cpu}), estimate {plan.cpu_bytes}, "
          f"one running + one more {one_more}, two running + one more {two_more}, limit {limit}")
    assert two_more - one_more >= 32 * 2**20, "a runner's private memory is too small to tell one from two"
    huge = planner.plan(cfg.models["huge"], RunnerOptions.for_model(cfg.models["huge"]), [])
    assert huge.cpu_bytes > limit

    srv = ServeProcess(tmp_path, {
        "server": {"host": "127.0.0.1", "max_loaded_models": 3},
        "memory": {"limit": limit, "system_reserve": 0},
        **models,
    })
    try:
        srv.wait_healthy()
        client = srv.client()
        order = ["ctx-300", "ctx-400", "ctx-512", "ctx-300", "ctx-400", "ctx-512"]
        for name in order:
            reply = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=4, temperature=0)
            assert reply.model == name and reply.choices[0].message.content is not None
        evictions = [(e["victim"], e["for_model"]) for e in srv.events("evicting")]
        # All idle (requests one at a time): the shortest session goes first.
        assert evictions == [
            ("ctx-300", "ctx-512"),  # 300 (10m) before 400 (20m)
            ("ctx-400", "ctx-300"),  # 400 (20m) before 512 (30m)
            ("ctx-300", "ctx-400"),  # 300 (10m) before 512 (30m)
        ], evictions
        loads = [e["model"] for e in srv.events("loaded")]
        assert loads == ["ctx-300", "ctx-400", "ctx-512", "ctx-300", "ctx-400"], loads

        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="huge", messages=MESSAGES, max_tokens=2)
        assert e.value.status_code == 507
        message = e.value.body["message"] if isinstance(e.value.body, dict) else str(e.value)
        assert format_size(huge.cpu_bytes) in message and format_size(limit) in message, message
        # Refusing it evicted nothing.
        assert len(srv.events("evicting")) == 3
    except BaseException:
        print(srv.output())
        raise
    finally:
        srv.stop()
