"""DbMonitor: owns the PostgreSQL pool, pings it, reconnects with backoff, keeps the room directory."""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from actors.base import Actor
from app import metrics
from app.directory import RoomDirectory
from app.errors import AppError
from app.log import get_logger, redact_dsn
from app.models import RoomRecord
from app.resilience import Backoff
from app.store import Store

log = get_logger("db_monitor")


class DbState(enum.StrEnum):
    """Where the connection to PostgreSQL stands."""

    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    RECONNECTING = "reconnecting"
    #: Still retrying, but past ``error_after`` failures: someone should look.
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Ping:
    """Time to check the connection."""


@dataclass(frozen=True, slots=True)
class CheckNow:
    """Someone saw PostgreSQL fail: ping once now, without waiting for the next tick."""


@dataclass(frozen=True, slots=True)
class ReloadRooms:
    """Load the whole room directory again (at start, and after notifications may be lost)."""


@dataclass(frozen=True, slots=True)
class RefreshRoom:
    """Room *name* changed (a NOTIFY, or this instance changed it): reload just that room."""

    name: str


@dataclass(frozen=True, slots=True)
class ListenerEnded:
    """The LISTEN connection ended; it is opened again after the next good ping."""


@dataclass(frozen=True, slots=True)
class RecordTransition:
    """Another component's state change, to be kept in ``connection_events``."""

    component: str
    state: str
    previous: str


#: Called with (component, state) on every transition, e.g. to tell clients about degradation.
StateListener = Callable[[str, str], None]


class DbMonitor(Actor):
    """Watches PostgreSQL and publishes its state; the store reads ``available`` from it.

    *store* is the pool owner's store, *ping_interval* the seconds between pings while
    connected, *backoff* the reconnect schedule (1, 2, 4 … 32 s), *error_after* the failed
    retries after which the state turns ``error``; *listeners* see every state change.
    It also keeps *directory* fresh: a full load whenever the connection (re)starts, and
    one room at a time on each ``hearth_rooms`` notification.
    """

    def __init__(
        self,
        store: Store,
        directory: RoomDirectory | None = None,
        *,
        ping_interval: float = 5.0,
        backoff: Backoff = Backoff(initial=1.0, base=2.0, max_delay=32.0, jitter=0.1),
        error_after: int = 5,
        **actor_options: Any,
    ) -> None:
        super().__init__("db_monitor", **actor_options)
        self.store = store
        self.directory = directory if directory is not None else RoomDirectory()
        self.ping_interval = ping_interval
        self.backoff = backoff
        self.error_after = error_after
        #: Who hears about state changes; append to subscribe.
        self.listeners: list[StateListener] = []
        #: Current state; survives restarts so a restart is not mistaken for a recovery.
        self.db_state = DbState.DISCONNECTED
        #: Failed pings since the connection was last good.
        self.failed_attempts = 0
        #: Seconds the last good ping took.
        self.latency: float | None = None
        #: Monotonic time of the last good ping; writers trust PostgreSQL again after it.
        self.last_ok_at: float | None = None
        # Transitions waiting to be written to connection_events once the database is back.
        self._pending_events: deque[tuple[str, str, str, int | None, str]] = deque(maxlen=100)
        self._listener: asyncio.Task[None] | None = None
        # Set once the listener's LISTEN is active (or it failed trying).
        self._listening = asyncio.Event()
        self._check_queued = False
        #: Monotonic start of the ping under way, None between pings.
        self.ping_started_at: float | None = None

    async def on_start(self) -> None:
        await self.store.open()
        self._listener = None
        # Ping (and load the room directory) before saying ready, so the first client
        # finds the rooms; with PostgreSQL away this costs one store timeout.
        await self._handle_ping(Ping())

    def usable_after(self, since: float | None) -> bool:
        """Whether PostgreSQL is available and, given *since*, answered a ping after it."""
        if not self.store.available:
            return False
        return since is None or (self.last_ok_at is not None and self.last_ok_at > since)

    def check_soon(self) -> None:
        """Ask for one extra ping now (cheap to call often: at most one is queued)."""
        if self._check_queued:
            return
        try:
            self.cast(CheckNow())
        except AppError:
            return  # a full mailbox: the regular ping comes soon anyway
        self._check_queued = True

    def extra_status(self) -> dict[str, Any]:
        return {
            "db_state": self.db_state.value,
            "failed_attempts": self.failed_attempts,
            "latency_ms": None if self.latency is None else round(self.latency * 1000, 2),
            "pool": self.store.pool_stats(),
            "dsn": redact_dsn(self.store.dsn),
            "directory": self.directory.status(),
            "listening": self._listening.is_set()
            and self._listener is not None
            and not self._listener.done(),
        }

    async def _handle_ping(self, message: Ping) -> None:
        if await self._ping():
            self.send_after(self.ping_interval, Ping())
        else:
            self.send_after(self.backoff.delay(self.failed_attempts), Ping())

    async def _handle_check_now(self, message: CheckNow) -> None:
        self._check_queued = False
        await self._ping()

    def ping_waiting(self) -> float:
        """Seconds the ping under way has waited so far: a hung server shows here long
        before the ping's deadline turns it into a timeout. 0 between pings."""
        started = self.ping_started_at
        return 0.0 if started is None else time.monotonic() - started

    def last_ok_age(self) -> float | None:
        """Seconds since a ping last succeeded; None before the first."""
        return None if self.last_ok_at is None else time.monotonic() - self.last_ok_at

    async def _ping(self) -> bool:
        self.ping_started_at = time.monotonic()
        try:
            self.latency = await self.store.ping()
        except Exception as exc:
            await self._ping_failed(exc)
            return False
        finally:
            self.ping_started_at = None
        metrics.DB_PING_SECONDS.set(self.latency)
        self.last_ok_at = time.monotonic()
        if self.db_state is not DbState.CONNECTED:
            self._transition(DbState.CONNECTED, "ping succeeded")
        self.failed_attempts = 0
        self.store.available = True
        await self._flush_events()
        if self._listener is None or self._listener.done():
            # Notifications sent while nobody listened are lost: load everything again,
            # once LISTEN is active, so a change in between is in the load or notified.
            self._listening = listening = asyncio.Event()
            self._listener = self.spawn(self._listen(listening), name="listen-rooms")
            try:
                async with asyncio.timeout(self.store.timeout):
                    await listening.wait()
            except TimeoutError:
                log.warning("room notifications not active in time; loading rooms anyway")
            await self._handle_reload_rooms(ReloadRooms())
        return True

    async def _listen(self, listening: asyncio.Event) -> None:
        """Turn ``hearth_rooms`` notifications into `RefreshRoom` messages; set *listening*
        once LISTEN is active (or has failed)."""
        try:
            async with self.store.listen("hearth_rooms") as listener:
                listening.set()
                while True:
                    name = await listener.next(timeout=60.0)
                    if name is not None:
                        self.cast(RefreshRoom(name))
        except AppError as exc:
            log.bind(error=exc.code, detail=exc.detail).warning("room notifications stopped")
        finally:
            listening.set()
            try:
                self.cast(ListenerEnded())
            except AppError:
                pass  # the next good ping sees the listener is gone anyway

    async def _handle_listener_ended(self, message: ListenerEnded) -> None:
        if self._listener is not None and self._listener.done():
            self._listener = None

    async def _handle_reload_rooms(self, message: ReloadRooms) -> int:
        """Returns how many rooms were loaded (0 when PostgreSQL did not answer)."""
        try:
            records = await self.store.load_rooms()
        except AppError as exc:
            log.bind(error=exc.code).warning("room directory not reloaded")
            return 0
        self.directory.replace_all(records)
        log.bind(rooms=len(records)).info("room directory loaded")
        try:
            await asyncio.to_thread(self.directory.save_snapshot)
        except OSError as exc:
            log.bind(error=type(exc).__name__).warning("room directory snapshot not saved")
        return len(records)

    async def _handle_refresh_room(self, message: RefreshRoom) -> RoomRecord | None:
        """Returns the room as now stored, or None when it is gone; raises DatabaseError."""
        record = await self.store.load_room(message.name)
        self.directory.put(message.name, record)
        return record

    async def _ping_failed(self, exc: Exception) -> None:
        self.failed_attempts += 1
        self.store.available = False
        reason = type(exc).__name__
        if self.db_state is DbState.CONNECTED:
            self._transition(DbState.DISCONNECTED, reason)
            # Pooled connections are dead now; fresh ones come with the reconnect.
            await self.store.forget_connections()
        elif self.failed_attempts > self.error_after and self.db_state is not DbState.ERROR:
            self._transition(DbState.ERROR, reason)
        elif self.db_state is DbState.DISCONNECTED:
            self._transition(DbState.RECONNECTING, reason)
        else:
            log.bind(
                attempt=self.failed_attempts, state=self.db_state.value,
                dsn=redact_dsn(self.store.dsn), error=reason,
            ).warning("database reconnect attempt failed")  # fmt: skip

    def _transition(self, state: DbState, reason: str) -> None:
        previous, self.db_state = self.db_state, state
        context = {
            "attempt": self.failed_attempts,
            "state": state.value,
            "previous": previous.value,
        }
        if state is not DbState.CONNECTED:
            context["error"] = reason
        entry = log.bind(dsn=redact_dsn(self.store.dsn), **context)
        if state is DbState.CONNECTED:
            entry.info(
                "database connected" if previous is DbState.DISCONNECTED else "database recovered"
            )
        elif state is DbState.ERROR:
            entry.error(f"database still unreachable after {self.error_after} retries")
        elif state is DbState.DISCONNECTED:
            entry.warning("database connection lost")
        else:
            entry.warning("database reconnect failed; retrying")
        for name in DbState:
            metrics.DB_STATE.labels(name.value).set(1 if name is state else 0)
        self._pending_events.append(
            ("database", state.value, previous.value, self.failed_attempts, reason)
        )
        for listener in self.listeners:
            listener("database", state.value)

    async def _handle_record_transition(self, message: RecordTransition) -> None:
        self._pending_events.append((message.component, message.state, message.previous, None, ""))
        if self.db_state is DbState.CONNECTED:
            await self._flush_events()

    async def _flush_events(self) -> None:
        # Kept until written: transitions during an outage are recorded once it ends.
        while self._pending_events:
            component, state, previous, attempt, reason = self._pending_events[0]
            try:
                await self.store.record_connection_event(
                    component, state, previous, attempt, reason
                )
            except Exception as exc:
                log.bind(error=type(exc).__name__).warning("could not record connection event")
                return
            self._pending_events.popleft()
