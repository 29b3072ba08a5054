"""Chats longer than the context: the context_overflow policies (overflow.py).

The choices themselves (turns, truncation, sentences, clustering) are pure
functions tested on their own; the policies end to end run on the demo
model with conversations three times its context, through both APIs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from hoshikage_sup import overflow
from hoshikage_sup.config import ConfigError, parse_config
from hoshikage_sup.errors import BadRequest
from hoshikage_sup.overflow import Counted, Fitter, Piece

# ------------------------------------------------------------------ conversations

TOPICS = {
    "bread": [
        "Sourdough needs a lively starter fed with equal weights of flour and water.",
        "A long cold proof in the fridge deepens the flavour of the crumb.",
        "Bake the loaf in a preheated cast iron pot to trap the steam.",
        "Score the top with a sharp blade so the bread can rise evenly.",
    ],
    "stars": [
        "Betelgeuse is a red supergiant in the shoulder of Orion.",
        "A light year is the distance light travels in one year.",
        "The Andromeda galaxy is on a slow collision course with the Milky Way.",
        "Neutron stars pack more mass than the Sun into a city-sized sphere.",
    ],
    "garden": [
        "Tomatoes want at least six hours of direct sun every day.",
        "Mulch keeps the soil moist and smothers most of the weeds.",
        "Rotate your crops each season so pests cannot settle in.",
        "Compost turns kitchen scraps into rich dark humus over a few months.",
    ],
    "trains": [
        "The Shinkansen has carried passengers since nineteen sixty four.",
        "Maglev trains float above the track on powerful magnets.",
        "Steam locomotives needed water stops every hundred miles or so.",
        "Night trains are coming back across Europe after years of decline.",
    ],
}
SYSTEM = "You are Hoshi, a concise assistant. Always answer in one short sentence."
LAST = "Thanks! Now, in one word, what colour is a ripe tomato?"
CODE = "```python\ndef greet(name):\n    return f'hello {name}'\n```"


def conversation(turns: int) -> list[dict]:
    """A system prompt, `turns` user/assistant pairs cycling through the topics
    (one answer holds a code block), and a last user question."""
    names = list(TOPICS)
    messages = [{"role": "system", "content": SYSTEM}]
    for t in range(turns):
        topic = names[t % len(names)]
        facts = TOPICS[topic]
        messages.append({"role": "user", "content": f"Question {t}: tell me something about {topic}. {facts[t % 4]}"})
        answer = " ".join(facts[(t + j) % 4] for j in range(1, 4))
        if t == 3:
            answer += f"\nHere is a tiny program for you:\n{CODE}\nIt prints a greeting."
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": LAST})
    return messages


# ------------------------------------------------------------------ pure functions


def test_turns_pin_system_and_tail_and_group_answers():
    messages = [
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "tool", "content": "c"},
        {"role": "user", "content": "d"},
        {"role": "assistant", "content": "prefill"},
    ]
    layout = overflow.turns(messages)
    assert layout.system == (1,)
    assert layout.tail == (5, 6)  # the last user message and what follows it
    assert layout.turns == ((0,), (2, 3, 4))


def test_truncate_keeps_pinned_and_newest_whole_turns():
    messages = conversation(6)  # 0 system, 1..12 turns, 13 last
    layout = overflow.turns(messages)
    tokens = [10] * len(messages)
    keep = overflow.truncate_keep(layout, tokens, budget=60)
    # system + last = 20; two turns of 20 fit in the remaining 40
    assert keep == [0, 9, 10, 11, 12, 13]
    assert overflow.dropped_turns(layout, keep) == 4
    assert overflow.truncate_keep(layout, tokens, budget=60, drop_at_least=5) == [0, 11, 12, 13]
    assert overflow.truncate_keep(layout, tokens, budget=19) is None


def test_pieces_keep_code_blocks_whole_and_split_sentences():
    text = "First point here. Second point, longer! Ok.\n" + CODE + "\nAfter the code comes prose."
    got = overflow.pieces([{"role": "assistant", "content": text}], [0])
    assert [p.code for p in got] == [False, False, True, False]
    assert got[0].text == "First point here."
    assert got[1].text == "Second point, longer! Ok."  # a short fragment joins its neighbour
    assert got[2].text == CODE
    assert got[3].text == "After the code comes prose."
    assert overflow.sentences("") == []


def test_condensed_text_groups_by_speaker():
    chosen = [Piece(1, "user", "A question."), Piece(2, "assistant", "An answer."),
              Piece(2, "assistant", "More of it."), Piece(2, "assistant", CODE, code=True),
              Piece(3, "user", "Next.")]
    text = overflow.condensed_text(chosen)
    assert text.splitlines()[0] == overflow.HEADER
    assert "user: A question.\nassistant: An answer. More of it.\n" + CODE + "\nuser: Next." in text
    assert text.endswith(overflow.FOOTER)


def test_kmeans_finds_clusters_deterministically():
    rng = np.random.default_rng(7)
    centres = np.eye(8)[:3] * 10
    points = np.concatenate([c + rng.normal(0, 0.3, (20, 8)) for c in centres])
    order = rng.permutation(len(points))
    points = points[order]
    labels = overflow.kmeans(points, 3)
    truth = order // 20
    for j in range(3):  # each found cluster is one true cluster
        assert len(set(truth[labels == j])) == 1
    reps = overflow.representatives(points, 3)
    assert sorted(set(truth[reps])) == [0, 1, 2]
    assert overflow.representatives(points, 3) == reps
    assert len(overflow.representatives(points[:2], 5)) == 2  # k larger than the points


def test_condense_plan_gives_recent_turns_half():
    messages = conversation(6)
    layout = overflow.turns(messages)
    plan = overflow.condense_plan(layout, [10] * len(messages), budget=100)
    # pinned 20; room 80; recent turns up to 40 -> two turns (4 messages)
    assert plan.verbatim == [0, 9, 10, 11, 12, 13]
    assert plan.old == list(range(1, 9))
    assert plan.summary_budget == 40
    assert overflow.condense_plan(layout, [10] * len(messages), budget=15) is None


def test_message_shares_add_up_to_at_least_the_prompt():
    c = overflow.counted(512, 100, [10, 20, 30])  # the template adds 40 tokens
    assert c.message_tokens == [24, 34, 44] and sum(c.message_tokens) >= c.prompt_tokens
    assert overflow.counted(512, 5, [10, 20]).message_tokens == [10, 20]  # a template that drops text


def test_policy_field_is_checked():
    assert overflow.policy_of(None) is None
    assert overflow.policy_of("truncate") == "truncate"
    with pytest.raises(BadRequest) as e:
        overflow.policy_of("shorten")
    assert e.value.param == "context_overflow" and "'truncate'" in e.value.message


class WordCounts:
    """Counts by words: enough to drive the Fitter's loops without a model."""

    def __init__(self, n_ctx: int):
        self.n_ctx = n_ctx
        self.calls = 0

    async def chat(self, body):
        self.calls += 1
        per = [len(overflow.content_text(m["content"]).split()) + 3 for m in body["messages"]]
        return Counted(self.n_ctx, sum(per) + 1, per)

    async def texts(self, texts):
        return [len(t.split()) for t in texts]


async def test_fitter_truncate_and_errors():
    words = WordCounts(400)
    fitter = Fitter("m", words.chat, words.texts, None)
    body = {"messages": conversation(20), "max_tokens": 100}
    out = await fitter.fit(body, "truncate")
    assert out.report["applied"] == "truncate" and out.report["prompt_tokens_after"] <= 300
    assert out.body["messages"][0] == body["messages"][0] and out.body["messages"][-1] == body["messages"][-1]
    short = {"messages": conversation(1), "max_tokens": 10}
    assert (await fitter.fit(short, "truncate")).report is None
    with pytest.raises(overflow.ContextOverflow, match="no room"):
        await fitter.fit({"messages": conversation(1), "max_tokens": 400}, "truncate")
    huge = conversation(1)
    huge[-1] = {"role": "user", "content": "word " * 500}
    with pytest.raises(overflow.ContextOverflow, match="even with every earlier turn dropped"):
        await fitter.fit({"messages": huge}, "truncate")
    # condense without a condense model is the client's mistake
    with pytest.raises(BadRequest, match="no condense_model"):
        await fitter.fit(body, "condense")


async def test_fitter_condense_falls_back_to_truncate_when_embedding_fails():
    words = WordCounts(400)

    async def broken(texts):
        raise RuntimeError("condense model crashed")

    out = await Fitter("m", words.chat, words.texts, broken).fit({"messages": conversation(20)}, "condense")
    assert out.report["applied"] == "truncate"
    assert "condense model crashed" in out.report["fallback"]


def test_config_checks_condense_model():
    base = {"path": __file__}

    def cfg(server=None, **models):
        return parse_config({"server": server or {}, "models": models})

    with pytest.raises(ConfigError) as e:
        cfg(chat={**base, "context_overflow": "condense"})
    assert "models.chat.context_overflow" in str(e.value) and "condense_model" in str(e.value)
    with pytest.raises(ConfigError) as e:
        cfg(chat={**base, "condense_model": "chat"})
    assert "models.chat.condense_model" in str(e.value) and "embedding = true" in str(e.value)
    with pytest.raises(ConfigError) as e:
        cfg({"condense_model": "nope"}, chat=base)
    assert "server.condense_model" in str(e.value) and "'nope' is not configured" in str(e.value)
    with pytest.raises(ConfigError) as e:
        cfg(chat={**base, "context_overflow": "squash"})
    assert "models.chat.context_overflow" in str(e.value)
    ok = cfg({"context_overflow": "condense", "condense_model": "emb"}, chat=base, emb={**base, "embedding": True})
    assert ok.overflow_policy(ok.models["chat"]) == "condense"
    assert ok.condense_model(ok.models["chat"]) == "emb"


# ------------------------------------------------------------------ on the demo model

N_CTX = 512
MAX_TOKENS = 16


@pytest.fixture
async def demo(make_server):
    h = await make_server({
        "chat": {"chat_format": "gemma", "n_ctx": N_CTX, "n_threads": 1, "condense_model": "emb"},
        "emb": {"embedding": True, "n_ctx": N_CTX, "n_threads": 1},
    }, server={"runner_pool": 0}, real=True)
    sent: list[dict] = []
    gateway = h.gateway
    original = gateway.post_to_runner

    async def recording(process, path, body, **kw):
        if path == "/v1/chat/completions":
            sent.append(json.loads(body))
        return await original(process, path, body, **kw)

    gateway.post_to_runner = recording
    h.sent = sent
    return h


def three_times_the_context() -> list[dict]:
    return conversation(24)


def check_kept(messages_sent: list[dict], original: list[dict]) -> None:
    assert messages_sent[0] == original[0]  # the system prompt, untouched
    assert messages_sent[-1] == original[-1]  # the last user turn


@pytest.mark.model
async def test_policies_on_the_demo_model(demo, http):
    h = demo
    messages = three_times_the_context()

    # error (the default): today's 400 with the numbers
    async with http.post(h.url + "/v1/chat/completions",
                         json={"model": "chat", "messages": messages, "max_tokens": MAX_TOKENS}) as r:
        err = await r.json()
    assert r.status == 400, err
    assert err["error"]["code"] == "context_length_exceeded"
    total = int(err["error"]["message"].split("resulted in ")[1].split(" tokens")[0])
    assert total >= 3 * N_CTX, total  # the conversation is three times the context

    # truncate, OpenAI
    async with http.post(h.url + "/v1/chat/completions",
                         json={"model": "chat", "messages": messages, "max_tokens": MAX_TOKENS,
                               "context_overflow": "truncate"}) as r:
        out = await r.json()
    assert r.status == 200, out
    report = out["hoshikage"]["context_overflow"]
    assert report["policy"] == report["applied"] == "truncate"
    assert report["prompt_tokens_before"] == total
    assert out["usage"]["prompt_tokens"] == report["prompt_tokens_after"] <= N_CTX - MAX_TOKENS
    kept = h.sent[-1]["messages"]
    check_kept(kept, messages)
    assert report["messages_after"] == len(kept) and report["turns_dropped"] > 12
    # whole turns: after the system prompt, a user message with its answer, ..., the last question
    roles = [m["role"] for m in kept[1:-1]]
    assert roles == ["user", "assistant"] * (len(roles) // 2)
    assert kept[1:-1] == messages[len(messages) - len(kept) + 1:-1]  # the newest turns, verbatim

    # condense, Ollama, twice: the same conversation condenses the same way
    results = []
    for _ in range(2):
        async with http.post(h.url + "/api/chat", json={
            "model": "chat", "messages": messages, "stream": False, "context_overflow": "condense",
            "options": {"num_predict": MAX_TOKENS, "temperature": 0},
        }) as r:
            res = await r.json()
        assert r.status == 200, res
        results.append((res, h.sent[-1]["messages"]))
    (res, condensed), (res2, condensed2) = results
    assert condensed == condensed2
    report = res["hoshikage"]["context_overflow"]
    assert report["policy"] == report["applied"] == "condense", report
    assert res["prompt_eval_count"] == report["prompt_tokens_after"] <= N_CTX - MAX_TOKENS
    again = res2["hoshikage"]["context_overflow"]
    assert report.pop("seconds") > 0 and again.pop("seconds") > 0  # the time the policy took
    assert report == again
    check_kept(condensed, messages)
    summary = next(m for m in condensed if overflow.HEADER in m["content"])
    assert summary["role"] == "user"
    assert 0 < report["sentences_kept"] < report["sentences"]
    body = summary["content"]
    # each kept sentence is one of the conversation's own, verbatim
    history = " ".join(m["content"] for m in messages[1:-1])
    lines = [ln.split(": ", 1)[1] for ln in body.splitlines()[1:] if ": " in ln and not ln.startswith("[")]
    assert lines and all(s.strip() in history for ln in lines for s in ln.split(". ") if len(s) > 20)
    # the code block is whole or absent
    assert (CODE in body) == bool(report["code_blocks_kept"])
    assert "def greet" not in body.replace(CODE, "")

    # streamed (OpenAI): the first event says what was done
    async with http.post(h.url + "/v1/chat/completions", json={
        "model": "chat", "messages": messages, "max_tokens": MAX_TOKENS, "stream": True,
        "context_overflow": "condense", "temperature": 0,
    }) as r:
        assert r.status == 200
        text = (await r.read()).decode()
    events = [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]
    assert events[0]["hoshikage"]["context_overflow"]["applied"] == "condense"
    assert all("hoshikage" not in e for e in events[1:])
    assert text.rstrip().endswith("data: [DONE]")
    assert h.sent[-1]["messages"] == condensed

    # log and metric
    async with http.get(h.url + "/metrics") as r:
        metrics = await r.text()
    assert 'hoshikage_context_overflow_total{model="chat",policy="truncate",applied="truncate"} 1' in metrics
    assert 'hoshikage_context_overflow_total{model="chat",policy="condense",applied="condense"} 3' in metrics


@pytest.mark.model
async def test_overflow_errors_are_clear(demo, http):
    h = demo
    too_long_question = conversation(2)
    too_long_question[-1] = {"role": "user", "content": "Tell me about bread. " * 200}
    for policy in ("truncate", "condense"):
        async with http.post(h.url + "/v1/chat/completions", json={
            "model": "chat", "messages": too_long_question, "max_tokens": MAX_TOKENS, "context_overflow": policy,
        }) as r:
            err = await r.json()
        assert r.status == 400, err
        assert err["error"]["code"] == "context_length_exceeded"
        assert "even with every earlier turn dropped" in err["error"]["message"]
    async with http.post(h.url + "/v1/chat/completions", json={
        "model": "chat", "messages": conversation(1), "max_tokens": N_CTX, "context_overflow": "truncate",
    }) as r:
        err = await r.json()
    assert r.status == 400 and err["error"]["param"] == "max_tokens", err
    async with http.post(h.url + "/v1/completions", json={
        "model": "chat", "prompt": "hi", "context_overflow": "truncate",
    }) as r:
        err = await r.json()
    assert r.status == 400 and err["error"]["param"] == "context_overflow", err
    async with http.post(h.url + "/api/chat", json={
        "model": "chat", "messages": conversation(1), "context_overflow": 3,
    }) as r:
        err = await r.json()
    assert r.status == 400 and "context_overflow" in err["error"], err
    # a conversation that fits is sent as it is, and says nothing
    async with http.post(h.url + "/v1/chat/completions", json={
        "model": "chat", "messages": conversation(1), "max_tokens": 4, "context_overflow": "condense",
    }) as r:
        out = await r.json()
    assert r.status == 200 and "hoshikage" not in out, out
    assert h.sent[-1]["messages"] == conversation(1)


async def test_short_estimates_cost_few_counts_however_long_the_conversation():
    """A template that adds far more than the shares say: each retry drops twice as many more turns."""
    words = WordCounts(4000)

    async def lying_chat(body):
        c = await words.chat(body)
        return Counted(c.n_ctx, c.prompt_tokens * 3, [t // 3 for t in c.message_tokens])

    out = await Fitter("m", lying_chat, words.texts, None).fit({"messages": conversation(2000), "max_tokens": 100},
                                                               "truncate")
    assert out.report["prompt_tokens_after"] <= 3900
    assert words.calls <= 14  # the first count, then about log2(2000) tries
    layout = overflow.turns(conversation(20000))  # 40,002 messages: linear, not quadratic
    assert len(layout.turns) == 20000
