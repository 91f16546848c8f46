"""DbMonitor: owns the PostgreSQL pool, pings it, reconnects with backoff and drains the spool."""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from actors.base import Actor
from app import metrics
from app.log import get_logger, redact_dsn
from app.models import Message
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
    retries after which the state turns ``error``. *on_drained* sees each spooled message
    once it is stored, for fan-out; *listeners* see every state change.
    """

    def __init__(
        self,
        store: Store,
        *,
        ping_interval: float = 5.0,
        backoff: Backoff = Backoff(initial=1.0, base=2.0, max_delay=32.0, jitter=0.1),
        error_after: int = 5,
        on_drained: Callable[[Message], Awaitable[None]] | None = None,
        **actor_options: Any,
    ) -> None:
        super().__init__("db_monitor", **actor_options)
        self.store = store
        self.ping_interval = ping_interval
        self.backoff = backoff
        self.error_after = error_after
        self.on_drained = on_drained
        #: Who hears about state changes; append to subscribe.
        self.listeners: list[StateListener] = []
        #: Current state; survives restarts so a restart is not mistaken for a recovery.
        self.db_state = DbState.DISCONNECTED
        #: Failed pings since the connection was last good.
        self.failed_attempts = 0
        #: Seconds the last good ping took.
        self.latency: float | None = None
        # Transitions waiting to be written to connection_events once the database is back.
        self._pending_events: deque[tuple[str, str, str, int | None, str]] = deque(maxlen=100)
        self._drain_task: asyncio.Task[None] | None = None

    async def on_start(self) -> None:
        await self.store.open()
        self.cast(Ping())

    async def on_stop(self) -> None:
        if self._drain_task is not None:
            self._drain_task.cancel()
            await asyncio.gather(self._drain_task, return_exceptions=True)
            self._drain_task = None

    def extra_status(self) -> dict[str, Any]:
        return {
            "db_state": self.db_state.value,
            "failed_attempts": self.failed_attempts,
            "latency_ms": None if self.latency is None else round(self.latency * 1000, 2),
            "pool": self.store.pool_stats(),
            "spool": self.store.spool.status() if self.store.spool is not None else None,
            "draining": self._drain_task is not None and not self._drain_task.done(),
            "dsn": redact_dsn(self.store.dsn),
        }

    async def _handle_ping(self, message: Ping) -> None:
        try:
            self.latency = await self.store.ping()
        except Exception as exc:
            await self._ping_failed(exc)
            self.send_after(self.backoff.delay(self.failed_attempts), Ping())
            return
        metrics.DB_PING_SECONDS.set(self.latency)
        if self.db_state is not DbState.CONNECTED:
            self._transition(DbState.CONNECTED, "ping succeeded")
        self.failed_attempts = 0
        self.store.available = True
        await self._flush_events()
        self._start_drain()
        self.send_after(self.ping_interval, Ping())

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

    def _start_drain(self) -> None:
        spool = self.store.spool
        if spool is None or spool.depth == 0:
            return
        if self._drain_task is None or self._drain_task.done():
            # A long drain runs beside the mailbox so pings keep flowing meanwhile.
            self._drain_task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await self.store.drain_spool(self.on_drained)
        except Exception as exc:
            spool = self.store.spool
            log.bind(error=type(exc).__name__, spool_depth=spool.depth if spool else 0).warning(
                "spool drain interrupted; resuming after the next good ping"
            )
