"""The fallback transport: an event stream at ``GET /sse`` and requests by ``POST /api/v1/rpc``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import math
import re
import secrets
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import hdrs, web

from app import keys
from app.analytics import record_error
from app.api import bearer_token
from app.auth import User
from app.connection import CLOSE_GOING_AWAY, Connection, Reply, count_reply
from app.errors import (
    AppError,
    AuthFailed,
    Forbidden,
    MessageTooLong,
    NotFound,
    ServerShutdown,
    ServiceUnavailable,
    log_error,
    render_error,
)
from app.log import get_logger
from app.protocol import (
    BadFrame,
    Request,
    Topic,
    encode,
    error_event,
    event_frame,
    parse_request,
    parse_topic,
)
from app.ws import Session, attend, check_capacity, client_limits, origin_allowed

log = get_logger("sse")

routes = web.RouteTableDef()

#: Seconds within which a fresh ticket may open its stream.
TICKET_TTL = 30
#: Reconnection delay the stream asks browsers for, in milliseconds.
RETRY_MS = 2000
#: Room events a stream remembers for resume; an older one leaves only its room's position.
RECORD_EVENTS = 1024
#: Seconds between the registry's rounds (dead peers, keep-alives, expired tickets and streams).
SWEEP_INTERVAL = 1.0
#: Seconds a resume waits for the stream it takes over to finish.
TAKEOVER_TIMEOUT = 5.0
#: What a stream's connection is offered for a keep-alive comment; never a JSON frame.
KEEPALIVE = ": keep-alive"
#: The room and seq of a room data frame, as `app.protocol.data_frame` encodes it.
ROOM_EVENT = re.compile(r'\{"data":\{"topic":"room:([A-Za-z0-9_.-]+)","id":"[^"]*","seq":(\d+),')
#: The headers of every event stream.
STREAM_HEADERS = {
    hdrs.CONTENT_TYPE: "text/event-stream",
    hdrs.CACHE_CONTROL: "no-store",
    "X-Accel-Buffering": "no",
}
#: The header naming the stream a ``POST /api/v1/rpc`` belongs to.
SESSION_HEADER = "X-Hearth-Session"


def ticket_digest(ticket: str) -> str:
    """What the registry keeps of *ticket*: never the ticket itself."""
    return hashlib.sha256(ticket.encode("utf-8", "surrogatepass")).hexdigest()


# A broadcast offers one frame object to every subscriber: its event is built once, not
# once per stream (the string's hash is cached, so a hit costs a dict lookup).
@functools.lru_cache(maxsize=256)
def sse_event(frame: str) -> tuple[bytes, tuple[str, int] | None]:
    """*frame* (a WebSocket frame's text) as one SSE event, and its room and seq when it is
    a room data frame with a seq (the event then carries ``id: <room>:<seq>``)."""
    match = ROOM_EVENT.match(frame)
    if match is None:
        return f"data: {frame}\n\n".encode(), None
    room, seq = match[1], int(match[2])
    return f"id: {room}:{seq}\ndata: {frame}\n\n".encode(), (room, seq)


def parse_event_id(value: str | None) -> tuple[str, int] | None:
    """The room and seq of a ``Last-Event-ID`` *value*; None when it is not one of ours."""
    if not value:
        return None
    room, _, seq = value.strip().rpartition(":")
    if not room or not seq.isdigit() or len(seq) > 18:
        return None
    return room, int(seq)


class ResumeRecord:
    """What a stream wrote, so that a ``Last-Event-ID`` tells what its client has.

    The room events written, in order, up to *limit* of them (`wrote`); for each room the
    position before that window (`base`: the seq its subscription started after, or the
    last seq that left the window); and the topics the client is subscribed to.
    """

    __slots__ = ("window", "base", "topics", "limit")

    def __init__(self, limit: int = RECORD_EVENTS) -> None:
        #: (room, seq) of each room event written, oldest first.
        self.window: deque[tuple[str, int]] = deque()
        #: Room -> the last seq its client had before the window's first event of it.
        self.base: dict[str, int] = {}
        #: Topics subscribed (``room:<name>``, ``status:<name>``), in subscription order.
        self.topics: dict[str, None] = {}
        self.limit = limit

    def wrote(self, room: str, seq: int) -> None:
        """Note room event *room*:*seq* as written to the stream."""
        window = self.window
        if len(window) >= self.limit:
            old_room, old_seq = window.popleft()
            self.base[old_room] = old_seq
        window.append((room, seq))

    def subscribed(self, topic: Topic, position: int | None) -> None:
        """Note a subscription to *topic*; a room's live events follow seq *position*."""
        self.topics[str(topic)] = None
        if topic.is_room:
            self.base.setdefault(topic.name, position or 0)

    def unsubscribed(self, topic: Topic) -> None:
        """Forget *topic*: a later subscription starts afresh."""
        self.topics.pop(str(topic), None)
        if topic.is_room:
            self.base.pop(topic.name, None)
            self.window = deque(entry for entry in self.window if entry[0] != topic.name)

    def positions(self, last_event_id: str | None) -> dict[str, int]:
        """Each subscribed room's last seq the client has, if *last_event_id* is the last
        event it got: exact when that event is in the window, else the oldest position the
        record still knows (the client may then see repeats, never a gap)."""
        positions = dict(self.base)
        event = parse_event_id(last_event_id)
        if event is not None:
            end = next(
                (len(self.window) - i for i, e in enumerate(reversed(self.window)) if e == event),
                0,
            )
            for room, seq in itertools.islice(self.window, end):
                positions[room] = seq
        rooms = {topic.partition(":")[2] for topic in self.topics if topic.startswith("room:")}
        return {room: seq for room, seq in positions.items() if room in rooms}

    def restart(self, positions: dict[str, int]) -> None:
        """Begin a new stream whose client has each room up to *positions*."""
        self.window.clear()
        self.base = dict(positions)


class Stream:
    """One client's event stream across its reconnects: the protocol's session.

    While connected it has a `Session` (a new one per connection, as on a reconnected
    WebSocket); in between, its record and ticket wait for a resume.
    """

    __slots__ = (
        "id", "user", "ticket", "record", "session", "request", "ended", "served",
        "dropped_at", "opened", "peer_gone", "keepalive_at",
    )  # fmt: skip

    def __init__(self, user: User, ticket: str | None, now: float) -> None:
        #: The session id of the hello, of ``X-Hearth-Session``.
        self.id = secrets.token_urlsafe(18)
        self.user = user
        #: Digest of the ticket that opened it; None when opened with a bearer header.
        self.ticket = ticket
        self.record = ResumeRecord()
        #: The live connection's session; None between connections.
        self.session: Session | None = None
        #: The live connection's request, to notice a peer that went away.
        self.request: web.BaseRequest | None = None
        #: Set to end the live connection's handler.
        self.ended: asyncio.Event | None = None
        #: Set when the last connection's handler has finished.
        self.served: asyncio.Event | None = None
        #: When the last connection ended (monotonic); None while connected.
        self.dropped_at: float | None = now
        #: Whether a connection has said hello on it: the next one resumes.
        self.opened = False
        #: Set when the sweep found the live connection's peer gone.
        self.peer_gone = False
        #: When the next keep-alive comment is due (monotonic).
        self.keepalive_at = now

    def end(self, *, peer_gone: bool = False) -> None:
        """End the live connection's handler (its peer went away, or it was closed)."""
        if peer_gone:
            self.peer_gone = True
        if self.ended is not None:
            self.ended.set()


@dataclass(slots=True)
class Ticket:
    """An issued ticket: its user, when it was issued, and the stream it opened."""

    user: User
    issued_at: float
    stream_id: str | None = None


class SseStreams:
    """Every event stream of this instance, its tickets and resume records.

    One owner for all of it: `sweep` runs every `SWEEP_INTERVAL` in the task `start`
    makes (ended by `close`). It ends connections whose peer went away, offers keep-alive
    comments every *keepalive* seconds, and forgets tickets that expired unused and
    streams dropped more than *resume* seconds ago. *clock* is monotonic seconds.
    """

    def __init__(
        self, *, resume: float, keepalive: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.resume = resume
        self.keepalive = keepalive
        self.clock = clock
        #: Ticket digest -> ticket.
        self.tickets: dict[str, Ticket] = {}
        #: Stream id -> stream.
        self.streams: dict[str, Stream] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the sweep task."""
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="sse-sweeper")

    async def close(self) -> None:
        """Say goodbye to every live stream (SERVER_SHUTDOWN), then stop the sweep."""
        closing = []
        for stream in list(self.streams.values()):
            if stream.session is not None:
                connection = stream.session.connection
                connection.shut(CLOSE_GOING_AWAY, "server shutdown", farewell=_shutdown_frame())
                closing.append(connection.wait_closed())
        await asyncio.gather(*closing, return_exceptions=True)
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None

    def issue(self, user: User) -> str:
        """A new ticket for *user*; only its digest is kept."""
        ticket = secrets.token_urlsafe(32)
        self.tickets[ticket_digest(ticket)] = Ticket(user, self.clock())
        return ticket

    def redeem(self, ticket: str) -> Stream:
        """The stream *ticket* opens or resumes; `AuthFailed` when it can do neither."""
        digest = ticket_digest(ticket)
        issued = self.tickets.get(digest)
        now = self.clock()
        if issued is None:
            raise AuthFailed("unknown ticket")
        if issued.stream_id is None:
            if now - issued.issued_at > TICKET_TTL:
                del self.tickets[digest]
                raise AuthFailed("ticket expired unused")
            stream = self.open(issued.user, digest)
            issued.stream_id = stream.id
            return stream
        resumable = self.streams.get(issued.stream_id)
        if resumable is None or self._expired(resumable, now):
            self._forget_ticket(digest)
            if resumable is not None:
                self.forget(resumable)
            raise AuthFailed("stream past its resume window")
        return resumable

    def open(self, user: User, ticket: str | None = None) -> Stream:
        """A new stream for *user*, opened by the ticket of digest *ticket* if any."""
        stream = Stream(user, ticket, self.clock())
        self.streams[stream.id] = stream
        return stream

    def find(self, stream_id: str | None) -> Stream:
        """The stream *stream_id* names; `NotFound` when this instance has none (any more)."""
        stream = self.streams.get(stream_id or "")
        if stream is None or self._expired(stream, self.clock()):
            raise NotFound(f"stream {str(stream_id)[:8]}", text="unknown session")
        return stream

    def forget(self, stream: Stream) -> None:
        """Drop *stream* and its ticket: it can no longer be resumed."""
        self.streams.pop(stream.id, None)
        if stream.ticket is not None:
            self._forget_ticket(stream.ticket)

    def _forget_ticket(self, digest: str) -> None:
        self.tickets.pop(digest, None)

    def _expired(self, stream: Stream, now: float) -> bool:
        return stream.dropped_at is not None and now - stream.dropped_at > self.resume

    def attach(
        self, stream: Stream, session: Session, request: web.BaseRequest, ended: asyncio.Event
    ) -> None:
        """Make *session* (of *request*) *stream*'s live connection, ended by setting *ended*."""
        stream.session = session
        stream.request = request
        stream.ended = ended
        stream.dropped_at = None
        stream.peer_gone = False
        stream.opened = True
        stream.keepalive_at = self.clock() + self.keepalive

    def detach(self, stream: Stream, session: Session) -> None:
        """*session*'s connection of *stream* ended; its resume window starts now."""
        if stream.session is not session:
            return
        stream.session = None
        stream.request = None
        stream.ended = None
        stream.dropped_at = self.clock()

    def sweep(self) -> None:
        """One round: dead peers, keep-alives, expired tickets and streams."""
        now = self.clock()
        for stream in list(self.streams.values()):
            if stream.session is None:
                if self._expired(stream, now):
                    self.forget(stream)
                continue
            request = stream.request
            transport = request.transport if request is not None else None
            if transport is None or transport.is_closing():
                stream.end(peer_gone=True)
            elif now >= stream.keepalive_at:
                stream.keepalive_at = now + self.keepalive
                stream.session.connection.offer_latest(KEEPALIVE, KEEPALIVE)
        for digest, ticket in list(self.tickets.items()):
            if ticket.stream_id is None and now - ticket.issued_at > TICKET_TTL:
                del self.tickets[digest]

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                self.sweep()
            except Exception as exc:
                log.opt(exception=exc).error("event stream sweep failed")


#: The event stream registry of the app (its own key: only this module reads it, and
#: app/keys.py then names no module that reads keys).
STREAMS: web.AppKey[SseStreams] = web.AppKey("sse_streams")


def _shutdown_frame() -> str:
    return encode(error_event(
        "SERVER_SHUTDOWN", "server is restarting; reconnect later",
        component="hub", severity="warning",
    ))  # fmt: skip


def _check_origin(request: web.Request) -> None:
    if not origin_allowed(request, request.app[keys.SETTINGS].allowed_origins):
        log.bind(origin=request.headers.get("Origin"), route=request.path).warning(
            "cross-site request refused"
        )
        raise Forbidden("cross-site request", text="origin not allowed")


@routes.post("/api/v1/sse/ticket")
async def issue_ticket(request: web.Request) -> web.Response:
    """``Authorization: Bearer <token>`` → ``{ticket, expires_in}``: a one-time ticket that
    opens one event stream (``GET /sse?ticket=``) within `TICKET_TTL` seconds."""
    _check_origin(request)
    user = await request.app[keys.AUTH].authenticate(bearer_token(request))
    ticket = request.app[STREAMS].issue(user)
    log.bind(user_id=user.id).debug("event stream ticket issued")
    return web.json_response(
        {"ticket": ticket, "expires_in": TICKET_TTL}, headers={hdrs.CACHE_CONTROL: "no-store"}
    )


@routes.get("/sse")
async def event_stream(request: web.Request) -> web.StreamResponse:
    """Serve one client's event stream until it leaves, is dropped, or the server shuts down.

    Opened by a ticket (resumed by the same ticket and ``Last-Event-ID``) or, for clients
    that can send headers, by ``Authorization: Bearer``.
    """
    app = request.app
    streams = app[STREAMS]
    _check_origin(request)
    if app[keys.DRAINING]["draining"]:
        raise ServerShutdown("event stream refused while draining", retry_after=5)
    ticket = request.query.get("ticket")
    if ticket is not None:
        stream = streams.redeem(ticket)
    else:
        user = await app[keys.AUTH].authenticate(bearer_token(request))
        stream = streams.open(user)
    await _take_over(stream)
    # From here until this handler ends, a resume of the same stream waits for it.
    served = stream.served = asyncio.Event()
    try:
        check_capacity(app)
        return await _serve_stream(request, stream)
    finally:
        served.set()


async def _serve_stream(request: web.Request, stream: Stream) -> web.StreamResponse:
    """Open *stream*'s new connection on *request* and serve it until it ends."""
    app = request.app
    streams = app[STREAMS]
    resumed = stream.opened
    settings = app[keys.SETTINGS]
    response = web.StreamResponse(headers=STREAM_HEADERS)
    await response.prepare(request)
    if settings.ws_send_buffer:
        # The same bound per client socket as a WebSocket's.
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.ws_send_buffer)
    ended = asyncio.Event()

    def event_of(frame: str) -> bytes:
        if frame == KEEPALIVE:
            return b": keep-alive\n\n"
        event, room_event = sse_event(frame)
        if room_event is not None:
            stream.record.wrote(*room_event)
        return event

    async def send(frame: str) -> None:
        await response.write(event_of(frame))

    chunked = response.headers.get(hdrs.TRANSFER_ENCODING, "").lower() == "chunked"

    def wire(frame: str) -> bytes:
        # What response.write puts on the socket, for the connection's direct writes:
        # an idle client's event goes out at once, with no writer task (as a WebSocket's).
        event = event_of(frame)
        return b"%x\r\n%b\r\n" % (len(event), event) if chunked else event

    async def close(*, code: int = 1000, message: bytes = b"") -> None:
        try:
            await asyncio.wait_for(response.write_eof(), 1.0)
        except Exception:
            # A client that stopped reading never takes the last chunk: cut it.
            if request.transport is not None:
                request.transport.abort()
        finally:
            ended.set()

    connection = Connection(
        send, close, limits=client_limits(settings),
        transport=request.transport, wire=wire,  # type: ignore[arg-type]
    )  # fmt: skip
    session = Session(app, connection, transport="sse")
    session.user_agent = request.headers.get(hdrs.USER_AGENT)
    session.sign_in(stream.user)
    positions: dict[str, int] = {}
    if resumed:
        positions = stream.record.positions(request.headers.get("Last-Event-ID"))
        stream.record.restart(positions)
    hello = {
        "session": stream.id,
        "resumed": resumed,
        "user": {"id": stream.user.id, "username": stream.user.username},
    }
    streams.attach(stream, session, request, ended)
    open_streams = app[keys.EVENT_STREAMS]
    open_streams.add(response)

    async def serve() -> bool:
        if resumed:
            await _resubscribe(session, stream, positions)
        await ended.wait()
        return stream.peer_gone and not connection.closed

    log.bind(client_id=connection.id, user_id=stream.user.id, resumed=resumed).info(
        "event stream opened"
    )
    try:
        # First on the stream, before the hub knows the connection.
        await response.write(f"retry: {RETRY_MS}\nevent: hello\ndata: {encode(hello)}\n\n".encode())
        await attend(session, serve())
    finally:
        open_streams.discard(response)
        streams.detach(stream, session)
    return response


async def _take_over(stream: Stream) -> None:
    """Wait until *stream* has no live connection, ending the one it has (a browser that
    reconnects before this server noticed the old connection drop)."""
    served = stream.served
    if served is None or served.is_set():
        return
    if stream.session is not None:
        stream.session.connection.shut(CLOSE_GOING_AWAY, "stream resumed elsewhere")
    stream.end()
    try:
        await asyncio.wait_for(served.wait(), TAKEOVER_TIMEOUT)
    except TimeoutError:
        raise ServiceUnavailable("previous stream still ending", retry_after=1) from None
    if stream.served is not served:
        raise ServiceUnavailable("stream resumed twice at once", retry_after=1)


async def _resubscribe(session: Session, stream: Stream, positions: dict[str, int]) -> None:
    """Subscribe the resumed *stream*'s topics again through `Session.op_sub`, each room
    ``since`` the client's position in it, so what it missed is sent first."""
    for number, key in enumerate(list(stream.record.topics), 1):
        topic = parse_topic(key)
        fields: dict[str, Any] = {"topic": key}
        since = positions.get(topic.name) if topic.is_room else None
        if since is not None:
            fields["since"] = since
        request = Request(op="sub", id=f"resume-{number}", trace_id=None, fields=fields)
        answers: list[dict[str, Any]] = []
        reply = Reply(session.connection, request.id, deliver=answers.append, transport="sse")
        await session.handle(request, reply)
        code = answers[0]["ctrl"]["code"] if answers else 0
        if code == 200:
            _note_answer(stream, request, answers[0])
        if code != 200 or (topic.is_room and since is None):
            # The client recovers this topic itself with sub since.
            log.bind(client_id=session.connection.id, topic=key, status=code).warning(
                "topic not resumed; client told to resync"
            )
            session.connection.offer(encode(event_frame("resync", {"topics": [key]})))


def _note_answer(stream: Stream, request: Request, frame: dict[str, Any]) -> None:
    """Keep *stream*'s record of its topics up to date with a 200 ctrl of *request*."""
    ctrl = frame["ctrl"]
    if ctrl["code"] != 200:
        return
    if request.op == "sub":
        since = request.fields.get("since")
        seq = ctrl.get("params", {}).get("seq")
        stream.record.subscribed(request.topic(), since if since is not None else seq)
    elif request.op == "unsub":
        stream.record.unsubscribed(request.topic())


@routes.post("/api/v1/rpc")
async def rpc(request: web.Request) -> web.Response:
    """One request frame as on ``/ws``, answered with its one ctrl as the response (status:
    the ctrl's code); the data frames it causes go to the stream ``X-Hearth-Session`` names.

    This route counts and records its own requests (transport ``sse``), not the middleware.
    """
    request_id: str | None = None
    session: Session | None = None
    try:
        app = request.app
        _check_origin(request)
        user = await app[keys.AUTH].authenticate(bearer_token(request))
        stream = app[STREAMS].find(request.headers.get(SESSION_HEADER))
        if stream.user.id != user.id:
            raise Forbidden(f"user {user.id} is not the stream's user")
        text = await _frame_text(request, app[keys.SETTINGS].ws_max_msg_size)
        try:
            frame = parse_request(text)
        except BadFrame as exc:
            request_id = exc.request_id
            raise
        request_id = frame.id
        if frame.op == "auth":
            raise BadFrame("auth is not used over rpc: the stream is authenticated", frame.id)
        session = stream.session
        if session is None:
            raise ServiceUnavailable(
                "stream reconnecting", text="stream not connected", retry_after=1
            )
        answered: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        def deliver(ctrl: dict[str, Any]) -> None:
            _note_answer(stream, frame, ctrl)
            if not answered.done():
                answered.set_result(ctrl)

        reply = Reply(session.connection, frame.id, deliver=deliver, transport="sse")
        task = await session.submit(frame, reply)
        # The task is the session's: a client that goes away leaves it to finish (within
        # the deadline) or to be ended with the session.
        await asyncio.wait([task])
        if not answered.done() and reply.claim():
            reply.send_error(
                ServiceUnavailable("stream closed", text="stream not connected", retry_after=1)
            )
        return _ctrl_response(await answered)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        _log_rpc_error(request, exc, session)
        status = exc.status if isinstance(exc, AppError) else 500
        count_reply("sse", status)
        return _ctrl_response(render_error(exc, request_id))


def _log_rpc_error(request: web.Request, exc: Exception, session: Session | None) -> None:
    connection = session.connection if session is not None else None
    user_id = connection.user_id if connection is not None else None
    log_error(exc, component="sse", endpoint=request.path, user_id=user_id)
    record_error(
        request.app.get(keys.ERRORS), exc, transport="sse", endpoint="sse:rpc",
        method=request.method, status=exc.status if isinstance(exc, AppError) else 500,
        user_agent=request.headers.get(hdrs.USER_AGENT), user_id=user_id,
    )  # fmt: skip


def _ctrl_response(frame: dict[str, Any]) -> web.Response:
    """*frame* (``{"ctrl": ...}``) as the response, with its code as the status."""
    ctrl = frame["ctrl"]
    headers = {hdrs.CACHE_CONTROL: "no-store"}
    retry_after = ctrl.get("params", {}).get("retry_after")
    if isinstance(retry_after, int | float):
        headers[hdrs.RETRY_AFTER] = str(max(1, math.ceil(retry_after)))
    return web.Response(
        text=encode(frame), status=ctrl["code"], content_type="application/json", headers=headers
    )


async def _frame_text(request: web.Request, limit: int) -> str:
    """The body of *request*: one frame of at most *limit* bytes, as UTF-8 text."""
    raw = bytearray()
    if (request.content_length or 0) <= limit:
        async for chunk in request.content.iter_any():
            raw += chunk
            if len(raw) > limit:
                break
    if max(request.content_length or 0, len(raw)) > limit:
        raise MessageTooLong(f"rpc body over {limit} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadFrame("invalid JSON") from None


async def sse_ctx(app: web.Application) -> AsyncIterator[None]:
    """The event stream registry of *app*: started with the app, its streams ended (with
    SERVER_SHUTDOWN) and its sweep stopped on cleanup."""
    settings = app[keys.SETTINGS]
    streams = SseStreams(resume=settings.sse_resume, keepalive=settings.sse_keepalive)
    app[STREAMS] = streams
    streams.start()
    yield
    with contextlib.suppress(Exception):
        await streams.close()


__all__ = [
    "KEEPALIVE", "ResumeRecord", "SseStreams", "Stream", "event_stream", "issue_ticket",
    "parse_event_id", "routes", "rpc", "sse_ctx", "sse_event",
]  # fmt: skip
