"""The browser SDK (app/static/hearth.js) and the demo page at /, in real headless Chromium."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest
from aiohttp.test_utils import TestServer

from app import keys
from app.demo_upstream import create_demo_app
from app.models import Message
from app.store import Store
from app.web import create_app
from tests.browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, ConsoleWatch, ensure_chromium
from tests.conftest import Hearth

playwright_api = pytest.importorskip("playwright.async_api")

#: Status feeds polled often and breakers probed soon, so an upstream outage fits in seconds.
FAST_FEEDS = {
    "HEARTH_EVENT_INTERVAL": "0.2",
    "HEARTH_EVENT_TIMEOUT": "0.5",
    "HEARTH_BREAKER_OPEN_SECONDS": "5",
    "HEARTH_BREAKER_PROBE_SECONDS": "0.5",
}


@pytest.fixture(scope="session", autouse=True)
def chromium() -> None:
    """Debian's chromium, installed with apt-get when missing (so ``make test`` gets it)."""
    ensure_chromium()


@pytest.fixture
async def browser():
    """A headless Chromium driven by playwright."""
    async with playwright_api.async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
def console() -> ConsoleWatch:
    """The console errors of every page a test opens."""
    return ConsoleWatch()


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
