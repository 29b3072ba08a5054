"""``POST /hoshikage/tokens``: token counts with this runner's own tokenizer and chat template.

The supervisor fits a conversation into the context (its ``context_overflow``
policies) with counts only the runner can give: the prompt a chat becomes is
the chat handler's (template, special tokens, BOS), tokenised by the model's
vocabulary.  The body is a chat request's (``messages`` and whatever else
shapes the prompt: ``tools``, ``tool_choice``, ``response_format``, ...)
and/or ``texts``, a list of strings; the answer::

    {"n_ctx": 2048,                 # the context the runner checks prompts against
     "prompt_tokens": 1834,         # the chat's whole prompt, exactly as a request would get it
     "text_tokens": [7, 19]}        # each text on its own, without BOS or special tokens

``prompt_tokens`` is null without ``messages``.  Counting runs in a worker
thread and takes no model lock: tokenising reads only the vocabulary.
"""

from __future__ import annotations

import json
from typing import Any

import llama_cpp
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from hoshikage_runner import guards
from hoshikage_runner.fastpath import chat_completion_options

PATH = "/hoshikage/tokens"
# Body fields of a chat request that do not change its prompt, or that the
# count has no use for; they are not passed to the chat handler.
_NOT_PROMPT = {"model", "stream", "stream_options", "texts", "n", "user", "logit_bias_type", "min_tokens"}


class CountError(ValueError):
    """A body the count cannot use; answered 400 with this message."""


def _text_tokens(llama: llama_cpp.Llama, text: str) -> int:
    return len(llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)) if text else 0


def count(llama: llama_cpp.Llama, body: dict[str, Any]) -> dict[str, Any]:
    texts = body.get("texts", [])
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise CountError("'texts' must be a list of strings")
    out: dict[str, Any] = {
        "n_ctx": llama._n_ctx,
        "prompt_tokens": None,
        "text_tokens": [_text_tokens(llama, t) for t in texts],
    }
    messages = body.get("messages")
    if messages is None:
        return out
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise CountError("'messages' must be a non-empty list of message objects")
    kwargs = {k: v for k, v in body.items() if k not in _NOT_PROMPT}
    kwargs["stream"] = True  # the handler then returns at once, without consuming the (empty) completion
    try:
        options = chat_completion_options(llama, kwargs)
    except Exception as e:  # noqa: BLE001 - the template's own error, as a request would get it
        raise CountError(f"the chat template cannot format these messages: {type(e).__name__}: {e}") from None
    if options is None or not isinstance(options.get("prompt"), list):
        raise CountError("this model's chat handler does not build a token prompt; its prompts cannot be counted")
    out["prompt_tokens"] = len(options["prompt"])
    return out


def install(app: FastAPI) -> None:
    """Serve ``POST /hoshikage/tokens`` for the model ``app`` (from ``create_app``) has loaded."""
    llama = guards.loaded_llama()

    async def tokens(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error("the body is not JSON")
        if not isinstance(body, dict):
            return _error("the body must be a JSON object")
        try:
            result = await run_in_threadpool(count, llama, body)
        except CountError as e:
            return _error(str(e))
        return JSONResponse(result)

    app.add_api_route(PATH, tokens, methods=["POST"], include_in_schema=False)


def _error(message: str) -> Response:
    return JSONResponse(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}, status_code=400
    )


__all__ = ["PATH", "count", "install"]
