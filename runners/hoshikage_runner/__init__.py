"""The child side of Hoshikage: one llama_cpp.server process serving one model.

The supervisor runs ``python -m hoshikage_runner`` and talks to it like this:

1. The runner ties its life to the supervisor's (parent-death signal and a
   thread that exits the process when stdin reaches EOF), see `lifeline`.
2. It imports llama_cpp and its server stack, the slow part that does not
   depend on the model, so a spare runner can be started ahead of time.
3. It reads one JSON line from stdin: llama_cpp.server ``ModelSettings``
   fields plus ``"fd"``, a listening TCP socket the supervisor bound on
   127.0.0.1 and passed down (no port race: the port exists before we run).
4. It loads the model, adds a lock-free ``GET /health`` and serves the
   llama_cpp.server app with uvicorn on that socket until SIGTERM or stdin EOF.

Any start-up failure is reported as one line on stderr starting with
``error:`` and a non-zero exit status.
"""
