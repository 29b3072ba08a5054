"""One `Config` for the whole supervisor.

Loaded from a TOML file, then overridden by environment variables, then by
command-line flags (flag > env > file > built-in default).  Every problem in a
file is collected and reported at once, one line each, naming the file, the
key and what was expected; `ConfigError` carries those lines and the CLI turns
them into exit code 2.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .durations import DurationError, parse_duration, parse_keep_alive, parse_size

CACHE_TYPES = ("f16", "q8_0", "q4_0")
# ggml type ids as llama_cpp.server's --type_k/--type_v expect them
CACHE_TYPE_IDS = {"f16": 1, "q8_0": 8, "q4_0": 2}

ENV_CONFIG = "HOSHIKAGE_CONFIG"
ENV_HOST = "HOSHIKAGE_HOST"
ENV_PORT = "HOSHIKAGE_PORT"
ENV_KEEP_ALIVE = "HOSHIKAGE_KEEP_ALIVE"
ENV_MAX_LOADED = "HOSHIKAGE_MAX_LOADED_MODELS"
ENV_API_KEYS = "HOSHIKAGE_API_KEYS"  # comma-separated


class ConfigError(Exception):
    """Invalid configuration; `problems` holds one human-readable line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


STAGE_MODES = ("off", "ram")
OVERFLOW_POLICIES = ("error", "truncate", "condense")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 11434
    keep_alive: float = 300.0  # seconds; math.inf = forever
    max_loaded_models: int = 0  # 0 = automatic (3 per GPU, 3 on a CPU-only box)
    max_queue: int = 512
    load_timeout: float = 300.0
    stop_timeout: float = 5.0  # SIGTERM → SIGKILL grace
    shutdown_timeout: float = 30.0  # on SIGTERM, how long in-flight requests may take to finish
    request_timeout: float = 0.0  # 0 = no server-side limit
    # Watchdog: every ready runner's /health is probed every health_interval; one
    # that has not answered for health_timeout is killed and replaced.  A stream
    # that sends nothing for stall_timeout is failed and its runner replaced.
    health_interval: float = 5.0
    health_timeout: float = 15.0
    stall_timeout: float = 60.0
    # 0 = off; else an idle runner is asked for a real 1-token generation this
    # often (a runner can answer /health and never generate).
    probe_interval: float = 0.0
    # Warm spare runner processes kept ready (imports done, no model yet); 0 = none.
    runner_pool: int = 1
    # RAM staging (staging.py): "ram" copies models into stage_dir before loading.
    stage: str = "off"
    stage_dir: Path = Path("/dev/shm/hoshikage")
    stage_keep: float = 3600.0  # a copy is removed this long after its model's last runner is gone
    # Chats longer than the context (overflow.py): "error" | "truncate" | "condense",
    # and the embedding model condense clusters sentences with.
    context_overflow: str = "error"
    condense_model: str | None = None
    log_level: str = "info"
    # Where runners' Unix sockets live (a private 0700 directory is made in it);
    # None: $XDG_RUNTIME_DIR, else the system's temporary directory.
    runtime_dir: Path | None = None
    # Client authentication: none configured = open.
    api_keys: tuple[str, ...] = ()
    api_keys_file: Path | None = None  # one key a line; re-read on reload
    admin_keys: tuple[str, ...] = ()
    # Connection limits against slow, idle or too many clients.
    header_timeout: float = 10.0  # from connection (or previous response) to complete headers
    body_timeout: float = 60.0  # longest pause while a request body is being sent
    body_deadline: float = 300.0  # the whole body must arrive within this
    idle_timeout: float = 30.0  # an idle keep-alive connection is closed after this
    max_connections: int = 1024
    max_body_size: int = 32 * 1024**2


@dataclass(frozen=True)
class MemoryConfig:
    gpu_overhead: int = 0  # bytes reserved per GPU
    system_reserve: int = 1024**3  # bytes of RAM left to the rest of the system
    limit: int = 0  # 0 = no cap on what the supervisor's runners may use
    recovery_timeout: float = 5.0
    recovery_poll: float = 0.25


@dataclass(frozen=True)
class ModelConfig:
    name: str
    path: Path
    aliases: tuple[str, ...] = ()
    n_ctx: int = 2048
    n_threads: int = 0  # 0 = a fair share of the cores among runners generating at once
    n_batch: int = 512
    n_gpu_layers: int | str = "auto"  # "auto" or an explicit count (-1 = all)
    flash_attn: bool | str = "auto"
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    chat_format: str | None = None
    embedding: bool = False
    keep_alive: float | None = None  # None = the server default
    pinned: bool = False
    preload: bool = False
    parallel: int = 1
    options: Mapping[str, Any] = field(default_factory=dict)  # Ollama-style default options
    # Largest num_ctx a request may ask for; 0 = the model's trained context.
    max_num_ctx: int = 0
    stage: str | None = None  # "ram" / "off"; None = [server] stage
    # llama.cpp RPC servers ("host:port") that hold the offloaded layers
    # (docs/scale-out.md); () = this box's own devices only.
    rpc_servers: tuple[str, ...] = ()
    context_overflow: str | None = None  # None = [server] context_overflow
    condense_model: str | None = None  # None = [server] condense_model

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    models: Mapping[str, ModelConfig] = field(default_factory=dict)
    source: Path | None = None

    def overflow_policy(self, model: ModelConfig) -> str:
        return model.context_overflow or self.server.context_overflow

    def condense_model(self, model: ModelConfig) -> str | None:
        return model.condense_model or self.server.condense_model

    def resolve(self, requested: str) -> ModelConfig | None:
        """Find a model by name or alias; a bare name also matches `name:latest`."""
        return _resolve(self.models, requested)

    def all_names(self) -> dict[str, ModelConfig]:
        out: dict[str, ModelConfig] = {}
        for m in self.models.values():
            for n in m.names:
                out[n] = m
        return out


def _resolve(models: Mapping[str, ModelConfig], requested: str) -> ModelConfig | None:
    if not isinstance(requested, str) or not requested:
        return None
    index: dict[str, ModelConfig] = {}
    for m in models.values():
        for n in m.names:
            index[n] = m
    if requested in index:
        return index[requested]
    if ":" not in requested:
        return index.get(requested + ":latest")
    if requested.endswith(":latest"):
        return index.get(requested[: -len(":latest")])
    return None


# ---------------------------------------------------------------- validation


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/:]*$")
_LOG_LEVELS = ("debug", "info", "warning", "error")


class _Collector:
    def __init__(self, where: str):
        self.where = where
        self.problems: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.problems.append(f"{self.where}: {key}: {message}")


def _check_unknown(c: _Collector, prefix: str, table: Mapping[str, Any], known: set[str]) -> None:
    for key in table:
        if key not in known:
            c.add(f"{prefix}{key}", f"unknown key (expected one of: {', '.join(sorted(known))})")


def _take(c: _Collector, key: str, table: Mapping[str, Any], name: str, conv: Callable[[Any], Any], default: Any) -> Any:
    if name not in table:
        return default
    try:
        return conv(table[name])
    except (DurationError, ValueError, TypeError) as e:
        c.add(key, str(e))
        return default


def _int(minimum: int | None = None, maximum: int | None = None) -> Callable[[Any], int]:
    def conv(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"expected an integer, got {v!r}")
        if minimum is not None and v < minimum:
            raise ValueError(f"expected an integer >= {minimum}, got {v}")
        if maximum is not None and v > maximum:
            raise ValueError(f"expected an integer <= {maximum}, got {v}")
        return v

    return conv


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"expected a non-empty string, got {v!r}")
    return v


def _choice(*choices: str) -> Callable[[Any], str]:
    def conv(v: Any) -> str:
        if v not in choices:
            raise ValueError(f"expected one of {', '.join(repr(x) for x in choices)}, got {v!r}")
        return v

    return conv


def _size(minimum: int) -> Callable[[Any], int]:
    def conv(v: Any) -> int:
        n = parse_size(v)
        if n < minimum:
            raise ValueError(f"expected a size of at least {minimum} bytes, got {v!r}")
        return n

    return conv


def _auto_or_bool(v: Any) -> bool | str:
    if v == "auto" or isinstance(v, bool):
        return v
    raise ValueError(f"expected \"auto\", true or false, got {v!r}")


def _auto_or_int(v: Any) -> int | str:
    if v == "auto":
        return v
    if isinstance(v, int) and not isinstance(v, bool) and v >= -1:
        return v
    raise ValueError(f"expected \"auto\" or an integer >= -1 (-1 = all layers), got {v!r}")


def _timeout(v: Any) -> float:
    seconds = parse_duration(v)
    return seconds


def _positive_timeout(v: Any) -> float:
    seconds = parse_duration(v)
    if seconds <= 0:
        raise ValueError(f"expected a duration above zero such as \"10s\", got {v!r}")
    return seconds


def _keys(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(k, str) and k.strip() for k in v):
        raise ValueError(f"expected a list of non-empty strings, got {v!r}")
    return tuple(k.strip() for k in v)


def _path(base_dir: Path) -> Callable[[Any], Path]:
    def conv(v: Any) -> Path:
        if not isinstance(v, str) or not v:
            raise ValueError(f"expected a path as a non-empty string, got {v!r}")
        p = Path(os.path.expandvars(os.path.expanduser(v)))
        return p if p.is_absolute() else (base_dir / p).resolve()

    return conv


def read_keys_file(path: Path) -> tuple[str, ...]:
    """API keys from a file: one a line; blank lines and lines starting with # are skipped."""
    keys = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(line)
    return tuple(keys)


_SERVER_KEYS = {
    "host", "port", "keep_alive", "max_loaded_models", "max_queue", "load_timeout",
    "stop_timeout", "shutdown_timeout", "request_timeout", "health_interval", "health_timeout", "stall_timeout",
    "probe_interval", "runner_pool", "stage", "stage_dir", "stage_keep", "context_overflow", "condense_model",
    "log_level", "runtime_dir", "api_keys", "api_keys_file",
    "admin_keys", "header_timeout", "body_timeout", "body_deadline", "idle_timeout",
    "max_connections", "max_body_size",
}
_MEMORY_KEYS = {"gpu_overhead", "system_reserve", "limit", "recovery_timeout", "recovery_poll"}
_MODEL_KEYS = {
    "path", "aliases", "n_ctx", "n_threads", "n_batch", "n_gpu_layers", "flash_attn",
    "cache_type_k", "cache_type_v", "chat_format", "embedding", "keep_alive", "pinned",
    "preload", "parallel", "options", "max_num_ctx", "stage", "rpc_servers", "context_overflow", "condense_model",
}
# llama.cpp's GGML_RPC_MAX_SERVERS
MAX_RPC_SERVERS = 16
_RPC_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.\-]*[A-Za-z0-9])?)$")


def _rpc_servers(v: Any) -> tuple[str, ...]:
    """A list of "host:port" (IPv6 as "[addr]:port"), each once, at most 16."""
    if not isinstance(v, list) or not v:
        raise ValueError(f'expected a non-empty list of "host:port" strings such as ["10.0.0.2:50052"], got {v!r}')
    if len(v) > MAX_RPC_SERVERS:
        raise ValueError(f"expected at most {MAX_RPC_SERVERS} RPC servers (llama.cpp's limit), got {len(v)}")
    out: list[str] = []
    for item in v:
        host, sep, port = item.rpartition(":") if isinstance(item, str) else ("", "", "")
        if (not sep or not _RPC_HOST.match(host) or not port.isdigit() or not 0 < int(port) < 65536):
            raise ValueError(f'expected "host:port" with a port 1-65535 (IPv6 as "[addr]:port"), got {item!r}')
        if item in out:
            raise ValueError(f"RPC server {item!r} is listed twice (expected each once)")
        out.append(item)
    return tuple(out)


def _parse_server(c: _Collector, t: Mapping[str, Any], base_dir: Path) -> ServerConfig:
    d = ServerConfig()
    _check_unknown(c, "server.", t, _SERVER_KEYS)
    keys_file = _take(c, "server.api_keys_file", t, "api_keys_file", _path(base_dir), d.api_keys_file)
    if keys_file is not None:
        try:
            read_keys_file(keys_file)
        except (OSError, UnicodeDecodeError) as e:
            c.add("server.api_keys_file", f"cannot read {str(keys_file)!r}: {getattr(e, 'strerror', None) or e} (expected a text file with one key a line)")
    return ServerConfig(
        host=_take(c, "server.host", t, "host", _str, d.host),
        port=_take(c, "server.port", t, "port", _int(0, 65535), d.port),
        keep_alive=_take(c, "server.keep_alive", t, "keep_alive", parse_keep_alive, d.keep_alive),
        max_loaded_models=_take(c, "server.max_loaded_models", t, "max_loaded_models", _int(0), d.max_loaded_models),
        max_queue=_take(c, "server.max_queue", t, "max_queue", _int(1), d.max_queue),
        load_timeout=_take(c, "server.load_timeout", t, "load_timeout", _timeout, d.load_timeout),
        stop_timeout=_take(c, "server.stop_timeout", t, "stop_timeout", _timeout, d.stop_timeout),
        shutdown_timeout=_take(c, "server.shutdown_timeout", t, "shutdown_timeout", _positive_timeout, d.shutdown_timeout),
        health_interval=_take(c, "server.health_interval", t, "health_interval", _positive_timeout, d.health_interval),
        health_timeout=_take(c, "server.health_timeout", t, "health_timeout", _positive_timeout, d.health_timeout),
        stall_timeout=_take(c, "server.stall_timeout", t, "stall_timeout", _positive_timeout, d.stall_timeout),
        probe_interval=_take(c, "server.probe_interval", t, "probe_interval", _timeout, d.probe_interval),
        runner_pool=_take(c, "server.runner_pool", t, "runner_pool", _int(0, 64), d.runner_pool),
        stage=_take(c, "server.stage", t, "stage", _choice(*STAGE_MODES), d.stage),
        stage_dir=_take(c, "server.stage_dir", t, "stage_dir", _path(base_dir), d.stage_dir),
        stage_keep=_take(c, "server.stage_keep", t, "stage_keep", _timeout, d.stage_keep),
        context_overflow=_take(c, "server.context_overflow", t, "context_overflow", _choice(*OVERFLOW_POLICIES),
                               d.context_overflow),
        condense_model=_take(c, "server.condense_model", t, "condense_model", _str, d.condense_model),
        request_timeout=_take(c, "server.request_timeout", t, "request_timeout", _timeout, d.request_timeout),
        log_level=_take(c, "server.log_level", t, "log_level", _choice(*_LOG_LEVELS), d.log_level),
        runtime_dir=_take(c, "server.runtime_dir", t, "runtime_dir", _path(base_dir), d.runtime_dir),
        api_keys=_take(c, "server.api_keys", t, "api_keys", _keys, d.api_keys),
        api_keys_file=keys_file,
        admin_keys=_take(c, "server.admin_keys", t, "admin_keys", _keys, d.admin_keys),
        header_timeout=_take(c, "server.header_timeout", t, "header_timeout", _positive_timeout, d.header_timeout),
        body_timeout=_take(c, "server.body_timeout", t, "body_timeout", _positive_timeout, d.body_timeout),
        body_deadline=_take(c, "server.body_deadline", t, "body_deadline", _positive_timeout, d.body_deadline),
        idle_timeout=_take(c, "server.idle_timeout", t, "idle_timeout", _positive_timeout, d.idle_timeout),
        max_connections=_take(c, "server.max_connections", t, "max_connections", _int(1, 1_000_000), d.max_connections),
        max_body_size=_take(c, "server.max_body_size", t, "max_body_size", _size(1024), d.max_body_size),
    )


def _parse_memory(c: _Collector, t: Mapping[str, Any]) -> MemoryConfig:
    d = MemoryConfig()
    _check_unknown(c, "memory.", t, _MEMORY_KEYS)
    return MemoryConfig(
        gpu_overhead=_take(c, "memory.gpu_overhead", t, "gpu_overhead", parse_size, d.gpu_overhead),
        system_reserve=_take(c, "memory.system_reserve", t, "system_reserve", parse_size, d.system_reserve),
        limit=_take(c, "memory.limit", t, "limit", parse_size, d.limit),
        recovery_timeout=_take(c, "memory.recovery_timeout", t, "recovery_timeout", _timeout, d.recovery_timeout),
        recovery_poll=_take(c, "memory.recovery_poll", t, "recovery_poll", _timeout, d.recovery_poll),
    )


def _parse_model(c: _Collector, name: str, t: Any, base_dir: Path) -> ModelConfig | None:
    key = f"models.{name}"
    if not isinstance(t, dict):
        c.add(key, f"expected a table ([models.{name}]) with at least `path`, got {t!r}")
        return None
    if not _NAME.match(name):
        c.add(key, "expected a model name of letters, digits and . _ - / : (starting with a letter or digit)")
    _check_unknown(c, key + ".", t, _MODEL_KEYS)
    path: Path | None = None
    if "path" not in t:
        c.add(f"{key}.path", "missing: expected the path of a GGUF model file")
    else:
        raw = t["path"]
        if not isinstance(raw, str) or not raw:
            c.add(f"{key}.path", f"expected the path of a GGUF model file as a string, got {raw!r}")
        else:
            path = _path(base_dir)(raw)
            if not path.exists():
                c.add(f"{key}.path", f"model file {str(path)!r} does not exist (expected a readable GGUF file)")
            elif not path.is_file():
                c.add(f"{key}.path", f"{str(path)!r} is not a file (expected a readable GGUF file)")
            elif not os.access(path, os.R_OK):
                c.add(f"{key}.path", f"model file {str(path)!r} is not readable (expected a readable GGUF file)")
    aliases: tuple[str, ...] = ()
    if "aliases" in t:
        raw = t["aliases"]
        if not isinstance(raw, list) or not all(isinstance(a, str) and a for a in raw):
            c.add(f"{key}.aliases", f"expected a list of non-empty strings, got {raw!r}")
        else:
            aliases = tuple(raw)
            for a in aliases:
                if not _NAME.match(a):
                    c.add(f"{key}.aliases", f"alias {a!r}: expected letters, digits and . _ - / :")
    d = ModelConfig(name=name, path=Path("."))
    options = t.get("options", {})
    if not isinstance(options, dict):
        c.add(f"{key}.options", f"expected a table of Ollama options, got {options!r}")
        options = {}
    keep_alive = _take(c, f"{key}.keep_alive", t, "keep_alive", parse_keep_alive, None)
    m = ModelConfig(
        name=name,
        path=path or Path("."),
        aliases=aliases,
        n_ctx=_take(c, f"{key}.n_ctx", t, "n_ctx", _int(0), d.n_ctx),
        n_threads=_take(c, f"{key}.n_threads", t, "n_threads", _int(0), d.n_threads),
        n_batch=_take(c, f"{key}.n_batch", t, "n_batch", _int(1), d.n_batch),
        n_gpu_layers=_take(c, f"{key}.n_gpu_layers", t, "n_gpu_layers", _auto_or_int, d.n_gpu_layers),
        flash_attn=_take(c, f"{key}.flash_attn", t, "flash_attn", _auto_or_bool, d.flash_attn),
        cache_type_k=_take(c, f"{key}.cache_type_k", t, "cache_type_k", _choice(*CACHE_TYPES), d.cache_type_k),
        cache_type_v=_take(c, f"{key}.cache_type_v", t, "cache_type_v", _choice(*CACHE_TYPES), d.cache_type_v),
        chat_format=_take(c, f"{key}.chat_format", t, "chat_format", _str, d.chat_format),
        embedding=_take(c, f"{key}.embedding", t, "embedding", _bool, d.embedding),
        keep_alive=keep_alive,
        pinned=_take(c, f"{key}.pinned", t, "pinned", _bool, d.pinned),
        preload=_take(c, f"{key}.preload", t, "preload", _bool, d.preload),
        parallel=_take(c, f"{key}.parallel", t, "parallel", _int(1, 64), d.parallel),
        options=dict(options),
        max_num_ctx=_take(c, f"{key}.max_num_ctx", t, "max_num_ctx", _int(0), d.max_num_ctx),
        stage=_take(c, f"{key}.stage", t, "stage", _choice(*STAGE_MODES), d.stage),
        rpc_servers=_take(c, f"{key}.rpc_servers", t, "rpc_servers", _rpc_servers, d.rpc_servers),
        context_overflow=_take(c, f"{key}.context_overflow", t, "context_overflow", _choice(*OVERFLOW_POLICIES),
                               d.context_overflow),
        condense_model=_take(c, f"{key}.condense_model", t, "condense_model", _str, d.condense_model),
    )
    return m


def parse_config(data: Mapping[str, Any], *, where: str = "<config>", base_dir: Path | None = None) -> Config:
    """Validate an already-decoded TOML document."""
    c = _Collector(where)
    base = base_dir or Path.cwd()
    _check_unknown(c, "", data, {"server", "memory", "models"})
    server_t = data.get("server", {})
    memory_t = data.get("memory", {})
    models_t = data.get("models", {})
    for name, t in (("server", server_t), ("memory", memory_t), ("models", models_t)):
        if not isinstance(t, dict):
            c.add(name, f"expected a table ([{name}]), got {t!r}")
    server = _parse_server(c, server_t if isinstance(server_t, dict) else {}, base)
    memory = _parse_memory(c, memory_t if isinstance(memory_t, dict) else {})
    models: dict[str, ModelConfig] = {}
    seen: dict[str, str] = {}
    for name, t in (models_t.items() if isinstance(models_t, dict) else []):
        m = _parse_model(c, name, t, base)
        if m is None:
            continue
        for n in m.names:
            if n in seen:
                c.add(
                    f"models.{name}.aliases" if n != name else f"models.{name}",
                    f"name {n!r} is already used by model {seen[n]!r} (expected names and aliases to be unique)",
                )
            else:
                seen[n] = name
        models[name] = m
    _check_condense(c, server, models)
    if c.problems:
        raise ConfigError(c.problems)
    return Config(server=server, memory=memory, models=models)


def _check_condense(c: _Collector, server: ServerConfig, models: Mapping[str, ModelConfig]) -> None:
    """condense_model names a configured embedding model; condense has one."""
    by_name = {n: m for m in models.values() for n in m.names}

    def check(key: str, name: str) -> None:
        target = by_name.get(name)
        if target is None:
            c.add(key, f"model {name!r} is not configured (expected the name of a [models.NAME] table with embedding = true)")
        elif not target.embedding:
            c.add(key, f"model {name!r} does not serve embeddings (expected a model with embedding = true)")

    if server.condense_model is not None:
        check("server.condense_model", server.condense_model)
    for m in models.values():
        if m.condense_model is not None:
            check(f"models.{m.name}.condense_model", m.condense_model)
        if (not m.embedding and (m.context_overflow or server.context_overflow) == "condense"
                and not (m.condense_model or server.condense_model)):
            where = f"models.{m.name}.context_overflow" if m.context_overflow else "server.context_overflow"
            c.add(where, f"condense needs an embedding model to cluster with (expected condense_model in "
                         f"[models.{m.name}] or [server])")


def load_file(path: Path) -> Config:
    where = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{where}: config file does not exist (expected a TOML file)"]) from None
    except OSError as e:
        raise ConfigError([f"{where}: cannot read config file: {e.strerror}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([f"{where}: expected UTF-8 TOML text"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{where}: TOML syntax error: {e}"]) from None
    cfg = parse_config(data, where=where, base_dir=path.resolve().parent)
    return replace(cfg, source=path.resolve())


def apply_overrides(
    cfg: Config,
    env: Mapping[str, str],
    *,
    host: str | None = None,
    port: int | None = None,
) -> Config:
    """Environment variables over the file, flags over both."""
    c = _Collector("environment")
    s = cfg.server
    if env.get(ENV_HOST):
        s = replace(s, host=env[ENV_HOST])
    if env.get(ENV_PORT):
        try:
            s = replace(s, port=_int(0, 65535)(int(env[ENV_PORT])))
        except ValueError:
            c.add(ENV_PORT, f"expected a port number 0-65535, got {env[ENV_PORT]!r}")
    if env.get(ENV_KEEP_ALIVE):
        raw = env[ENV_KEEP_ALIVE]
        try:
            value: Any = float(raw) if re.fullmatch(r"-?\d+(\.\d+)?", raw.strip()) else raw
            s = replace(s, keep_alive=parse_keep_alive(value))
        except DurationError as e:
            c.add(ENV_KEEP_ALIVE, str(e))
    if env.get(ENV_API_KEYS):
        keys = tuple(k.strip() for k in env[ENV_API_KEYS].split(",") if k.strip())
        if not keys:
            c.add(ENV_API_KEYS, "expected comma-separated API keys")
        s = replace(s, api_keys=tuple(dict.fromkeys(s.api_keys + keys)))
    if env.get(ENV_MAX_LOADED):
        try:
            s = replace(s, max_loaded_models=_int(0)(int(env[ENV_MAX_LOADED])))
        except ValueError:
            c.add(ENV_MAX_LOADED, f"expected an integer >= 0, got {env[ENV_MAX_LOADED]!r}")
    if c.problems:
        raise ConfigError(c.problems)
    if host is not None:
        s = replace(s, host=host)
    if port is not None:
        s = replace(s, port=port)
    return replace(cfg, server=s)


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
) -> Config:
    env = os.environ if env is None else env
    chosen = path if path is not None else env.get(ENV_CONFIG)
    if not chosen:
        raise ConfigError(
            [f"no config file: pass --config PATH or set {ENV_CONFIG} (see configs/example.toml)"]
        )
    cfg = load_file(Path(chosen))
    return apply_overrides(cfg, env, host=host, port=port)
