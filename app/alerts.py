"""Alert rules from the operations seeds, evaluated in-process on each diagnostics sample."""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from dataclasses import dataclass

# Thresholds and durations, cited by deploy/alerts.yml (tests/test_alerts.py keeps the two
# equal), deploy/grafana-dashboard.json and the runbook. A rule's "for" works like a
# Prometheus ``for:`` clause: its condition must hold at every sample for that long.

#: Share of requests answered with a 5xx over `ERROR_RATE_RANGE` above which
#: ``error_rate_critical`` is pending; it fires after `ERROR_RATE_CRITICAL_FOR` seconds.
ERROR_RATE_CRITICAL = 0.10
ERROR_RATE_CRITICAL_FOR = 120.0
#: Share of 5xx answers above which ``error_rate_high`` is pending, firing after
#: `ERROR_RATE_HIGH_FOR` seconds. Both error-rate rules fire together when the critical one
#: does, as Prometheus would; Alertmanager may inhibit the warning.
ERROR_RATE_HIGH = 0.01
ERROR_RATE_HIGH_FOR = 300.0
#: Seconds of counter increase the error rate is taken over (PromQL ``[1m]``).
ERROR_RATE_RANGE = 60.0
#: Seconds the database may be anything but connected before ``database_down`` fires.
DATABASE_DOWN_FOR = 60.0
#: Seconds Redis may be degraded before ``redis_degraded`` fires ('disabled' never alerts).
REDIS_DEGRADED_FOR = 30.0
#: An SQL statement slower than this many seconds is slow (the histogram's ``le="5.0"``).
SLOW_QUERY_SECONDS = 5.0
#: ``slow_query`` fires while a slow statement finished within this many seconds.
SLOW_QUERY_RANGE = 300.0
#: Share of host memory in use above which ``memory_high`` is pending, firing after
#: `MEMORY_HIGH_FOR` seconds.
MEMORY_HIGH = 0.80
MEMORY_HIGH_FOR = 120.0
#: Free share of the spool's file system below which ``disk_low`` is pending, firing
#: after `DISK_LOW_FOR` seconds.
DISK_LOW = 0.10
DISK_LOW_FOR = 60.0
#: Share of the connection limit at or above which ``connections_near_limit`` is pending,
#: firing after `CONNECTIONS_NEAR_LIMIT_FOR` seconds.
CONNECTIONS_NEAR_LIMIT = 0.90
CONNECTIONS_NEAR_LIMIT_FOR = 60.0
#: Restarts of one actor within `ACTOR_RESTART_LOOP_RANGE` seconds that make a restart loop,
#: beside the supervisor's own "failed" verdict. In-process only crashes count, never an
#: operator's restarts; deploy/alerts.yml cannot tell them apart.
ACTOR_RESTART_LOOP_RESTARTS = 3
ACTOR_RESTART_LOOP_RANGE = 300.0

#: The history must reach back this far for the longest range a rule looks at.
LONGEST_RANGE = max(ERROR_RATE_RANGE, SLOW_QUERY_RANGE)

_CRITICAL = "critical"
_WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading of the instance, taken every second by the diagnostics sampler."""

    #: Monotonic seconds.
    at: float
    #: Cumulative requests answered, both transports.
    requests: int
    #: Cumulative requests answered with status >= 500.
    server_errors: int
    #: connected | disconnected | reconnecting | unresponsive | unknown.
    database_state: str
    #: connected | degraded | connecting | disabled.
    redis_state: str
    #: Cumulative SQL statements slower than `SLOW_QUERY_SECONDS`.
    slow_queries: int
    #: Host memory in use, 0..1 (None: unknown).
    memory_used_share: float | None
    #: Free share of the spool's file system, 0..1 (None: unknown).
    disk_free_share: float | None
    #: Client connections open now.
    connections: int
    #: Connections allowed (0: no limit).
    connection_limit: int
    #: Names of actors the supervisor marked failed, or restarting repeatedly.
    actors_in_restart_loop: tuple[str, ...]
    #: Records in the spool's dead-letter file now.
    dead_letters: int


@dataclass(frozen=True, slots=True)
class Rule:
    """One alert rule's fixed facts, shared with deploy/alerts.yml and the runbook."""

    #: Stable id, also the ``alert:`` name in deploy/alerts.yml.
    name: str
    #: "critical" or "warning".
    severity: str
    #: Seconds the condition must hold before the alert fires.
    for_seconds: float
    #: The figure the condition compares with, or None for a yes/no condition.
    threshold: float | None
    #: Section of docs/runbook.rst an operator should read.
    runbook: str


#: Every in-process rule, in the order alerts of one severity are listed.
RULES: tuple[Rule, ...] = (
    Rule(
        "error_rate_critical",
        _CRITICAL,
        ERROR_RATE_CRITICAL_FOR,
        ERROR_RATE_CRITICAL,
        "error-rate-high",
    ),
    Rule("database_down", _CRITICAL, DATABASE_DOWN_FOR, None, "database-lost-or-hung"),
    Rule("disk_low", _CRITICAL, DISK_LOW_FOR, DISK_LOW, "disk-full"),
    Rule("actor_restart_loop", _CRITICAL, 0.0, None, "actor-restart-loop"),
    Rule("error_rate_high", _WARNING, ERROR_RATE_HIGH_FOR, ERROR_RATE_HIGH, "error-rate-high"),
    Rule("redis_degraded", _WARNING, REDIS_DEGRADED_FOR, None, "redis-lost"),
    Rule("slow_query", _WARNING, 0.0, SLOW_QUERY_SECONDS, "database-lost-or-hung"),
    Rule("memory_high", _WARNING, MEMORY_HIGH_FOR, MEMORY_HIGH, "memory-high"),
    Rule(
        "connections_near_limit",
        _WARNING,
        CONNECTIONS_NEAR_LIMIT_FOR,
        CONNECTIONS_NEAR_LIMIT,
        "websocket-trouble",
    ),
    Rule("dead_letters", _WARNING, 0.0, 0.0, "dead-letters"),
)


@dataclass(frozen=True, slots=True)
class Alert:
    """One rule firing now."""

    #: The rule's stable id, e.g. "database_down".
    name: str
    #: "critical" or "warning".
    severity: str
    #: Safe operator text, e.g. "12.5% of requests failed over the last 60 s".
    summary: str
    #: Monotonic time the condition started holding.
    since: float
    #: The figure compared with the threshold, if the rule has one.
    value: float | None = None


@dataclass(frozen=True, slots=True)
class _Point:
    # Counters made reset-proof: a drop is a restart from zero, as PromQL's increase() has it.
    at: float
    requests: int
    server_errors: int
    slow_queries: int


@dataclass(frozen=True, slots=True)
class _Reading:
    holds: bool
    summary: str = ""
    value: float | None = None


def _increase(previous: int, current: int) -> int:
    return current - previous if current >= previous else current


class AlertRules:
    """Evaluates `RULES` over a bounded history of samples.

    *window* is how many seconds of samples are kept; it must cover `LONGEST_RANGE`.
    """

    __slots__ = ("window", "_history", "_last", "_since")

    def __init__(self, *, window: float = 600.0) -> None:
        if window < LONGEST_RANGE:
            raise ValueError(f"window must be at least {LONGEST_RANGE} s, not {window}")
        #: Seconds of samples kept.
        self.window = window
        self._history: deque[_Point] = deque()
        self._last: Sample | None = None
        # Rule name -> time its condition started holding, for rules holding now.
        self._since: dict[str, float] = {}

    @property
    def retained(self) -> int:
        """Samples held in the history now."""
        return len(self._history)

    def observe(self, sample: Sample) -> tuple[Alert, ...]:
        """Add *sample* to the history and return the alerts firing now (sorted critical first).

        Samples must come in order of *sample*'s ``at``; an older one raises `ValueError`.
        """
        self._record(sample)
        readings = {
            "error_rate_critical": self._error_rate(sample.at, ERROR_RATE_CRITICAL),
            "database_down": self._database_down(sample),
            "disk_low": self._disk_low(sample),
            "actor_restart_loop": self._actor_restart_loop(sample),
            "error_rate_high": self._error_rate(sample.at, ERROR_RATE_HIGH),
            "redis_degraded": self._redis_degraded(sample),
            "slow_query": self._slow_query(sample.at),
            "memory_high": self._memory_high(sample),
            "connections_near_limit": self._connections_near_limit(sample),
            "dead_letters": self._dead_letters(sample),
        }
        firing = []
        for rule in RULES:
            reading = readings[rule.name]
            if not reading.holds:
                self._since.pop(rule.name, None)
                continue
            since = self._since.setdefault(rule.name, sample.at)
            if sample.at - since >= rule.for_seconds:
                firing.append(
                    Alert(rule.name, rule.severity, reading.summary, since, reading.value)
                )
        # RULES lists the critical rules first, so the order is already critical first.
        return tuple(firing)

    def _record(self, sample: Sample) -> None:
        last = self._last
        if last is None:
            point = _Point(sample.at, 0, 0, 0)
        else:
            if sample.at < last.at:
                raise ValueError(f"sample at {sample.at} is older than the last, at {last.at}")
            previous = self._history[-1]
            point = _Point(
                sample.at,
                previous.requests + _increase(last.requests, sample.requests),
                previous.server_errors + _increase(last.server_errors, sample.server_errors),
                previous.slow_queries + _increase(last.slow_queries, sample.slow_queries),
            )
        self._last = sample
        self._history.append(point)
        cutoff = sample.at - self.window
        while self._history[0].at < cutoff:
            self._history.popleft()

    def _oldest_within(self, at: float, seconds: float) -> _Point:
        index = bisect_left(self._history, at - seconds, key=lambda point: point.at)
        return self._history[index]

    def _error_rate(self, at: float, threshold: float) -> _Reading:
        first, last = self._oldest_within(at, ERROR_RATE_RANGE), self._history[-1]
        requests = last.requests - first.requests
        if requests <= 0:
            return _Reading(False)
        share = (last.server_errors - first.server_errors) / requests
        summary = f"{share:.1%} of requests failed over the last {ERROR_RATE_RANGE:.0f} s"
        return _Reading(share > threshold, summary, share)

    def _database_down(self, sample: Sample) -> _Reading:
        return _Reading(
            sample.database_state != "connected", f"database is {sample.database_state}"
        )

    def _disk_low(self, sample: Sample) -> _Reading:
        share = sample.disk_free_share
        if share is None:
            return _Reading(False)
        return _Reading(share < DISK_LOW, f"{share:.1%} of the spool's file system is free", share)

    def _actor_restart_loop(self, sample: Sample) -> _Reading:
        names = sample.actors_in_restart_loop
        return _Reading(bool(names), f"actors in a restart loop: {', '.join(sorted(names))}")

    def _redis_degraded(self, sample: Sample) -> _Reading:
        summary = "Redis is degraded: messages reach only this instance's clients"
        return _Reading(sample.redis_state == "degraded", summary)

    def _slow_query(self, at: float) -> _Reading:
        first, last = self._oldest_within(at, SLOW_QUERY_RANGE), self._history[-1]
        slow = last.slow_queries - first.slow_queries
        summary = (
            f"{slow} SQL statements took over {SLOW_QUERY_SECONDS:g} s"
            f" in the last {SLOW_QUERY_RANGE / 60:g} min"
        )
        return _Reading(slow > 0, summary, float(slow))

    def _memory_high(self, sample: Sample) -> _Reading:
        share = sample.memory_used_share
        if share is None:
            return _Reading(False)
        return _Reading(share > MEMORY_HIGH, f"{share:.0%} of host memory is in use", share)

    def _connections_near_limit(self, sample: Sample) -> _Reading:
        limit = sample.connection_limit
        if limit <= 0:
            return _Reading(False)
        share = sample.connections / limit
        summary = f"{sample.connections} of {limit} connections in use ({share:.0%})"
        return _Reading(share >= CONNECTIONS_NEAR_LIMIT, summary, share)

    def _dead_letters(self, sample: Sample) -> _Reading:
        count = sample.dead_letters
        summary = f"{count} records in the spool's dead-letter file"
        return _Reading(count > 0, summary, float(count))
