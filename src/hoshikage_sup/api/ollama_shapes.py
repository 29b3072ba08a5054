"""Ollama's request and response shapes, and their translation to and from
the OpenAI-shaped bodies the runners (llama_cpp.server) speak.

Pure functions only: no I/O except reading GGUF headers (cached), so the
translation can be tested without a server.  `api/ollama.py` holds the
handlers.

What cannot be translated, and why:

- `typical_p`, `tfs_z`, `repeat_last_n`, `penalize_newline`, `num_keep` and
  Ollama's load-time switches other than num_ctx/num_batch/num_thread/num_gpu
  (`main_gpu`, `use_mmap`, `numa`, ...) have no field in llama_cpp.server's
  request models; they are ignored, as Ollama ignores options it does not
  know.  Sampling defaults are llama_cpp.server's (top_p 0.95, min_p 0.05),
  not Ollama's, unless the request or the model's `options` table sets them.
- `context` (generate's token history) is neither read nor returned: the
  runners take text, not token ids.  `template`, `think` and `logprobs` are
  ignored; `truncate: false` is not enforced (llama_cpp.server truncates).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import time
from typing import Any, Iterable, Mapping

from .. import validation
from ..config import ModelConfig
from ..durations import FOREVER
from ..errors import BadRequest, HoshikageError
from ..gguf import ArrayInfo, GGUFError, ModelInfo, load_model_info, read_gguf

NDJSON = "application/x-ndjson"

# Go's maximum time.Duration (~292 years): what Ollama adds to "now" for a
# negative keep_alive, so `expires_at` of a "forever" model is far in the future.
GO_MAX_DURATION = (2**63 - 1) / 1e9

# chat formats whose llama_cpp.server handler turns model output into tool_calls;
# other formats render `tools` into the prompt at most and never parse calls back.
TOOL_CHAT_FORMATS = frozenset({"chatml-function-calling", "functionary", "functionary-v1", "functionary-v2"})


class NotSupported(HoshikageError):
    """An Ollama endpoint that manages model files: models come from the config."""

    status = 501
    kind = "not_supported"
    code = "not_supported"


# ------------------------------------------------------------------ times


def rfc3339(seconds: float | None = None, *, ns: int | None = None) -> str:
    """UTC time as Go's RFC3339Nano writes it: up to 9 fractional digits,
    trailing zeros dropped ("2024-06-04T14:38:31.83753Z")."""
    if ns is None:
        ns = time.time_ns() if seconds is None else int(round(seconds * 1e9))
    secs, frac = divmod(ns, 1_000_000_000)
    stamp = _dt.datetime.fromtimestamp(secs, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    digits = f"{frac:09d}".rstrip("0")
    return f"{stamp}.{digits}Z" if digits else f"{stamp}Z"


def ns(seconds: float) -> int:
    return max(0, int(round(seconds * 1e9)))


# ------------------------------------------------------------------ requests


def model_name(body: Mapping[str, Any], *, legacy: bool = False) -> str:
    """`model` (or Ollama's older `name`); 400 "model is required" as Ollama says it."""
    name = body.get("model")
    if legacy and not name:
        name = body.get("name")
    if name is None or name == "":
        raise BadRequest("model is required", param="model")
    return validation.model_name(name)


def stream_flag(body: Mapping[str, Any]) -> bool:
    """Ollama streams unless told `"stream": false`."""
    value = body.get("stream")
    if value is None:
        return True
    if not isinstance(value, bool):
        raise BadRequest(f"invalid stream: expected true or false, got {value!r}", param="stream")
    return value


def optional_str(body: Mapping[str, Any], key: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"invalid {key}: expected a string, got {type(value).__name__}", param=key)
    return value


# ------------------------------------------------------------------ options

# Ollama option → llama_cpp.server field (bounds: validation.SAMPLING)
_SAMPLING: dict[str, str] = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "repeat_penalty": "repeat_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "mirostat": "mirostat_mode",
    "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
}
# Ollama option → RunnerOptions field (bounds: validation.runner_option_bounds)
_RUNNER: dict[str, str] = {
    "num_ctx": "n_ctx",
    "num_batch": "n_batch",
    "num_thread": "n_threads",
    "num_gpu": "n_gpu_layers",
}
# num_predict: -1 = no limit, -2 = fill the context (also no limit here).
_NUM_PREDICT = validation.Bound(-2, validation.INT32_MAX, integer=True)


def translate_options(
    request_options: Any, model: ModelConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Ollama `options` → (sampling fields for the runner's body, runner options).

    The model's `options` table (like a Modelfile's PARAMETER lines) applies
    under the request's.  Runner options (num_ctx, ...) come from the request
    only: the model table already sets n_ctx & co., and a default that
    differed from them would make every Ollama request reload the runner that
    the OpenAI layer loaded.  `num_predict` is always given (None = no limit,
    Ollama's -1), since /v1/completions would otherwise stop at 16 tokens.
    """
    if request_options is None:
        request_options = {}
    if not isinstance(request_options, Mapping):
        raise BadRequest(
            f"invalid options: expected a JSON object, got {type(request_options).__name__}", param="options"
        )
    sampling: dict[str, Any] = {"max_tokens": None}
    runner: dict[str, Any] = {}
    bounds: dict[str, validation.Bound] | None = None
    layers = [(dict(model.options), f" in the [models.{model.name}] options of the config"), (request_options, "")]
    for options, where in layers:
        for key, value in options.items():
            if value is None:
                continue
            name = f"option {key!r}{where}"
            if key in _SAMPLING:
                field = _SAMPLING[key]
                sampling[field] = validation.sampling_field(field, value, name=name, param="options")
            elif key == "num_predict":
                n = validation.number(value, name, _NUM_PREDICT, param="options")
                sampling["max_tokens"] = n if n > 0 else None  # -1 (and -2, 0): no limit
            elif key == "stop":
                sampling["stop"] = validation.stop_list(value, name=name, param="options")
            elif key in _RUNNER and not where:
                field = _RUNNER[key]
                if bounds is None:
                    info = model_info(model)
                    bounds = validation.runner_option_bounds(model, info.context_length if info else None)
                n = validation.number(value, name, bounds[field], param="options")
                # Ollama's num_gpu -1 is its automatic placement: ours is "auto"
                # (-1 would force every layer onto the GPU).
                runner[field] = "auto" if key == "num_gpu" and n < 0 else n
            # anything else: ignored, as Ollama ignores options it does not know
    return sampling, runner


def response_format(fmt: Any) -> dict[str, Any] | None:
    """Ollama `format` → llama_cpp.server `response_format`; a schema is
    turned into a grammar here first, so one llama_cpp cannot use is a 400."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        validation.schema_grammar(fmt, param="format")
        return {"type": "json_object", "schema": fmt}
    raise BadRequest(f"invalid format: expected \"json\" or a JSON schema object, got {fmt!r}", param="format")


def completion_grammar(fmt: dict[str, Any]) -> str:
    """A GBNF grammar for `format` on /v1/completions (raw prompts), which has
    no response_format: llama_cpp's own JSON / JSON-schema grammars."""
    if "schema" in fmt:
        return validation.schema_grammar(fmt["schema"], param="format")
    return validation.json_grammar()


# ------------------------------------------------------------------ messages


def _image_parts(images: Any, model: ModelConfig) -> list[dict[str, Any]]:
    if images is None or images == []:
        return []
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise BadRequest("invalid images: expected a list of base64-encoded images", param="images")
    info = model_info(model)
    if info is None or not info.has_vision:
        raise BadRequest(
            f"model '{model.name}' does not support images: it has no vision projector", param="images"
        )
    return [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{i}"}} for i in images]


def _arguments_text(arguments: Any) -> str:
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments if arguments is not None else {})


def chat_messages(messages: Any, model: ModelConfig) -> list[dict[str, Any]]:
    """Ollama chat messages → OpenAI messages.

    Ollama's tool calls carry `arguments` as an object and no id; OpenAI's
    carry a JSON string and an id that the tool's answer refers to.  Ids are
    made up here (call_<n>) and a `tool` message is matched to the latest
    call of the same `tool_name`, else to the oldest unanswered call.
    """
    if not isinstance(messages, list):
        raise BadRequest(f"invalid messages: expected a list, got {type(messages).__name__}", param="messages")
    out: list[dict[str, Any]] = []
    unanswered: list[tuple[str, str]] = []  # (id, function name)
    n_calls = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"invalid messages[{i}]: expected an object", param="messages")
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise BadRequest(
                f"invalid messages[{i}].role: expected \"system\", \"user\", \"assistant\" or \"tool\"", param="messages"
            )
        content = m.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise BadRequest(f"invalid messages[{i}].content: expected a string", param="messages")
        msg: dict[str, Any] = {"role": role, "content": content}
        images = _image_parts(m.get("images"), model)
        if images:
            msg["content"] = [{"type": "text", "text": content}, *images]
        if role == "assistant" and m.get("tool_calls"):
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise BadRequest(f"invalid messages[{i}].tool_calls: expected a list", param="messages")
            converted = []
            for call in calls:
                fn = (call or {}).get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise BadRequest(
                        f"invalid messages[{i}].tool_calls: expected {{\"function\": {{\"name\", \"arguments\"}}}}",
                        param="messages",
                    )
                call_id = call.get("id") if isinstance(call.get("id"), str) else f"call_{n_calls}"
                n_calls += 1
                unanswered.append((call_id, fn["name"]))
                converted.append(
                    {"id": call_id, "type": "function",
                     "function": {"name": fn["name"], "arguments": _arguments_text(fn.get("arguments"))}}
                )
            msg["tool_calls"] = converted
        elif role == "tool":
            name = m.get("tool_name") or m.get("name")
            match = next((c for c in reversed(unanswered) if c[1] == name), None) if name else None
            if match is None and unanswered:
                match = unanswered[0]
            if match is not None:
                unanswered.remove(match)
            msg["tool_call_id"] = m.get("tool_call_id") or (match[0] if match else f"call_{n_calls}")
        out.append(msg)
    return out


def ollama_tool_calls(calls: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI tool_calls (arguments as a JSON string) → Ollama's (an object)."""
    out = []
    for call in calls:
        fn = call.get("function") or {}
        raw = fn.get("arguments")
        try:
            args = json.loads(raw) if isinstance(raw, str) and raw.strip() else (raw or {})
        except ValueError:
            args = {"_raw": raw}  # the model wrote something that is not JSON: keep it visible
        if not isinstance(args, dict):
            args = {"_raw": raw}
        out.append({"function": {"name": fn.get("name") or "", "arguments": args}})
    return out


class ToolCallAccumulator:
    """Joins streamed OpenAI tool_call deltas (by index) into whole calls."""

    def __init__(self) -> None:
        self.calls: dict[int, dict[str, Any]] = {}

    def add(self, deltas: Any) -> None:
        for d in deltas or []:
            if not isinstance(d, dict):
                continue
            call = self.calls.setdefault(int(d.get("index") or 0), {"function": {"name": "", "arguments": ""}})
            fn = d.get("function") or {}
            if fn.get("name"):
                call["function"]["name"] = fn["name"]
            if fn.get("arguments"):
                call["function"]["arguments"] += fn["arguments"]

    def result(self) -> list[dict[str, Any]]:
        return ollama_tool_calls(self.calls[i] for i in sorted(self.calls))


def done_reason(finish_reason: Any) -> str:
    """OpenAI finish_reason → Ollama done_reason (tool calls end with "stop" in Ollama)."""
    return "length" if finish_reason == "length" else "stop"


# ------------------------------------------------------------------ embeddings


def pool(vector: Any) -> list[float]:
    """One vector per input.  A runner for a model without a pooling type
    answers per-token vectors (a list of lists): mean-pool them."""
    if isinstance(vector, list) and vector and isinstance(vector[0], list):
        n = len(vector)
        width = len(vector[0])
        sums = [0.0] * width
        for row in vector:
            for j, x in enumerate(row):
                sums[j] += x
        return [s / n for s in sums]
    if not isinstance(vector, list):
        raise HoshikageError(f"runner answered an embedding that is not a list: {str(vector)[:100]}")
    return [float(x) for x in vector]


def normalize(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm > 0 else vector


def embed_inputs(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise BadRequest("invalid input: expected a string or a list of non-empty strings", param="input")


# ------------------------------------------------------------------ model facts


def model_info(model: ModelConfig) -> ModelInfo | None:
    """The GGUF summary (cached by path, mtime, size); None if it cannot be read."""
    try:
        return load_model_info(model.path)
    except (OSError, GGUFError, ValueError):
        return None


def file_facts(model: ModelConfig) -> tuple[int, float]:
    try:
        st = os.stat(model.path)
    except OSError:
        return 0, 0.0
    return st.st_size, st.st_mtime


def digest(model: ModelConfig) -> str:
    """A stable stand-in for Ollama's blob digest: sha256 of the file's path,
    size and mtime (hashing the weights on every call would read gigabytes)."""
    try:
        st = os.stat(model.path)
        key = f"{os.path.realpath(model.path)}\0{st.st_size}\0{st.st_mtime_ns}"
    except OSError:
        key = str(model.path)
    return hashlib.sha256(key.encode()).hexdigest()


def details(model: ModelConfig, info: ModelInfo | None) -> dict[str, Any]:
    if info is None:
        return {"parent_model": "", "format": "gguf", "family": "", "families": None,
                "parameter_size": "", "quantization_level": ""}
    return {
        "parent_model": "",
        "format": "gguf",
        "family": info.architecture,
        "families": [info.architecture],
        "parameter_size": info.parameter_size,
        "quantization_level": info.quantization,
    }


def capabilities(model: ModelConfig, info: ModelInfo | None) -> list[str]:
    """What this model can do here, honestly: an embedding runner is for
    embeddings; tools only where the runner's chat handler parses tool calls."""
    if model.embedding:
        return ["embedding"]
    caps = ["completion"]
    if model.chat_format in TOOL_CHAT_FORMATS:
        caps.append("tools")
    if info is not None and info.has_vision:
        caps.append("vision")
    return caps


def tag_entry(name: str, model: ModelConfig, info: ModelInfo | None) -> dict[str, Any]:
    size, mtime = file_facts(model)
    return {
        "name": name,
        "model": name,
        "modified_at": rfc3339(mtime),
        "size": size,
        "digest": digest(model),
        "details": details(model, info),
    }


def _json_value(value: Any) -> Any:
    if isinstance(value, ArrayInfo):
        return None  # big arrays (the vocabulary) are not read, as Ollama's verbose=false
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def gguf_model_info(model: ModelConfig, info: ModelInfo | None) -> dict[str, Any]:
    try:
        gf = read_gguf(model.path)
    except (OSError, GGUFError, ValueError):
        return {}
    out = {k: _json_value(v) for k, v in gf.metadata.items()}
    if info is not None:
        out["general.parameter_count"] = info.parameter_count
    return dict(sorted(out.items()))


def _parameter_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parameters(model: ModelConfig) -> str:
    """The model's default options as a Modelfile's PARAMETER values
    ("name value" lines, one per stop string), num_ctx from the model table."""
    lines = [f"{'num_ctx':<30} {model.n_ctx}"]
    for key, value in model.options.items():
        if key == "num_ctx":
            continue
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"{key:<30} {_parameter_value(v)}")
    return "\n".join(lines)


def template(model: ModelConfig, info: ModelInfo | None) -> str:
    """Ollama's Go template does not exist here: the runner applies
    llama_cpp.server's chat format; we show its name, or the GGUF's own Jinja
    chat template when no format is configured."""
    if model.chat_format:
        return model.chat_format
    try:
        tpl = read_gguf(model.path).metadata.get("tokenizer.chat_template")
    except (OSError, GGUFError, ValueError):
        tpl = None
    return tpl if isinstance(tpl, str) else ""


def modelfile(model: ModelConfig, source: Any) -> str:
    where = f" in {source}" if source else ""
    lines = [
        f"# Hoshikage serves this model from the [models.{model.name}] table of its config{where};",
        "# it cannot create models from a Modelfile.",
        f"FROM {model.path}",
    ]
    if model.chat_format:
        lines.append(f"# chat_format {model.chat_format}")
    lines += [f"PARAMETER {' '.join(line.split(None, 1))}" for line in parameters(model).split("\n")]
    return "\n".join(lines) + "\n"


def expires_at(m: Any, now: float) -> str:
    """RFC3339 expiry of a loaded model (a `status.ModelStatus`) for /api/ps:
    the armed timer; for a busy or loading model the earliest it could expire
    (now + session); "forever" far in the future as Ollama shows it; a model
    on its way out expires now."""
    if m.draining:
        return rfc3339(now)
    if m.session == FOREVER or m.pinned:
        return rfc3339(now + GO_MAX_DURATION)
    if m.expires_at is not None:
        return rfc3339(m.expires_at)
    return rfc3339(now + (m.session or 0.0))
