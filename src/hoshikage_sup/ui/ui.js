// Hoshikage status page: plain JavaScript over the admin API, no framework.
//
// /admin/status and /admin/models are read about once a second, and
// /admin/events?follow=1 is followed as an NDJSON stream (each event also
// triggers a read at once, so a load or an unload shows within a moment).
// The admin key, when the daemon asks for one, is kept in sessionStorage
// and sent as "Authorization: Bearer KEY".
"use strict";

(() => {
  const POLL_MS = 1000; // while the tab is visible
  const HIDDEN_POLL_MS = 5000; // while it is not
  const SOON_MS = 60; // after an event: read again almost at once
  const EVENTS_BACKLOG = 100;
  const EVENTS_SHOWN = 200;
  const LOG_LINES = 500;
  const LOG_LINES_SHOWN = 2000;
  const KEY_STORE = "hoshikage.adminKey";

  const $ = (id) => document.getElementById(id);

  const state = {
    key: readKey(),
    authorized: false,
    waitingForKey: false,
    timer: null,
    reading: false,
    again: false,
    cards: new Map(), // model name -> card
    order: "",
    lastEvent: new Map(), // model name -> newest event
    eventsSeq: 0,
    eventsRunning: false,
    eventsAbort: null,
    actions: new Map(), // model name -> action under way
    devices: new Map(),
    deviceCards: new Map(),
    logs: null, // {name, abort}
    daemon: "", // pid and start time of the daemon that answers
  };

  class AuthError extends Error {}
  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function readKey() {
    try {
      return sessionStorage.getItem(KEY_STORE) || "";
    } catch (e) {
      return "";
    }
  }

  function storeKey(key) {
    try {
      if (key) sessionStorage.setItem(KEY_STORE, key);
      else sessionStorage.removeItem(KEY_STORE);
    } catch (e) {
      /* private mode: the key lives as long as the page */
    }
  }

  // ------------------------------------------------------------ formatting

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  function setText(el, text) {
    text = text === null || text === undefined ? "" : String(text);
    if (el.textContent !== text) el.textContent = text;
  }

  function bytes(n) {
    if (n === null || n === undefined) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    let v = Number(n);
    while (Math.abs(v) >= 1024 && i < units.length - 1) {
      v /= 1024;
      i += 1;
    }
    return (i === 0 ? String(Math.round(v)) : v.toFixed(v < 10 ? 2 : 1)) + " " + units[i];
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    let s = Math.max(0, Math.floor(seconds));
    const d = Math.floor(s / 86400);
    s -= d * 86400;
    const hr = Math.floor(s / 3600);
    s -= hr * 3600;
    const m = Math.floor(s / 60);
    s -= m * 60;
    if (d) return `${d}d ${hr}h`;
    if (hr) return `${hr}h ${m}m`;
    if (m) return `${m}m ${String(s).padStart(2, "0")}s`;
    return `${s}s`;
  }

  function clock(t) {
    const d = new Date(t * 1000);
    return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  }

  function pct(part, whole) {
    if (!whole || part === null || part === undefined) return 0;
    return Math.max(0, Math.min(100, (100 * part) / whole));
  }

  function messageOf(body, fallback) {
    if (body && typeof body === "object") {
      if (body.error && typeof body.error === "object" && body.error.message) return body.error.message;
      if (typeof body.error === "string") return body.error;
    }
    return fallback;
  }

  // ------------------------------------------------------------ the admin API

  async function api(path, { method = "GET", body, signal } = {}) {
    const headers = { Accept: "application/json" };
    if (state.key) headers.Authorization = "Bearer " + state.key;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
      credentials: "omit",
    });
    if (r.status === 401) {
      const data = await r.json().catch(() => null);
      throw new AuthError(messageOf(data, "unauthorized"));
    }
    return r;
  }

  async function call(path, options) {
    const r = await api(path, options);
    const data = await r.json().catch(() => null);
    if (!r.ok) throw new ApiError(r.status, messageOf(data, `${r.status} ${r.statusText}`));
    return data;
  }

  async function* ndjson(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, nl).trim();
        buffer = buffer.slice(nl + 1);
        if (!line) continue;
        let obj = null;
        try {
          obj = JSON.parse(line);
        } catch (e) {
          continue;
        }
        yield obj;
      }
    }
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const enc = (name) => encodeURIComponent(name);

  // ------------------------------------------------------------ connection and key

  function setConn(kind, text) {
    const el = $("conn");
    el.dataset.state = kind;
    setText(el, text);
  }

  function banner(text) {
    const el = $("banner");
    setText(el, text || "");
    el.hidden = !text;
  }

  function askForKey(error) {
    state.authorized = false;
    state.waitingForKey = true;
    clearTimeout(state.timer);
    if (state.eventsAbort) state.eventsAbort.abort();
    closeLogs();
    $("main").hidden = true;
    banner("");
    const auth = $("auth");
    auth.hidden = false;
    const refused = Boolean(state.key);
    auth.classList.toggle("failed", refused);
    setText(
      $("auth-message"),
      refused
        ? `The key was refused (${error.message}). Enter an admin key (or, when no admin key is configured, an API key).`
        : "This daemon asks for a key on its admin API. Enter an admin key (or, when no admin key is configured, " +
            "an API key). It is kept in this tab only and sent as Authorization: Bearer.",
    );
    setConn("key", "admin key needed");
    $("forget-key").hidden = !state.key;
    const input = $("auth-key");
    if (document.activeElement !== input) input.focus();
  }

  function keyAccepted() {
    state.authorized = true;
    state.waitingForKey = false;
    $("auth").hidden = true;
    $("main").hidden = false;
    $("forget-key").hidden = !state.key;
  }

  // ------------------------------------------------------------ polling

  function schedule(ms) {
    clearTimeout(state.timer);
    state.timer = setTimeout(tick, ms);
  }

  function refreshSoon() {
    if (state.waitingForKey) return;
    if (state.reading) state.again = true;
    else schedule(SOON_MS);
  }

  async function tick() {
    clearTimeout(state.timer);
    state.reading = true;
    state.again = false;
    try {
      await refresh();
    } finally {
      state.reading = false;
    }
    if (state.waitingForKey) return;
    schedule(state.again ? 0 : document.hidden ? HIDDEN_POLL_MS : POLL_MS);
  }

  async function refresh() {
    try {
      const [status, models] = await Promise.all([call("/admin/status"), call("/admin/models")]);
      keyAccepted();
      banner("");
      setConn("live", "live");
      render(status, models.models || []);
      followEvents();
    } catch (e) {
      if (e instanceof AuthError) {
        askForKey(e);
        return;
      }
      setConn("retrying", "reconnecting…");
      banner(`The daemon does not answer (${e.message || e}); what is shown may be out of date. Retrying…`);
    }
  }

  // ------------------------------------------------------------ header and devices

  function render(status, models) {
    // Another daemon answers now (restarted): its events are numbered from 1 again.
    const daemon = `${status.pid}/${status.started_at}`;
    if (state.daemon && state.daemon !== daemon) {
      state.eventsSeq = 0;
      state.lastEvent.clear();
      $("events").replaceChildren();
      if (state.eventsAbort) state.eventsAbort.abort();
    }
    state.daemon = daemon;
    setText($("version"), status.version ? "v" + status.version : "");
    const parts = [
      `${status.models_loaded}/${status.models_configured} loaded`,
      `${status.requests_in_flight} in flight`,
      `${status.requests_queued} queued`,
      `up ${duration(status.uptime_seconds)}`,
      `${status.host}:${status.port}`,
    ];
    setText($("summary"), parts.join(" · "));
    state.devices = new Map((status.devices || []).map((d) => [d.id, d]));
    renderDevices(status.devices || []);
    renderModels(models);
  }

  function deviceLabel(d) {
    if (!d) return "?";
    return d.kind === "cpu" ? "RAM" : `GPU ${d.gpu}`;
  }

  function renderDevices(devices) {
    const box = $("devices");
    const seen = new Set();
    for (const d of devices) {
      seen.add(d.id);
      let card = state.deviceCards.get(d.id);
      if (!card) {
        card = makeDeviceCard(d.id);
        state.deviceCards.set(d.id, card);
        box.append(card.el);
      }
      const total = d.total_bytes;
      const free = d.free_bytes;
      const runners = (d.measured_bytes ?? 0) + (d.spare_bytes ?? 0);
      const used = total !== null && free !== null ? total - free : null;
      const other = used !== null ? Math.max(0, used - runners) : 0;
      setText(card.name, d.kind === "cpu" ? d.name : `GPU ${d.gpu} · ${d.name}`);
      setText(card.free, total ? `${bytes(free)} free of ${bytes(total)}` : "size unknown");
      card.measured.style.width = pct(runners, total) + "%";
      card.measured.hidden = !runners;
      card.other.style.left = pct(runners, total) + "%";
      card.other.style.width = pct(other, total) + "%";
      card.freeSeg.style.width = pct(free, total) + "%";
      card.estimate.style.left = pct(d.estimate_bytes, total) + "%";
      card.estimate.hidden = !d.estimate_bytes;
      card.limit.hidden = !d.limit_bytes;
      if (d.limit_bytes) card.limit.style.left = pct(d.limit_bytes, total) + "%";
      const caption = [
        `runners: estimate ${bytes(d.estimate_bytes)}`,
        `measured ${d.measured_bytes === null ? "—" : bytes(d.measured_bytes)}`,
      ];
      if (d.spare_bytes) caption.push(`warm spare ${bytes(d.spare_bytes)}`);
      if (d.limit_bytes) caption.push(`limit ${bytes(d.limit_bytes)}`);
      if (d.reserve_bytes) caption.push(`reserve ${bytes(d.reserve_bytes)}`);
      setText(card.caption, caption.join(" · "));
      card.bar.title = `${deviceLabel(d)}: runners ${bytes(runners)}, other ${bytes(other)}, free ${bytes(free)}`;
      card.bar.setAttribute("aria-label", card.bar.title);
    }
    for (const [id, card] of state.deviceCards) {
      if (!seen.has(id)) {
        card.el.remove();
        state.deviceCards.delete(id);
      }
    }
  }

  function makeDeviceCard(id) {
    const name = h("span");
    const free = h("span", { class: "muted" });
    const measured = h("span", { class: "seg-measured" });
    const other = h("span", { class: "seg-other" });
    const freeSeg = h("span", { class: "seg-free" });
    const estimate = h("span", { class: "mark-estimate" });
    const limit = h("span", { class: "mark-limit" });
    const bar = h("div", { class: "bar", role: "img" }, other, freeSeg, measured, estimate, limit);
    const caption = h("div", { class: "bar-caption" });
    const legend = h(
      "div",
      { class: "legend" },
      h("span", {}, h("i", { class: "k-measured" }), "runners (measured)"),
      h("span", {}, h("i", { class: "k-estimate" }), "runners (estimate)"),
      h("span", {}, h("i", { class: "k-other" }), "used by others"),
      h("span", {}, h("i", { class: "k-free" }), "free"),
    );
    const el = h("article", { class: "device", "data-device": id }, h("h3", {}, name, free), bar, caption, legend);
    return { el, name, free, bar, measured, other, freeSeg, estimate, limit, caption };
  }

  // ------------------------------------------------------------ models

  function renderModels(models) {
    const box = $("models");
    const names = models.map((m) => m.name);
    const seen = new Set(names);
    for (const [name, card] of state.cards) {
      if (!seen.has(name)) {
        card.el.remove();
        state.cards.delete(name);
      }
    }
    for (const m of models) {
      let card = state.cards.get(m.name);
      if (!card) {
        card = makeCard(m.name);
        state.cards.set(m.name, card);
      }
      updateCard(card, m);
    }
    const order = names.join("\u0000");
    if (order !== state.order) {
      for (const name of names) box.append(state.cards.get(name).el);
      state.order = order;
    }
    applyFilter();
    tickCountdowns();
  }

  function makeCard(name) {
    const title = h("h3", { class: "mname", text: name });
    const badge = h("span", { class: "badge" });
    const flags = h("span", { class: "flags" });
    const aliases = h("div", { class: "aliases" });
    const stat = (label, cls) => {
      const dd = h("dd", { class: cls });
      return [h("div", {}, h("dt", { text: label }), dd), dd];
    };
    const [replicasBox, replicasDd] = stat("Replicas", "n-replicas");
    const [inflightBox, inflightDd] = stat("In flight", "n-inflight");
    const [queuedBox, queuedDd] = stat("Queued", "n-queued");
    const keepDd = h("dd", { class: "keep" });
    const countdown = h("span", { class: "countdown" });
    keepDd.append(countdown);
    const keepBox = h("div", {}, h("dt", { text: "Keep alive" }), keepDd);
    const stats = h("dl", { class: "stats" }, replicasBox, inflightBox, queuedBox, keepBox);
    const replicas = h("ul", { class: "replicas" });
    const mem = h("div", { class: "mem" });
    const lastEvent = h("div", { class: "last-event" });
    const msg = h("p", { class: "card-msg", role: "alert" });
    msg.hidden = true;
    const button = (action, label, cls) =>
      h("button", { type: "button", "data-action": action, class: cls || null, text: label });
    const load = button("load", "Load", "primary");
    const unload = button("unload", "Unload", "danger");
    const restart = button("restart", "Restart");
    const logs = button("logs", "Logs");
    const actions = h("div", { class: "actions" }, load, unload, restart, logs);
    const el = h(
      "article",
      { class: "model", "data-model": name },
      h("div", { class: "mhead" }, title, badge, flags),
      aliases,
      stats,
      replicas,
      mem,
      lastEvent,
      msg,
      actions,
    );
    const card = {
      name, el, badge, flags, aliases, stats, replicasDd, inflightDd, queuedDd, keepDd, countdown, replicas, mem,
      lastEvent, msg, load, unload, restart, logs, model: null, deadline: null, replicaKey: "", memRows: new Map(),
    };
    load.addEventListener("click", () => act(card, "load"));
    unload.addEventListener("click", () => act(card, "unload"));
    restart.addEventListener("click", () => act(card, "restart"));
    logs.addEventListener("click", () => openLogs(card.name));
    return card;
  }

  function updateCard(card, m) {
    card.model = m;
    const el = card.el;
    el.dataset.state = m.state;
    el.dataset.loaded = String(Boolean(m.loaded));
    setText(card.badge, m.draining ? `${m.state} (${m.draining})` : m.state);
    card.badge.className = "badge state-" + m.state;
    const flags = [];
    if (!m.configured) flags.push("removed from the config");
    if (m.pinned) flags.push("pinned");
    if (m.preload) flags.push("preload");
    if (m.embedding) flags.push("embedding");
    if (m.parallel > 1) flags.push(`parallel ${m.parallel}`);
    if (!m.loaded) flags.push(`keep_alive ${m.keep_alive}`);
    setText(card.flags, flags.join(" · "));
    setText(card.aliases, m.aliases && m.aliases.length ? "aliases: " + m.aliases.join(", ") : "");
    card.aliases.hidden = !(m.aliases && m.aliases.length);

    const live = m.replicas.filter((r) => !r.retiring);
    const ready = live.filter((r) => r.state === "ready").length;
    card.stats.hidden = !m.loaded && !m.queued;
    setText(card.replicasDd, `${ready}/${m.parallel}` + (live.length > ready ? ` (+${live.length - ready} starting)` : ""));
    setText(card.inflightDd, m.in_flight);
    setText(card.queuedDd, m.queued);
    card.deadline = m.expires_in === null || m.expires_in === undefined ? null : performance.now() + m.expires_in * 1000;

    // Replicas: rebuilt only when something shown changed.
    const key = JSON.stringify(m.replicas.map((r) => [r.index, r.state, r.pid, r.generation, r.retiring, r.in_flight, r.served, r.load_duration]));
    if (key !== card.replicaKey) {
      card.replicaKey = key;
      card.replicas.replaceChildren(
        ...m.replicas.map((r) =>
          h(
            "li",
            { "data-replica": r.index, "data-pid": r.pid ?? "" },
            h("span", { text: `#${r.index} ${r.state}` }),
            r.pid ? h("span", {}, "pid ", h("span", { class: "pid", text: r.pid })) : null,
            h("span", { class: "muted", text: `gen ${r.generation}` }),
            h("span", { text: `${r.in_flight} in flight` }),
            h("span", { class: "muted", text: `served ${r.served}` }),
            r.load_duration !== null ? h("span", { class: "muted", text: `loaded in ${r.load_duration.toFixed(2)} s` }) : null,
            r.retiring ? h("span", { class: "retiring", text: "retiring" }) : null,
          ),
        ),
      );
    }
    card.replicas.hidden = !m.replicas.length;

    updateMemory(card, m);
    updateLastEvent(card);
    updateButtons(card);
  }

  function memoryRows(m) {
    if (!m.memory) return [];
    if (m.memory.devices) return m.memory.devices;
    // An older daemon: the model's total only.
    return [{ device: "cpu", gpu: null, estimate_bytes: m.memory.estimate_bytes, measured_bytes: m.memory.measured_bytes }];
  }

  function updateMemory(card, m) {
    const rows = memoryRows(m);
    const seen = new Set();
    for (const row of rows) {
      seen.add(row.device);
      let r = card.memRows.get(row.device);
      if (!r) {
        const measured = h("span", { class: "seg-measured" });
        const freeSeg = h("span", { class: "seg-free" });
        const estimate = h("span", { class: "mark-estimate" });
        const bar = h("div", { class: "bar", role: "img" }, freeSeg, measured, estimate);
        const caption = h("div", { class: "bar-caption" });
        r = { el: h("div", { class: "mem-row", "data-device": row.device }, bar, caption), bar, measured, freeSeg, estimate, caption };
        card.memRows.set(row.device, r);
        card.mem.append(r.el);
      }
      const dev = state.devices.get(row.device);
      const total = dev ? dev.total_bytes : null;
      const shown = row.measured_bytes ?? row.estimate_bytes;
      r.measured.style.width = pct(shown, total) + "%";
      r.measured.classList.toggle("unmeasured", row.measured_bytes === null);
      r.estimate.style.left = pct(row.estimate_bytes, total) + "%";
      r.freeSeg.style.width = dev ? pct(dev.free_bytes, total) + "%" : "0";
      const label = dev ? deviceLabel(dev) : row.device;
      const text = [
        `${label}: estimate ${bytes(row.estimate_bytes)}`,
        `measured ${row.measured_bytes === null ? "—" : bytes(row.measured_bytes)}`,
      ];
      if (dev && total) text.push(`of ${bytes(total)}, ${bytes(dev.free_bytes)} free`);
      setText(r.caption, text.join(" · "));
      r.bar.title = text.join(" · ");
      r.bar.setAttribute("aria-label", r.bar.title);
    }
    for (const [device, r] of card.memRows) {
      if (!seen.has(device)) {
        r.el.remove();
        card.memRows.delete(device);
      }
    }
    card.mem.hidden = !rows.length;
  }

  function countdownText(m, deadline) {
    if (!m.loaded) return "";
    if (m.draining) return `unloading (${m.draining})`;
    if (m.keep_alive_seconds === null) return "forever";
    if (deadline !== null) {
      const left = (deadline - performance.now()) / 1000;
      return left > 0 ? `${m.keep_alive} · unloads in ${duration(Math.ceil(left))}` : `${m.keep_alive} · unloading`;
    }
    if (m.state === "busy") return `${m.keep_alive} · counts down once idle`;
    return m.keep_alive;
  }

  function tickCountdowns() {
    for (const card of state.cards.values()) {
      if (card.model) setText(card.countdown, countdownText(card.model, card.deadline));
    }
  }

  function updateLastEvent(card) {
    const e = state.lastEvent.get(card.name);
    setText(card.lastEvent, e ? `last event: ${e.kind}${e.reason ? " (" + e.reason + ")" : ""} at ${clock(e.time)}` : "");
    card.lastEvent.hidden = !e;
  }

  function updateButtons(card) {
    const m = card.model;
    const doing = state.actions.get(card.name);
    const loaded = Boolean(m.loaded);
    const live = loaded && (m.state === "idle" || m.state === "busy" || m.state === "loading");
    card.load.hidden = loaded && doing !== "load";
    card.unload.hidden = !live && doing !== "unload";
    card.restart.hidden = !(m.state === "idle" || m.state === "busy") && doing !== "restart";
    card.load.disabled = card.unload.disabled = card.restart.disabled = Boolean(doing);
    setText(card.load, doing === "load" ? "Loading…" : "Load");
    setText(card.unload, doing === "unload" ? "Unloading…" : "Unload");
    setText(card.restart, doing === "restart" ? "Restarting…" : "Restart");
    if (!m.configured) card.load.hidden = true;
  }

  async function act(card, action) {
    if (state.actions.has(card.name)) return;
    state.actions.set(card.name, action);
    card.msg.hidden = true;
    updateButtons(card);
    refreshSoon();
    try {
      await call(`/admin/models/${enc(card.name)}/${action}`, { method: "POST" });
    } catch (e) {
      if (e instanceof AuthError) {
        askForKey(e);
      } else {
        setText(card.msg, `${action} failed: ${e.message || e}`);
        card.msg.hidden = false;
      }
    } finally {
      state.actions.delete(card.name);
      if (card.model) updateButtons(card);
      refreshSoon();
    }
  }

  function applyFilter() {
    const text = $("filter").value.trim().toLowerCase();
    const loadedOnly = $("loaded-only").checked;
    let shown = 0;
    for (const card of state.cards.values()) {
      const m = card.model;
      const match =
        (!text || m.name.toLowerCase().includes(text) || (m.aliases || []).some((a) => a.toLowerCase().includes(text))) &&
        (!loadedOnly || m.loaded);
      card.el.hidden = !match;
      if (match) shown += 1;
    }
    const total = state.cards.size;
    setText($("models-count"), shown === total ? `(${total})` : `(${shown} of ${total})`);
    $("models-empty").hidden = shown > 0 || total === 0;
  }

  // ------------------------------------------------------------ events

  const BYTES_KEY = /bytes|needed|available|estimate|measured|memory|free|size|limit/;

  function detailText(detail) {
    if (!detail) return "";
    const parts = [];
    for (const [k, v] of Object.entries(detail)) {
      if (v === null || v === undefined || v === "") continue;
      const asBytes = BYTES_KEY.test(k);
      let text;
      if (Array.isArray(v)) {
        if (!v.length) continue;
        text = v.map((x) => (typeof x === "object" ? JSON.stringify(x) : String(x))).join(" | ");
      } else if (typeof v === "object") {
        const entries = Object.entries(v);
        if (!entries.length) continue;
        text = entries.every(([, x]) => typeof x === "number") && asBytes
          ? entries.map(([i, x]) => `${/^\d+$/.test(i) ? "GPU " + i : i} ${bytes(x)}`).join(", ")
          : JSON.stringify(v);
      } else if (typeof v === "number" && asBytes && Math.abs(v) >= 1024) {
        text = bytes(v);
      } else {
        text = String(v);
      }
      parts.push(`${k}: ${text}`);
    }
    const all = parts.join(" · ");
    return all.length > 400 ? all.slice(0, 399) + "…" : all;
  }

  function addEvent(e) {
    if (typeof e.seq === "number") {
      if (e.seq <= state.eventsSeq) return;
      state.eventsSeq = e.seq;
    }
    const list = $("events");
    const detail = detailText(e.detail);
    const item = h(
      "li",
      { class: "event", "data-kind": e.kind, "data-model": e.model, "data-seq": e.seq },
      h("time", { datetime: new Date(e.time * 1000).toISOString(), text: clock(e.time) }),
      h("span", { class: "ev-model", text: e.model }),
      h("span", { class: "ev-kind", text: e.kind }),
      e.reason ? h("span", { class: "ev-reason", text: e.reason }) : null,
      e.replica !== null && e.replica !== undefined ? h("span", { class: "muted", text: `#${e.replica}` }) : null,
      e.pid ? h("span", { class: "muted", text: `pid ${e.pid}` }) : null,
      detail ? h("span", { class: "ev-detail", text: detail }) : null,
    );
    list.prepend(item);
    while (list.childElementCount > EVENTS_SHOWN) list.lastElementChild.remove();
    state.lastEvent.set(e.model, e);
    const card = state.cards.get(e.model);
    if (card) updateLastEvent(card);
  }

  async function followEvents() {
    if (state.eventsRunning) return;
    state.eventsRunning = true;
    let delay = 500;
    try {
      while (state.authorized) {
        const abort = new AbortController();
        state.eventsAbort = abort;
        try {
          const query = state.eventsSeq ? `after=${state.eventsSeq}` : `limit=${EVENTS_BACKLOG}`;
          const r = await api(`/admin/events?follow=1&${query}`, { signal: abort.signal });
          if (r.status === 501) {
            $("events").replaceChildren(h("li", { class: "muted", text: "This daemon keeps no event log." }));
            return;
          }
          if (!r.ok) throw new ApiError(r.status, `${r.status}`);
          delay = 500;
          for await (const event of ndjson(r)) {
            addEvent(event);
            refreshSoon();
          }
        } catch (e) {
          if (e instanceof AuthError) {
            askForKey(e);
            return;
          }
          if (abort.signal.aborted) return;
        }
        await sleep(delay); // the stream ended (a restart of the daemon?): follow again
        delay = Math.min(delay * 2, 10000);
      }
    } finally {
      state.eventsRunning = false;
      state.eventsAbort = null;
    }
  }

  // ------------------------------------------------------------ runner output

  function closeLogs() {
    if (state.logs) {
      state.logs.abort.abort();
      state.logs = null;
    }
    const dialog = $("logs");
    if (dialog.open) dialog.close();
  }

  async function openLogs(name) {
    closeLogs();
    const dialog = $("logs");
    const lines = $("logs-lines");
    const status = $("logs-state");
    lines.replaceChildren();
    setText($("logs-title"), `Runner output: ${name}`);
    setText(status, "reading…");
    dialog.dataset.model = name;
    dialog.showModal();
    const abort = new AbortController();
    const mine = { name, abort };
    state.logs = mine;
    let count = 0;
    try {
      const r = await api(`/admin/models/${enc(name)}/logs?lines=${LOG_LINES}&follow=1`, { signal: abort.signal });
      if (!r.ok) {
        const data = await r.json().catch(() => null);
        throw new ApiError(r.status, messageOf(data, `${r.status}`));
      }
      setText(status, "following: new lines appear as the runners print them");
      for await (const line of ndjson(r)) {
        const atBottom = lines.scrollHeight - lines.scrollTop - lines.clientHeight < 40;
        const meta = `${clock(line.time)} #${line.replica}${line.pid ? " pid " + line.pid : ""}  `;
        lines.append(h("span", { class: line.error ? "err" : null }, h("span", { class: "meta", text: meta }), line.text + "\n"));
        count += 1;
        while (lines.childElementCount > LOG_LINES_SHOWN) lines.firstElementChild.remove();
        if (atBottom) lines.scrollTop = lines.scrollHeight;
      }
      if (state.logs === mine) setText(status, "the stream ended");
    } catch (e) {
      if (e instanceof AuthError) {
        askForKey(e);
        return;
      }
      if (!abort.signal.aborted) setText(status, `could not read the output: ${e.message || e}`);
      return;
    }
    if (!count && state.logs === mine) setText(status, "nothing printed yet");
  }

  // ------------------------------------------------------------ start

  function start() {
    $("auth-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const key = $("auth-key").value.trim();
      if (!key) return;
      state.key = key;
      storeKey(key);
      $("auth-key").value = "";
      state.waitingForKey = false;
      setConn("connecting", "checking the key…");
      tick();
    });
    $("forget-key").addEventListener("click", () => {
      state.key = "";
      storeKey("");
      state.authorized = false;
      if (state.eventsAbort) state.eventsAbort.abort();
      tick();
    });
    $("filter").addEventListener("input", applyFilter);
    $("loaded-only").addEventListener("change", applyFilter);
    $("logs-close").addEventListener("click", closeLogs);
    $("logs").addEventListener("close", () => {
      if (state.logs) {
        state.logs.abort.abort();
        state.logs = null;
      }
    });
    $("logs-errors").addEventListener("change", (ev) => $("logs").classList.toggle("errors-only", ev.target.checked));
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) refreshSoon();
    });
    setInterval(tickCountdowns, 500);
    tick();
  }

  start();
})();
