"""The `hoshikage` command line's side of the admin API: HTTP calls and tables.

`AdminClient` talks to a running daemon's `/admin/` routes (see
`api/admin.py`) with httpx and turns every way that can fail into one of two
errors the command line prints as one line: `Unreachable` (no daemon at that
address, or it went away) and `DaemonError` (the daemon answered with an
error; its message).  The formatting functions turn the admin API's JSON
into the tables people read; `--json` prints the JSON itself instead.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Iterator, TextIO
from urllib.parse import quote

import httpx

from .auth import is_loopback
from .durations import format_size

# Plain calls; a load waits for the runner, which can take minutes for a big model.
TIMEOUT = httpx.Timeout(30.0, connect=5.0)
LOAD_TIMEOUT = httpx.Timeout(None, connect=5.0)


class ClientError(Exception):
    """Something the command line reports as one line and exit status 1."""


class Unreachable(ClientError):
    def __init__(self, url: str, reason: str):
        super().__init__(f"no daemon at {url}: {reason}")
        self.url = url
        self.reason = reason


class DaemonError(ClientError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _reason(e: httpx.TransportError) -> str:
    text = str(e) or type(e).__name__
    low = text.lower()
    if "refused" in low:
        return "connection refused"
    if isinstance(e, httpx.TimeoutException):
        return "timed out"
    if "name or service not known" in low or "nodename nor servname" in low or "name resolution" in low:
        return "unknown host"
    if text.startswith("[Errno"):
        text = text.split("] ", 1)[-1]
    return text


def _loopback(url: str) -> bool:
    try:
        return is_loopback(httpx.URL(url).host)
    except (httpx.InvalidURL, ValueError):
        return False


def _error_message(response: httpx.Response) -> str:
    """The daemon's message from its error shape, else the status line."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
    return f"HTTP {response.status_code} {response.reason_phrase}".strip()


class AdminClient:
    """Calls to one daemon's admin API at `url`, with `api_key` if given."""

    def __init__(self, url: str, api_key: str | None = None):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # A daemon on this machine is reached directly, whatever HTTP_PROXY says.
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=TIMEOUT,
                                  trust_env=not _loopback(self.url))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "AdminClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ transport

    def _call(self, method: str, path: str, *, timeout: httpx.Timeout | None = None, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, timeout=timeout or TIMEOUT, **kwargs)
        except httpx.TransportError as e:
            raise Unreachable(self.url, _reason(e)) from None
        if response.status_code >= 400:
            raise DaemonError(response.status_code, _error_message(response))
        try:
            return response.json()
        except ValueError:
            raise ClientError(f"{self.url} answered {path} with something other than JSON: is it a hoshikage daemon?") from None

    def _stream(self, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The objects of an NDJSON follow stream, as they come, until the caller stops."""
        started = False
        try:
            with self._http.stream("GET", path, params=params, timeout=httpx.Timeout(None, connect=5.0)) as response:
                if response.status_code >= 400:
                    response.read()
                    raise DaemonError(response.status_code, _error_message(response))
                started = True
                for line in response.iter_lines():
                    if line.strip():
                        yield json.loads(line)
        except httpx.TransportError as e:
            if started:
                raise ClientError(f"lost the daemon at {self.url}: {_reason(e)}") from None
            raise Unreachable(self.url, _reason(e)) from None
        except ValueError:
            raise ClientError(f"{self.url} sent a line that is not JSON while following {path}") from None
        raise ClientError(f"the daemon at {self.url} ended the stream (shutting down?)")

    @staticmethod
    def _model_path(name: str, action: str) -> str:
        return f"/admin/models/{quote(name, safe='')}/{action}"

    # ------------------------------------------------------------ calls

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/admin/status")

    def served_names(self) -> list[str]:
        """Every name the OpenAI API serves (`GET /v1/models`): models and aliases."""
        data = self._call("GET", "/v1/models")
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise ClientError(f"{self.url} answered /v1/models without a 'data' list: is it a hoshikage daemon?")
        return [m["id"] for m in items if isinstance(m, dict) and isinstance(m.get("id"), str)]

    def show(self, name: str) -> dict[str, Any]:
        """Ollama's `POST /api/show` for one model: its parameters and GGUF metadata."""
        return self._call("POST", "/api/show", json={"model": name})

    def models(self) -> list[dict[str, Any]]:
        return self._call("GET", "/admin/models")["models"]

    def load(self, name: str, keep_alive: str | float | None = None) -> dict[str, Any]:
        body = {"keep_alive": keep_alive} if keep_alive is not None else None
        return self._call("POST", self._model_path(name, "load"), json=body, timeout=LOAD_TIMEOUT)

    def reload(self) -> dict[str, Any]:
        return self._call("POST", "/admin/reload", timeout=LOAD_TIMEOUT)

    def restart(self, name: str) -> dict[str, Any]:
        return self._call("POST", self._model_path(name, "restart"), timeout=LOAD_TIMEOUT)

    def unload(self, name: str) -> dict[str, Any]:
        return self._call("POST", self._model_path(name, "unload"))

    def unload_all(self) -> list[dict[str, Any]]:
        return self._call("POST", "/admin/unload")["models"]

    def logs(self, name: str, lines: int | None = None) -> dict[str, Any]:
        params = {"lines": lines} if lines is not None else {}
        return self._call("GET", self._model_path(name, "logs"), params=params)

    def follow_logs(self, name: str, lines: int | None = None) -> Iterator[dict[str, Any]]:
        params: dict[str, Any] = {"follow": 1}
        if lines is not None:
            params["lines"] = lines
        return self._stream(self._model_path(name, "logs"), params)

    def events(self, model: str | None = None, after: int = 0, limit: int | None = None) -> dict[str, Any]:
        return self._call("GET", "/admin/events", params=_event_params(model, after, limit))

    def follow_events(self, model: str | None = None, after: int = 0, limit: int | None = None) -> Iterator[dict[str, Any]]:
        return self._stream("/admin/events", {**_event_params(model, after, limit), "follow": 1})


def _event_params(model: str | None, after: int, limit: int | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if model:
        params["model"] = model
    if after:
        params["after"] = after
    if limit is not None:
        params["limit"] = limit
    return params


# ------------------------------------------------------------------ formatting


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, three spaces apart (as `ollama ps` prints)."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    lines = ["   ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [headers, *rows]]
    return "\n".join(lines)


def human_seconds(seconds: float) -> str:
    """4m59s, 2h3m, 1d2h: the two largest units, for people."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size:
            parts.append(f"{s // size}{unit}")
            s %= size
    return "".join(parts[:2])


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _size(model: dict[str, Any]) -> str:
    memory = model.get("memory") or {}
    size = memory.get("measured_bytes")
    if size is None:
        size = memory.get("estimate_bytes")
        return f"~{format_size(size)}" if size else "-"
    return format_size(size)


def _until(model: dict[str, Any]) -> str:
    state = model["state"]
    if state in ("draining", "stopping"):
        return "stopping"
    if state in ("loading", "busy"):
        return "-"
    if model.get("keep_alive_seconds") is None:
        return "forever"
    if model.get("expires_in") is not None:
        return f"in {human_seconds(model['expires_in'])}"
    return "-"


def format_ps(models: list[dict[str, Any]]) -> str:
    loaded = [m for m in models if m["loaded"]]
    rows = []
    for m in loaded:
        replicas = m["replicas"]
        ready = sum(1 for r in replicas if r["state"] == "ready")
        pids = ",".join(str(r["pid"]) for r in replicas if r.get("pid")) or "-"
        rows.append([m["name"], m["state"], f"{ready}/{m['parallel']}", pids, _size(m), _until(m)])
    return table(["NAME", "STATE", "REPLICAS", "PIDS", "SIZE", "UNTIL"], rows)


def format_list(models: list[dict[str, Any]]) -> str:
    rows = [
        [m["name"], ", ".join(m["aliases"]) or "-", m["state"], m["keep_alive"], "yes" if m["pinned"] else "no"]
        for m in models
    ]
    return table(["NAME", "ALIASES", "STATE", "KEEP_ALIVE", "PINNED"], rows)


def format_status(s: dict[str, Any], url: str) -> str:
    counters = s.get("counters") or {}
    uptime = s.get("uptime_seconds")
    rows = [
        ["daemon", f"hoshikage {s['version']} at {url} (pid {s['pid']})"],
        ["listening", f"{s['host']}:{s['port']}"],
        ["uptime", human_seconds(uptime) if uptime is not None else "-"],
        ["models", f"{s['models_loaded']} loaded of {s['models_configured']} configured (at most {s['max_loaded_models']} at once)"],
        ["requests", f"{s['requests_in_flight']} in flight, {s['requests_queued']} queued (at most {s['max_queue']})"],
    ]
    if s.get("config"):
        rows.insert(2, ["config", s["config"]])
    out = "\n".join(f"{k + ':':<11}{v}" for k, v in rows)
    if counters:
        out += "\ncounters:  " + ", ".join(f"{k} {v}" for k, v in counters.items())
    return out


def describe_model(m: dict[str, Any]) -> str:
    """One line about a model after a load or an unload."""
    state = m["state"]
    if state == "unloaded":
        return f"{m['name']}: unloaded"
    if state in ("draining", "stopping"):
        busy = m.get("in_flight") or 0
        waiting = f"; it stops when its {busy} request(s) in flight end" if busy else ""
        return f"{m['name']}: {state}{waiting}"
    pids = ", ".join(str(r["pid"]) for r in m["replicas"] if r.get("pid"))
    n = len(m["replicas"])
    replicas = f"{n} replica{'s' if n != 1 else ''}" + (f", pid {pids}" if pids else "")
    return f"{m['name']}: {state} ({replicas}, size {_size(m)}, keep_alive {m['keep_alive']})"


def format_log_line(line: dict[str, Any]) -> str:
    pid = line.get("pid")
    return f"{_when(line['time'])} {line['model']}#{line['replica']}[{pid if pid is not None else '-'}]: {line['text']}"


def format_event(e: dict[str, Any]) -> str:
    who = e["model"] + (f"#{e['replica']}" if e.get("replica") is not None else "")
    if e.get("pid") is not None:
        who += f"[{e['pid']}]"
    detail = " ".join(f"{k}={_detail(v)}" for k, v in (e.get("detail") or {}).items())
    return f"{_when(e['time'])} {e['seq']:>5} {e['kind']:<12} {who} reason={_detail(e['reason'])}" + (f" {detail}" if detail else "")


def _detail(value: Any) -> str:
    if isinstance(value, str):
        return value if value and " " not in value and "\n" not in value else json.dumps(value, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def print_json(value: Any, out: TextIO) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False), file=out)
