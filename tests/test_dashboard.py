"""The operator dashboard at /dashboard: its access rules over HTTP, and its page in real headless Chromium."""

from __future__ import annotations

import asyncio
import re
from http.cookies import SimpleCookie
from pathlib import Path

import aiohttp
import aiopg
import pytest

from app import keys
from app.dashboard import SECURITY_HEADERS, SESSION_COOKIE
from app.diagnostics import take_snapshot
from tests.browser import ConsoleWatch
from tests.conftest import Hearth, wait_until

#: Screenshots of the dashboard tests (the folder is git-ignored).
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "dashboard"
#: The CSRF token the overview page carries for its forms and its script.
CSRF_META = re.compile(r'<meta name="csrf-token" content="([0-9a-f]+)">')


@pytest.fixture
async def client():
    """An HTTP client that keeps no cookies: each test sends the session cookie itself."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


def dashboard_url(hearth: Hearth, path: str = "/") -> str:
    """The URL of *path* under /dashboard on *hearth*."""
    return str(hearth.server.make_url(f"/dashboard{path}"))


def origin(hearth: Hearth) -> str:
    """The origin the dashboard's own pages post from."""
    return f"http://{hearth.server.host}:{hearth.server.port}"


async def log_in(
    hearth: Hearth, client: aiohttp.ClientSession, user: str = "root", password: str | None = None
) -> aiohttp.ClientResponse:
    """POST the login form as *user*; the response, not followed."""
    async with client.post(
        dashboard_url(hearth, "/login"),
        data={"username": user, "password": password or Hearth.PASSWORD},
        headers={"Origin": origin(hearth)},
        allow_redirects=False,
    ) as response:
        await response.read()
        return response


async def session_of(hearth: Hearth, client: aiohttp.ClientSession) -> str:
    """Log in as the admin and return the session token its cookie holds."""
    response = await log_in(hearth, client)
    assert response.status == 303, await response.text()
    return response.cookies[SESSION_COOKIE].value


async def page(hearth: Hearth, client: aiohttp.ClientSession, token: str) -> tuple[int, str]:
    """GET the overview with session *token*: its status and HTML."""
    async with client.get(
        dashboard_url(hearth),
        headers={"Cookie": f"{SESSION_COOKIE}={token}"},
        allow_redirects=False,
    ) as response:
        return response.status, await response.text()


async def live_tokens(database: str, user: str) -> tuple[int, int]:
    """``(all, unrevoked)`` login tokens of *user* in PostgreSQL."""
    async with aiopg.connect(database) as conn, conn.cursor() as cursor:
        await cursor.execute(
            "SELECT count(*), count(*) FILTER (WHERE t.revoked_at IS NULL) FROM auth_tokens t"
            " JOIN users u ON u.id = t.user_id WHERE u.username = %s",
            (user,),
        )
        return await cursor.fetchone()


# -- over HTTP ---------------------------------------------------------------------------------


async def test_unauthenticated_page_redirects_to_login(make_hearth, client):
    """A GET of a dashboard page without a session is sent (303) to the login form."""
    hearth = await make_hearth()
    for path in ("", "/"):
        async with client.get(dashboard_url(hearth, path), allow_redirects=False) as response:
            assert response.status == 303
            assert response.headers["Location"] == "/dashboard/login"
    async with client.get(dashboard_url(hearth, "/login")) as response:
        assert response.status == 200
        html = await response.text()
    assert '<form id="login-form"' in html and 'name="password" type="password"' in html


async def test_non_admin_login_is_refused_and_its_token_revoked(make_hearth, client):
    """A non-admin's login gets a 403 page and no cookie, and the token it made is revoked."""
    hearth = await make_hearth()
    before = await live_tokens(hearth.database, "alice")
    response = await log_in(hearth, client, "alice")
    assert response.status == 403
    assert "administrators only" in await response.text()
    assert SESSION_COOKIE not in response.cookies
    total, unrevoked = await live_tokens(hearth.database, "alice")
    assert (total, unrevoked) == (before[0] + 1, before[1])


async def test_admin_login_sets_a_strict_http_only_cookie(make_hearth, client):
    """An admin's login sets an HttpOnly, SameSite=Strict, /dashboard cookie and puts the token in no URL."""
    hearth = await make_hearth()
    response = await log_in(hearth, client)
    assert response.status == 303
    assert response.headers["Location"] == "/dashboard/"
    cookie = SimpleCookie()
    cookie.load(response.headers["Set-Cookie"])
    morsel = cookie[SESSION_COOKIE]
    token = morsel.value
    assert morsel["httponly"] is True
    assert morsel["samesite"] == "Strict"
    assert morsel["path"] == "/dashboard"
    assert not morsel["secure"]  # plain http here; https requests get Secure
    ttl = hearth.app[keys.SETTINGS].token_ttl_hours * 3600
    assert ttl - 5 <= int(morsel["max-age"]) <= ttl
    assert (await hearth.app[keys.AUTH].authenticate(token)).username == "root"
    status, html = await page(hearth, client, token)
    assert status == 200
    assert token not in response.headers["Location"] and token not in html


async def test_failed_login_re_renders_the_form_and_throttles(make_hearth, client):
    """A wrong password re-renders the form with a safe, escaped message; repeated tries get 429 with Retry-After."""
    hearth = await make_hearth(HEARTH_LOGIN_USER_RATE_PER_MIN="3")
    response = await log_in(hearth, client, "carol", password="wrong")
    html = await response.text()
    assert response.status == 401
    assert "Wrong username or password." in html and '<form id="login-form"' in html
    assert SESSION_COOKIE not in response.cookies
    hostile = await log_in(hearth, client, "<script>alert(1)</script>", password="x")
    hostile_html = await hostile.text()
    assert "<script>alert(1)</script>" not in hostile_html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in hostile_html
    statuses = [(await log_in(hearth, client, "carol", password="wrong")) for _ in range(4)]
    throttled = [r for r in statuses if r.status == 429]
    assert throttled, [r.status for r in statuses]
    assert int(throttled[0].headers["Retry-After"]) >= 1
    assert "Too many attempts" in await throttled[0].text()


async def test_security_headers_on_pages_json_and_errors(make_hearth, client):
    """Every dashboard response (page, JSON, redirect, error) carries CSP, frame, nosniff, referrer and no-store headers."""
    hearth = await make_hearth()
    token = await session_of(hearth, client)
    cookie = {"Cookie": f"{SESSION_COOKIE}={token}"}
    requests = [
        ("GET", "/login", {}, 200),
        ("GET", "/", cookie, 200),
        ("GET", "/snapshot.json", cookie, 200),
        ("GET", "/snapshot.json", {}, 401),
        ("GET", "/", {}, 303),
        ("GET", "/no-such-page", cookie, 404),
        ("POST", "/maintenance", cookie, 403),
    ]
    for method, path, headers, status in requests:
        async with client.request(
            method, dashboard_url(hearth, path), headers=headers, allow_redirects=False
        ) as response:
            assert response.status == status, (method, path)
            for name, value in SECURITY_HEADERS.items():
                assert response.headers.get(name) == value, (method, path, name)
    csp = SECURITY_HEADERS["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self';" in csp


async def test_post_without_csrf_token_is_refused(make_hearth, client):
    """A POST with the session cookie but no (or a wrong) CSRF token is refused with 403 and changes nothing."""
    hearth = await make_hearth()
    token = await session_of(hearth, client)
    _, html = await page(hearth, client, token)
    csrf = CSRF_META.search(html).group(1)
    url = dashboard_url(hearth, "/maintenance")
    headers = {"Cookie": f"{SESSION_COOKIE}={token}", "Origin": origin(hearth)}
    attempts = [
        ({"on": "1"}, {}),
        ({"on": "1", "csrf": "0" * len(csrf)}, {}),
        ({"on": "1", "csrf": "é" * 3}, {}),
        ({"on": "1"}, {"X-CSRF-Token": csrf[:-1] + "g"}),
    ]
    for data, extra in attempts:
        async with client.post(
            url, data=data, headers={**headers, **extra}, allow_redirects=False
        ) as response:
            assert response.status == 403, (data, extra)
        assert hearth.app[keys.MAINTENANCE].state() is None
    async with client.post(
        url, data={"on": "1", "csrf": csrf}, headers=headers, allow_redirects=False
    ) as response:
        assert response.status == 303
    assert hearth.app[keys.MAINTENANCE].state() is not None


async def test_post_from_another_origin_is_refused(make_hearth, client):
    """A POST carrying a valid CSRF token but another site's Origin (or Referer) is refused with 403."""
    hearth = await make_hearth()
    token = await session_of(hearth, client)
    _, html = await page(hearth, client, token)
    csrf = CSRF_META.search(html).group(1)
    url = dashboard_url(hearth, "/actors/heartbeat/restart")
    restarts = hearth.app[keys.SUPERVISOR].get("heartbeat").restarts
    cookie = f"{SESSION_COOKIE}={token}"
    for foreign in (
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Referer": "http://evil.example/dashboard/"},
    ):
        async with client.post(
            url,
            data={"csrf": csrf},
            headers={"Cookie": cookie, **foreign},
            allow_redirects=False,
        ) as response:
            assert response.status == 403, foreign
    async with client.post(
        dashboard_url(hearth, "/login"),
        data={"username": "root", "password": Hearth.PASSWORD},
        headers={"Origin": "http://evil.example"},
        allow_redirects=False,
    ) as response:
        assert response.status == 403
        assert SESSION_COOKIE not in response.cookies
    await asyncio.sleep(0.2)
    assert hearth.app[keys.SUPERVISOR].get("heartbeat").restarts == restarts


async def test_page_reads_without_javascript(make_hearth, client):
    """The server-rendered HTML already names every actor and shows the connection count."""
    hearth = await make_hearth()
    for user in ("alice", "bob"):
        await hearth.connect(user)
    await wait_until(lambda: len(hearth.app[keys.WEBSOCKETS]) == 2, what="two connections")
    token = await session_of(hearth, client)
    status, html = await page(hearth, client, token)
    assert status == 200
    names = [status["name"] for status in hearth.app[keys.SUPERVISOR].statuses()]
    assert re.findall(r'<tr data-actor="([^"]+)">', html) == names
    assert '<span data-field="connections" data-format="number" id="connections">2</span>' in html
    assert re.search(r"<polyline points=\"[0-9., ]*\"", html)


async def test_snapshot_json_needs_the_cookie(make_hearth, client):
    """snapshot.json answers 401 without the session cookie and the diagnostics snapshot with it."""
    hearth = await make_hearth()
    async with client.get(dashboard_url(hearth, "/snapshot.json")) as response:
        assert response.status == 401
        assert (await response.json())["ok"] is False
    token = await session_of(hearth, client)
    async with client.get(
        dashboard_url(hearth, "/snapshot.json"), headers={"Cookie": f"{SESSION_COOKIE}={token}"}
    ) as response:
        assert response.status == 200
        body = await response.json()
    expected = take_snapshot(hearth.app).as_dict()
    assert body.keys() == expected.keys()
    assert [actor["name"] for actor in body["actors"]] == [a["name"] for a in expected["actors"]]


async def test_bad_expired_or_revoked_cookie_goes_back_to_login(make_hearth, client):
    """A garbage, expired or logged-out session cookie sends the page to the login form and clears the cookie."""
    hearth = await make_hearth()
    expired, _ = await hearth.app[keys.AUTH].login("root", Hearth.PASSWORD, client_ip="127.0.0.1")
    async with aiopg.connect(hearth.database) as conn, conn.cursor() as cursor:
        await cursor.execute(
            "UPDATE auth_tokens SET expires_at = now() - interval '1 second'"
            " WHERE token_hash = sha256(%s::bytea)",
            (expired.encode(),),
        )
    revoked = await session_of(hearth, client)
    status, html = await page(hearth, client, revoked)
    csrf = CSRF_META.search(html).group(1)
    async with client.post(
        dashboard_url(hearth, "/logout"),
        data={"csrf": csrf},
        headers={"Cookie": f"{SESSION_COOKIE}={revoked}", "Origin": origin(hearth)},
        allow_redirects=False,
    ) as response:
        assert response.status == 303
        assert response.headers["Location"] == "/dashboard/login"
        assert response.cookies[SESSION_COOKIE].value == ""
    for token in ("not-a-token", "é", expired, revoked):
        async with client.get(
            dashboard_url(hearth),
            headers={"Cookie": f"{SESSION_COOKIE}={token}"},
            allow_redirects=False,
        ) as response:
            assert response.status == 303, token
            assert response.headers["Location"] == "/dashboard/login"
            assert response.cookies[SESSION_COOKIE].value == ""


async def test_non_admin_token_as_cookie_is_forbidden(make_hearth, client):
    """A valid token of a non-admin, set as the cookie by hand, gets a 403 page, not the dashboard."""
    hearth = await make_hearth()
    status, html = await page(hearth, client, hearth.tokens["alice"])
    assert status == 403
    assert "administrators only" in html and "data-actor" not in html


# -- in real headless Chromium -----------------------------------------------------------------


async def open_dashboard(
    browser, console: ConsoleWatch, hearth: Hearth, *, phone: bool = False, javascript: bool = True
):
    """A fresh browser context at /dashboard, logged in as the admin through the form."""
    viewport = {"width": 390, "height": 844} if phone else {"width": 1280, "height": 800}
    context = await browser.new_context(viewport=viewport, java_script_enabled=javascript)
    tab = await context.new_page()
    console.watch(tab, "phone" if phone else "desktop")
    await tab.goto(dashboard_url(hearth, ""))
    assert tab.url == dashboard_url(hearth, "/login")
    await tab.fill("#username", "root")
    await tab.fill("#password", Hearth.PASSWORD)
    await tab.click("#login-form button[type=submit]")
    await tab.wait_for_selector("#actors-body tr[data-actor]")
    assert tab.url == dashboard_url(hearth, "/")
    return tab


async def screenshot(tab, name: str) -> None:
    """Save a full-page screenshot under test-artifacts/dashboard/."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await tab.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def test_browser_login_shows_every_actor(make_hearth, browser, console):
    """After logging in through the form, the actors table lists every actor the supervisor runs, in order."""
    hearth = await make_hearth()
    tab = await open_dashboard(browser, console, hearth)
    shown = await tab.eval_on_selector_all(
        "#actors-body tr[data-actor]", "rows => rows.map(row => row.dataset.actor)"
    )
    assert shown == [status["name"] for status in hearth.app[keys.SUPERVISOR].statuses()]
    cookies = await tab.context.cookies()
    session = next(cookie for cookie in cookies if cookie["name"] == SESSION_COOKIE)
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert await tab.evaluate("() => document.cookie") == ""
    await screenshot(tab, "desktop-1280")
    assert console.unexpected() == []


async def test_counters_change_without_a_reload(make_hearth, browser, console):
    """Traffic sent after the page loaded shows in its connection count and message chart without a navigation."""
    hearth = await make_hearth()
    tab = await open_dashboard(browser, console, hearth)
    assert await tab.text_content("#connections") == "0"
    await tab.evaluate("() => { window.__marker = 1; }")
    clients = [await hearth.connect(user) for user in ("alice", "bob", "carol")]
    for client in clients:
        assert (await client.request("sub", topic="room:lobby"))["code"] == 200
    for number in range(5):
        ctrl = await clients[0].request(
            "pub", topic="room:lobby", content=f"hello {number}", client_msg_id=f"m{number}"
        )
        assert ctrl["code"] == 200, ctrl
    await tab.wait_for_function(
        "() => document.getElementById('connections').textContent === '3'", timeout=10_000
    )
    await tab.wait_for_function(
        "() => Number(document.querySelector('[data-chart=messages_in] [data-chart-peak]')"
        ".textContent) > 0",
        timeout=10_000,
    )
    assert await tab.evaluate("() => window.__marker") == 1
    points = await tab.get_attribute("[data-chart=messages_in] polyline", "points")
    assert len(points.split()) >= 2
    assert await tab.get_attribute("#live", "data-state") == "live"
    assert console.unexpected() == []


async def test_restart_button_restarts_the_actor(make_hearth, browser, console):
    """The Restart button restarts its actor: the count goes up in the supervisor and on the page."""
    hearth = await make_hearth()
    heartbeat = hearth.app[keys.SUPERVISOR].get("heartbeat")
    before = heartbeat.restarts
    tab = await open_dashboard(browser, console, hearth)
    row = "#actors-body tr[data-actor=heartbeat]"
    assert await tab.text_content(f"{row} [data-col=restarts]") == str(before)
    await tab.evaluate("() => { window.__marker = 1; }")
    await tab.click(f"{row} button")
    await wait_until(lambda: heartbeat.restarts == before + 1, timeout=10, what="a restart")
    await tab.wait_for_function(
        "([selector, count]) => document.querySelector(selector).textContent === count",
        arg=[f"{row} [data-col=restarts]", str(before + 1)],
        timeout=10_000,
    )
    assert await tab.text_content("#flash") == "Restarting heartbeat."
    assert await tab.evaluate("() => window.__marker") == 1
    await wait_until(lambda: heartbeat.state.value == "running", timeout=10, what="running")
    assert console.unexpected() == []


async def test_restart_button_works_without_javascript(make_hearth, browser, console):
    """With JavaScript off, the Restart form posts, restarts the actor and comes back with a flash note."""
    hearth = await make_hearth()
    heartbeat = hearth.app[keys.SUPERVISOR].get("heartbeat")
    before = heartbeat.restarts
    tab = await open_dashboard(browser, console, hearth, javascript=False)
    assert await tab.get_attribute("#live", "data-state") == "static"
    await tab.click("#actors-body tr[data-actor=heartbeat] button")
    await tab.wait_for_selector("#flash:not([hidden])")
    assert await tab.text_content("#flash") == "Restarting heartbeat."
    assert tab.url == dashboard_url(hearth, "/#actors")
    await wait_until(lambda: heartbeat.restarts == before + 1, timeout=10, what="a restart")
    await tab.reload()
    assert await tab.is_hidden("#flash")  # a flash note shows once
    assert await tab.text_content(
        "#actors-body tr[data-actor=heartbeat] [data-col=restarts]"
    ) == str(before + 1)
    assert console.unexpected() == []


async def test_maintenance_toggle_turns_readiness_off_and_on(make_hearth, browser, console, client):
    """The maintenance toggle turns /health/ready to 503 (reason maintenance) and back to 200."""
    hearth = await make_hearth()
    ready_url = str(hearth.server.make_url("/health/ready"))

    async def readiness() -> tuple[int, list[str]]:
        async with client.get(ready_url) as response:
            return response.status, (await response.json())["reasons"]

    assert await readiness() == (200, [])
    tab = await open_dashboard(browser, console, hearth)
    await tab.fill("#maintenance-reason", "database upgrade <b>now</b>")
    await tab.click("#maintenance-on button[type=submit]")
    await tab.wait_for_selector("#maintenance-banner:not([hidden])")
    status, reasons = await readiness()
    assert status == 503 and "maintenance" in reasons
    state = hearth.app[keys.MAINTENANCE].state()
    assert state is not None and state.by == "root"
    await tab.wait_for_function(
        "() => document.querySelector('[data-field=\"maintenance.reason\"]').textContent"
        " === 'database upgrade <b>now</b>'"
    )
    assert await tab.text_content("[data-field=status]") == "maintenance"
    await screenshot(tab, "maintenance-on-1280")
    await tab.click("#maintenance-off button[type=submit]")
    await tab.wait_for_selector("#maintenance-banner", state="hidden")
    assert await readiness() == (200, [])
    assert await tab.is_visible("#maintenance-on")
    assert console.unexpected() == []


async def test_phone_width_has_no_horizontal_overflow(make_hearth, browser, console):
    """At 390 px the page fits the screen width: wide tables scroll inside their cards."""
    hearth = await make_hearth()
    await hearth.connect("alice")
    tab = await open_dashboard(browser, console, hearth, phone=True)
    async with tab.expect_response(lambda response: response.url.endswith("/snapshot.json")):
        pass  # one poll redraws the page at this width
    await tab.wait_for_load_state("networkidle")
    widths = await tab.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[1] == 390
    assert widths[0] <= widths[1], widths
    table_scrolls = await tab.evaluate(
        "() => { const box = document.querySelector('#actors .scroll');"
        " return box.scrollWidth > box.clientWidth; }"
    )
    assert table_scrolls  # the table is wider than the phone, and scrolls in its box
    await screenshot(tab, "phone-390")
    assert console.unexpected() == []
