"""Entry point: ``python -m hoshikage_runner`` (protocol in the package docstring)."""

from __future__ import annotations

import sys

from hoshikage_runner.lifeline import Lifeline, fail


def main() -> int:
    """Run the four protocol steps in order; the order is what makes a warm spare possible."""
    lifeline = Lifeline.install()  # 1: before anything slow, so an early supervisor death is seen
    try:
        from hoshikage_runner import server  # 2: the ~0.3 s import of llama_cpp + FastAPI + uvicorn
        server.warm_up()  # and what serving would import later
    except Exception as e:  # noqa: BLE001 - any import problem is a start-up failure to report
        fail(f"cannot import llama_cpp.server: {type(e).__name__}: {e}")
    settings = lifeline.read_settings()  # 3: blocks until the supervisor says what to load
    return server.run(settings)  # 4: load, then serve until SIGTERM / stdin EOF


if __name__ == "__main__":
    sys.exit(main())
