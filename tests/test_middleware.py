"""The HTTP middleware: trace ids, one JSON error model, one log line and metrics per request."""

from __future__ import annotations

import dataclasses
import io
import re

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import keys, metrics
from app.analytics import ErrorRecorder
from app.errors import AuthRequired, RateLimited, ValidationError
from app.middleware import trace_middleware
from app.web import create_app
from tests.conftest import Hearth, WsClient, log_records
from tests.test_analytics import USER_AGENTS

#: An iPhone's user agent.
IPHONE = next(agent for agent, kind in USER_AGENTS.items() if kind == "mobile")
#: A fresh trace id: 16 hex characters.
GENERATED = re.compile(r"^[0-9a-f]{16}$")

routes = web.RouteTableDef()


@routes.get("/ok")
async def ok(request: web.Request) -> web.Response:
    """200."""
    return web.json_response({"ok": True})


@routes.get("/items/{name}")
async def item(request: web.Request) -> web.Response:
    """400 with field details."""
    raise ValidationError("bad name", fields={"name": "too long"})


@routes.get("/private")
async def private(request: web.Request) -> web.Response:
    """401."""
    raise AuthRequired("no token")


@routes.get("/boom")
async def boom(request: web.Request) -> web.Response:
    """An unhandled exception whose text must never reach the client."""
    raise RuntimeError("connection to postgresql://admin:s3cret@db/prod failed at /srv/app.py")


@routes.get("/busy")
async def busy(request: web.Request) -> web.Response:
    """A 503 raised by a handler with its own Retry-After."""
    raise web.HTTPServiceUnavailable(text="server shutting down", headers={"Retry-After": "5"})


@routes.get("/slow-down")
async def slow_down(request: web.Request) -> web.Response:
    """A 429 whose retry_after becomes a header."""
    raise RateLimited(retry_after=2.5)


@routes.get("/moved")
async def moved(request: web.Request) -> web.Response:
    """A redirect, which is no error."""
    raise web.HTTPFound("/ok")


@routes.post("/upload")
async def upload(request: web.Request) -> web.Response:
    """Reads a body over the app's client_max_size: aiohttp's own 413."""
    await request.read()
    return web.json_response({})


@routes.get("/health/ready")
async def ready(request: web.Request) -> web.Response:
    """A probe, failing when asked to."""
    return web.json_response({}, status=503 if "fail" in request.query else 200)


def build_app(recorder: ErrorRecorder | None) -> web.Application:
    """A small app on the real middleware, with a sub-app under /admin."""
    app = web.Application(middlewares=[trace_middleware], client_max_size=1024)
    app.add_routes(routes)
    admin = web.Application()

    async def admin_fails(request: web.Request) -> web.Response:
        raise ValueError("sub-app internals")

    admin.router.add_get("/rooms/{room}/fail", admin_fails)
    app.add_subapp("/admin", admin)
    if recorder is not None:
        app[keys.ERRORS] = recorder
    return app


@pytest.fixture
async def recorder() -> ErrorRecorder:
    """An error recorder that is never started: records stay in memory."""
    return ErrorRecorder()


@pytest.fixture
async def client(recorder):
    """An HTTP session and the base URL of the small app, served on a real socket."""
    server = TestServer(build_app(recorder))
    await server.start_server()
    async with aiohttp.ClientSession() as session:
        yield session, str(server.make_url(""))
    await server.close()


async def fetch(client, method: str, path: str, **kwargs) -> tuple[int, dict, dict]:
    """Status, headers and JSON body (or {}) of one request."""
    session, base = client
    async with session.request(method, base + path, allow_redirects=False, **kwargs) as response:
        try:
            body = await response.json(content_type=None)
        except ValueError:
            body = {}
        return response.status, dict(response.headers), body or {}


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nowhere", 404, "NOT_FOUND"),
        ("DELETE", "/ok", 405, "INVALID_MESSAGE"),
        ("GET", "/private", 401, "AUTH_REQUIRED"),
        ("GET", "/items/x", 400, "INVALID_MESSAGE"),
        ("GET", "/boom", 500, "INTERNAL_ERROR"),
        ("GET", "/admin/rooms/lobby/fail", 500, "INTERNAL_ERROR"),
    ],
)
async def test_every_error_is_ctrl_json_echoing_the_trace_id(client, method, path, status, code):
    """404, 405, 401, 400 and 500 (sub-apps too) are ctrl JSON whose trace id is the request's."""
    got, headers, body = await fetch(client, method, path, headers={"X-Trace-ID": "trace-42"})
    ctrl = body["ctrl"]
    assert (got, ctrl["code"], ctrl["id"]) == (status, status, None)
    assert ctrl["params"]["error"] == code and ctrl["params"]["trace_id"] == "trace-42"
    assert headers["X-Trace-ID"] == "trace-42" and headers["Content-Type"].startswith(
        "application/json"
    )


async def test_trace_id_comes_from_x_trace_id_else_x_request_id_else_is_new(client):
    """X-Trace-ID wins over X-Request-ID; without either a fresh id is made and echoed."""
    _, headers, body = await fetch(
        client, "GET", "/nowhere", headers={"X-Trace-ID": "a.b", "X-Request-ID": "c"}
    )
    assert headers["X-Trace-ID"] == body["ctrl"]["params"]["trace_id"] == "a.b"
    _, headers, body = await fetch(client, "GET", "/nowhere", headers={"X-Request-ID": "req-7"})
    assert headers["X-Trace-ID"] == headers["X-Request-ID"] == "req-7"
    assert body["ctrl"]["params"]["trace_id"] == "req-7"
    _, headers, body = await fetch(client, "GET", "/ok")
    assert GENERATED.fullmatch(headers["X-Trace-ID"])


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=80))
async def test_a_malformed_trace_id_is_replaced(client, value):
    """A client trace id is used only when it is 1-64 of [A-Za-z0-9._-]; otherwise a new one is made."""
    _, headers, body = await fetch(client, "GET", "/nowhere", headers={"X-Trace-ID": value})
    echoed = headers["X-Trace-ID"]
    assert body["ctrl"]["params"]["trace_id"] == echoed
    if re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
        assert echoed == value
    else:
        assert GENERATED.fullmatch(echoed) and echoed != value


async def test_405_keeps_allow_and_handler_headers_are_kept(client):
    """A 405 keeps its Allow header, a handler's 503 its Retry-After, and a 429 gets one."""
    status, headers, _ = await fetch(client, "POST", "/ok")
    assert status == 405 and "GET" in headers["Allow"]
    status, headers, body = await fetch(client, "GET", "/busy")
    assert (status, headers["Retry-After"]) == (503, "5")
    assert body["ctrl"]["text"] == "service unavailable"  # fixed text, not the handler's
    status, headers, body = await fetch(client, "GET", "/slow-down")
    assert (status, headers["Retry-After"], body["ctrl"]["params"]["retry_after"]) == (
        429,
        "3",
        2.5,
    )


async def test_413_from_aiohttp_is_in_the_error_model(client):
    """A body over client_max_size gets aiohttp's 413 as ctrl JSON MESSAGE_TOO_LONG."""
    status, _, body = await fetch(client, "POST", "/upload", data=b"x" * 4096)
    assert status == 413 and body["ctrl"]["params"]["error"] == "MESSAGE_TOO_LONG"


async def test_redirects_pass_unchanged(client):
    """A redirect raised by a handler keeps its status and Location, with the trace id added."""
    status, headers, body = await fetch(client, "GET", "/moved", headers={"X-Trace-ID": "r1"})
    assert (status, headers["Location"], headers["X-Trace-ID"]) == (302, "/ok", "r1")
    assert "ctrl" not in body


async def test_unhandled_exception_is_500_without_internals_and_logged_with_traceback(
    client, log_stream: io.StringIO
):
    """An unhandled exception answers a bare 500 and logs its traceback under the trace id."""
    status, _, body = await fetch(client, "GET", "/boom", headers={"X-Trace-ID": "t-500"})
    assert status == 500 and body["ctrl"]["text"] == "internal error"
    assert set(body["ctrl"]["params"]) == {"error", "trace_id"}
    text = repr(body)
    assert "s3cret" not in text and "postgresql" not in text and "/srv" not in text
    [logged] = [r for r in log_records(log_stream) if r["msg"] == "unhandled error"]
    assert logged["level"] == "error" and logged["trace_id"] == "t-500"
    assert "RuntimeError" in logged["stack"] and "s3cret" not in logged["stack"]


async def test_one_log_line_per_request_with_route_and_device(client, log_stream: io.StringIO):
    """Each request logs one line with method, canonical route, status, duration and device."""
    await fetch(client, "GET", "/items/abc", headers={"User-Agent": IPHONE})
    await fetch(client, "GET", "/nowhere/at/all", headers={"User-Agent": "curl/8.5.0"})
    await fetch(client, "GET", "/boom")
    lines = [r for r in log_records(log_stream) if r["msg"] == "request"]
    assert [(r["method"], r["route"], r["status"], r["level"]) for r in lines] == [
        ("GET", "/items/{name}", 400, "info"),
        ("GET", "unmatched", 404, "info"),
        ("GET", "/boom", 500, "warn"),
    ]
    assert [r["device_type"] for r in lines] == ["mobile", "unknown", "unknown"]
    assert lines[0]["user_agent"] == IPHONE[:256] and lines[0]["duration_ms"] >= 0
    assert len({r["trace_id"] for r in lines}) == 3


async def test_probes_log_at_debug_unless_they_fail(client, log_stream: io.StringIO):
    """A passing probe logs at DEBUG, a failing one at WARNING."""
    await fetch(client, "GET", "/health/ready")
    await fetch(client, "GET", "/health/ready?fail=1")
    lines = [r for r in log_records(log_stream) if r["msg"] == "request"]
    assert [(r["status"], r["level"]) for r in lines] == [(200, "debug"), (503, "warn")]


async def test_requests_are_counted_by_canonical_route_and_status_class(client):
    """Metrics label requests with the canonical route (unmatched for 404s) and count 5xx."""
    route_child = metrics.HTTP_REQUESTS.labels("GET", "/items/{name}", "400")
    unmatched = metrics.HTTP_REQUESTS.labels("GET", "unmatched", "404")
    server_errors = metrics.REQUESTS.labels("http", "5xx")
    before = (route_child._value.get(), unmatched._value.get(), server_errors._value.get())
    await fetch(client, "GET", "/items/one")
    await fetch(client, "GET", "/items/two")
    await fetch(client, "GET", "/random-path-1")
    await fetch(client, "GET", "/boom")
    after = (route_child._value.get(), unmatched._value.get(), server_errors._value.get())
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 1, 1]


async def test_http_errors_are_recorded_with_route_and_device(client, recorder):
    """Each error answered is recorded once with its canonical route, method and device."""
    await fetch(client, "GET", "/items/x", headers={"User-Agent": IPHONE, "X-Trace-ID": "e1"})
    await fetch(client, "GET", "/boom")
    await fetch(client, "GET", "/ok")
    await fetch(client, "GET", "/health/ready?fail=1")  # a probe's answer, not an error
    records = [r.as_dict() for r in recorder.recent(10)]
    assert [(r["endpoint"], r["code"], r["status"]) for r in records] == [
        ("/boom", "INTERNAL_ERROR", 500),
        ("/items/{name}", "INVALID_MESSAGE", 400),
    ]
    assert records[1]["device_type"] == "mobile" and records[1]["trace_id"] == "e1"
    assert records[1]["method"] == "GET" and records[1]["transport"] == "http"


async def test_login_without_a_field_lists_it_in_details(make_hearth):
    """POST /api/v1/auth/login without a password is a 400 naming the field and why."""
    hearth = await make_hearth()
    async with hearth.session.post(
        f"{hearth.url}api/v1/auth/login", json={"username": "alice"}, headers={"X-Request-ID": "l1"}
    ) as response:
        body = await response.json()
    assert response.status == 400
    params = body["ctrl"]["params"]
    assert params["details"] == [{"field": "password", "reason": "missing"}]
    assert params["trace_id"] == "l1" and params["error"] == "INVALID_MESSAGE"


async def test_websocket_replies_are_counted_by_status_class(make_hearth):
    """Each ctrl reply on a WebSocket adds one to hearth_requests_total by its status class."""
    hearth = await make_hearth()
    ok, client_errors = metrics.REQUESTS.labels("ws", "2xx"), metrics.REQUESTS.labels("ws", "4xx")
    before = (ok._value.get(), client_errors._value.get())
    client = await hearth.connect("alice")  # auth: one 200
    assert (await client.request("ping"))["code"] == 200
    assert (await client.request("sub", topic="room:nowhere"))["code"] == 404
    assert (await client.request("sub", topic="not a topic"))["code"] == 400
    assert (ok._value.get() - before[0], client_errors._value.get() - before[1]) == (2, 2)


async def test_websocket_errors_are_recorded_with_op_user_agent_and_user(make_hearth, tmp_path):
    """A WebSocket error is recorded as ws:<op> (or ws for an unreadable frame) with the
    upgrade's user agent and the user."""
    seeded = await make_hearth()  # users, rooms and settings for an app built here
    settings = dataclasses.replace(seeded.app[keys.SETTINGS], spool_dir=str(tmp_path / "b"))
    app = create_app(settings)
    if keys.ERRORS not in app:  # until create_app makes one
        app[keys.ERRORS] = ErrorRecorder()
    recorder = app[keys.ERRORS]
    server = TestServer(app)
    await server.start_server()
    try:
        token, _ = await app[keys.AUTH].login("alice", Hearth.PASSWORD, client_ip="127.0.0.1")
        async with aiohttp.ClientSession(headers={"User-Agent": IPHONE}) as session:
            client = WsClient(await session.ws_connect(server.make_url("/ws")))
            assert (await client.request("auth", token=token))["code"] == 200
            ctrl = await client.request("sub", topic="room:nowhere", trace_id="ws-trace")
            assert ctrl["code"] == 404
            await client.ws.send_str("not json")
            await client.wait_for(lambda frame: frame.get("ctrl", {}).get("code") == 400)
            await client.ws.close()
        records = [record.as_dict() for record in recorder.recent(10)]
        assert [(r["endpoint"], r["code"], r["transport"]) for r in records] == [
            ("ws", "INVALID_MESSAGE", "ws"),
            ("ws:sub", "NOT_FOUND", "ws"),
        ]
        assert records[1]["device_type"] == "mobile" and records[1]["trace_id"] == "ws-trace"
        assert recorder.recent(10)[1].user_id == (await app[keys.AUTH].authenticate(token)).id
    finally:
        await server.close()
