"""The transport fallback in real headless Chromium behind a real HAProxy that refuses WebSocket."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import pytest

from app.services import HAPROXY_TEMPLATE, render_haproxy_config
from tests.browser import ConsoleWatch
from tests.test_browser import (
    log_in,
    open_page,
    say,
    shown,
    start_again,
    stop,
    stored_contents,
    wait_connected,
    wait_shown,
)

playwright_api = pytest.importorskip("playwright.async_api")

#: Screenshots of these tests (``test-artifacts/`` is gitignored).
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "fallback"
#: What Chromium logs when a proxy cuts an open event stream or refuses its reconnect:
#: expected while a test cuts the proxy on purpose, never written by hearth's code.
STREAM_CUT = re.compile(r"net::ERR_(INCOMPLETE_CHUNKED_ENCODING|EMPTY_RESPONSE|CONNECTION_RESET)")
#: And what it logs when the server refuses an EventSource's resume (401).
RESUME_REFUSED = re.compile(rf"{STREAM_CUT.pattern}|status of 401 \(Unauthorized\)")


async def screenshot(page, name: str) -> None:
    """Save a full-page screenshot under ``test-artifacts/fallback/``."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def indicator(page) -> tuple[str | None, str | None]:
    """The connection indicator of *page*: its transport (``client.transport``) and text."""
    return (
        await page.get_attribute("#connection", "data-transport"),
        await page.text_content("#connection-text"),
    )


def refused_upgrades(console: ConsoleWatch, name: str) -> list[str]:
    """The WebSocket handshakes page *name* saw refused with 403."""
    return [
        text
        for page, text in console.errors
        if page == name and "/ws' failed" in text and "403" in text
    ]


async def chat(pages: dict[str, object], lines: list[tuple[str, str]]) -> list[str]:
    """Each ``(page name, text)`` of *lines* said in turn, each one shown as sent on every
    page before the next is said; returns the texts in order."""
    said: list[str] = []
    for name, text in lines:
        await say(pages[name], text)
        said.append(text)
        for page in pages.values():
            await wait_shown(page, said)
    return said


async def assert_each_once_in_order(hearth, pages, expected: list[str]) -> None:
    """Every page shows exactly *expected*, once each, in seq order 1..n, all sent, as stored."""
    await asyncio.sleep(1.0)  # late duplicates would show by now
    assert await stored_contents(hearth) == expected
    for page in pages:
        messages = await shown(page)
        assert [m["content"] for m in messages] == expected, messages
        assert [m["seq"] for m in messages] == [str(n) for n in range(1, len(expected) + 1)]
        assert {m["state"] for m in messages} == {"sent"}


def test_blocking_config_is_the_deploy_example_plus_one_deny():
    """The blocking proxy runs deploy/haproxy.cfg with one line more: the frontend's deny of the Upgrade."""
    options = {"port": 8080, "server_ports": [8081], "stats_socket": Path("/run/h.sock")}
    plain = render_haproxy_config(HAPROXY_TEMPLATE.read_text(), **options).splitlines()
    blocking = render_haproxy_config(
        HAPROXY_TEMPLATE.read_text(), **options, block_websocket=True
    ).splitlines()
    added = [line for line in blocking if line not in plain]
    assert added == ["    http-request deny if { hdr(upgrade) -i websocket }"]
    assert blocking.index(added[0]) == plain.index("    bind 127.0.0.1:8080") + 1
    assert [line for line in blocking if line != added[0]] == plain


async def test_proxy_refuses_the_websocket_upgrade_and_passes_http(make_hearth, blocking_proxy):
    """Through the blocking HAProxy a WebSocket handshake gets 403 while plain HTTP passes; straight to hearth the WebSocket opens."""
    hearth = await make_hearth()
    proxy = await blocking_proxy(hearth.server.port)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"{proxy.url}/ws")
        assert refused.value.status == 403
        async with session.get(f"{proxy.url}/health/ready") as response:
            assert response.status == 200
        async with session.post(
            f"{proxy.url}/api/v1/auth/login",
            json={"username": "alice", "password": hearth.PASSWORD},
        ) as response:
            assert response.status == 200
            token = (await response.json())["token"]
        async with session.post(
            f"{proxy.url}/api/v1/sse/ticket", headers={"Authorization": f"Bearer {token}"}
        ) as response:
            assert response.status == 200, await response.text()
            assert len((await response.json())["ticket"]) >= 32
        direct = await session.ws_connect(f"{hearth.url}ws")
        await direct.close()


async def test_two_pages_chat_on_the_fallback(make_hearth, blocking_proxy, browser, console):
    """Behind a proxy that refuses WebSocket two pages chat over SSE and POST: both indicators say fallback, each page shows every message once and in order, and no URL holds a token."""
    hearth = await make_hearth()
    proxy = await blocking_proxy(hearth.server.port)
    pages = {
        "alice": await open_page(browser, console, f"{proxy.url}/", "alice"),
        "bob": await open_page(browser, console, f"{proxy.url}/", "bob", phone=True),
    }
    urls: list[str] = []
    for page in pages.values():
        page.on("request", lambda request: urls.append(request.url))
    for name, page in pages.items():
        await log_in(page, name)
    for name, page in pages.items():
        assert await indicator(page) == ("sse", "connected (fallback)")
        assert refused_upgrades(console, name), console.lines  # WebSocket was tried first
    await pages["alice"].wait_for_function(
        "() => [...document.querySelectorAll('#presence-list li')].map(li => li.textContent)"
        ".join(',') === 'alice,bob'"
    )

    lines = [("alice", "hi bob"), ("bob", "hello alice"), ("alice", "over SSE?")]
    lines += [("bob", "and POST"), ("alice", "no WebSocket at all"), ("bob", "fine by me")]
    said = await chat(pages, lines)
    await assert_each_once_in_order(hearth, pages.values(), said)

    tokens = [
        await page.evaluate("() => JSON.parse(sessionStorage.getItem('hearth.session.v1')).token")
        for page in pages.values()
    ]
    assert sum("/sse?ticket=" in url for url in urls) >= 2, urls
    assert not [url for url in urls for token in tokens if token in url]
    await screenshot(pages["alice"], "two-pages-desktop")
    await screenshot(pages["bob"], "two-pages-phone")

    # The choice lasts as long as the page: a reload tries WebSocket first again.
    refused_before = len(refused_upgrades(console, "bob"))
    await pages["bob"].reload()
    await wait_connected(pages["bob"])
    assert len(refused_upgrades(console, "bob")) == refused_before + 1
    assert await indicator(pages["bob"]) == ("sse", "connected (fallback)")
    await wait_shown(pages["bob"], said)
    assert [m["content"] for m in await shown(pages["bob"])] == said
    assert console.unexpected(outage=True) == []


async def chat_across_a_cut(
    make_hearth, blocking_proxy, browser, console, expected: re.Pattern = STREAM_CUT, **env: str
):
    """alice and bob chat on the fallback, each behind a blocking proxy of their own; alice's
    proxy is stopped (cutting her stream) while bob says three lines, then started again.

    Checks that both pages then show every message once, in order, and still say fallback,
    with no console error but *expected* ones and Chromium's refused connections; returns
    alice's page and the requests it made. *env* are hearth's settings.
    """
    hearth = await make_hearth(**env)
    alice_proxy = await blocking_proxy(hearth.server.port)
    bob_proxy = await blocking_proxy(hearth.server.port)
    pages = {
        "alice": await open_page(browser, console, f"{alice_proxy.url}/", "alice"),
        "bob": await open_page(browser, console, f"{bob_proxy.url}/", "bob"),
    }
    alice = pages["alice"]
    requests = []
    alice.on("request", lambda request: requests.append(request))
    for name, page in pages.items():
        await log_in(page, name)
        assert await indicator(page) == ("sse", "connected (fallback)")
    before = await chat(pages, [("alice", "before 1"), ("bob", "before 2")])

    await asyncio.to_thread(alice_proxy.stop)  # every connection through it is cut
    while_cut = await chat({"bob": pages["bob"]}, [("bob", f"while cut {n}") for n in (1, 2, 3)])
    await asyncio.sleep(2.5)  # alice's EventSource retries (every 2 s) and is refused
    assert [m["content"] for m in await shown(alice)] == before
    await asyncio.to_thread(alice_proxy.start)

    await wait_shown(alice, [*before, *while_cut], timeout=20)
    after = await chat(pages, [("alice", "back"), ("bob", "welcome back")])
    await assert_each_once_in_order(hearth, pages.values(), [*before, *while_cut, *after])
    assert await indicator(alice) == ("sse", "connected (fallback)")
    assert [
        (name, text) for name, text in console.unexpected(outage=True) if not expected.search(text)
    ] == [], console.lines
    return alice, requests


async def tickets_and_streams(requests) -> tuple[list, list]:
    """The tickets issued (POSTs answered 200) and the event stream GETs among *requests*."""
    tickets = []
    for request in requests:
        if request.url.endswith("/api/v1/sse/ticket"):
            response = await request.response()
            if response is not None and response.status == 200:
                tickets.append(request)
    streams = [r for r in requests if "/sse?ticket=" in r.url]
    return tickets, streams


async def test_page_resumes_its_stream_after_the_proxy_cuts_it(
    make_hearth, blocking_proxy, browser, console
):
    """When the proxy in front of a fallback page goes away and comes back, EventSource resumes with Last-Event-ID and the page shows every message, those sent meanwhile too, once and in order."""
    alice, requests = await chat_across_a_cut(make_hearth, blocking_proxy, browser, console)
    tickets, streams = await tickets_and_streams(requests)
    assert len(tickets) == 1, "recovered by resuming the stream, not by a fresh one"
    assert len({r.url for r in streams}) == 1 and len(streams) >= 2, [r.url for r in streams]
    resumed = [(await r.all_headers()).get("last-event-id") for r in streams[1:]]
    assert resumed[-1] == "lobby:2", resumed
    await screenshot(alice, "resumed")


async def test_page_opens_a_fresh_stream_when_the_resume_is_refused(
    make_hearth, blocking_proxy, browser, console
):
    """When the stream comes back after the server's resume window, the refused EventSource is replaced by a fresh ticket and stream, and sub since still brings every message once and in order."""
    alice, requests = await chat_across_a_cut(
        make_hearth, blocking_proxy, browser, console, RESUME_REFUSED, HEARTH_SSE_RESUME="0.5"
    )
    tickets, streams = await tickets_and_streams(requests)
    assert len(tickets) == 2, [r.url for r in requests]
    assert len({r.url for r in streams}) == 2, [r.url for r in streams]
    first_ticket_streams = [r for r in streams if r.url == streams[0].url]
    assert len(first_ticket_streams) >= 2  # the browser's resume, refused
    assert (await first_ticket_streams[-1].all_headers()).get("last-event-id") == "lobby:2"
    assert (await streams[-1].all_headers()).get("last-event-id") is None


async def test_fallback_pages_come_back_after_a_server_restart(
    make_hearth, blocking_proxy, browser, console
):
    """After hearth restarts behind the blocking proxy (SERVER_SHUTDOWN, then a new process that knows no ticket), fallback pages get new streams and show every message once, in order: those typed and those stored meanwhile."""
    hearth = await make_hearth()
    proxy = await blocking_proxy(hearth.server.port)
    pages = {
        "alice": await open_page(browser, console, f"{proxy.url}/", "alice"),
        "bob": await open_page(browser, console, f"{proxy.url}/", "bob"),
    }
    requests = []
    pages["alice"].on("request", lambda request: requests.append(request))
    for name, page in pages.items():
        await log_in(page, name)
    before = await chat(pages, [("alice", "before 1"), ("bob", "before 2")])

    port = await stop(hearth)
    for page in pages.values():
        await page.wait_for_selector("#connection[data-state=reconnecting]")
    await say(pages["alice"], "typed while the server is away")
    await pages["alice"].wait_for_selector("#messages li[data-state=pending]")
    await start_again(hearth, port)
    carol = await hearth.connect("carol")
    for number in (1, 2):
        ctrl = await carol.request(
            "pub", topic="room:lobby", content=f"carol {number}", client_msg_id=f"carol-{number}"
        )
        assert ctrl["code"] == 200, ctrl

    typed_and_stored = [*before, "typed while the server is away", "carol 1", "carol 2"]
    for page in pages.values():
        await wait_connected(page, timeout=40)
        await wait_shown(page, typed_and_stored)
    stored = await stored_contents(hearth)
    assert sorted(stored) == sorted(typed_and_stored)
    await assert_each_once_in_order(hearth, pages.values(), stored)
    for page in pages.values():
        assert await indicator(page) == ("sse", "connected (fallback)")
    tickets, _ = await tickets_and_streams(requests)
    assert len(tickets) == 2, "the new process knew no ticket: a fresh stream"
    await screenshot(pages["alice"], "after-restart")
    assert [
        (name, text)
        for name, text in console.unexpected(outage=True)
        if not re.search(rf"{RESUME_REFUSED.pattern}|status of 503", text)
    ] == [], console.lines


#: Runs the SDK in a page: a HearthClient whose WebSocket URL never answers the Upgrade
#: (its HTTP calls go to the page's own server).
UNANSWERED_UPGRADE = """async ({token, url}) => {
  const sdk = await import('/static/hearth.js');
  const client = new sdk.HearthClient({
    token, username: 'alice', url, baseUrl: location.origin, wsOpenTimeoutMs: 1000,
    storage: null,
  });
  const transports = [];
  client.on('transport', (detail) => transports.push(detail));
  const ready = new Promise((resolve) => client.on('stateChange', ({state}) => {
    if (state === 'ready') resolve();
  }));
  const started = performance.now();
  client.connect();
  await ready;
  const readyAfterMs = performance.now() - started;
  const ping = await client.request('ping');
  client.close();
  return {transport: client.transport, transports, readyAfterMs, ping: ping.code};
}"""


async def test_sdk_falls_back_when_the_upgrade_gets_no_answer(make_hearth, browser, console):
    """A WebSocket handshake that never gets an answer (a proxy holding the Upgrade) counts as blocked after wsOpenTimeoutMs, and the client goes on over SSE."""
    hearth = await make_hearth()
    accepted: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # read nothing, answer nothing

    silent = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        port = silent.sockets[0].getsockname()[1]
        page = await open_page(browser, console, hearth.url, "probe")
        result = await asyncio.wait_for(
            page.evaluate(
                UNANSWERED_UPGRADE,
                {"token": hearth.tokens["alice"], "url": f"ws://127.0.0.1:{port}/ws"},
            ),
            15,
        )
    finally:
        for writer in accepted:
            writer.close()
        silent.close()
    assert len(accepted) == 1
    assert result["transport"] == "sse"
    assert result["transports"] == [
        {
            "transport": "sse",
            "previous": "websocket",
            "reason": "WebSocket refused: not open within 1000 ms",
        }
    ]
    assert 1000 <= result["readyAfterMs"] < 4000, result
    assert result["ping"] == 200
    assert console.unexpected(outage=True) == []


async def test_websocket_page_and_fallback_page_share_a_room(
    make_hearth, blocking_proxy, browser, console
):
    """A page straight to hearth stays on WebSocket while one behind the blocking proxy falls back, and in the same room each sees every message once."""
    hearth = await make_hearth()
    proxy = await blocking_proxy(hearth.server.port)
    pages = {
        "alice": await open_page(browser, console, hearth.url, "alice"),
        "bob": await open_page(browser, console, f"{proxy.url}/", "bob"),
    }
    for name, page in pages.items():
        await log_in(page, name)
    assert await indicator(pages["alice"]) == ("websocket", "connected")
    assert await indicator(pages["bob"]) == ("sse", "connected (fallback)")
    assert refused_upgrades(console, "alice") == []
    lines = [("alice", "from a WebSocket"), ("bob", "from the fallback")]
    lines += [("alice", "still WebSocket"), ("bob", "still SSE")]
    said = await chat(pages, lines)
    await assert_each_once_in_order(hearth, pages.values(), said)
    await screenshot(pages["bob"], "mixed-fallback-page")
    assert console.unexpected(outage=True) == []
