"""Request validation at the edge: every field a client sends, checked once.

Both API layers (OpenAI, Ollama) call these functions before anything
reaches the scheduler or a runner, so an absurd value (10^400, a negative
context, a grammar llama.cpp cannot parse) is a 400 that names the field and
the allowed range, never an overflow deep inside the scheduler or a crashed
runner.  The functions are pure: they take a decoded body and the model's
config and return a normalised copy, or raise `BadRequest`.

The bounds are those of llama.cpp's own types (32-bit token counts and
seeds) or of the OpenAI API where it documents one, widened where llama.cpp
accepts more and people use it; `SAMPLING` is the one table both layers
share (Ollama's option names are translated onto llama_cpp.server's fields
first, in `api/ollama_shapes.py`).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Mapping

from hoshikage_runner.gbnf import GrammarError, check_grammar

from .config import ModelConfig
from .errors import BadRequest

INT32_MAX = 2**31 - 1
# Most stop strings one request may give (OpenAI allows 4; llama.cpp checks
# each one at every token, so a few thousand would slow every token down).
MAX_STOP = 64
MAX_STOP_CHARS = 1000
# logit_bias entries (OpenAI allows 300).
MAX_LOGIT_BIAS = 1024
MAX_MODEL_NAME = 512
# Largest prompt batch a request may ask a runner to be loaded with.
MAX_BATCH = 65536
MAX_GPU_LAYERS = 10_000
MAX_UNKNOWN_CTX = 2**20


@dataclass(frozen=True)
class Bound:
    """An allowed closed range for a number; `integer` for counts and ids."""

    lo: float
    hi: float
    integer: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        lo = "-2^63" if self.lo == -(2**63) else _fmt(self.lo)
        hi = "2^64-1" if self.hi == 2**64 - 1 else _fmt(self.hi)
        return f"{kind} from {lo} to {hi}"


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


# llama_cpp.server request fields (OpenAI names and llama.cpp extensions) → bounds.
SAMPLING: dict[str, Bound] = {
    "temperature": Bound(0, 100),
    "top_p": Bound(0, 1),
    "min_p": Bound(0, 1),
    "typical_p": Bound(0, 1),
    "top_k": Bound(-1, INT32_MAX, integer=True),
    "repeat_penalty": Bound(0, 100),
    "presence_penalty": Bound(-100, 100),
    "frequency_penalty": Bound(-100, 100),
    "mirostat_mode": Bound(0, 2, integer=True),
    "mirostat_tau": Bound(0, 100),
    "mirostat_eta": Bound(0, 100),
    "tfs_z": Bound(0, 100),
    # llama.cpp seeds are 32-bit; any 64-bit seed is accepted and folded into them.
    "seed": Bound(-(2**63), 2**64 - 1, integer=True),
    "max_tokens": Bound(0, INT32_MAX, integer=True),
    "max_completion_tokens": Bound(0, INT32_MAX, integer=True),
    "n": Bound(1, 1, integer=True),
    "best_of": Bound(1, 1, integer=True),
    "top_logprobs": Bound(0, 20, integer=True),
}


def number(value: Any, name: str, bound: Bound, *, param: str | None = None) -> int | float:
    """A JSON number within `bound`; integers must be whole.  Never converts a
    huge int to float first (10^400 would overflow): it is compared as an int."""
    def bad(got: str) -> BadRequest:  # the message is made only for a value that is refused
        return BadRequest(f"invalid {name}: expected {bound.describe()}, got {got}", param=param or name)

    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(_show(value))
    if isinstance(value, float):
        if not math.isfinite(value):
            raise bad(repr(value))
        if bound.integer:
            if not value.is_integer():
                raise bad(repr(value))
            value = int(value)
    if not bound.lo <= value <= bound.hi:
        raise bad(_show(value))
    return int(value) if bound.integer else float(value)


def _show(value: Any) -> str:
    """A value for an error message, short even when it is 10^400 or 1 MB long."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"an integer of {len(str(abs(value)))} digits"
    text = json.dumps(value) if isinstance(value, (str, list, dict)) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def sampling_field(field: str, value: Any, *, name: str | None = None, param: str | None = None) -> Any:
    """One sampling field (a llama_cpp.server name), checked and normalised;
    None stays None (the runner's default).  `name` is how the client wrote it."""
    if value is None:
        return None
    n = number(value, name or field, SAMPLING[field], param=param or field)
    if field == "seed":
        n = int(n) & 0xFFFFFFFF  # -1 becomes llama.cpp's "random seed" 0xFFFFFFFF
    return n


def stop_list(value: Any, *, name: str = "stop", param: str = "stop") -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise BadRequest(f"invalid {name}: expected a string or a list of strings, got {_show(value)}", param=param)
    if len(value) > MAX_STOP:
        raise BadRequest(f"invalid {name}: at most {MAX_STOP} stop strings, got {len(value)}", param=param)
    for s in value:
        if len(s) > MAX_STOP_CHARS:
            raise BadRequest(f"invalid {name}: a stop string may have at most {MAX_STOP_CHARS} characters", param=param)
    return [s for s in value if s]


def grammar_text(value: Any, *, param: str = "grammar", vocab_size: int | None = None) -> str | None:
    """A GBNF grammar, parsed here as llama.cpp would: one it cannot parse,
    or one that leads where no token fits, would crash the runner that tried."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"invalid {param}: expected a GBNF grammar as a string, got {_show(value)}", param=param)
    try:
        check_grammar(value, vocab_size=vocab_size)
    except GrammarError as e:  # its message starts "invalid grammar ..." already
        raise BadRequest(str(e) if param == "grammar" else f"invalid {param}: {e}", param=param) from None
    return value


@functools.lru_cache(maxsize=1)
def _llama_grammar() -> ModuleType:
    """llama_cpp's own JSON-schema → GBNF converter (`llama_cpp/llama_grammar.py`),
    the code the runner will run on the same schema.  The file imports only the
    standard library, so it is loaded on its own: importing it through the
    `llama_cpp` package would load libllama into the supervisor (0.3 s, 37 MiB)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("llama_cpp is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "llama_grammar.py")
    loader_spec = importlib.util.spec_from_file_location("hoshikage_sup._llama_grammar", path)
    assert loader_spec is not None and loader_spec.loader is not None
    module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
    return module


def schema_grammar(schema: Any, *, param: str) -> str:
    """The grammar llama_cpp builds from a JSON schema, built and checked here
    first, so a schema it cannot turn into a valid grammar is the client's 400."""
    if not isinstance(schema, dict):
        raise BadRequest(f"invalid {param}: expected a JSON schema object, got {_show(schema)}", param=param)
    try:
        grammar = _llama_grammar().json_schema_to_gbnf(json.dumps(schema))
    except RecursionError:
        raise BadRequest(f"invalid {param}: the JSON schema is nested too deeply", param=param) from None
    except Exception as e:  # noqa: BLE001 - the converter raises plain exceptions and assertions
        reason = str(e) or type(e).__name__
        raise BadRequest(f"invalid {param}: cannot turn the JSON schema into a grammar: {reason}", param=param) from None
    try:
        check_grammar(grammar)
    except GrammarError as e:
        raise BadRequest(f"invalid {param}: the JSON schema gives a grammar llama.cpp cannot use: {e}", param=param) from None
    return grammar


def json_grammar() -> str:
    """llama_cpp's grammar for any JSON value (Ollama's `format: "json"` on raw prompts)."""
    return _llama_grammar().JSON_GBNF


def response_format(value: Any) -> dict[str, Any] | None:
    """OpenAI `response_format`: text, json_object (optionally with `schema`,
    llama_cpp's extension) or json_schema."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest(f"invalid response_format: expected an object, got {_show(value)}", param="response_format")
    kind = value.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise BadRequest(
            f"invalid response_format.type: expected \"text\", \"json_object\" or \"json_schema\", got {_show(kind)}",
            param="response_format",
        )
    if kind == "json_object" and value.get("schema") is not None:
        schema_grammar(value["schema"], param="response_format")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise BadRequest(
                "invalid response_format.json_schema: expected {\"name\": ..., \"schema\": {...}}",
                param="response_format",
            )
        schema_grammar(spec.get("schema", {}), param="response_format")
    return value


def logit_bias(value: Any, vocab_size: int | None) -> dict[str, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest(f"invalid logit_bias: expected an object of token id → bias, got {_show(value)}", param="logit_bias")
    if len(value) > MAX_LOGIT_BIAS:
        raise BadRequest(f"invalid logit_bias: at most {MAX_LOGIT_BIAS} entries, got {len(value)}", param="logit_bias")
    top = (vocab_size - 1) if vocab_size else INT32_MAX
    out = {}
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10 and int(key) <= top):
            raise BadRequest(
                f"invalid logit_bias: keys must be token ids from 0 to {top}, got {_show(key)}", param="logit_bias"
            )
        out[str(int(key))] = number(bias, f"logit_bias[{key}]", Bound(-100, 100), param="logit_bias")
    return out


def model_name(value: Any) -> str:
    if value is None or value == "":
        raise BadRequest("missing required field 'model'", param="model")
    if not isinstance(value, str):
        raise BadRequest(f"invalid model: expected a string, got {_show(value)}", param="model")
    if len(value) > MAX_MODEL_NAME:
        raise BadRequest(f"invalid model: at most {MAX_MODEL_NAME} characters", param="model")
    return value


def flag(body: Mapping[str, Any], key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"invalid {key}: expected true or false, got {_show(value)}", param=key)
    return value


# ------------------------------------------------------------------ OpenAI bodies

_CONTENT_PART_TYPES = ("text", "image_url", "input_audio", "refusal")


def _messages(value: Any) -> None:
    if not isinstance(value, list) or not value:
        raise BadRequest(f"invalid messages: expected a non-empty list of messages, got {_show(value)}", param="messages")
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"invalid {where}: expected an object with role and content", param="messages")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool", "function"):
            raise BadRequest(
                f"invalid {where}.role: expected system, user, assistant, tool or function, got {_show(role)}",
                param="messages",
            )
        content = m.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise BadRequest(f"invalid {where}.content: expected a string or a list of parts", param="messages")
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in _CONTENT_PART_TYPES:
                raise BadRequest(
                    f"invalid {where}.content[{j}]: expected a part with type text or image_url", param="messages"
                )
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise BadRequest(f"invalid {where}.content[{j}].text: expected a string", param="messages")
        calls = m.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            raise BadRequest(f"invalid {where}.tool_calls: expected a list", param="messages")


def _prompt(value: Any) -> None:
    if isinstance(value, str):
        return
    if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        return
    raise BadRequest(f"invalid prompt: expected a string or a non-empty list of strings, got {_show(value)}", param="prompt")


def _embedding_input(value: Any) -> None:
    if isinstance(value, str):
        if not value:
            raise BadRequest("invalid input: expected a non-empty string", param="input")
        return
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        for i, v in enumerate(value):
            if not v:
                raise BadRequest(f"invalid input[{i}]: expected a non-empty string", param="input")
        return
    raise BadRequest(
        f"invalid input: expected a non-empty string or a non-empty list of non-empty strings, got {_show(value)}",
        param="input",
    )


def _objects(body: Mapping[str, Any], key: str) -> None:
    value = body.get(key)
    if value is not None and (not isinstance(value, list) or not all(isinstance(x, dict) for x in value)):
        raise BadRequest(f"invalid {key}: expected a list of objects", param=key)


def openai_body(kind: str, body: dict[str, Any], model: ModelConfig, vocab_size: int | None = None) -> dict[str, Any]:
    """An OpenAI body for `kind` ("chat", "completion", "embedding"), checked
    and normalised: numbers within bounds, grammars parsed, seeds folded.
    Fields this layer does not know are passed on as they are."""
    out = dict(body)
    if kind == "embedding":
        _embedding_input(body.get("input"))
        if body.get("encoding_format") not in (None, "float", "base64"):
            raise BadRequest("invalid encoding_format: expected \"float\" or \"base64\"", param="encoding_format")
        return out
    if kind == "chat":
        _messages(body.get("messages"))
        _objects(body, "tools")
        _objects(body, "functions")
    else:
        if "prompt" in body:
            _prompt(body["prompt"])
        if body.get("suffix") is not None and not isinstance(body["suffix"], str):
            raise BadRequest("invalid suffix: expected a string", param="suffix")
    flag(body, "stream")
    for name in SAMPLING:
        if name in body:
            out[name] = sampling_field(name, body[name])
    if "stop" in body:
        out["stop"] = stop_list(body["stop"])
    if "grammar" in body:
        out["grammar"] = grammar_text(body["grammar"], vocab_size=vocab_size)
    if "response_format" in body:
        out["response_format"] = response_format(body["response_format"])
    if "logit_bias" in body:
        out["logit_bias"] = logit_bias(body["logit_bias"], vocab_size)
    if body.get("logprobs") not in (None, False, True) and not isinstance(body.get("logprobs"), int):
        raise BadRequest("invalid logprobs: expected true/false or an integer", param="logprobs")
    return out


# ------------------------------------------------------------------ runner options


def runner_option_bounds(model: ModelConfig, trained_ctx: int | None) -> dict[str, Bound]:
    """Bounds for the runner options a request may set (Ollama's num_ctx,
    num_batch, num_thread, num_gpu): the context up to the model's trained one
    (or `max_num_ctx` when the config allows more), threads up to the cores."""
    # A GGUF whose header cannot be read has no known trained context: the
    # memory planner is then the only judge, up to a million tokens.
    ctx_cap = model.max_num_ctx or trained_ctx or max(model.n_ctx, MAX_UNKNOWN_CTX)
    return {
        "n_ctx": Bound(1, ctx_cap, integer=True),
        "n_batch": Bound(1, MAX_BATCH, integer=True),
        "n_threads": Bound(0, os.cpu_count() or 1, integer=True),
        "n_gpu_layers": Bound(-1, MAX_GPU_LAYERS, integer=True),
    }
