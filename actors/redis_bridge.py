"""RedisBridge: carries stored messages and presence between instances through Redis."""

from __future__ import annotations

import asyncio
import enum
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from actors.base import Actor
from app import metrics
from app.errors import MailboxFull
from app.log import get_logger
from app.models import Message
from app.resilience import Backoff

log = get_logger("redis_bridge")

#: Every instance's stored room messages: ``{"i": instance, "m": [record, ...]}``; and,
#: after an outage, the rooms' heads it stored meanwhile: ``{"i": instance, "h": {room: seq}}``.
MESSAGES_CHANNEL = "hearth:messages"
#: Presence changes: ``{"i": instance, "room": ..., "change": "joined"|"left", "user": ...}``.
PRESENCE_CHANNEL = "hearth:presence"
#: Sorted set of instance ids, scored by the Redis time of their last presence refresh.
INSTANCES_KEY = "hearth:instances"
#: Message ids remembered to drop a copy that arrives twice.
SEEN_IDS = 10_000


def canary_channel(instance: str) -> str:
    """The channel an instance sends its canary on; only that instance listens to it."""
    return f"hearth:canary:{instance}"


def presence_key(room: str, instance: str) -> str:
    """The Redis set of *instance*'s users online in *room*; it expires with the instance."""
    return f"hearth:presence:{room}:{instance}"


class BridgeState(enum.StrEnum):
    """Whether cross-instance delivery works, as the canary last showed."""

    #: No HEARTH_REDIS_URL: one instance, nothing to bridge.
    DISABLED = "disabled"
    #: Subscribing, or waiting for the first canary back.
    CONNECTING = "connecting"
    #: The canary comes back: what other instances store reaches this one.
    CONNECTED = "connected"
    #: Local-only mode: delivery and persistence go on here, nothing crosses instances.
    DEGRADED = "degraded"


# -- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outgoing:
    """Messages this instance stored (one room's, in seq order): publish them."""

    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class PresenceChanged:
    """A user's first connection in *room* on this instance joined, or its last one left."""

    room: str
    change: str
    username: str


@dataclass(frozen=True, slots=True)
class Received:
    """A pub/sub message from Redis, from the listener of *generation*."""

    generation: int
    channel: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Subscribed:
    """The listener of *generation* has its subscriptions active."""

    generation: int


@dataclass(frozen=True, slots=True)
class ListenerEnded:
    """The listener of *generation* stopped, for *reason*."""

    generation: int
    reason: str


@dataclass(frozen=True, slots=True)
class CanaryTick:
    """Time to send a canary, judge the last ones, and reconnect if it is time."""


@dataclass(frozen=True, slots=True)
class CanarySent:
    """How publishing the canary stamped *sent_at* went: None, or the error's name."""

    sent_at: float
    error: str | None


@dataclass(frozen=True, slots=True)
class AnnounceHeads:
    """Tell the other instances up to which seq this one stored while they were cut off."""


@dataclass(frozen=True, slots=True)
class PresenceRefresh:
    """Time to rewrite this instance's presence sets and extend their TTL."""


@dataclass(frozen=True, slots=True)
class OnlineUsers:
    """Who is online in *room* on every instance (call); falls back to this instance's."""

    room: str


# -- the actor --------------------------------------------------------------------------------


class RedisBridge(Actor):
    """Publishes what this instance stores, and delivers what the others store, via Redis.

    Stored messages arrive from the writers' outlet as `Outgoing` and are published once,
    never retried (a retried PUBLISH can deliver twice). A listener task turns Redis
    pub/sub messages into `Received`; another instance's messages go to the hub, whose
    per-connection seq tracking delivers each once and in order and repairs a gap from
    the store. Copies already seen are dropped by message id.

    Redis can fail silently (pub/sub reconnects quietly; a stopped server raises
    nothing), so a canary makes a round trip through Redis every *canary_interval*
    seconds. Two missed canaries, or any Redis error, switch to local-only mode
    (`BridgeState.DEGRADED`): a WARN, ``degraded {component: "redis"}`` to every client,
    and reconnects with *backoff*. Once a canary comes back on a fresh subscription the
    bridge is connected again: an INFO, and every client gets ``resync`` for its rooms so
    it recovers from PostgreSQL what pub/sub lost meanwhile.

    Presence: each instance keeps its users per room in Redis sets that expire after two
    *presence_interval* s unless refreshed, and publishes joins and leaves.

    The callbacks reach the hub without blocking: *deliver* routes other instances'
    messages, *room_head* tells it a room's head stored elsewhere, *announce* sends an event
    to every client, *resync_all* resyncs every client, *remote_presence* passes on another
    instance's presence change; *local_presence* and *local_rooms* read this instance's
    presence (one room's users; every room's).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        instance: str,
        *,
        deliver: Callable[[tuple[Message, ...]], None],
        room_head: Callable[[str, int], None],
        announce: Callable[[str, dict[str, Any]], None],
        resync_all: Callable[[], None],
        remote_presence: Callable[[str, str, str], None],
        local_presence: Callable[[str], list[str]],
        local_rooms: Callable[[], dict[str, list[str]]],
        timeout: float = 1.0,
        canary_interval: float = 1.0,
        presence_interval: float = 5.0,
        backoff: Backoff = Backoff(initial=0.5, max_delay=10.0, jitter=0.2),
        **actor_options: Any,
    ) -> None:
        super().__init__("redis_bridge", **actor_options)
        self.client = client
        self.instance = instance
        self.deliver = deliver
        self.room_head = room_head
        self.announce = announce
        self.resync_all = resync_all
        self.remote_presence = remote_presence
        self.local_presence = local_presence
        self.local_rooms = local_rooms
        self.timeout = timeout
        self.canary_interval = canary_interval
        self.presence_interval = presence_interval
        self.backoff = backoff
        self.published = self.received = self.duplicates = 0
        self._reset()

    def _reset(self) -> None:
        self.bridge_state = BridgeState.CONNECTING
        self.state_since = time.monotonic()
        #: Listener generations: a late report from an old listener is ignored.
        self.generation = 0
        self.listener: asyncio.Task[None] | None = None
        self.subscribed = False
        self.failures = 0
        self.next_attempt = 0.0
        #: Monotonic send time of the canary published last, and whether one is on its way.
        self.canary_pending = False
        self.last_canary_sent: float | None = None
        self.last_canary_back: float | None = None
        self.canary_rtt: float | None = None
        #: Ids of other instances' messages delivered lately.
        self.seen: OrderedDict[str, None] = OrderedDict()
        #: Whether pub/sub may have lost messages since clients last resynced.
        self.lost_since_resync = False
        #: room -> newest seq stored here that the other instances were not told of.
        self.unannounced: dict[str, int] = {}

    async def on_start(self) -> None:
        self._reset()
        self._connect()
        self.send_every(self.canary_interval, CanaryTick())
        self.send_every(self.presence_interval, PresenceRefresh())
        self.cast(CanaryTick())

    def extra_status(self) -> dict[str, Any]:
        return {
            "bridge_state": self.bridge_state.value,
            "instance": self.instance,
            "canary_age_seconds": self.canary_age(),
            "canary_rtt_ms": None if self.canary_rtt is None else round(self.canary_rtt * 1000, 2),
            "published": self.published,
            "received": self.received,
            "duplicates_dropped": self.duplicates,
        }

    def canary_age(self) -> float | None:
        """Seconds since a canary last came back; None before the first."""
        if self.last_canary_back is None:
            return None
        return round(time.monotonic() - self.last_canary_back, 3)

    def degraded_for(self) -> float:
        """Seconds the bridge has been in local-only mode; 0 when it is not."""
        if self.bridge_state is not BridgeState.DEGRADED:
            return 0.0
        return time.monotonic() - self.state_since

    # -- outgoing ------------------------------------------------------------------------------

    async def _handle_outgoing(self, message: Outgoing) -> None:
        stored = [m for m in message.messages if m.seq is not None]  # spooled previews stay here
        if not stored:
            return
        if self.bridge_state is not BridgeState.DEGRADED:
            payload = json.dumps(
                {"i": self.instance, "m": [m.to_record() for m in stored]}, separators=(",", ":")
            )
            if await self._publish(MESSAGES_CHANNEL, payload):
                self.published += len(stored)
                metrics.BRIDGE_MESSAGES.labels("out").inc(len(stored))
                return
        # Local-only: the others learn of it at recovery (`AnnounceHeads`), or repair
        # the gap from the store on the room's next message.
        newest = max(m.seq or 0 for m in stored)
        room = stored[0].room
        self.unannounced[room] = max(newest, self.unannounced.get(room, 0))

    async def _handle_presence_changed(self, message: PresenceChanged) -> None:
        if self.bridge_state is BridgeState.DEGRADED:
            return  # the refresh after recovery writes the whole set again
        key = presence_key(message.room, self.instance)
        ttl = self._presence_ttl()
        try:
            async with asyncio.timeout(self.timeout):
                async with self.client.pipeline(transaction=False) as pipe:
                    if message.change == "joined":
                        pipe.sadd(key, message.username)
                    else:
                        pipe.srem(key, message.username)
                    pipe.expire(key, ttl)
                    await pipe.execute()
        except Exception as exc:
            self._degrade(f"presence update failed: {type(exc).__name__}")
            return
        payload = json.dumps(
            {"i": self.instance, "room": message.room, "change": message.change,
             "user": message.username},
            separators=(",", ":"),
        )  # fmt: skip
        await self._publish(PRESENCE_CHANNEL, payload)

    async def _publish(self, channel: str, payload: str) -> bool:
        """PUBLISH once within the timeout; a failure switches to local-only mode."""
        try:
            async with asyncio.timeout(self.timeout):
                await self.client.publish(channel, payload)
        except Exception as exc:
            self._degrade(f"publish failed: {type(exc).__name__}")
            return False
        return True

    # -- incoming ------------------------------------------------------------------------------

    async def _handle_received(self, message: Received) -> None:
        if message.generation != self.generation:
            return
        try:
            if message.channel == canary_channel(self.instance):
                self._canary_back(float(message.data))
                return
            body = json.loads(message.data)
            if body["i"] == self.instance:
                return  # our own, delivered locally already
            if message.channel == MESSAGES_CHANNEL and "h" in body:
                for room, seq in body["h"].items():
                    self.room_head(str(room), int(seq))
            elif message.channel == MESSAGES_CHANNEL:
                self._deliver([Message.from_record(record) for record in body["m"]])
            elif message.channel == PRESENCE_CHANNEL:
                self.remote_presence(str(body["room"]), str(body["change"]), str(body["user"]))
        except (KeyError, TypeError, ValueError) as exc:
            # Another version's format, or garbage: never a crash loop over one message.
            log.bind(channel=message.channel, error=type(exc).__name__).warning(
                "unreadable message from Redis dropped"
            )

    def _deliver(self, messages: list[Message]) -> None:
        fresh = []
        for stored in messages:
            if stored.id in self.seen:
                self.duplicates += 1
                continue
            self.seen[stored.id] = None
            if len(self.seen) > SEEN_IDS:
                self.seen.popitem(last=False)
            fresh.append(stored)
        if not fresh:
            return
        self.received += len(fresh)
        metrics.BRIDGE_MESSAGES.labels("in").inc(len(fresh))
        try:
            self.deliver(tuple(fresh))
        except MailboxFull:
            # The hub's receivers repair the gap from the store on the room's next message.
            log.bind(topic=f"room:{fresh[0].room}", count=len(fresh)).error(
                "hub full; messages from another instance not routed"
            )

    async def _handle_online_users(self, message: OnlineUsers) -> list[str]:
        local = self.local_presence(message.room)
        if self.bridge_state is not BridgeState.CONNECTED:
            return local
        try:
            async with asyncio.timeout(self.timeout):
                seconds, _ = await self.client.time()
                live = await self.client.zrangebyscore(
                    INSTANCES_KEY, seconds - self._presence_ttl(), "+inf"
                )
                keys = [presence_key(message.room, _text(i)) for i in live]
                remote = await self.client.sunion(keys) if keys else set()
        except Exception as exc:
            self._degrade(f"presence query failed: {type(exc).__name__}")
            return local
        return sorted({*local, *(_text(user) for user in remote)})

    # -- the canary and the connection ---------------------------------------------------------

    async def _handle_canary_tick(self, message: CanaryTick) -> None:
        now = time.monotonic()
        age = self.canary_age()
        metrics.REDIS_CANARY_AGE.set(-1 if age is None else age)
        overdue = self.last_canary_sent is not None and (
            self.last_canary_back is None or self.last_canary_back < self.last_canary_sent
        )
        if (
            self.bridge_state is BridgeState.CONNECTED
            and overdue
            and now - (self.last_canary_back or 0) > 2 * self.canary_interval
        ):
            self._degrade("two canaries missed")
        if self.listener is None and now >= self.next_attempt:
            self._connect()
        if not self.canary_pending:
            self.canary_pending = True
            self.spawn(self._send_canary(now), name="canary")

    async def _send_canary(self, sent_at: float) -> None:
        error = None
        try:
            async with asyncio.timeout(self.timeout):
                await self.client.publish(canary_channel(self.instance), repr(sent_at))
        except Exception as exc:
            error = type(exc).__name__
        self.cast(CanarySent(sent_at, error))

    async def _handle_canary_sent(self, message: CanarySent) -> None:
        self.canary_pending = False
        if message.error is not None:
            self._degrade(f"canary publish failed: {message.error}")
            return
        self.last_canary_sent = message.sent_at

    def _canary_back(self, sent_at: float) -> None:
        now = time.monotonic()
        self.last_canary_back = now
        self.canary_rtt = now - sent_at
        metrics.REDIS_CANARY_RTT.set(self.canary_rtt)
        if self.bridge_state is not BridgeState.CONNECTED and self.subscribed:
            self._connected()

    def _connect(self) -> None:
        """Start a listener with fresh subscriptions (a new generation)."""
        self.generation += 1
        self.subscribed = False
        self.listener = self.spawn(self._listen(self.generation), name="listen")

    async def _listen(self, generation: int) -> None:
        # Touches no state: everything it learns comes back as messages.
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        reason = "ended"
        try:
            async with asyncio.timeout(self.timeout):
                await pubsub.subscribe(
                    MESSAGES_CHANNEL, PRESENCE_CHANNEL, canary_channel(self.instance)
                )
            self.cast(Subscribed(generation))
            while True:
                item = await pubsub.get_message(timeout=self.canary_interval)
                if item is not None:
                    channel = item["channel"]
                    self.cast(Received(generation, channel.decode(), item["data"]))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = type(exc).__name__
        finally:
            try:
                async with asyncio.timeout(self.timeout):
                    await pubsub.aclose()
            except Exception:
                pass  # the connection is what failed; nothing more to release
        self.cast(ListenerEnded(generation, reason))

    async def _handle_subscribed(self, message: Subscribed) -> None:
        if message.generation == self.generation:
            self.subscribed = True

    async def _handle_listener_ended(self, message: ListenerEnded) -> None:
        if message.generation != self.generation:
            return
        self._degrade(f"subscription lost: {message.reason}")

    def _degrade(self, reason: str) -> None:
        """Switch to local-only mode and schedule a reconnect with backoff.

        Once degraded, only a reconnect that fails again (its listener ends, or its
        canary does not come back) lengthens the backoff; the canaries sent meanwhile
        failing is what local-only mode expects.
        """
        self.lost_since_resync = True
        reconnecting = self.listener is not None
        if reconnecting and not self.listener.done():  # type: ignore[union-attr]
            self.listener.cancel()  # type: ignore[union-attr]
        self.listener = None
        self.subscribed = False
        if self.bridge_state is BridgeState.DEGRADED and not reconnecting:
            return
        self.failures += 1
        self.next_attempt = time.monotonic() + self.backoff.delay(self.failures)
        if self.bridge_state is BridgeState.DEGRADED:
            return
        log.bind(reason=reason, retry_count=self.failures).warning(
            "Redis lost: local-only mode, delivery across instances stops"
        )
        self._set_state(BridgeState.DEGRADED)
        self.announce("degraded", {"component": "redis", "state": "degraded"})

    def _connected(self) -> None:
        first = self.bridge_state is BridgeState.CONNECTING and not self.lost_since_resync
        self._set_state(BridgeState.CONNECTED)
        self.failures = 0
        self.cast(PresenceRefresh())  # list this instance's users (again) at once
        if first:
            log.bind(instance=self.instance).info("Redis bridge connected")
            return
        log.bind(instance=self.instance).info("Redis recovered: delivery across instances resumes")
        self.announce("degraded", {"component": "redis", "state": "connected"})
        # What pub/sub dropped meanwhile is in PostgreSQL: every client here recovers with
        # since, and the other instances' clients catch up on what was stored here.
        self.resync_all()
        self.lost_since_resync = False
        if self.unannounced:
            self.cast(AnnounceHeads())

    async def _handle_announce_heads(self, message: AnnounceHeads) -> None:
        if not self.unannounced or self.bridge_state is not BridgeState.CONNECTED:
            return
        heads, self.unannounced = self.unannounced, {}
        payload = json.dumps({"i": self.instance, "h": heads}, separators=(",", ":"))
        if not await self._publish(MESSAGES_CHANNEL, payload):
            for room, seq in heads.items():  # told next time, unless newer ones came
                self.unannounced[room] = max(seq, self.unannounced.get(room, 0))

    def _set_state(self, state: BridgeState) -> None:
        self.bridge_state = state
        self.state_since = time.monotonic()
        for each in BridgeState:
            metrics.REDIS_STATE.labels(each.value).set(1 if each is state else 0)

    # -- presence refresh ----------------------------------------------------------------------

    def _presence_ttl(self) -> int:
        return max(1, round(2 * self.presence_interval))

    async def _handle_presence_refresh(self, message: PresenceRefresh) -> None:
        if self.bridge_state is not BridgeState.CONNECTED:
            return
        ttl = self._presence_ttl()
        try:
            async with asyncio.timeout(self.timeout):
                seconds, _ = await self.client.time()
                async with self.client.pipeline(transaction=False) as pipe:
                    pipe.zadd(INSTANCES_KEY, {self.instance: seconds})
                    # Instances silent for a day are gone for good.
                    pipe.zremrangebyscore(INSTANCES_KEY, "-inf", seconds - 86_400)
                    for room, users in self.local_rooms().items():
                        key = presence_key(room, self.instance)
                        pipe.delete(key)
                        if users:
                            pipe.sadd(key, *users)
                            pipe.expire(key, ttl)
                    await pipe.execute()
        except Exception as exc:
            self._degrade(f"presence refresh failed: {type(exc).__name__}")


def _text(value: Any) -> str:
    """A Redis reply as text (the client returns bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


__all__ = [
    "BridgeState", "CanaryTick", "OnlineUsers", "Outgoing", "PresenceChanged",
    "PresenceRefresh", "RedisBridge", "canary_channel", "presence_key",
]  # fmt: skip
