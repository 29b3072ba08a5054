"""Validation at the edge: pure functions, no server."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from hoshikage_sup.config import ModelConfig
from hoshikage_sup.durations import FOREVER, parse_keep_alive
from hoshikage_sup.errors import BadRequest
from hoshikage_sup import validation as v

MODEL = ModelConfig(name="m", path=Path("/nonexistent.gguf"))


def bad(fn, *args, **kwargs) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        fn(*args, **kwargs)
    return info.value


@pytest.mark.parametrize("value", [10**400, -(10**400), 2**64, float("inf"), float("nan"), "1", None, True, [1], 1.5])
def test_integer_bounds_reject_absurd_values_with_the_range(value):
    if value is None:
        return  # None means "the runner's default" for sampling fields; numbers themselves never take None
    e = bad(v.number, value, "max_tokens", v.SAMPLING["max_tokens"])
    assert e.status == 400 and e.param == "max_tokens"
    assert "from 0 to 2147483647" in e.message
    assert len(e.message) < 200  # a 400-digit number is described, not printed


def test_numbers_within_bounds_are_normalised():
    assert v.number(3.0, "top_k", v.SAMPLING["top_k"]) == 3
    assert v.number(1, "temperature", v.SAMPLING["temperature"]) == 1.0
    assert v.sampling_field("seed", -1) == 0xFFFFFFFF  # llama.cpp's random seed
    assert v.sampling_field("seed", 2**64 - 1) == 0xFFFFFFFF
    assert v.sampling_field("seed", 2**40 + 7) == 7
    assert v.sampling_field("temperature", None) is None
    assert bad(v.sampling_field, "seed", 2**64).param == "seed"
    assert bad(v.sampling_field, "top_p", 1.5).message.startswith("invalid top_p: expected a number from 0 to 1")
    assert "from 1 to 1" in bad(v.sampling_field, "n", 2).message


def test_stop_and_logit_bias():
    assert v.stop_list("x") == ["x"]
    assert v.stop_list(["a", ""]) == ["a"]
    assert bad(v.stop_list, [1]).param == "stop"
    assert "at most 64" in bad(v.stop_list, ["a"] * 65).message
    assert v.logit_bias({"15": 2, "0": -100}, vocab_size=100) == {"15": 2.0, "0": -100.0}
    assert "0 to 99" in bad(v.logit_bias, {"100": 1}, vocab_size=100).message
    assert bad(v.logit_bias, {"-1": 1}, None).param == "logit_bias"
    assert bad(v.logit_bias, {"1" * 400: 1}, None).param == "logit_bias"
    assert bad(v.logit_bias, {"1": float("nan")}, None).param == "logit_bias"


def test_grammars_are_parsed_before_any_runner_sees_them():
    assert v.grammar_text('root ::= "yes" | "no"') == 'root ::= "yes" | "no"'
    for broken in ("root ::= (", "root ::= foo", "", "root ::= root \"x\""):
        e = bad(v.grammar_text, broken)
        assert e.param == "grammar" and e.message.startswith("invalid grammar"), e.message
        assert "invalid grammar" not in e.message[len("invalid grammar"):], e.message
    assert bad(v.grammar_text, 5).param == "grammar"


def test_json_schemas_are_turned_into_grammars_here():
    v.schema_grammar({"type": "object", "properties": {"a": {"type": "integer"}}}, param="format")
    assert bad(v.schema_grammar, [], param="format").param == "format"
    e = bad(v.schema_grammar, {"$ref": "https://example.com/schema.json"}, param="response_format")
    assert e.param == "response_format" and "grammar" in e.message
    deep: dict = {"type": "object"}
    for _ in range(2000):
        deep = {"type": "array", "items": deep}
    assert bad(v.schema_grammar, deep, param="format").param == "format"


def test_openai_bodies():
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5.0, "seed": -1}
    out = v.openai_body("chat", chat, MODEL)
    assert out["max_tokens"] == 5 and out["seed"] == 0xFFFFFFFF and out["messages"] == chat["messages"]
    assert out is not chat
    for body, param in (
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**400}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": "x"}, "tools"),
        ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}, "response_format"),
    ):
        assert bad(v.openai_body, "chat", body, MODEL).param == param, body
    assert bad(v.openai_body, "completion", {"prompt": 5}, MODEL).param == "prompt"
    assert bad(v.openai_body, "completion", {"prompt": "x", "grammar": "root ::= ("}, MODEL).param == "grammar"
    for inputs in ([], "", ["a", ""], [1], None):
        assert bad(v.openai_body, "embedding", {"input": inputs}, MODEL).param == "input"
    assert v.openai_body("embedding", {"input": ["a", "b"]}, MODEL)["input"] == ["a", "b"]


def test_runner_option_bounds_follow_the_trained_context():
    b = v.runner_option_bounds(MODEL, trained_ctx=32768)
    assert b["n_ctx"].hi == 32768
    assert v.runner_option_bounds(ModelConfig(name="m", path=Path("x"), max_num_ctx=131072), 32768)["n_ctx"].hi == 131072
    assert "from 1 to 32768" in bad(v.number, 10**9, "option 'num_ctx'", b["n_ctx"]).message
    assert b["n_threads"].hi >= 1


@pytest.mark.parametrize("value", [1e12, 1e308, 2**70, 10**400, -1, "-1s", "877000h", "9" * 30 + "h"])
def test_absurd_keep_alive_is_forever(value):
    assert parse_keep_alive(value) == FOREVER


def test_keep_alive_ordinary_values_and_junk():
    assert parse_keep_alive(300) == 300 and parse_keep_alive("5m") == 300
    assert math.isclose(parse_keep_alive(99 * 365.25 * 86400), 99 * 365.25 * 86400)
    for junk in (float("nan"), "10", "x" * 1000, True):
        with pytest.raises(ValueError):
            parse_keep_alive(junk)
