"""The HTTP API: login, logout and admin room management under ``/api/v1``."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from aiohttp import web

from actors.db_monitor import RefreshRoom
from app import keys
from app.auth import User, check_username
from app.config import IPNetwork
from app.directory import Member
from app.errors import (
    AppError,
    AuthRequired,
    Conflict,
    Forbidden,
    RateLimited,
    ValidationError,
    log_error,
    render_error,
)
from app.log import get_logger
from app.models import check_room_name

log = get_logger("api")

routes = web.RouteTableDef()

#: Longest username or password a login may carry; longer is a bad request, not a hash job.
MAX_CREDENTIAL_LENGTH = 1024
#: Largest request body the API reads, in bytes; its bodies are a few short fields.
MAX_BODY_BYTES = 64 * 1024


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def json_object(request: web.Request) -> dict[str, Any]:
    """The JSON object in *request*'s body; anything else raises `ValidationError`.

    Every bad body is the same 400 ``INVALID_MESSAGE``, logged at INFO: an empty body, bytes
    that are not UTF-8, malformed JSON, ``NaN`` or ``Infinity``, nesting past the parser's
    recursion limit, an integer past Python's digit limit, a top level that is not an object,
    and a body over `MAX_BODY_BYTES`. The last is a 400 rather than a 413 so that clients get
    the error model, and no more of it is read than the first bytes past the limit.
    """
    declared = request.content_length or 0
    raw = bytearray()
    if declared <= MAX_BODY_BYTES:
        async for chunk in request.content.iter_any():
            raw += chunk
            # A chunked or compressed body declares no (true) length, so counting goes on.
            if len(raw) > MAX_BODY_BYTES:
                break
    if max(declared, len(raw)) > MAX_BODY_BYTES:
        text = f"body over {MAX_BODY_BYTES} bytes"
        raise ValidationError(text, text=text, fields={"body": text})
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        # UnicodeDecodeError and the digit limit's error are ValueErrors too, and json's
        # scanner raises RecursionError for nesting like "[" * 50_000.
        raise ValidationError("body is not JSON", fields={"body": "not JSON"}) from None
    if not isinstance(body, dict):
        raise ValidationError("body is not a JSON object", fields={"body": "not a JSON object"})
    return body


def _string_field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value or len(value) > MAX_CREDENTIAL_LENGTH:
        reason = "missing" if value is None else "not a short string"
        raise ValidationError(f"field {name} {reason}", fields={name: reason})
    return value


def _checked_field(body: dict[str, Any], name: str, check: Callable[[Any], str]) -> str:
    """*body*'s field *name* passed through *check*, whose refusal names the field."""
    try:
        return check(body.get(name))
    except ValidationError as exc:
        raise ValidationError(exc.detail, text=exc.text, fields={name: exc.client_text}) from None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    # A dual-stack socket shows IPv4 peers as ::ffff:a.b.c.d; they are IPv4 clients.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_address(
    peer: str | None, forwarded_for: Iterable[str], trusted: Sequence[IPNetwork]
) -> str:
    """The client's IP address: *peer*, or taken from *forwarded_for* if *peer* is *trusted*.

    *forwarded_for* holds the ``X-Forwarded-For`` values in order, and *trusted* the networks
    of ``HEARTH_TRUSTED_PROXIES``. Each proxy appends the address it got the request from,
    so the client is the right-most address that is not a trusted proxy (the left-most when
    all are); addresses left of it are the client's say, never trusted. A value on the way
    that is not an IP address makes the header worthless: the peer address is used.
    """
    peer_address = _ip(peer or "")
    if peer_address is None:
        return peer or "unknown"
    client = peer_address
    if any(peer_address in network for network in trusted):
        hops = [hop for value in forwarded_for for hop in value.split(",")]
        for hop in reversed(hops):
            address = _ip(hop)
            if address is None:
                return str(peer_address)
            client = address
            if not any(address in network for network in trusted):
                break
    return str(client)


def client_ip(request: web.Request) -> str:
    """*request*'s client address, through the trusted proxies (see `client_address`)."""
    return client_address(
        request.remote,
        request.headers.getall("X-Forwarded-For", ()),
        request.app[keys.SETTINGS].trusted_networks(),
    )


def bearer_token(request: web.Request) -> str:
    """The token of *request*'s ``Authorization: Bearer`` header; raises `AuthRequired`."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthRequired("no bearer token")
    return token.strip()


async def require_admin(request: web.Request) -> User:
    """The admin user *request* authenticates as; raises `AuthFailed` or `Forbidden`."""
    user = await request.app[keys.AUTH].authenticate(bearer_token(request))
    if not user.is_admin:
        raise Forbidden(f"user {user.id} is not an admin")
    return user


@routes.post("/api/v1/auth/login")
async def login(request: web.Request) -> web.Response:
    """``{username, password}`` → ``{token, expires_at, user}``; 401, or 429 with Retry-After."""
    body = await json_object(request)
    username, password = _string_field(body, "username"), _string_field(body, "password")
    auth = request.app[keys.AUTH]
    limiter = request.app[keys.LIMITER]
    try:
        token, expires_at = await auth.login(
            username, password, client_ip=client_ip(request), limiter=limiter
        )
    except RateLimited as exc:
        # trace_middleware renders errors without headers, and a 429 deserves Retry-After.
        log_error(exc, component="api", endpoint=request.path, method=request.method)
        return web.json_response(
            render_error(exc, None),
            status=exc.status,
            headers={"Retry-After": str(exc.retry_after)},
        )
    user = await auth.authenticate(token)
    return web.json_response(
        {"token": token, "expires_at": expires_at, "user": dataclasses.asdict(user)}
    )


@routes.post("/api/v1/auth/logout")
async def logout(request: web.Request) -> web.Response:
    """Revoke the bearer token; it never authenticates again."""
    auth = request.app[keys.AUTH]
    token = bearer_token(request)
    user = await auth.authenticate(token)
    await auth.logout(token)
    log.bind(user_id=user.id).info("logged out")
    return web.json_response({"ok": True})


async def _refresh_directory(request: web.Request, room: str) -> None:
    """Have this instance's room directory see *room*'s change before the reply goes out.

    Other instances learn of it from the NOTIFY the change fired; so does this one, should
    the refresh fail here.
    """
    try:
        await request.app[keys.SUPERVISOR].get("db_monitor").call(RefreshRoom(room))
    except AppError as exc:
        log.bind(topic=f"room:{room}", error=exc.code).warning(
            "room directory not refreshed; the room's notification will do it"
        )


@routes.get("/api/v1/rooms")
async def list_rooms(request: web.Request) -> web.Response:
    """The rooms the bearer may enter, from the in-memory room directory (no query, so it
    answers during a database outage too): ``{rooms: [{name, private, last_seq}]}``."""
    user = await request.app[keys.AUTH].authenticate(bearer_token(request))
    member = Member(user_id=user.id, is_admin=user.is_admin)
    visible = request.app[keys.DIRECTORY].visible_to(member)
    return web.json_response({
        "rooms": [
            {"name": room.name, "private": room.is_private, "last_seq": room.last_seq}
            for room in visible
        ]
    })  # fmt: skip


@routes.post("/api/v1/rooms")
async def create_room(request: web.Request) -> web.Response:
    """Admin only: ``{name, private?}`` → 201 ``{name, private}``; 409 when it exists."""
    admin = await require_admin(request)
    body = await json_object(request)
    name = _checked_field(body, "name", check_room_name)
    private = body.get("private", False)
    if not isinstance(private, bool):
        raise ValidationError("private is not a boolean", fields={"private": "not a boolean"})
    if not await request.app[keys.STORE].create_room(name, private=private):
        raise Conflict(f"room {name} exists", text="room already exists")
    await _refresh_directory(request, name)
    log.bind(user_id=admin.id, topic=f"room:{name}", private=private).info("room created")
    return web.json_response({"name": name, "private": private}, status=201)


@routes.post("/api/v1/rooms/{name}/members")
async def add_room_member(request: web.Request) -> web.Response:
    """Admin only: ``{username}`` joins the room; 404 for an unknown room or user."""
    admin = await require_admin(request)
    room = check_room_name(request.match_info["name"])
    username = _checked_field(await json_object(request), "username", check_username)
    # The room_members trigger's NOTIFY refreshes every server's room directory.
    await request.app[keys.STORE].add_room_member(room, username)
    await _refresh_directory(request, room)
    log.bind(user_id=admin.id, topic=f"room:{room}", member=username).info("room member added")
    return web.json_response({"room": room, "username": username})
