"""The child side of Hoshikage: one llama_cpp.server process serving one model.

The supervisor runs ``python -m hoshikage_runner`` and talks to it like this:

1. The runner ties its life to the supervisor's (parent-death signal and a
   thread that exits the process when stdin reaches EOF), see `lifeline`.
2. It imports llama_cpp and its server stack, the slow part that does not
   depend on the model, so a spare runner can be started ahead of time,
   and everything serving would import later (`server.warm_up`).
3. It reads one JSON line from stdin: llama_cpp.server ``ModelSettings``
   fields plus our own keys: ``"fd"``, a listening Unix socket the
   supervisor bound in its private 0700 directory and passed down (no race:
   the socket exists before we run), ``"secret"``, the bearer token every
   request must carry, and ``"pooling_type"``.
4. It loads the model, adds a lock-free ``GET /health``, drops FastAPI's
   documentation routes and serves the llama_cpp.server app with uvicorn on
   that socket until SIGTERM or stdin EOF.

A runner is reachable by the supervisor only: it has no TCP port, and it
answers every request except ``GET /health`` with 401 unless it carries
``Authorization: Bearer <secret>``.  The secret travels only on stdin, never
in argv or the environment (both readable through /proc), and is never
printed.

Any start-up failure is reported as one line on stderr starting with
``error:`` and a non-zero exit status.
"""
