"""One diagnostics snapshot of the instance: health, the admin API, the dashboard and the
metrics all read it, and none of them builds its own.

Taking one does no I/O beyond a ``stat`` or two: it reads what the actors, the spool and
the sampler already know, so it answers at once even while PostgreSQL or Redis hang.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from app import __version__, keys, metrics
from app.alerts import (
    ACTOR_RESTART_LOOP_RANGE,
    ACTOR_RESTART_LOOP_RESTARTS,
    Alert,
    AlertRules,
    Sample,
)
from app.host import connection_limit, disk_space, host_memory, rss_bytes
from app.log import get_logger, iso_utc
from app.maintenance import MaintenanceState
from app.vitals import RatePoint, Vitals
from app.ws import open_clients

if TYPE_CHECKING:
    from aiohttp import web

log = get_logger("diagnostics")

#: Event-loop lag past which the process counts as not alive: it no longer serves in time.
MAX_LOOP_LAG = 2.0
#: A ping waiting this long means a hung database, long before the ping's own deadline.
HUNG_PING = 1.0
#: Seconds between samples of the rates and the alert rules.
SAMPLE_INTERVAL = 1.0
#: Recent errors a snapshot carries.
RECENT_ERRORS = 20
#: Actor states that keep the instance from being ready.
NOT_READY_STATES = frozenset({"failed", "restarting", "starting"})


@dataclass(frozen=True, slots=True)
class MailboxStatus:
    """An actor's bounded mailbox."""

    depth: int
    peak: int
    capacity: int
    #: Messages refused because it was full.
    rejections: int


@dataclass(frozen=True, slots=True)
class ActorStatus:
    """One supervised actor."""

    name: str
    #: starting, running, restarting, failed or stopped.
    state: str
    restarts: int
    #: Of those, the ones an operator asked for; they never make a restart loop.
    operator_restarts: int
    mailbox: MailboxStatus
    #: Messages handled, across incarnations.
    processed: int
    uptime_seconds: float
    #: Times the watchdog found it stalled.
    stalls: int
    #: ``Type: code`` of the last crash, safe to show; None if it never crashed.
    last_error: str | None


@dataclass(frozen=True, slots=True)
class DatabaseStatus:
    """PostgreSQL as the DbMonitor last saw it."""

    #: connected, reconnecting, disconnected, or unresponsive while a ping hangs.
    state: str
    latency_ms: float | None
    pool_size: int
    pool_free: int
    pool_in_use: int
    pool_waiting: int
    pool_max: int
    #: Pings failed in a row.
    failed_attempts: int
    #: Seconds since the last good ping; None before the first.
    last_ok_age_seconds: float | None


@dataclass(frozen=True, slots=True)
class RedisStatus:
    """The Redis bridge and its canary; state ``disabled`` without HEARTH_REDIS_URL."""

    state: str
    canary_age_seconds: float | None = None
    canary_rtt_ms: float | None = None
    #: Seconds in local-only mode so far; 0 when not degraded.
    degraded_for_seconds: float = 0.0
    published: int = 0
    received: int = 0


@dataclass(frozen=True, slots=True)
class SpoolStatus:
    """Publishes waiting for PostgreSQL, and those that never can be stored."""

    depth: int
    size_bytes: int
    oldest_age_seconds: float
    dead_letters: int


@dataclass(frozen=True, slots=True)
class FeedStatus:
    """A status feed: its upstream's breaker and the age of its cached value."""

    name: str
    #: closed, open or half_open; None for a feed without an upstream (system).
    breaker: str | None
    cache_age_seconds: float | None
    #: Whether the last call failed, so subscribers see the cached value.
    stale: bool
    last_success: str | None
    open_remaining_seconds: float
    consecutive_failures: int


@dataclass(frozen=True, slots=True)
class HostStatus:
    """The process and its host."""

    rss_bytes: int
    memory_used_share: float | None
    disk_free_share: float | None
    disk_free_bytes: int | None
    loop_lag_ms: float | None


@dataclass(frozen=True, slots=True)
class ErrorsStatus:
    """Errors answered to clients: the last hour's count and the latest few, sanitized."""

    last_hour: int
    #: Records waiting to be written to ``error_events``.
    pending: int
    #: Records dropped because the buffer overflowed during an outage.
    dropped: int
    recent: tuple[dict[str, Any], ...]


@dataclass(frozen=True, slots=True)
class Diagnostics:
    """Everything an operator or a probe may ask about the instance, at one moment."""

    taken_at: str
    instance: str
    version: str
    uptime_seconds: float
    #: healthy, degraded (serving with a dependency down), maintenance, or unhealthy.
    status: str
    #: Whether the event loop keeps up and the supervisor runs (``/health/live``).
    live: bool
    #: Why it is not live; empty when live.
    live_reasons: tuple[str, ...]
    #: Whether the load balancer should send clients (``/health/ready``).
    ready: bool
    #: Why it is not ready; empty when ready.
    reasons: tuple[str, ...]
    draining: bool
    maintenance: MaintenanceState | None
    actors: tuple[ActorStatus, ...]
    database: DatabaseStatus | None
    redis: RedisStatus
    spool: SpoolStatus | None
    feeds: tuple[FeedStatus, ...]
    connections: int
    connection_limit: int
    host: HostStatus
    rates: tuple[RatePoint, ...]
    alerts: tuple[Alert, ...]
    errors: ErrorsStatus

    def as_dict(self) -> dict[str, Any]:
        """The snapshot as JSON-ready data (alerts' ``since`` as seconds ago)."""
        data = asdict(self)
        now = time.monotonic()
        data["alerts"] = [
            {**asdict(alert), "since": None, "for_seconds": round(now - alert.since, 1)}
            for alert in self.alerts
        ]
        return data


def take_snapshot(app: web.Application) -> Diagnostics:
    """The diagnostics of the instance *app* serves, read from state already in memory."""
    settings = app[keys.SETTINGS]
    supervisor = app.get(keys.SUPERVISOR)
    actors = tuple(_actor(status) for status in supervisor.statuses()) if supervisor else ()
    database = _database(supervisor)
    redis = _redis(supervisor)
    maintenance_state = app[keys.MAINTENANCE].state() if keys.MAINTENANCE in app else None
    draining = app[keys.DRAINING]["draining"]
    lag_probe = app.get(keys.LOOP_LAG)
    lag = lag_probe.recent if lag_probe is not None else None
    live_reasons = []
    if supervisor is None or not supervisor.supervising:
        live_reasons.append("supervisor")
    if lag is not None and lag > MAX_LOOP_LAG:
        live_reasons.append("event_loop_lag")
    reasons = _not_ready_reasons(app, actors, redis, maintenance_state, draining)
    feeds = _feeds(supervisor)
    degraded = (
        (database is not None and database.state != "connected")
        or redis.state not in ("connected", "disabled")
        or any(feed.stale or feed.breaker not in (None, "closed") for feed in feeds)
    )
    if maintenance_state is not None:
        status = "maintenance"
    elif reasons:
        status = "unhealthy"
    else:
        status = "degraded" if degraded else "healthy"
    vitals = app.get(keys.VITALS)
    disk = disk_space(settings.spool_dir)
    memory = host_memory()
    return Diagnostics(
        taken_at=iso_utc(datetime.now(UTC)),
        instance=app.get(keys.INSTANCE_ID, ""),
        version=__version__,
        uptime_seconds=round(time.monotonic() - app[keys.STARTED_AT], 3),
        status=status,
        live=not live_reasons,
        live_reasons=tuple(live_reasons),
        ready=not reasons,
        reasons=tuple(reasons),
        draining=draining,
        maintenance=maintenance_state,
        actors=actors,
        database=database,
        redis=redis,
        spool=_spool(app),
        feeds=feeds,
        connections=open_clients(app),
        connection_limit=connection_limit(settings),
        host=HostStatus(
            rss_bytes=rss_bytes(),
            memory_used_share=None if memory is None else round(memory.used_share, 4),
            disk_free_share=None if disk is None else round(disk.free_share, 4),
            disk_free_bytes=None if disk is None else disk.free,
            loop_lag_ms=None if lag is None else round(lag * 1000, 2),
        ),
        rates=tuple(vitals.rates) if vitals is not None else (),
        alerts=vitals.alerts if vitals is not None else (),
        errors=_errors(app),
    )


def _not_ready_reasons(
    app: web.Application,
    actors: tuple[ActorStatus, ...],
    redis: RedisStatus,
    maintenance_state: MaintenanceState | None,
    draining: bool,
) -> list[str]:
    # Degraded dependencies are reported but keep the instance ready: it still serves,
    # spooling publishes while PostgreSQL is away and delivering locally without Redis.
    reasons = []
    if draining:
        reasons.append("draining")
    if maintenance_state is not None:
        reasons.append("maintenance")
    supervisor = app.get(keys.SUPERVISOR)
    if supervisor is None:
        reasons.append("starting")
        return reasons
    if not supervisor.ready:
        reasons.append("actors")
    reasons += [
        f"{actor.name}:{actor.state}" for actor in actors if actor.state in NOT_READY_STATES
    ]
    limit = app[keys.SETTINGS].redis_degraded_ready_after
    if limit and redis.degraded_for_seconds > limit:
        reasons.append("redis:degraded")
    return reasons


def _actor(status: dict[str, Any]) -> ActorStatus:
    error = status["last_error"]
    mailbox = status["mailbox"]
    return ActorStatus(
        name=status["name"],
        state=status["state"],
        restarts=status["restarts"],
        operator_restarts=status["operator_restarts"],
        mailbox=MailboxStatus(
            mailbox["depth"], mailbox["peak"], mailbox["capacity"], mailbox["rejections"]
        ),
        processed=status["processed"],
        uptime_seconds=status["uptime_seconds"],
        stalls=status["stalls"],
        last_error=None if error is None else f"{error['type']}: {error['message']}",
    )


def _database(supervisor: Any) -> DatabaseStatus | None:
    monitor = supervisor.find("db_monitor") if supervisor is not None else None
    if monitor is None:
        return None
    status = monitor.status()
    pool = status["pool"]
    age = monitor.last_ok_age()
    return DatabaseStatus(
        state="unresponsive" if monitor.ping_waiting() > HUNG_PING else status["db_state"],
        latency_ms=status["latency_ms"],
        pool_size=pool["size"],
        pool_free=pool["free"],
        pool_in_use=pool["in_use"],
        pool_waiting=pool["waiting"],
        pool_max=pool["max"],
        failed_attempts=status["failed_attempts"],
        last_ok_age_seconds=None if age is None else round(age, 3),
    )


def _redis(supervisor: Any) -> RedisStatus:
    bridge = supervisor.find("redis_bridge") if supervisor is not None else None
    if bridge is None:
        return RedisStatus(state="disabled")
    status = bridge.status()
    return RedisStatus(
        state=status["bridge_state"],
        canary_age_seconds=status["canary_age_seconds"],
        canary_rtt_ms=status["canary_rtt_ms"],
        degraded_for_seconds=round(bridge.degraded_for(), 3),
        published=status["published"],
        received=status["received"],
    )


def _spool(app: web.Application) -> SpoolStatus | None:
    spool = app.get(keys.SPOOL)
    if spool is None:
        return None
    return SpoolStatus(
        depth=spool.depth,
        size_bytes=spool.size_bytes,
        oldest_age_seconds=round(spool.oldest_age_seconds, 3),
        dead_letters=spool.dead_letters,
    )


def _feeds(supervisor: Any) -> tuple[FeedStatus, ...]:
    events = supervisor.find("events") if supervisor is not None else None
    if events is None:
        return ()
    feeds = []
    for name, feed in events.status()["feeds"].items():
        breaker = feed["breaker"] or {}
        feeds.append(
            FeedStatus(
                name=name,
                breaker=breaker.get("state"),
                cache_age_seconds=feed["cache_age_seconds"],
                stale=feed["is_stale"],
                last_success=feed["last_success"],
                open_remaining_seconds=round(breaker.get("open_remaining", 0.0), 3),
                consecutive_failures=breaker.get("consecutive_failures", 0),
            )
        )
    return tuple(feeds)


def _errors(app: web.Application) -> ErrorsStatus:
    recorder = app.get(keys.ERRORS)
    if recorder is None:
        return ErrorsStatus(0, 0, 0, ())
    return ErrorsStatus(
        last_hour=recorder.statistics(3600).total_errors,
        pending=recorder.pending,
        dropped=recorder.dropped,
        recent=tuple(record.as_dict() for record in recorder.recent(RECENT_ERRORS)),
    )


# -- the sampler -------------------------------------------------------------------------------


def counter_total(counter: Any, where: Callable[[dict[str, str]], bool] | None = None) -> float:
    """The sum of *counter*'s ``_total`` samples whose labels pass *where* (all by default)."""
    total = 0.0
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and (where is None or where(sample.labels)):
                total += sample.value
    return total


@dataclass(slots=True)
class _Totals:
    at: float
    messages_in: float
    messages_out: float
    deliveries: float
    requests: float
    server_errors: float


def _read_totals(at: float) -> _Totals:
    return _Totals(
        at=at,
        messages_in=counter_total(metrics.PUBLISHES),
        messages_out=counter_total(metrics.MESSAGES_OUT),
        deliveries=counter_total(metrics.DELIVERIES),
        requests=counter_total(metrics.REQUESTS),
        server_errors=counter_total(
            metrics.REQUESTS, lambda labels: labels.get("status_class") == "5xx"
        ),
    )


class Sampler:
    """Every `SAMPLE_INTERVAL` seconds: one rate point for the charts and one pass of the
    alert rules into *vitals* (default: the app's), logging each alert as it starts and
    ends.

    A loop timer, not a task: a sample is a few counter reads and no I/O. *app* is read
    through `take_snapshot`; *clock* is monotonic seconds.
    """

    def __init__(
        self,
        app: web.Application,
        *,
        vitals: Vitals | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        #: Where the rate points and the alerts go; the snapshot reads the app's.
        self.vitals = app[keys.VITALS] if vitals is None else vitals
        self.clock = clock
        self.rules = AlertRules()
        self._previous: _Totals | None = None
        self._restarts: deque[tuple[float, dict[str, int]]] = deque()
        self._handle: asyncio.TimerHandle | None = None

    @property
    def alerts(self) -> tuple[Alert, ...]:
        """Alerts firing as of the last sample."""
        return self.vitals.alerts

    def start(self) -> None:
        """Arm the timer on the running loop."""
        if self._handle is None:
            self._previous = _read_totals(self.clock())  # the first second counts too
            self._arm(asyncio.get_running_loop())

    def stop(self) -> None:
        """Disarm it."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        self._handle = loop.call_later(SAMPLE_INTERVAL, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            self.sample()
        except Exception:
            # A sampling bug must not stop the next sample, nor the loop.
            log.exception("diagnostics sample failed")
        self._arm(loop)

    def sample(self) -> None:
        """Take one sample now: a rate point and one pass of the alert rules."""
        now = self.clock()
        snapshot = take_snapshot(self.app)
        totals = _read_totals(now)
        previous, self._previous = self._previous, totals
        if previous is not None and now > previous.at:
            elapsed = now - previous.at

            def per_second(name: str) -> float:
                change = getattr(totals, name) - getattr(previous, name)
                return round(max(0.0, change) / elapsed, 2)

            self.vitals.rates.append(
                RatePoint(
                    at=round(time.time(), 3),
                    connections=snapshot.connections,
                    messages_in=per_second("messages_in"),
                    messages_out=per_second("messages_out"),
                    deliveries=per_second("deliveries"),
                    requests=per_second("requests"),
                    server_errors=per_second("server_errors"),
                )
            )
        alerts = self.rules.observe(self._alert_sample(now, snapshot, totals))
        self._log_changes(self.vitals.alerts, alerts)
        self.vitals.alerts = alerts

    def _alert_sample(self, now: float, snapshot: Diagnostics, totals: _Totals) -> Sample:
        return Sample(
            at=now,
            requests=int(totals.requests),
            server_errors=int(totals.server_errors),
            database_state=snapshot.database.state if snapshot.database else "unknown",
            redis_state=snapshot.redis.state,
            slow_queries=int(counter_total(metrics.DB_SLOW_STATEMENTS)),
            memory_used_share=snapshot.host.memory_used_share,
            disk_free_share=snapshot.host.disk_free_share,
            connections=snapshot.connections,
            connection_limit=snapshot.connection_limit,
            actors_in_restart_loop=self._restart_loops(now, snapshot.actors),
            dead_letters=snapshot.spool.dead_letters if snapshot.spool else 0,
        )

    def _restart_loops(self, now: float, actors: tuple[ActorStatus, ...]) -> tuple[str, ...]:
        """Actors the supervisor marked failed, or that crashed often within the range."""
        counts = {actor.name: actor.restarts - actor.operator_restarts for actor in actors}
        self._restarts.append((now, counts))
        while self._restarts and self._restarts[0][0] < now - ACTOR_RESTART_LOOP_RANGE:
            self._restarts.popleft()
        oldest = self._restarts[0][1]
        return tuple(
            actor.name
            for actor in actors
            if actor.state == "failed"
            or counts[actor.name] - oldest.get(actor.name, counts[actor.name])
            >= ACTOR_RESTART_LOOP_RESTARTS
        )

    @staticmethod
    def _log_changes(before: tuple[Alert, ...], after: tuple[Alert, ...]) -> None:
        was = {alert.name for alert in before}
        now = {alert.name for alert in after}
        for alert in after:
            if alert.name not in was:
                level = "ERROR" if alert.severity == "critical" else "WARNING"
                log.bind(alert=alert.name, severity=alert.severity, value=alert.value).log(
                    level, f"alert firing: {alert.summary}"
                )
        for alert in before:
            if alert.name not in now:
                log.bind(alert=alert.name, severity=alert.severity).info("alert resolved")


# -- Prometheus --------------------------------------------------------------------------------


class SnapshotCollector(Collector):
    """Exports what the diagnostics snapshot knows as Prometheus families at scrape time.

    One per process, registered once; it reads the app that started last (a process
    serves one app; tests that build several only scrape the latest).
    """

    def __init__(self) -> None:
        self.source: Callable[[], Diagnostics] | None = None

    def describe(self) -> list[Any]:
        return []  # families vary with the actors and feeds; nothing to check up front

    def collect(self) -> Iterator[Any]:
        if self.source is None:
            return
        snapshot = self.source()
        yield from _actor_families(snapshot)
        yield from _dependency_families(snapshot)
        alerts = GaugeMetricFamily(
            "hearth_alerts_firing", "Alerts firing now (1).", labels=["alert", "severity"]
        )
        for alert in snapshot.alerts:
            alerts.add_metric([alert.name, alert.severity], 1)
        yield alerts


def _actor_families(snapshot: Diagnostics) -> Iterator[Any]:
    state = GaugeMetricFamily(
        "hearth_actor_state", "Actor state (1 for the current one).", labels=["actor", "state"]
    )
    depth = GaugeMetricFamily(
        "hearth_actor_mailbox_depth", "Messages waiting in the actor's mailbox.", labels=["actor"]
    )
    capacity = GaugeMetricFamily(
        "hearth_actor_mailbox_capacity", "Bound of the actor's mailbox.", labels=["actor"]
    )
    restarts = CounterMetricFamily(
        "hearth_actor_restarts", "Actor restarts since the process started.", labels=["actor"]
    )
    for actor in snapshot.actors:
        for name in ("starting", "running", "restarting", "failed", "stopped"):
            state.add_metric([actor.name, name], 1 if actor.state == name else 0)
        depth.add_metric([actor.name], actor.mailbox.depth)
        capacity.add_metric([actor.name], actor.mailbox.capacity)
        restarts.add_metric([actor.name], actor.restarts)
    breakers = GaugeMetricFamily(
        "hearth_breaker_state",
        "Upstream circuit breaker state (1 for the current one).",
        labels=["source", "state"],
    )
    cache_age = GaugeMetricFamily(
        "hearth_feed_cache_age_seconds", "Age of a status feed's cached value.", labels=["source"]
    )
    for feed in snapshot.feeds:
        if feed.breaker is not None:
            for name in ("closed", "open", "half_open"):
                breakers.add_metric([feed.name, name], 1 if feed.breaker == name else 0)
        if feed.cache_age_seconds is not None:
            cache_age.add_metric([feed.name], feed.cache_age_seconds)
    yield from (state, depth, capacity, restarts, breakers, cache_age)


def _dependency_families(snapshot: Diagnostics) -> Iterator[Any]:
    def gauge(name: str, text: str, value: float | None) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, text)
        if value is not None:
            family.add_metric([], value)
        return family

    yield gauge("hearth_connections", "Client connections open.", snapshot.connections)
    yield gauge(
        "hearth_connections_limit", "Client connections allowed.", snapshot.connection_limit
    )
    yield gauge("hearth_ready", "1 while readiness answers 200.", int(snapshot.ready))
    yield gauge(
        "hearth_maintenance", "1 while maintenance mode is on.", int(bool(snapshot.maintenance))
    )
    yield gauge(
        "hearth_memory_used_ratio", "Host memory in use, 0..1.", snapshot.host.memory_used_share
    )
    yield gauge(
        "hearth_disk_free_ratio", "Free share of the spool's disk.", snapshot.host.disk_free_share
    )
    database = snapshot.database
    pool = GaugeMetricFamily(
        "hearth_db_pool_connections", "Database pool connections by kind.", labels=["kind"]
    )
    if database is not None:
        for kind, value in (
            ("size", database.pool_size), ("free", database.pool_free),
            ("in_use", database.pool_in_use), ("waiting", database.pool_waiting),
            ("max", database.pool_max),
        ):  # fmt: skip
            pool.add_metric([kind], value)
    yield pool
    yield gauge(
        "hearth_db_unresponsive",
        "1 while a database ping has hung past the threshold.",
        None if database is None else int(database.state == "unresponsive"),
    )
    spool = snapshot.spool
    yield gauge(
        "hearth_spool_dead_letters",
        "Records in the spool's dead-letter file.",
        None if spool is None else spool.dead_letters,
    )
    yield gauge(
        "hearth_spool_oldest_age_seconds",
        "Age of the oldest spooled publish.",
        None if spool is None else spool.oldest_age_seconds,
    )


#: The one collector of the process.
SNAPSHOT_COLLECTOR = SnapshotCollector()
REGISTRY.register(SNAPSHOT_COLLECTOR)
