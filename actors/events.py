"""EventSubscriber: polls status feed upstreams through circuit breakers and publishes the values."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp

from actors.base import Actor, Timer
from actors.hub import Hub, StatusUpdate, TopicEvent
from app import metrics
from app.errors import CircuitOpen, MailboxFull, NotFound, RpcFailure
from app.host import disk_space, host_memory, rss_bytes
from app.log import get_logger, iso_utc, redact_text
from app.looplag import LoopLag
from app.protocol import error_data
from app.resilience import BreakerState, CircuitBreaker
from app.sources import PROBE_HEADER, SYSTEM_KIND, Source

__all__ = [
    "EventSubscriber",
    "Feed",
    "FeedCache",
    "Poll",
    "PollResult",
    "Probe",
    "feed_data",
]

log = get_logger("events")

#: Largest upstream reply read; anything longer is a failure, not a memory problem.
MAX_REPLY_BYTES = 1024 * 1024
#: Consecutive failures that open a source's breaker.
FAILURE_THRESHOLD = 3
#: What clients are told; upstream hosts, addresses and exception texts stay in the logs.
STALE_TEXT = "upstream unavailable; showing cached data"
NO_DATA_TEXT = "upstream unavailable; no data yet"
FAILURE_TEXT = "status poll failed"
CIRCUIT_OPEN_TEXT = "upstream circuit open; probing for recovery"
RECOVERED_TEXT = "upstream recovered"


# -- state that outlives a restart ------------------------------------------------------------


@dataclass(eq=False)
class Feed:
    """One status feed: its source, its breaker and its last good value."""

    source: Source
    #: Guards the upstream; None for the in-process system feed.
    breaker: CircuitBreaker | None
    #: The last good value; meaningful only once :attr:`cached_at` is set.
    value: Any = None
    #: Unix time of the last successful poll, whose value :attr:`value` is; None before one.
    cached_at: float | None = None
    #: Whether the latest poll failed, so subscribers hold the stale value.
    failing: bool = False
    #: Calls by outcome (ok, timeout, connection_error, http_status, invalid_reply,
    #: rpc_error, error, rejected), probes included.
    calls: Counter[str] = field(default_factory=Counter)
    #: Health probes made while the breaker was open.
    probes: int = 0
    #: The breaker state subscribers were last told about.
    announced_state: BreakerState = BreakerState.CLOSED

    @property
    def last_success(self) -> str | None:
        """ISO time of the last successful poll, or None."""
        return None if self.cached_at is None else iso_utc(_from_unix(self.cached_at))


@dataclass
class FeedCache:
    """Every feed by name: the EventSubscriber's state that survives its restarts."""

    #: Feed name -> feed.
    feeds: dict[str, Feed] = field(default_factory=dict)

    def feed_times(self) -> dict[str, str | None]:
        """Each feed's last successful poll time (ISO), for the heartbeat."""
        return {name: feed.last_success for name, feed in self.feeds.items()}


def feed_data(feed: Feed) -> dict[str, Any]:
    """The ``data`` of *feed*'s status event: ``{source, value, is_stale, cached_at, error?}``."""
    has_value = feed.cached_at is not None
    data: dict[str, Any] = {
        "source": feed.source.name,
        "value": feed.value if has_value else None,
        "is_stale": feed.failing,
        "cached_at": feed.last_success,
    }
    if feed.failing:
        data["error"] = {
            "code": "RPC_UNAVAILABLE",
            "message": STALE_TEXT if has_value else NO_DATA_TEXT,
            "severity": "warning",
        }
    return data


def _from_unix(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


# -- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Poll:
    """Time to poll *source*."""

    source: str


@dataclass(frozen=True, slots=True)
class Probe:
    """Time to probe *source*, whose breaker is open."""

    source: str


@dataclass(frozen=True, slots=True)
class ResetBreaker:
    """An operator closes *source*'s breaker; a poll follows at once. Replies True, or
    False for a feed without a breaker (the system feed); an unknown name is NotFound."""

    source: str


@dataclass(frozen=True, slots=True)
class PollResult:
    """How a call to *source* ended: its *value*, or the *error* it raised."""

    source: str
    value: Any = None
    error: Exception | None = None
    #: Whether the call was a health probe rather than a regular poll.
    probe: bool = False


# -- the actor --------------------------------------------------------------------------------


class EventSubscriber(Actor):
    """Polls every status feed on its own interval and hands the values to the hub.

    *hub* delivers the events and counts the connections the system feed reports; *sources*
    are the feeds (see :meth:`app.config.Settings.sources`). Each upstream has a
    :class:`~app.resilience.CircuitBreaker` that opens for *open_seconds* after three
    consecutive failures; while it is open only a health probe every *probe_seconds* reaches
    the upstream. *cache* holds the breakers and last good values across restarts;
    *disk_path* is the folder whose free space the system feed reports.

    HTTP calls run in tasks started by the handlers, at most one per source, and come back
    as :class:`PollResult` mail, so a hanging upstream never holds up the mailbox.
    """

    def __init__(
        self,
        hub: Hub,
        sources: list[Source],
        *,
        cache: FeedCache | None = None,
        open_seconds: float = 30.0,
        probe_seconds: float = 10.0,
        disk_path: str = ".",
        loop_lag: LoopLag | None = None,
        **actor_options: Any,
    ) -> None:
        super().__init__("events", **actor_options)
        self.hub = hub
        self.cache = FeedCache() if cache is None else cache
        self.open_seconds = open_seconds
        self.probe_seconds = probe_seconds
        self.disk_path = disk_path
        #: The process's loop-lag probe, shown in system_status.
        self.loop_lag = loop_lag if loop_lag is not None else LoopLag()
        for source in sources:
            if source.name not in self.cache.feeds:
                self.cache.feeds[source.name] = Feed(source, self._breaker_for(source))
        self._session: aiohttp.ClientSession | None = None
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._probe_timers: dict[str, Timer] = {}
        self._rpc_ids = itertools.count(1)
        self._cpu_mark = (time.monotonic(), time.process_time())
        #: Called with (``upstream:<name>``, new state, old state) on every breaker change.
        self.listeners: list[Callable[[str, str, str], None]] = []

    def _breaker_for(self, source: Source) -> CircuitBreaker | None:
        if source.kind == SYSTEM_KIND:
            return None
        return CircuitBreaker(
            f"upstream:{source.name}",
            failure_threshold=FAILURE_THRESHOLD,
            open_seconds=self.open_seconds,
            call_timeout=source.timeout,
            trial_timeout=source.timeout,
            # Only the consecutive-failure rule of the issue opens it, not a failure rate.
            min_calls=2**31,
            on_state_change=self._breaker_changed,
        )

    # -- lifecycle -----------------------------------------------------------------------------

    async def on_start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None), raise_for_status=False
        )
        self._in_flight = {}
        self._probe_timers = {}
        for name, feed in self.cache.feeds.items():
            # A first poll at once, so a fresh install shows data without waiting an interval.
            self._tell_self(Poll(name))
            self.send_every(feed.source.interval, Poll(name))
            if feed.breaker is not None and feed.breaker.state is BreakerState.OPEN:
                self._start_probing(name)

    async def on_stop(self) -> None:
        # Calls in flight were spawned by this incarnation: the runtime has ended them.
        if self._session is not None:
            await self._session.close()
            self._session = None

    def feed_times(self) -> dict[str, str | None]:
        """Each feed's last successful poll time (ISO) or None, for the heartbeat."""
        return self.cache.feed_times()

    def extra_status(self) -> dict[str, Any]:
        now = time.time()
        feeds = {
            name: {
                "breaker": None if feed.breaker is None else feed.breaker.snapshot(),
                "cache_age_seconds": (
                    None if feed.cached_at is None else round(now - feed.cached_at, 3)
                ),
                "last_success": feed.last_success,
                "is_stale": feed.failing,
                "in_flight": name in self._in_flight,
                "calls": dict(feed.calls),
                "probes": feed.probes,
            }
            for name, feed in self.cache.feeds.items()
        }
        return {"feeds": feeds, "loop_lag_ms": _ms(self.loop_lag.recent)}

    # -- polling -------------------------------------------------------------------------------

    async def _handle_poll(self, message: Poll) -> None:
        feed = self.cache.feeds[message.source]
        if feed.breaker is None:
            self._succeeded(feed, self._system_snapshot())
            return
        if message.source in self._in_flight:
            return  # The previous call is still running: one at a time per source.
        self._start_call(feed, feed.breaker.call(self._fetch, feed.source), probe=False)

    async def _handle_probe(self, message: Probe) -> None:
        feed = self.cache.feeds[message.source]
        if feed.breaker is None or feed.breaker.state is BreakerState.CLOSED:
            self._stop_probing(message.source)
            return
        if message.source in self._in_flight:
            return
        feed.probes += 1
        self._start_call(
            feed, feed.breaker.probe(lambda: self._fetch(feed.source, probe=True)), probe=True
        )

    def _start_call(self, feed: Feed, call: Awaitable[Any], *, probe: bool) -> None:
        name = feed.source.name
        task = self.spawn(self._report(name, call, probe), name=f"poll-{name}")
        self._in_flight[name] = task
        # Freed when the call ends, not when its result is handled: a result lost to a full
        # mailbox must not block the source for good.
        task.add_done_callback(lambda done: self._call_done(name, done))

    def _call_done(self, name: str, task: asyncio.Task[None]) -> None:
        if self._in_flight.get(name) is task:
            del self._in_flight[name]

    async def _report(self, name: str, call: Awaitable[Any], probe: bool) -> None:
        try:
            value = await call
        except Exception as exc:
            result = PollResult(name, error=exc, probe=probe)
        else:
            result = PollResult(name, value=value, probe=probe)
        self._tell_self(result)

    async def _fetch(self, source: Source, *, probe: bool = False) -> Any:
        """Ask *source* once; raise RpcFailure (or a timeout, or a connection error) on failure."""
        assert self._session is not None, "fetch outside an incarnation"
        headers = {PROBE_HEADER: "1"} if probe else {}
        if source.kind == "jsonrpc":
            request_id = next(self._rpc_ids)
            payload = {"jsonrpc": "2.0", "id": request_id, "method": source.method}
            if source.params is not None:
                payload["params"] = source.params
            reply = self._session.post(source.url, json=payload, headers=headers)
        else:
            reply = self._session.get(source.url, headers=headers)
        async with reply as response:
            if not 200 <= response.status < 300:
                raise _failure("http_status", f"HTTP {response.status}")
            body = await response.content.read(MAX_REPLY_BYTES + 1)
        if len(body) > MAX_REPLY_BYTES:
            raise _failure("invalid_reply", f"reply longer than {MAX_REPLY_BYTES} bytes")
        try:
            decoded = json.loads(body)
        except ValueError:
            raise _failure("invalid_reply", "reply is not JSON") from None
        if source.kind == "get":
            return decoded
        if not isinstance(decoded, dict) or decoded.get("jsonrpc") != "2.0":
            raise _failure("invalid_reply", "reply is not a JSON-RPC 2.0 response")
        if decoded.get("error") is not None:
            raise _failure("rpc_error", f"JSON-RPC error {decoded['error']!r:.200}")
        if "result" not in decoded or decoded.get("id") != request_id:
            raise _failure("invalid_reply", "JSON-RPC reply without a result for our id")
        return decoded["result"]

    async def _handle_poll_result(self, message: PollResult) -> None:
        feed = self.cache.feeds[message.source]
        outcome = "ok" if message.error is None else _outcome(message.error)
        feed.calls[outcome] += 1
        metrics.UPSTREAM_CALLS.labels(message.source, outcome).inc()
        if message.error is None:
            self._succeeded(feed, message.value)
        elif outcome != "rejected":
            self._failed(feed, message.error, outcome, probe=message.probe)
        self._follow_breaker(feed)

    def _succeeded(self, feed: Feed, value: Any) -> None:
        recovered = feed.failing
        unchanged = feed.cached_at is not None and value == feed.value
        feed.value, feed.cached_at, feed.failing = value, time.time(), False
        if recovered:
            log.bind(source=feed.source.name).info("status feed recovered")
            self._topic_event(feed, "RPC_RECOVERED", RECOVERED_TEXT, severity="warning")
        if recovered or not unchanged:
            self._publish(feed)

    def _failed(self, feed: Feed, error: Exception, outcome: str, *, probe: bool) -> None:
        source = feed.source
        log.bind(
            source=source.name,
            url=redact_text(source.url),
            outcome=outcome,
            probe=probe,
            error=redact_text(f"{type(error).__name__}: {error}"),
        ).warning("status feed upstream call failed")
        if not probe:
            # One call per source at a time, one per interval: at most one such event each.
            self._topic_event(
                feed, "RPC_FAILURE", FAILURE_TEXT, severity="error",
                retry_after_ms=round(source.interval * 1000),
            )  # fmt: skip
        if not feed.failing:
            feed.failing = True
            self._publish(feed)

    # -- the breaker ---------------------------------------------------------------------------

    async def _handle_reset_breaker(self, message: ResetBreaker) -> bool:
        feed = self.cache.feeds.get(message.source)
        if feed is None:
            raise NotFound(f"no status feed {message.source!r}")
        if feed.breaker is None:
            return False
        feed.breaker.reset()
        self._follow_breaker(feed)
        if message.source not in self._in_flight:
            self._tell_self(Poll(message.source))
        return True

    @staticmethod
    def _breaker_changed(breaker: str, old: BreakerState, new: BreakerState) -> None:
        # The breaker logs every transition itself; this counts them.
        metrics.BREAKER_TRANSITIONS.labels(breaker.removeprefix("upstream:"), new.value).inc()

    def _follow_breaker(self, feed: Feed) -> None:
        """Act on where the breaker stands after a call, once the call's own events are out.

        Done here rather than in the breaker's callback, which runs inside the call's task:
        this way subscribers see the third RPC_FAILURE before CIRCUIT_OPEN.
        """
        assert feed.breaker is not None
        state, name = feed.breaker.state, feed.source.name
        if state is feed.announced_state:
            return
        previous, feed.announced_state = feed.announced_state, state
        for listener in self.listeners:
            listener(f"upstream:{name}", state.value, previous.value)
        if state is BreakerState.OPEN:
            retry_after = min(self.probe_seconds, self.open_seconds)
            self._topic_event(
                feed, "CIRCUIT_OPEN", CIRCUIT_OPEN_TEXT, severity="warning",
                retry_after_ms=round(retry_after * 1000),
            )  # fmt: skip
            self._start_probing(name)
        elif state is BreakerState.CLOSED:
            self._stop_probing(name)

    def _start_probing(self, name: str) -> None:
        if name not in self._probe_timers:
            self._probe_timers[name] = self.send_every(self.probe_seconds, Probe(name))

    def _stop_probing(self, name: str) -> None:
        timer = self._probe_timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    # -- delivery ------------------------------------------------------------------------------

    def _publish(self, feed: Feed) -> None:
        source = feed.source
        self._tell_hub(StatusUpdate(source.topic, source.name, feed_data(feed)))

    def _topic_event(self, feed: Feed, code: str, text: str, **fields: Any) -> None:
        data = error_data(code, text, component="events", recoverable=True, **fields)
        data["source"] = feed.source.name
        self._tell_hub(TopicEvent(feed.source.topic, "error", data))

    def _tell_hub(self, message: object) -> None:
        try:
            self.hub.cast(message)
        except MailboxFull:
            log.bind(kind=type(message).__name__).error("hub mailbox full; feed event dropped")

    def _tell_self(self, message: object) -> None:
        try:
            self.cast(message)
        except MailboxFull:
            log.bind(kind=type(message).__name__).error("events mailbox full; message dropped")

    # -- the built-in system feed --------------------------------------------------------------

    def _system_snapshot(self) -> dict[str, Any]:
        now, cpu = time.monotonic(), time.process_time()
        then, cpu_then = self._cpu_mark
        self._cpu_mark = (now, cpu)
        cpu_percent = 100 * (cpu - cpu_then) / (now - then) if now > then else 0.0
        disk = disk_space(self.disk_path)
        memory = host_memory()
        snapshot = {
            "cpu": {
                "process_percent": round(cpu_percent, 1),
                "load": [round(load, 2) for load in os.getloadavg()],
                "count": os.cpu_count(),
            },
            "memory": {
                "rss_bytes": rss_bytes(),
                "available_bytes": None if memory is None else memory.available,
            },
            "disk": {"free_bytes": None if disk is None else disk.free},
            "connections": len(self.hub.registry.connections),
            "loop_lag_ms": _ms(self.loop_lag.recent),
        }
        return snapshot


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _failure(outcome: str, detail: str) -> RpcFailure:
    return RpcFailure(detail, params={"outcome": outcome})


def _outcome(error: Exception) -> str:
    """The metrics label of a failed call."""
    if isinstance(error, CircuitOpen):
        return "rejected"
    if isinstance(error, RpcFailure):
        return error.params.get("outcome", "rpc_error")
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, aiohttp.ClientError | OSError):
        return "connection_error"
    return "error"
