"""Hub: routes frames to connections; owns the registry of connections and subscriptions."""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from actors.base import Actor
from app import metrics
from app.connection import CLOSE_GOING_AWAY, Connection, Reply
from app.errors import AppError
from app.log import get_logger
from app.models import Message
from app.protocol import Topic, data_frame, encode, error_event, event_frame, text_frame

log = get_logger("hub")


@dataclass
class Registry:
    """Connections, subscriptions and presence: the hub's state that outlives a hub crash.

    Only the hub's handlers change it; others may read it.
    """

    connections: set[Connection] = field(default_factory=set)
    #: topic string -> subscribed connections.
    subscribers: defaultdict[str, set[Connection]] = field(default_factory=lambda: defaultdict(set))
    #: room topic -> username -> how many of that user's connections are subscribed.
    present: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    #: Newest encoded frame of each status topic, for new subscribers.
    latest_status: dict[str, str] = field(default_factory=dict)
    #: room topic -> highest seq routed, so a new subscriber knows where it starts.
    heads: dict[str, int] = field(default_factory=dict)


# -- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Join:
    """A client connected."""

    connection: Connection


@dataclass(frozen=True, slots=True)
class Leave:
    """A client disconnected; *unexpected* when it did so without a close handshake."""

    connection: Connection
    unexpected: bool = False


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Subscribe *connection* to *topic* and answer *reply*, unless someone else did.

    *head* is the room's last seq known to the caller (the room directory's). With
    *since*, live frames are held back until the session's `Filled` arrives, and the
    session answers the request itself once it has read what was missed.
    """

    connection: Connection
    topic: Topic
    reply: Reply
    since: int | None = None
    head: int | None = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """End *connection*'s subscription to *topic*."""

    connection: Connection
    topic: Topic


@dataclass(frozen=True, slots=True)
class Filled:
    """What *connection* missed in room topic *key*, read from the store in seq order.

    *complete* is False when there may be more after the last message: the hub asks for
    the next page before it lets held frames through.
    """

    connection: Connection
    key: str
    messages: tuple[Message, ...]
    complete: bool = True


@dataclass(frozen=True, slots=True)
class FillFailed:
    """The store could not fill *connection*'s gap in *key*: tell the client to resync."""

    connection: Connection
    key: str


@dataclass(frozen=True, slots=True)
class Deliver:
    """One room's messages from the writers' outlet, in seq order: stored (with seq) or
    spooled (seq None)."""

    messages: tuple[Message, ...]
    #: When the batch left the outlet (``time.perf_counter``), for the fan-out latency.
    sent_at: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """A new value for status *topic*, sent as an event of *event_type*."""

    topic: str
    event_type: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class TopicEvent:
    """An event for the subscribers of *topic* that leaves its status value in place.

    ``data["code"]`` names the condition (``RPC_FAILURE``…): a lagging client gets only the
    newest event of each code, never a queue of them.
    """

    topic: str
    event_type: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Announce:
    """An event for every client; *conflate_key* keeps only the newest unsent one."""

    event_type: str
    data: dict[str, Any]
    conflate_key: str | None = None


@dataclass(frozen=True, slots=True)
class RemotePresence:
    """Another instance's user joined or left room topic *topic*."""

    topic: str
    change: str
    username: str


@dataclass(frozen=True, slots=True)
class RoomHead:
    """Room topic *topic* has stored up to *seq* elsewhere: subscribers behind it repair
    the gap from the store now, rather than on the room's next message."""

    topic: str
    seq: int


@dataclass(frozen=True, slots=True)
class ResyncAll:
    """Cross-instance delivery had a gap: every client recovers its rooms with ``since``."""


@dataclass(frozen=True, slots=True)
class PresenceQuery:
    """Who is online in room *topic*."""

    topic: Topic


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Tell every client to come back later, then close each with 1001 after *drain* seconds."""

    reconnect_spread_ms: int = 5000
    drain: float = 1.0


# -- the actor --------------------------------------------------------------------------------


class Hub(Actor):
    """Routes every frame to the connections that should get it, and nothing else.

    It has no store and starts no tasks: *registry* is its state, changed only here.
    Each connection gets each room's stored messages gap-free: a seq that jumps past the
    connection's last one is held back while its session reads the gap from the store
    (`Connection.on_gap`), and the answer comes back as `Filled` or `FillFailed`.
    """

    def __init__(self, registry: Registry, **actor_options: Any) -> None:
        super().__init__("hub", **actor_options)
        self.registry = registry
        #: Told of every local presence change ``(room, "joined"|"left", username)``; they
        #: must not block (the Redis bridge casts to its mailbox).
        self.presence_listeners: list[Callable[[str, str, str], None]] = []

    def extra_status(self) -> dict[str, Any]:
        registry = self.registry
        return {
            "clients": len(registry.connections),
            "topics": len(registry.subscribers),
            "filling": sum(len(c.held) for c in registry.connections),
        }

    # -- connections ---------------------------------------------------------------------------

    async def _handle_join(self, message: Join) -> None:
        self.registry.connections.add(message.connection)
        metrics.HUB_CLIENTS.set(len(self.registry.connections))

    async def _handle_leave(self, message: Leave) -> None:
        connection = message.connection
        registry = self.registry
        if connection not in registry.connections:
            return
        registry.connections.discard(connection)
        metrics.HUB_CLIENTS.set(len(registry.connections))
        if message.unexpected:
            metrics.CLIENT_DISCONNECTS.inc()
            log.bind(client_id=connection.id, user_id=connection.user_id).warning(
                "client disconnected unexpectedly"
            )
        for topic in list(connection.topics):
            self._remove_subscription(connection, topic)

    # -- subscriptions -------------------------------------------------------------------------

    async def _handle_subscribe(self, message: Subscribe) -> bool:
        """Returns whether the subscription was made (False: the connection left or the
        session already answered)."""
        connection, topic = message.connection, message.topic
        if connection not in self.registry.connections or message.reply.claimed:
            return False
        key = str(topic)
        if not topic.is_room:
            message.reply.answer(200, "ok")  # first: the ctrl precedes the topic's frames
            self._add_subscription(connection, key)
            latest = self.registry.latest_status.get(key)
            if latest is not None:
                connection.offer_latest(key, latest)
            return True
        known = [seq for seq in (self.registry.heads.get(key), message.head) if seq is not None]
        head = max(known) if known else None
        if message.since is None:
            if key not in connection.topics:
                connection.room_seqs[key] = head
            message.reply.answer(200, "ok", {"seq": head})
            self._add_subscription(connection, key)
        else:
            # A connection already subscribed was sent up to room_seqs, in order on this
            # socket: a resubscribe (after a resync, say) never sends those again.
            sent = connection.room_seqs.get(key) if key in connection.topics else None
            connection.room_seqs[key] = message.since if sent is None else max(sent, message.since)
            connection.held.setdefault(key, [])  # a gap fill under way keeps what it holds
            self._add_subscription(connection, key)
        return True

    async def _handle_unsubscribe(self, message: Unsubscribe) -> bool:
        key = str(message.topic)
        if key not in message.connection.topics:
            return False
        self._remove_subscription(message.connection, key)
        return True

    def _add_subscription(self, connection: Connection, key: str) -> None:
        if key in connection.topics:
            return
        connection.topics.add(key)
        self.registry.subscribers[key].add(connection)
        if key.startswith("room:") and connection.username:
            present = self.registry.present[key]
            present[connection.username] += 1
            if present[connection.username] == 1:
                self._presence(key, "joined", connection.username)

    def _remove_subscription(self, connection: Connection, key: str) -> None:
        connection.topics.discard(key)
        connection.room_seqs.pop(key, None)
        connection.held.pop(key, None)
        subscribers = self.registry.subscribers.get(key)
        if subscribers is not None:
            subscribers.discard(connection)
            if not subscribers:
                del self.registry.subscribers[key]
        if key.startswith("room:") and connection.username:
            present = self.registry.present[key]
            present[connection.username] -= 1
            if present[connection.username] <= 0:
                del present[connection.username]
                self._presence(key, "left", connection.username)
            if not present:
                del self.registry.present[key]

    def _presence(self, key: str, change: str, username: str) -> None:
        self._send_presence(key, change, username)
        for listener in self.presence_listeners:
            try:
                listener(key[len("room:") :], change, username)
            except AppError as exc:
                log.bind(topic=key, error=exc.code).error("presence listener refused a change")

    def _send_presence(self, key: str, change: str, username: str) -> None:
        frame = encode(event_frame("presence", {"topic": key, change: username}))
        for subscriber in self.registry.subscribers.get(key, ()):
            subscriber.offer(frame)

    async def _handle_remote_presence(self, message: RemotePresence) -> None:
        if message.username in self.registry.present.get(message.topic, ()):
            return  # online here too: nothing changes for this instance's clients
        self._send_presence(message.topic, message.change, message.username)

    async def _handle_room_head(self, message: RoomHead) -> None:
        key, seq = message.topic, message.seq
        if seq > self.registry.heads.get(key, 0):
            self.registry.heads[key] = seq
        for connection in list(self.registry.subscribers.get(key, ())):
            last = connection.room_seqs.get(key)
            if last is None or seq <= last or key in connection.held:
                continue  # unknown start, up to date, or a fill already under way
            connection.held[key] = []
            self._ask_fill(connection, key, last)

    async def _handle_resync_all(self, message: ResyncAll) -> None:
        for connection in list(self.registry.connections):
            rooms = sorted(key for key in connection.topics if key.startswith("room:"))
            if rooms:
                connection.offer(encode(event_frame("resync", {"topics": rooms})))

    async def _handle_presence_query(self, message: PresenceQuery) -> list[str]:
        return sorted(self.registry.present.get(str(message.topic), {}))

    # -- room messages -------------------------------------------------------------------------

    async def _handle_deliver(self, message: Deliver) -> None:
        batch = message.messages
        key = f"room:{batch[0].room}"
        heads = self.registry.heads
        for stored in batch:
            if stored.seq is not None and stored.seq > heads.get(key, 0):
                heads[key] = stored.seq
        subscribers = self.registry.subscribers.get(key)
        if subscribers:
            self._fan_out(key, batch, subscribers)
            metrics.DELIVERIES.inc(len(batch) * len(subscribers))
        metrics.FANOUT_SECONDS.observe(time.perf_counter() - message.sent_at)

    def _fan_out(self, key: str, batch: tuple[Message, ...], subscribers: set[Connection]) -> None:
        """Route *batch* to each of *subscribers*, building each frame once."""
        # Once per broadcast, not once per client: the text, and the socket's wire bytes.
        frames = [encode(data_frame(stored)) for stored in batch]
        wires = [text_frame(frame) for frame in frames]
        first = batch[0].seq
        if len(batch) > 1 and first is not None and _consecutive(batch):
            # A group commit: a client that is up to date gets the batch in one write.
            joined = b"".join(wires)
            for connection in list(subscribers):
                last = connection.room_seqs.get(key)
                if key not in connection.held and (last is None or last == first - 1):
                    connection.room_seqs[key] = batch[-1].seq  # type: ignore[assignment]
                    connection.offer_all(frames, joined)
                else:
                    for stored, frame, wire in zip(batch, frames, wires, strict=True):
                        self._route(connection, key, stored.seq, frame, wire)
            return
        for connection in list(subscribers):
            for stored, frame, wire in zip(batch, frames, wires, strict=True):
                self._route(connection, key, stored.seq, frame, wire)

    def _route(
        self,
        connection: Connection,
        key: str,
        seq: int | None,
        frame: str,
        wire: bytes | None = None,
    ) -> None:
        """Send one room frame to *connection* in seq order, holding it if a gap opens."""
        held = connection.held.get(key)
        if held is not None:
            held.append((seq, frame))
            if len(held) > connection.limits.max_messages:
                # As far behind as a slow reader: the same remedy, reconnect with since.
                connection.held.pop(key, None)
                connection.evict_slow()
            return
        if seq is None:
            connection.offer(frame, wire)  # spooled: shown now, sent again once it has a seq
            return
        last = connection.room_seqs.get(key)
        if last is None or seq == last + 1:
            connection.room_seqs[key] = seq
            connection.offer(frame, wire)
        elif seq > last + 1:
            connection.held[key] = [(seq, frame)]
            self._ask_fill(connection, key, last)
        # seq <= last: this connection has it already (a repeat, or filled from the store).

    def _ask_fill(self, connection: Connection, key: str, after: int) -> None:
        if connection.on_gap is None:
            self._resync(connection, key)
            return
        connection.on_gap(key, after)

    async def _handle_filled(self, message: Filled) -> None:
        connection, key = message.connection, message.key
        if not _filling(connection, key):
            return
        last = connection.room_seqs.get(key) or 0
        progressed = False
        for stored in message.messages:
            if stored.seq is not None and stored.seq > last:
                connection.offer(encode(data_frame(stored)))
                last, progressed = stored.seq, True
        connection.room_seqs[key] = last
        if not message.complete and progressed:
            self._ask_fill(connection, key, last)
            return
        first = _first_seq(connection.held[key])
        if first is not None and not progressed and first > last + 1:
            # The store has nothing for the gap (yet): don't loop, let the client resync.
            self._resync(connection, key)
            return
        self._release(connection, key)

    async def _handle_fill_failed(self, message: FillFailed) -> None:
        if _filling(message.connection, message.key):
            self._resync(message.connection, message.key)

    def _resync(self, connection: Connection, key: str) -> None:
        """Tell *connection* to recover *key* with ``sub since``, then go on live from here."""
        connection.offer(encode(event_frame("resync", {"topics": [key]})))
        held = connection.held.get(key) or []
        first = _first_seq(held)
        if first is not None:
            connection.room_seqs[key] = first - 1
        self._release(connection, key)

    def _release(self, connection: Connection, key: str) -> None:
        """Let held frames through in order; a further gap holds the rest again."""
        held = connection.held.pop(key, [])
        for seq, frame in held:
            self._route(connection, key, seq, frame)

    # -- events --------------------------------------------------------------------------------

    async def _handle_status_update(self, message: StatusUpdate) -> None:
        frame = encode(event_frame(message.event_type, message.data))
        self.registry.latest_status[message.topic] = frame
        for connection in list(self.registry.subscribers.get(message.topic, ())):
            connection.offer_latest(message.topic, frame)

    async def _handle_topic_event(self, message: TopicEvent) -> None:
        frame = encode(event_frame(message.event_type, message.data))
        conflate_key = f"{message.topic}#{message.data['code']}"
        for connection in list(self.registry.subscribers.get(message.topic, ())):
            connection.offer_latest(conflate_key, frame)

    async def _handle_announce(self, message: Announce) -> None:
        frame = encode(event_frame(message.event_type, message.data))
        for connection in list(self.registry.connections):
            if message.conflate_key is not None:
                connection.offer_latest(message.conflate_key, frame)
            else:
                connection.offer(frame)

    async def _handle_shutdown(self, message: Shutdown) -> list[Connection]:
        """Say goodbye to every client and start closing it; returns those being closed."""
        connections = list(self.registry.connections)
        log.bind(clients=len(connections)).info("telling clients the server is shutting down")
        for connection in connections:
            farewell = encode(error_event(
                "SERVER_SHUTDOWN", "server is restarting; reconnect later",
                component="hub", severity="warning",
                reconnect_after_ms=random.randint(500, max(500, message.reconnect_spread_ms)),
            ))  # fmt: skip
            connection.offer(farewell)
            connection.shut(CLOSE_GOING_AWAY, "server shutdown", drain=message.drain)
        return connections


def _filling(connection: Connection, key: str) -> bool:
    """Whether *connection* still waits on a fill of *key* (not unsubscribed or left since)."""
    return key in connection.topics and key in connection.held


def _consecutive(batch: tuple[Message, ...]) -> bool:
    """Whether *batch*'s seqs run without gaps or repeats (a fresh group commit)."""
    return all(
        earlier.seq is not None and later.seq == earlier.seq + 1
        for earlier, later in zip(batch, batch[1:], strict=False)
    )


def _first_seq(held: list[tuple[int | None, str]]) -> int | None:
    return next((seq for seq, _ in held if seq is not None), None)


def count_error(exc: BaseException) -> None:
    """Count an error answered to a client under its string code."""
    code = exc.code if isinstance(exc, AppError) else "INTERNAL_ERROR"
    metrics.HUB_ERRORS.labels(code).inc()


__all__ = [
    "Announce", "Deliver", "FillFailed", "Filled", "Hub", "Join", "Leave", "PresenceQuery",
    "Registry", "Shutdown", "StatusUpdate", "Subscribe", "TopicEvent", "Unsubscribe",
    "count_error",
]  # fmt: skip
