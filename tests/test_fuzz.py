"""Property-based: thousands of generated requests, none answered with a 500.

A whole supervisor with fake runners runs on its own event loop in a
background thread; hypothesis generates request bodies and headers for
every endpoint (plausible shapes with absurd field values, raw junk, wrong
encodings, keys) and sends them one by one with a plain HTTP client.  Every
answer must be a success or a 4xx whose body is JSON in its API's shape;
streams must end properly; nothing may hang.  Afterwards the scheduler's
invariants hold and an ordinary request still succeeds.

The fake runner is quick (2 tokens, no delay), so the run is dominated by
the supervisor itself.  Runner options are drawn from their defaults or
from invalid values only: a valid new num_ctx would reload the runner,
which is tested elsewhere and would only slow this down.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import threading
import zlib
from collections import Counter
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FakeSpawner

EXAMPLES = int(os.environ.get("HOSHIKAGE_FUZZ_EXAMPLES", "2200"))
TIMEOUT = 30.0  # per request: a bound against hangs, not a performance claim

MODELS = {
    "m": {"aliases": ["m:1b"], "chat_format": "gemma"},
    "e": {"embedding": True},
}
KEY = "fuzz-key"

# ------------------------------------------------------------------ the server, in a thread


class Supervisor:
    def __init__(self, tmp_path, demo_model, command):
        from hoshikage_sup.config import parse_config
        from hoshikage_sup.devices import SimulatedSource
        from hoshikage_sup.server import Server

        table = {
            "server": {"host": "127.0.0.1", "port": 0, "api_keys": [KEY], "max_body_size": "1MiB"},
            "models": {n: {"path": str(demo_model), "n_ctx": 256, **m} for n, m in MODELS.items()},
        }
        cfg = parse_config(table, base_dir=tmp_path)
        spawner = FakeSpawner(command, env={"FAKE_TOKEN_DELAY": "0", "FAKE_TOKENS": "2"})
        self.server = Server(cfg, devices=SimulatedSource(system_total=64 * 2**30), spawn=spawner)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.server.startup())
        self.url = f"http://127.0.0.1:{self.server.port}"

    def call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.call(self.server.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def supervisor(tmp_path_factory, demo_model, fake_runner_command):
    s = Supervisor(tmp_path_factory.mktemp("fuzz"), demo_model, fake_runner_command)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(supervisor):
    with httpx.Client(base_url=supervisor.url, timeout=TIMEOUT) as c:
        yield c


# ------------------------------------------------------------------ strategies

ABSURD_NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([10**400, -(10**400), 2**63, 2**64, 1e308, -1e308, 0, -1, 1, 0.5, 2**31, 1e-300]),
    st.floats(allow_nan=False, allow_infinity=False),
)
SCALARS = st.one_of(
    ABSURD_NUMBERS, st.booleans(), st.none(), st.text(max_size=20),
    st.sampled_from(["", "\x00", "5m", "-1", "1e400", "NaN", "\u202e", "🦀" * 5]),
)
ANY_JSON = st.recursive(
    SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
MODEL_NAMES = st.one_of(st.sampled_from(["m", "m:1b", "m:latest", "e", "nope", "", "M"]),
                        st.sampled_from(["m", "e"]), st.sampled_from(["m", "e"]), SCALARS, st.text(max_size=600))
GRAMMARS = st.one_of(
    st.sampled_from([
        'root ::= "yes" | "no"', "root ::= (", "root ::= foo", "", "root ::= root", 'root ::= [a-z]{2,5}',
        'root ::= "x"{100000}', "root ::= " + "(" * 3000 + '"a"' + ")" * 3000, 'root ::= "\\q"', "root ::= [", "x ::= \"a\"",
    ]),
    st.text(max_size=60),
)
SCHEMAS = st.one_of(
    st.sampled_from([
        {"type": "object", "properties": {"a": {"type": "integer"}}},
        {"$ref": "https://example.com/s.json"}, {"type": "array", "minItems": 10**9}, {"type": "string", "pattern": "(("},
        {"enum": []}, {"type": "nonsense"},
    ]),
    ANY_JSON,
)


def field(values) -> st.SearchStrategy:
    """A field's value: usually from `values`, sometimes anything at all."""
    return st.one_of(*[values] * 8, SCALARS, ANY_JSON)


MESSAGES = st.one_of(
    st.lists(st.fixed_dictionaries({
        "role": field(st.sampled_from(["user", "system", "assistant", "tool"])),
        "content": field(st.text(max_size=50)),
    }), max_size=3),
    ANY_JSON,
)
SAMPLING_OPTIONS = ["temperature", "top_p", "top_k", "min_p", "seed", "repeat_penalty", "presence_penalty",
                    "frequency_penalty", "mirostat", "mirostat_tau", "mirostat_eta", "num_predict", "stop", "typical_p"]
RUNNER_OPTIONS = {"num_ctx": 256, "num_batch": 512, "num_thread": 0, "num_gpu": -1}


@st.composite
def ollama_options(draw) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from(SAMPLING_OPTIONS), max_size=4, unique=True)):
        out[key] = draw(field(ABSURD_NUMBERS))
    for key in draw(st.lists(st.sampled_from(sorted(RUNNER_OPTIONS)), max_size=2, unique=True)):
        # the default (no reload) or something invalid
        out[key] = draw(st.one_of(st.just(RUNNER_OPTIONS[key]), st.sampled_from([0 if key != "num_thread" else 10**6, -5, 10**400, 2**40, 1.5, "4096", None])))
    return out


def openai_body(path: str) -> st.SearchStrategy:
    base: dict[str, st.SearchStrategy] = {"model": MODEL_NAMES}
    if path == "/v1/chat/completions":
        base["messages"] = MESSAGES
    elif path == "/v1/completions":
        base["prompt"] = field(st.text(max_size=40))
    else:
        base["input"] = field(st.one_of(st.text(max_size=40), st.lists(st.text(max_size=10), max_size=3)))
    optional = {
        "stream": field(st.booleans()), "max_tokens": field(ABSURD_NUMBERS), "temperature": field(ABSURD_NUMBERS),
        "top_p": field(ABSURD_NUMBERS), "seed": field(ABSURD_NUMBERS), "n": field(ABSURD_NUMBERS),
        "stop": field(st.lists(st.text(max_size=5), max_size=3)), "keep_alive": field(st.one_of(ABSURD_NUMBERS, st.text(max_size=12))),
        "grammar": GRAMMARS, "logit_bias": field(st.dictionaries(st.text(max_size=12), ABSURD_NUMBERS, max_size=3)),
        "response_format": field(st.one_of(st.just({"type": "json_object"}), st.builds(lambda s: {"type": "json_object", "schema": s}, SCHEMAS))),
        "tools": ANY_JSON, "truncate": field(st.booleans()), "logprobs": SCALARS,
    }
    return st.fixed_dictionaries(base, optional=optional)


def ollama_body(path: str) -> st.SearchStrategy:
    base: dict[str, st.SearchStrategy] = {"model": MODEL_NAMES}
    optional: dict[str, st.SearchStrategy] = {
        "options": field(ollama_options()), "keep_alive": field(st.one_of(ABSURD_NUMBERS, st.text(max_size=12))),
        "stream": field(st.booleans()),
    }
    if path == "/api/generate":
        base["prompt"] = field(st.text(max_size=40))
        optional.update(raw=field(st.booleans()), system=field(st.text(max_size=10)), suffix=field(st.text(max_size=5)),
                        format=field(st.one_of(st.just("json"), SCHEMAS)), images=ANY_JSON, template=SCALARS)
    elif path == "/api/chat":
        base["messages"] = MESSAGES
        optional.update(format=field(st.one_of(st.just("json"), SCHEMAS)), tools=ANY_JSON)
    elif path == "/api/embed":
        base["input"] = field(st.one_of(st.text(max_size=40), st.lists(st.text(max_size=10), max_size=3)))
        optional.update(truncate=field(st.booleans()), dimensions=field(ABSURD_NUMBERS))
    elif path == "/api/embeddings":
        base["prompt"] = field(st.text(max_size=40))
    return st.fixed_dictionaries(base, optional=optional)


VALID: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    "/v1/completions": {"model": "m", "prompt": "hi"},
    "/v1/embeddings": {"model": "e", "input": "hi"},
    "/api/generate": {"model": "m", "prompt": "hi", "stream": False},
    "/api/chat": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    "/api/embed": {"model": "e", "input": ["hi"]},
    "/api/embeddings": {"model": "e", "prompt": "hi"},
    "/api/show": {"model": "m"},
}
_OPENAI_FIELDS = {
    "stream": st.booleans(), "max_tokens": ABSURD_NUMBERS, "temperature": ABSURD_NUMBERS, "top_p": ABSURD_NUMBERS,
    "top_k": ABSURD_NUMBERS, "seed": ABSURD_NUMBERS, "n": ABSURD_NUMBERS, "presence_penalty": ABSURD_NUMBERS,
    "stop": st.lists(st.text(max_size=5), max_size=70), "keep_alive": st.one_of(ABSURD_NUMBERS, st.text(max_size=12)),
    "grammar": GRAMMARS, "logit_bias": st.dictionaries(st.text(max_size=12), ABSURD_NUMBERS, max_size=3),
    "response_format": st.builds(lambda s: {"type": "json_object", "schema": s}, SCHEMAS), "model": MODEL_NAMES,
}
_OLLAMA_FIELDS = {
    "options": ollama_options(), "keep_alive": st.one_of(ABSURD_NUMBERS, st.text(max_size=12)),
    "stream": st.booleans(), "model": MODEL_NAMES, "format": st.one_of(st.just("json"), SCHEMAS),
}
FIELDS: dict[str, dict[str, st.SearchStrategy]] = {
    "/v1/chat/completions": {**_OPENAI_FIELDS, "messages": MESSAGES, "tools": ANY_JSON},
    "/v1/completions": {**_OPENAI_FIELDS, "prompt": st.text(max_size=40), "suffix": st.text(max_size=5)},
    "/v1/embeddings": {"model": MODEL_NAMES, "input": st.lists(st.text(max_size=10), max_size=3),
                       "truncate": st.booleans(), "keep_alive": ABSURD_NUMBERS, "encoding_format": SCALARS},
    "/api/generate": {**_OLLAMA_FIELDS, "prompt": st.text(max_size=40), "raw": st.booleans(), "system": st.text(max_size=5),
                      "suffix": st.text(max_size=5), "images": ANY_JSON},
    "/api/chat": {**_OLLAMA_FIELDS, "messages": MESSAGES, "tools": ANY_JSON},
    "/api/embed": {"model": MODEL_NAMES, "input": st.lists(st.text(max_size=10), max_size=3), "truncate": st.booleans(),
                   "dimensions": ABSURD_NUMBERS, "options": ollama_options(), "keep_alive": ABSURD_NUMBERS},
    "/api/embeddings": {"model": MODEL_NAMES, "prompt": st.text(max_size=10), "options": ollama_options()},
    "/api/show": {"model": MODEL_NAMES, "name": MODEL_NAMES, "verbose": SCALARS},
}
POST_PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings",
              "/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/show"]
JUNK = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([
        b"", b"null", b"[]", b'"x"', b"{", b'{"model": "m", "prompt": "x", "temperature": NaN}',
        b'{"model": "m", "prompt": Infinity}', b'{"model": "m\\ud800", "prompt": "x"}', b'{"model": 1e400}',
        b'{"a":' * 5000 + b"1" + b"}" * 5000, b"[" * 990 + b"]" * 990, b"\xff\xfe{}",
    ]),
)


@st.composite
def requests(draw) -> tuple[str, str, bytes, dict[str, str]]:
    if draw(st.sampled_from([False] * 9 + [True])):
        path = draw(st.sampled_from(["/api/ps", "/api/tags", "/v1/models", "/api/version", "/metrics", "/health", "/nope"]))
        return "GET", path, b"", draw(auth_headers())
    path = draw(st.sampled_from(POST_PATHS))
    shape = draw(st.sampled_from(["one field"] * 5 + ["free"] * 4 + ["junk"]))
    if shape == "junk":
        raw = draw(JUNK)
    elif shape == "free":
        body = draw(openai_body(path) if path.startswith("/v1/") else ollama_body(path))
        raw = json.dumps(body).encode()
    else:
        # An ordinary request with one field, old or new, set to anything at all.
        body = dict(VALID[path])
        name = draw(st.sampled_from(sorted(FIELDS[path])))
        body[name] = draw(st.one_of(FIELDS[path][name], SCALARS, ANY_JSON))
        raw = json.dumps(body).encode()
    headers = draw(auth_headers())
    encoding = draw(st.sampled_from([None] * 12 + ["gzip", "deflate", "br", "gzip-lie", "zstd", "gzip, br"]))
    if encoding == "gzip":
        raw = gzip.compress(raw)
    elif encoding == "deflate":
        raw = zlib.compress(raw)
    if encoding:
        headers["Content-Encoding"] = "gzip" if encoding == "gzip-lie" else encoding
    headers["Content-Type"] = draw(st.sampled_from(["application/json", "text/plain", "", "application/x-www-form-urlencoded"]))
    return "POST", path, raw, headers


@st.composite
def auth_headers(draw) -> dict[str, str]:
    choice = draw(st.sampled_from([3] * 12 + [2, 1, 0]))  # hypothesis favours the first
    if choice == 0:
        return {}
    if choice == 1:
        return {"Authorization": "Bearer " + draw(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20))}
    if choice == 2:
        return {"x-api-key": KEY}
    return {"Authorization": f"Bearer {KEY}"}


# ------------------------------------------------------------------ the property

STATS: Counter = Counter()
MESSAGES_SEEN: Counter = Counter()


def check_answer(method: str, path: str, response: httpx.Response, body_bytes: bytes) -> None:
    status = response.status_code
    STATS[f"{status // 100}xx"] += 1
    STATS[status] += 1
    assert status < 500, (method, path, status, body_bytes[:500])
    ctype = response.headers.get("content-type", "")
    if status >= 400:
        data = json.loads(body_bytes)
        if os.environ.get("HOSHIKAGE_FUZZ_SHOW"):
            MESSAGES_SEEN[str(data)[:70]] += 1
        if path.startswith("/api/"):
            assert isinstance(data, dict) and isinstance(data.get("error"), str) and data["error"], data
        else:
            err = data["error"]
            assert isinstance(err, dict) and isinstance(err["message"], str) and {"type", "param", "code"} <= set(err), data
        return
    if ctype.startswith("text/event-stream"):
        events = [e for e in body_bytes.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]
        assert events and events[-1].strip() == b"data: [DONE]", body_bytes[-300:]
        for e in events[:-1]:
            json.loads(e.split(b"data:", 1)[1])
    elif ctype.startswith("application/x-ndjson"):
        lines = [json.loads(line) for line in body_bytes.splitlines() if line.strip()]
        assert lines and lines[-1].get("done") is True, lines[-1:]
    elif path not in ("/metrics", "/health") and method == "POST":
        json.loads(body_bytes)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(req=requests())
def test_no_request_gets_a_500(client, req):
    method, path, raw, headers = req
    STATS["sent"] += 1
    with client.stream(method, path, content=raw if method == "POST" else None, headers=headers) as response:
        body = response.read()
    check_answer(method, path, response, body)


def test_afterwards_all_is_well(supervisor, client):
    assert STATS["sent"] >= min(EXAMPLES, 2000), STATS
    print("fuzz figures:", dict(sorted(STATS.items(), key=str)))
    for message, n in MESSAGES_SEEN.most_common(25):
        print(n, message)
    sched = supervisor.server.scheduler
    supervisor.call(sched.wait_idle(TIMEOUT))
    assert supervisor.call(_invariants(sched)) == []
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    r = client.post("/api/chat", json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False},
                    headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text


async def _invariants(sched) -> list[str]:
    return sched.invariants()
