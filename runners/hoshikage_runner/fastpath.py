"""A lean path for streamed completions and chats: the same events as llama_cpp.server, with less work per token.

Where a streamed token's time went in llama_cpp.server (0.3.x), on top of
llama.cpp's own decode:

* ``Llama._create_completion`` detokenises the whole completion again for
  every token (one ctypes call per token so far), and for every chunk it
  sends it detokenises the unsent tokens once more;
* the repeat penalty (``repeat_penalty`` defaults to 1.1 in the server's
  request models) runs as llama.cpp's penalties sampler, which looks every
  one of the vocabulary's entries up in a hash map for every token
  (262,144 lookups for the demo model), although at most
  ``last_n_tokens_size`` (64) distinct tokens can be penalised;
* every chunk crosses from the event loop to a worker thread and back
  (``iterate_in_threadpool``: one thread hop per token, with the decode not
  running in between), then goes through an anyio memory stream,
  sse-starlette's task group and encoder, and ``request.is_disconnected()``.

Here a request that needs nothing else runs in one worker thread from
tokenisation to the last chunk, while the event loop writes whatever
chunks are ready, in one write: the next token is decoded while the
previous one is on its way.  Per token the thread does one ``Llama.eval``
(so every decode still goes through ``LlamaContext.decode`` and the
bookkeeping of ``Llama``: cached prefixes, ``input_ids``), one
``llama_sampler_sample`` with the sampler chain llama_cpp builds
(``Llama._init_sampler``), and the text bookkeeping of
``_create_completion`` done incrementally on cached token pieces; the chunk
is formatted from a template around ``json``'s own string encoder.

What stays the same, and why it is the same:

* Tokens: the same prompt tokens (the same tokenisation calls, or the chat
  handler's own), the same prefix reuse as ``Llama.generate``, the same
  chain built by ``Llama._init_sampler`` with the same seed (a fixed
  ``seed``, or the next one drawn from ``Llama._seed``, as
  ``_create_completion`` does).  The repeat penalty alone (no frequency or
  presence penalty) is applied by this module to the at most
  ``last_n_tokens_size`` logits it concerns, right before the chain samples,
  and the chain is built without it: the window is the same (the tokens
  sampled so far, not the prompt, exactly as llama_cpp feeds llama.cpp's
  sampler), and each penalised logit gets the same float32 value, since a
  product or quotient of two float32 numbers computed in double precision
  and rounded to float32 is the correctly rounded float32 result.  The
  logits are put back after sampling.  So greedy decoding and a fixed seed
  give the same tokens as llama_cpp.server.  With a frequency or presence
  penalty, llama.cpp's penalties sampler stays in the chain as before.
* Text and events: the same algorithm as ``_create_completion``'s streaming
  branch, step by step (the multi-byte hold-back heuristics, stop sequences
  searched in the whole text, the held-back tail that could start a stop
  sequence, the final flush that cuts at the stop), fed with the bytes
  ``Llama.detokenize`` would return (``llama_token_to_piece`` into the same
  32-byte buffer, the same leading-space rule after a BOS), so chunk
  boundaries, texts, ``finish_reason`` and the stopping criteria of a chat
  format behave identically.  Chats get llama_cpp's role chunk first and
  the same chunk shapes (``_convert_text_completion_chunks_to_chat``).  Ids
  (``cmpl-<uuid4>``, ``chatcmpl-...``), ``created`` and ``model`` are made
  the same way; the JSON is byte for byte what ``json.dumps`` makes of
  llama_cpp's dicts, and the events are sse-starlette's (``data: ...\\n\\n``,
  ``[DONE]`` at the end, a ping comment every 15 s).  There is no usage
  chunk: llama_cpp.server ignores ``stream_options``, and so does this.
* Serving: the model lock is taken the same way (one request at a time),
  failures before the first event and after it are answered as `guards`
  answers them, a client that goes away stops the generation before the
  next token, and ``interrupt_requests`` is honoured.

Everything else goes to llama_cpp.server's own route, unchanged: requests
without ``stream``; ``logprobs``/``top_logprobs``, ``echo``, ``suffix``,
``logit_bias``, ``grammar``, ``response_format``, tools and functions,
``min_tokens``, ``n`` or ``best_of`` other than 1, a prompt that is a list
or empty; and models with a prompt cache, a draft model, embeddings, or a
chat handler other than a chat-format template (llava and the like).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import ctypes
import inspect
import json
import random
import sys
import threading
import time
import traceback
import uuid
import warnings
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, MutableMapping

import llama_cpp
import llama_cpp.llama_chat_format as llama_chat_format
import llama_cpp.llama_cpp as llama_low  # the bindings as llama_cpp's own modules call them
import llama_cpp.server.app as llama_app
import numpy as np
from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
from starlette.datastructures import MutableHeaders
from starlette.responses import Response

from hoshikage_runner import guards

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"

# sse-starlette's default ping interval (llama_cpp.server does not change it).
PING_INTERVAL = 15.0
# The buffer llama_cpp's LlamaModel.detokenize reads each piece into: a longer piece comes back empty.
PIECE_BUFFER = 32

_encode_str = json.encoder.encode_basestring_ascii  # what json.dumps uses for every string
_DONE = b"data: [DONE]\n\n"
_CHAT_HANDLER = "chat_formatter_to_chat_completion_handler.<locals>.chat_completion_handler"


# ------------------------------------------------------------------ what the fast path takes


def _is_plain(body: Any) -> bool:
    """What both routes need for the fast path: a stream with nothing llama_cpp does per request or per token."""
    return (
        body.stream is True
        and body.logit_bias is None
        and body.grammar is None
        and body.min_tokens == 0
        and body.n in (None, 1)
        and body.presence_penalty is not None
        and body.frequency_penalty is not None
    )


def completion_is_plain(body: CreateCompletionRequest) -> bool:
    return (
        _is_plain(body)
        and isinstance(body.prompt, str)
        and body.prompt != ""
        and body.logprobs is None
        and body.echo is False
        and body.suffix is None
        and body.best_of in (None, 1)
    )


def chat_is_plain(body: CreateChatCompletionRequest) -> bool:
    return (
        _is_plain(body)
        and not body.logprobs
        and body.top_logprobs is None
        and body.response_format is None
        and body.tools is None
        and body.tool_choice is None
        and body.functions is None
        and body.function_call is None
    )


def model_is_plain(llama: llama_cpp.Llama) -> bool:
    """A model whose generation is `Llama.generate`'s plain loop: no prompt cache, draft model or embeddings."""
    return (
        llama.cache is None
        and llama.draft_model is None
        and not llama.context_params.embeddings
        and type(llama.tokenizer_) is llama_cpp.LlamaTokenizer
    )


def chat_handler_of(llama: llama_cpp.Llama) -> Any:
    """The handler ``create_chat_completion`` would use, if it is a chat-format template's; else None."""
    handler = (
        llama.chat_handler
        or llama._chat_handlers.get(llama.chat_format)
        or llama_chat_format.get_chat_completion_handler(llama.chat_format)
    )
    if getattr(handler, "__qualname__", None) == _CHAT_HANDLER and handler.__module__ == llama_chat_format.__name__:
        return handler
    return None


# ------------------------------------------------------------------ tokens to text


class Vocabulary:
    """Token pieces and end-of-generation flags of one model, as llama_cpp computes them, cached."""

    def __init__(self, llama: llama_cpp.Llama) -> None:
        self.vocab = llama._model.vocab
        self.bos = llama.token_bos()
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        self._buffer = (ctypes.c_char * PIECE_BUFFER)()
        self._lock = threading.Lock()

    def piece(self, token: int) -> bytes:
        """``LlamaModel.detokenize([token])`` without its BOS rule: the piece, empty if over 32 bytes."""
        piece = self._pieces.get(token)
        if piece is None:
            with self._lock:
                n = llama_low.llama_token_to_piece(self.vocab, llama_low.llama_token(token), self._buffer,
                                                   PIECE_BUFFER, 0, False)
                piece = bytes(self._buffer[:n])  # llama_cpp slices the same way, a negative n included
            self._pieces[token] = piece
        return piece

    def is_eog(self, token: int) -> bool:
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(llama_low.llama_vocab_is_eog(self.vocab, token))
        return eog

    def detokenize(self, tokens: list[int]) -> bytes:
        """``Llama.detokenize(tokens)``: the pieces, less a leading space after a leading BOS."""
        piece = self.piece
        out = b"".join([piece(t) for t in tokens])
        if tokens and tokens[0] == self.bos and out[:1] == b" ":
            return out[1:]
        return out


# ------------------------------------------------------------------ one generation


class Cancelled(Exception):
    """The request went away (or was interrupted): stop before the next token."""


class Job:
    """What a plain request asks for, and how its chunks look.

    Built on the event loop from the request body; `run` (in a worker
    thread, under the model lock) does the rest.
    """

    def __init__(self, *, chat: bool, body: Any, kwargs: dict[str, Any]) -> None:
        self.chat = chat
        self.body = body
        self.kwargs = kwargs
        # Filled by run(), read by the event loop.
        self.chunks: collections.deque[bytes] = collections.deque()
        self.finished = False
        self.error: BaseException | None = None
        self.cancelled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None

    # ---------------------------------------------------------- thread → loop handoff

    def _emit(self, data: bytes) -> None:
        self.chunks.append(data)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            self._loop.call_soon_threadsafe(_resolve, waiter)  # type: ignore[union-attr]

    async def wait(self) -> None:
        """Until a chunk is ready or the job is over."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiter = waiter
        if self.chunks or self.finished:  # produced before the waiter was visible
            self._waiter = None
            return
        await waiter

    def cancel(self) -> None:
        self.cancelled = True

    # ---------------------------------------------------------- the worker thread

    def run(self, llama: llama_cpp.Llama, vocabulary: Vocabulary, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        try:
            if self.chat:
                options = chat_completion_options(llama, self.kwargs)
            else:
                options = dict(self.kwargs)
                options["max_tokens"] = -1 if options.get("max_tokens") is None else options["max_tokens"]
            if options is None:  # cannot happen: the handler was checked before
                raise RuntimeError("chat handler did not ask for a completion")
            stream_completion(self, llama, vocabulary, options)
        except BaseException as error:  # noqa: BLE001 - handed to the event loop, which reports it
            self.error = error
        finally:
            self.finished = True
            self._wake()

    # ---------------------------------------------------------- chunk formats

    def formats(self, completion_id: str, created: int, model: str) -> None:
        """Templates for this request's chunks: ``json.dumps`` of llama_cpp's dicts, with the text put in."""
        marker = "\x00"
        if self.chat:
            base = {"id": "chat" + completion_id, "model": model, "created": created,
                    "object": "chat.completion.chunk"}

            def choice(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
                return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

            self._role = _event(json.dumps(choice({"role": "assistant"}, None)))
            text = json.dumps(choice({"content": marker}, None))
            self._final = lambda reason: _event(json.dumps(choice({}, reason)))
        else:
            base = {"id": completion_id, "object": "text_completion", "created": created, "model": model}

            def choice_text(text: str, finish: str | None) -> dict[str, Any]:
                return {**base, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

            self._role = None
            text = json.dumps(choice_text(marker, None))
            self._final = lambda reason: _event(json.dumps(choice_text("", reason)))
        head, _, tail = text.rpartition(_encode_str(marker))  # the text is the last field
        self._head = "data: " + head
        self._tail = tail + "\n\n"

    def text_chunk(self, text: str) -> None:
        if self._role is not None:
            role, self._role = self._role, None
            self._emit(role)
        self._emit((self._head + _encode_str(text) + self._tail).encode("ascii"))

    def final_chunk(self, finish_reason: str) -> None:
        if self._role is not None:
            role, self._role = self._role, None
            self._emit(role)
        self._emit(self._final(finish_reason))


def _event(data: str) -> bytes:
    return ("data: " + data + "\n\n").encode("ascii")


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Capture:
    """Stands in for the ``Llama`` a chat handler is given and keeps what it asks ``create_completion`` for."""

    def __init__(self, llama: llama_cpp.Llama) -> None:
        self.__dict__["_llama"] = llama
        self.__dict__["completion"] = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llama, name)

    def create_completion(self, **kwargs: Any) -> Any:
        self.__dict__["completion"] = kwargs
        return iter(())


def chat_completion_options(llama: llama_cpp.Llama, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The ``create_completion`` arguments llama_cpp's chat handler would use for this chat.

    ``Llama.create_chat_completion`` runs as it is, with the real handler
    (prompt formatting, tokenisation, stop strings, stopping criteria), on a
    stand-in whose ``create_completion`` only records its arguments.
    """
    capture = _Capture(llama)
    llama_cpp.Llama.create_chat_completion(capture, **kwargs)  # type: ignore[arg-type]
    options = capture.completion
    if options is None:
        return None
    options = dict(options)
    options["max_tokens"] = -1 if options.get("max_tokens") is None else options["max_tokens"]
    return options


def completion_prompt_tokens(llama: llama_cpp.Llama, prompt: str | list[int]) -> list[int]:
    """``_create_completion``'s prompt tokens for a prompt without suffix."""
    if isinstance(prompt, list):
        return list(prompt)
    model = llama._model
    bos_token_id = llama.token_bos()
    cls_token_id = model.token_cls()
    sep_token_id = model.token_sep()
    bos_tokens = [cls_token_id if cls_token_id != -1 else bos_token_id]
    eos_tokens = [sep_token_id if sep_token_id != -1 else llama.token_eos()]
    if not model.add_bos_token() or bos_tokens[:1] == [-1]:
        bos_tokens = []
    if not model.add_eos_token() and sep_token_id == -1:
        eos_tokens = []
    prefix_tokens = llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) if prompt != "" else []
    return bos_tokens + prefix_tokens + eos_tokens


def stream_completion(job: Job, llama: llama_cpp.Llama, vocab: Vocabulary, options: dict[str, Any]) -> None:
    """``Llama._create_completion(stream=True)`` without logprobs, suffix, echo, grammar or logit bias.

    The same checks, errors and steps in the same order, with the text kept
    incrementally instead of detokenised again for every token.
    """
    prompt = options["prompt"]
    completion_id = f"cmpl-{str(uuid.uuid4())}"
    created = int(time.time())
    prompt_tokens = completion_prompt_tokens(llama, prompt)
    if len(prompt) == 0:  # cannot happen: such prompts are handed off (the completion would start with BOS)
        raise RuntimeError("empty prompt on the fast path")
    stop = options.get("stop", [])
    stop = stop if isinstance(stop, list) else [stop] if isinstance(stop, str) else []
    model = options.get("model")
    model_name = model if model is not None else llama.model_path
    job.formats(completion_id, created, model_name)

    if prompt_tokens[:2] == [llama.token_bos()] * 2:
        warnings.warn(
            f'Detected duplicate leading "{llama._model.token_get_text(llama.token_bos())}" in prompt, '
            "this will likely reduce response quality, consider removing it...",
            RuntimeWarning,
        )
    if llama.verbose:
        llama._ctx.reset_timings()
    n_ctx = llama._n_ctx
    if len(prompt_tokens) >= n_ctx:
        raise ValueError(
            f"Requested tokens ({len(prompt_tokens)}) exceed context window of {llama_cpp.llama_n_ctx(llama.ctx)}"
        )
    max_tokens = options.get("max_tokens", 16)
    if max_tokens is None or max_tokens <= 0:
        max_tokens = n_ctx - len(prompt_tokens)
    max_tokens = max_tokens if max_tokens + len(prompt_tokens) < n_ctx else (n_ctx - len(prompt_tokens))
    stop_sequences = [s.encode("utf-8") for s in stop] if stop != [] else []
    seed = options.get("seed")
    if seed is not None:
        llama.set_seed(seed)
    else:
        llama.set_seed(random.Random(llama._seed).randint(0, 2**32))

    stopping_criteria = options.get("stopping_criteria")
    tokens = Sampling(llama, options).tokens(prompt_tokens, stopping_criteria, job)

    detokenize = vocab.detokenize
    piece = vocab.piece
    is_eog = vocab.is_eog
    text_chunk = job.text_chunk
    completion_tokens: list[int] = []
    raw = bytearray()  # the pieces of completion_tokens; all_text is this, less the BOS rule
    returned_tokens = 0
    finish_reason = "length"
    multibyte_fix = 0
    for token in tokens:
        if is_eog(token):
            finish_reason = "stop"
            break
        completion_tokens.append(token)
        raw += piece(token)
        all_text = raw[1:] if completion_tokens[0] == vocab.bos and raw[:1] == b" " else raw

        # Contains multi-byte UTF8
        for k, char in enumerate(all_text[-3:]):
            k = 3 - k
            for num, pattern in ((2, 192), (3, 224), (4, 240)):
                if num > k and pattern & char == pattern:
                    multibyte_fix = num - k
        # Stop incomplete bytes from passing
        if multibyte_fix > 0:
            multibyte_fix -= 1
            continue

        if stop_sequences and any(s in all_text for s in stop_sequences):
            finish_reason = "stop"
            break

        remaining_tokens = completion_tokens[returned_tokens:]
        remaining_text = detokenize(remaining_tokens)
        remaining_length = len(remaining_text)
        # Hold back what could be the start of a stop sequence.
        first_stop_position = 0
        for s in stop_sequences:
            for i in range(min(len(s), remaining_length), 0, -1):
                if remaining_text.endswith(s[:i]):
                    if i > first_stop_position:
                        first_stop_position = i
                    break
        token_end_position = 0
        while len(remaining_tokens) > 0:
            for i in range(1, len(remaining_tokens) + 1):
                try:
                    bs = detokenize(remaining_tokens[:i])
                    ts = bs.decode("utf-8")
                    break
                except UnicodeError:
                    pass
            else:
                break
            token_end_position += len(bs)
            if token_end_position > (remaining_length - first_stop_position):
                break
            remaining_tokens = remaining_tokens[i:]
            returned_tokens += i
            text_chunk(ts)

        if len(completion_tokens) >= max_tokens:
            finish_reason = "length"
            break

    if stopping_criteria is not None and stopping_criteria(llama._input_ids, llama._scores[-1, :]):
        finish_reason = "stop"
    if llama.verbose:
        llama._ctx.print_timings()

    # The final flush: what is left, cut at a stop sequence.
    remaining_tokens = completion_tokens[returned_tokens:]
    remaining_text = detokenize(remaining_tokens)
    any_stop = [s for s in stop_sequences if s in remaining_text]
    end = min(remaining_text.index(s) for s in any_stop) if any_stop else len(remaining_text)
    token_end_position = 0
    for token in remaining_tokens:
        token_end_position += len(detokenize([token]))
        if token_end_position >= end:
            last_text = detokenize([token])
            if token_end_position == end - 1:
                break
            returned_tokens += 1
            text_chunk(last_text[: len(last_text) - (token_end_position - end)].decode("utf-8", errors="ignore"))
            break
        returned_tokens += 1
        text_chunk(detokenize([token]).decode("utf-8", errors="ignore"))
    job.final_chunk(finish_reason)


# ------------------------------------------------------------------ sampling


def _greedy(logits: np.ndarray) -> int:
    """llama.cpp's greedy choice (the first of the largest logits), or -1 to
    let its sampler decide: a NaN, which its comparisons skip, is not ours to judge."""
    token = int(logits.argmax())
    return -1 if logits[token] != logits[token] else token


def _f32(value: float) -> float:
    return ctypes.c_float(value).value


class Sampling:
    """``Llama.generate`` for one request: prefix reuse, eval, and llama_cpp's sampler chain.

    The repeat penalty alone is applied here (see the module docstring);
    any other penalty stays in llama.cpp's chain.  Greedy decoding with no
    penalty left in the chain is the chain's greedy sampler done here: the
    first of the largest logits, which is what it selects.  llama.cpp would
    first copy all the vocabulary's logits into a candidate array (about
    0.8 ms a token for the demo model's 262,144 entries on 2 CPU cores)
    and then scan it; here the logits are scanned where they are.
    """

    def __init__(self, llama: llama_cpp.Llama, options: dict[str, Any]) -> None:
        self.llama = llama
        repeat = options.get("repeat_penalty", 1.0)
        frequency = options.get("frequency_penalty", 0.0)
        presence = options.get("presence_penalty", 0.0)
        last_n = max(llama.last_n_tokens_size, 0)
        self.penalty = 0.0  # 0: none applied here
        if _f32(frequency) == 0.0 and _f32(presence) == 0.0 and last_n > 0 and _f32(repeat) != 1.0:
            self.penalty = _f32(repeat)  # the float32 llama.cpp would use, as a double
            repeat = 1.0  # llama_cpp then adds llama.cpp's no-op sampler in its place
        self.last_n = last_n
        temperature = options.get("temperature", 0.8)
        # _init_sampler's greedy branch, with nothing else in the chain but the no-op penalty sampler
        self.greedy = temperature == 0.0 and _f32(repeat) == 1.0 and _f32(frequency) == 0.0 and _f32(presence) == 0.0
        self.chain = llama._init_sampler(
            top_k=options.get("top_k", 40),
            top_p=options.get("top_p", 0.95),
            min_p=options.get("min_p", 0.05),
            typical_p=options.get("typical_p", 1.0),
            temp=temperature,
            repeat_penalty=repeat,
            frequency_penalty=frequency,
            presence_penalty=presence,
            tfs_z=options.get("tfs_z", 1.0),
            mirostat_mode=options.get("mirostat_mode", 0),
            mirostat_tau=options.get("mirostat_tau", 5.0),
            mirostat_eta=options.get("mirostat_eta", 0.1),
        )

    def _reuse_prefix(self, tokens: list[int]) -> list[int]:
        """``Llama.generate``'s KV cache prefix match: the tokens still to evaluate."""
        llama = self.llama
        reset = True
        if llama.n_tokens > 0:
            cached = llama.input_ids[: llama.n_tokens]
            n = min(len(cached), len(tokens))
            same = cached[:n] == np.asarray(tokens[:n], dtype=cached.dtype)
            longest_prefix = n if bool(same.all()) else int(np.argmin(same))
            prompt_consumed = longest_prefix == len(tokens)
            exact_prompt_cached = llama.n_tokens == len(tokens) and prompt_consumed
            if exact_prompt_cached and not llama._requires_eval:
                reset = False
                tokens = []
                reuse_prefix = 0
                if llama.verbose:
                    print("Llama.generate: full prompt already cached, skipping reset", file=sys.stderr)
            else:
                reuse_prefix = longest_prefix - 1 if prompt_consumed else longest_prefix
            if reuse_prefix > 0:
                if llama._ctx.kv_cache_seq_rm(-1, reuse_prefix, -1):
                    reset = False
                    tokens = tokens[reuse_prefix:]
                    llama.n_tokens = reuse_prefix
                    llama._requires_eval = True
                    if llama.verbose:
                        print(f"Llama.generate: {reuse_prefix} prefix-match hit, "
                              f"remaining {len(tokens)} prompt tokens to eval", file=sys.stderr)
                elif llama.verbose:
                    print(f"Llama.generate: {reuse_prefix} prefix-match found "
                          f"but partial kv removal not supported, re-evaluating full prompt", file=sys.stderr)
        if reset:
            llama.reset()
        return tokens

    def tokens(self, prompt_tokens: list[int], stopping_criteria: Any, job: Job) -> Any:
        """Generated tokens, as ``Llama.generate`` yields them; stops when the job is cancelled."""
        llama = self.llama
        tokens = self._reuse_prefix(list(prompt_tokens))
        chain = self.chain.sampler
        sample = llama_low.llama_sampler_sample
        logits_of = llama_low.llama_get_logits_ith
        as_array = np.ctypeslib.as_array
        n_vocab = (llama._n_vocab,)
        greedy = self.greedy
        penalty = self.penalty
        window: collections.deque[int] = collections.deque()
        counts: dict[int, int] = {}
        last_n = self.last_n
        sample_idx = llama.n_tokens + len(tokens) - 1
        llama.eval(tokens)
        while True:
            ctx = llama.ctx
            saved = None
            if penalty and counts:
                logits = logits_of(ctx, -1)
                saved = [(t, logits[t]) for t in counts]
                for t, x in saved:
                    logits[t] = x * penalty if x <= 0 else x / penalty
            token = _greedy(as_array(logits_of(ctx, -1), shape=n_vocab)) if greedy else -1
            if token < 0:
                token = sample(chain, ctx, -1)
            if saved:
                for t, x in saved:
                    logits[t] = x
            if penalty:
                counts[token] = counts.get(token, 0) + 1
                if len(window) >= last_n:
                    old = window.popleft()
                    counts[old] -= 1
                    if counts[old] == 0:
                        del counts[old]
                window.append(token)
            sample_idx += 1
            if stopping_criteria is not None and stopping_criteria(
                llama._input_ids[:sample_idx], llama._scores[sample_idx - llama.n_tokens, :]
            ):
                return
            yield token
            if job.cancelled:
                raise Cancelled()
            llama.eval([token])


# ------------------------------------------------------------------ the response


def _stream_headers() -> MutableHeaders:
    """sse-starlette's headers for llama_cpp.server's streams."""
    headers = MutableHeaders()
    headers.setdefault("Cache-Control", "no-store")
    headers["Connection"] = "keep-alive"
    headers["X-Accel-Buffering"] = "no"
    return headers


def _ping() -> bytes:
    factory = llama_app._ping_message_factory
    if factory is not None:
        data = factory()
        return data if isinstance(data, bytes) else data.encode()
    return f": ping - {datetime.now(timezone.utc)}\n\n".encode()


class FastStream(Response):
    """The streamed answer to a plain request: llama_cpp.server's events, produced by `Job`."""

    media_type = "text/event-stream"

    def __init__(self, request: Request, job: Job, vocabulary: Vocabulary) -> None:
        self.status_code = 200
        self.background = None
        self.body = None  # type: ignore[assignment]
        self.init_headers(_stream_headers())
        self.request = request
        self.job = job
        self.vocabulary = vocabulary
        self._started = False  # http.response.start sent
        self._events = 0  # data events sent
        self._send_lock = asyncio.Lock()
        self._ended = False  # the last message sent
        self._running = False  # the worker thread has the job
        self._gone = False  # the client went away (or the server is shutting down) before that

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        job = self.job
        loop = asyncio.get_running_loop()
        job._loop = loop
        main = asyncio.current_task()
        watcher = asyncio.ensure_future(self._watch(receive, main))
        pinger = asyncio.ensure_future(self._ping(send))
        try:
            async with contextlib.asynccontextmanager(llama_app.get_llama_proxy)() as llama_proxy:
                if job.cancelled:
                    return
                try:
                    llama = llama_app.prepare_request_resources(job.body, llama_proxy, job.body.model, job.kwargs)
                except Exception as error:
                    await self._reject(scope, send, error)
                    return
                context = contextvars.copy_context()
                self._running = True
                worker = loop.run_in_executor(None, context.run, job.run, llama, self.vocabulary, loop)
                try:
                    await self._pump(scope, send)
                finally:
                    job.cancel()
                    # The model is not released before the thread has stopped (after its current token).
                    await asyncio.shield(worker)
        except asyncio.CancelledError:
            if not self._gone:
                raise
            main.uncancel()  # type: ignore[union-attr]  # our own: the client left while we waited for the model
        finally:
            watcher.cancel()
            pinger.cancel()

    async def _pump(self, scope: Scope, send: Send) -> None:
        job = self.job
        chunks = job.chunks
        server_settings = next(llama_app.get_server_settings())
        interrupt_requests = server_settings.interrupt_requests if server_settings else False
        while True:
            if chunks:
                parts = []
                while chunks:
                    parts.append(chunks.popleft())
                self._events += len(parts)
                await self._send_body(send, b"".join(parts))
                if job.cancelled:
                    return
                if interrupt_requests and llama_app.llama_outer_lock.locked():
                    job.cancel()  # llama_cpp.server's interrupt: another request is waiting
                    await self._send_body(send, _DONE)
                    await self._send_end(send)
                    return
                continue
            if job.finished:
                break
            if job.cancelled:
                return
            await job.wait()
        error = job.error
        if error is None:
            await self._send_body(send, _DONE)
            await self._send_end(send)
        elif isinstance(error, Cancelled):
            return
        elif self._events == 0:
            await self._reject(scope, send, error)
        else:
            print(f"Exception in stream after {self._events} chunks: {error!r}", file=sys.stderr)
            traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
            await self._send_body(send, _event(guards.stream_error_event(error)["data"]))
            await self._send_end(send)

    async def _send_body(self, send: Send, data: bytes) -> None:
        async with self._send_lock:
            if not self._started:
                self._started = True
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": data, "more_body": True})

    async def _send_end(self, send: Send) -> None:
        async with self._send_lock:
            if not self._started:
                self._started = True
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            self._ended = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _reject(self, scope: Scope, send: Send, error: Exception) -> None:
        """A failure before the first event: answered as the request without ``stream`` would be.

        As with llama_cpp.server's publisher under `guards`: the stream's
        start is held by `RequestGuard`, which answers its end with the
        error instead.
        """
        status, response = guards.classify(self.request, error, self.job.body)
        state = scope.get(guards.STATE_KEY)
        if isinstance(state, guards.StreamState):
            state.rejection = (status, response)
            await self._send_end(send)
            return
        async with self._send_lock:  # without RequestGuard (an app without guards): the JSON answer itself
            if not self._started:
                self._started = True
                await guards._send_error(send, {"headers": self.raw_headers}, status, response)

    async def _watch(self, receive: Receive, main: asyncio.Task[Any] | None) -> None:
        """Stop the job when the client goes away or the server shuts down."""
        waits = [asyncio.ensure_future(self._disconnected(receive))]
        exit_signal = getattr(_EventSource, "_listen_for_exit_signal", None)
        if exit_signal is not None:
            waits.append(asyncio.ensure_future(exit_signal()))
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if self._ended:
            return
        if waits[0] in done:
            print(f"Disconnected from client (via refresh/close) {self.request.client}")
        self.job.cancel()
        self.job._wake()
        if not self._running and main is not None:
            self._gone = True
            main.cancel()

    @staticmethod
    async def _disconnected(receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    async def _ping(self, send: Send) -> None:
        while True:
            await asyncio.sleep(PING_INTERVAL)
            await self._send_body(send, _ping())


try:
    from sse_starlette.sse import EventSourceResponse as _EventSource
except ImportError:  # pragma: no cover - llama_cpp.server depends on it
    _EventSource = None  # type: ignore[assignment,misc]


# ------------------------------------------------------------------ installation


class FastPath:
    """The fast path for the one model a runner serves."""

    def __init__(self, llama: llama_cpp.Llama) -> None:
        self.vocabulary = Vocabulary(llama)
        self.model_ok = model_is_plain(llama)
        self.chat_ok = self.model_ok and chat_handler_of(llama) is not None

    def completion(self, original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        fast = self

        async def create_completion(request: Request, body: CreateCompletionRequest) -> Any:
            if not (fast.model_ok and completion_is_plain(body) and request.url.path == COMPLETIONS):
                return await original(request, body)
            exclude = {"n", "best_of", "logit_bias_type", "user", "min_tokens"}
            job = Job(chat=False, body=body, kwargs=body.model_dump(exclude=exclude))
            return FastStream(request, job, fast.vocabulary)

        return create_completion

    def chat(self, original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        fast = self

        async def create_chat_completion(request: Request, body: CreateChatCompletionRequest) -> Any:
            if not (fast.chat_ok and chat_is_plain(body)):
                return await original(request, body)
            exclude = {"n", "logit_bias_type", "user", "min_tokens"}
            job = Job(chat=True, body=body, kwargs=body.model_dump(exclude=exclude))
            return FastStream(request, job, fast.vocabulary)

        return create_chat_completion


def _route_in_front(app: FastAPI, path: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> bool:
    """Put a copy of llama_cpp.server's POST route at ``path``, with ``wrap(its endpoint)``, first in ``app``.

    The copy has the original's route class (its error handling), response
    model and dependencies; it comes first, so the original is only reached
    through the wrapped endpoint.
    """
    for route in llama_app.router.routes:
        if isinstance(route, APIRoute) and route.path == path and "POST" in route.methods:
            parameters = inspect.signature(type(route).__init__).parameters
            options = {name: getattr(route, name) for name in parameters
                       if name not in ("self", "path", "endpoint") and hasattr(route, name)}
            app.router.routes.insert(0, type(route)(path, wrap(route.endpoint), **options))
            mark_changed = getattr(app.router, "_mark_routes_changed", None)
            if mark_changed is not None:
                mark_changed()
            return True
    return False


def install(app: FastAPI) -> None:
    """Serve plain streamed completions and chats of ``app`` (from ``create_app``, model loaded) here."""
    fast = FastPath(guards.loaded_llama())
    _route_in_front(app, COMPLETIONS, fast.completion)
    _route_in_front(app, CHAT, fast.chat)


__all__ = ["FastPath", "install"]
