"""A client's outbound side: a bounded backlog, conflated status feeds, and one writer task."""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from app import metrics
from app.errors import AppError, ctrl_frame, render_error
from app.log import get_logger
from app.protocol import encode, error_event, text_frame

log = get_logger("connection")

#: Close codes the hub uses.
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN_LATER = 1013
#: Consecutive failed writes after which a client is closed.
MAX_WRITE_ERRORS = 3


@dataclass(frozen=True, slots=True)
class Limits:
    """How much a client may lag before it is warned, then dropped."""

    max_messages: int = 1000
    max_bytes: int = 4 * 1024 * 1024
    warn_ratio: float = 0.5
    send_timeout: float = 5.0


class Reply:
    """The one ctrl frame answering request *request_id* of *connection*.

    Whoever :meth:`claim` s it first answers it: a session that gave up waiting and an
    actor that got to the request after all can never both reply. The ctrl goes to the
    connection's backlog, or to *deliver* when given (an HTTP request's response, for a
    request that came by ``POST /api/v1/rpc``); *transport* labels its count in
    ``hearth_requests_total``.
    """

    __slots__ = ("connection", "request_id", "claimed", "deliver", "transport")

    def __init__(
        self,
        connection: Connection,
        request_id: str | None,
        *,
        deliver: Callable[[dict[str, Any]], None] | None = None,
        transport: str = "ws",
    ) -> None:
        self.connection = connection
        self.request_id = request_id
        #: Set by the first :meth:`claim`.
        self.claimed = False
        #: Takes the ctrl frame instead of the connection, when set.
        self.deliver = deliver
        self.transport = transport

    def claim(self) -> bool:
        """Take the right to answer; False when someone already took it."""
        if self.claimed:
            return False
        self.claimed = True
        return True

    def answer(self, code: int, text: str, params: dict[str, Any] | None = None) -> bool:
        """Claim and send in one step; False (nothing sent) when someone answered already."""
        if not self.claim():
            return False
        self.send(code, text, params)
        return True

    def send(self, code: int, text: str, params: dict[str, Any] | None = None) -> None:
        """Queue the ctrl reply; only its claimer calls this."""
        count_reply(self.transport, code)
        self._out(ctrl_frame(self.request_id, code, text, params))

    def send_error(self, exc: BaseException) -> None:
        """Queue *exc* rendered safely as the reply; only its claimer calls this."""
        count_reply(self.transport, exc.status if isinstance(exc, AppError) else 500)
        self._out(render_error(exc, self.request_id))

    def _out(self, frame: dict[str, Any]) -> None:
        if self.deliver is None:
            self.connection.offer(encode(frame))
        else:
            self.deliver(frame)


def count_reply(transport: str, status: int) -> None:
    """Count one ctrl reply of *transport* (``ws``, or ``sse`` for ``POST /api/v1/rpc``)
    answered with *status* in ``hearth_requests_total``."""
    if transport == "ws":
        metrics.count_request("ws", status)
    elif 200 <= status < 600:
        metrics.REQUESTS.labels(transport, f"{status // 100}xx").inc()


class Connection:
    """One client as the hub sees it, with no aiohttp in sight, whatever its transport.

    *send* writes one text frame and *close* closes with a code and reason; the WebSocket
    handler passes the socket's own, the event stream (app/sse.py) writes one event each
    and ends the stream. Every outbound frame goes through `offer` or
    `offer_latest`, so replies and data keep their order and the bounds hold.

    With *transport* (the socket's, uncompressed), a frame offered while nothing is queued,
    nothing is being sent and the transport holds no unsent bytes is written at once, as
    prebuilt wire bytes: no task wake-up, no timer. Those are WebSocket framing unless
    *wire* builds them (an event stream's chunk). Anything else queues for the writer
    task, whose sends carry the send timeout, so a client that stops reading is detected
    and dropped exactly as before.
    """

    # Thousands of these live at once: no per-instance dict.
    __slots__ = (
        "id", "user_id", "username", "is_admin", "topics", "room_seqs", "held", "on_gap",
        "limits", "write_errors", "closed_reason", "_send", "_close", "_transport",
        "_sending", "_backlog", "_latest", "_room_frames", "_bytes", "_warned", "_writer",
        "_started", "_closing", "_wire",
    )  # fmt: skip

    def __init__(
        self,
        send: Callable[[str], Awaitable[None]],
        close: Callable[..., Awaitable[Any]],
        *,
        limits: Limits = Limits(),
        transport: asyncio.WriteTransport | None = None,
        wire: Callable[[str], bytes] | None = None,
    ) -> None:
        #: Short random id for logs.
        self.id = secrets.token_hex(6)
        #: Set once the client authenticated.
        self.user_id: str | None = None
        self.username: str | None = None
        self.is_admin = False
        #: Topics this client subscribed to (as strings).
        self.topics: set[str] = set()
        #: Room topic -> last seq sent to this client, None until the first; hub-owned.
        self.room_seqs: dict[str, int | None] = {}
        #: Room topic -> live frames held back while a gap is filled; hub-owned.
        self.held: dict[str, list[tuple[int | None, str]]] = {}
        #: Asks the session to read what this client missed in a room after a seq; the
        #: session answers the hub with `Filled` or `FillFailed`. None: nobody can.
        self.on_gap: Callable[[str, int], None] | None = None
        self.limits = limits
        self._send = send
        self._close = close
        self._transport = transport
        # Builds a frame's bytes for a direct write; None: WebSocket framing.
        self._wire = wire
        # True while the writer task is inside a send: a direct write must not overtake it.
        self._sending = False
        # Backlog entries: a ready frame, or a status topic whose newest frame is in _latest.
        # Made on demand and let go once drained: an empty deque costs 760 bytes.
        self._backlog: deque[str | tuple[str]] | None = None
        self._latest: dict[str, str] = {}
        self._room_frames = 0
        self._bytes = 0
        self._warned = False
        # Started on demand: an idle client, or one served by direct writes, costs no task.
        self._writer: asyncio.Task[None] | None = None
        self._started = False
        self._closing: asyncio.Task[None] | None = None
        self.write_errors = 0
        #: Why the server closed this client, when it did.
        self.closed_reason: str | None = None

    @property
    def closed(self) -> bool:
        """Whether the server has closed or is closing this client."""
        return self.closed_reason is not None

    @property
    def backlog(self) -> dict[str, int]:
        """Frames and bytes waiting to be sent."""
        return {"frames": len(self._backlog or ()), "bytes": self._bytes}

    def start(self) -> None:
        """Let queued frames flow: a writer task runs whenever something is queued."""
        self._started = True
        self._kick()

    def _kick(self) -> None:
        """Make sure a writer task will send what is queued."""
        if not self._started or not self._backlog:
            return
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_loop(), name=f"writer-{self.id}")

    def offer(self, frame: str, wire: bytes | None = None) -> bool:
        """Send or queue an already-encoded frame; False when the client is gone or dropped.

        *wire* is the frame as built for the socket (`text_frame`), when the caller built
        it once for many clients. Past the warn mark the client gets a SLOW_CLIENT warning
        once; past the hard limit it is closed with 1013 and the frame is not queued.
        """
        if self.closed:
            return False
        transport = self._idle_transport()
        if transport is not None:
            if self._wire is not None:
                transport.write(self._wire(frame))
            else:
                transport.write(wire if wire is not None else text_frame(frame))
            return True
        limits = self.limits
        if (
            self._room_frames + 1 > limits.max_messages
            or self._bytes + len(frame) > limits.max_bytes
        ):
            self.evict_slow()
            return False
        self._enqueue(frame)
        if not self._warned and (
            self._room_frames >= limits.max_messages * limits.warn_ratio
            or self._bytes >= limits.max_bytes * limits.warn_ratio
        ):
            self._warned = True
            log.bind(client_id=self.id, user_id=self.user_id, **self.backlog).warning(
                "client is falling behind"
            )
            self._enqueue(
                encode(error_event(
                    "SLOW_CLIENT", "you are falling behind; messages may be dropped",
                    component="hub", severity="warning",
                ))
            )  # fmt: skip
        self._kick()
        return True

    def offer_all(self, frames: list[str], wire: bytes) -> bool:
        """`offer` each of *frames*, whose wire bytes joined are *wire*: one write when the
        client is idle. False when the client is gone or was dropped on the way."""
        if self.closed:
            return False
        transport = self._idle_transport()
        if transport is not None:
            transport.write(wire if self._wire is None else b"".join(map(self._wire, frames)))
            return True
        return all(self.offer(frame) for frame in frames)

    def _idle_transport(self) -> asyncio.WriteTransport | None:
        """The transport, when a frame may go straight to it: nothing queued or being
        sent, and the socket holds nothing unsent."""
        transport = self._transport
        if (
            transport is not None
            and not self._backlog
            and not self._sending
            and not transport.get_write_buffer_size()
            and not transport.is_closing()
        ):
            return transport
        return None

    def _queue(self) -> deque[str | tuple[str]]:
        if self._backlog is None:
            self._backlog = deque()
        return self._backlog

    def _enqueue(self, frame: str) -> None:
        self._queue().append(frame)
        self._room_frames += 1
        self._bytes += len(frame)

    def offer_latest(self, key: str, frame: str) -> None:
        """Queue *frame* as the newest value of *key*, replacing any unsent older one.

        Status feeds and heartbeats are conflated this way, so they never build a backlog
        and never get a client dropped.
        """
        if self.closed:
            return
        if key not in self._latest:
            self._queue().append((key,))
        self._latest[key] = frame
        self._kick()

    def evict_slow(self) -> None:
        """Drop a client whose backlog passed the hard limit: SLOW_CLIENT, then close 1013."""
        metrics.SLOW_CLIENT_DROPS.inc()
        log.bind(client_id=self.id, user_id=self.user_id, **self.backlog).warning(
            "slow client dropped"
        )
        farewell = encode(error_event(
            "SLOW_CLIENT", "too far behind; reconnect and recover with since",
            component="hub", severity="warning",
        ))  # fmt: skip
        self.shut(CLOSE_TRY_AGAIN_LATER, "slow client", farewell=farewell)

    def shut(
        self, code: int, reason: str, *, farewell: str | None = None, drain: float = 0
    ) -> None:
        """Close the client with *code* and *reason*, once.

        The pending send, if any, is cancelled at once (a send blocked on a dead peer
        would otherwise stay blocked). *farewell* is sent best effort first; with *drain*
        seconds the backlog is flushed before it.
        """
        if self.closed:
            return
        self.closed_reason = reason
        self._closing = asyncio.create_task(self._shut(code, reason, farewell, drain))

    async def _shut(self, code: int, reason: str, farewell: str | None, drain: float) -> None:
        if drain > 0 and self._started:
            self._queue().append(("",))  # marks the end of what may still be written
            self._kick()
        writer = self._writer
        if writer is not None and drain > 0:
            try:
                await asyncio.wait_for(asyncio.shield(writer), drain)
            except Exception:
                pass  # a writer that timed out or failed is cancelled just below
        if writer is not None and not writer.done():
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        try:
            if farewell is not None:
                await asyncio.wait_for(self._send(farewell), 0.5)
        except Exception:
            pass  # best effort: the peer may be the reason we are closing
        try:
            # Cancelling a close that hangs on a dead peer makes aiohttp drop the transport.
            await asyncio.wait_for(self._close(code=code, message=reason.encode()), 2.0)
        except Exception as exc:
            log.bind(client_id=self.id, error=type(exc).__name__).debug("close did not complete")

    async def wait_closed(self) -> None:
        """Wait until a close started by `shut` has finished."""
        if self._closing is not None:
            await asyncio.gather(self._closing, return_exceptions=True)

    async def closed_by_peer(self) -> None:
        """Stop writing after the peer went away or the socket ended."""
        if self.closed_reason is None:
            self.closed_reason = "peer closed"
        await self.wait_closed()
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)

    async def _write_loop(self) -> None:
        # Ends once the backlog is empty; the next queued frame starts a new one.
        try:
            await self._write_backlog()
        finally:
            # Let go of this task and the empty deque: an idle client holds neither.
            if self._writer is asyncio.current_task():
                self._writer = None
            if not self._backlog:
                self._backlog = None

    async def _write_backlog(self) -> None:
        while self._backlog:
            entry = self._backlog.popleft()
            if isinstance(entry, tuple):
                if entry[0] == "":
                    return
                frame = self._latest.pop(entry[0])
            else:
                frame = entry
                self._room_frames -= 1
                self._bytes -= len(frame)
            self._sending = True
            try:
                async with asyncio.timeout(self.limits.send_timeout):
                    await self._send(frame)
            except TimeoutError:
                metrics.WS_WRITE_ERRORS.inc()
                log.bind(client_id=self.id, user_id=self.user_id).warning("send timed out")
                self.evict_slow()
                return
            except Exception as exc:
                self.write_errors += 1
                metrics.WS_WRITE_ERRORS.inc()
                log.bind(
                    client_id=self.id, error=type(exc).__name__, retry_count=self.write_errors
                ).warning("write failed")
                if self.write_errors >= MAX_WRITE_ERRORS:
                    self.shut(CLOSE_TRY_AGAIN_LATER, "write errors")
                    return
            else:
                self.write_errors = 0
            finally:
                self._sending = False
