"""Command line: `hoshikage serve [--config PATH] [--host H] [--port P]`
and `hoshikage check [--config PATH]` (validate a config and exit)."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .config import ConfigError, load_config


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
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
        Server(cfg).run()
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
