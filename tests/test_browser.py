"""The browser SDK (app/static/hearth.js) and the demo page at /, in real headless Chromium."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
from aiohttp.test_utils import TestServer

from app import keys
from app.demo_upstream import create_demo_app
from app.models import Message
from app.services import _read_pid
from app.store import Store
from app.web import create_app
from tests.browser import ARTIFACTS, ConsoleWatch
from tests.conftest import Hearth, start_hearth, wait_until

playwright_api = pytest.importorskip("playwright.async_api")

#: Status feeds polled often and breakers probed soon, so an upstream outage fits in seconds.
FAST_FEEDS = {
    "HEARTH_EVENT_INTERVAL": "0.2",
    "HEARTH_EVENT_TIMEOUT": "0.5",
    "HEARTH_BREAKER_OPEN_SECONDS": "5",
    "HEARTH_BREAKER_PROBE_SECONDS": "0.5",
}


async def open_page(browser, console: ConsoleWatch, url: str, name: str, *, phone: bool = False):
    """A page in its own browser context (its own storage, like another device) at *url*."""
    viewport = {"width": 390, "height": 844} if phone else {"width": 1280, "height": 800}
    context = await browser.new_context(viewport=viewport)
    page = await context.new_page()
    console.watch(page, name)
    await page.goto(url)
    return page


async def log_in(page, user: str) -> None:
    """Log in as *user* through the form and wait until the page is connected."""
    await page.fill("#username", user)
    await page.fill("#password", Hearth.PASSWORD)
    await page.click("#login-form button[type=submit]")
    await wait_connected(page)


async def wait_connected(page, timeout: float = 20.0) -> None:
    """Wait until the connection indicator says ready."""
    await page.wait_for_selector("#connection[data-state=ready]", timeout=timeout * 1000)


async def say(page, text: str) -> None:
    """Type *text* in the composer and send it."""
    await page.fill("#message-input", text)
    await page.press("#message-input", "Enter")


async def shown(page) -> list[dict]:
    """The messages the page shows, in order: content and state of each."""
    return await page.eval_on_selector_all(
        "#messages li",
        "items => items.map(item => ({content: item.querySelector('.content').textContent,"
        " state: item.dataset.state, seq: item.dataset.seq}))",
    )


async def wait_shown(page, contents: list[str], timeout: float = 30.0) -> None:
    """Wait until the page shows every one of *contents* as sent."""
    await page.wait_for_function(
        """wanted => {
            const sent = [...document.querySelectorAll('#messages li[data-state=sent] .content')]
              .map(element => element.textContent);
            return wanted.every(text => sent.includes(text));
        }""",
        arg=contents,
        timeout=timeout * 1000,
    )


async def screenshot(page, name: str) -> None:
    """Save a full-page screenshot as a test artifact."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def stored_contents(hearth: Hearth, room: str = "lobby") -> list[str]:
    """The contents of *room* as PostgreSQL holds them, in seq order."""
    messages = await hearth.app[keys.STORE].history(room, limit=100)
    return [message.content for message in sorted(messages, key=lambda m: m.seq or 0)]


async def stop(hearth: Hearth) -> int:
    """Stop the server as a deploy would (clients get SERVER_SHUTDOWN and 1001); its port."""
    port = hearth.server.port
    await hearth.server.close()
    return port


async def start_again(hearth: Hearth, port: int) -> None:
    """Start a new instance of the stopped server, same settings, on the same *port*."""
    app = create_app(hearth.app[keys.SETTINGS])
    server = TestServer(app, port=port)
    await server.start_server()
    hearth.server, hearth.app = server, app


async def test_two_pages_chat(make_hearth, browser, console):
    """Two people in two browsers chat: each sees the other's messages, marks and presence."""
    hearth = await make_hearth()
    alice = await open_page(browser, console, hearth.url, "alice")
    bob = await open_page(browser, console, hearth.url, "bob", phone=True)
    await log_in(alice, "alice")
    await log_in(bob, "bob")
    await alice.wait_for_function(
        "() => [...document.querySelectorAll('#presence-list li')].map(li => li.textContent)"
        ".join(',') === 'alice,bob'"
    )
    await say(alice, "hi bob")
    await wait_shown(bob, ["hi bob"])
    await say(bob, "hello alice")
    await wait_shown(alice, ["hi bob", "hello alice"])
    await wait_shown(bob, ["hi bob", "hello alice"])
    for page in (alice, bob):
        assert [(m["content"], m["state"]) for m in await shown(page)] == [
            ("hi bob", "sent"),
            ("hello alice", "sent"),
        ]
    assert await alice.text_content("#room-list") == "# lobby"
    await screenshot(alice, "chat-desktop")
    await screenshot(bob, "chat-phone")
    assert console.unexpected() == []


async def test_server_restart_mid_conversation(make_hearth, browser, console):
    """After a server restart both pages reconnect and show every message once, in order."""
    hearth = await make_hearth()
    alice = await open_page(browser, console, hearth.url, "alice")
    bob = await open_page(browser, console, hearth.url, "bob")
    await log_in(alice, "alice")
    await log_in(bob, "bob")
    await say(alice, "before 1")
    await wait_shown(bob, ["before 1"])
    await say(bob, "before 2")
    await wait_shown(alice, ["before 1", "before 2"])

    port = await stop(hearth)
    for page in (alice, bob):
        await page.wait_for_selector("#connection[data-state=reconnecting]")
    await say(alice, "typed while the server is away")
    await alice.wait_for_selector("#messages li[data-state=pending]")
    await screenshot(alice, "restart-offline")
    # Stored while this server is away (as another instance would): only recovery with
    # since can bring these to the pages.
    while_down = [f"stored while the server was down {n}" for n in range(1, 4)]
    store = Store(hearth.database)
    await store.open()
    try:
        for number, text in enumerate(while_down):
            await store.insert_message(
                Message.accept(
                    room="lobby", sender="carol", content=text, client_msg_id=f"down-{number}"
                )
            )
    finally:
        await store.close()
    await start_again(hearth, port)
    carol = await hearth.connect("carol")
    outage = [*while_down, *(f"during the outage {n}" for n in range(1, 6))]
    reconnected_early = [await p.get_attribute("#connection", "data-state") for p in (alice, bob)]
    for number, text in enumerate(outage[len(while_down) :]):
        ctrl = await carol.request(
            "pub", topic="room:lobby", content=text, client_msg_id=f"carol-{number}"
        )
        assert ctrl["code"] == 200, ctrl

    everything = ["before 1", "before 2", "typed while the server is away", *outage]
    for page in (alice, bob):
        await wait_connected(page, timeout=40)
        await wait_shown(page, everything)
    await asyncio.sleep(1.0)  # late duplicates would show by now
    stored = await stored_contents(hearth)
    assert Counter(stored) == Counter(everything), stored
    for page in (alice, bob):
        messages = await shown(page)
        assert [m["content"] for m in messages] == stored, (reconnected_early, messages)
        assert {m["state"] for m in messages} == {"sent"}
        seqs = [int(m["seq"]) for m in messages]
        assert seqs == list(range(1, len(stored) + 1))
    await screenshot(alice, "restart-recovered")
    assert console.unexpected(outage=True) == []


async def test_message_typed_offline_is_delivered_once(make_hearth, browser, console):
    """A message typed while the browser is offline waits, then is delivered once."""
    hearth = await make_hearth()
    alice = await open_page(browser, console, hearth.url, "alice")
    bob = await open_page(browser, console, hearth.url, "bob")
    await log_in(alice, "alice")
    await log_in(bob, "bob")
    await alice.context.set_offline(True)
    await alice.wait_for_selector("#connection[data-state=reconnecting]")
    await say(alice, "sent from a tunnel")
    await alice.wait_for_selector("#messages li[data-state=pending]")
    assert "waiting for connection" in await alice.text_content("#messages li .mark")
    await asyncio.sleep(0.5)
    assert await stored_contents(hearth) == []
    await screenshot(alice, "offline-pending")
    await alice.context.set_offline(False)
    await wait_connected(alice)
    await wait_shown(alice, ["sent from a tunnel"])
    await wait_shown(bob, ["sent from a tunnel"])
    await asyncio.sleep(1.0)
    assert await stored_contents(hearth) == ["sent from a tunnel"]
    for page in (alice, bob):
        assert [m["content"] for m in await shown(page)] == ["sent from a tunnel"]
    assert console.unexpected(outage=True) == []


async def test_offline_message_survives_reload(make_hearth, browser, console):
    """A message typed offline is kept across a page reload, then delivered once."""
    hearth = await make_hearth()
    alice = await open_page(browser, console, hearth.url, "alice")
    await log_in(alice, "alice")
    blocked = {"on": True}

    async def gate(route) -> None:
        # While blocked, the page's WebSocket is refused; then it passes to the server.
        if blocked["on"]:
            await route.close(code=1011, reason="test: no network")
        else:
            route.connect_to_server()

    await alice.route_web_socket("**/ws", gate)
    await alice.context.set_offline(True)
    await alice.wait_for_selector("#connection[data-state=reconnecting]")
    await say(alice, "typed before the reload")
    await alice.wait_for_selector("#messages li[data-state=pending]")
    await alice.context.set_offline(False)
    await alice.reload()
    await alice.wait_for_selector("#messages li[data-state=pending]")
    assert [m["content"] for m in await shown(alice)] == ["typed before the reload"]
    await screenshot(alice, "reload-pending")
    await asyncio.sleep(1.0)
    assert await stored_contents(hearth) == []
    blocked["on"] = False
    await wait_connected(alice, timeout=40)
    await wait_shown(alice, ["typed before the reload"])
    await asyncio.sleep(1.0)
    assert await stored_contents(hearth) == ["typed before the reload"]
    assert [m["content"] for m in await shown(alice)] == ["typed before the reload"]
    outbox = await alice.evaluate("() => localStorage.getItem('hearth.outbox.v1.alice')")
    assert outbox is None
    assert console.unexpected(outage=True) == []


async def test_status_panel_shows_stale_while_upstream_is_down(
    make_hearth, browser, console, aiohttp_server
):
    """The status panel marks a feed stale while its upstream fails, and fresh once it is back."""
    upstream_server = await aiohttp_server(create_demo_app(seed=7))
    upstream = str(upstream_server.make_url("")).rstrip("/")
    sources = [{"name": "agent_status", "kind": "jsonrpc", "url": f"{upstream}/rpc"}]
    hearth = await make_hearth(HEARTH_EVENT_SOURCES=json.dumps(sources), **FAST_FEEDS)
    alice = await open_page(browser, console, hearth.url, "alice")
    await log_in(alice, "alice")
    feed = "[data-feed=agent_status]"
    await alice.wait_for_selector(f"{feed}[data-stale=false]")
    await alice.wait_for_selector("[data-feed=system_status][data-stale=false]")
    assert await alice.is_hidden(f"{feed} .badge.stale")
    assert "agents" in await alice.text_content(f"{feed} .feed-value")

    async def control(mode: str) -> None:
        async with hearth.session.post(f"{upstream}/control", json={"mode": mode}) as response:
            assert response.status == 200

    await control("fail")
    await alice.wait_for_selector(f"{feed}[data-stale=true]", timeout=15000)
    assert await alice.is_visible(f"{feed} .badge.stale")
    assert "agents" in await alice.text_content(f"{feed} .feed-value")  # the cached value
    await screenshot(alice, "status-stale")
    await control("ok")
    await alice.wait_for_selector(f"{feed}[data-stale=false]", timeout=15000)
    assert await alice.is_hidden(f"{feed} .badge.stale")
    assert await alice.text_content(f"{feed} .feed-meta") != ""
    await screenshot(alice, "status-recovered")
    assert console.unexpected() == []


#: Runs the SDK's exported backoff in the page and reports what the tests check.
BACKOFF_PROBE = """async () => {
  const sdk = await import('/static/hearth.js');
  const ceilings = Array.from({length: 14}, (_, i) => sdk.backoffCeiling(i + 1));
  const samples = [];
  for (let attempt = 1; attempt <= 14; attempt++) {
    for (let i = 0; i < 200; i++) samples.push([attempt, sdk.backoffDelay(attempt)]);
  }
  return {
    ceilings,
    samples,
    lowest: sdk.backoffDelay(3, {random: () => 0}),
    highest: sdk.backoffDelay(3, {random: () => 0.999999}),
    floored: sdk.backoffDelay(1, {random: () => 0.5, floorMs: 2750}),
    notFloored: sdk.backoffDelay(8, {random: () => 0.5, floorMs: 2750}),
    custom: sdk.backoffCeiling(4, {initialMs: 100, factor: 2, maxMs: 500}),
    defaults: sdk.BACKOFF,
  };
}"""


async def test_backoff_math(make_hearth, browser, console):
    """Reconnect delays: full jitter under 1 s x 1.5^(n-1), capped at 30 s, floored by hints."""
    hearth = await make_hearth()
    page = await open_page(browser, console, hearth.url, "probe")
    result = await page.evaluate(BACKOFF_PROBE)
    assert result["defaults"] == {"initialMs": 1000, "factor": 1.5, "maxMs": 30000}
    expected = [min(30000.0, 1000 * 1.5 ** (n - 1)) for n in range(1, 15)]
    assert result["ceilings"] == pytest.approx(expected)
    assert result["ceilings"][:4] == [1000, 1500, 2250, 3375]
    assert result["ceilings"][-5:] == [30000] * 5
    for attempt, delay in result["samples"]:
        assert 0 <= delay < expected[attempt - 1]
        assert delay == int(delay)
    # Full jitter spreads over the whole range, not around the ceiling.
    late = [delay for attempt, delay in result["samples"] if attempt == 14]
    assert min(late) < 10000 and max(late) > 20000
    assert result["lowest"] == 0
    assert 2249 <= result["highest"] < 2250
    assert result["floored"] == 2750  # a server hint (reconnect_after_ms) wins over jitter
    assert result["notFloored"] == int(0.5 * 1000 * 1.5**7)
    assert result["custom"] == 500
    assert console.unexpected() == []


@dataclass
class SocketWatch:
    """The WebSockets one page opens: when each opened and closed, and what it received."""

    #: ``time.monotonic()`` at which each socket was created, in order.
    opened: list[float] = field(default_factory=list)
    #: Socket index -> when it closed.
    closed: dict[int, float] = field(default_factory=dict)
    #: ``(socket index, time, frame)`` of every JSON frame the page received.
    frames: list[tuple[int, float, dict]] = field(default_factory=list)

    @classmethod
    def on(cls, page) -> SocketWatch:
        """Start watching *page*; only sockets created from now on are seen."""
        watch = cls()
        page.on("websocket", watch._opened)
        return watch

    def _opened(self, socket) -> None:
        index = len(self.opened)
        self.opened.append(time.monotonic())
        socket.on("framereceived", lambda payload: self._received(index, payload))
        socket.on("close", lambda _: self.closed.setdefault(index, time.monotonic()))

    def _received(self, index: int, payload: str | bytes) -> None:
        with contextlib.suppress(ValueError):
            self.frames.append((index, time.monotonic(), json.loads(payload)))

    def events(self, kind: str) -> list[tuple[int, float, dict]]:
        """``(socket index, time, data)`` of each event of type *kind* received."""
        return [
            (index, at, frame["event"].get("data", {}))
            for index, at, frame in self.frames
            if frame.get("event", {}).get("type") == kind
        ]

    def ctrls(self) -> list[tuple[int, float, dict]]:
        """``(socket index, time, ctrl)`` of each reply received."""
        return [(index, at, frame["ctrl"]) for index, at, frame in self.frames if "ctrl" in frame]


async def page_logged_in_as(browser, console: ConsoleWatch, url: str, user: str, token: str):
    """A page at *url* whose tab already holds *user*'s login (as after a reload), and its sockets.

    The session is put in sessionStorage before the page's scripts run, so no login over
    HTTP is needed: this works while PostgreSQL is away.
    """
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    session = {"token": token, "username": user, "expires_at": "2999-01-01T00:00:00.000Z"}
    await context.add_init_script(
        f"sessionStorage.setItem('hearth.session.v1', {json.dumps(json.dumps(session))});"
    )
    page = await context.new_page()
    console.watch(page, user)
    sockets = SocketWatch.on(page)
    await page.goto(url)
    return page, sockets


async def test_degraded_banner_and_queued_mark_while_postgres_is_down(
    make_hearth, own_postgres, browser, console
):
    """With PostgreSQL stopped the page shows the degraded banner and marks a message queued (202); once it is back the banner goes and the message is sent with its seq, once."""
    hearth = await make_hearth(own_postgres.create_database("browser_degraded"))
    alice = await open_page(browser, console, hearth.url, "alice")
    sockets = SocketWatch.on(alice)
    bob = await open_page(browser, console, hearth.url, "bob")
    await log_in(alice, "alice")
    await log_in(bob, "bob")
    await say(alice, "before the outage")
    await wait_shown(bob, ["before the outage"])
    assert await alice.is_hidden("#degraded-banner")

    await asyncio.to_thread(own_postgres.stop, "fast")
    try:
        await alice.wait_for_selector("#degraded-banner", state="visible", timeout=10000)
        banner = await alice.text_content("#degraded-banner")
        assert banner.startswith("Server degraded: database "), banner
        await say(alice, "typed while the database is away")
        queued = "#messages li[data-state=queued]"
        await alice.wait_for_selector(queued)
        assert await alice.text_content(f"{queued} .content") == "typed while the database is away"
        assert await alice.text_content(f"{queued} .mark") == "queued on the server"
        assert await alice.get_attribute(queued, "data-seq") == ""
        accepted = [ctrl for _, _, ctrl in sockets.ctrls() if ctrl["code"] == 202]
        assert len(accepted) == 1, sockets.ctrls()
        assert await alice.get_attribute(queued, "data-id") == accepted[0]["params"]["id"]
        await screenshot(alice, "degraded-queued")
    finally:
        await asyncio.to_thread(own_postgres.start)

    await alice.wait_for_selector("#degraded-banner", state="hidden", timeout=20000)
    everything = ["before the outage", "typed while the database is away"]
    for page in (alice, bob):
        await wait_shown(page, everything)
    await asyncio.sleep(1.0)  # late duplicates would show by now
    assert await stored_contents(hearth) == everything
    for page in (alice, bob):
        messages = await shown(page)
        assert [(m["content"], m["state"], m["seq"]) for m in messages] == [
            ("before the outage", "sent", "1"),
            ("typed while the database is away", "sent", "2"),
        ]
    assert await alice.text_content("#messages li:last-child .mark") == "✓"
    await screenshot(alice, "degraded-recovered")
    assert console.unexpected() == []


async def test_revoked_token_shows_the_login_form_and_stops_reconnecting(
    make_hearth, browser, console
):
    """After its token is revoked and the connection dropped, the page shows the login form and opens no more sockets until the user logs in again."""
    hearth = await make_hearth()
    alice = await open_page(browser, console, hearth.url, "alice")
    sockets = SocketWatch.on(alice)
    await log_in(alice, "alice")
    token = await alice.evaluate(
        "() => JSON.parse(sessionStorage.getItem('hearth.session.v1')).token"
    )
    async with hearth.session.post(
        f"{hearth.url}api/v1/auth/logout", headers={"Authorization": f"Bearer {token}"}
    ) as response:
        assert response.status == 200
    port = await stop(hearth)
    await alice.wait_for_selector("#connection[data-state=reconnecting]")
    await start_again(hearth, port)

    await alice.wait_for_selector("#login-view", state="visible", timeout=20000)
    assert await alice.is_hidden("#chat-view")
    assert await alice.text_content("#login-error") == "Your session ended; please log in again."
    assert await alice.get_attribute("#connection", "data-state") == "closed"
    refused = [ctrl for _, _, ctrl in sockets.ctrls() if ctrl["code"] == 401]
    assert [ctrl["params"]["error"] for ctrl in refused] == ["AUTH_FAILED"]
    after_refusal = len(sockets.opened)
    await asyncio.sleep(4.0)  # a retry loop would have opened sockets by now (1 s backoff)
    assert len(sockets.opened) == after_refusal, sockets.opened
    assert await alice.evaluate("() => sessionStorage.getItem('hearth.session.v1')") is None
    await screenshot(alice, "auth-lost-login")

    await log_in(alice, "alice")  # a new login connects again
    assert len(sockets.opened) == after_refusal + 1
    assert console.unexpected(outage=True) == []


async def test_reconnect_waits_for_the_shutdown_hint(make_hearth, browser, console):
    """On a graceful server shutdown the page reconnects no sooner than SERVER_SHUTDOWN's reconnect_after_ms (at least 1 s for a 1001), and not much later."""
    hearth = await make_hearth()
    alice = await open_page(browser, console, hearth.url, "alice")
    sockets = SocketWatch.on(alice)
    await log_in(alice, "alice")
    waits = []
    # reconnect_after_ms is drawn from 0.5-5 s: restart until one hint exceeds the 1 s floor
    # a 1001 close sets anyway, so the hint itself is what the page waits for.
    for _ in range(4):
        before = len(sockets.opened)
        await start_again(hearth, await stop(hearth))
        await wait_connected(alice, timeout=20)
        farewells = [
            (index, at, data)
            for index, at, data in sockets.events("error")
            if index == before - 1 and data["code"] == "SERVER_SHUTDOWN"
        ]
        assert len(farewells) == 1, sockets.frames
        _, told_at, data = farewells[0]
        hint = data["reconnect_after_ms"]
        floor = max(hint, 1000) / 1000
        waited = sockets.opened[before] - told_at
        after_close = sockets.opened[before] - sockets.closed[before - 1]
        waits.append((hint, round(waited, 3), round(after_close, 3)))
        assert waited >= floor - 0.1, waits
        assert after_close <= floor + 1.5, waits
        if hint > 1500:
            break
    assert waits[-1][0] > 1500, waits
    assert console.unexpected(outage=True) == []


async def test_reconnect_waits_for_retry_after_of_a_refused_auth(
    make_hearth, own_postgres, browser, console
):
    """While PostgreSQL is down an unchecked token's auth gets 503 with retry_after, and the page waits that long between attempts, counting down, then connects once it is back."""
    hearth = await make_hearth(own_postgres.create_database("browser_retry_after"))
    await asyncio.to_thread(own_postgres.stop, "fast")
    try:
        # bob's token was never checked by this server, so it cannot be vouched for now.
        bob, sockets = await page_logged_in_as(
            browser, console, hearth.url, "bob", hearth.tokens["bob"]
        )
        await bob.wait_for_function(
            "() => document.getElementById('connection-text').textContent === 'reconnecting in 2 s'"
        )
        await screenshot(bob, "retry-after-countdown")
        await wait_until(lambda: len(sockets.opened) >= 3, 15, "three attempts")
        refusals = [ctrl for _, _, ctrl in sockets.ctrls() if ctrl["code"] == 503]
        assert len(refusals) >= 2, sockets.frames
        retry_after = refusals[0]["params"]["retry_after"]
        assert refusals[0]["params"]["error"] == "DATABASE_ERROR"
        assert retry_after == 2
        gaps = [later - earlier for earlier, later in itertools.pairwise(sockets.opened[:3])]
        # Unhinted, the first two waits would be under 1 s and 1.5 s.
        assert all(retry_after - 0.1 <= gap <= retry_after + 1.0 for gap in gaps), gaps
        assert await bob.get_attribute("#connection", "data-state") == "reconnecting"
    finally:
        await asyncio.to_thread(own_postgres.start)
    await wait_connected(bob, timeout=20)
    await say(bob, "in at last")
    await wait_shown(bob, ["in at last"])
    # The room list could not load while PostgreSQL was away; connecting loads it.
    await bob.wait_for_function(
        "() => document.getElementById('room-list').textContent === '# lobby# secret (private)'"
    )
    assert console.unexpected(outage=True) == []


def bridge_state(hearth: Hearth) -> str:
    """The Redis bridge state of *hearth*: connected, degraded, …."""
    return hearth.app[keys.SUPERVISOR].get("redis_bridge").status()["bridge_state"]


async def test_resync_after_a_redis_outage_recovers_what_the_page_missed(
    database, own_redis, tmp_path, browser, console
):
    """Messages published on another instance while Redis is down reach the page after Redis is back, through resync and sub since: every message once, in order."""
    instances = []
    try:
        for name in ("a", "b"):
            instances.append(
                await start_hearth(
                    database, tmp_path / name / "spool", HEARTH_REDIS_URL=own_redis.url
                )
            )
        a, b = instances
        await wait_until(lambda: bridge_state(a) == bridge_state(b) == "connected", 10)
        alice = await open_page(browser, console, a.url, "alice")
        sockets = SocketWatch.on(alice)
        await log_in(alice, "alice")
        carol = await b.connect("carol")

        async def publish(text: str) -> None:
            ctrl = await carol.request(
                "pub", topic="room:lobby", content=text, client_msg_id=text.replace(" ", "-")
            )
            assert ctrl["code"] == 200, ctrl

        await publish("before the outage")
        await wait_shown(alice, ["before the outage"])

        os.kill(_read_pid(own_redis.pid_file), signal.SIGKILL)
        await wait_until(lambda: bridge_state(a) == bridge_state(b) == "degraded", 10)
        await alice.wait_for_selector("#degraded-banner", state="visible", timeout=10000)
        assert "redis" in await alice.text_content("#degraded-banner")
        missed = [f"while Redis was down {n}" for n in range(1, 6)]
        for text in missed:
            await publish(text)
        await asyncio.sleep(1.0)
        assert [m["content"] for m in await shown(alice)] == ["before the outage"]
        await screenshot(alice, "resync-redis-down")

        await asyncio.to_thread(own_redis.start)
        everything = ["before the outage", *missed]
        await wait_shown(alice, everything, timeout=30)
        await alice.wait_for_selector("#degraded-banner", state="hidden", timeout=10000)
        await asyncio.sleep(1.0)  # late duplicates would show by now
        assert [data["topics"] for _, _, data in sockets.events("resync")] == [["room:lobby"]]
        assert len(sockets.opened) == 1, "recovered on the same connection, not by reconnecting"
        messages = await shown(alice)
        assert [m["content"] for m in messages] == everything
        assert [m["seq"] for m in messages] == [str(n) for n in range(1, 7)]
        assert {m["state"] for m in messages} == {"sent"}
        await screenshot(alice, "resync-recovered")
        assert console.unexpected() == []
    finally:
        for hearth in instances:
            await hearth.close()
