"""The supervisor side of one runner process.

A `RunnerProcess` owns exactly one child (``python -m hoshikage_runner`` by
default): it binds the child's listening socket, spawns it, sends the
settings line, waits until ``GET /health`` answers, keeps the child's output
(logged, the last 8 KiB kept for error messages, and each line handed to an
optional ``output`` sink: the model's `runnerlogs.RunnerLog`, which outlives
the process), notices when the child exits, and stops it.  Scheduling
(which runner serves what, when to unload) is someone else's job; this
module only makes one process lifecycle robust:
no socket race, no orphan, no zombie, and load errors that say what went
wrong instead of Ollama's opaque "llama runner process has terminated".

Nothing but the supervisor may talk to a runner: a request sent to it
directly would bypass the queue and the API keys, and make the scheduler
believe a busy runner is idle.  So a runner has no TCP port:

* It listens on a Unix domain socket (mode 0600) in the supervisor's private
  0700 runtime directory (see `hoshikage_sup.runtime`).  We bind it and pass
  the listening descriptor to the child, so it exists before the child runs;
  its file is removed once the child has exited.
* It answers only requests that carry ``Authorization: Bearer <secret>``,
  except ``GET /health``.  The secret is random per runner and reaches the
  child only in the settings line on its stdin: not in argv, not in the
  environment (both readable through /proc), never logged.
* `session` is an aiohttp session bound to that socket with the secret
  already in its headers; use it with `base_url` as the URL prefix
  (``runner.session.get(runner.base_url + "/v1/models")``).  It is closed
  once the child has exited.

Lifecycle (``state``)::

    new --start()--> starting --/health ok--> ready --stop()--> stopping --> exited
     |                  ^   |                   |                              ^
     |                  |   +-- load error/timeout/cancel, crash, stop() ------+
     +--spawn()--> spare -- assign(spec), start() ---------------------------->+ (or exits)

A *spare* is a child spawned before anyone knows which model it will serve
(``RunnerProcess(None)``, then `spawn`): it pays for its imports (about 0.3 s
for llama_cpp, FastAPI and uvicorn) and then waits for its settings line.
`assign` gives it a spec; `start` then only sends the settings and waits
for readiness, and ``load_duration`` counts from that moment.

``on_exit(runner, returncode)`` semantics: it is called exactly once for
every child that was actually spawned, from a task on the event loop, after
the child has been reaped and ``returncode``/``state == "exited"`` are set and
its output has been drained.  That includes a child that failed to load (the
callback runs before `start` raises `RunnerLoadError`), a child stopped with
`stop`, and a child that crashed while ready.  It is not called when the
spawn itself failed (no process existed).  A scheduler tells the cases apart
with ``runner.ready_at is None`` (never became ready) and
``runner.stop_requested`` (the exit was asked for); a crash is
``ready_at is not None and not stop_requested``.  ``on_exit`` is a plain
attribute: it may also be set after construction, before the child exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import os
import re
import secrets
import signal
import socket
import stat
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import aiohttp
import structlog

from hoshikage_runner.lifeline import ENV_SUPERVISOR_PID

from .runtime import RuntimeDirError, check_socket_path, create_runtime_dir, remove_runtime_dir, socket_name

# Bytes of child output kept for error messages (Ollama keeps the same amount).
OUTPUT_TAIL_BYTES = 8 * 1024
# Readiness is polled at this interval when a probe fails outright.
READY_POLL_INTERVAL = 0.25
# A probe waits this long for an answer.  The listening socket exists before
# the child runs, so a probe sent during load simply waits in the backlog and
# is answered the moment uvicorn starts serving; a timeout only costs a retry.
READY_PROBE_TIMEOUT = 2.0
# After the child exits, wait at most this long for the rest of its output.
OUTPUT_DRAIN_TIMEOUT = 2.0
# The URL prefix of every request to a runner through its `session`.  The
# session's connector ignores the host and always connects to the runner's
# socket; the name only shows up in the Host header.
BASE_URL = "http://runner"
# A connection the runner has not used for this long is closed by the
# runner; the client side lets go of idle connections well before that, so
# a request is never sent on a connection the runner is closing.
KEEPALIVE_TIMEOUT = 30.0
# A line longer than this is logged in pieces (llama.cpp prints progress dots without newlines).
MAX_LINE_BYTES = 4096
# Relevant lines kept for `error_summary`, and how much of each.
MAX_RELEVANT_LINES = 10
MAX_SUMMARY_LINE_CHARS = 500
FALLBACK_SUMMARY_LINES = 10

# Lines that explain why a runner failed: our runner's "error:" lines,
# llama.cpp/ggml failures, and the last line of a Python traceback.
ERROR_LINE = re.compile(
    r"error:|CUDA error|GGML_ASSERT|out of memory|failed to load|error loading model"
    r"|\bllama_model_load:|^\s*[A-Za-z_][\w.]*(?:Error|Exception)\b[^:]*:",
    re.IGNORECASE,
)

# Output that is routine, never the reason for a failure.
CHATTER_LINE = re.compile(
    r"^(llama_perf_\w+|llama_print_timings|Llama\.generate:|INFO:|system_info:|"
    r"fake runner serving)"  # the test runner's ready line is routine too
    r"|\b(AVX|SSE3|NEON) = \d"
    r"|\btime =\s+[\d.]+ ms"
    r"|graphs reused ="
)

STATES = ("new", "spare", "starting", "ready", "stopping", "exited")
OnExit = Callable[["RunnerProcess", int], None]
# Where each output line goes besides the log: output(replica, pid, text, looks_like_error).
OutputSink = Callable[[int, int | None, str, bool], Any]

# Socket names are numbered per supervisor, so runners never reuse a path.
_socket_numbers = itertools.count(1)


@dataclass(frozen=True)
class RunnerSpec:
    """Everything that decides how a runner loads its model; equal specs are interchangeable runners."""

    model_name: str
    model_path: str
    n_ctx: int
    n_threads: int  # <= 0: a fair share of the cores (see `settings`)
    n_batch: int = 512
    n_gpu_layers: int = 0
    tensor_split: tuple[float, ...] | None = None
    main_gpu: int = 0
    flash_attn: bool = False
    type_k: int | None = None
    type_v: int | None = None
    chat_format: str | None = None
    embedding: bool = False
    # llama_cpp.server defaults this to True; see `settings` for why we do not.
    logits_all: bool = False
    # llama.cpp's enum llama_pooling_type (1 = mean); None = the model's own.
    # Not a ModelSettings field: the runner applies it itself.
    pooling_type: int | None = None
    # llama.cpp RPC servers ("host:port") for the offloaded layers; sent as
    # ModelSettings' comma-separated rpc_servers, which the runner registers
    # itself (hoshikage_runner.rpc).
    rpc_servers: tuple[str, ...] = ()

    def settings(self, fd: int, secret: str, thread_budget: str | None = None) -> dict[str, Any]:
        """The JSON line sent to the child: llama_cpp.server ``ModelSettings``
        fields plus the runner's own ``fd`` (the listening socket), ``secret``
        (the bearer token it must require), ``pooling_type`` and
        ``thread_budget``.  It carries the secret: never log it.

        ``n_threads`` <= 0 asks for a fair share: the runner starts with every
        usable core and, given ``thread_budget`` (the supervisor's shared
        file, see `hoshikage_sup.threads`), follows the share published there
        before each decode step.

        ``n_threads_batch`` follows ``n_threads`` so a runner stays inside the
        thread budget the scheduler gave it (llama_cpp.server would otherwise
        use every CPU for prompt processing).  ``use_mlock`` is off: locking
        the weights in RAM fails under the usual RLIMIT_MEMLOCK and would pin
        memory the page cache shares between replicas.

        ``logits_all`` is off unless asked for: llama_cpp.server's default
        (True) keeps an ``n_ctx × n_vocab`` float32 array of logits and has
        llama.cpp compute the output layer for every prompt token.  With the
        demo model (262k vocabulary, n_ctx 2048) a 1000-token prompt grew the
        runner from 0.4 to 2.4 GiB RSS and took 1.6× as long.  Only
        ``logprobs`` requests need it (they fail with a 500 without it).
        """
        from .threads import usable_cpus

        threads = self.n_threads if self.n_threads > 0 else usable_cpus()
        return {
            "model": self.model_path,
            "model_alias": self.model_name,
            "n_ctx": self.n_ctx,
            "n_threads": threads,
            "n_threads_batch": threads,
            "n_batch": self.n_batch,
            "n_gpu_layers": self.n_gpu_layers,
            "tensor_split": list(self.tensor_split) if self.tensor_split is not None else None,
            "main_gpu": self.main_gpu,
            "flash_attn": self.flash_attn,
            "type_k": self.type_k,
            "type_v": self.type_v,
            "chat_format": self.chat_format,
            "embedding": self.embedding,
            "rpc_servers": ",".join(self.rpc_servers) or None,
            "use_mmap": True,
            "use_mlock": False,
            "logits_all": self.logits_all,
            "pooling_type": self.pooling_type,
            "thread_budget": thread_budget if self.n_threads <= 0 else None,
            "verbose": True,
            "fd": fd,
            "secret": secret,
        }


class RunnerUnreachable(aiohttp.ClientConnectorError):
    """The runner's socket refused the connection: the runner never had the request."""

    def __init__(self, path: str | None, os_error: OSError) -> None:
        # ClientConnectorError.__init__ wants aiohttp's ConnectionKey, whose
        # fields change between releases; there was no connection to key.
        aiohttp.ClientOSError.__init__(self, os_error.errno, os_error.strerror)
        self._os_error = os_error
        self.path = path
        self.args = (path, os_error)

    @property
    def host(self) -> str:
        return "runner"

    @property
    def port(self) -> int | None:
        return None

    @property
    def ssl(self) -> bool:
        return False

    def __str__(self) -> str:
        return f"Cannot connect to unix socket {self.path} [{self.strerror}]"


class RunnerGone(RunnerUnreachable):
    """A request for a runner that has exited, refused before anything was sent.

    The runner's `session` is closed once the child has exited, and aiohttp
    answers a request on a closed session with a RuntimeError.  For a caller
    this is a refused connection (the runner never had the request, so it may
    go to another runner), and it is reported as one: a
    `ClientConnectorError` carrying ECONNREFUSED.
    """

    def __init__(self, socket_path: str | None) -> None:
        super().__init__(socket_path, ConnectionRefusedError(errno.ECONNREFUSED, "runner has exited"))


class RunnerLoadError(Exception):
    """A runner did not become ready; the message carries the child's own explanation.

    ``summary`` holds the relevant output lines (see `RunnerProcess.error_summary`),
    ``returncode`` the child's exit status (negative: killed by that signal; None
    if it never ran).
    """

    def __init__(self, message: str, *, model: str, summary: str = "", returncode: int | None = None):
        self.model = model
        self.summary = summary
        self.returncode = returncode
        full = f"{message}: {summary}" if summary else message
        super().__init__(full)


def describe_returncode(returncode: int | None) -> str:
    """'exit status 1' / 'killed by signal SIGKILL' as people read them."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class RunnerProcess:
    """One child process serving one model on the Unix socket `socket_path` (see the module docstring).

    ``runtime_dir`` is the private directory the socket goes in (the
    supervisor's, from `hoshikage_sup.runtime.create_runtime_dir`); without
    one the runner makes a private directory of its own and removes it when
    the child has exited.

    ``output`` (optional) receives every line the child prints, as
    ``output(replica, pid, text, looks_like_error)``, on the event loop; the
    scheduler passes its model's `RunnerLog.append`.
    """

    def __init__(
        self,
        spec: RunnerSpec | None,
        *,
        replica: int = 0,
        log: Any = None,
        on_exit: OnExit | None = None,
        python: str = sys.executable,
        env: dict[str, str] | None = None,
        command: Sequence[str] | None = None,
        runtime_dir: Path | str | None = None,
        output: OutputSink | None = None,
    ) -> None:
        self.spec = spec  # None for a spare until `assign`
        self.replica = replica
        self._base_log = (log if log is not None else structlog.get_logger("hoshikage.runner")).bind(
            model=spec.model_name if spec is not None else "(spare)", replica=replica
        )
        self._log = self._base_log
        self.on_exit = on_exit
        self.output = output
        self._command = list(command) if command is not None else [python, "-m", "hoshikage_runner"]
        self._env = env
        self._runtime_dir = Path(runtime_dir) if runtime_dir is not None else None
        self._own_dir: Path | None = None  # a directory made for this runner alone
        self.socket_path: str | None = None  # set when the socket is bound
        self.base_url: str = BASE_URL  # the URL prefix for requests through `session`
        self._secret = secrets.token_urlsafe(32)  # never logged, never in argv or the environment
        self._session: aiohttp.ClientSession | None = None
        self.pid: int | None = None
        self.started_at: float | None = None  # wall clock (time.time()) at spawn
        self.spawned_for: float | None = None  # seconds a spare waited before `assign` (None: not a spare)
        self.ready_at: float | None = None  # wall clock when /health first answered
        self.load_duration: float | None = None  # seconds from spawn to ready
        self.state: str = "new"
        self.returncode: int | None = None
        self.stop_requested = False
        self._proc: asyncio.subprocess.Process | None = None
        self._tail = bytearray()
        self._output_bytes = 0  # all output so far; places relevant lines relative to the tail
        self._relevant: deque[tuple[int, str]] = deque(maxlen=MAX_RELEVANT_LINES)
        self._last_output = 0.0  # loop time of the last output byte: load progress
        self._exited = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Future[int] | None = None
        self._fd = -1  # the listening socket's descriptor number, the same in the child
        self.thread_budget: str | None = None  # the shared fair-share file (hoshikage_sup.threads), if any
        self.load_path: str | None = None  # a staged copy to load instead of spec.model_path (staging.py)
        self._spared_at = 0.0

    @property
    def name(self) -> str:
        """The model's name, or "(spare)" for a spare not yet assigned."""
        return self.spec.model_name if self.spec is not None else "(spare)"

    def __repr__(self) -> str:
        return (
            f"<RunnerProcess {self.name}#{self.replica} pid={self.pid} "
            f"socket={self.socket_path} state={self.state}>"
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        """The HTTP client for this runner: its socket, its secret, no connection limit.

        Exists from `start` on; closed once the child has exited.  Requests
        take `base_url` as their URL prefix.
        """
        if self._session is None:
            raise RuntimeError(f"{self!r}: not started")
        return self._session

    def auth_headers(self) -> dict[str, str]:
        """The header that opens this runner, for a client of one's own (benchmarks
        that compare the supervisor with its runner hit directly).  Never log it."""
        return {"Authorization": f"Bearer {self._secret}"}

    async def post(self, path: str, **kwargs: Any) -> aiohttp.ClientResponse:
        """POST ``path`` to the runner through `session`; ``kwargs`` as for ``ClientSession.post``.

        Once the runner has exited (its session is closed) this raises
        `RunnerGone`, a ``ClientConnectorError`` like any refused connection,
        instead of aiohttp's RuntimeError for a closed session.  The check and
        the start of the request happen without a pause in between, so the
        session cannot close in the gap.
        """
        session = self.session
        if session.closed:
            raise RunnerGone(self.socket_path)
        return await session.post(self.base_url + path, **kwargs)

    # ------------------------------------------------------------------ start

    async def spawn(self) -> None:
        """Bind the socket and spawn the child, without sending settings: a spare.

        The child imports its server stack and then waits on stdin.  Give it a
        spec with `assign`, then `start` it.  Raises `RunnerLoadError` when
        the socket or the process cannot be made.
        """
        if self.state != "new":
            raise RuntimeError(f"{self!r}: spawn() only applies to a new runner")
        self.state = "starting"
        await self._bind_and_spawn()
        self.state = "spare"
        self._spared_at = asyncio.get_running_loop().time()

    def assign(self, spec: RunnerSpec, *, replica: int = 0, log: Any = None,
               output: OutputSink | None = None) -> None:
        """Tell a spare which model it will load (before `start`)."""
        if self.state != "spare":
            raise RuntimeError(f"{self!r}: only a waiting spare can be assigned")
        self.spec = spec
        self.replica = replica
        self._base_log = (log if log is not None else self._base_log).bind(model=spec.model_name, replica=replica)
        self._log = self._base_log.bind(pid=self.pid)
        self.output = output
        self.spawned_for = asyncio.get_running_loop().time() - self._spared_at
        self._relevant.clear()  # what it printed while waiting explains nothing about this model

    async def start(self, load_timeout: float = 300.0) -> None:
        """Spawn the child (unless it is an assigned spare) and return once it
        serves; raise `RunnerLoadError` otherwise.

        ``load_timeout`` counts from the child's last output, not from the
        spawn: a big model that keeps printing progress is not killed, a
        silent hang is.  On any failure, cancellation included, the child is
        killed and reaped before this returns.
        """
        if self.spec is None:
            raise RuntimeError(f"{self!r}: a spare needs assign() before start()")
        if self.spawned_for is not None and self.ready_at is None and self.state in ("spare", "exited"):
            if self._exited.is_set():  # the spare died after it was assigned
                raise self._exit_error()
        elif self.state == "new":
            self.state = "starting"
            await self._bind_and_spawn()
        else:
            raise RuntimeError(f"{self!r}: start() can only be called once")
        self.state = "starting"
        loop = asyncio.get_running_loop()
        sent_at = self._last_output = loop.time()  # a spare may have been quiet for hours
        try:
            await self._send_settings(self._fd)
            await self._wait_ready(load_timeout)
        except BaseException as e:
            await self._abort_start()
            if isinstance(e, RunnerLoadError) or not isinstance(e, Exception):
                raise  # RunnerLoadError as is; CancelledError/KeyboardInterrupt untouched
            raise self._load_error(f"runner failed to start ({type(e).__name__}: {e})") from e
        self.load_duration = loop.time() - sent_at
        self.ready_at = time.time()
        self.state = "ready"
        self._relevant.clear()
        self._log.info("runner ready", socket=self.socket_path, load_duration=round(self.load_duration, 3),
                       spare=self.spawned_for is not None)

    async def _bind_and_spawn(self) -> None:
        """Bind the listening socket and spawn the child with it (`start`, `spawn`)."""
        try:
            sock = self._bind()
        except (OSError, RuntimeDirError) as e:
            self.state = "exited"
            self._remove_socket()
            raise RunnerLoadError(f"cannot create a socket for model {self.name!r}: {e}",
                                  model=self.name) from e
        try:
            self._fd = sock.fileno()
            self._session = self._open_session()
            await self._spawn(self._fd)
        except BaseException:
            sock.close()
            if self._proc is None:
                self.state = "exited"
                self._remove_socket()
                await self._close_session()
            raise
        sock.close()  # the child holds its own copy; ours would keep the socket alive after it dies

    def _bind(self) -> socket.socket:
        """Bind the child's listening socket here, so it exists before the child does.

        The file is made 0600 before ``listen``: until then a connection
        attempt is refused, so there is no moment when the socket accepts
        connections under looser permissions.
        """
        directory = self._runtime_dir
        if directory is None:
            directory = self._own_dir = create_runtime_dir()
        path = check_socket_path(directory / socket_name(next(_socket_numbers)))
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # left by an earlier runner of that name; anything else makes bind fail
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            self.socket_path = path
            os.chmod(path, 0o600)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        return sock

    def _open_session(self) -> aiohttp.ClientSession:
        """The runner's own HTTP client (see `session`)."""
        assert self.socket_path is not None
        connector = aiohttp.UnixConnector(path=self.socket_path, limit=0, keepalive_timeout=KEEPALIVE_TIMEOUT)
        return aiohttp.ClientSession(
            connector=connector,
            headers=self.auth_headers(),
            # Callers give each request its own timeout; a generation may take long.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,  # bytes are passed on to clients exactly as the runner sent them
        )

    async def _close_session(self) -> None:
        if self._session is not None and not self._session.closed:
            try:
                await self._session.close()
            except Exception:  # noqa: BLE001 - a runner that is gone leaves nothing to close cleanly
                self._log.debug("closing the runner's session failed", exc_info=True)

    def _remove_socket(self) -> None:
        """Unlink the socket file (and the runner's own directory, if it has one)."""
        if self.socket_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)
        if self._own_dir is not None:
            remove_runtime_dir(self._own_dir)
            self._own_dir = None

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ if self._env is None else self._env)
        # systemd's notify socket and watchdog are the supervisor's, not a runner's.
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(key, None)
        env["PYTHONUNBUFFERED"] = "1"  # output must arrive line by line: it is our progress signal
        env[ENV_SUPERVISOR_PID] = str(os.getpid())
        return env

    async def _spawn(self, fd: int) -> None:
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self._command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                pass_fds=(fd,),
                # Its own session: a Ctrl-C in the supervisor's terminal reaches the
                # supervisor, which drains and then stops its runners, instead of
                # cutting their generations at once.  (Supervisor death is still
                # seen: parent-death signal and the stdin lifeline.)
                start_new_session=True,
                env=self._child_env(),
            )
        except OSError as e:
            raise RunnerLoadError(
                f"cannot start runner for model {self.name!r} ({self._command[0]}: {e})",
                model=self.name,
            ) from e
        self.pid = self._proc.pid
        self.started_at = time.time()
        self._last_output = asyncio.get_running_loop().time()
        self._log = self._base_log.bind(pid=self.pid)
        self._log.info("runner spawned", socket=self.socket_path, command=self._command)
        self._reader = asyncio.create_task(self._read_output(), name=f"runner-output-{self.pid}")
        self._watcher = asyncio.create_task(self._watch(), name=f"runner-watch-{self.pid}")

    async def _send_settings(self, fd: int) -> None:
        """Write the settings line to the child's stdin; it holds the secret, so it goes nowhere else."""
        assert self._proc is not None and self._proc.stdin is not None and self.spec is not None
        settings = self.spec.settings(fd, self._secret, self.thread_budget)
        if self.load_path is not None:
            settings["model"] = self.load_path
        line = json.dumps(settings, separators=(",", ":")) + "\n"
        self._proc.stdin.write(line.encode())
        try:
            await self._proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the child is already gone; _wait_ready reports why

    async def _wait_ready(self, load_timeout: float) -> None:
        """Probe /health until it answers, the child exits, or it has been silent too long."""
        assert self._watcher is not None
        loop = asyncio.get_running_loop()
        while True:
            if self._exited.is_set():
                raise self._exit_error()
            if self.stop_requested:
                raise self._load_error("runner was stopped while loading")
            silent_for = loop.time() - self._last_output
            if silent_for > load_timeout:
                raise self._load_error(
                    f"runner did not become ready: no progress for {load_timeout:g} s"
                )
            attempt = min(READY_PROBE_TIMEOUT, load_timeout - silent_for + 0.05)
            probe = asyncio.ensure_future(self._probe(attempt))
            done, _ = await asyncio.wait({probe, self._watcher}, return_when=asyncio.FIRST_COMPLETED)
            if probe not in done:
                probe.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await probe
                continue
            outcome = probe.result()
            if outcome == "ready":
                if self.stop_requested:  # stop() came while this probe was in flight
                    raise self._load_error("runner was stopped while loading")
                return
            if outcome == "refused":
                await asyncio.wait({self._watcher}, timeout=READY_POLL_INTERVAL)

    async def _probe(self, timeout: float) -> str:
        """One readiness attempt: 'ready', 'timeout' (still loading) or 'refused'."""
        try:
            body = await self._get_health(timeout)
        except asyncio.TimeoutError:
            return "timeout"
        except (aiohttp.ClientError, OSError, ValueError):
            return "refused"
        return "ready" if body is not None else "refused"

    async def _get_health(self, timeout: float) -> dict[str, Any] | None:
        """GET /health; the parsed body when the runner says it is ok, else None."""
        client_timeout = aiohttp.ClientTimeout(total=timeout)
        session = self.session
        if session.closed:  # the child has exited; a probe racing with that is just refused
            raise RunnerGone(self.socket_path)
        async with session.get(f"{self.base_url}/health", timeout=client_timeout) as response:
            if response.status != 200:
                return None
            body = await response.json(content_type=None)
        if isinstance(body, dict) and body.get("status") == "ok":
            return body
        return None

    async def _abort_start(self) -> None:
        """Kill a child that failed to start and wait until it is reaped (on_exit has run)."""
        self._kill()
        if self._watcher is None:
            return
        try:
            await asyncio.shield(self._watcher)
        except asyncio.CancelledError:
            # Cancelled again while cleaning up: the watcher still runs to completion
            # on its own (the child is already SIGKILLed), and the caller's error wins.
            pass

    def _exit_error(self) -> RunnerLoadError:
        if self.stop_requested:
            return self._load_error("runner was stopped while loading")
        return self._load_error(f"runner exited while loading ({describe_returncode(self.returncode)})")

    def _load_error(self, what: str) -> RunnerLoadError:
        return RunnerLoadError(
            f"model {self.name!r}: {what}",
            model=self.name,
            summary=self.error_summary(),
            returncode=self.returncode,
        )

    # ----------------------------------------------------------------- output

    async def _read_output(self) -> None:
        """Log the child's output line by line, keep its tail, and note progress for the load timeout."""
        assert self._proc is not None and self._proc.stdout is not None
        stream = self._proc.stdout
        loop = asyncio.get_running_loop()
        pending = b""
        while True:
            chunk = await stream.read(65536)
            if not chunk:
                break
            self._last_output = loop.time()
            self._keep_tail(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._emit(line)
            while len(pending) > MAX_LINE_BYTES:
                self._emit(pending[:MAX_LINE_BYTES])
                pending = pending[MAX_LINE_BYTES:]
        if pending:
            self._emit(pending)

    def _keep_tail(self, chunk: bytes) -> None:
        self._output_bytes += len(chunk)
        self._tail += chunk
        if len(self._tail) > OUTPUT_TAIL_BYTES:
            del self._tail[: len(self._tail) - OUTPUT_TAIL_BYTES]

    def _emit(self, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip()
        if not text.strip():
            return
        if self._secret in text:  # runners never print it; if one ever did, it goes no further
            text = text.replace(self._secret, "[secret]")
        error = bool(ERROR_LINE.search(text))
        if error:
            self._relevant.append((self._output_bytes, text.strip()[:MAX_SUMMARY_LINE_CHARS]))
            self._log.warning("runner output", line=text)
        else:
            self._log.info("runner output", line=text)
        if self.output is not None:
            try:
                self.output(self.replica, self.pid, text, error)
            except Exception:  # noqa: BLE001 - a broken sink must not stop the reading of the output
                self._log.exception("runner output sink failed")

    def output_tail(self) -> str:
        """The last 8 KiB of the child's combined stdout/stderr."""
        return self._tail.decode("utf-8", errors="replace")

    def error_summary(self) -> str:
        """The lines that explain a failure, for client-facing errors.

        The error-looking lines (``error:``, ``CUDA error``, ``GGML_ASSERT``,
        out of memory, model load failures, a traceback's last line) when
        there are any, else the last few lines of output.  Only lines still
        inside the 8 KiB tail count, and lines from the load are forgotten
        once the runner is ready: a crash hours later must not be explained
        by an old request's error or a harmless load-time warning.
        """
        window_start = self._output_bytes - OUTPUT_TAIL_BYTES
        relevant = [line for offset, line in self._relevant if offset > window_start]
        if relevant:
            return "\n".join(relevant)
        lines = [line.strip() for line in self.output_tail().splitlines() if line.strip()]
        # llama.cpp's routine chatter (timings after each request, CPU flags,
        # uvicorn's access and lifecycle lines) explains nothing: a runner that
        # died without a word is better described by its exit status alone.
        lines = [line for line in lines if not CHATTER_LINE.search(line)]
        return "\n".join(line[:MAX_SUMMARY_LINE_CHARS] for line in lines[-FALLBACK_SUMMARY_LINES:])

    # ------------------------------------------------------------------- exit

    async def _watch(self) -> None:
        """Reap the child, drain its output, then publish the exit (state, event, on_exit).

        The socket file goes before anyone hears of the exit, so a request
        made afterwards fails to connect (the runner never had it); the
        session is closed after on_exit, once the scheduler no longer hands
        this runner out.
        """
        assert self._proc is not None and self._reader is not None
        returncode = await self._proc.wait()
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), OUTPUT_DRAIN_TIMEOUT)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self._reader.cancel()  # something else holds the pipe open; the child itself is gone
        except Exception:  # noqa: BLE001 - a broken reader must not hide the exit
            self._log.exception("runner output reader failed")
        self.returncode = returncode
        previous = self.state
        self.state = "exited"
        self._close_stdin()
        self._remove_socket()
        self._exited.set()
        self._log_exit(previous, returncode)
        if self.on_exit is not None:
            try:
                self.on_exit(self, returncode)
            except Exception:  # noqa: BLE001 - the callback's bug is not the runner's
                self._log.exception("runner on_exit callback failed")
        await self._close_session()

    def _log_exit(self, previous: str, returncode: int) -> None:
        how = describe_returncode(returncode)
        if previous == "spare" and not self.stop_requested:
            self._log.warning("spare runner exited", returncode=returncode, how=how, error=self.error_summary())
        elif previous == "ready" and not self.stop_requested:
            self._log.warning("runner exited unexpectedly", returncode=returncode, how=how,
                              error=self.error_summary())
        else:
            self._log.info("runner exited", returncode=returncode, how=how)

    def _close_stdin(self) -> None:
        if self._proc is not None and self._proc.stdin is not None:
            with contextlib.suppress(Exception):
                self._proc.stdin.close()

    def _signal(self, sig: int) -> None:
        if self._proc is not None and self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    def _kill(self) -> None:
        self._signal(signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL a child that no longer works (the watchdog's call); a stopped
        (SIGSTOP) child dies too.  Its exit is reported as usual (on_exit)."""
        self._kill()

    # ------------------------------------------------------------------- stop

    async def stop(self, grace: float = 5.0) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit status.

        Idempotent and safe to call concurrently: every caller waits for the
        same shutdown, which includes closing `session`.  Cancelling a caller
        does not cancel the shutdown.  Before `start` it just marks the
        runner exited (and returns 0).
        """
        self.stop_requested = True
        if self._proc is None:
            self.state = "exited"
            return 0
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop(grace))
        return await asyncio.shield(self._stop_task)

    async def _stop(self, grace: float) -> int:
        if not self._exited.is_set():
            self.state = "stopping"
            self._log.info("stopping runner", grace=grace)
            self._signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._exited.wait(), grace)
            except asyncio.TimeoutError:
                self._log.warning("runner ignored SIGTERM, killing it", grace=grace)
                self._kill()
        await self._finished()
        assert self.returncode is not None
        return self.returncode

    async def _finished(self) -> None:
        """Wait until the exit is fully handled: reaped, on_exit called, session closed."""
        assert self._watcher is not None
        await asyncio.shield(self._watcher)

    async def wait(self) -> int:
        """Wait for the child to exit (for any reason) and return its exit status.

        Returns once the exit is fully handled (on_exit has run, `session` is closed).
        """
        if self._proc is None or self._watcher is None:
            raise RuntimeError(f"{self!r}: not started")
        await self._finished()
        assert self.returncode is not None
        return self.returncode

    # ----------------------------------------------------------------- health

    async def probe(self, timeout: float) -> bool:
        """True when the runner really generates: one token (or one embedding)
        within ``timeout``.  A runner can answer /health and never generate."""
        if self.state != "ready" or self._session is None or self._session.closed:
            return False
        path, body = (("/v1/embeddings", {"input": "probe"}) if self.spec is not None and self.spec.embedding
                      else ("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "temperature": 0}))
        try:
            async with self._session.post(self.base_url + path, json=body,
                                          timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                await response.read()
                return response.status == 200
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def health(self, timeout: float = 1.0) -> bool:
        """True when the child answers ``GET /health`` with status ok within ``timeout``.

        The runner's /health takes no model lock, so this stays cheap and
        truthful while a generation is running.
        """
        if self.state not in ("ready", "starting") or self._exited.is_set():
            return False
        try:
            return await self._get_health(timeout) is not None
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError, ValueError):
            return False
