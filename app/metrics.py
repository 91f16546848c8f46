"""Every Prometheus metric hearth exports, defined once."""

from __future__ import annotations

import gc
import time

from prometheus_client import Counter, Gauge, Histogram

#: Time spent in each SQL statement, by operation and table.
DB_QUERY_SECONDS = Histogram(
    "hearth_db_query_seconds", "SQL statement latency.", ["operation", "table"]
)
#: SQL statements slower than the slow_query alert's threshold (app/alerts.py, 5 s); the
#: in-process rule reads this rather than walking the histogram's buckets every second.
DB_SLOW_STATEMENTS = Counter(
    "hearth_db_slow_statements_total", "SQL statements slower than 5 s (finished or failed)."
)
#: SQL statements that raised, by operation and table.
DB_QUERY_ERRORS = Counter(
    "hearth_db_query_errors_total", "SQL statements that failed.", ["operation", "table"]
)
#: Transactions rolled back, and those retried after a serialization failure or deadlock.
DB_ROLLBACKS = Counter("hearth_db_rollbacks_total", "Transactions rolled back.", ["name"])
DB_TX_RETRIES = Counter("hearth_db_tx_retries_total", "Transactions retried.", ["name"])
#: 1 for the DbMonitor's current state, 0 for the others.
DB_STATE = Gauge("hearth_db_state", "Database connection state.", ["state"])
#: Last ping round trip.
DB_PING_SECONDS = Gauge("hearth_db_ping_seconds", "Latency of the last database ping.")
#: Publishes by outcome: stored, spooled, refused.
PUBLISHES = Counter("hearth_publishes_total", "Publishes by outcome.", ["outcome"])
#: Records waiting in the spool.
SPOOL_DEPTH = Gauge("hearth_spool_depth", "Messages waiting in the spool.")
#: Spooled records moved to the dead-letter file because they can never be stored.
SPOOL_DEAD_LETTERS = Counter(
    "hearth_spool_dead_letters_total", "Spooled records moved to the dead-letter file."
)
#: Clients connected to this instance.
HUB_CLIENTS = Gauge("hearth_hub_clients", "WebSocket clients connected.")
#: Errors answered to clients, by string code.
HUB_ERRORS = Counter("hearth_hub_errors_total", "Errors answered to clients.", ["code"])
#: Clients dropped because their backlog passed the hard limit.
SLOW_CLIENT_DROPS = Counter("hearth_slow_client_drops_total", "Slow clients dropped.")
#: Failed reads and writes on client sockets.
WS_READ_ERRORS = Counter("hearth_ws_read_errors_total", "WebSocket read errors.")
WS_WRITE_ERRORS = Counter("hearth_ws_write_errors_total", "WebSocket write errors.")
#: Clients that went away without a close handshake.
CLIENT_DISCONNECTS = Counter("hearth_client_disconnects_total", "Unexpected client disconnects.")
#: Circuit breaker transitions of status feed upstreams, by source and the state entered.
BREAKER_TRANSITIONS = Counter(
    "hearth_breaker_transitions_total", "Upstream circuit breaker transitions.", ["source", "state"]
)
#: Status feed upstream calls by source and outcome: ok, timeout, connection_error,
#: http_status, invalid_reply, rpc_error, error, or rejected (breaker open: no call made).
UPSTREAM_CALLS = Counter(
    "hearth_upstream_calls_total", "Status feed upstream calls by outcome.", ["source", "outcome"]
)
#: How long each garbage collection stopped the event loop, by generation.
GC_PAUSE_SECONDS = Histogram(
    "hearth_gc_pause_seconds",
    "Garbage collection pauses.",
    ["generation"],
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5),
)
#: The longest garbage collection pause since the process started.
GC_PAUSE_MAX_SECONDS = Gauge("hearth_gc_pause_max_seconds", "Longest garbage collection pause.")


class _GcTimer:
    """A `gc.callbacks` hook: times each collection from its start to its stop phase.

    A collection may start inside any allocation, even one made while prometheus_client
    holds a metric's (non-reentrant) lock, so the hook only touches per-child value locks,
    which never allocate while held: children are made up front, never by `labels()` here.
    """

    __slots__ = ("started_at", "longest", "by_generation")

    def __init__(self) -> None:
        self.started_at = 0.0
        # A gauge cannot be read back cheaply, so the record is kept beside it.
        self.longest = 0.0
        self.by_generation = {
            generation: GC_PAUSE_SECONDS.labels(generation=str(generation))
            for generation in range(3)
        }

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started_at = time.perf_counter()
            return
        pause = time.perf_counter() - self.started_at
        self.by_generation[info["generation"]].observe(pause)
        if pause > self.longest:
            self.longest = pause
            GC_PAUSE_MAX_SECONDS.set(pause)


_GC_TIMER = _GcTimer()


def install_gc_timer() -> None:
    """Time every garbage collection into `GC_PAUSE_SECONDS`; calling it again does nothing."""
    if _GC_TIMER not in gc.callbacks:
        gc.callbacks.append(_GC_TIMER)


#: Takes of a shared rate limit that the local bucket answered because Redis failed
#: (``timeout``, ``error``) or was being left alone after a failure (``cooldown``).
RATE_LIMIT_LOCAL_FALLBACKS = Counter(
    "hearth_ratelimit_local_fallbacks_total",
    "Shared rate-limit takes answered by the local bucket, by reason.",
    ["reason"],
)
#: The Redis bridge's state: 1 for the current one (connecting, connected, degraded...).
REDIS_STATE = Gauge("hearth_redis_state", "Redis bridge state.", ["state"])
#: Seconds since the bridge's canary last came back through Redis (-1: never yet).
REDIS_CANARY_AGE = Gauge("hearth_redis_canary_age_seconds", "Age of the last canary round trip.")
#: Round-trip time of the last canary through Redis pub/sub.
REDIS_CANARY_RTT = Gauge("hearth_redis_canary_rtt_seconds", "Last canary round-trip time.")
#: Room messages carried by the bridge: out (published) and in (delivered from others).
BRIDGE_MESSAGES = Counter(
    "hearth_bridge_messages_total", "Room messages carried across instances.", ["direction"]
)


# -- requests and errors (app/middleware.py, app/analytics.py) ---------------------------

#: HTTP requests by method (known ones, else ``other``), canonical route (``unmatched`` when
#: none matched) and status.
HTTP_REQUESTS = Counter(
    "hearth_http_requests_total", "HTTP requests served.", ["method", "route", "status"]
)
#: HTTP request latency by canonical route; WebSocket upgrades (whose request lasts as long
#: as the socket) are left out.
HTTP_REQUEST_SECONDS = Histogram(
    "hearth_http_request_duration_seconds", "HTTP request latency.", ["route"]
)
#: Requests answered on either transport (``http``; ``ws``: ctrl replies) by status class
#: (2xx..5xx); the alert rules read the 5xx share of it as the error rate.
REQUESTS = Counter(
    "hearth_requests_total", "Requests answered, by transport and status class.",
    ["transport", "status_class"],
)  # fmt: skip
#: Errors answered to clients over either transport, by category and string code.
ERRORS = Counter("hearth_errors_total", "Errors answered to clients.", ["category", "code"])
#: Error events waiting in memory to be written to ``error_events``.
ERROR_EVENTS_PENDING = Gauge("hearth_error_events_pending", "Error events not yet written.")
#: Error events let go unwritten: the buffer overflowed, or PostgreSQL refused them.
ERROR_EVENTS_DROPPED = Counter(
    "hearth_error_events_dropped_total", "Error events dropped before they were written."
)
#: The status classes `REQUESTS` counts, as children made once: counting a ctrl reply
#: is then a dict lookup and an increment.
_WS_REPLIES = {number: REQUESTS.labels("ws", f"{number}xx") for number in (2, 3, 4, 5)}
_HTTP_REQUESTS = {number: REQUESTS.labels("http", f"{number}xx") for number in (2, 3, 4, 5)}


def count_request(transport: str, status: int) -> None:
    """Count one request of *transport* (``http`` or ``ws``) answered with *status*.

    Statuses outside 200-599 (a WebSocket upgrade's 101) are not requests answered.
    """
    child = (_WS_REPLIES if transport == "ws" else _HTTP_REQUESTS).get(status // 100)
    if child is not None:
        child.inc()


#: Stored (or spooled) room messages leaving the writers through the outlet.
MESSAGES_OUT = Counter("hearth_messages_out_total", "Room messages leaving through the outlet.")
#: Room message frames routed to local clients (one per message per subscriber).
DELIVERIES = Counter("hearth_deliveries_total", "Room message frames routed to clients.")
#: From the outlet's emit to the hub having routed the batch to every local subscriber.
FANOUT_SECONDS = Histogram(
    "hearth_fanout_seconds",
    "Fan-out latency: outlet emit to every local subscriber routed.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
