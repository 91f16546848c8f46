"""The operator dashboard at ``/dashboard``: a sub-application that shows the diagnostics snapshot."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import secrets
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp_jinja2
import jinja2
from aiohttp import hdrs, web

from app import admin, keys
from app.api import client_address
from app.auth import User
from app.diagnostics import take_snapshot
from app.errors import AppError, AuthFailed, AuthRequired, Forbidden, RateLimited, log_error
from app.log import get_logger, trace_id_var
from app.vitals import RATE_POINTS

log = get_logger("dashboard")

#: The dashboard's templates live in ``templates/dashboard/`` beside the other pages.
TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
#: Where the dashboard is mounted; its cookies are scoped to this path.
PREFIX = "/dashboard"
#: The session cookie: the login token itself (HttpOnly, SameSite=Strict, Path=/dashboard).
SESSION_COOKIE = "hearth_dashboard"
#: A signed one-shot note for the page a form POST redirects to.
FLASH_COOKIE = "hearth_dashboard_flash"
#: Seconds a flash note waits for the page that shows it.
FLASH_MAX_AGE = 60
#: Longest flash text kept; operator notes, not documents.
MAX_FLASH = 300
#: Longest username or password the login form takes.
MAX_CREDENTIAL = 1024
#: Form field and header carrying the CSRF token of every POST but the login.
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
#: Milliseconds between the page's polls of ``snapshot.json``.
POLL_MS = 1500
#: The sparklines' drawing box (SVG user units).
SPARK_WIDTH = 120
SPARK_HEIGHT = 32
#: The live charts: a `RatePoint` field and its label, in page order.
CHARTS: tuple[tuple[str, str], ...] = (
    ("connections", "Connections"),
    ("messages_in", "Messages in /s"),
    ("messages_out", "Messages out /s"),
    ("deliveries", "Deliveries /s"),
    ("requests", "Requests /s"),
    ("server_errors", "Server errors /s"),
)
#: Sent with every dashboard response, errors and redirects included.
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
#: Routes served without a session: the login form and its POST.
PUBLIC_ROUTES = frozenset({"login", "login_submit"})

#: The admin a request's session belongs to.
USER: web.RequestKey[User] = web.RequestKey("dashboard_user")
#: The session token of the request (its cookie).
SESSION: web.RequestKey[str] = web.RequestKey("dashboard_session")

routes = web.RouteTableDef()


class CsrfRefused(Forbidden):
    """A POST without a valid CSRF token, or from another origin."""

    text = "request refused: reload the page and try again"


def create_dashboard(parent: web.Application) -> web.Application:
    """The dashboard sub-application of *parent*, to mount with ``add_subapp(PREFIX, ...)``.

    Sessions: the login form exchanges an admin's credentials for a login token, kept only
    in the HttpOnly ``hearth_dashboard`` cookie. CSRF: every POST must come from this
    origin (``Origin``, else ``Referer``, when present must name the Host), and every POST
    but the login carries ``csrf`` (form field or ``X-CSRF-Token``), the HMAC of the
    session token under a per-process key. The login form needs no token: there is no
    session to ride yet, and a forged login is refused by the origin check. Because the
    key is per process, a page posts back to the instance that rendered it, which is the
    instance it shows anyway.
    """
    dashboard = web.Application(middlewares=[session_middleware])
    dashboard[keys.DASHBOARD_PARENT] = parent
    dashboard[keys.DASHBOARD_SECRET] = secrets.token_bytes(32)
    dashboard.add_routes(routes)
    aiohttp_jinja2.setup(
        dashboard,
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=jinja2.select_autoescape(["html"], default_for_string=True, default=True),
        filters={"show": show},
        default_helpers=False,
    )
    dashboard.on_response_prepare.append(_security_headers)
    return dashboard


# -- formatting, shared in spirit with app/static/dashboard.js -------------------------------


def format_number(value: float) -> str:
    """*value* with at most one decimal, as the page's script writes it."""
    rounded = round(float(value), 1)
    return str(int(rounded)) if rounded == int(rounded) else str(rounded)


def format_duration(seconds: float) -> str:
    """*seconds* as its two largest units: ``3d 4h``, ``2h 5m``, ``4m 10s``, ``12s``."""
    total = int(max(0.0, float(seconds)))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def format_bytes(count: float) -> str:
    """*count* bytes in B, KiB, MiB or GiB."""
    value = float(count)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{format_number(value)} {unit}"
        value /= 1024
    return f"{format_number(value)} GiB"


def show(value: Any, fmt: str = "text") -> str:
    """*value* as the page shows it in format *fmt* (text, number, duration, ms, bytes,
    share, yesno, list); ``—`` for None."""
    if value is None:
        return "—"
    if fmt == "number":
        return format_number(value)
    if fmt == "duration":
        return format_duration(value)
    if fmt == "ms":
        return f"{format_number(value)} ms"
    if fmt == "bytes":
        return format_bytes(value)
    if fmt == "share":
        return f"{format_number(value * 100)}%"
    if fmt == "yesno":
        return "yes" if value else "no"
    if fmt == "list":
        return ", ".join(str(item) for item in value) or "none"
    return str(value)


def sparkline(values: Sequence[float]) -> str:
    """SVG polyline points for *values*, the newest at the right edge, scaled to the peak."""
    if not values:
        return ""
    peak = max(max(values), 1e-9)
    step = SPARK_WIDTH / (RATE_POINTS - 1)
    start = SPARK_WIDTH - (len(values) - 1) * step
    usable = SPARK_HEIGHT - 2
    return " ".join(
        f"{start + index * step:.1f},{SPARK_HEIGHT - 1 - (value / peak) * usable:.1f}"
        for index, value in enumerate(values)
    )


def charts(rates: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The live charts of the snapshot's *rates*: key, label, points, latest and peak."""
    drawn = []
    for key, label in CHARTS:
        values = [float(point[key]) for point in rates]
        drawn.append(
            {
                "key": key,
                "label": label,
                "points": sparkline(values),
                "latest": values[-1] if values else 0.0,
                "peak": max(values) if values else 0.0,
            }
        )
    return drawn


# -- sessions, CSRF and the origin check ---------------------------------------------------------


def csrf_token(secret: bytes, session: str) -> str:
    """The CSRF token of *session*: its HMAC-SHA256 under the per-process *secret*."""
    return hmac.new(secret, session.encode(), hashlib.sha256).hexdigest()


def same_origin(request: web.Request) -> bool:
    """Whether *request*'s ``Origin`` (else ``Referer``) names its Host; True when absent."""
    origin = request.headers.get(hdrs.ORIGIN) or request.headers.get(hdrs.REFERER)
    if origin is None:
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == request.host.lower()


def wants_json(request: web.Request) -> bool:
    """Whether *request* is the page's script (JSON) rather than a browser navigation (HTML)."""
    if request.match_info.route.name == "snapshot":
        return True
    accept = request.headers.get(hdrs.ACCEPT, "")
    return "application/json" in accept and "text/html" not in accept


async def _submitted_csrf(request: web.Request) -> str:
    header = request.headers.get(CSRF_HEADER)
    if header:
        return header
    form = await request.post()
    value = form.get(CSRF_FIELD)
    return value if isinstance(value, str) else ""


async def _session_user(request: web.Request) -> tuple[User, str]:
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        raise AuthRequired("no dashboard session")
    auth = request.config_dict[keys.DASHBOARD_PARENT][keys.AUTH]
    user = await auth.authenticate(token)
    if not user.is_admin:
        raise Forbidden(f"user {user.id} is not an admin", text="administrators only")
    return user, token


@web.middleware
async def session_middleware(request: web.Request, handler: Callable[..., Awaitable[Any]]):
    """Let admins in: a session for every route but the login, CSRF and origin checks on
    every POST, and errors as a small HTML page (or JSON for the page's script)."""
    try:
        if request.method == "POST" and not same_origin(request):
            raise CsrfRefused(f"cross-origin POST from {request.headers.get(hdrs.ORIGIN)!r}")
        if request.match_info.route.name not in PUBLIC_ROUTES:
            try:
                user, token = await _session_user(request)
            except (AuthRequired, AuthFailed) as exc:
                return _signed_out(request, exc)
            request[USER], request[SESSION] = user, token
            if request.method == "POST":
                expected = csrf_token(request.config_dict[keys.DASHBOARD_SECRET], token).encode()
                submitted = (await _submitted_csrf(request)).encode("utf-8", "replace")
                if not hmac.compare_digest(submitted, expected):
                    raise CsrfRefused("missing or wrong CSRF token")
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error_page(request, exc.status, _HTTP_TEXTS.get(exc.status, exc.reason), exc)
    except AppError as exc:
        log_error(exc, component="dashboard", endpoint=request.path, method=request.method)
        return _error_page(request, exc.status, exc.client_text, exc)


#: Texts of the aiohttp errors a dashboard request may meet.
_HTTP_TEXTS = {404: "There is no such page.", 405: "That method is not allowed here."}


def _signed_out(request: web.Request, exc: AppError) -> web.Response:
    """No valid session: a navigation goes to the login form; the script or a POST gets 401."""
    if request.method in ("GET", "HEAD") and not wants_json(request):
        response = _see_other(f"{PREFIX}/login")
    else:
        response = _error_page(request, 401, "Your session has ended; log in again.", exc)
    if SESSION_COOKIE in request.cookies:
        response.del_cookie(SESSION_COOKIE, path=PREFIX)
    return response


def _error_page(
    request: web.Request, status: int, text: str, exc: BaseException | None = None
) -> web.Response:
    trace_id = trace_id_var.get()
    headers = {}
    if isinstance(exc, web.HTTPException) and hdrs.ALLOW in exc.headers:
        headers[hdrs.ALLOW] = exc.headers[hdrs.ALLOW]
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers[hdrs.RETRY_AFTER] = str(max(1, math.ceil(retry_after)))
    if wants_json(request):
        code = exc.code if isinstance(exc, AppError) else f"HTTP_{status}"
        body = {"ok": False, "code": code, "message": text, "trace_id": trace_id}
        return web.json_response(body, status=status, headers=headers)
    context = {
        "status": status,
        "text": text,
        "trace_id": trace_id,
        "signed_in": USER in request,
        "prefix": PREFIX,
    }
    response = aiohttp_jinja2.render_template(
        "dashboard/error.html", request, context, status=status
    )
    response.headers.update(headers)
    return response


def _see_other(location: str) -> web.Response:
    # Returned rather than raised: the response passes the middlewares as it is.
    return web.Response(status=303, headers={hdrs.LOCATION: location})


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value


# -- flash notes -------------------------------------------------------------------------------


def _flash_value(secret: bytes, ok: bool, text: str) -> str:
    # Unpadded: ``=`` would make the cookie value a quoted string.
    note = json.dumps({"ok": ok, "text": text[:MAX_FLASH]}).encode()
    payload = base64.urlsafe_b64encode(note).decode().rstrip("=")
    return f"{payload}.{hmac.new(secret, payload.encode(), hashlib.sha256).hexdigest()}"


def _read_flash(secret: bytes, value: str | None) -> dict[str, Any] | None:
    if not value or "." not in value:
        return None
    payload, _, signature = value.rpartition(".")
    expected = hmac.new(secret, payload.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(signature.encode("utf-8", "replace"), expected.encode()):
        return None
    try:
        note = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except ValueError:
        return None
    return {"ok": bool(note.get("ok")), "text": str(note.get("text", ""))[:MAX_FLASH]}


# -- the pages ---------------------------------------------------------------------------------


@routes.get("/login", name="login")
async def login_form(request: web.Request) -> web.Response:
    """The login form."""
    return _render_login(request, message=None)


def _render_login(
    request: web.Request, *, message: str | None, status: int = 200, username: str = ""
) -> web.Response:
    context = {"message": message, "username": username, "prefix": PREFIX}
    return aiohttp_jinja2.render_template("dashboard/login.html", request, context, status=status)


@routes.post("/login", name="login_submit")
async def login(request: web.Request) -> web.Response:
    """Exchange an admin's ``username`` and ``password`` for the session cookie.

    A wrong password re-renders the form (401), a throttled one too (429 with
    Retry-After); a user who is not an admin gets a 403 page and the token is revoked.
    """
    parent = request.config_dict[keys.DASHBOARD_PARENT]
    form = await request.post()
    username, password = form.get("username"), form.get("password")
    if not isinstance(username, str) or not isinstance(password, str):
        return _render_login(request, message="Enter a username and a password.", status=400)
    username = username.strip()[:MAX_CREDENTIAL]
    auth = parent[keys.AUTH]
    ip = client_address(
        request.remote,
        request.headers.getall("X-Forwarded-For", ()),
        parent[keys.SETTINGS].trusted_networks(),
    )
    try:
        if len(password) > MAX_CREDENTIAL:
            raise AuthFailed("password too long")
        token, expires_at = await auth.login(
            username, password, client_ip=ip, limiter=parent[keys.LIMITER]
        )
    except RateLimited as exc:
        wait = max(1, math.ceil(exc.retry_after or 1))
        response = _render_login(
            request,
            message=f"Too many attempts. Try again in {wait} s.",
            status=429,
            username=username,
        )
        response.headers[hdrs.RETRY_AFTER] = str(wait)
        return response
    except AuthFailed:
        return _render_login(
            request, message="Wrong username or password.", status=401, username=username
        )
    user = await auth.authenticate(token)
    if not user.is_admin:
        await auth.logout(token)
        log.bind(username=user.username, client_ip=ip).warning("dashboard refused a non-admin")
        return _error_page(request, 403, "The dashboard is for administrators only.")
    lifetime = datetime.fromisoformat(expires_at) - datetime.now(UTC)
    response = _see_other(f"{PREFIX}/")
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=max(0, int(lifetime.total_seconds())),
        path=PREFIX,
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    log.bind(username=user.username, client_ip=ip).info("dashboard login")
    return response


@routes.post("/logout", name="logout")
async def logout(request: web.Request) -> web.Response:
    """Revoke the session's token and clear its cookie."""
    await request.config_dict[keys.DASHBOARD_PARENT][keys.AUTH].logout(request[SESSION])
    response = _see_other(f"{PREFIX}/login")
    response.del_cookie(SESSION_COOKIE, path=PREFIX)
    return response


@routes.get("", name="overview")
@routes.get("/", name="overview_slash")
async def overview(request: web.Request) -> web.Response:
    """The one page: every section, server-rendered from the snapshot, read with JS off."""
    secret = request.config_dict[keys.DASHBOARD_SECRET]
    data = take_snapshot(request.config_dict[keys.DASHBOARD_PARENT]).as_dict()
    flash = _read_flash(secret, request.cookies.get(FLASH_COOKIE))
    context = {
        "s": data,
        "charts": charts(data["rates"]),
        "user": request[USER],
        "csrf": csrf_token(secret, request[SESSION]),
        "flash": flash,
        "prefix": PREFIX,
        "poll_ms": POLL_MS,
        "spark_width": SPARK_WIDTH,
        "spark_height": SPARK_HEIGHT,
    }
    response = aiohttp_jinja2.render_template("dashboard/overview.html", request, context)
    if FLASH_COOKIE in request.cookies:
        response.del_cookie(FLASH_COOKIE, path=PREFIX)
    return response


@routes.get("/snapshot.json", name="snapshot")
async def snapshot(request: web.Request) -> web.Response:
    """The diagnostics snapshot as JSON, which the page polls."""
    return web.json_response(take_snapshot(request.config_dict[keys.DASHBOARD_PARENT]).as_dict())


# -- the actions -------------------------------------------------------------------------------


async def _act(
    request: web.Request, section: str, action: Callable[[], Awaitable[str]], failed: str
) -> web.Response:
    """Run *action* (its result is the note to show); the page's script gets JSON, a plain
    form a 303 back to *section* with a flash note."""
    try:
        text, ok, status = await action(), True, 200
    except AppError as exc:
        log_error(exc, component="dashboard", endpoint=request.path, method=request.method)
        text, ok, status = f"{failed}: {exc.client_text}", False, exc.status
    if wants_json(request):
        return web.json_response({"ok": ok, "message": text}, status=status)
    response = _see_other(f"{PREFIX}/#{section}")
    response.set_cookie(
        FLASH_COOKIE,
        _flash_value(request.config_dict[keys.DASHBOARD_SECRET], ok, text),
        max_age=FLASH_MAX_AGE,
        path=PREFIX,
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    return response


@routes.post("/actors/{name}/restart", name="restart_actor")
async def restart_actor(request: web.Request) -> web.Response:
    """Restart one actor (see `app.admin.restart_actor`)."""
    name = request.match_info["name"]

    async def restart() -> str:
        admin.restart_actor(
            request.config_dict[keys.DASHBOARD_PARENT], name, by=request[USER].username
        )
        return f"Restarting {name}."

    return await _act(request, "actors", restart, f"Could not restart {name}")


@routes.post("/breakers/{source}/reset", name="reset_breaker")
async def reset_breaker(request: web.Request) -> web.Response:
    """Close a status feed's breaker (see `app.admin.reset_breaker`)."""
    source = request.match_info["source"]

    async def reset() -> str:
        await admin.reset_breaker(
            request.config_dict[keys.DASHBOARD_PARENT], source, by=request[USER].username
        )
        return f"Breaker of {source} reset."

    return await _act(request, "feeds", reset, f"Could not reset {source}")


@routes.post("/maintenance", name="maintenance")
async def maintenance(request: web.Request) -> web.Response:
    """Turn maintenance on (``on=1``, optional ``reason``) or off (``on=0``)."""
    form = await request.post()
    on = form.get("on") == "1"
    reason = form.get("reason")

    async def toggle() -> str:
        await admin.set_maintenance(
            request.config_dict[keys.DASHBOARD_PARENT],
            on,
            by=request[USER].username,
            reason=reason if isinstance(reason, str) else "",
        )
        return "Maintenance mode on: readiness answers 503." if on else "Maintenance mode off."

    return await _act(request, "maintenance", toggle, "Could not change maintenance mode")
