"""`hoshikage export litellm`: a LiteLLM proxy config for running supervisors.

LiteLLM's proxy reads a `model_list` of *deployments*: one entry per model
name per place that serves it.  Entries that share a `model_name` form a
group LiteLLM balances over and fails over within.  Writing that list by hand
for several boxes goes stale as soon as a model is added, so it is made here
from what each supervisor says about itself (`read_node`: its admin API for
the configured models, their aliases and embedding flag, its OpenAI API for
the names it serves, and `/api/show` for each model's context length).

`litellm_config` is a pure function of those answers: the same answers give
the same text.  What it writes:

* one deployment per (box, model): `openai/<name>` against `<url>/v1`, or,
  with `provider="ollama"`, `ollama_chat/<name>` (embedding models
  `ollama/<name>`) against `<url>`;
* `model_info`: `mode` (chat or embedding), the context the box serves as
  `max_input_tokens`/`max_tokens`, a stable deployment `id` (so LiteLLM's
  cooldowns and counters survive a regenerated file) and `hoshikage_url`;
* aliases as `router_settings.model_group_alias`, so an alias and its model
  are one group (counters and cooldowns shared) rather than two;
* the API key as `os.environ/<VAR>` when the supervisors need one: the key
  itself never lands in the file;
* warm boxes first (`prefer_warm`): where a model is loaded, pinned or
  preloaded on some boxes but not others, those boxes get `order: 1` and
  the rest `order: 2`.  LiteLLM sends a group's requests to its lowest
  `order` deployments that are not cooling down, and moves to the next only
  when those fail (a 503 with `Retry-After` cools one down for that long).
  This is a snapshot of the moment of the export: regenerate the file (and
  restart or reload LiteLLM) when placement changes.  Where every box or no
  box has a model warm, no `order` is written and LiteLLM spreads evenly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

PROVIDERS = ("openai", "ollama")
DEFAULT_KEY_ENV = "HOSHIKAGE_API_KEY"
# What LiteLLM sends when no key is configured: the OpenAI client needs some key.
NO_KEY = "none"
ORDER_WARM = 1
ORDER_COLD = 2


class ExportError(Exception):
    """Answers that cannot be turned into one consistent config."""


@dataclass(frozen=True)
class ModelFacts:
    """One configured model on one box, as its supervisor describes it."""

    name: str
    aliases: tuple[str, ...] = ()
    embedding: bool = False
    context_length: int | None = None  # the context a request gets by default; None: unknown
    warm: bool = False  # loaded (not on its way out), pinned or preloaded


@dataclass(frozen=True)
class Node:
    """One supervisor: its base URL (as the router will reach it) and its models."""

    url: str
    models: tuple[ModelFacts, ...]
    version: str | None = None
    needs_key: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", self.url.rstrip("/"))


@dataclass
class _Group:
    name: str
    deployments: list[tuple[Node, ModelFacts]] = field(default_factory=list)


# ------------------------------------------------------------------ from the APIs' answers


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


def context_from_show(show: Mapping[str, Any]) -> int | None:
    """The context a request gets from `/api/show`: the model table's `num_ctx`
    (its `parameters`), or, when that is 0 (the trained context), the GGUF's
    `<arch>.context_length`."""
    num_ctx = None
    for line in str(show.get("parameters") or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "num_ctx" and parts[1].isdigit():
            num_ctx = int(parts[1])
    if num_ctx:
        return num_ctx
    info = show.get("model_info")
    if isinstance(info, Mapping):
        for key, value in info.items():
            if isinstance(key, str) and key.endswith(".context_length"):
                found = _positive_int(value)
                if found:
                    return found
    return None


def node_from_answers(url: str, *, admin_models: Sequence[Mapping[str, Any]], served: Iterable[str],
                      shows: Mapping[str, Mapping[str, Any]], version: str | None = None,
                      needs_key: bool = False) -> Node:
    """A `Node` from a supervisor's `GET /admin/models` list, the ids of its
    `GET /v1/models` and its `/api/show` answer per model name.  Only models
    the OpenAI API serves are kept (a model a reload removed still shows in
    the admin API while it drains)."""
    served_names = set(served)
    models = []
    for m in admin_models:
        name = m.get("name")
        if not isinstance(name, str) or name not in served_names or m.get("configured") is False:
            continue
        aliases = tuple(a for a in (m.get("aliases") or ()) if isinstance(a, str) and a in served_names)
        loaded = bool(m.get("loaded")) and m.get("state") not in ("draining", "stopping")
        models.append(ModelFacts(
            name=name,
            aliases=aliases,
            embedding=bool(m.get("embedding")),
            context_length=context_from_show(shows.get(name) or {}),
            warm=loaded or bool(m.get("pinned")) or bool(m.get("preload")),
        ))
    return Node(url=url.rstrip("/"), models=tuple(models), version=version, needs_key=needs_key)


# ------------------------------------------------------------------ the config


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def deployment_id(url: str, name: str) -> str:
    """Stable across exports: LiteLLM keys cooldowns and counters by it."""
    host = re.sub(r"^[a-z]+://", "", url.rstrip("/"))
    return f"hoshikage-{_slug(host)}-{_slug(name)}"


def _groups(nodes: Sequence[Node]) -> tuple[list[_Group], dict[str, str]]:
    """Deployments grouped by model name, and aliases → model name; raises
    ExportError when two boxes disagree about what a name means."""
    groups: dict[str, _Group] = {}
    aliases: dict[str, tuple[str, str]] = {}  # alias -> (model, url that said so)
    seen_urls: set[str] = set()
    for node in nodes:
        if node.url in seen_urls:
            raise ExportError(f"{node.url} is given twice (expected each supervisor once)")
        seen_urls.add(node.url)
        for m in node.models:
            groups.setdefault(m.name, _Group(m.name)).deployments.append((node, m))
            for a in m.aliases:
                if a in aliases and aliases[a][0] != m.name:
                    other_model, other_url = aliases[a]
                    raise ExportError(
                        f"alias {a!r} names model {other_model!r} at {other_url} but model {m.name!r} at "
                        f"{node.url} (expected an alias to name the same model on every supervisor)"
                    )
                aliases[a] = (m.name, node.url)
    for a, (model, url) in aliases.items():
        if a in groups:
            where = groups[a].deployments[0][0].url
            raise ExportError(
                f"{a!r} is a model at {where} but an alias of {model!r} at {url} "
                "(expected a name to mean the same model on every supervisor)"
            )
    return [groups[n] for n in sorted(groups)], {a: m for a, (m, _) in sorted(aliases.items())}


def _deployment(node: Node, m: ModelFacts, *, provider: str, key_env: str | None, order: int | None) -> dict[str, Any]:
    if provider == "openai":
        params: dict[str, Any] = {"model": f"openai/{m.name}", "api_base": f"{node.url}/v1"}
    else:
        params = {"model": f"{'ollama' if m.embedding else 'ollama_chat'}/{m.name}", "api_base": node.url}
    if node.needs_key and key_env:
        params["api_key"] = f"os.environ/{key_env}"
    elif provider == "openai":
        params["api_key"] = NO_KEY
    if order is not None:
        params["order"] = order
    info: dict[str, Any] = {
        "id": deployment_id(node.url, m.name),
        "mode": "embedding" if m.embedding else "chat",
    }
    if m.context_length:
        info["max_input_tokens"] = m.context_length
        if not m.embedding:
            info["max_tokens"] = m.context_length
    info["hoshikage_url"] = node.url
    info["hoshikage_warm"] = m.warm
    return {"model_name": m.name, "litellm_params": params, "model_info": info}


def litellm_config(nodes: Sequence[Node], *, provider: str = "openai", key_env: str | None = DEFAULT_KEY_ENV,
                   prefer_warm: bool = True) -> str:
    """The LiteLLM proxy config (YAML text) for these supervisors."""
    if provider not in PROVIDERS:
        raise ExportError(f"unknown provider {provider!r} (expected one of: {', '.join(PROVIDERS)})")
    if not nodes:
        raise ExportError("no supervisor given (expected at least one URL)")
    groups, aliases = _groups(nodes)
    if not groups:
        raise ExportError("the supervisors serve no model (expected at least one in their [models] tables)")
    model_list = []
    for g in groups:
        warm = [m.warm for _, m in g.deployments]
        ordered = prefer_warm and any(warm) and not all(warm)
        for node, m in g.deployments:
            order = (ORDER_WARM if m.warm else ORDER_COLD) if ordered else None
            model_list.append(_deployment(node, m, provider=provider, key_env=key_env, order=order))
    router: dict[str, Any] = {
        # Even spreading within a group's lowest `order`; see docs/scale-out.md.
        "routing_strategy": "simple-shuffle",
        # A failed request is tried again on another deployment of its group.
        "num_retries": 2,
        # A box that fails more than twice in a minute (a refused connection, a
        # 5xx, a timeout) cools down for that model: no request goes there for
        # cooldown_time, or for as long as a 503's Retry-After says.  The
        # failed requests themselves are retried on another box (num_retries).
        "allowed_fails": 2,
        "cooldown_time": 30,
        # When a box fails a request, try the group's other boxes (not the same
        # one again) before giving up: a refused connection never reaches a client.
        "enable_weighted_failover": True,
    }
    if aliases:
        router["model_group_alias"] = dict(aliases)
    config = {"model_list": model_list, "router_settings": router}
    head = ["# LiteLLM proxy config generated by `hoshikage export litellm` from:"]
    for node in nodes:
        head.append(f"#   {node.url}" + (f" (hoshikage {node.version})" if node.version else ""))
    if any(n.needs_key for n in nodes) and key_env:
        head.append(f"# The supervisors' API key is read from ${key_env} in LiteLLM's environment.")
    head.append("# Regenerate it when models or their placement change; see docs/scale-out.md.")
    return "\n".join(head) + "\n" + to_yaml(config)


# ------------------------------------------------------------------ YAML


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    # A JSON string is a YAML double-quoted scalar: always read back as a string.
    return json.dumps(str(value), ensure_ascii=False)


def to_yaml(value: Any, indent: int = 0) -> str:
    """Block-style YAML for dicts, lists and scalars (strings always quoted)."""
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, Mapping):
        if not value:
            return pad + "{}\n"
        for k, v in value.items():
            key = _scalar(str(k)) if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(k)) else str(k)
            if isinstance(v, (Mapping, list)) and v:
                lines.append(f"{pad}{key}:\n" + to_yaml(v, indent + 2).rstrip("\n"))
            else:
                lines.append(f"{pad}{key}: {_inline(v)}")
    elif isinstance(value, list):
        if not value:
            return pad + "[]\n"
        for item in value:
            if isinstance(item, (Mapping, list)) and item:
                body = to_yaml(item, indent + 2)
                lines.append(f"{pad}- " + body[indent + 2:].rstrip("\n"))
            else:
                lines.append(f"{pad}- {_inline(item)}")
    else:
        lines.append(pad + _scalar(value))
    return "\n".join(lines) + "\n"


def _inline(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _scalar(value)
