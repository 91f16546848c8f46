"""Hub: owns connections and subscriptions, stores publishes through the store, and fans out."""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from actors.base import Actor
from app import metrics
from app.connection import CLOSE_GOING_AWAY, Connection
from app.errors import AppError, ServerShutdown, is_retryable
from app.log import get_logger
from app.models import Message
from app.protocol import Topic, data_frame, encode, error_event, event_frame
from app.store import PublishResult, Store

log = get_logger("hub")

T = TypeVar("T")


class AccessCheck(Protocol):
    """Raises when *connection* may not read or write *room* (see app.auth)."""

    def __call__(self, connection: Connection, room: str) -> Awaitable[None]: ...


@dataclass
class Registry:
    """Connections, subscriptions and presence: the hub's state that outlives a hub crash."""

    connections: set[Connection] = field(default_factory=set)
    #: topic string -> subscribed connections.
    subscribers: defaultdict[str, set[Connection]] = field(default_factory=lambda: defaultdict(set))
    #: room topic -> username -> how many of that user's connections are subscribed.
    present: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    #: (connection, topic) -> live frames held back while history is being sent.
    catching_up: dict[tuple[Connection, str], list[tuple[int | None, str]]] = field(
        default_factory=dict
    )
    #: Newest encoded frame of each status topic, for new subscribers.
    latest_status: dict[str, str] = field(default_factory=dict)
    #: One lock per room, so stored order and fan-out order agree.
    room_locks: defaultdict[str, asyncio.Lock] = field(
        default_factory=lambda: defaultdict(asyncio.Lock)
    )
    #: Publishes under way, awaited on shutdown so none is half-done.
    in_flight: set[asyncio.Task[Any]] = field(default_factory=set)
    #: False once shutdown began: later publishes are refused before they touch the store.
    accepting: bool = True


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
    """Subscribe *connection* to *topic*; with *since*, hold live frames until `CatchUp`."""

    connection: Connection
    topic: Topic
    since: int | None = None


@dataclass(frozen=True, slots=True)
class CatchUp:
    """Send what *connection* missed in *topic* after seq *since*, then go live."""

    connection: Connection
    topic: Topic
    since: int


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """End *connection*'s subscription to *topic*."""

    connection: Connection
    topic: Topic


@dataclass(frozen=True, slots=True)
class Publish:
    """Store *message* from *connection* and fan it out."""

    connection: Connection
    message: Message


@dataclass(frozen=True, slots=True)
class History:
    """A page of *room* history for *connection*."""

    connection: Connection
    room: str
    since: int | None
    before: int | None
    limit: int


@dataclass(frozen=True, slots=True)
class Deliver:
    """Fan out a message stored elsewhere (the spool drain, another instance)."""

    message: Message


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
class PresenceQuery:
    """Who is online in room *topic*."""

    topic: Topic


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Tell every client to come back later, let publishes finish, then close with 1001."""

    reconnect_spread_ms: int = 5000
    deadline: float = 5.0


# -- the actor --------------------------------------------------------------------------------


class Hub(Actor):
    """Routes every frame between clients, the store and the other actors.

    *registry* holds the state that survives restarts, *store* commits publishes, and
    *check_access* guards rooms. Work that waits on PostgreSQL runs in tasks the hub starts,
    so one slow query never holds up the mailbox; their results come back to the caller.
    """

    def __init__(
        self, registry: Registry, store: Store, check_access: AccessCheck, **actor_options: Any
    ) -> None:
        super().__init__("hub", **actor_options)
        self.registry = registry
        self.store = store
        self.check_access = check_access

    def extra_status(self) -> dict[str, Any]:
        registry = self.registry
        return {
            "clients": len(registry.connections),
            "topics": len(registry.subscribers),
            "in_flight": len(registry.in_flight),
        }

    async def request(self, message: object, timeout: float = 10.0) -> Any:
        """Send *message* and wait for the outcome of the work it started.

        The work is shielded: a caller that gives up does not interrupt a half-done publish.
        """
        task = await self.call(message, timeout=timeout)
        async with asyncio.timeout(timeout):
            return await asyncio.shield(task)

    def _spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.create_task(work)
        self.registry.in_flight.add(task)
        task.add_done_callback(self.registry.in_flight.discard)
        return task

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

    async def _handle_subscribe(self, message: Subscribe) -> asyncio.Task[int | None]:
        return self._spawn(self._subscribe(message))

    async def _subscribe(self, message: Subscribe) -> int | None:
        connection, topic = message.connection, message.topic
        key = str(topic)
        if not topic.is_room:
            self._add_subscription(connection, key)
            latest = self.registry.latest_status.get(key)
            if latest is not None:
                connection.offer_latest(key, latest)
            return None
        await self.check_access(connection, topic.name)
        try:
            seq: int | None = await self.store.latest_seq(topic.name)
        except Exception as exc:
            # With PostgreSQL away the room still works live; the seq is just unknown.
            if not is_retryable(exc):
                raise
            seq = None
        if message.since is not None:
            self.registry.catching_up[(connection, key)] = []
        self._add_subscription(connection, key)
        return seq

    async def _handle_catch_up(self, message: CatchUp) -> asyncio.Task[int]:
        return self._spawn(self._catch_up(message))

    async def _catch_up(self, message: CatchUp) -> int:
        connection, key = message.connection, str(message.topic)
        last, sent = message.since, 0
        try:
            while True:
                page = await self.store.history(message.topic.name, since=last, limit=100)
                for stored in page:
                    connection.offer(encode(data_frame(stored)))
                    last = stored.seq or last
                sent += len(page)
                if len(page) < 100:
                    break
        except Exception:
            # The client is live again either way; resync tells it to ask once more.
            connection.offer(encode(event_frame("resync", {"topics": [key]})))
            raise
        finally:
            # No await from here on: held frames and live traffic must not interleave.
            held = self.registry.catching_up.pop((connection, key), [])
            for seq, frame in held:
                if seq is None or seq > last:
                    connection.offer(frame)
        return sent

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
        self.registry.catching_up.pop((connection, key), None)
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
        frame = encode(event_frame("presence", {"topic": key, change: username}))
        for subscriber in self.registry.subscribers.get(key, ()):
            subscriber.offer(frame)

    async def _handle_presence_query(self, message: PresenceQuery) -> list[str]:
        return sorted(self.registry.present.get(str(message.topic), {}))

    # -- publishing ----------------------------------------------------------------------------

    async def _handle_publish(self, message: Publish) -> asyncio.Task[PublishResult]:
        return self._spawn(self._publish(message))

    async def _publish(self, message: Publish) -> PublishResult:
        if not self.registry.accepting:
            raise ServerShutdown(retry_after=5)
        room = message.message.room
        await self.check_access(message.connection, room)
        async with self.registry.room_locks[room]:
            result = await self.store.publish(message.message)
            if result.repeat:
                return result  # subscribers saw it the first time
            self._fan_out(result.message)
        return result

    async def _handle_history(self, message: History) -> asyncio.Task[list[Message]]:
        return self._spawn(self._history(message))

    async def _history(self, message: History) -> list[Message]:
        await self.check_access(message.connection, message.room)
        page = await self.store.history(
            message.room, since=message.since, before=message.before, limit=message.limit
        )
        for stored in page:
            message.connection.offer(encode(data_frame(stored)))
        return page

    async def _handle_deliver(self, message: Deliver) -> None:
        self._fan_out(message.message)

    def _fan_out(self, message: Message) -> None:
        key = f"room:{message.room}"
        subscribers = self.registry.subscribers.get(key)
        if not subscribers:
            return
        frame = encode(data_frame(message))  # once per broadcast, not once per client
        for connection in list(subscribers):
            held = self.registry.catching_up.get((connection, key))
            if held is not None:
                held.append((message.seq, frame))
            else:
                connection.offer(frame)

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

    async def _handle_shutdown(self, message: Shutdown) -> asyncio.Task[None]:
        self.registry.accepting = False
        return asyncio.create_task(self._shutdown(message))

    async def _shutdown(self, message: Shutdown) -> None:
        registry = self.registry
        log.bind(clients=len(registry.connections), in_flight=len(registry.in_flight)).info(
            "telling clients the server is shutting down"
        )
        if registry.in_flight:
            await asyncio.wait(list(registry.in_flight), timeout=message.deadline / 2)
        connections = list(registry.connections)
        for connection in connections:
            farewell = encode(error_event(
                "SERVER_SHUTDOWN", "server is restarting; reconnect later",
                component="hub", severity="warning",
                reconnect_after_ms=random.randint(500, max(500, message.reconnect_spread_ms)),
            ))  # fmt: skip
            connection.offer(farewell)
            connection.shut(CLOSE_GOING_AWAY, "server shutdown", drain=message.deadline / 4)
        if connections:
            closing = [asyncio.create_task(c.wait_closed()) for c in connections]
            await asyncio.wait(closing, timeout=message.deadline / 2)


def count_error(exc: BaseException) -> None:
    """Count an error answered to a client under its string code."""
    code = exc.code if isinstance(exc, AppError) else "INTERNAL_ERROR"
    metrics.HUB_ERRORS.labels(code).inc()


__all__ = [
    "Announce", "CatchUp", "Deliver", "History", "Hub", "Join", "Leave",
    "PresenceQuery", "Publish", "Registry", "Shutdown", "StatusUpdate", "Subscribe",
    "TopicEvent", "Unsubscribe", "count_error",
]  # fmt: skip
