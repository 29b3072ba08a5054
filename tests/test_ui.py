"""The status page at /ui: served by the daemon, and working in a real browser.

The plain HTTP tests check what the daemon answers (content types, the
Content-Security-Policy, caching, `/` unchanged) and that every admin call
the page makes honours the keys.  The browser tests drive Debian's
`chromium` headless through `chromedriver` (Selenium) against an
in-process supervisor with fake runners: the page renders the models,
shows a load and an unload made through the API within 2 s, its restart
button brings up a runner with a new pid, it asks for the admin key when
one is needed, and 50 models fit a 375 px wide phone screen.  Screenshots
are saved in the test's temporary directory (the path is printed).

scripts/setup installs chromium and chromium-driver; when they are missing
here the tests try the same (as root or with sudo) and skip, saying why,
only when that is impossible.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import aiohttp
import pytest

from hoshikage_sup.api import ui
from hoshikage_sup.auth import OPEN_PATHS
from hoshikage_sup.devices import CpuSource, SimulatedSource

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SHOWN_WITHIN = 2.0  # seconds for a load or an unload to show on the page
DEADLINE = 20.0
GiB = 2**30

ADMIN_KEY = "adm-key"
API_KEY = "api-key"


async def request(http, method: str, url: str, **kw: Any) -> tuple[int, Any, Any]:
    async with http.request(method, url, **kw) as r:
        body = await r.read()
        return r.status, r.headers, body


# ------------------------------------------------------------------ served by the daemon


async def test_page_and_assets_are_served_with_csp_and_caching(make_server, http):
    h = await make_server({"a": {}})
    status, headers, body = await request(http, "GET", h.url + "/ui")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    csp = headers["Content-Security-Policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'", "connect-src 'self'",
                      "frame-ancestors 'none'"):
        assert directive in csp, csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["Cache-Control"] == "no-cache"
    html = body.decode()
    assert "<title>Hoshikage</title>" in html
    # No inline script (the CSP would refuse it) and no inline style attribute.
    assert not re.search(r"<script(?![^>]*\bsrc=)", html) and " style=" not in html
    assert not re.search(r"\bon[a-z]+=", html)

    etag = headers["ETag"]
    status, headers, body = await request(http, "GET", h.url + "/ui", headers={"If-None-Match": etag})
    assert status == 304 and body == b"" and headers["ETag"] == etag

    types = {"/ui/": "text/html; charset=utf-8", "/ui/ui.js": "text/javascript; charset=utf-8",
             "/ui/ui.css": "text/css; charset=utf-8", "/ui/icon.svg": "image/svg+xml"}
    for path, content_type in types.items():
        status, headers, body = await request(http, "GET", h.url + path)
        assert status == 200 and headers["Content-Type"] == content_type, path
        assert headers["Content-Security-Policy"] == csp and headers["ETag"] and body
        # Everything comes from the daemon: no URL of anywhere else.
        assert not re.search(rb"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", body.replace(b"http://www.w3.org/2000/svg", b"")), path
    status, _, body = await request(http, "GET", h.url + "/ui/nope.js")
    assert status == 404

    # GET / still answers as Ollama does.
    status, _, body = await request(http, "GET", h.url + "/")
    assert status == 200 and body.decode() == "Ollama is running"


async def test_the_page_is_open_and_its_admin_calls_take_the_admin_key(make_server, http):
    h = await make_server({"a": {}, "b": {}}, server={"admin_keys": [ADMIN_KEY], "api_keys": [API_KEY]})
    assert set(ui.FILES) <= OPEN_PATHS
    for path in ui.FILES:  # the page itself holds no data: open
        status, _, _ = await request(http, "GET", h.url + path)
        assert status == 200, path
    status, _, body = await request(http, "GET", h.url + "/")
    assert status == 200 and body.decode() == "Ollama is running"

    # The calls the page makes (ui.js has no others), in the order of its flow.
    script = (Path(ui.__file__).parent.parent / "ui" / "ui.js").read_text()
    assert set(re.findall(r"[`\"](/admin/[^`\"?$]*)", script)) == {
        "/admin/status", "/admin/models", "/admin/events", "/admin/models/"}  # + name/(load|unload|restart|logs)
    calls = [
        ("GET", "/admin/status"),
        ("GET", "/admin/models"),
        ("POST", "/admin/models/a/load"),
        ("POST", "/admin/models/a/restart"),
        ("GET", "/admin/models/a/logs?lines=500"),
        ("GET", "/admin/events?limit=100"),
        ("POST", "/admin/models/a/unload"),
    ]
    for method, path in calls:
        before = (dict(h.scheduler.counters), set(h.scheduler.slots))
        for headers in ({}, {"Authorization": f"Bearer {API_KEY}"}, {"Authorization": "Bearer wrong"}):
            status, answer, _ = await request(http, method, h.url + path, headers=headers)
            assert status == 401 and "Bearer" in answer["WWW-Authenticate"], (method, path, headers)
        assert (dict(h.scheduler.counters), set(h.scheduler.slots)) == before  # a refused call did nothing
        status, _, body = await request(http, method, h.url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert status == 200, (method, path, body)
    # The event stream the page follows needs the key too.
    status, _, _ = await request(http, "GET", h.url + "/admin/events?follow=1&limit=0")
    assert status == 401


# ------------------------------------------------------------------ in a browser


def _install_browser() -> str | None:
    """Install chromium and chromium-driver as scripts/setup does; None when done, else why not."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return None
    if shutil.which("apt-get") is None:
        return "no apt-get here to install chromium and chromium-driver"
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None or subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode != 0:
            return "chromium and chromium-driver are missing and this user cannot install them (not root, no sudo)"
        prefix = ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium", "chromium-driver", "fonts-liberation"]
    for cmd in (["apt-get", "update", "-q"], install):
        done = subprocess.run(prefix + cmd, capture_output=True, text=True, env=env, timeout=900)
        if done.returncode != 0:
            return f"{' '.join(cmd)} failed: {(done.stderr or done.stdout).strip()[-300:]}"
    return None if CHROMIUM.exists() and CHROMEDRIVER.exists() else "installed, yet /usr/bin/chromium is missing"


@pytest.fixture(scope="module")
def driver():
    """One headless Chromium for the module's browser tests."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (scripts/setup installs the test extra)")
    why = _install_browser()
    if why is not None:
        pytest.skip(why)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    d.set_page_load_timeout(DEADLINE)
    try:
        yield d
    finally:
        d.quit()


@pytest.fixture
def browser(driver):
    """The module's browser on a blank page with its console log read empty;
    back on a blank page after the test (before its supervisor stops)."""
    driver.get("about:blank")
    driver.get_log("browser")
    yield driver
    driver.get("about:blank")


async def in_browser(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Run a (blocking) WebDriver call off the event loop, which serves the page meanwhile."""
    return await asyncio.to_thread(fn, *args, **kw)


def wait_for(d, script: str, *args: Any, timeout: float = DEADLINE, what: str = "") -> Any:
    """Poll a JavaScript expression (`return ...`) until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = d.execute_script(script, *args)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or script}")
        time.sleep(0.05)


def page_errors(d) -> list[str]:
    """What the page logged as errors (CSP violations and script errors included), less 401 answers."""
    return [e["message"] for e in d.get_log("browser")
            if e["level"] == "SEVERE" and "status of 401" not in e["message"]]


CARD_STATE = "const c = document.querySelector(`.model[data-model='${arguments[0]}']`); return c && c.dataset.state"
PIDS_OF = ("const c = document.querySelector(`.model[data-model='${arguments[0]}']`);"
           "const pids = c ? [...c.querySelectorAll('.pid')].map(e => Number(e.textContent)) : [];")
PIDS = PIDS_OF + "return pids"


def shows_state(d, name: str, states: tuple[str, ...], timeout: float, what: str) -> float:
    """Wait until model `name`'s card shows one of `states`; the seconds it took."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        if d.execute_script(CARD_STATE, name) in states:
            return time.monotonic() - t0
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: the page still shows {d.execute_script(CARD_STATE, name)!r} after {timeout} s")
        time.sleep(0.02)


async def test_page_follows_loads_unloads_and_restarts(make_server, http, browser, tmp_path):
    h = await make_server(
        {"a": {"aliases": ["team/a"], "keep_alive": "10m"}, "b": {"parallel": 2}},
        devices=CpuSource(),  # real RSS, so "measured" has numbers
        model_env={"b": {"FAKE_LOAD_DELAY": "0.3", "FAKE_LOAD_PROGRESS": "0.1"}},  # prints while loading
    )
    d = browser
    t_start = time.monotonic()
    await in_browser(d.get, h.url + "/ui")
    await in_browser(wait_for, d, "return document.querySelectorAll('.model[data-model]').length === 2", what="both models")
    names = await in_browser(d.execute_script, "return [...document.querySelectorAll('.model .mname')].map(e => e.textContent)")
    assert names == ["a", "b"]
    assert await in_browser(d.execute_script, CARD_STATE, "a") == "unloaded"
    assert await in_browser(d.execute_script, "return document.getElementById('auth').hidden")  # no key asked for
    # The devices panel shows the machine's RAM.
    assert "System RAM" in await in_browser(d.execute_script, "return document.querySelector('[data-device=cpu]').textContent")

    # A load made through the API shows within 2 s, with its pid.
    async with http.post(h.url + "/admin/models/a/load") as r:
        assert r.status == 200
    took = await in_browser(shows_state, d, "a", ("idle", "busy"), SHOWN_WITHIN, "the load of a")
    print(f"load shown after {took:.2f} s")
    assert await in_browser(d.execute_script, PIDS, "a") == [h.spawner.of("a")[0].pid]  # shown with the state
    text = await in_browser(d.execute_script, "return document.querySelector(`.model[data-model='a']`).textContent")
    assert "unloads in" in text and "aliases: team/a" in text and "estimate" in text and "measured" in text

    async with http.post(h.url + "/admin/models/b/load") as r:
        assert r.status == 200
    await in_browser(shows_state, d, "b", ("idle", "busy"), SHOWN_WITHIN, "the load of b")
    await in_browser(wait_for, d, "return document.querySelector('.event[data-model=b][data-kind=ready]')",
                     what="b's ready event in the list")
    await in_browser(d.save_screenshot, str(tmp_path / "ui.png"))
    print(f"screenshot: {tmp_path / 'ui.png'}")

    # An unload made through the API shows within 2 s.
    async with http.post(h.url + "/admin/models/a/unload") as r:
        assert r.status == 200
    took = await in_browser(shows_state, d, "a", ("unloaded",), SHOWN_WITHIN, "the unload of a")
    print(f"unload shown after {took:.2f} s")
    assert await in_browser(d.execute_script, PIDS, "a") == []

    # The restart button: a runner with a new pid comes up and the page shows it.
    old = {p.pid for p in h.spawner.of("b")}
    assert set(await in_browser(d.execute_script, PIDS, "b")) == old
    button = await in_browser(d.find_element, "css selector", "[data-model='b'] button[data-action='restart']")
    assert await in_browser(button.is_displayed)
    await in_browser(button.click)
    new_pids = await in_browser(
        wait_for, d, PIDS_OF + "return pids.filter(p => !arguments[1].includes(p))", "b", sorted(old), what="a new pid for b")
    live = {p.pid for p in h.spawner.of("b") if p.returncode is None}
    assert set(new_pids) <= live and not set(new_pids) & old
    assert h.scheduler.model_status("b").generation == 1

    # The load button loads.
    button = await in_browser(d.find_element, "css selector", "[data-model='a'] button[data-action='load']")
    await in_browser(button.click)
    await in_browser(shows_state, d, "a", ("idle", "busy"), DEADLINE, "the load of a from its button")
    assert h.scheduler.model_status("a") is not None

    # A runner's output, on click.
    button = await in_browser(d.find_element, "css selector", "[data-model='b'] button[data-action='logs']")
    await in_browser(button.click)
    await in_browser(wait_for, d, "return document.getElementById('logs').open && "
                     "document.getElementById('logs-lines').textContent.includes('loading tensors')",
                     what="b's runner output in the log panel")
    await in_browser(d.save_screenshot, str(tmp_path / "ui-logs.png"))
    close = await in_browser(d.find_element, "id", "logs-close")
    await in_browser(close.click)
    assert not await in_browser(d.execute_script, "return document.getElementById('logs').open")

    assert await in_browser(page_errors, d) == []
    print(f"browser test took {time.monotonic() - t_start:.1f} s; screenshots in {tmp_path}")


async def test_page_asks_for_the_admin_key(make_server, browser, tmp_path):
    h = await make_server({"a": {}}, server={"admin_keys": [ADMIN_KEY], "api_keys": [API_KEY]})
    d = browser
    await in_browser(d.get, h.url + "/ui")
    await in_browser(d.execute_script, "sessionStorage.clear()")
    await in_browser(d.refresh)
    await in_browser(wait_for, d, "return !document.getElementById('auth').hidden", what="the key prompt")
    assert await in_browser(d.execute_script, "return document.getElementById('main').hidden")
    assert await in_browser(d.execute_script, "return document.querySelectorAll('button[data-action]').length") == 0
    await in_browser(d.save_screenshot, str(tmp_path / "ui-key.png"))

    async def enter(key: str) -> None:
        field = await in_browser(d.find_element, "id", "auth-key")
        await in_browser(field.send_keys, key)
        submit = await in_browser(d.find_element, "id", "auth-submit")
        await in_browser(submit.click)

    await enter(API_KEY)  # an API key does not open /admin/ when admin keys are set
    await in_browser(wait_for, d, "return document.getElementById('auth-message').textContent.includes('refused')",
                     what="the refusal")
    await enter(ADMIN_KEY)
    await in_browser(wait_for, d, "return document.querySelector(`.model[data-model='a'] button[data-action='load']`)"
                     "?.offsetParent !== null", what="the model with its load button")
    assert await in_browser(d.execute_script, "return sessionStorage.getItem('hoshikage.adminKey')") == ADMIN_KEY
    button = await in_browser(d.find_element, "css selector", "[data-model='a'] button[data-action='load']")
    await in_browser(button.click)
    await in_browser(shows_state, d, "a", ("idle", "busy"), DEADLINE, "the load with the key")
    assert await in_browser(page_errors, d) == []
    await in_browser(d.execute_script, "sessionStorage.clear()")


async def test_fifty_models_fit_a_phone(make_server, http, browser, tmp_path):
    models = {f"model-{i:02d}-{'long-name-' * (i % 3)}q4": {} for i in range(50)}
    h = await make_server(models, devices=SimulatedSource([(24 * GiB, 22 * GiB)], names=["Simulated 24 GiB GPU"],
                                                          system_total=64 * GiB, system_available=40 * GiB))
    first, second = list(models)[:2]
    for name in (first, second):
        async with http.post(f"{h.url}/admin/models/{name}/load") as r:
            assert r.status == 200
    d = browser
    metrics = {"width": 375, "height": 812, "deviceScaleFactor": 1, "mobile": True}
    await in_browser(d.execute_cdp_cmd, "Emulation.setDeviceMetricsOverride", metrics)
    try:
        await in_browser(d.get, h.url + "/ui")
        await in_browser(wait_for, d, "return document.querySelectorAll('.model[data-model]').length === 50", what="50 models")
        await in_browser(shows_state, d, first, ("idle", "busy"), DEADLINE, "the loaded model")
        await in_browser(wait_for, d, "return document.querySelectorAll('[data-device]').length >= 2", what="devices")
        width = await in_browser(d.execute_script, "return window.innerWidth")
        assert width == 375
        overflow = await in_browser(d.execute_script, """
            const w = document.documentElement.clientWidth;
            const wide = [...document.querySelectorAll('body *')].filter(e => {
                const r = e.getBoundingClientRect();
                return r.width > 0 && (r.right > w + 0.5 || r.left < -0.5);
            }).map(e => e.tagName + '.' + e.className);
            return {scroll: document.documentElement.scrollWidth, body: document.body.scrollWidth, w, wide};
        """)
        assert overflow["scroll"] <= 375 and overflow["body"] <= 375 and not overflow["wide"], overflow
        await in_browser(d.save_screenshot, str(tmp_path / "ui-phone.png"))
        print(f"screenshot: {tmp_path / 'ui-phone.png'}")

        # The filter narrows 50 cards down.
        field = await in_browser(d.find_element, "id", "filter")
        await in_browser(field.send_keys, "model-07")
        shown = await in_browser(d.execute_script,
                                 "return [...document.querySelectorAll('.model[data-model]')].filter(e => !e.hidden).length")
        assert shown == 1
        assert await in_browser(page_errors, d) == []
    finally:
        await in_browser(d.execute_cdp_cmd, "Emulation.clearDeviceMetricsOverride", {})
