"""Tie a runner's life to its supervisor's, and read the settings line.

A runner must never outlive the supervisor that spawned it: an orphaned
runner keeps gigabytes of model weights in RAM/VRAM and a socket nobody
routes to.  Two mechanisms cover every way a supervisor can die:

* ``PR_SET_PDEATHSIG`` (Linux): the kernel sends SIGTERM the moment the
  parent goes away, even when it was SIGKILLed.  Fast, but Linux-only, and
  it fires when the *thread* that forked us exits, so it is not the only
  guard.
* stdin: the supervisor holds the write end of our stdin pipe.  When the
  supervisor dies, for whatever reason, the kernel closes it and our read
  returns EOF.  A daemon thread waits for that and ends the process.

This module imports nothing heavy on purpose: it runs before llama_cpp is
imported, and the fake runner used by the tests shares it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import queue
import signal
import sys
import threading
from typing import Any, NoReturn

PR_SET_PDEATHSIG = 1
# The supervisor puts its pid here so a child can tell the supervisor died even
# before the child could look at getppid() once.
ENV_SUPERVISOR_PID = "HOSHIKAGE_SUPERVISOR_PID"
# Exit status when stdin reaches EOF (the supervisor is gone or asked us to go).
EXIT_STDIN_CLOSED = 0
# Exit status for any start-up failure; the reason is on stderr, prefixed "error:".
EXIT_FAILURE = 1
# The shortest bearer secret a runner accepts (the supervisor sends 43 characters).
MIN_SECRET_CHARS = 16


def fail(message: str, status: int = EXIT_FAILURE) -> NoReturn:
    """Print one ``error:`` line (what the supervisor surfaces to clients) and exit."""
    flat = " ".join(str(message).split())
    print(f"error: {flat}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(status)


def install_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `sig` when our parent dies; False where unsupported.

    A parent that died before the prctl call would never send the signal,
    so afterwards we check that it is still there: the parent has not
    changed since before the call, and the supervisor named in the
    environment (when a wrapper such as ``timeout`` sits between us) is
    still alive.  A supervisor that is itself pid 1 is no special case.
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except OSError:
        return False
    if os.getppid() != parent or not _supervisor_alive():
        os._exit(EXIT_STDIN_CLOSED)  # the supervisor is already gone
    return True


def _supervisor_alive() -> bool:
    expected = os.environ.get(ENV_SUPERVISOR_PID, "")
    if not expected.isdigit():
        return True  # not told: the getppid() check is all we have
    try:
        os.kill(int(expected), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class Lifeline:
    """The stdin watcher: hands over the first line, then exits the process on EOF.

    One thread owns fd 0 for the whole life of the process, so there is no
    hand-over gap during which an EOF could go unnoticed: it reads the
    settings line, passes it to the main thread through a queue, and keeps
    reading until EOF, then calls ``os._exit`` (no clean-up can hang it).
    """

    def __init__(self, fd: int = 0) -> None:
        self._fd = fd
        self._first_line: queue.Queue[bytes | None] = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._run, name="hoshikage-lifeline", daemon=True)

    @classmethod
    def install(cls) -> "Lifeline":
        """Step 1 of the protocol: parent-death signal, then the stdin watcher."""
        install_parent_death_signal()
        lifeline = cls()
        lifeline._thread.start()
        return lifeline

    def _run(self) -> None:
        buffered = b""
        handed_over = False
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except InterruptedError:  # pragma: no cover - PEP 475 retries already
                continue
            except OSError:
                chunk = b""
            if not chunk:
                if not handed_over:
                    self._first_line.put(None)
                os._exit(EXIT_STDIN_CLOSED)
            if handed_over:
                continue  # anything after the settings line is ignored
            buffered += chunk
            if b"\n" in buffered:
                line, _, _rest = buffered.partition(b"\n")
                self._first_line.put(line)
                handed_over = True
                buffered = b""

    def read_settings(self) -> dict[str, Any]:
        """Block until the supervisor sends the settings line; parse it as a JSON object.

        The line carries the runner's secret: errors about it describe the
        line, never repeat it.
        """
        line = self._first_line.get()
        if line is None:
            os._exit(EXIT_STDIN_CLOSED)  # supervisor gone before telling us what to load
        try:
            settings = json.loads(line)
        except ValueError as e:
            fail(f"settings line is not valid JSON: {e}")
        if not isinstance(settings, dict):
            fail(f"settings line must be a JSON object, got {type(settings).__name__}")
        fd = settings.get("fd")
        if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
            fail(f"settings: 'fd' must be the inherited listening socket's descriptor, got {fd!r}")
        secret = settings.get("secret")
        if not isinstance(secret, str) or len(secret) < MIN_SECRET_CHARS:
            # A runner without a secret would answer anyone who can reach its socket.
            fail(f"settings: 'secret' must be a string of at least {MIN_SECRET_CHARS} characters")
        return settings
