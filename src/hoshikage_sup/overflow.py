"""Conversations longer than the context: the `context_overflow` policies.

A chat whose prompt and reply do not fit in the runner's context is, by the
model's (or the request's) `context_overflow`:

* ``"error"`` (the default): sent as it is; the runner answers 400
  ``context_length_exceeded`` with the numbers.
* ``"truncate"``: the oldest turns are dropped, whole, until the prompt and
  the reply fit.  System messages and the last user message (with anything
  after it) always stay.
* ``"condense"``: the most recent turns stay verbatim; older history becomes
  one condensed message of representative sentences, chosen by clustering
  the sentences' embeddings (from the model's `condense_model`) and keeping
  the sentence nearest each cluster's centre, in their original order.  Code
  blocks are never cut into sentences: each is kept whole or dropped whole.
  System messages are left as they are.  The same conversation condenses the
  same way every time.  A result that still does not fit, or a condense
  model that cannot be used, falls back to truncate.

"The reply" is `max_tokens` when the request sets it, else a quarter of
the context.  Token counts are the runner's own (`POST /hoshikage/tokens`:
its template and tokenizer); the conversation settled on is counted again
before it is sent, so what is sent fits.

The choices are pure functions over counts and vectors (`turns`,
`truncate_keep`, `pieces`, `kmeans`, `representatives`, `condense_plan`);
`Fitter` asks the runners for counts and embeddings and applies them.
What was done is reported to the client (a `hoshikage.context_overflow`
object in the response), logged, and counted for /metrics.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

import numpy as np

from .config import OVERFLOW_POLICIES as POLICIES  # the config file's values are the request field's
from .errors import BadRequest

# Older history considered for condensing, newest first: more sentences than
# this are dropped before embedding (a bound on the work a request can cause;
# the demo model embeds about 10 sentences a second on 2 CPU cores).
MAX_SENTENCES = 256
# Sentences shorter than this (in characters) are joined to the next one.
MIN_SENTENCE = 12
HEADER = "[Earlier conversation, condensed to representative sentences]"
FOOTER = "[End of the condensed conversation]"
KMEANS_ROUNDS = 50
CONDENSE_TRIES = 8  # condensed conversations counted before falling back to truncate


class ContextOverflow(BadRequest):
    """Even with everything that may go gone, the conversation does not fit."""

    code = "context_length_exceeded"


def policy_of(value: Any, *, param: str = "context_overflow") -> str | None:
    """A request's `context_overflow` field: None when absent."""
    if value is None:
        return None
    if value not in POLICIES:
        raise BadRequest(
            f"invalid {param}: expected one of {', '.join(repr(p) for p in POLICIES)}, got {value!r}", param=param
        )
    return value


def reply_room(n_ctx: int, max_tokens: Any) -> int:
    """Tokens kept free for the reply: `max_tokens`, else a quarter of the context."""
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0:
        return max_tokens
    return max(1, n_ctx // 4)


# ------------------------------------------------------------------ turns and truncation


@dataclass(frozen=True)
class Layout:
    """Which messages are pinned (system messages, the tail from the last
    user message on) and the turns in between, oldest first."""

    system: tuple[int, ...]
    tail: tuple[int, ...]
    turns: tuple[tuple[int, ...], ...]


def turns(messages: Sequence[dict[str, Any]]) -> Layout:
    """Split a conversation: a turn is a user message with the messages that
    answer it; messages before the first user message form a turn of their own."""
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    tail_start = users[-1] if users else len(messages) - 1
    system = tuple(i for i, m in enumerate(messages) if m.get("role") == "system")
    pinned = set(system)  # looked up once a message: a tuple would make a long conversation quadratic
    tail = tuple(i for i in range(tail_start, len(messages)) if i not in pinned)
    groups: list[list[int]] = []
    for i in range(tail_start):
        if i in pinned:
            continue
        if messages[i].get("role") == "user" or not groups:
            groups.append([i])
        else:
            groups[-1].append(i)
    return Layout(system=system, tail=tail, turns=tuple(tuple(g) for g in groups))


def _sum(tokens: Sequence[int], indices: Sequence[int]) -> int:
    return sum(tokens[i] for i in indices)


def truncate_keep(layout: Layout, tokens: Sequence[int], budget: int, *, drop_at_least: int = 0) -> list[int] | None:
    """The messages to keep: the pinned ones and the newest turns that fit in
    `budget` (by the per-message estimates), after dropping at least
    `drop_at_least` turns.  None when the pinned messages alone do not fit."""
    pinned = _sum(tokens, layout.system) + _sum(tokens, layout.tail)
    if pinned > budget:
        return None
    kept_turns: list[tuple[int, ...]] = []
    used = pinned
    candidates = layout.turns[drop_at_least:] if drop_at_least else layout.turns
    for turn in reversed(candidates):
        cost = _sum(tokens, turn)
        if used + cost > budget:
            break
        kept_turns.append(turn)
        used += cost
    keep = set(layout.system) | set(layout.tail)
    for turn in kept_turns:
        keep.update(turn)
    return sorted(keep)


def dropped_turns(layout: Layout, keep: Sequence[int]) -> int:
    kept = set(keep)
    return sum(1 for t in layout.turns if t[0] not in kept)


# ------------------------------------------------------------------ sentences


@dataclass(frozen=True)
class Piece:
    """A sentence or a code block of the history to condense."""

    message: int  # index in the conversation
    role: str
    text: str
    code: bool = False


_FENCE = re.compile(r"(```|~~~)[^\n]*\n.*?(?:\n\1[ \t]*(?=\n|$)|\Z)", re.S)
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+|\n\s*")


def content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def sentences(text: str) -> list[str]:
    """Prose cut at sentence ends and line breaks; short fragments join the next."""
    out: list[str] = []
    carry = ""
    for part in _SENTENCE_END.split(text):
        part = part.strip()
        if not part:
            continue
        part = f"{carry} {part}" if carry else part
        if len(part) < MIN_SENTENCE:
            carry = part
            continue
        out.append(part)
        carry = ""
    if carry:
        if out:
            out[-1] = f"{out[-1]} {carry}"
        else:
            out.append(carry)
    return out


def pieces(messages: Sequence[dict[str, Any]], indices: Sequence[int]) -> list[Piece]:
    """The sentences and code blocks of these messages, in order."""
    out: list[Piece] = []
    for i in indices:
        role = str(messages[i].get("role"))
        text = content_text(messages[i].get("content"))
        pos = 0
        for m in _FENCE.finditer(text):
            out.extend(Piece(i, role, s) for s in sentences(text[pos:m.start()]))
            out.append(Piece(i, role, m.group(0).strip("\n"), code=True))
            pos = m.end()
        out.extend(Piece(i, role, s) for s in sentences(text[pos:]))
    return out


def condensed_text(chosen: Sequence[Piece]) -> str:
    """One message's text: the chosen pieces in order, a line per speaker's
    run of sentences, code blocks on lines of their own."""
    lines = [HEADER]
    role: str | None = None
    after_code = False
    for p in chosen:
        if p.code:
            if p.role != role:
                lines.append(f"{p.role}:")
            lines.append(p.text)
            after_code = True
        elif p.role == role and not after_code:
            lines[-1] += f" {p.text}"
        else:
            lines.append(f"{p.role}: {p.text}")
            after_code = False
        role = p.role
    lines.append(FOOTER)
    return "\n".join(lines)


# ------------------------------------------------------------------ clustering


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)


def kmeans(vectors: np.ndarray, k: int) -> np.ndarray:
    """Cluster labels of `vectors` (rows, cosine similarity) into `k` clusters.

    Deterministic: the first centre is the point nearest the mean, each next
    one the point farthest from the centres so far (ties to the lower index),
    then Lloyd rounds until nothing moves.
    """
    x = _unit(np.asarray(vectors, dtype=np.float64))
    n = len(x)
    k = max(1, min(k, n))
    first = int(np.argmax(x @ x.mean(axis=0)))
    centres = [first]
    nearest = x @ x[first]  # similarity to the closest centre so far
    for _ in range(1, k):
        nxt = int(np.argmin(nearest))
        centres.append(nxt)
        nearest = np.maximum(nearest, x @ x[nxt])
    c = x[centres].copy()
    labels = np.argmax(x @ c.T, axis=1)
    for _ in range(KMEANS_ROUNDS):
        for j in range(k):
            members = x[labels == j]
            if len(members):
                c[j] = members.mean(axis=0)
        c = _unit(c)
        new = np.argmax(x @ c.T, axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
    return labels


def representatives(vectors: np.ndarray, k: int) -> list[int]:
    """One row per cluster (the one nearest its centre), in their original order."""
    x = _unit(np.asarray(vectors, dtype=np.float64))
    labels = kmeans(x, k)
    chosen = []
    for j in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == j)
        centre = _unit(x[members].mean(axis=0, keepdims=True))[0]
        chosen.append(int(members[np.argmax(x[members] @ centre)]))
    return sorted(chosen)


@dataclass
class CondensePlan:
    verbatim: list[int]  # the messages kept as they are (system, recent turns, tail)
    old: list[int]  # the messages condensed
    summary_budget: int  # tokens the condensed message may take


def condense_plan(layout: Layout, tokens: Sequence[int], budget: int) -> CondensePlan | None:
    """Half of what the pinned messages leave goes to recent turns kept
    verbatim, whole turns newest first; the rest, and what those did not use,
    to the condensed older history.  None when the pinned messages alone do
    not fit or nothing older is left to condense."""
    pinned = _sum(tokens, layout.system) + _sum(tokens, layout.tail)
    if pinned > budget:
        return None
    room = budget - pinned
    used = 0
    recent: list[tuple[int, ...]] = []
    older = list(layout.turns)
    while older:
        cost = _sum(tokens, older[-1])
        if used + cost > room // 2:
            break
        used += cost
        recent.append(older.pop())
    if not older:
        return None
    verbatim = set(layout.system) | set(layout.tail)
    for t in recent:
        verbatim.update(t)
    return CondensePlan(
        verbatim=sorted(verbatim), old=[i for t in older for i in t], summary_budget=room - used
    )


def choose(candidates: Sequence[Piece], vectors: np.ndarray | None, costs: Sequence[int], budget: int,
           k: int) -> list[int]:
    """Indices into `candidates` of at most `k` representative sentences and
    the code blocks that fit: code blocks (newest first) may take half of
    `budget`, sentences the rest."""
    code = [i for i, p in enumerate(candidates) if p.code]
    prose = [i for i, p in enumerate(candidates) if not p.code]
    chosen: list[int] = []
    code_room = budget // 2
    for i in reversed(code):
        if costs[i] <= code_room:
            chosen.append(i)
            code_room -= costs[i]
    if prose and vectors is not None and k > 0:
        picked = representatives(vectors[prose], k)
        chosen.extend(prose[j] for j in picked)
    return sorted(chosen)


# ------------------------------------------------------------------ applying a policy


@dataclass
class Counted:
    n_ctx: int
    prompt_tokens: int  # the whole prompt, exactly
    message_tokens: list[int]  # each message's share of it (an estimate, for choosing what to drop)


def counted(n_ctx: int, prompt_tokens: int, content_tokens: Sequence[int]) -> Counted:
    """Each message's share: its content's tokens, plus an even part of what
    the template adds (rounded up, so shares are not short)."""
    template = max(0, prompt_tokens - sum(content_tokens))
    share = -(-template // max(1, len(content_tokens)))
    return Counted(n_ctx, prompt_tokens, [c + share for c in content_tokens])


# (body) -> counts for that chat body; (texts) -> token counts; (texts) -> vectors
CountChat = Callable[[dict[str, Any]], Awaitable[Counted]]
CountTexts = Callable[[list[str]], Awaitable[list[int]]]
Embed = Callable[[list[str]], Awaitable[np.ndarray]]


@dataclass
class Outcome:
    body: dict[str, Any]
    report: dict[str, Any] | None  # None: it fitted as it was


class Fitter:
    """Fits one chat body into its runner's context by a policy."""

    def __init__(self, model: str, count_chat: CountChat, count_texts: CountTexts, embed: Embed | None):
        self.model = model
        self.count_chat = count_chat
        self.count_texts = count_texts
        self.embed = embed  # None: the model has no condense_model

    async def fit(self, body: dict[str, Any], policy: str) -> Outcome:
        counted = await self.count_chat(body)
        room = reply_room(counted.n_ctx, body.get("max_tokens") or body.get("max_completion_tokens"))
        if room >= counted.n_ctx:
            raise ContextOverflow(
                f"max_tokens {room} leaves no room for a prompt in model '{self.model}'s context of "
                f"{counted.n_ctx} tokens", param="max_tokens")
        budget = counted.n_ctx - room
        if counted.prompt_tokens <= budget:
            return Outcome(body, None)
        messages = body["messages"]
        layout = turns(messages)
        report: dict[str, Any] = {
            "policy": policy, "applied": policy, "n_ctx": counted.n_ctx, "reply_tokens": room,
            "prompt_tokens_before": counted.prompt_tokens, "messages_before": len(messages),
        }
        if policy == "condense":
            if self.embed is None:
                raise BadRequest(f"model '{self.model}' has no condense_model to condense with",
                                 param="context_overflow")
            try:
                result = await self._condense(body, counted, layout, budget, report)
            except Exception as e:  # noqa: BLE001 - any failure of the condense path falls back
                result = None
                report["fallback"] = f"{type(e).__name__}: {getattr(e, 'message', None) or e}"
            if result is not None:
                return result
            report["applied"] = "truncate"
            report.setdefault("fallback", "the condensed conversation did not fit")
        return await self._truncate(body, counted, layout, budget, report)

    def _too_long(self, counted: Counted, budget: int, pinned: int) -> ContextOverflow:
        return ContextOverflow(
            f"the system messages and the last user message take about {pinned} tokens; with {counted.n_ctx - budget} "
            f"kept for the reply they do not fit in model '{self.model}'s context of {counted.n_ctx} tokens "
            f"even with every earlier turn dropped", param="messages")

    async def _truncate(self, body: dict[str, Any], counted: Counted, layout: Layout, budget: int,
                        report: dict[str, Any]) -> Outcome:
        messages = body["messages"]
        tokens = counted.message_tokens
        pinned = _sum(tokens, layout.system) + _sum(tokens, layout.tail)
        drop, extra = 0, 1
        while True:
            keep = truncate_keep(layout, tokens, budget, drop_at_least=drop)
            if keep is None:
                raise self._too_long(counted, budget, pinned)
            candidate = {**body, "messages": [messages[i] for i in keep]}
            exact = await self.count_chat(candidate)
            if exact.prompt_tokens <= budget:
                report.update(prompt_tokens_after=exact.prompt_tokens, messages_after=len(keep),
                              turns_dropped=dropped_turns(layout, keep))
                return Outcome(candidate, report)
            # The estimates were short: drop more turns than this time, twice
            # as many more each try (a few counts, however long the conversation).
            dropped = dropped_turns(layout, keep)
            if dropped >= len(layout.turns):
                raise self._too_long(counted, budget, exact.prompt_tokens)
            drop, extra = min(len(layout.turns), dropped + extra), extra * 2

    async def _condense(self, body: dict[str, Any], counted: Counted, layout: Layout, budget: int,
                        report: dict[str, Any]) -> Outcome | None:
        assert self.embed is not None
        messages = body["messages"]
        plan = condense_plan(layout, counted.message_tokens, budget)
        if plan is None:
            return None
        candidates = pieces(messages, plan.old)
        if len(candidates) > MAX_SENTENCES:
            report["pieces_skipped"] = len(candidates) - MAX_SENTENCES
            candidates = candidates[-MAX_SENTENCES:]
        texts = [f"{p.role}: {p.text}" for p in candidates]
        costs = await self.count_texts(texts)
        prose = [i for i, p in enumerate(candidates) if not p.code]
        vectors = None
        if prose:
            embedded = await self.embed([candidates[i].text for i in prose])
            vectors = np.zeros((len(candidates), embedded.shape[1]))
            vectors[prose] = embedded
        # As many sentences as fit by their average length, fewer until the result fits.
        overhead = len(HEADER) // 3 + len(FOOTER) // 3 + 8
        room = plan.summary_budget - overhead
        avg = max(1.0, sum(costs[i] for i in prose) / len(prose)) if prose else 1.0
        k = min(len(prose), max(1, int(room / avg)))
        first_old = min(plan.old)
        for _ in range(CONDENSE_TRIES):
            chosen = choose(candidates, vectors, costs, room, k)
            if not chosen:
                return None
            text = condensed_text([candidates[i] for i in chosen])
            new_messages = _with_condensed(messages, plan.verbatim, first_old, text)
            candidate = {**body, "messages": new_messages}
            exact = await self.count_chat(candidate)
            if exact.prompt_tokens <= budget:
                report.update(
                    prompt_tokens_after=exact.prompt_tokens, messages_after=len(new_messages),
                    messages_condensed=len(plan.old),
                    sentences=len(prose), sentences_kept=sum(1 for i in chosen if not candidates[i].code),
                    code_blocks=len(candidates) - len(prose),
                    code_blocks_kept=sum(1 for i in chosen if candidates[i].code),
                )
                return Outcome(candidate, report)
            if k <= 1:
                return None
            # Shrink in proportion to the excess, by at least one.
            over = exact.prompt_tokens - budget
            spent = max(1, sum(costs[i] for i in chosen if not candidates[i].code))
            k = max(1, min(k - 1, int(k * (1 - over / spent))))
        return None


def _with_condensed(messages: Sequence[dict[str, Any]], verbatim: Sequence[int], first_old: int,
                    text: str) -> list[dict[str, Any]]:
    """The verbatim messages with the condensed text where the old history
    was: merged into the first kept user message after it, else as a user
    message of its own (so user and assistant still alternate)."""
    out: list[dict[str, Any]] = []
    placed = False
    for i in verbatim:
        m = messages[i]
        if not placed and i > first_old and m.get("role") != "system":
            if m.get("role") == "user" and isinstance(m.get("content"), str):
                out.append({**m, "content": f"{text}\n\n{m['content']}"})
            else:
                out.append({"role": "user", "content": text})
                out.append(m)
            placed = True
            continue
        out.append(m)
    if not placed:
        out.append({"role": "user", "content": text})
    return out


class Tally:
    """How often each policy acted, by model (for /metrics)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[tuple[str, str, str]] = collections.Counter()

    def add(self, model: str, report: dict[str, Any]) -> None:
        self.counts[(model, report["policy"], report["applied"])] += 1


def vectors_of(data: Any) -> np.ndarray:
    """The embedding vectors of an OpenAI embeddings response, in input order."""
    rows = sorted(data["data"], key=lambda d: d["index"])
    out = np.asarray([r["embedding"] for r in rows], dtype=np.float64)
    if out.ndim != 2 or not np.isfinite(out).all():
        raise ValueError("the condense model returned embeddings that are not finite vectors")
    return out


__all__ = [
    "ContextOverflow", "Counted", "Fitter", "content_text", "counted", "Layout", "Outcome", "POLICIES", "Piece", "Tally", "choose",
    "condense_plan", "condensed_text", "kmeans", "pieces", "policy_of", "reply_room", "representatives",
    "sentences", "truncate_keep", "turns", "vectors_of",
]
