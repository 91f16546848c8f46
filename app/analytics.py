"""Error analytics: every error answered to a client, counted in memory and kept in PostgreSQL."""

from __future__ import annotations

import asyncio
import functools
import itertools
import math
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from app import metrics
from app.errors import STATUS_TEXTS, AppError, DatabaseRejected, InternalError
from app.log import get_logger, iso_utc, trace_id_var
from app.resilience import Backoff
from app.store import ERROR_EVENT_COLUMNS, Store

log = get_logger("analytics")

#: The time ranges the dashboard offers, in seconds.
WINDOWS: dict[str, int] = {"1h": 3600, "24h": 86400, "7d": 7 * 86400}
#: How long error events are kept, in memory (as minute buckets) and in ``error_events``.
RETENTION_SECONDS = 7 * 86400
#: Longest user agent kept, in characters.
MAX_USER_AGENT = 256
#: Longest endpoint, message, trace id or user id kept, in characters.
MAX_TEXT = 200
#: Distinct endpoints (or messages...) one minute bucket counts apart; more go to ``other``,
#: so that a caller passing unbounded values cannot grow memory.
MAX_KEYS_PER_BUCKET = 64
#: Top errors `ErrorStatistics` lists.
TOP_ERRORS = 10
#: Rows one prune deletes at most, so that it stays short however large the backlog.
PRUNE_BATCH = 10_000

#: User agents of phones and tablets (checked before desktop: Android says Linux too).
_MOBILE = re.compile(
    r"Mobi|Android|iPhone|iPad|iPod|Windows Phone|BlackBerry|BB10|Opera Mini|IEMobile|webOS",
    re.IGNORECASE,
)
#: User agents of desktop browsers.
_DESKTOP = re.compile(r"Windows NT|Macintosh|Mac OS X|X11|CrOS|Linux x86_64", re.IGNORECASE)
#: What PostgreSQL text cannot hold, or a log line should not: NUL and the other C0 controls.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@functools.lru_cache(maxsize=512)
def _device_type(user_agent: str) -> str:
    if _MOBILE.search(user_agent):
        return "mobile"
    if _DESKTOP.search(user_agent):
        return "desktop"
    return "unknown"


def device_type(user_agent: str | None) -> str:
    """``mobile``, ``desktop`` or ``unknown`` (curl, bots, none) for *user_agent*."""
    if not user_agent:
        return "unknown"
    return _device_type(user_agent[:MAX_USER_AGENT])


def clean_text(value: object, limit: int = MAX_TEXT) -> str | None:
    """*value* as a string PostgreSQL and the JSON log can always hold, at most *limit*
    characters: lone surrogates become ``?`` and control characters (NUL included) ``?``."""
    if value is None:
        return None
    text = str(value)[:limit]
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    return _CONTROL.sub("?", text)


@dataclass(frozen=True, slots=True)
class ErrorRecord:
    """One error answered to a client, sanitized: no exception details, paths or SQL."""

    #: When it was answered.
    at: datetime
    #: The error model's category: auth, validation, service, ..., ``internal``.
    category: str
    #: String code, e.g. ``NOT_FOUND``.
    code: str
    #: HTTP-style status.
    status: int
    #: The client-safe text the client got.
    message: str
    #: Canonical route (``/api/v1/rooms/{name}/members``, ``unmatched``) or ``ws:<op>``.
    endpoint: str
    #: HTTP method; None on a WebSocket.
    method: str | None
    #: ``http`` or ``ws``.
    transport: str
    #: ``mobile``, ``desktop`` or ``unknown``.
    device_type: str
    #: Trace id of the request, for finding its log lines.
    trace_id: str | None
    #: The client's user agent, truncated.
    user_agent: str | None
    #: The authenticated user, when known.
    user_id: str | None
    #: Made here, so a batch written twice stores each event once.
    event_id: str
    #: Order of recording; the buffer lets go of written events by it.
    serial: int

    def as_dict(self) -> dict[str, Any]:
        """The record for the dashboard and the diagnostics API (no user agent or user id)."""
        shown = {name: getattr(self, name) for name in SHOWN_FIELDS}
        return {**shown, "at": iso_utc(self.at)}

    def row(self) -> dict[str, Any]:
        """The record as `Store.insert_error_events` takes it: one key per column."""
        return {column: getattr(self, column) for column in ERROR_EVENT_COLUMNS}


#: The fields of an `ErrorRecord` operators see, in this order (``at`` as ISO text).
SHOWN_FIELDS = (
    "at", "category", "code", "status", "message", "endpoint", "method", "transport",
    "device_type", "trace_id",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ErrorStatistics:
    """Errors answered within a time range, as the diagnostics dashboard shows them."""

    #: Start and end of the range (whole minutes: the current one is included).
    start: datetime
    end: datetime
    #: Length of the range asked for, in seconds.
    window_seconds: float
    total_errors: int
    #: Counts by category, device type and endpoint, largest first.
    errors_by_category: Mapping[str, int]
    errors_by_device: Mapping[str, int]
    errors_by_endpoint: Mapping[str, int]
    #: The most frequent client texts with their counts, largest first (at most 10).
    top_errors: tuple[tuple[str, int], ...]

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of design 002's ``ErrorStatistics``, plus ``timeRange``."""
        return {
            "totalErrors": self.total_errors,
            "errorsByCategory": dict(self.errors_by_category),
            "errorsByDevice": dict(self.errors_by_device),
            "errorsByEndpoint": dict(self.errors_by_endpoint),
            "topErrors": [{"message": text, "count": count} for text, count in self.top_errors],
            "timeRange": {
                "from": iso_utc(self.start),
                "to": iso_utc(self.end),
                "seconds": self.window_seconds,
            },
        }


class _Bucket:
    """The errors of one minute, counted by each dimension the statistics group by."""

    __slots__ = ("minute", "total", "by_category", "by_device", "by_endpoint", "by_message")

    def __init__(self, minute: int) -> None:
        self.minute = minute
        self.total = 0
        self.by_category: dict[str, int] = {}
        self.by_device: dict[str, int] = {}
        self.by_endpoint: dict[str, int] = {}
        self.by_message: dict[str, int] = {}

    def add(self, record: ErrorRecord) -> None:
        self.total += 1
        _bump(self.by_category, record.category)
        _bump(self.by_device, record.device_type)
        _bump(self.by_endpoint, record.endpoint)
        _bump(self.by_message, record.message)


def _bump(counts: dict[str, int], key: str) -> None:
    if key not in counts and len(counts) >= MAX_KEYS_PER_BUCKET:
        key = "other"
    counts[key] = counts.get(key, 0) + 1


def _add_into(total: dict[str, int], counts: dict[str, int]) -> None:
    for key, count in counts.items():
        total[key] = total.get(key, 0) + count


def _largest_first(counts: dict[str, int]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def count_error(exc: BaseException) -> None:
    """Count *exc* in ``hearth_errors_total`` without recording it (no recorder wired)."""
    if isinstance(exc, AppError):
        metrics.ERRORS.labels(exc.category, exc.code).inc()
    else:
        metrics.ERRORS.labels("internal", InternalError.code).inc()


class ErrorRecorder:
    """Every error answered to a client: statistics and recent errors from memory, and each
    error written once to ``error_events`` while PostgreSQL answers.

    `record` is synchronous and cheap. Records wait in a buffer of *capacity* (the oldest
    dropped past it) for the one task `start` spawns, which writes them in batches of
    *batch_size* every *flush_interval* seconds, waits by *backoff* while PostgreSQL
    fails, and deletes rows older than *retention* seconds every *prune_interval*. `stop`
    writes what it can within *stop_timeout*. *recent_size* records are kept for `recent`;
    *clock* gives the wall-clock time in seconds (tests pass a fake one).
    """

    def __init__(
        self,
        *,
        capacity: int = 10_000,
        batch_size: int = 500,
        recent_size: int = 200,
        flush_interval: float = 1.0,
        prune_interval: float = 3600.0,
        retention: float = RETENTION_SECONDS,
        stop_timeout: float = 2.0,
        backoff: Backoff = Backoff(initial=1.0, max_delay=30.0),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.capacity = capacity
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.prune_interval = prune_interval
        self.retention = retention
        self.stop_timeout = stop_timeout
        self.backoff = backoff
        self.clock = clock
        #: Records dropped unwritten: the buffer overflowed, or PostgreSQL refused them.
        self.dropped = 0
        #: Records written to ``error_events`` (a repeat of one written before included).
        self.flushed = 0
        #: Code of the last failed write (``DATABASE_ERROR``...); None once one succeeds.
        self.last_flush_error: str | None = None
        self._buffer: deque[ErrorRecord] = deque()
        self._recent: deque[ErrorRecord] = deque(maxlen=recent_size)
        self._buckets: dict[int, _Bucket] = {}
        self._serials = itertools.count(1)
        self._overflowing = False
        self._store: Store | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Records waiting to be written."""
        return len(self._buffer)

    # -- recording ---------------------------------------------------------------------------

    def record(
        self,
        exc: BaseException,
        *,
        transport: str,
        endpoint: str,
        method: str | None = None,
        status: int | None = None,
        user_agent: str | None = None,
        user_id: str | None = None,
        trace_id: str | None = None,
    ) -> ErrorRecord | None:
        """Record *exc*, answered to a client over *transport* (``http`` or ``ws``).

        *endpoint* is the canonical route or ``ws:<op>``, *method* the HTTP method, and
        *status* overrides the error's own; *user_agent*, *user_id* and *trace_id* (default:
        the current one) say who and which request. Never raises, blocks or does I/O; only
        the error's code and client-safe text are kept, never its details. Returns the
        record, None if recording failed.
        """
        try:
            return self._record(
                exc, transport, endpoint, method, status, user_agent, user_id, trace_id
            )
        except Exception as error:  # a bug here must never cost the client its answer
            log.bind(error=type(error).__name__).opt(exception=error).error("error not recorded")
            return None

    def _record(
        self,
        exc: BaseException,
        transport: str,
        endpoint: str,
        method: str | None,
        status: int | None,
        user_agent: str | None,
        user_id: str | None,
        trace_id: str | None,
    ) -> ErrorRecord:
        if isinstance(exc, AppError):
            category, code, text = exc.category, exc.code, exc.client_text
            status = status or exc.status
        else:
            category, code, text = "internal", InternalError.code, STATUS_TEXTS[500]
            status = status or 500
        now = self.clock()
        agent = clean_text(user_agent, MAX_USER_AGENT)
        record = ErrorRecord(
            at=datetime.fromtimestamp(now, UTC),
            category=category,
            code=code,
            status=status,
            message=clean_text(text) or "",
            endpoint=clean_text(endpoint) or "unknown",
            method=clean_text(method, 16),
            transport=transport,
            device_type=device_type(agent),
            trace_id=clean_text(trace_id or trace_id_var.get()),
            user_agent=agent,
            user_id=clean_text(user_id),
            event_id=str(uuid.uuid4()),
            serial=next(self._serials),
        )
        metrics.ERRORS.labels(category, code).inc()
        self._recent.append(record)
        self._count(record, int(now // 60))
        if len(self._buffer) >= self.capacity:
            self._buffer.popleft()
            self._drop(1)
            if not self._overflowing:
                self._overflowing = True
                log.bind(capacity=self.capacity).warning(
                    "error event buffer full; dropping the oldest until PostgreSQL takes them"
                )
        self._buffer.append(record)
        metrics.ERROR_EVENTS_PENDING.set(len(self._buffer))
        return record

    def _count(self, record: ErrorRecord, minute: int) -> None:
        buckets = self._buckets
        bucket = buckets.get(minute)
        if bucket is None:
            kept = math.ceil(self.retention / 60)
            while buckets and next(iter(buckets)) <= minute - kept:
                del buckets[next(iter(buckets))]
            # A clock set back adds a minute out of order; the bound holds all the same.
            while len(buckets) >= kept:
                del buckets[next(iter(buckets))]
            bucket = buckets[minute] = _Bucket(minute)
        bucket.add(record)

    def _drop(self, count: int) -> None:
        self.dropped += count
        metrics.ERROR_EVENTS_DROPPED.inc(count)

    # -- reading -----------------------------------------------------------------------------

    def statistics(self, window_seconds: float) -> ErrorStatistics:
        """The errors of the last *window_seconds* (see `WINDOWS`), by whole minutes."""
        now = self.clock()
        minute = int(now // 60)
        first = minute - max(1, math.ceil(window_seconds / 60)) + 1
        by_category: dict[str, int] = {}
        by_device: dict[str, int] = {}
        by_endpoint: dict[str, int] = {}
        by_message: dict[str, int] = {}
        total = 0
        for bucket in self._buckets.values():
            if first <= bucket.minute <= minute:
                total += bucket.total
                _add_into(by_category, bucket.by_category)
                _add_into(by_device, bucket.by_device)
                _add_into(by_endpoint, bucket.by_endpoint)
                _add_into(by_message, bucket.by_message)
        top = tuple(_largest_first(by_message).items())[:TOP_ERRORS]
        return ErrorStatistics(
            start=datetime.fromtimestamp(first * 60, UTC),
            end=datetime.fromtimestamp(now, UTC),
            window_seconds=window_seconds,
            total_errors=total,
            errors_by_category=_largest_first(by_category),
            errors_by_device=_largest_first(by_device),
            errors_by_endpoint=_largest_first(by_endpoint),
            top_errors=top,
        )

    def recent(self, limit: int = 50) -> list[ErrorRecord]:
        """The last *limit* records (at most the *recent_size* kept), newest first."""
        return list(itertools.islice(reversed(self._recent), max(0, limit)))

    # -- writing -----------------------------------------------------------------------------

    def start(self, store: Store) -> None:
        """Write records to *store* from now on, by one task this recorder owns."""
        if self._task is not None and not self._task.done():
            raise RuntimeError("error recorder already started")
        self._store = store
        self._task = asyncio.get_running_loop().create_task(self._run(store), name="error-recorder")

    async def stop(self) -> None:
        """End the task, then write what is buffered within ``stop_timeout``; whatever is
        left unwritten is logged, not raised."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        store, self._store = self._store, None
        if store is None or not self._buffer:
            return
        try:
            async with asyncio.timeout(self.stop_timeout):
                await self._flush(store, timeout=self.stop_timeout)
        except (AppError, TimeoutError) as exc:
            code = exc.code if isinstance(exc, AppError) else "DATABASE_TIMEOUT"
            log.bind(pending=len(self._buffer), error=code).warning(
                "error events not written before shutdown"
            )

    async def _run(self, store: Store) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        next_prune = loop.time()
        while True:
            try:
                await self._flush(store)
            except Exception as exc:
                failures += 1
                self.last_flush_error = exc.code if isinstance(exc, AppError) else "INTERNAL_ERROR"
                if failures == 1:
                    failing = log.bind(pending=len(self._buffer), error=self.last_flush_error)
                    if isinstance(exc, AppError):
                        failing.warning("error events not written; kept until PostgreSQL answers")
                    else:
                        failing.opt(exception=exc).error("writing error events crashed")
                await asyncio.sleep(self.backoff.delay(failures))
                continue
            if failures:
                log.bind(retry_count=failures).info("error events written again")
                failures = 0
            if loop.time() >= next_prune:
                backlog = await self._prune(store)
                # A backlog past one bounded delete is worked off a delete per flush; a
                # failed delete (PostgreSQL not there yet) is tried again within a minute.
                delay = self.prune_interval if backlog is False else 0 if backlog else 60.0
                next_prune = loop.time() + min(delay, self.prune_interval)
            await asyncio.sleep(self.flush_interval)

    async def _flush(self, store: Store, *, timeout: float | None = None) -> None:
        """Write every buffered record, a batch at a time; raises the first `AppError`
        (the failed batch stays buffered) except refusals, which drop only the refused."""
        buffer = self._buffer
        while buffer:
            batch = list(itertools.islice(buffer, self.batch_size))
            refused = 0
            try:
                await store.insert_error_events([r.row() for r in batch], timeout=timeout)
            except DatabaseRejected:
                refused = await self._insert_one_by_one(store, batch, timeout)
            # Overflow may have let go of some of the batch meanwhile: go by serial.
            last = batch[-1].serial
            written = 0
            while buffer and buffer[0].serial <= last:
                buffer.popleft()
                written += 1
            self.flushed += max(0, written - refused)
            self.last_flush_error = None
            metrics.ERROR_EVENTS_PENDING.set(len(buffer))
        self._overflowing = False

    async def _insert_one_by_one(
        self, store: Store, batch: list[ErrorRecord], timeout: float | None
    ) -> int:
        """Insert each of *batch* alone, dropping those PostgreSQL refuses; returns how many."""
        refused = 0
        for record in batch:
            try:
                await store.insert_error_events([record.row()], timeout=timeout)
            except DatabaseRejected as exc:
                refused += 1
                log.bind(event_id=record.event_id, error=exc.code, pgcode=exc.pgcode).error(
                    "error event refused by PostgreSQL; dropped"
                )
        self._drop(refused)
        return refused

    async def _prune(self, store: Store) -> bool | None:
        """Delete one bounded batch of rows past the retention; True when more are left,
        None when the delete failed."""
        before = datetime.fromtimestamp(self.clock() - self.retention, UTC)
        try:
            deleted = await store.prune_error_events(before, limit=PRUNE_BATCH)
        except AppError as exc:
            log.bind(error=exc.code).info("old error events not pruned; trying again later")
            return None
        except Exception as exc:  # a bug: logged, and the writing goes on
            log.opt(exception=exc).error("pruning error events crashed")
            return None
        if deleted:
            log.bind(deleted=deleted).info("old error events pruned")
        return deleted >= PRUNE_BATCH


def record_error(recorder: ErrorRecorder | None, exc: BaseException, **context: Any) -> None:
    """`ErrorRecorder.record` *exc* with *context* when there is a *recorder*, else only
    count it; the one call the HTTP middleware and the WebSocket session make."""
    if recorder is None:
        count_error(exc)
    else:
        recorder.record(exc, **context)
