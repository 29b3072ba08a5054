"""Command line: `hoshikage serve [--config PATH] [--host H] [--port P]`,
`hoshikage check [--config PATH]` (validate a config and exit), and the
commands that ask a running daemon through its admin API (`client.py`):
`status`, `ps`, `list`, `load`, `unload`, `logs`, `events`, and
`export litellm` (a LiteLLM proxy config for one or several daemons, see
`export.py`).

Those find the daemon at `--url`, else `$HOSHIKAGE_URL`, else the address in
the config (`--config` or `$HOSHIKAGE_CONFIG`), else http://127.0.0.1:11434,
and send `--api-key` (else `$HOSHIKAGE_API_KEY`).  They print tables for
people and JSON with `--json`.  Exit status: 0 done, 1 the daemon reported an
error or is not there (one line on stderr, never a traceback), 2 a usage or
config error.  `-f` follows until Ctrl-C, which is a normal end (status 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from . import __version__
from .config import ENV_CONFIG, ConfigError, ServerConfig, apply_overrides, load_config, parse_config
from .export import DEFAULT_KEY_ENV, PROVIDERS

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

ENV_URL = "HOSHIKAGE_URL"
ENV_API_KEY = "HOSHIKAGE_API_KEY"
DEFAULT_URL = "http://127.0.0.1:11434"


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hoshikage", description="Serve local GGUF models through llama_cpp.server runners.")
    p.add_argument("--version", action="version", version=f"hoshikage {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the supervisor")
    serve.add_argument("--config", help="TOML config file (default: $HOSHIKAGE_CONFIG)")
    serve.add_argument("--host", help="address to listen on (default: $HOSHIKAGE_HOST, then the config)")
    serve.add_argument("--port", type=int, help="port to listen on (default: $HOSHIKAGE_PORT, then the config)")
    check = sub.add_parser("check", help="validate a config file and exit")
    check.add_argument("--config", help="TOML config file (default: $HOSHIKAGE_CONFIG)")

    daemon = argparse.ArgumentParser(add_help=False)
    where = daemon.add_argument_group("daemon")
    where.add_argument("--url", help=f"the daemon's address (default: ${ENV_URL}, then the config's host and port, then {DEFAULT_URL})")
    where.add_argument("--config", help="TOML config file to read the daemon's address from (default: $HOSHIKAGE_CONFIG)")
    where.add_argument("--api-key", help=f"admin or API key (default: ${ENV_API_KEY})")
    where.add_argument("--json", action="store_true", help="print the daemon's JSON instead of a table")

    sub.add_parser("status", parents=[daemon], help="the daemon's version, uptime, counts and counters")
    sub.add_parser("ps", parents=[daemon], help="loaded models: state, replicas and pids, size, until when")
    sub.add_parser("list", parents=[daemon], help="configured models and their aliases")
    load = sub.add_parser("load", parents=[daemon], help="load a model and wait until it is ready")
    load.add_argument("model")
    load.add_argument("--keep-alive", metavar="D", help='how long it stays loaded once idle: "10m", seconds, -1 = forever')
    sub.add_parser("reload", parents=[daemon],
                   help="read the config file again and apply it (as SIGHUP does)")
    restart = sub.add_parser("restart", parents=[daemon],
                             help="replace a loaded model's runners without downtime")
    restart.add_argument("model")
    unload = sub.add_parser("unload", parents=[daemon], help="unload a model (once its requests end), or all of them")
    unload.add_argument("model", nargs="?")
    unload.add_argument("--all", action="store_true", help="every loaded model")
    logs = sub.add_parser("logs", parents=[daemon], help="what a model's runners printed (kept after they exit)")
    logs.add_argument("model")
    logs.add_argument("-n", "--lines", type=_non_negative, metavar="N", help="the last N lines (default 100)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until Ctrl-C")
    events = sub.add_parser("events", parents=[daemon], help="lifecycle events: loads, evictions, crashes, with reasons")
    events.add_argument("--model", metavar="M", help="only this model's events")
    events.add_argument("-n", "--limit", type=_non_negative, metavar="N", help="only the last N events")
    events.add_argument("--after", type=_non_negative, default=0, metavar="SEQ", help="only events after this sequence number")
    events.add_argument("-f", "--follow", action="store_true", help="keep printing new events until Ctrl-C")

    export = sub.add_parser("export", help="configs for other tools, made from running daemons")
    targets = export.add_subparsers(dest="target", required=True)
    litellm = targets.add_parser(
        "litellm", help="a LiteLLM proxy config (YAML) for one or several running daemons",
        description="Read each daemon's models, aliases, kind and context from its own API and print a "
                    "LiteLLM proxy config with one deployment per daemon and model (see docs/scale-out.md).",
    )
    litellm.add_argument("--url", action="append", metavar="URL",
                         help="a daemon's address as LiteLLM will reach it; repeat for several "
                              f"(default: ${ENV_URL}, then the config's host and port, then {DEFAULT_URL})")
    litellm.add_argument("--config", help="TOML config file to read the daemon's address from, without --url")
    litellm.add_argument("--api-key", help=f"the daemons' API key (default: ${ENV_API_KEY}); the file refers "
                                           "to it through --key-env, never by value")
    litellm.add_argument("--admin-key", help="admin key for the daemons' /admin/ API, where it differs from --api-key")
    litellm.add_argument("--provider", choices=PROVIDERS, default="openai",
                         help="LiteLLM provider: openai (the /v1 API, default) or ollama (the /api API)")
    litellm.add_argument("--key-env", default=DEFAULT_KEY_ENV, metavar="VAR",
                         help=f"environment variable LiteLLM reads the API key from (default: {DEFAULT_KEY_ENV})")
    litellm.add_argument("--no-prefer-warm", dest="prefer_warm", action="store_false",
                         help="no `order`: spread every model evenly even where it is loaded on some daemons only")
    litellm.add_argument("-o", "--output", metavar="FILE", help="write the config to FILE instead of stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command in CLIENT_COMMANDS:
        if args.command == "unload" and bool(args.model) == bool(args.all):
            parser.error("unload: give either a MODEL or --all")  # exits with status 2
        return _client_main(args)
    if args.command == "export":
        return _export_main(args)
    try:
        cfg = load_config(
            args.config, os.environ, host=getattr(args, "host", None), port=getattr(args, "port", None)
        )
    except ConfigError as e:
        for line in e.problems:
            print(f"hoshikage: config error: {line}", file=sys.stderr)
        return 2
    if args.command == "check":
        print(f"{cfg.source}: ok, {len(cfg.models)} model(s): {', '.join(sorted(cfg.models)) or '(none)'}")
        return 0
    from .logs import setup_logging
    from .runtime import RuntimeDirError
    from .server import Server

    setup_logging(cfg.server.log_level)
    try:
        # What a reload (SIGHUP) needs to read the config again the same way.
        Server(cfg, path=args.config or os.environ.get("HOSHIKAGE_CONFIG"), host=args.host, port=args.port).run()
    except RuntimeDirError as e:  # where runner sockets go: a setting to fix, like any config error
        where = f"{cfg.source}: server.runtime_dir" if cfg.server.runtime_dir else "XDG_RUNTIME_DIR / temp directory"
        print(f"hoshikage: config error: {where}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the port is taken, say so plainly
        print(f"hoshikage: cannot serve on {cfg.server.host}:{cfg.server.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


# ------------------------------------------------------------------ asking the daemon


def daemon_url(url: str | None, config: str | None, env: Mapping[str, str]) -> str:
    """Where the daemon is: `--url`, `$HOSHIKAGE_URL`, the config's address, the default.
    Raises ConfigError for a config that cannot be read."""
    if url:
        return url
    if env.get(ENV_URL):
        return env[ENV_URL]
    if config or env.get(ENV_CONFIG):
        server = _server_settings(config or env[ENV_CONFIG], env)
        host = server.host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"  # listening everywhere: loopback is one of them
        elif host == "::":
            host = "::1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{server.port}"
    return DEFAULT_URL


def _server_settings(path: str, env: Mapping[str, str]) -> ServerConfig:
    """The config's [server] table with the environment's overrides.  Only that
    table is read: the address does not depend on whether this user can see
    the model files."""
    where = str(path)
    try:
        data = tomllib.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{where}: config file does not exist (expected a TOML file)"]) from None
    except OSError as e:
        raise ConfigError([f"{where}: cannot read config file: {e.strerror}"]) from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError([f"{where}: not a UTF-8 TOML file: {e}"]) from None
    server = data.get("server", {})
    cfg = parse_config({"server": server} if isinstance(server, dict) else data, where=where,
                       base_dir=Path(path).resolve().parent)
    return apply_overrides(cfg, env).server


def _valid_url(url: str) -> bool:
    import httpx

    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        return False
    return parsed.scheme in ("http", "https") and bool(parsed.host)


def _client_main(args: argparse.Namespace) -> int:
    from .client import AdminClient, ClientError

    try:
        url = daemon_url(args.url, args.config, os.environ)
    except ConfigError as e:
        for line in e.problems:
            print(f"hoshikage: config error: {line}", file=sys.stderr)
        return 2
    if not _valid_url(url):
        print(f"hoshikage: invalid daemon URL {url!r}: expected http://HOST:PORT", file=sys.stderr)
        return 2
    api_key = args.api_key or os.environ.get(ENV_API_KEY) or None
    try:
        with AdminClient(url, api_key) as client:
            return CLIENT_COMMANDS[args.command](client, args)
    except ClientError as e:
        print(f"hoshikage: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C is how a follow ends
        return 0 if getattr(args, "follow", False) else 130
    except BrokenPipeError:  # `hoshikage logs m | head`: the reader has what it wanted
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 0


def _export_main(args: argparse.Namespace) -> int:
    """`hoshikage export litellm`: read every daemon, then print one config."""
    from .client import AdminClient, ClientError, Unreachable
    from .export import ExportError, litellm_config, node_from_answers

    if args.url:
        urls = list(args.url)
    else:
        try:
            urls = [daemon_url(None, args.config, os.environ)]
        except ConfigError as e:
            for line in e.problems:
                print(f"hoshikage: config error: {line}", file=sys.stderr)
            return 2
    for url in urls:
        if not _valid_url(url):
            print(f"hoshikage: export: invalid --url {url!r}: expected http://HOST:PORT, as LiteLLM will reach the daemon",
                  file=sys.stderr)
            return 2
    api_key = args.api_key or os.environ.get(ENV_API_KEY) or None
    admin_key = args.admin_key or api_key
    nodes = []
    try:
        for url in urls:
            with AdminClient(url, admin_key) as admin, AdminClient(url, api_key) as api:
                status = admin.status()
                models = admin.models()
                served = api.served_names()
                shows = {m["name"]: api.show(m["name"]) for m in models
                         if m.get("configured", True) and m["name"] in served}
            nodes.append(node_from_answers(url, admin_models=models, served=served, shows=shows,
                                           version=status.get("version"), needs_key=api_key is not None))
        text = litellm_config(nodes, provider=args.provider, key_env=args.key_env, prefer_warm=args.prefer_warm)
    except ClientError as e:
        where = "" if isinstance(e, Unreachable) else f"{url}: "
        print(f"hoshikage: export: {where}{e}", file=sys.stderr)
        return 1
    except ExportError as e:
        print(f"hoshikage: export: {e}", file=sys.stderr)
        return 1
    if args.output:
        try:
            tmp = Path(args.output + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(args.output)
        except OSError as e:
            print(f"hoshikage: export: cannot write --output {args.output!r}: {e.strerror or e}", file=sys.stderr)
            return 2
    else:
        sys.stdout.write(text)
    return 0


def _out(text: str) -> None:
    print(text, flush=True)


def _status(client: Any, args: argparse.Namespace) -> int:
    from .client import format_status, print_json

    s = client.status()
    if args.json:
        print_json(s, sys.stdout)
    else:
        _out(format_status(s, client.url))
    return 0


def _ps(client: Any, args: argparse.Namespace) -> int:
    from .client import format_ps, print_json

    loaded = [m for m in client.models() if m["loaded"]]
    if args.json:
        print_json({"models": loaded}, sys.stdout)
    else:
        _out(format_ps(loaded))
    return 0


def _list(client: Any, args: argparse.Namespace) -> int:
    from .client import format_list, print_json

    models = client.models()
    if args.json:
        print_json({"models": models}, sys.stdout)
    else:
        _out(format_list(models))
    return 0


def _keep_alive(text: str | None) -> str | float | None:
    """A number of seconds as a number (a bare "300" is not a duration string), else the text."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _load(client: Any, args: argparse.Namespace) -> int:
    from .client import describe_model, print_json

    r = client.load(args.model, _keep_alive(args.keep_alive))
    if args.json:
        print_json(r, sys.stdout)
    elif r["load_duration"] > 0:
        _out(f"{describe_model(r['model'])}, loaded in {r['load_duration']:.2f}s")
    else:
        _out(f"{describe_model(r['model'])}, was already loaded")
    return 0


def _reload(client: Any, args: argparse.Namespace) -> int:
    from .client import print_json

    r = client.reload()
    if args.json:
        print_json(r, sys.stdout)
        return 0
    changed = {kind: names for kind, names in (r.get("models") or {}).items() if names and kind != "unchanged"}
    _out("reloaded: " + ("; ".join(f"{kind} {', '.join(names)}" for kind, names in changed.items()) or "no model changed"))
    for line in r.get("restart_needed") or []:
        _out(f"needs a restart to apply: {line}")
    return 0


def _restart(client: Any, args: argparse.Namespace) -> int:
    from .client import describe_model, print_json

    r = client.restart(args.model)
    if args.json:
        print_json(r, sys.stdout)
    else:
        _out(f"{describe_model(r['model'])}, restarted in {r['restart_duration']:.2f}s")
    return 0


def _unload(client: Any, args: argparse.Namespace) -> int:
    from .client import describe_model, print_json

    if args.all:
        models = client.unload_all()
        if args.json:
            print_json({"models": models}, sys.stdout)
        elif not models:
            _out("no model was loaded")
        else:
            _out("\n".join(describe_model(m) for m in models))
        return 0
    r = client.unload(args.model)
    if args.json:
        print_json(r, sys.stdout)
    else:
        _out(describe_model(r["model"]))
    return 0


def _logs(client: Any, args: argparse.Namespace) -> int:
    from .client import format_log_line, print_json

    if args.follow:
        for line in client.follow_logs(args.model, args.lines):
            _out(json.dumps(line, ensure_ascii=False) if args.json else format_log_line(line))
        return 0
    r = client.logs(args.model, args.lines)
    if args.json:
        print_json(r, sys.stdout)
    elif r["lines"]:
        _out("\n".join(format_log_line(line) for line in r["lines"]))
    return 0


def _events(client: Any, args: argparse.Namespace) -> int:
    from .client import format_event, print_json

    if args.follow:
        for e in client.follow_events(args.model, args.after, args.limit):
            _out(json.dumps(e, ensure_ascii=False) if args.json else format_event(e))
        return 0
    r = client.events(args.model, args.after, args.limit)
    if args.json:
        print_json(r, sys.stdout)
    elif r["events"]:
        _out("\n".join(format_event(e) for e in r["events"]))
    return 0


CLIENT_COMMANDS: dict[str, Callable[[Any, argparse.Namespace], int]] = {
    "status": _status,
    "ps": _ps,
    "list": _list,
    "load": _load,
    "reload": _reload,
    "restart": _restart,
    "unload": _unload,
    "logs": _logs,
    "events": _events,
}
