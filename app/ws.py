"""The WebSocket endpoint and the Session every transport serves requests through."""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import Coroutine
from typing import Any

from aiohttp import WSMsgType, web
from yarl import URL

from actors.hub import (
    Filled,
    FillFailed,
    Hub,
    Join,
    Leave,
    PresenceQuery,
    Subscribe,
    Unsubscribe,
    count_error,
)
from actors.redis_bridge import OnlineUsers
from actors.room_writer import Publish, RoomWriter, shard_of
from app import keys, metrics
from app.analytics import record_error
from app.auth import User
from app.config import Settings
from app.connection import CLOSE_POLICY, CLOSE_TRY_AGAIN_LATER, Connection, Limits, Reply
from app.directory import Member
from app.errors import (
    AppError,
    AtCapacity,
    AuthFailed,
    AuthRequired,
    NotFound,
    RateLimited,
    RequestTimeout,
    ServerShutdown,
    ServiceUnavailable,
    ValidationError,
    log_error,
)
from app.host import connection_limit
from app.log import get_logger, trace_context
from app.models import Message
from app.protocol import (
    DEFAULT_HISTORY_LIMIT,
    BadFrame,
    Request,
    Topic,
    data_frame,
    encode,
    parse_request,
)
from app.ratelimit import USER_PUBLISH_SCOPE, KeyedBuckets, TokenBucket

log = get_logger("ws")

routes = web.RouteTableDef()

#: Failed auth attempts after which the socket is closed with 1008.
MAX_AUTH_FAILURES = 3
#: Messages read from the store per catch-up or gap-repair page.
FILL_PAGE = 100
#: Seconds a request may take beyond the database deadline before it is answered 504.
REQUEST_MARGIN = 1.0
#: Requests of one client served at once; the next frame is read when one finishes.
MAX_REQUESTS_IN_FLIGHT = 8


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


def open_clients(app: web.Application) -> int:
    """Clients connected to this process, on every transport (WebSockets and event streams)."""
    return len(app[keys.WEBSOCKETS]) + len(app[keys.EVENT_STREAMS])


def check_capacity(app: web.Application) -> None:
    """Refuse a new client with `AtCapacity` (503) once `open_clients` reached the limit."""
    limit = connection_limit(app[keys.SETTINGS])
    if open_clients(app) >= limit:
        log.bind(limit=limit).warning("connection limit reached; client refused")
        raise AtCapacity(f"{limit} connections", retry_after=5)


def client_limits(settings: Settings) -> Limits:
    """The slow-client bounds of every client connection under *settings*."""
    return Limits(
        max_messages=settings.client_queue_messages,
        max_bytes=settings.client_queue_bytes,
        warn_ratio=settings.client_queue_warn_ratio,
        send_timeout=settings.send_timeout,
    )


class Session:
    """One client's request loop: auth state, rate limits, and dispatch to the actors.

    The same for every transport: a WebSocket's frames come through `receive`, a
    ``POST /api/v1/rpc`` through `submit` with a `Reply` that answers the HTTP request;
    *transport* (``ws`` or ``sse``) labels its counts and error events.
    Every request gets exactly one ctrl, within one deadline (the database timeout plus
    `REQUEST_MARGIN`). Reads a client needs (catch-up, history, gap repair) go to the
    store from here, after the access check against the in-memory room directory. The
    session owns the gap-repair tasks it starts and ends them when the client leaves.
    """

    # One per client: no per-instance dict.
    __slots__ = (
        "app", "connection", "hub", "writers", "store", "directory", "status_topics",
        "authenticated", "auth_failures", "publish_bucket", "user_buckets",
        "max_content_length", "deadline", "repairs", "requests", "closing", "auth_deadline",
        "authenticating", "user_agent", "transport",
    )  # fmt: skip

    def __init__(
        self, app: web.Application, connection: Connection, *, transport: str = "ws"
    ) -> None:
        settings = app[keys.SETTINGS]
        supervisor = app[keys.SUPERVISOR]
        self.app = app
        self.connection = connection
        self.hub: Hub = supervisor.get("hub")  # type: ignore[assignment]
        self.writers: list[RoomWriter] = [
            supervisor.get(f"room_writer.{index}")  # type: ignore[misc]
            for index in range(settings.room_writers)
        ]
        self.store = app[keys.STORE]
        self.directory = app[keys.DIRECTORY]
        self.status_topics = app[keys.STATUS_TOPICS]
        #: Set by a successful ``auth``.
        self.authenticated = False
        self.auth_failures = 0
        self.publish_bucket = TokenBucket(settings.pub_rate, settings.pub_burst)
        self.user_buckets: KeyedBuckets = app[keys.USER_PUBLISH_BUCKETS]
        self.max_content_length = settings.max_content_length
        #: One deadline for every request, in seconds.
        self.deadline = settings.db_timeout + REQUEST_MARGIN
        #: Gap repairs under way, by room topic; each is a task this session owns.
        self.repairs: dict[str, asyncio.Task[None]] = {}
        #: Requests being served beside the read loop (see `receive`); made on demand.
        self.requests: set[asyncio.Task[None]] | None = None
        #: Closes the client if no ``auth`` succeeds in time; cancelled by the first that does.
        self.auth_deadline: asyncio.TimerHandle | None = None
        #: True while an ``auth`` waits for its answer (say, on a slow database).
        self.authenticating = False
        #: Set once the client left: no new repair starts.
        self.closing = False
        #: The upgrade request's User-Agent, for the error events of this client.
        self.user_agent: str | None = None
        #: ``ws`` or ``sse``: the label of this client's counts and error events.
        self.transport = transport
        connection.on_gap = self.repair_gap

    def reply_error(self, exc: BaseException, request_id: str | None) -> None:
        """Answer *request_id* with *exc* rendered safely, logging it at its level."""
        self._log_error(exc)
        Reply(self.connection, request_id, transport=self.transport).send_error(exc)

    def _log_error(self, exc: BaseException, op: str | None = None) -> None:
        count_error(exc)
        log_error(
            exc, component=self.transport, client_id=self.connection.id,
            user_id=self.connection.user_id,
        )  # fmt: skip
        transport = self.transport
        record_error(
            self.app.get(keys.ERRORS), exc, transport=transport,
            endpoint=f"{transport}:{op}" if op else transport,
            user_agent=self.user_agent, user_id=self.connection.user_id,
        )  # fmt: skip

    async def receive(self, text: str) -> None:
        """Take one text frame: ``auth`` and anything before it are served in turn, the
        rest beside the read loop, up to `MAX_REQUESTS_IN_FLIGHT` at once.

        Each request's first step (its cast to an actor) runs in arrival order, so one
        client's publishes to a room keep their order.
        """
        try:
            request = parse_request(text)
        except BadFrame as exc:
            with trace_context():
                self.reply_error(exc, exc.request_id)
            return
        if request.op == "auth" or not self.authenticated:
            await self.handle(request)
            return
        await self.submit(request)

    async def submit(self, request: Request, reply: Reply | None = None) -> asyncio.Task[None]:
        """Start serving *request* beside the caller, once fewer than
        `MAX_REQUESTS_IN_FLIGHT` of this session's are; returns its task, which the session
        owns (`close` ends it). *reply* is as for `handle`.
        """
        if self.requests is None:
            self.requests = set()
        requests = self.requests
        while len(requests) >= MAX_REQUESTS_IN_FLIGHT:
            await asyncio.wait(requests, return_when=asyncio.FIRST_COMPLETED)
        task = asyncio.create_task(self.handle(request, reply))
        requests.add(task)
        task.add_done_callback(self._request_done)
        return task

    def _request_done(self, task: asyncio.Task[None]) -> None:
        if self.requests is not None:
            self.requests.discard(task)
            if not self.requests:
                self.requests = None  # an idle client keeps no empty set

    async def handle(self, request: Request, reply: Reply | None = None) -> None:
        """Serve *request* with exactly one ctrl, within the session's deadline.

        The ctrl goes through *reply*, by default one onto this client's connection.
        """
        with trace_context(request.trace_id):
            if reply is None:
                reply = Reply(self.connection, request.id, transport=self.transport)
            try:
                async with asyncio.timeout(self.deadline):
                    await self.dispatch(request, reply)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, TimeoutError) and not isinstance(exc, AppError):
                    exc = RequestTimeout(f"{request.op} took longer than {self.deadline}s")
                if reply.claim():
                    self._log_error(exc, request.op)
                    reply.send_error(exc)
                else:
                    log.bind(client_id=self.connection.id, error=type(exc).__name__).info(
                        "request failed after it was answered"
                    )

    async def dispatch(self, request: Request, reply: Reply) -> None:
        """Serve *request*, answering through *reply*; raises an `AppError` to answer with."""
        if request.op == "auth":
            await self.auth(request, reply)
            return
        if not self.authenticated:
            raise AuthRequired()
        handler = getattr(self, f"op_{request.op}")
        await handler(request, reply)

    def member(self) -> Member:
        """Who this connection is, for room access checks."""
        assert self.connection.user_id is not None  # only authenticated sessions get here
        return Member(user_id=self.connection.user_id, is_admin=self.connection.is_admin)

    async def auth(self, request: Request, reply: Reply) -> None:
        """``auth {token}``: authenticate the connection; 3 failures close it with 1008."""
        authenticator = self.app[keys.AUTH]
        self.authenticating = True
        try:
            user = await authenticator.authenticate(request.fields["token"])
        except AuthFailed:
            self.auth_failures += 1
            if self.auth_failures >= MAX_AUTH_FAILURES and reply.claim():
                self.reply_error(AuthFailed(), request.id)
                self.connection.shut(CLOSE_POLICY, "too many failed auth attempts")
                return
            raise
        finally:
            self.authenticating = False
        self.sign_in(user)
        reply.answer(200, "ok", {"user": {"id": user.id, "username": user.username}})

    def sign_in(self, user: User) -> None:
        """Serve this client as *user* from now on (a transport that authenticated it)."""
        connection = self.connection
        connection.user_id, connection.username, connection.is_admin = (
            user.id,
            user.username,
            user.is_admin,
        )
        self.authenticated = True
        if self.auth_deadline is not None:
            self.auth_deadline.cancel()
            self.auth_deadline = None
        log.bind(client_id=connection.id, user_id=user.id).debug("client authenticated")

    async def op_ping(self, request: Request, reply: Reply) -> None:
        """``ping``: answer pong."""
        reply.answer(200, "pong")

    async def op_sub(self, request: Request, reply: Reply) -> None:
        """``sub {topic, since?}``: subscribe, answer the latest seq, then send what was missed."""
        topic = request.topic()
        head = None
        if topic.is_room:
            head = self.directory.check_access(self.member(), topic.name).last_seq
        elif topic.name not in self.status_topics:
            raise NotFound(f"status feed {topic.name}", text="unknown status feed")
        since = request.fields.get("since") if topic.is_room else None
        subscribe = Subscribe(self.connection, topic, reply, since=since, head=head)
        try:
            made = await self.hub.call(subscribe)
        except AppError:
            if since is not None:
                # The hub may still make it, holding frames for a catch-up nobody sends.
                self._cast_or_close(Unsubscribe(self.connection, topic))
            raise
        if not made:
            raise ServiceUnavailable("connection not registered with the hub")
        if since is None:
            return  # the hub answered, before any live frame of the topic
        key = str(topic)
        try:
            page = await self.store.history(topic.name, since=since, limit=FILL_PAGE)
        except AppError:
            self._cast_or_close(Unsubscribe(self.connection, topic))
            raise
        last = page[-1].seq if page and page[-1].seq else since
        reply.answer(200, "ok", {"seq": max(last, head or 0)})
        self._cast_or_close(
            Filled(self.connection, key, tuple(page), complete=len(page) < FILL_PAGE)
        )

    async def op_unsub(self, request: Request, reply: Reply) -> None:
        """``unsub {topic}``: end a subscription; 404 when there was none."""
        if not await self.hub.call(Unsubscribe(self.connection, request.topic())):
            raise NotFound(text="not subscribed")
        reply.answer(200, "ok")

    async def op_pub(self, request: Request, reply: Reply) -> None:
        """``pub {topic, content, client_msg_id}``: 200 {id, seq} stored, 202 {id, queued} spooled."""
        topic = request.topic()
        if not topic.is_room:
            raise ValidationError(text="status topics are read-only")
        if self.app[keys.DRAINING]["draining"]:
            raise ServerShutdown(retry_after=5)
        self.directory.check_access(self.member(), topic.name)
        message = Message.accept(
            room=topic.name,
            sender=self.connection.username or "",
            content=request.fields["content"],
            client_msg_id=request.fields["client_msg_id"],
            max_length=self.max_content_length,
            trace_id=request.trace_id,
        )
        await self._take_publish_tokens()
        writer = self.writers[shard_of(topic.name, len(self.writers))]
        # The writer answers by the database deadline; the margin covers its mailbox.
        deadline = time.monotonic() + self.store.timeout
        result = await writer.call(Publish(message, deadline), timeout=self.deadline)
        if result.queued:
            reply.answer(202, "accepted", result.reply)
        else:
            reply.answer(200, "ok", result.reply)

    async def _take_publish_tokens(self) -> None:
        # Nothing may await between this and the writer's mailbox: the limiter keeps one
        # user's takes in order, and so the publishes (docs/protocol.rst, Pipelining).
        wait = self.publish_bucket.take()
        if wait == 0:
            wait = await self.app[keys.LIMITER].take(
                self.user_buckets, USER_PUBLISH_SCOPE, self.connection.user_id or ""
            )
            if wait > 0:
                # Give back the connection's token: the publish is refused as a whole.
                self.publish_bucket.tokens += 1
        if wait > 0:
            raise RateLimited(retry_after=max(1, int(wait + 0.999)))

    async def op_history(self, request: Request, reply: Reply) -> None:
        """``history {topic, before?|since?, limit}``: data frames, then ctrl 200 with count."""
        topic = request.topic()
        if not topic.is_room:
            raise ValidationError(text="history is kept for rooms only")
        self.directory.check_access(self.member(), topic.name)
        fields = request.fields
        page = await self.store.history(
            topic.name,
            since=fields.get("since"),
            before=fields.get("before"),
            limit=fields.get("limit", DEFAULT_HISTORY_LIMIT),
        )
        if not reply.claim():
            return
        for stored in page:
            self.connection.offer(encode(data_frame(stored)))
        reply.send(200, "ok", {"count": len(page)})

    async def op_presence(self, request: Request, reply: Reply) -> None:
        """``presence {topic}``: the users online in a room, on every instance while Redis
        answers, else on this one."""
        topic = request.topic()
        if not topic.is_room:
            raise ValidationError(text="presence is kept for rooms only")
        self.directory.check_access(self.member(), topic.name)
        bridge = self.app[keys.SUPERVISOR].find("redis_bridge")
        if bridge is not None:
            users = await bridge.call(OnlineUsers(topic.name), timeout=self.deadline)
        else:
            users = await self.hub.call(PresenceQuery(topic))
        reply.answer(200, "ok", {"users": users})

    # -- gap repair --------------------------------------------------------------------------

    def repair_gap(self, key: str, after: int) -> None:
        """Read what this client missed in room topic *key* after seq *after* (hub's ask)."""
        if self.closing:
            return  # the client left; the hub forgets its subscriptions next
        running = self.repairs.get(key)
        if running is not None and not running.done():
            return  # its answer makes the hub ask again if the gap is still open
        task = asyncio.create_task(self._repair(key, after), name=f"repair-{self.connection.id}")
        self.repairs[key] = task
        task.add_done_callback(functools.partial(self._repair_done, key))

    async def _repair(self, key: str, after: int) -> None:
        connection = self.connection
        room = Topic("room", key.partition(":")[2])
        # Pace the reads by the client: a page only once half its backlog bound is free.
        while connection.backlog["frames"] > connection.limits.max_messages // 2:
            if connection.closed:
                return
            await asyncio.sleep(0.05)
        try:
            page = await self.store.history(room.name, since=after, limit=FILL_PAGE)
        except AppError as exc:
            log.bind(client_id=connection.id, topic=key, error=exc.code).warning(
                "gap repair failed; client told to resync"
            )
            self._cast_or_close(FillFailed(connection, key))
            return
        self._cast_or_close(Filled(connection, key, tuple(page), complete=len(page) < FILL_PAGE))

    def _repair_done(self, key: str, task: asyncio.Task[None]) -> None:
        if self.repairs.get(key) is task:
            del self.repairs[key]
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        log.bind(client_id=self.connection.id, topic=key, error=type(error).__name__).opt(
            exception=error
        ).error("gap repair crashed")
        self._cast_or_close(FillFailed(self.connection, key))

    async def close(self) -> None:
        """End the requests and repairs this session started: nobody is left to answer.

        A publish already handed to its writer is stored all the same.
        """
        self.closing = True
        tasks = [
            task for task in (*self.repairs.values(), *(self.requests or ())) if not task.done()
        ]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.repairs.clear()
        self.requests = None

    def _cast_or_close(self, message: object) -> None:
        """Tell the hub; if its mailbox is full, close the client (1013) rather than leave it
        waiting on an answer that will never come."""
        try:
            self.hub.cast(message)
        except AppError:
            log.bind(client_id=self.connection.id, kind=type(message).__name__).error(
                "hub mailbox full; closing the client so it recovers on reconnect"
            )
            self.connection.shut(CLOSE_TRY_AGAIN_LATER, "server busy")


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
    check_capacity(app)
    ws = web.WebSocketResponse(
        compress=settings.ws_compress,
        # aiohttp refuses a frame of exactly max_msg_size; the limit is inclusive for us.
        max_msg_size=settings.ws_max_msg_size + 1,
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
        # Direct writes bypass aiohttp's framing, so only when frames go uncompressed.
        transport=None if settings.ws_compress else request.transport,  # type: ignore[arg-type]
        limits=client_limits(settings),
    )
    session = Session(app, connection)
    session.user_agent = request.headers.get("User-Agent")
    session.auth_deadline = asyncio.get_running_loop().call_later(
        settings.auth_timeout, _auth_timeout, session
    )

    sockets = app[keys.WEBSOCKETS]
    sockets.add(ws)
    try:
        await attend(session, _read_socket(ws, session))
    finally:
        sockets.discard(ws)
    return ws


async def _read_socket(ws: web.WebSocketResponse, session: Session) -> bool:
    """Read *ws* until the client is gone; whether it went without a goodbye.

    A coroutine of its own rather than a closure: thousands of sockets live at once, and a
    closure's cells are more objects for every garbage collection to walk.
    """
    connection = session.connection
    async for message in ws:
        if message.type is WSMsgType.TEXT:
            await session.receive(message.data)
        elif message.type is WSMsgType.BINARY:
            session.reply_error(BadFrame("binary frames are not supported"), None)
        elif message.type is WSMsgType.ERROR:
            metrics.WS_READ_ERRORS.inc()
            log.bind(client_id=connection.id, error=type(ws.exception()).__name__).warning(
                "read error"
            )
            return True
    return (ws.close_code is None or ws.close_code == 1006) and not connection.closed


async def attend(session: Session, serving: Coroutine[Any, Any, bool]) -> None:
    """Run one client's connection from join to leave, whatever its transport.

    Registers *session*'s connection with the hub, awaits *serving* (which reads the client
    until it is gone and returns whether it went without a goodbye), then tells the hub it
    left, ends the session's requests and repairs, and stops its writer. A hub too busy to
    take the join closes the client with 1013 at once.
    """
    connection = session.connection
    unexpected = False
    try:
        connection.start()
        try:
            session.hub.cast(Join(connection))
        except AppError:
            log.bind(client_id=connection.id).error("hub mailbox full; connection refused")
            connection.shut(CLOSE_TRY_AGAIN_LATER, "server busy")
            return
        unexpected = await serving
    except (ConnectionResetError, asyncio.CancelledError) as exc:
        unexpected = not connection.closed
        if isinstance(exc, asyncio.CancelledError):
            raise
    finally:
        serving.close()  # no-op once awaited; else never to run
        if session.auth_deadline is not None:
            session.auth_deadline.cancel()
        try:
            session.hub.cast(Leave(connection, unexpected=unexpected))
        except AppError as exc:
            log.bind(client_id=connection.id, error=exc.code).error("hub refused a leave")
        await session.close()
        await connection.closed_by_peer()


def _auth_timeout(session: Session) -> None:
    if session.authenticated:
        return
    if session.authenticating:
        # A slow database is no reason to log the client out (1008 means "log in again"):
        # its auth is answered within the request deadline; judge again after that.
        session.auth_deadline = asyncio.get_running_loop().call_later(
            session.deadline, _auth_timeout, session
        )
        return
    log.bind(client_id=session.connection.id).info("no auth in time; closing")
    session.connection.shut(CLOSE_POLICY, "authentication timeout")


__all__ = [
    "Session", "attend", "check_capacity", "client_limits", "open_clients", "origin_allowed",
    "routes", "websocket",
]  # fmt: skip
