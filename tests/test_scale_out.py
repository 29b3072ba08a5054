"""Several supervisors behind LiteLLM, and one model across boxes (docs/scale-out.md).

The LiteLLM tests run the real thing: two supervisors on loopback, each a
process of its own (`python tests/test_scale_out.py CONFIG` starts one with
the fake runners, so one can be SIGKILLed; the demo-model test uses
`hoshikage serve`), the config `hoshikage export litellm` writes from their
APIs, and LiteLLM's proxy (the pinned PyPI package in `.venv-litellm`, made by
scripts/setup) started on that file.  Which box served a request is read from
LiteLLM's `x-litellm-model-id` header (the deployment ids the export writes)
and checked against each supervisor's own count.

`rpc_servers` is checked where it goes: the config, the runner's settings,
the memory plan (layers on RPC hosts are not this box's memory) and the
runner itself, which on this build of llama-cpp-python (no RPC) must refuse
to load with an error that says so and how to rebuild.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
LITELLM = ROOT / ".venv-litellm" / "bin" / "litellm"
START_DEADLINE = 90.0  # LiteLLM's proxy takes ~15 s to start on two shared cores
KEY = "scale-out-test-key"


# ------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, port: int, models: dict[str, dict[str, Any]], *, keys: bool = True,
                 model_path: Path | None = None) -> Path:
    """A supervisor's TOML: every model's `path` defaults to `model_path`, `n_ctx` to 256."""
    lines = ["[server]", 'host = "127.0.0.1"', f"port = {port}", "runner_pool = 0"]
    if keys:
        lines.append(f'api_keys = ["{KEY}"]')
    for name, table in models.items():
        lines.append(f'[models."{name}"]')
        for k, v in {"path": str(model_path), "n_ctx": 256, **table}.items():
            lines.append(f"{k} = {json.dumps(v)}")
    path.write_text("\n".join(lines) + "\n")
    return path


class Proc:
    """A child process whose output goes to a file (read back when a test fails)."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None):
        self.log = log
        self._out = open(log, "wb")
        self.popen = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env={**os.environ, **(env or {})}, cwd=ROOT, start_new_session=True)

    def tail(self, n: int = 4000) -> str:
        return self.log.read_bytes()[-n:].decode("utf-8", "replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._out.close()


async def wait_http(http, url: str, proc: Proc, deadline: float = START_DEADLINE) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.popen.poll() is not None:
            raise AssertionError(f"{proc.popen.args[:3]} exited with {proc.popen.returncode}:\n{proc.tail()}")
        with contextlib.suppress(Exception):
            async with http.get(url) as r:
                if r.status == 200:
                    return
        await asyncio.sleep(0.25)
    raise AssertionError(f"{url} did not answer within {deadline} s:\n{proc.tail()}")


async def start_supervisor(http, tmp: Path, name: str, models: dict[str, dict[str, Any]], *, model_path: Path,
                           real: bool = False, keys: bool = True) -> tuple[Proc, str]:
    port = free_port()
    config = write_config(tmp / f"{name}.toml", port, models, keys=keys, model_path=model_path)
    if real:
        argv = [sys.executable, "-m", "hoshikage_sup", "serve", "--config", str(config)]
    else:
        argv = [sys.executable, str(Path(__file__).resolve()), str(config)]
    proc = Proc(argv, tmp / f"{name}.log", env={"HOSHIKAGE_API_KEYS": ""})
    url = f"http://127.0.0.1:{port}"
    await wait_http(http, url + "/health", proc)
    return proc, url


def export(tmp: Path, urls: list[str], *extra: str) -> Path:
    """`hoshikage export litellm` as an operator runs it; the file it writes is what LiteLLM gets."""
    out = tmp / "litellm.yaml"
    argv = [sys.executable, "-m", "hoshikage_sup", "export", "litellm", *[a for u in urls for a in ("--url", u)],
            *extra, "-o", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={k: v for k, v in os.environ.items() if not k.startswith("HOSHIKAGE_")})
    assert done.returncode == 0, done.stderr
    return out


async def start_litellm(http, tmp: Path, config: Path, *, key: str | None = KEY) -> tuple[Proc, str]:
    if not LITELLM.exists():
        pytest.skip(f"LiteLLM's proxy is not installed at {LITELLM.relative_to(ROOT)}: run scripts/setup")
    port = free_port()
    env = {
        # The supervisor closes idle connections after idle_timeout (30 s); LiteLLM
        # must let go of its idle ones first (its default is 120 s), or it reuses a
        # connection at the moment the supervisor closes it (docs/scale-out.md).
        "AIOHTTP_KEEPALIVE_TIMEOUT": "20",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch from the internet at start
        "LITELLM_LOG": "ERROR",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    if key:
        env["HOSHIKAGE_API_KEY"] = key
    proc = Proc([str(LITELLM), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
                tmp / "litellm.log", env=env)
    url = f"http://127.0.0.1:{port}"
    await wait_http(http, url + "/health/liveliness", proc)
    return proc, url


def chat_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}


async def through(http, litellm: str, model: str, **extra: Any) -> tuple[int, str | None, int, Any]:
    """One chat request through LiteLLM: (status, deployment id, LiteLLM's retries, body)."""
    async with http.post(litellm + "/v1/chat/completions", json=chat_body(model, **extra)) as r:
        raw = await r.read()
        with contextlib.suppress(ValueError):
            raw = json.loads(raw)
        return (r.status, r.headers.get("x-litellm-model-id"),
                int(r.headers.get("x-litellm-attempted-retries") or 0), raw)


async def served(http, url: str, model: str) -> int:
    """Requests the supervisor at `url` served for `model` (its admin API's count)."""
    async with http.get(url + "/admin/models", headers={"Authorization": f"Bearer {KEY}"}) as r:
        models = (await r.json())["models"]
    m = next(m for m in models if m["name"] == model)
    return sum(r["served"] for r in m["replicas"])


def deployment(url: str, model: str) -> str:
    from hoshikage_sup.export import deployment_id

    return deployment_id(url, model)


@pytest.fixture
async def procs():
    started: list[Proc] = []
    yield started
    for p in reversed(started):
        p.stop()


# ------------------------------------------------------------------ LiteLLM in front of two supervisors


async def test_litellm_routes_spreads_and_survives_a_killed_box(http, procs, tmp_path, capsys, demo_model):
    a, url_a = await start_supervisor(http, tmp_path, "a", {"shared": {}, "only-a": {}}, model_path=demo_model)
    procs.append(a)
    b, url_b = await start_supervisor(http, tmp_path, "b", {"shared": {}, "only-b": {"aliases": ["b-alias"]}},
                                      model_path=demo_model)
    procs.append(b)
    config = export(tmp_path, [url_a, url_b], "--api-key", KEY)
    text = config.read_text()
    assert KEY not in text and "os.environ/HOSHIKAGE_API_KEY" in text  # the key never lands in the file
    lite, url = await start_litellm(http, tmp_path, config)
    procs.append(lite)

    # A model only one box has reaches that box, under its name and its alias.
    for model, box in (("only-a", url_a), ("only-b", url_b), ("b-alias", url_b)):
        for _ in range(3):
            status, dep, _, body = await through(http, url, model)
            assert status == 200, body
            assert dep == deployment(box, "only-b" if model == "b-alias" else model)
    assert await served(http, url_a, "only-a") == 3 and await served(http, url_b, "only-b") == 6

    # A model both have is spread over both (neither was warm at export: no order).
    n = 24
    results = await asyncio.gather(*(through(http, url, "shared") for _ in range(n)))
    assert all(r[0] == 200 for r in results), [r for r in results if r[0] != 200]
    per_box = Counter(r[1] for r in results)
    counted = {box: await served(http, box, "shared") for box in (url_a, url_b)}
    assert counted == {url_a: per_box[deployment(url_a, "shared")], url_b: per_box[deployment(url_b, "shared")]}
    assert all(c > 0 for c in counted.values()), counted

    # LiteLLM's health check (a cheap completion per deployment) passes on every node.
    async with http.get(url + "/health", timeout=60) as r:
        health = await r.json()
    assert health["unhealthy_count"] == 0 and health["healthy_count"] == 4, health

    # SIGKILL one supervisor: requests keep succeeding through the other.
    a.kill()
    killed = time.monotonic()
    log: list[tuple[float, int, str | None, int]] = []
    rate, seconds = 5.0, 6.0

    async def one() -> None:
        sent = time.monotonic() - killed
        status, dep, retries, _ = await through(http, url, "shared")
        log.append((sent, status, dep, retries))

    tasks = []
    while time.monotonic() - killed < seconds:
        tasks.append(asyncio.ensure_future(one()))
        await asyncio.sleep(1 / rate)
    await asyncio.gather(*tasks)
    failed = [e for e in log if e[1] != 200]
    to_dead = [e for e in log if e[3] > 0]  # tried the dead box first, then retried on the other
    stopped_after = max((e[0] for e in to_dead), default=0.0)
    with capsys.disabled():
        print(f"\nscale-out: before the kill {n} requests for 'shared': {counted[url_a]} on a, {counted[url_b]} on b; "
              f"after the kill {len(log)} sent, {len(failed)} failed, {len(to_dead)} tried the dead box first, "
              f"the last {stopped_after:.2f} s after the kill; served by "
              f"{dict(Counter(e[2] for e in log))}")
    assert not failed, failed
    assert all(e[2] == deployment(url_b, "shared") for e in log)
    assert stopped_after < 5.0, log
    assert a.popen.wait(5) == -signal.SIGKILL


@pytest.mark.model
async def test_litellm_in_front_of_two_supervisors_with_the_demo_model(http, procs, tmp_path, demo_model):
    """The real runners, through LiteLLM's Ollama provider: a chat answered by the
    demo model, embeddings, and LiteLLM's health check against both nodes."""
    models = {
        "gemma": {"path": str(demo_model), "n_ctx": 512, "aliases": ["gemma3:270m"]},
        "gemma-embed": {"path": str(demo_model), "n_ctx": 256, "embedding": True},
    }
    a, url_a = await start_supervisor(http, tmp_path, "a", models, model_path=demo_model, real=True, keys=False)
    procs.append(a)
    b, url_b = await start_supervisor(http, tmp_path, "b", {"gemma": models["gemma"]}, model_path=demo_model,
                                      real=True, keys=False)
    procs.append(b)
    config = export(tmp_path, [url_a, url_b], "--provider", "ollama")
    text = config.read_text()
    assert '"ollama_chat/gemma"' in text and '"ollama/gemma-embed"' in text and '"embedding"' in text
    lite, url = await start_litellm(http, tmp_path, config, key=None)
    procs.append(lite)

    seen = Counter()
    for _ in range(6):
        status, dep, _, body = await through(http, url, "gemma3:270m", max_tokens=8,
                                             messages=[{"role": "user", "content": "Name three stars."}])
        assert status == 200, body
        assert body["object"] == "chat.completion" and isinstance(body["choices"][0]["message"]["content"], str), body
        assert body["usage"]["prompt_tokens"] > 0, body  # the demo model's own tokenizer counted the prompt
        seen[dep] += 1
    assert set(seen) <= {deployment(url_a, "gemma"), deployment(url_b, "gemma")}
    async with http.post(url + "/v1/embeddings", json={"model": "gemma-embed", "input": ["a star", "a planet"]}) as r:
        body = await r.json()
        assert r.status == 200, body
        assert len(body["data"]) == 2 and len(body["data"][0]["embedding"]) > 100
    async with http.get(url + "/health", timeout=120) as r:
        health = await r.json()
    assert health["unhealthy_count"] == 0 and health["healthy_count"] == 3, health


# ------------------------------------------------------------------ the export, without LiteLLM


def _yaml(text: str) -> Any:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(text)


def test_export_writes_one_deployment_per_box_and_model():
    from hoshikage_sup.export import Node, ModelFacts, litellm_config

    nodes = [
        Node("http://10.0.0.1:11434", (ModelFacts("llama", ("llama3",), context_length=8192, warm=True),
                                       ModelFacts("embed", embedding=True, context_length=512)), version="0.1.0",
             needs_key=True),
        Node("http://10.0.0.2:11434/", (ModelFacts("llama", ("llama3",), context_length=4096),), needs_key=True),
    ]
    config = _yaml(litellm_config(nodes))
    deployments = {(d["model_name"], d["litellm_params"]["api_base"]): d for d in config["model_list"]}
    assert set(deployments) == {("embed", "http://10.0.0.1:11434/v1"), ("llama", "http://10.0.0.1:11434/v1"),
                                ("llama", "http://10.0.0.2:11434/v1")}
    warm = deployments[("llama", "http://10.0.0.1:11434/v1")]
    assert warm["litellm_params"] == {"model": "openai/llama", "api_base": "http://10.0.0.1:11434/v1",
                                      "api_key": "os.environ/HOSHIKAGE_API_KEY", "order": 1}
    assert warm["model_info"]["mode"] == "chat" and warm["model_info"]["max_input_tokens"] == 8192
    assert deployments[("llama", "http://10.0.0.2:11434/v1")]["litellm_params"]["order"] == 2
    embed = deployments[("embed", "http://10.0.0.1:11434/v1")]
    assert embed["model_info"]["mode"] == "embedding" and "order" not in embed["litellm_params"]
    assert config["router_settings"]["model_group_alias"] == {"llama3": "llama"}
    assert len({d["model_info"]["id"] for d in config["model_list"]}) == 3

    # No order when every box (or none) has it warm, or when asked not to prefer warm boxes.
    spread = _yaml(litellm_config(nodes, prefer_warm=False))
    assert all("order" not in d["litellm_params"] for d in spread["model_list"])
    ollama = _yaml(litellm_config(nodes, provider="ollama", key_env="NODE_KEY"))
    models = {d["litellm_params"]["model"] for d in ollama["model_list"]}
    assert models == {"ollama_chat/llama", "ollama/embed"}
    assert {d["litellm_params"]["api_base"] for d in ollama["model_list"]} == {"http://10.0.0.1:11434", "http://10.0.0.2:11434"}
    assert {d["litellm_params"]["api_key"] for d in ollama["model_list"]} == {"os.environ/NODE_KEY"}


def test_export_refuses_names_that_mean_different_models_on_different_boxes():
    from hoshikage_sup.export import ExportError, ModelFacts, Node, litellm_config

    a = Node("http://a:1", (ModelFacts("m1", ("fast",)),))
    b = Node("http://b:1", (ModelFacts("m2", ("fast",)),))
    with pytest.raises(ExportError, match="alias 'fast' names model 'm1' at http://a:1 but model 'm2' at http://b:1"):
        litellm_config([a, b])
    c = Node("http://c:1", (ModelFacts("fast"),))
    with pytest.raises(ExportError, match="'fast' is a model at http://c:1 but an alias of 'm1' at http://a:1"):
        litellm_config([c, a])
    with pytest.raises(ExportError, match="given twice"):
        litellm_config([a, a])


def test_export_reads_context_and_warmth_from_the_apis_answers():
    from hoshikage_sup.export import context_from_show, node_from_answers

    assert context_from_show({"parameters": "num_ctx                        2048\nstop \"x\""}) == 2048
    assert context_from_show({"parameters": "num_ctx 0", "model_info": {"gemma3.context_length": 32768}}) == 32768
    assert context_from_show({}) is None
    admin = [
        {"name": "a", "aliases": ["a1"], "configured": True, "loaded": True, "state": "idle", "embedding": False},
        {"name": "b", "aliases": [], "configured": True, "loaded": True, "state": "draining", "pinned": False},
        {"name": "c", "aliases": [], "configured": True, "loaded": False, "state": "unloaded", "preload": True},
        {"name": "gone", "aliases": [], "configured": False, "loaded": True, "state": "draining"},
    ]
    node = node_from_answers("http://h:1/", admin_models=admin, served=["a", "a1", "b", "c"],
                             shows={"a": {"parameters": "num_ctx 512"}})
    assert node.url == "http://h:1"
    assert [(m.name, m.aliases, m.warm, m.context_length) for m in node.models] == [
        ("a", ("a1",), True, 512), ("b", (), False, None), ("c", (), True, None)]


async def test_export_command_line_errors_name_the_url(capsys):
    from hoshikage_sup.cli import main

    assert main(["export", "litellm", "--url", "ftp://x"]) == 2
    assert "invalid --url 'ftp://x'" in capsys.readouterr().err
    port = free_port()
    assert main(["export", "litellm", "--url", f"http://127.0.0.1:{port}"]) == 1
    assert f"no daemon at http://127.0.0.1:{port}: connection refused" in capsys.readouterr().err


async def test_export_against_a_daemon_that_wants_a_key(make_server, capsys, tmp_path):
    from hoshikage_sup.cli import main

    h = await make_server({"m": {"aliases": ["m:latest"]}}, server={"api_keys": [KEY]})
    code = await asyncio.to_thread(main, ["export", "litellm", "--url", h.url])
    assert code == 1 and f"{h.url}: missing API key" in capsys.readouterr().err
    out = tmp_path / "out.yaml"
    code = await asyncio.to_thread(main, ["export", "litellm", "--url", h.url, "--api-key", KEY, "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    config = _yaml(out.read_text())
    assert [d["model_name"] for d in config["model_list"]] == ["m"]
    assert config["model_list"][0]["model_info"]["max_input_tokens"] == 256
    assert config["router_settings"]["model_group_alias"] == {"m:latest": "m"}


# ------------------------------------------------------------------ what a router needs from a node


async def test_a_draining_node_answers_503_with_retry_after(make_server, http):
    """A router must back off from a node that cannot take requests now, not
    count it as broken: 503 with Retry-After and a JSON body, on both APIs."""
    h = await make_server({"m": {}})
    h.server.draining = True
    try:
        async with http.post(h.url + "/v1/chat/completions", json=chat_body("m")) as r:
            body = await r.json()
            assert r.status == 503 and int(r.headers["Retry-After"]) >= 1
            assert body["error"]["code"] == "shutting_down"
        async with http.post(h.url + "/api/chat", json={"model": "m", "messages": []}) as r:
            assert r.status == 503 and int(r.headers["Retry-After"]) >= 1 and "error" in await r.json()
    finally:
        h.server.draining = False


# ------------------------------------------------------------------ rpc_servers: one model across boxes


def test_rpc_servers_config_is_validated(tmp_path, demo_model):
    from hoshikage_sup.config import ConfigError, parse_config

    def model(value: Any):
        return parse_config({"models": {"big": {"path": str(demo_model), "rpc_servers": value}}}).models["big"]

    assert model(["10.0.0.2:50052", "gpu-b.lan:50052", "[fd00::2]:50052"]).rpc_servers == (
        "10.0.0.2:50052", "gpu-b.lan:50052", "[fd00::2]:50052")
    for bad, says in (
        ("10.0.0.2:50052", "expected a non-empty list"),
        ([], "expected a non-empty list"),
        (["10.0.0.2"], 'expected "host:port"'),
        (["10.0.0.2:0"], "port 1-65535"),
        (["10.0.0.2:x"], 'expected "host:port"'),
        (["a,b:1"], 'expected "host:port"'),
        (["h:1", "h:1"], "listed twice"),
        ([f"h{i}:1" for i in range(17)], "at most 16"),
    ):
        with pytest.raises(ConfigError) as e:
            model(bad)
        assert e.value.problems[0].startswith("<config>: models.big.rpc_servers: ") and says in e.value.problems[0], (bad, e.value.problems)


def test_rpc_servers_reach_the_runner_settings_and_leave_this_box_memory(demo_model):
    from hoshikage_sup.config import parse_config
    from hoshikage_sup.devices import SimulatedSource
    from hoshikage_sup.planner import MemoryPlanner
    from hoshikage_sup.pool import runner_spec
    from hoshikage_sup.scheduler import RunnerOptions

    hosts = ["10.0.0.2:50052", "10.0.0.3:50052"]
    cfg = parse_config({"models": {
        "split": {"path": str(demo_model), "n_ctx": 2048, "rpc_servers": hosts},
        "local": {"path": str(demo_model), "n_ctx": 2048},
    }})
    planner = MemoryPlanner(cfg, SimulatedSource([(8 * 2**30, 8 * 2**30)], system_total=64 * 2**30))
    plans = {}
    for name, model in cfg.models.items():
        options = RunnerOptions.for_model(model)
        plans[name] = plan = planner.plan(model, options, [])
        settings = runner_spec(model, options, plan).settings(fd=3, secret="s" * 20)
        plans[name + "/settings"] = settings
    split, local = plans["split"], plans["local"]
    # The runner is told the servers and a split that puts every offloaded layer on them.
    assert plans["split/settings"]["rpc_servers"] == "10.0.0.2:50052,10.0.0.3:50052"
    assert plans["split/settings"]["n_gpu_layers"] == -1 and plans["split/settings"]["tensor_split"] == [0.5, 0.5]
    assert plans["local/settings"]["rpc_servers"] is None
    # Nothing of it on this box's GPU; the layers' weights, KV cache and compute are the hosts'.
    assert split.gpu_bytes == {} and local.gpu_bytes  # "auto" puts the local model on the GPU
    remote = split.detail["rpc_bytes"]
    assert list(remote) == hosts and all(b > 0 for b in remote.values())
    cpu_only = planner.plan(cfg.models["local"], RunnerOptions.for_model(cfg.models["local"], {"n_gpu_layers": 0}), [])
    est = split.detail["estimate"]
    offloaded = est.weights_total - est.weights_cpu  # the layers' weights, on the hosts
    assert offloaded > 0 and split.cpu_bytes <= cpu_only.cpu_bytes - offloaded
    # What fits is judged on this box's memory alone.
    assert planner.fits_alone(split).needed == split.cpu_bytes


def _run_runner_code(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_runner_refuses_an_unreachable_rpc_server_with_a_clear_error():
    port = free_port()
    done = _run_runner_code(f"from hoshikage_runner import rpc; rpc.check_reachable(['127.0.0.1:{port}'])")
    assert done.returncode == 1
    assert f"error: cannot reach RPC server 127.0.0.1:{port}: Connection refused" in done.stderr


def test_runner_registers_each_rpc_server_as_llama_cpp_does():
    import ctypes

    from hoshikage_runner import rpc

    calls: list[Any] = []
    add_server = rpc.ADD_SERVER(lambda endpoint: calls.append(("add", endpoint)) or 4096 + len(calls))

    class Ggml:
        def ggml_backend_reg_by_name(self, name):
            calls.append(("reg_by_name", name))
            return 1

        def ggml_backend_register(self, reg):
            calls.append(("register", reg))

    class Base:
        def ggml_backend_reg_get_proc_address(self, reg, name):
            calls.append(("proc", reg, name))
            return ctypes.cast(add_server, ctypes.c_void_p).value

    rpc.register(["10.0.0.2:50052", "10.0.0.3:50052"], libraries=lambda: (Ggml(), Base()))
    assert calls == [
        ("reg_by_name", b"RPC"), ("proc", 1, b"ggml_backend_rpc_add_server"),
        ("add", b"10.0.0.2:50052"), ("register", 4099), ("add", b"10.0.0.3:50052"), ("register", 4101),
    ]


def test_this_llama_cpp_python_has_the_symbols_rpc_registration_uses():
    """What can be checked without an RPC build: the entry points exist in the
    installed libraries, and this build says it has no RPC backend."""
    import llama_cpp

    from hoshikage_runner import rpc

    ggml, base = rpc._libraries()
    assert ggml.ggml_backend_reg_by_name and ggml.ggml_backend_register and base.ggml_backend_reg_get_proc_address
    assert "rpc_servers" not in __import__("inspect").signature(llama_cpp.Llama.__init__).parameters
    if llama_cpp.llama_supports_rpc():
        pytest.skip("this llama-cpp-python was built with RPC")
    assert not ggml.ggml_backend_reg_by_name(b"RPC")


@pytest.mark.model
async def test_a_model_with_rpc_servers_on_a_build_without_rpc_fails_clearly(make_server, http):
    import llama_cpp

    if llama_cpp.llama_supports_rpc():
        pytest.skip("this llama-cpp-python was built with RPC")
    h = await make_server({"split": {"rpc_servers": ["127.0.0.1:50052"]}, "local": {}}, real=True)
    async with http.post(h.url + "/v1/chat/completions", json=chat_body("split")) as r:
        body = await r.json()
    # The node's install cannot serve it: a 5xx a router fails over from (and,
    # after three tries, 503 cooling down with Retry-After), with the reason.
    assert r.status == 500 and body["error"]["code"] == "model_load_failed", body
    message = body["error"]["message"]
    assert "built without RPC" in message and 'CMAKE_ARGS="-DGGML_RPC=on"' in message and "rpc-server" in message
    async with http.post(h.url + "/api/generate", json={"model": "split", "prompt": "x", "stream": False}) as r:
        assert r.status == 500 and "built without RPC" in (await r.json())["error"]
    async with http.post(h.url + "/v1/chat/completions", json=chat_body("local")) as r:
        assert r.status == 200  # the box serves its other models


# ------------------------------------------------------------------ a supervisor with the fake runners


def _serve(config_path: str) -> None:
    """`python tests/test_scale_out.py CONFIG`: a supervisor whose runners are
    tests/fake_runner.py, as its own process (LiteLLM's tests SIGKILL one)."""
    sys.path.insert(0, str(TESTS))
    from conftest import FakeSpawner  # noqa: E402  (tests/ is on the path when run as a script)

    from hoshikage_sup.config import load_config
    from hoshikage_sup.logs import setup_logging
    from hoshikage_sup.server import Server

    cfg = load_config(config_path, {})
    setup_logging("warning")
    spawner = FakeSpawner([sys.executable, str(TESTS / "fake_runner.py")])
    server = Server(cfg, spawn=spawner, env={})
    spawner.server = server
    server.run()


if __name__ == "__main__":
    _serve(sys.argv[1])
