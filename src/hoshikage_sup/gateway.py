"""The one internal request path.

Every API layer (OpenAI, Ollama, admin) turns its request into an
`InferenceRequest` and opens it here: model lookup, a lease from the
scheduler (queueing and loading included), the HTTP call to the runner, the
retry of requests that never reached a runner that died, and the release of
the lease however the request ends.  The layers only translate shapes.

The call to the runner goes through `upstream.RunnerConnections`, kept
per runner process: pooled keep-alive connections over its Unix socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Mapping

import aiohttp

from . import overflow, sse
from .config import Config, ModelConfig
from .errors import BadRequest, HoshikageError, ModelNotFound, RunnerFailed, UpstreamTimeout, runner_error
from .logs import get_logger
from .process import describe_returncode
from .scheduler import Lease, RunnerOptions, Scheduler
from .upstream import Exchange, RunnerConnections, RunnerResponse, RunnerStalled

log = get_logger("hoshikage.gateway")

UPSTREAM_PATHS = {
    "chat": "/v1/chat/completions",
    "completion": "/v1/completions",
    "embedding": "/v1/embeddings",
}
TOKENS_PATH = "/hoshikage/tokens"  # the runner's own token counts (runners/hoshikage_runner/tokens.py)

# A request that failed before the runner answered anything (the runner died
# between being chosen and being reached) is tried again on a fresh lease.
MAX_ATTEMPTS = 3


@dataclass
class InferenceRequest:
    model: str  # as the client sent it: a name or an alias
    kind: str  # "chat" | "completion" | "embedding"
    body: dict[str, Any]  # OpenAI-shaped body for the runner
    keep_alive: float | None = None  # seconds; None leaves the session unchanged
    runner_options: Mapping[str, Any] | None = None  # e.g. {"n_ctx": 4096}
    truncate: bool = False  # embeddings: cut inputs longer than the context instead of a 400
    # chats: "error" | "truncate" | "condense" (overflow.py); None = the model's policy
    context_overflow: str | None = None
    # `body` already encoded, sent as it is: the API layer vouches that it is
    # `body` with `model` naming the configured model (the OpenAI layer passes
    # a client's own bytes on when checking them changed nothing).
    raw: bytes | None = None


@dataclass
class Upstream:
    """An open response from a runner.  Valid inside `Gateway.open()` only."""

    response: RunnerResponse
    lease: Lease
    model: ModelConfig
    stall_timeout: float | None = None  # seconds without a byte before the stream is given up
    on_stall: Callable[[Any, str], None] | None = None  # (replica, why): replace the wedged runner
    started: float = field(default_factory=time.monotonic)
    # What a context_overflow policy did to the conversation (None: nothing);
    # the API layers return it as `hoshikage.context_overflow`.
    overflow: dict[str, Any] | None = None
    fit_seconds: float = 0.0  # spent on the policy (counting, condensing) before the lease was asked for

    @property
    def status(self) -> int:
        return self.response.status

    @property
    def content_type(self) -> str:
        return self.response.content_type

    @property
    def streaming(self) -> bool:
        return self.response.content_type == "text/event-stream"

    async def read(self) -> bytes:
        try:
            return await self.response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise await self._failure_seen(e) from e

    async def json(self) -> Any:
        raw = await self.read()
        try:
            return json.loads(raw)
        except ValueError as e:
            raise RunnerFailed(f"runner for '{self.model.name}' answered with invalid JSON: {raw[:200]!r}") from e

    async def iter_raw(self) -> AsyncIterator[bytes]:
        """Bytes exactly as the runner sends them, as soon as they arrive.  A
        runner that sends nothing for stall_timeout while we wait for it is
        wedged: the request fails with a 504 and the runner is replaced.
        (Only the runner's silence counts, not a client that is slow to take
        what we send; one timer per response watches, see upstream.py.)"""
        response = self.response
        response.watch_stall(self.stall_timeout)
        readany = response.readany
        try:
            while True:
                chunk = await readany()
                if not chunk:
                    return
                yield chunk
        except RunnerStalled:
            why = f"stall: sent nothing for {self.stall_timeout:g} s (stall_timeout)"
            if self.on_stall is not None:
                self.on_stall(self.lease.replica, why)
            raise UpstreamTimeout(
                f"runner for model '{self.model.name}' {why[len('stall: '):]}; it is being replaced"
            ) from None
        except aiohttp.ClientError as e:
            raise await self._failure_seen(e) from e
        except asyncio.TimeoutError as e:  # the overall request_timeout
            raise self._failure(e) from e

    async def iter_events(self) -> AsyncIterator[dict[str, Any]]:
        """Parsed server-sent events (`data: {...}`), ending at `[DONE]`."""
        raw = self.iter_raw()
        events = sse.split(raw)
        try:
            async for _, data in events:
                if not data:
                    continue
                if data == sse.DONE:
                    return
                try:
                    yield json.loads(data)
                except ValueError as e:
                    raise RunnerFailed(f"runner sent an invalid event: {data[:200]!r}") from e
        finally:
            # Closed here, not by the garbage collector's hook (a thread-safe
            # wake-up of the event loop for each stream).
            await events.aclose()
            await raw.aclose()

    def _failure(self, e: BaseException) -> HoshikageError:
        if isinstance(e, asyncio.TimeoutError):
            return UpstreamTimeout(f"request to model '{self.model.name}' exceeded request_timeout")
        return RunnerFailed(_runner_failure_message(self.lease, e))

    async def _failure_seen(self, e: BaseException) -> HoshikageError:
        """`_failure`, once a runner that dropped the connection is seen to have
        exited, so the message carries its exit status and last error lines."""
        if not isinstance(e, asyncio.TimeoutError):
            await _settle(self.lease)
        return self._failure(e)


async def _settle(lease: Lease) -> None:
    """Give a runner that dropped or refused a connection a moment to be seen as exited."""
    proc = lease.replica.process
    if proc.returncode is None:
        with contextlib.suppress(asyncio.TimeoutError, Exception):
            await asyncio.wait_for(proc.wait(), 1.0)


def _runner_failure_message(lease: Lease, e: BaseException) -> str:
    proc = lease.replica.process
    msg = f"runner for model '{lease.model.name}' failed while serving the request ({type(e).__name__}: {e})"
    if lease.replica.slot.draining == "shutdown":
        return f"the server is shutting down: the runner for model '{lease.model.name}' was stopped under the request"
    if proc.returncode is not None:
        msg = (f"runner for model '{lease.model.name}' exited while serving the request "
               f"({describe_returncode(proc.returncode)})")
        summary = proc.error_summary()
        msg += f": {summary}" if summary else "; it printed no error"
    return msg


class Gateway:
    def __init__(self, config: Config, scheduler: Scheduler):
        self.config = config
        self.scheduler = scheduler
        # Each runner process's connections; those of runners that exited are
        # dropped when a new runner's are made.
        self._connections: dict[Any, RunnerConnections] = {}
        # Each model's default runner options, made once per config of it.
        self._defaults: dict[str, tuple[ModelConfig, RunnerOptions]] = {}
        self.overflow = overflow.Tally()  # context_overflow policies that acted, for /metrics

    def options(self, model: ModelConfig, overrides: Mapping[str, Any] | None = None) -> RunnerOptions:
        """The runner options a request for `model` asks for (`overrides`: e.g. {"n_ctx": 4096})."""
        if overrides:
            return RunnerOptions.for_model(model, overrides)
        cached = self._defaults.get(model.name)
        if cached is None or cached[0] is not model:
            cached = self._defaults[model.name] = (model, RunnerOptions.for_model(model))
        return cached[1]

    def resolve(self, name: Any) -> ModelConfig:
        if not isinstance(name, str) or not name:
            raise BadRequest("missing required field 'model'", param="model")
        model = self.config.resolve(name)
        if model is None:
            raise ModelNotFound(name)
        return model

    async def post_to_runner(self, process: Any, path: str, body: bytes, *,
                             headers: Mapping[str, str] | None = None, timeout: float | None = None) -> Exchange:
        """The one call to a runner: POST `body` (JSON) to `path` on one of its
        pooled connections.  Returns once the request is sent; its `head`
        resolves with the response.  (Tests wrap it to see what is sent.)"""
        connections = self._connections.get(process)
        if connections is None:
            for gone in [p for p in self._connections if p.returncode is not None]:
                self._connections.pop(gone).close()
            connections = self._connections[process] = RunnerConnections(process)
        return await connections.post(path, body, headers=headers, timeout=timeout)

    @contextlib.asynccontextmanager
    async def open(self, req: InferenceRequest) -> AsyncIterator[Upstream]:
        model = self.resolve(req.model)
        if req.kind == "embedding" and not model.embedding:
            raise BadRequest(
                f"model '{model.name}' does not serve embeddings (set embedding = true in its [models.{model.name}] table)",
                param="model",
            )
        options = self.options(model, req.runner_options)
        payload = req.raw
        report = None
        fit_seconds = 0.0
        if req.kind == "chat":
            policy = req.context_overflow or self.config.overflow_policy(model)
            if policy != "error":
                started = time.monotonic()
                fitted, report = await self._fit(model, options, req, policy)
                fit_seconds = time.monotonic() - started
                if report is not None:
                    report["seconds"] = round(fit_seconds, 3)
                    self.overflow.add(model.name, report)
                    log.info("context overflow handled", model=model.name, **report)
                    payload = json.dumps({**fitted, "model": model.name}, separators=(",", ":")).encode()
        elif req.context_overflow not in (None, "error"):
            raise BadRequest("context_overflow applies to chat requests (messages) only", param="context_overflow")
        if payload is None:
            body = req.body if req.body.get("model") == model.name else {**req.body, "model": model.name}
            payload = json.dumps(body, separators=(",", ":")).encode()
        stream = bool(req.body.get("stream"))
        timeout = self.config.server.request_timeout or None
        path = UPSTREAM_PATHS[req.kind]
        headers = {"X-Hoshikage-Truncate": "true"} if req.truncate else None
        for attempt in range(1, MAX_ATTEMPTS + 1):
            lease = await self.scheduler.acquire(model, options, req.keep_alive)
            process = lease.replica.process
            dead_before = process.returncode is not None
            exchange: Exchange | None = None
            try:
                exchange = await self.post_to_runner(process, path, payload, headers=headers, timeout=timeout)
                response = await exchange.head
            except asyncio.CancelledError:
                # The client went away before the runner answered.  A stream
                # stops when its connection closes; a non-streaming generation
                # runs to its end inside the runner whatever we do, so the
                # runner stays leased until it has really finished.
                if exchange is not None and not stream:
                    self._hold_until_done(exchange, lease)
                else:
                    if exchange is not None:
                        exchange.abort()
                    self.scheduler.release(lease)
                raise
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
                if exchange is not None:
                    exchange.abort()
                self.scheduler.release(lease)
                if isinstance(e, asyncio.TimeoutError) and lease.alive:
                    raise UpstreamTimeout(f"request to model '{model.name}' exceeded request_timeout") from e
                await _settle(lease)
                # Only a request the runner never had is sent again: the
                # connection was refused, the runner was dead already, or a live
                # runner dropped an idle connection.  A runner that died with the
                # request in hand (it crashed on it) would just crash again.
                died_on_it = (
                    not isinstance(e, aiohttp.ClientConnectorError)
                    and not dead_before
                    and lease.replica.process.returncode is not None
                )
                if attempt < MAX_ATTEMPTS and not died_on_it:
                    log.warning("runner unreachable, retrying on a fresh runner", model=model.name, attempt=attempt, error=str(e))
                    continue
                raise RunnerFailed(_runner_failure_message(lease, e)) from e
            except BaseException:
                if exchange is not None:
                    exchange.abort()
                self.scheduler.release(lease)
                raise
            try:
                yield Upstream(response=response, lease=lease, model=model,
                               stall_timeout=self.config.server.stall_timeout, on_stall=self.scheduler.pool.kill_wedged,
                               overflow=report, fit_seconds=fit_seconds)
            finally:
                response.close()
                self.scheduler.release(lease)
            return

    async def _fit(self, model: ModelConfig, options: RunnerOptions, req: InferenceRequest,
                   policy: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Apply a context_overflow policy: the body to send and what was done
        (None when the conversation fits as it is)."""

        async def count_chat(body: dict[str, Any]) -> overflow.Counted:
            texts = [overflow.content_text(m.get("content")) for m in body["messages"]]
            data = await self._runner_json(model, options, req.keep_alive, {**body, "stream": False, "texts": texts})
            return overflow.counted(data["n_ctx"], data["prompt_tokens"], data["text_tokens"])

        async def count_texts(texts: list[str]) -> list[int]:
            data = await self._runner_json(model, options, req.keep_alive, {"texts": texts})
            return data["text_tokens"]

        embed = None
        condense_name = self.config.condense_model(model)
        if condense_name is not None:
            async def embed(texts: list[str]) -> Any:
                # Inputs longer than the condense model's context are cut, not refused.
                ask = InferenceRequest(model=condense_name, kind="embedding", body={"input": texts}, truncate=True)
                async with self.open(ask) as up:
                    raw = await up.read()
                    if up.status >= 400:
                        raise runner_error(up.status, raw, condense_name)
                    return overflow.vectors_of(json.loads(raw))

        outcome = await overflow.Fitter(model.name, count_chat, count_texts, embed).fit(req.body, policy)
        return outcome.body, outcome.report

    async def _runner_json(self, model: ModelConfig, options: RunnerOptions, keep_alive: float | None,
                           body: dict[str, Any]) -> dict[str, Any]:
        """POST `body` to a runner of `model`'s /hoshikage/tokens and return its JSON answer."""
        lease = await self.scheduler.acquire(model, options, keep_alive)
        exchange: Exchange | None = None
        try:
            payload = json.dumps(body, separators=(",", ":")).encode()
            exchange = await self.post_to_runner(lease.replica.process, TOKENS_PATH, payload,
                                                 timeout=self.config.server.request_timeout or None)
            response = await exchange.head
            try:
                raw = await response.read()
            finally:
                response.close()
        except BaseException as e:
            if exchange is not None:
                exchange.abort()
            if isinstance(e, (aiohttp.ClientError, asyncio.TimeoutError)):
                raise RunnerFailed(f"runner for model '{model.name}' could not count the conversation's tokens "
                                   f"({type(e).__name__}: {e})") from e
            raise
        finally:
            self.scheduler.release(lease)
        if response.status != 200:
            raise runner_error(response.status, raw, model.name)
        try:
            return json.loads(raw)
        except ValueError as e:
            raise RunnerFailed(f"runner for '{model.name}' answered the token count with invalid JSON") from e

    def _hold_until_done(self, exchange: Exchange, lease: Lease) -> None:
        """The client left; the runner finishes the generation anyway: its
        lease goes back when the answer has arrived (read and dropped), or the
        connection failed."""
        exchange.close_when_done()
        exchange.done.add_done_callback(lambda _: self.scheduler.release(lease))

    async def load(self, name: str, keep_alive: float | None = None, runner_options: Mapping[str, Any] | None = None) -> Lease:
        """Load a model without sending it a request (Ollama's empty prompt)."""
        model = self.resolve(name)
        lease = await self.scheduler.acquire(model, self.options(model, runner_options), keep_alive, load_only=True)
        self.scheduler.release(lease)
        return lease

    def unload(self, name: str) -> ModelConfig:
        model = self.resolve(name)
        self.scheduler.unload(model.name)
        return model
