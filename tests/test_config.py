import math
import subprocess
import sys
from pathlib import Path

import pytest

from hoshikage_sup.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_file(tmp_path):
    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGUF")
    return p


def write(tmp_path, text):
    p = tmp_path / "cfg.toml"
    p.write_text(text)
    return p


def test_full_config(tmp_path, model_file):
    cfg = load_config(
        write(
            tmp_path,
            """
[server]
host = "0.0.0.0"
port = 8080
keep_alive = "10m"
max_loaded_models = 2
max_queue = 10

[memory]
limit = "2GiB"
system_reserve = 0

[models.gemma]
path = "m.gguf"
aliases = ["gemma3:270m", "g"]
n_ctx = 4096
chat_format = "gemma"
keep_alive = -1
pinned = true
parallel = 2
n_gpu_layers = 10
flash_attn = true
cache_type_k = "q8_0"

[models.gemma.options]
temperature = 0.5
""",
        ),
        env={},
    )
    assert cfg.server.host == "0.0.0.0" and cfg.server.port == 8080
    assert cfg.server.keep_alive == 600 and cfg.server.max_loaded_models == 2 and cfg.server.max_queue == 10
    assert cfg.memory.limit == 2 * 1024**3 and cfg.memory.system_reserve == 0
    m = cfg.models["gemma"]
    assert m.path == model_file.resolve()  # relative to the config file's directory
    assert m.n_ctx == 4096 and m.parallel == 2 and m.pinned and m.keep_alive == math.inf
    assert m.n_gpu_layers == 10 and m.flash_attn is True and m.cache_type_k == "q8_0"
    assert m.options == {"temperature": 0.5}
    assert cfg.resolve("gemma3:270m") is m and cfg.resolve("g") is m
    assert cfg.resolve("g:latest") is m  # name:latest matches a bare name
    assert cfg.resolve("nope") is None


def test_bare_name_matches_latest_tag(tmp_path, model_file):
    cfg = load_config(write(tmp_path, '[models."llama:latest"]\npath = "m.gguf"\n'), env={})
    assert cfg.resolve("llama") is cfg.models["llama:latest"]


def test_precedence_flag_env_file_default(tmp_path, model_file):
    p = write(tmp_path, '[server]\nport = 9000\nkeep_alive = "1m"\n[models.a]\npath = "m.gguf"\n')
    assert load_config(p, env={}).server.port == 9000
    env = {"HOSHIKAGE_PORT": "9100", "HOSHIKAGE_KEEP_ALIVE": "30s", "HOSHIKAGE_MAX_LOADED_MODELS": "4", "HOSHIKAGE_HOST": "::1"}
    cfg = load_config(p, env=env)
    assert (cfg.server.port, cfg.server.keep_alive, cfg.server.max_loaded_models, cfg.server.host) == (9100, 30, 4, "::1")
    assert load_config(p, env=env, port=9200, host="127.0.0.2").server.port == 9200
    assert load_config(None, env={"HOSHIKAGE_CONFIG": str(p)}).server.port == 9000
    assert load_config(p, env={"HOSHIKAGE_KEEP_ALIVE": "-1"}).server.keep_alive == math.inf
    # like OLLAMA_KEEP_ALIVE, a bare integer in the environment means seconds
    assert load_config(p, env={"HOSHIKAGE_KEEP_ALIVE": "90"}).server.keep_alive == 90
    assert load_config(write(tmp_path, ""), env={}).server.port == 11434  # built-in default


BAD = [
    ("[server\nport = 1", "TOML syntax error"),
    ("[server]\nprt = 1", "server.prt: unknown key"),
    ("[server]\nport = \"x\"", "server.port: expected an integer"),
    ("[server]\nport = 70000", "server.port: expected an integer <= 65535"),
    ("[server]\nkeep_alive = \"10\"", "server.keep_alive: expected a duration"),
    ("[memory]\nlimit = \"lots\"", "memory.limit: expected a size"),
    ("[models.a]\nn_ctx = 5", "models.a.path: missing"),
    ("[models.a]\npath = \"missing.gguf\"", "models.a.path: model file"),
    ("[models.a]\npath = \"m.gguf\"\nn_ctx = \"big\"", "models.a.n_ctx: expected an integer"),
    ("[models.a]\npath = \"m.gguf\"\ncolour = 1", "models.a.colour: unknown key"),
    ("[models.a]\npath = \"m.gguf\"\nembedding = \"yes\"", "models.a.embedding: expected true or false"),
    ("[models.a]\npath = \"m.gguf\"\ncache_type_k = \"q5\"", "models.a.cache_type_k: expected one of"),
    ("[models.a]\npath = \"m.gguf\"\nn_gpu_layers = \"most\"", "models.a.n_gpu_layers: expected \"auto\""),
    ("[models.a]\npath = \"m.gguf\"\naliases = [\"x\"]\n[models.b]\npath = \"m.gguf\"\naliases = [\"x\"]", "models.b.aliases: name 'x' is already used"),
    ("[models.a]\npath = \"m.gguf\"\naliases = \"x\"", "models.a.aliases: expected a list"),
    ("models = 3", "models: expected a table"),
]


@pytest.mark.parametrize("text,needle", BAD)
def test_bad_config_names_the_key(tmp_path, model_file, text, needle):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p, env={})
    assert any(needle in line and str(p) in line for line in e.value.problems), e.value.problems


def test_every_problem_reported_at_once(tmp_path, model_file):
    p = write(tmp_path, "[server]\nport = \"x\"\nmax_queue = 0\n[models.a]\nn_ctx = -1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, env={})
    keys = " ".join(e.value.problems)
    assert "server.port" in keys and "server.max_queue" in keys and "models.a.path" in keys and "models.a.n_ctx" in keys


def test_unreadable_model_file(tmp_path, model_file):
    if hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0:
        pytest.skip("root reads every file")
    model_file.chmod(0)
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, '[models.a]\npath = "m.gguf"\n'), env={})
    assert "not readable" in str(e.value)


def test_bad_env_override(tmp_path, model_file):
    p = write(tmp_path, '[models.a]\npath = "m.gguf"\n')
    with pytest.raises(ConfigError) as e:
        load_config(p, env={"HOSHIKAGE_PORT": "http", "HOSHIKAGE_KEEP_ALIVE": "ten"})
    assert "HOSHIKAGE_PORT" in str(e.value) and "HOSHIKAGE_KEEP_ALIVE" in str(e.value)


def _cli(*args, env=None):
    import os

    e = {k: v for k, v in os.environ.items() if not k.startswith("HOSHIKAGE_")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "hoshikage_sup", *args], capture_output=True, text=True, env=e, timeout=60)


@pytest.mark.parametrize(
    "text,needle",
    [
        ("[server\n", "TOML syntax error"),
        ("[server]\nbogus = 1\n", "server.bogus"),
        ("[server]\nport = \"x\"\n", "server.port"),
        ("[models.a]\npath = \"nowhere.gguf\"\n", "models.a.path"),
        ("[models.a]\npath = \"m.gguf\"\naliases=[\"a\"]\n", "models.a"),
    ],
)
def test_serve_exits_2_with_one_line_per_problem(tmp_path, model_file, text, needle):
    p = write(tmp_path, text)
    r = _cli("serve", "--config", str(p))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert needle in r.stderr and str(p) in r.stderr


def test_serve_without_config_exits_2():
    r = _cli("serve")
    assert r.returncode == 2 and "HOSHIKAGE_CONFIG" in r.stderr and "Traceback" not in r.stderr


def test_missing_config_file_exits_2(tmp_path):
    r = _cli("serve", "--config", str(tmp_path / "none.toml"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_check_accepts_shipped_example_structure(tmp_path):
    # The documented example must stay valid apart from its model path.
    text = (ROOT / "configs" / "example.toml").read_text()
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    text = text.replace('path = "/var/lib/hoshikage/models/gemma3-270m-q4_k_m.gguf"', 'path = "m.gguf"')
    p = write(tmp_path, text)
    r = _cli("check", "--config", str(p))
    assert r.returncode == 0, r.stderr


def test_serve_with_an_unusable_runtime_dir_exits_2(tmp_path, model_file):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    p = write(tmp_path, f'[server]\nport = 0\nruntime_dir = "{not_a_dir}"\n')
    r = _cli("serve", "--config", str(p))
    assert r.returncode == 2, r.stderr
    assert "server.runtime_dir" in r.stderr and str(p) in r.stderr and "Traceback" not in r.stderr


def test_api_keys_from_file_and_environment(tmp_path, model_file):
    keys = tmp_path / "keys"
    keys.write_text("# ops\nk-file\n\n")
    cfg = load_config(write(tmp_path, f'[server]\napi_keys = ["k-conf"]\napi_keys_file = "{keys}"\n'),
                      env={"HOSHIKAGE_API_KEYS": "k-env, k-env2"})
    from hoshikage_sup.auth import KeyRing

    ring = KeyRing.from_config(cfg.server)
    assert set(ring.api) == {b"k-conf", b"k-env", b"k-env2", b"k-file"}
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, f'[server]\napi_keys_file = "{tmp_path / "missing"}"\n'), env={})
    assert "server.api_keys_file" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, '[server]\napi_keys = [""]\nheader_timeout = 0\nmax_body_size = "1x"\n'), env={})
    assert {"server.api_keys", "server.header_timeout", "server.max_body_size"} <= {
        line.split(": ")[1] for line in e.value.problems}
