"""The WebSocket endpoint: origin check, auth, frame parsing and one ctrl per request."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from aiohttp import WSMsgType, web
from yarl import URL

from actors.hub import (
    CatchUp,
    History,
    Hub,
    Join,
    Leave,
    PresenceQuery,
    Publish,
    Subscribe,
    Unsubscribe,
    count_error,
)
from app import keys, metrics
from app.connection import CLOSE_POLICY, Connection, Limits
from app.errors import (
    AppError,
    AuthFailed,
    AuthRequired,
    NotFound,
    RateLimited,
    ServerShutdown,
    ValidationError,
    ctrl_frame,
    log_error,
    render_error,
)
from app.log import get_logger, trace_context
from app.models import Message
from app.protocol import DEFAULT_HISTORY_LIMIT, BadFrame, Request, encode, parse_request
from app.ratelimit import KeyedBuckets, TokenBucket

log = get_logger("ws")

routes = web.RouteTableDef()

#: Failed auth attempts after which the socket is closed with 1008.
MAX_AUTH_FAILURES = 3


def origin_allowed(request: web.Request, allowed: str) -> bool:
    """Whether *request*'s Origin may open a WebSocket under the *allowed* setting.

    Empty *allowed* means same-origin only; ``*`` allows any. A request without Origin is
    not from a browser page, so cross-site hijacking does not apply to it.
    """
    origin = request.headers.get("Origin")
    if origin is None or allowed.strip() == "*":
        return True
    if allowed.strip():
        return origin.rstrip("/") in {o.strip().rstrip("/") for o in allowed.split(",")}
    try:
        parsed = URL(origin)
    except ValueError:
        return False
    return parsed.host is not None and parsed.authority == request.host


class Session:
    """One client's request loop: auth state, rate limits, and dispatch to the hub."""

    def __init__(self, app: web.Application, connection: Connection) -> None:
        settings = app[keys.SETTINGS]
        self.app = app
        self.connection = connection
        self.hub: Hub = app[keys.SUPERVISOR].get("hub")  # type: ignore[assignment]
        self.authenticated = asyncio.Event()
        self.auth_failures = 0
        self.publish_bucket = TokenBucket(settings.pub_rate, settings.pub_burst)
        self.user_buckets: KeyedBuckets = app[keys.USER_PUBLISH_BUCKETS]
        self.max_content_length = settings.max_content_length

    def reply(
        self, request_id: str | None, code: int, text: str, params: dict[str, Any] | None = None
    ) -> None:
        """Queue the one ctrl frame that answers *request_id*."""
        self.connection.offer(encode(ctrl_frame(request_id, code, text, params)))

    def reply_error(self, exc: BaseException, request_id: str | None) -> None:
        """Answer *request_id* with *exc* rendered safely, logging it at its level."""
        count_error(exc)
        log_error(
            exc, component="ws", client_id=self.connection.id, user_id=self.connection.user_id
        )
        self.connection.offer(encode(render_error(exc, request_id)))

    async def handle_text(self, text: str) -> None:
        """Parse one text frame and answer it with exactly one ctrl."""
        try:
            request = parse_request(text)
        except BadFrame as exc:
            with trace_context():
                self.reply_error(exc, exc.request_id)
            return
        with trace_context(request.trace_id):
            try:
                await self.dispatch(request)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.reply_error(exc, request.id)

    async def dispatch(self, request: Request) -> None:
        """Serve *request*; raises an `AppError` for the caller to render."""
        if request.op == "auth":
            await self.auth(request)
            return
        if not self.authenticated.is_set():
            raise AuthRequired()
        handler = getattr(self, f"op_{request.op}")
        await handler(request)

    async def auth(self, request: Request) -> None:
        """``auth {token}``: authenticate the connection; 3 failures close it with 1008."""
        authenticator = self.app[keys.AUTH]
        try:
            user = await authenticator.authenticate(request.fields["token"])
        except AuthFailed:
            self.auth_failures += 1
            if self.auth_failures >= MAX_AUTH_FAILURES:
                self.reply_error(AuthFailed(), request.id)
                self.connection.shut(CLOSE_POLICY, "too many failed auth attempts")
                return
            raise
        connection = self.connection
        connection.user_id, connection.username, connection.is_admin = (
            user.id,
            user.username,
            user.is_admin,
        )
        self.authenticated.set()
        log.bind(client_id=connection.id, user_id=user.id).info("client authenticated")
        self.reply(request.id, 200, "ok", {"user": {"id": user.id, "username": user.username}})

    async def op_ping(self, request: Request) -> None:
        """``ping``: answer pong."""
        self.reply(request.id, 200, "pong")

    async def op_sub(self, request: Request) -> None:
        """``sub {topic, since?}``: subscribe, answer the latest seq, then send what was missed."""
        topic = request.topic()
        since = request.fields.get("since") if topic.is_room else None
        seq = await self.hub.request(Subscribe(self.connection, topic, since))
        self.reply(request.id, 200, "ok", {"seq": seq} if topic.is_room else None)
        if since is not None:
            await self.hub.request(CatchUp(self.connection, topic, since))

    async def op_unsub(self, request: Request) -> None:
        """``unsub {topic}``: end a subscription; 404 when there was none."""
        if not await self.hub.call(Unsubscribe(self.connection, request.topic())):
            raise NotFound(text="not subscribed")
        self.reply(request.id, 200, "ok")

    async def op_pub(self, request: Request) -> None:
        """``pub {topic, content, client_msg_id}``: 200 {id, seq} stored, 202 {id, queued} spooled."""
        topic = request.topic()
        if not topic.is_room:
            raise ValidationError(text="status topics are read-only")
        if self.app[keys.DRAINING]["draining"]:
            raise ServerShutdown(retry_after=5)
        message = Message.accept(
            room=topic.name,
            sender=self.connection.username or "",
            content=request.fields["content"],
            client_msg_id=request.fields["client_msg_id"],
            max_length=self.max_content_length,
            trace_id=request.trace_id,
        )
        self._take_publish_tokens()
        result = await self.hub.request(Publish(self.connection, message))
        if result.queued:
            self.reply(request.id, 202, "accepted", result.reply)
        else:
            self.reply(request.id, 200, "ok", result.reply)

    def _take_publish_tokens(self) -> None:
        wait = self.publish_bucket.take()
        if wait == 0:
            wait = self.user_buckets.take(self.connection.user_id or "")
            if wait > 0:
                # Give back the connection's token: the publish is refused as a whole.
                self.publish_bucket.tokens += 1
        if wait > 0:
            raise RateLimited(retry_after=max(1, int(wait + 0.999)))

    async def op_history(self, request: Request) -> None:
        """``history {topic, before?|since?, limit}``: data frames, then ctrl 200 with count."""
        topic = request.topic()
        if not topic.is_room:
            raise ValidationError(text="history is kept for rooms only")
        fields = request.fields
        page = await self.hub.request(
            History(
                self.connection,
                topic.name,
                since=fields.get("since"),
                before=fields.get("before"),
                limit=fields.get("limit", DEFAULT_HISTORY_LIMIT),
            )
        )
        self.reply(request.id, 200, "ok", {"count": len(page)})

    async def op_presence(self, request: Request) -> None:
        """``presence {topic}``: the users online in a room on this instance."""
        topic = request.topic()
        if not topic.is_room:
            raise ValidationError(text="presence is kept for rooms only")
        users = await self.hub.call(PresenceQuery(topic))
        self.reply(request.id, 200, "ok", {"users": users})


@routes.get("/ws")
async def websocket(request: web.Request) -> web.StreamResponse:
    """Serve one client until it leaves, is dropped, or the server shuts down."""
    app = request.app
    settings = app[keys.SETTINGS]
    if not origin_allowed(request, settings.allowed_origins):
        log.bind(origin=request.headers.get("Origin")).warning("cross-site WebSocket refused")
        raise web.HTTPForbidden(text="origin not allowed")
    if app[keys.DRAINING]["draining"]:
        raise web.HTTPServiceUnavailable(text="server shutting down", headers={"Retry-After": "5"})
    ws = web.WebSocketResponse(
        compress=settings.ws_compress,
        max_msg_size=settings.ws_max_msg_size,
        heartbeat=settings.ws_ping_interval,
    )
    await ws.prepare(request)
    if settings.ws_send_buffer:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.ws_send_buffer)
    connection = Connection(
        ws.send_str,
        ws.close,
        limits=Limits(
            max_messages=settings.client_queue_messages,
            max_bytes=settings.client_queue_bytes,
            warn_ratio=settings.client_queue_warn_ratio,
            send_timeout=settings.send_timeout,
        ),
    )
    session = Session(app, connection)
    sockets = app[keys.WEBSOCKETS]
    auth_deadline = asyncio.get_running_loop().call_later(
        settings.auth_timeout, _auth_timeout, session
    )
    unexpected = False
    try:
        sockets.add(ws)
        connection.start()
        session.hub.cast(Join(connection))
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await session.handle_text(message.data)
            elif message.type is WSMsgType.BINARY:
                session.reply_error(BadFrame("binary frames are not supported"), None)
            elif message.type is WSMsgType.ERROR:
                metrics.WS_READ_ERRORS.inc()
                log.bind(client_id=connection.id, error=type(ws.exception()).__name__).warning(
                    "read error"
                )
                unexpected = True
                break
        if ws.close_code is None or ws.close_code == 1006:
            unexpected = not connection.closed
    except (ConnectionResetError, asyncio.CancelledError) as exc:
        unexpected = not connection.closed
        if isinstance(exc, asyncio.CancelledError):
            raise
    finally:
        auth_deadline.cancel()
        sockets.discard(ws)
        try:
            session.hub.cast(Leave(connection, unexpected=unexpected))
        except AppError as exc:
            log.bind(client_id=connection.id, error=exc.code).error("hub refused a leave")
        await connection.closed_by_peer()
    return ws


def _auth_timeout(session: Session) -> None:
    if not session.authenticated.is_set():
        log.bind(client_id=session.connection.id).info("no auth in time; closing")
        session.connection.shut(CLOSE_POLICY, "authentication timeout")


__all__ = ["origin_allowed", "routes", "websocket", "Session"]
