"""Ollama's own python client (`ollama`, pinned in the test extra) against a
live `hoshikage serve` running the demo model.

The supervisor runs as a subprocess on a free port with a temporary config
(the demo model as `gemma`/`gemma3:270m` and as the embedding model
`gemma-embed`).  Generations are kept to a few tokens: the machine is small.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import ollama
import pytest

pytestmark = pytest.mark.model

START_TIMEOUT = 60.0
TIMEOUT = 180.0  # per request: the first one loads the model on a shared 2-core machine
FEW = {"num_predict": 4, "temperature": 0.0, "seed": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def supervisor(demo_model: Path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ollama-client")
    port = _free_port()
    config = tmp / "hoshikage.toml"
    config.write_text(
        f"""
[server]
host = "127.0.0.1"
port = {port}
keep_alive = "5m"

[models.gemma]
path = "{demo_model}"
aliases = ["gemma3:270m"]
n_ctx = 512
chat_format = "gemma"

[models.gemma-embed]
path = "{demo_model}"
n_ctx = 256
embedding = true
"""
    )
    log = open(tmp / "supervisor.log", "wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOSHIKAGE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hoshikage_sup", "serve", "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            log.close()
            pytest.fail(f"supervisor exited with {proc.returncode}: {(tmp / 'supervisor.log').read_text()[-2000:]}")
        try:
            if httpx.get(url + "/", timeout=1.0).text == "Ollama is running":
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("supervisor did not start listening")
        time.sleep(0.1)
    try:
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def client(supervisor) -> ollama.Client:
    return ollama.Client(host=supervisor, timeout=TIMEOUT)


def loaded(client: ollama.Client) -> dict[str, ollama.ProcessResponse.Model]:
    return {m.name: m for m in client.ps().models}


def test_list_and_show(client):
    names = [m.model for m in client.list().models]
    assert names == ["gemma", "gemma3:270m", "gemma-embed"]
    shown = client.show("gemma3:270m")
    assert shown.details.family == "gemma3" and shown.details.quantization_level == "Q4_K_M"
    assert shown.modelinfo["general.architecture"] == "gemma3"
    assert shown.capabilities == ["completion"]
    assert client.show("gemma-embed").capabilities == ["embedding"]


def test_load_with_empty_prompt_then_ps(client):
    r = client.generate("gemma", keep_alive="10m")
    assert r.done and r.done_reason == "load" and r.response == ""
    model = loaded(client)["gemma"]
    assert model.size > 100_000_000 and model.size_vram == 0 and model.context_length == 512
    remaining = (model.expires_at - datetime.now(timezone.utc)).total_seconds()
    assert 500 < remaining <= 600


def test_generate(client):
    r = client.generate("gemma3:270m", "The capital of France is", options=FEW)
    assert r.done and r.done_reason in ("stop", "length") and r.model == "gemma3:270m"
    assert isinstance(r.response, str)
    assert 0 < r.eval_count <= 4 and r.prompt_eval_count > 0
    assert r.total_duration >= r.eval_duration > 0

    parts = list(client.generate("gemma", "Once upon a time", options=FEW, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert parts[-1].done_reason in ("stop", "length")
    assert parts[-1].eval_count == len([p for p in parts[:-1] if p.response]) or parts[-1].done_reason == "length"
    assert parts[-1].eval_duration >= 0 and parts[-1].prompt_eval_duration > 0

    raw = client.generate("gemma", "1, 2, 3,", raw=True, options=FEW)
    assert raw.done and raw.eval_count <= 4

    js = client.generate("gemma", "Give a JSON object with a name.", format="json", options={**FEW, "num_predict": 6})
    assert js.response.lstrip().startswith("{"), js.response  # the JSON grammar reached the runner


def test_chat(client):
    messages = [{"role": "user", "content": "Say hello."}]
    r = client.chat("gemma", messages=messages, options=FEW)
    assert r.done and r.message.role == "assistant" and isinstance(r.message.content, str)
    assert 0 < r.eval_count <= 4
    parts = list(client.chat("gemma", messages=messages, options=FEW, stream=True))
    assert parts[-1].done and parts[-1].message.content == ""
    text = "".join(p.message.content for p in parts)
    assert text == r.message.content  # temperature 0, same seed: the same answer either way


def test_embed(client):
    r = client.embed("gemma-embed", ["hello world", "good night"])
    assert len(r.embeddings) == 2
    for v in r.embeddings:
        assert len(v) == 640 and math.isclose(math.hypot(*v), 1.0, rel_tol=1e-4)
    assert r.embeddings[0] != r.embeddings[1]
    assert r.prompt_eval_count > 0
    old = client.embeddings("gemma-embed", "hello world")
    assert len(old.embedding) == 640


def test_unload_with_keep_alive_0(client):
    client.generate("gemma", keep_alive="5m")
    assert "gemma" in loaded(client)
    r = client.generate("gemma", keep_alive=0)
    assert r.done_reason == "unload"
    assert "gemma" not in loaded(client)
    r = client.chat("gemma-embed", messages=[], keep_alive=0)
    assert r.done_reason == "unload" and "gemma-embed" not in loaded(client)


def test_unknown_model(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat("no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404
    assert e.value.error == "model 'no-such-model' not found"
