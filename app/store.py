"""The store: every SQL statement hearth runs, behind one query interceptor and one error model."""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import aiopg
import psycopg2
import psycopg2.extensions
from psycopg2.extensions import TRANSACTION_STATUS_IDLE, QueryCanceledError

from app import metrics
from app.alerts import SLOW_QUERY_SECONDS
from app.crypto import DecryptError, MessageCipher
from app.errors import (
    RETRYABLE_PGCODES,
    AppError,
    Conflict,
    DatabaseError,
    DatabaseRejected,
    DatabaseTimeout,
    EncryptionError,
    NotFound,
)
from app.log import get_logger, iso_utc, redact_dsn
from app.models import Message, RoomRecord
from app.resilience import Backoff

log = get_logger("store")

#: Numbered SQL files applied by `migrate`.
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
#: pgcodes of a server that ended the session: it is shutting down or restarting
#: (admin_shutdown and friends), or one of its idle timeouts struck.
SERVER_GOING_AWAY_PGCODES = frozenset({"57P01", "57P02", "57P03", "57P05", "25P03"})
#: SQLSTATE classes of trouble on the server's side, insufficient resources (disk full, too
#: many connections) and system errors: no fault of the statement, and they may pass.
SERVER_TROUBLE_CLASSES = frozenset({"53", "58"})
#: pgcodes of a statement the server gave up on: query_canceled (statement_timeout or a
#: cancel request) and lock_not_available (lock_timeout).
TIMEOUT_PGCODES = frozenset({"57014", "55P03"})
#: How often a backend running a statement checks that we are still there, in milliseconds
#: (PostgreSQL 14+); an abandoned statement dies within this even if no cancel arrives.
CLIENT_CHECK_INTERVAL_MS = 1000
#: unique_violation: two writers raced to store the same message.
UNIQUE_VIOLATION = "23505"
#: Stores a room's batch of messages in one round trip, or finds copies stored before. The
#: room's row lock (taken by the UPDATE) orders its seqs without gaps: the new messages take
#: the next seqs in batch order. A repeat (same id, or same sender and client_msg_id) touches
#: nothing and comes back as the first copy (its room, seq and content: a client_msg_id
#: names one message wherever it was sent). No row back for a message means
#: there is no such room. Flags travel as one string per message, joined by FLAG_SEPARATOR.
_INSERT_MESSAGES_SQL = """
WITH input AS (
    SELECT * FROM unnest(%(ids)s::uuid[], %(senders)s::text[], %(client_msg_ids)s::text[],
                         %(contents)s::text[], %(contents_enc)s::bytea[], %(flags)s::text[],
                         %(created_at)s::timestamptz[])
        WITH ORDINALITY AS t(id, sender, client_msg_id, content, content_enc, flags, created_at,
                             ord)
), existing AS (
    SELECT DISTINCT ON (ord) * FROM (
        SELECT i.ord, m.id, m.room, m.seq, m.sender, m.client_msg_id, m.content,
               m.content_enc, m.flags, m.created_at
        FROM input i JOIN messages m ON m.id = i.id
        UNION ALL
        SELECT i.ord, m.id, m.room, m.seq, m.sender, m.client_msg_id, m.content,
               m.content_enc, m.flags, m.created_at
        FROM input i JOIN messages m ON m.sender = i.sender AND m.client_msg_id = i.client_msg_id
    ) found ORDER BY ord
), fresh AS (
    SELECT i.*, row_number() OVER (ORDER BY i.ord) AS n
    FROM input i WHERE i.ord NOT IN (SELECT ord FROM existing)
), bumped AS (
    UPDATE rooms SET last_seq = last_seq + (SELECT count(*) FROM fresh)
    WHERE name = %(room)s AND EXISTS (SELECT 1 FROM fresh)
    RETURNING last_seq - (SELECT count(*) FROM fresh) AS base
), inserted AS (
    INSERT INTO messages (id, room, seq, sender, client_msg_id, content, content_enc, flags,
                          created_at)
    SELECT f.id, %(room)s, b.base + f.n, f.sender, f.client_msg_id, f.content, f.content_enc,
           COALESCE(string_to_array(f.flags, %(separator)s), '{}'), f.created_at
    FROM fresh f CROSS JOIN bumped b
    RETURNING id, seq
)
SELECT f.ord, true, ins.id, NULL, ins.seq, NULL, NULL, NULL, NULL::bytea, NULL::text[],
       NULL::timestamptz
FROM inserted ins JOIN fresh f ON f.id = ins.id
UNION ALL
SELECT ord, false, id, room, seq, sender, client_msg_id, content, content_enc, flags, created_at
FROM existing
"""
#: Joins a message's flags into one array element (flags are identifiers, never content).
FLAG_SEPARATOR = "\x1f"
#: The channel the room triggers of ``002_room_notify.sql`` notify, with the room name.
ROOMS_CHANNEL = "hearth_rooms"

T = TypeVar("T")


class MigrationFailed(DatabaseRejected):
    """A migration file failed and was rolled back."""

    def __init__(self, filename: str, *, pgcode: str | None = None) -> None:
        super().__init__(filename, pgcode=pgcode)
        #: The file that failed.
        self.filename = filename


#: Rooms with their members as a text array; callers add WHERE, GROUP BY and ORDER BY.
_ROOMS_SQL = (
    "SELECT r.name, r.is_private, r.last_seq,"
    " COALESCE(array_agg(m.user_id::text) FILTER (WHERE m.user_id IS NOT NULL), '{}')"
    " FROM rooms r LEFT JOIN room_members m ON m.room = r.name"
)


def _room_record(row: tuple[Any, ...]) -> RoomRecord:
    name, is_private, last_seq, members = row
    return RoomRecord(
        name=name, is_private=is_private, last_seq=last_seq, members=frozenset(members)
    )


class _PoolClosed(Exception):
    """The pool is not open, or aiopg refused an acquire because it is closing."""


def _connection_lost(exc: BaseException) -> bool:
    """Whether *exc* means the connection is gone, as opposed to a statement's own failure."""
    if isinstance(exc, psycopg2.Error):
        # SerializationFailure and LockNotAvailable are OperationalErrors too, but the
        # connection is fine.
        pgcode = exc.pgcode or ""
        return isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError) and (
            not pgcode or pgcode.startswith("08") or pgcode in SERVER_GOING_AWAY_PGCODES
        )
    # A timeout is an OSError too, but the connection may be fine and retrying only
    # doubles the wait.
    return isinstance(exc, OSError | _PoolClosed) and not isinstance(exc, TimeoutError)


def _error_label(exc: BaseException) -> str:
    # psycopg2 messages may quote row values (content, names), so only the type and pgcode
    # ever reach a log line or an error's detail.
    pgcode = getattr(exc, "pgcode", None)
    return f"{type(exc).__name__}:{pgcode}" if pgcode else type(exc).__name__


def _as_app_error(exc: BaseException, *, adapting: bool = False) -> AppError | None:
    """The error-model twin of the driver-level *exc*; the one place that decides it.

    An `AppError` comes back as it is, and None means *exc* is no database failure (a bug
    in the work, say) and should propagate unchanged. *adapting* says that *exc* came out of
    the driver while it turned parameters into SQL, where a ValueError (a lone surrogate
    or a NUL in a string) means PostgreSQL can never take the value.
    """
    if isinstance(exc, AppError):
        return exc
    detail = _error_label(exc)
    if isinstance(exc, TimeoutError):  # our deadline, or aiopg's
        return DatabaseTimeout(detail)
    if isinstance(exc, psycopg2.Error):
        if exc.pgcode in TIMEOUT_PGCODES:
            return DatabaseTimeout(detail)
        pgcode = exc.pgcode or ""
        if (
            _connection_lost(exc)
            or pgcode in RETRYABLE_PGCODES
            or pgcode[:2] in SERVER_TROUBLE_CLASSES
        ):
            # A conflict gets here only once its retries are used up; later may work.
            return DatabaseError(detail)
        return DatabaseRejected(detail, pgcode=exc.pgcode)
    if isinstance(exc, OSError | _PoolClosed):
        return DatabaseError(detail)
    if adapting and isinstance(exc, ValueError):  # UnicodeEncodeError is one
        return DatabaseRejected(detail)
    return None


class _AppErrors:
    """Raise driver-level failures of the block as their `_as_app_error` twin, chained."""

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: Any
    ) -> None:
        # Returning None (never True) tells readers and mypy alike that nothing is swallowed.
        if isinstance(exc, Exception):
            error = _as_app_error(exc)
            if error is not None and error is not exc:
                raise error from exc


def _server_gave_up(exc: asyncio.CancelledError) -> QueryCanceledError | None:
    # aiopg turns a statement the server cancelled (statement_timeout) into CancelledError.
    # That is no cancellation of ours, and must not pass for one: it would end the caller.
    task = asyncio.current_task()
    cause = exc.__context__
    if isinstance(cause, QueryCanceledError) and task is not None and not task.cancelling():
        return cause
    return None


class Cursor:
    """A cursor bound to one connection, whose every statement goes through the interceptor."""

    def __init__(
        self, store: Store, cursor: aiopg.Cursor, *, backend_pid: int, reused: bool = False
    ) -> None:
        self._store = store
        self._cursor = cursor
        #: Process id of the server backend behind the connection.
        self.backend_pid = backend_pid
        #: Whether the connection served an earlier operation (and so may have gone stale).
        self.reused = reused

    @property
    def connection_closed(self) -> bool:
        """Whether the connection under this cursor is closed."""
        return bool(self._cursor.connection.closed)

    async def execute(
        self,
        operation: str,
        table: str,
        sql: str,
        params: tuple[Any, ...] | dict[str, Any] = (),
        *,
        log_params: dict[str, Any] | None = None,
    ) -> None:
        """Run *sql* with *params*, timed and counted under *operation* and *table*.

        *log_params* is the only view of the parameters a log line may show; never put
        message content or secrets in it. A statement abandoned half-way (its operation's
        deadline passed, or its task was cancelled) is cancelled on the server as well.
        """
        started = time.perf_counter()
        try:
            try:
                await self._cursor.execute(sql, params)
            except asyncio.CancelledError as cancelled:
                server_error = _server_gave_up(cancelled)
                if server_error is None:
                    self._failed(operation, table, log_params, cancelled, started)
                    self._store._cancel_abandoned(self.backend_pid)
                    raise
                raise server_error from None
        except ValueError as exc:  # UnicodeEncodeError included: the driver could not adapt
            self._failed(operation, table, log_params, exc, started)
            error = _as_app_error(exc, adapting=True)
            assert error is not None
            raise error from exc
        except Exception as exc:
            self._failed(operation, table, log_params, exc, started)
            if isinstance(exc, TimeoutError):  # aiopg's own timeout closed the connection
                self._store._cancel_abandoned(self.backend_pid)
            raise
        finally:
            elapsed = time.perf_counter() - started
            metrics.DB_QUERY_SECONDS.labels(operation, table).observe(elapsed)
            if elapsed >= SLOW_QUERY_SECONDS:
                metrics.DB_SLOW_STATEMENTS.inc()
        if elapsed * 1000 >= self._store.slow_query_ms:
            log.bind(
                operation=operation, table=table, params=log_params,
                duration_ms=round(elapsed * 1000, 2),
            ).warning("slow query")  # fmt: skip

    def _failed(
        self,
        operation: str,
        table: str,
        log_params: dict[str, Any] | None,
        exc: BaseException,
        started: float,
    ) -> None:
        metrics.DB_QUERY_ERRORS.labels(operation, table).inc()
        # A refusal is a bug or bad data; a lost connection, a timeout or a conflict is the
        # weather, logged again where it is handled.
        rejected = isinstance(_as_app_error(exc, adapting=True), DatabaseRejected)
        log.bind(
            operation=operation, table=table, params=log_params, error=_error_label(exc),
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        ).log("ERROR" if rejected else "WARNING", "query failed")  # fmt: skip

    async def fetchone(self) -> tuple[Any, ...] | None:
        """The next row of the last statement."""
        return await self._cursor.fetchone()

    async def fetchall(self) -> list[tuple[Any, ...]]:
        """Every remaining row of the last statement."""
        return await self._cursor.fetchall()


class Listener:
    """Notifications of one channel, read from a connection of their own (see `Store.listen`)."""

    def __init__(self, connection: aiopg.Connection, channel: str) -> None:
        self._connection = connection
        #: The channel listened to.
        self.channel = channel
        # One get outlives a next() that timed out, so no notification is lost between calls.
        self._pending: asyncio.Task[Any] | None = None

    async def next(self, timeout: float) -> str | None:
        """The payload of the next notification, or None when *timeout* seconds pass first.

        Raises `DatabaseError` once the connection is lost; notifications sent until then
        are still returned first.
        """
        if self._pending is None:
            self._pending = asyncio.get_running_loop().create_task(
                self._connection.notifies.get(), name=f"listen-{self.channel}"
            )
        done, _ = await asyncio.wait({self._pending}, timeout=timeout)
        if not done:
            return None
        got, self._pending = self._pending, None
        with _AppErrors():
            notify = got.result()
        return str(notify.payload)

    async def _close(self) -> None:
        pending, self._pending = self._pending, None
        try:
            if pending is not None:
                pending.cancel()
                await asyncio.wait({pending})
                if not pending.cancelled():
                    pending.exception()  # moot now, but asyncio would report it unread
        finally:
            self._connection.close()


class Store:
    """PostgreSQL through an aiopg pool: every SQL statement hearth runs.

    Every public coroutine raises database trouble only as `DatabaseError` (connection
    lost, or conflicts that outlived their retries), `DatabaseTimeout` (a deadline passed,
    ours or the server's) or `DatabaseRejected` (a statement PostgreSQL will never take).
    """

    def __init__(
        self,
        dsn: str,
        *,
        cipher: MessageCipher | None = None,
        pool_size: int = 10,
        timeout: float = 5.0,
        slow_query_ms: float = 1000.0,
        tx_retries: int = 3,
        tx_backoff: Backoff = Backoff(initial=0.05, max_delay=1.0),
    ) -> None:
        self.dsn = dsn
        self.cipher = cipher
        self.pool_size = pool_size
        #: Deadline of one whole operation (pool acquire, statements, the one retry), in
        #: seconds; the server enforces it too, as statement and lock timeout.
        self.timeout = timeout
        self.slow_query_ms = slow_query_ms
        self.tx_retries = tx_retries
        self.tx_backoff = tx_backoff
        #: Set by the DbMonitor from its pings: False sends publishes straight to the spool.
        self.available = True
        self._pool: aiopg.Pool | None = None
        # Connections that went back to the pool once; only these may have gone stale.
        self._pooled: weakref.WeakSet[aiopg.Connection] = weakref.WeakSet()
        # Cancel requests for abandoned statements, and pool wake-ups; close() ends them.
        self._tasks: set[asyncio.Future[Any]] = set()
        # A fair (FIFO) queue in front of the pool: aiopg's own wait lets a caller that just
        # released barge ahead of one woken for it, starving waiters past their deadline
        # once callers outnumber connections (measured: 20 callers on 10 connections).
        self._slots = asyncio.Semaphore(pool_size)

    def __repr__(self) -> str:
        return f"<Store {redact_dsn(self.dsn)}>"

    # -- pool -------------------------------------------------------------------------------

    def _connect_options(self) -> dict[str, Any]:
        """Keyword arguments of every connection: server-side deadlines included."""
        timeout_ms = max(1, round(self.timeout * 1000))
        # The server stops what we stopped waiting for, even when no cancel reaches it.
        settings = {
            "statement_timeout": timeout_ms,
            "lock_timeout": timeout_ms,
            "idle_in_transaction_session_timeout": timeout_ms,
            "client_connection_check_interval": CLIENT_CHECK_INTERVAL_MS,
        }
        options = " ".join(f"-c {name}={value}" for name, value in settings.items())
        given = psycopg2.extensions.parse_dsn(self.dsn).get("options")
        return {
            "enable_json": False,
            "enable_hstore": False,
            "enable_uuid": False,
            "options": f"{given} {options}" if given else options,
        }

    async def open(self) -> None:
        """Create the pool; it connects lazily, so this succeeds with PostgreSQL down."""
        if self._pool is None:
            with _AppErrors():
                self._pool = await aiopg.create_pool(
                    self.dsn,
                    minsize=0,
                    maxsize=self.pool_size,
                    timeout=self.timeout,
                    **self._connect_options(),
                )

    async def close(self) -> None:
        """Close every connection and end the store's background tasks."""
        tasks, self._tasks = self._tasks, set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.terminate()
            await pool.wait_closed()

    def pool_stats(self) -> dict[str, int]:
        """Size, free, in use and waiting, for the DbMonitor and the dashboard."""
        pool = self._pool
        if pool is None:
            return {"size": 0, "free": 0, "in_use": 0, "waiting": 0, "max": self.pool_size}
        waiting = len(getattr(pool._cond, "_waiters", None) or ())
        return {
            "size": pool.size,
            "free": pool.freesize,
            "in_use": pool.size - pool.freesize,
            "waiting": waiting,
            "max": self.pool_size,
        }

    async def forget_connections(self) -> None:
        """Drop pooled connections, which are stale after PostgreSQL restarted."""
        if self._pool is not None:
            try:
                async with asyncio.timeout(self.timeout):
                    await self._pool.clear()
            except Exception as exc:
                log.bind(error=_error_label(exc)).warning("clearing the pool failed")

    def _track(self, future: asyncio.Future[Any]) -> None:
        self._tasks.add(future)
        future.add_done_callback(self._tasks.discard)

    def _cancel_abandoned(self, backend_pid: int) -> None:
        """Have the server stop the statement backend *backend_pid* runs for nobody now."""
        # aiopg has closed the connection, and with it the key a cancel request needs, so
        # another connection asks; its wait must not add to the caller's.
        task = asyncio.get_running_loop().create_task(
            self._cancel_backend(backend_pid), name=f"store-cancel-{backend_pid}"
        )
        self._track(task)

    async def _cancel_backend(self, backend_pid: int) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                async with aiopg.connect(
                    self.dsn, timeout=self.timeout, **self._connect_options()
                ) as connection:
                    async with connection.cursor() as cursor:
                        await cursor.execute("SELECT pg_cancel_backend(%s)", (backend_pid,))
                        (signalled,) = await cursor.fetchone()
        except Exception as exc:
            # The server's statement timeout and its client check still end the statement.
            log.bind(backend_pid=backend_pid, error=_error_label(exc)).warning(
                "abandoned statement not cancelled"
            )
            return
        log.bind(backend_pid=backend_pid, signalled=signalled).info("abandoned statement cancelled")

    @asynccontextmanager
    async def _cursor(self) -> AsyncIterator[Cursor]:
        async with self._slots:
            async with self._pooled_cursor() as cursor:
                yield cursor

    @asynccontextmanager
    async def _pooled_cursor(self) -> AsyncIterator[Cursor]:
        pool = self._pool
        if pool is None:
            raise _PoolClosed("pool not open")
        try:
            conn = await pool.acquire()
        except RuntimeError as exc:
            if self._pool is not pool or pool.closed:
                raise _PoolClosed("pool closed") from exc
            raise
        reused = conn in self._pooled
        try:
            raw = await conn.cursor()
            try:
                yield Cursor(self, raw, backend_pid=conn.raw.get_backend_pid(), reused=reused)
            finally:
                raw.close()
        finally:
            # A connection busy with a statement or left inside a transaction (cancelled,
            # or rollback failed) is in no state to serve anyone else.
            if not conn.closed and (
                conn.raw.isexecuting()
                or conn.raw.get_transaction_status() != TRANSACTION_STATUS_IDLE
            ):
                conn.close()
            # Not awaited: waking the next waiter may queue behind a hung connect.
            self._track(asyncio.ensure_future(pool.release(conn)))
            if not conn.closed:
                self._pooled.add(conn)

    async def run(
        self, work: Callable[[Cursor], Awaitable[T]], *, name: str, timeout: float | None = None
    ) -> T:
        """Run *work* on one autocommit connection, all within one deadline.

        The deadline is *timeout* seconds (default, and at most: the store's ``timeout``)
        and covers the pool acquire, *work* and the retry: a pooled connection that turns
        out stale costs one retry on a fresh connection, so callers only pass idempotent
        work. A timeout is never retried. *name* labels logs and metrics.
        """
        return await self._operate(work, name=name, timeout=timeout)

    async def transaction(
        self, work: Callable[[Cursor], Awaitable[T]], *, name: str, timeout: float | None = None
    ) -> T:
        """Run *work* inside BEGIN/COMMIT, rolling back on any error.

        Serialization failures and deadlocks are retried with backoff up to ``tx_retries``
        attempts, and a stale connection costs one retry, all within the one deadline of
        `run` (*timeout*). *work* must be idempotent; *name* labels logs and metrics.
        """
        return await self._operate(work, name=name, timeout=timeout, transactional=True)

    async def _operate(
        self,
        work: Callable[[Cursor], Awaitable[T]],
        *,
        name: str,
        timeout: float | None = None,
        transactional: bool = False,
        retry_stale: bool = True,
    ) -> T:
        budget = self.timeout if timeout is None else min(timeout, self.timeout)
        with _AppErrors():
            async with asyncio.timeout(budget) as deadline:
                return await self._attempts(
                    work, name, deadline, transactional=transactional, retry_stale=retry_stale
                )

    async def _attempts(
        self,
        work: Callable[[Cursor], Awaitable[T]],
        name: str,
        deadline: asyncio.Timeout,
        *,
        transactional: bool,
        retry_stale: bool,
    ) -> T:
        loop = asyncio.get_running_loop()
        conflicts = 0
        while True:
            used: Cursor | None = None
            try:
                async with self._cursor() as cursor:
                    used = cursor
                    if transactional:
                        return await self._in_transaction(cursor, work, name)
                    return await work(cursor)
            except Exception as exc:
                if retry_stale and used is not None and used.reused and _connection_lost(exc):
                    retry_stale = False
                    log.bind(name=name, error=_error_label(exc), retry_count=1).warning(
                        "connection lost; retrying once on a fresh connection"
                    )
                    await self.forget_connections()
                    continue
                pgcode = getattr(exc, "pgcode", None)
                if not transactional or pgcode not in RETRYABLE_PGCODES:
                    raise
                conflicts += 1
                delay = self.tx_backoff.delay(conflicts)
                when = deadline.when()
                if conflicts >= self.tx_retries or (
                    when is not None and loop.time() + delay >= when
                ):
                    raise  # sleeping into the deadline would only turn a conflict into a timeout
                metrics.DB_TX_RETRIES.labels(name).inc()
                log.bind(name=name, retry_count=conflicts, error=_error_label(exc)).warning(
                    "transaction conflict; retrying"
                )
                await asyncio.sleep(delay)

    async def _in_transaction(
        self, cursor: Cursor, work: Callable[[Cursor], Awaitable[T]], name: str
    ) -> T:
        await cursor.execute("begin", "-", "BEGIN")
        try:
            result = await work(cursor)
            await cursor.execute("commit", "-", "COMMIT")
        except Exception as exc:
            metrics.DB_ROLLBACKS.labels(name).inc()
            log.bind(name=name, error=_error_label(exc)).warning("transaction rolled back")
            if not cursor.connection_closed and not _connection_lost(exc):
                try:
                    await cursor.execute("rollback", "-", "ROLLBACK")
                except Exception as rollback_exc:
                    # The connection is then closed instead of pooled; the error that
                    # caused the rollback is the one worth raising.
                    log.bind(name=name, error=_error_label(rollback_exc)).warning("rollback failed")
            raise
        return result

    async def ping(self) -> float:
        """Round-trip ``SELECT 1`` and return its latency in seconds.

        Unlike `run`, a stale connection is not retried: the caller wants to know.
        """
        started = time.perf_counter()

        async def select_one(cursor: Cursor) -> None:
            await cursor.execute("ping", "-", "SELECT 1")
            await cursor.fetchone()

        await self._operate(select_one, name="ping", retry_stale=False)
        return time.perf_counter() - started

    # -- diagnostics ------------------------------------------------------------------------

    async def probe(self, operation: str, *, trace_id: str | None) -> None:
        """Run one diagnostic *operation*: ``read`` a table, ``write`` the probe row, or do
        both in one ``transaction``. Raises the store's errors; callers time it."""
        upsert = (
            "INSERT INTO diagnostic_probe (id, written_at, trace_id) VALUES (1, now(), %s)"
            " ON CONFLICT (id) DO UPDATE SET written_at = excluded.written_at,"
            " trace_id = excluded.trace_id"
        )

        async def read(cursor: Cursor) -> None:
            await cursor.execute("select", "rooms", "SELECT count(*) FROM rooms")
            await cursor.fetchone()

        async def write(cursor: Cursor) -> None:
            await cursor.execute("upsert", "diagnostic_probe", upsert, (trace_id,))

        async def both(cursor: Cursor) -> None:
            await write(cursor)
            await cursor.execute(
                "select", "diagnostic_probe",
                "SELECT written_at FROM diagnostic_probe WHERE id = 1 FOR UPDATE",
            )  # fmt: skip
            await cursor.fetchone()
            await read(cursor)

        if operation == "transaction":
            await self.transaction(both, name="probe_transaction")
        else:
            await self.run(write if operation == "write" else read, name=f"probe_{operation}")

    async def describe_tables(self) -> dict[str, Any]:
        """The server's version and connections, and each table's estimated rows, size and
        indexes (from the catalogue: no table is scanned)."""

        async def select(cursor: Cursor) -> dict[str, Any]:
            await cursor.execute(
                "select", "pg_stat_activity",
                "SELECT current_setting('server_version'),"
                " (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database())",
            )  # fmt: skip
            version, connections = await cursor.fetchone() or ("", 0)
            await cursor.execute(
                "select", "pg_class",
                "SELECT c.relname, greatest(c.reltuples, 0)::bigint,"
                " pg_total_relation_size(c.oid),"
                " coalesce(array_agg(i.relname ORDER BY i.relname)"
                "   FILTER (WHERE i.relname IS NOT NULL), '{}')"
                " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " LEFT JOIN pg_index x ON x.indrelid = c.oid"
                " LEFT JOIN pg_class i ON i.oid = x.indexrelid"
                " WHERE n.nspname = current_schema() AND c.relkind = 'r'"
                " GROUP BY c.oid, c.relname, c.reltuples ORDER BY c.relname",
            )  # fmt: skip
            tables = [
                {
                    "name": name,
                    "estimatedRows": rows,
                    "sizeBytes": size,
                    "avgRowBytes": round(size / rows) if rows else None,
                    "indexes": list(indexes),
                }
                for name, rows, size, indexes in await cursor.fetchall()
            ]
            return {"serverVersion": version, "serverConnections": connections, "tables": tables}

        return await self.run(select, name="describe_tables")

    # -- notifications ----------------------------------------------------------------------

    @asynccontextmanager
    async def listen(self, channel: str) -> AsyncIterator[Listener]:
        """LISTEN to *channel* on a connection of its own, outside the pool.

        Yields a `Listener`; connecting and the LISTEN itself share the store's deadline
        and raise `DatabaseError` or `DatabaseTimeout`. Listen before loading what the
        notifications refresh, so that no change falls between the two.
        """
        with _AppErrors():
            async with asyncio.timeout(self.timeout):
                connection = await aiopg.connect(
                    self.dsn, timeout=self.timeout, **self._connect_options()
                )
        listener = Listener(connection, channel)
        try:
            with _AppErrors():
                async with asyncio.timeout(self.timeout):
                    cursor = await connection.cursor()
                    try:
                        quoted = psycopg2.extensions.quote_ident(channel, connection.raw)
                        await cursor.execute(f"LISTEN {quoted}")
                    finally:
                        cursor.close()
            yield listener
        finally:
            await listener._close()

    # -- migrations -------------------------------------------------------------------------

    async def migrate(self, folder: Path = MIGRATIONS_DIR) -> list[str]:
        """Apply each pending ``NNN_name.sql`` in *folder* in its own transaction.

        Returns the files applied. A file PostgreSQL refuses is rolled back, logged at
        FATAL and raised as `MigrationFailed`; files before it stay applied. A lost
        connection or a timeout raises `DatabaseError` or `DatabaseTimeout` instead.
        """

        async def ensure_table(cursor: Cursor) -> list[str]:
            await cursor.execute(
                "create", "schema_migrations",
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " filename text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
            )  # fmt: skip
            await cursor.execute(
                "select", "schema_migrations", "SELECT filename FROM schema_migrations"
            )
            return [row[0] for row in await cursor.fetchall()]

        done = set(await self.run(ensure_table, name="migrate"))
        applied = []
        for path in sorted(folder.glob("[0-9]*.sql")):  # noqa: ASYNC240 - a few small files at startup
            if path.name in done:
                continue
            sql = path.read_text()  # noqa: ASYNC240

            async def apply(cursor: Cursor, sql: str = sql, filename: str = path.name) -> None:
                # Lock out a concurrent migrator; the loser sees the row and skips.
                await cursor.execute("lock", "schema_migrations", "LOCK TABLE schema_migrations")
                await cursor.execute(
                    "select", "schema_migrations",
                    "SELECT 1 FROM schema_migrations WHERE filename = %s", (filename,),
                )  # fmt: skip
                if await cursor.fetchone():
                    return
                await cursor.execute("migrate", filename, sql)
                await cursor.execute(
                    "insert", "schema_migrations",
                    "INSERT INTO schema_migrations (filename) VALUES (%s)", (filename,),
                )  # fmt: skip

            try:
                await self.transaction(apply, name="migrate")
            except DatabaseRejected as exc:
                log.bind(file=path.name, error=exc.detail).log("FATAL", "migration failed")
                raise MigrationFailed(path.name, pgcode=exc.pgcode) from exc
            log.bind(file=path.name).info("migration applied")
            applied.append(path.name)
        return applied

    async def applied_migrations(self) -> list[str]:
        """Filenames of the migrations applied so far, sorted; none on a database never
        migrated."""

        async def select(cursor: Cursor) -> list[str]:
            await cursor.execute(
                "select", "schema_migrations", "SELECT to_regclass('schema_migrations')"
            )
            row = await cursor.fetchone()
            if row is None or row[0] is None:
                return []
            await cursor.execute(
                "select", "schema_migrations",
                "SELECT filename FROM schema_migrations ORDER BY filename",
            )  # fmt: skip
            return [filename for (filename,) in await cursor.fetchall()]

        return await self.run(select, name="applied_migrations")

    # -- messages ---------------------------------------------------------------------------

    async def insert_message(
        self, message: Message, *, timeout: float | None = None
    ) -> tuple[Message, bool]:
        """Store *message* like `store_message`, also telling whether the row is new.

        The flag is False for a repeat (same id, or same sender and client_msg_id), which
        comes back with the first copy's id and seq. Raises `NotFound` for an unknown room,
        and otherwise as `insert_messages`.
        """
        (outcome,) = await self.insert_messages(message.room, [message], timeout=timeout)
        if isinstance(outcome, AppError):
            raise outcome
        return outcome

    async def insert_messages(
        self, room: str, messages: Sequence[Message], *, timeout: float | None = None
    ) -> list[tuple[Message, bool] | NotFound | DatabaseRejected]:
        """Store *room*'s *messages* in one statement, taking the next seqs in their order.

        Each outcome is ``(stored, is_new)`` (a repeat comes back with the first copy's id
        and seq), `NotFound` for an unknown room, or `DatabaseRejected` for content
        PostgreSQL cannot hold: a batch it refuses is stored again one message at a time,
        so one bad message costs only itself. *timeout* shortens the deadline of `run`.
        Raises `EncryptionError` when encryption fails, and `DatabaseError` or
        `DatabaseTimeout` when the outcome is unknown: a timed-out insert may still have
        committed, which a retry then finds.
        """
        sealed = [self.seal(message) for message in messages]
        params = {
            "room": room, "separator": FLAG_SEPARATOR,
            "ids": [m.id for m in messages], "senders": [m.sender for m in messages],
            "client_msg_ids": [m.client_msg_id for m in messages],
            "contents": [content for content, _ in sealed],
            "contents_enc": [enc for _, enc in sealed],
            "flags": [FLAG_SEPARATOR.join(m.flags) or None for m in messages],
            "created_at": [m.created_at for m in messages],
        }  # fmt: skip
        log_params = {"room": room, "count": len(messages), "id": messages[0].id}

        async def insert(cursor: Cursor) -> list[tuple[Message, bool] | NotFound]:
            await cursor.execute(
                "insert", "messages", _INSERT_MESSAGES_SQL, params, log_params=log_params
            )
            found = {row[0]: row[1:] for row in await cursor.fetchall()}
            outcomes: list[tuple[Message, bool] | NotFound] = []
            for number, message in enumerate(messages, start=1):
                row = found.get(number)
                if row is None:
                    outcomes.append(
                        NotFound(text="room not found", params={"topic": f"room:{room}"})
                    )
                elif row[0]:  # new: the id and seq it got
                    outcomes.append((replace(message, id=str(row[1]), seq=row[3]), True))
                else:
                    outcomes.append((self._open(row[1:]), False))
            return outcomes

        started = time.monotonic()
        try:
            return await self._insert_retrying_races(insert, timeout)  # type: ignore[arg-type]
        except DatabaseRejected as exc:
            if len(messages) == 1:
                return [exc]
        # Someone's content was refused: store each alone, so only it is refused, all
        # within the one deadline.
        budget = self.timeout if timeout is None else min(timeout, self.timeout)
        outcomes: list[tuple[Message, bool] | NotFound | DatabaseRejected] = []
        for message in messages:
            left = budget - (time.monotonic() - started)
            if left <= 0:
                raise DatabaseTimeout("insert_messages deadline spent storing one by one")
            (outcome,) = await self.insert_messages(room, [message], timeout=left)
            outcomes.append(outcome)
        return outcomes

    async def _insert_retrying_races(
        self, insert: Callable[[Cursor], Awaitable[T]], timeout: float | None
    ) -> T:
        try:
            return await self.run(insert, name="store_message", timeout=timeout)
        except DatabaseRejected as exc:
            if exc.pgcode != UNIQUE_VIOLATION:
                raise
            # The same message committed by someone else between our read and our write:
            # the one statement again finds it and answers as a repeat.
            return await self.run(insert, name="store_message", timeout=timeout)

    def seal(self, message: Message) -> tuple[str | None, bytes | None]:
        """*message*'s content as stored: ``(plaintext, None)``, or ``(None, sealed)`` with a
        key; raises `EncryptionError` when encryption fails. Spooled records use it too."""
        if self.cipher is None:
            return message.content, None
        try:
            return None, self.cipher.encrypt(message.content or "", aad=message.id.encode())
        except Exception as exc:
            log.bind(id=message.id, error=type(exc).__name__).error("encryption failed")
            raise EncryptionError("encrypt failed") from exc

    def _open(self, row: tuple[Any, ...]) -> Message:
        message_id, room, seq, sender, client_msg_id, content, content_enc, flags, created = row
        flags = tuple(flags or ())
        if content_enc is not None:
            try:
                if self.cipher is None:
                    raise DecryptError("no key configured")
                content = self.cipher.decrypt(bytes(content_enc), aad=str(message_id).encode())
            except DecryptError as exc:
                log.bind(id=str(message_id), topic=f"room:{room}", error=type(exc).__name__).error(
                    "message failed to decrypt"
                )
                content, flags = None, (*flags, "decrypt_failed")
        return Message(
            id=str(message_id),
            room=room,
            seq=seq,
            sender=sender,
            client_msg_id=client_msg_id,
            content=content,
            flags=flags,
            created_at=iso_utc(created),
        )

    async def history(
        self, room: str, *, since: int | None = None, before: int | None = None, limit: int = 100
    ) -> list[Message]:
        """Messages of *room* in seq order: after *since*, or the last *limit* before *before*."""
        columns = "id, room, seq, sender, client_msg_id, content, content_enc, flags, created_at"
        log_params = {"room": room, "since": since, "before": before, "limit": limit}
        if since is not None:
            sql = (
                f"SELECT {columns} FROM messages WHERE room = %s AND seq > %s ORDER BY seq LIMIT %s"
            )
            params: tuple[Any, ...] = (room, since, limit)
        else:
            sql = (
                f"SELECT * FROM (SELECT {columns} FROM messages WHERE room = %s AND seq < %s"
                " ORDER BY seq DESC LIMIT %s) recent ORDER BY seq"
            )
            params = (room, before if before is not None else 2**62, limit)

        async def select(cursor: Cursor) -> list[Message]:
            await cursor.execute("select", "messages", sql, params, log_params=log_params)
            return [self._open(row) for row in await cursor.fetchall()]

        return await self.run(select, name="history")

    async def latest_seq(self, room: str) -> int:
        """The room's highest seq, 0 when empty; raises `NotFound` for an unknown room."""

        async def select(cursor: Cursor) -> int:
            await cursor.execute(
                "select", "rooms", "SELECT last_seq FROM rooms WHERE name = %s", (room,),
                log_params={"room": room},
            )  # fmt: skip
            row = await cursor.fetchone()
            if row is None:
                raise NotFound(text="room not found")
            return row[0]

        return await self.run(select, name="latest_seq")

    # -- rooms ------------------------------------------------------------------------------

    async def create_room(self, name: str, *, private: bool = False) -> bool:
        """Create room *name*; returns False when it already existed."""

        async def insert(cursor: Cursor) -> bool:
            await cursor.execute(
                "insert", "rooms",
                "INSERT INTO rooms (name, is_private) VALUES (%s, %s) ON CONFLICT DO NOTHING"
                " RETURNING name",
                (name, private), log_params={"room": name},
            )  # fmt: skip
            return await cursor.fetchone() is not None

        return await self.run(insert, name="create_room")

    async def load_rooms(self) -> list[RoomRecord]:
        """Every room with its privacy, last seq and members, in one query, by name."""

        async def select(cursor: Cursor) -> list[RoomRecord]:
            await cursor.execute("select", "rooms", _ROOMS_SQL + " GROUP BY r.name ORDER BY r.name")
            return [_room_record(row) for row in await cursor.fetchall()]

        return await self.run(select, name="load_rooms")

    async def load_room(self, name: str) -> RoomRecord | None:
        """Room *name* with its privacy, last seq and members, or None when there is none."""

        async def select(cursor: Cursor) -> RoomRecord | None:
            await cursor.execute(
                "select", "rooms", _ROOMS_SQL + " WHERE r.name = %s GROUP BY r.name", (name,),
                log_params={"room": name},
            )  # fmt: skip
            row = await cursor.fetchone()
            return None if row is None else _room_record(row)

        return await self.run(select, name="load_room")

    async def room_seq_report(self) -> list[tuple[str, int, int, int]]:
        """``(room, last_seq, max_seq, messages)`` of every room, by name.

        Seqs are gap-free when ``last_seq == max_seq == messages`` (seqs start at 1 and are
        unique per room); an empty room has ``max_seq`` 0.
        """

        async def select(cursor: Cursor) -> list[tuple[str, int, int, int]]:
            await cursor.execute(
                "select", "messages",
                "SELECT r.name, r.last_seq, COALESCE(max(m.seq), 0), count(m.seq)"
                " FROM rooms r LEFT JOIN messages m ON m.room = r.name"
                " GROUP BY r.name, r.last_seq ORDER BY r.name",
            )  # fmt: skip
            return [(name, last, top, count) for name, last, top, count in await cursor.fetchall()]

        return await self.run(select, name="room_seq_report")

    # -- analytics --------------------------------------------------------------------------

    async def record_connection_event(
        self, component: str, state: str, previous: str | None, attempt: int | None, detail: str
    ) -> None:
        """Append a DB/Redis/upstream state change to ``connection_events``."""

        async def insert(cursor: Cursor) -> None:
            await cursor.execute(
                "insert", "connection_events",
                "INSERT INTO connection_events (component, state, previous, attempt, detail)"
                " VALUES (%s, %s, %s, %s, %s)",
                (component, state, previous, attempt, detail),
                log_params={"component": component, "state": state},
            )  # fmt: skip

        await self.run(insert, name="connection_event")

    # -- users, tokens and rooms ------------------------------------------------------------
    # Password and token hashes are secrets: they never go into log_params.

    async def create_user(
        self, username: str, password_hash: str, *, is_admin: bool = False
    ) -> str:
        """Create user *username* with *password_hash* and return its id (a UUID4).

        Raises `Conflict` when the username is taken.
        """

        async def insert(cursor: Cursor) -> str:
            await cursor.execute(
                "insert", "users",
                "INSERT INTO users (id, username, password_hash, is_admin)"
                " VALUES (gen_random_uuid(), %s, %s, %s) ON CONFLICT (username) DO NOTHING"
                " RETURNING id",
                (username, password_hash, is_admin),
                log_params={"username": username, "is_admin": is_admin},
            )  # fmt: skip
            row = await cursor.fetchone()
            if row is None:
                raise Conflict(f"user {username} exists", text="user already exists")
            return str(row[0])

        return await self.run(insert, name="create_user")

    async def has_users(self) -> bool:
        """Whether any user exists."""

        async def select(cursor: Cursor) -> bool:
            await cursor.execute("select", "users", "SELECT EXISTS (SELECT 1 FROM users)")
            row = await cursor.fetchone()
            return bool(row and row[0])

        return await self.run(select, name="has_users")

    async def user_by_name(self, username: str) -> tuple[str, str, str, bool] | None:
        """``(id, username, password_hash, is_admin)`` of *username*, or None."""

        async def select(cursor: Cursor) -> tuple[str, str, str, bool] | None:
            await cursor.execute(
                "select", "users",
                "SELECT id, username, password_hash, is_admin FROM users WHERE username = %s",
                (username,), log_params={"username": username},
            )  # fmt: skip
            row = await cursor.fetchone()
            return None if row is None else (str(row[0]), row[1], row[2], row[3])

        return await self.run(select, name="user_by_name")

    async def list_users(self) -> list[tuple[str, bool, datetime]]:
        """``(username, is_admin, created_at)`` of every user, by username."""

        async def select(cursor: Cursor) -> list[tuple[str, bool, datetime]]:
            await cursor.execute(
                "select", "users",
                "SELECT username, is_admin, created_at FROM users ORDER BY username",
            )  # fmt: skip
            return [
                (name, is_admin, created) for name, is_admin, created in await cursor.fetchall()
            ]

        return await self.run(select, name="list_users")

    async def set_password(self, username: str, password_hash: str) -> int:
        """Give *username* the password of *password_hash* and revoke its live tokens.

        Returns how many tokens were revoked; raises `NotFound` for an unknown user.
        """
        log_params = {"username": username}

        async def update(cursor: Cursor) -> int:
            await cursor.execute(
                "update", "users",
                "UPDATE users SET password_hash = %s WHERE username = %s RETURNING id",
                (password_hash, username), log_params=log_params,
            )  # fmt: skip
            row = await cursor.fetchone()
            if row is None:
                raise NotFound(f"user {username}", text="user not found")
            await cursor.execute(
                "update", "auth_tokens",
                "UPDATE auth_tokens SET revoked_at = now()"
                " WHERE user_id = %s AND revoked_at IS NULL RETURNING user_id",
                (row[0],), log_params=log_params,
            )  # fmt: skip
            return len(await cursor.fetchall())

        return await self.transaction(update, name="set_password")

    async def insert_token(self, token_hash: bytes, user_id: str, expires_at: datetime) -> None:
        """Record a login token of *user_id* by its *token_hash*, valid until *expires_at*."""

        async def insert(cursor: Cursor) -> None:
            await cursor.execute(
                "insert", "auth_tokens",
                "INSERT INTO auth_tokens (token_hash, user_id, expires_at) VALUES (%s, %s, %s)",
                (token_hash, user_id, expires_at), log_params={"user_id": user_id},
            )  # fmt: skip

        await self.run(insert, name="insert_token")

    async def user_for_token(
        self, token_hash: bytes, *, now: datetime | None = None
    ) -> tuple[str, str, bool, datetime] | None:
        """``(id, username, is_admin, expires_at)`` owning the token with *token_hash*, or None.

        Only tokens neither revoked nor expired at *now* (default: the database's clock)
        count.
        """

        async def select(cursor: Cursor) -> tuple[str, str, bool, datetime] | None:
            await cursor.execute(
                "select", "auth_tokens",
                "SELECT u.id, u.username, u.is_admin, t.expires_at FROM auth_tokens t"
                " JOIN users u ON u.id = t.user_id WHERE t.token_hash = %s"
                " AND t.revoked_at IS NULL AND t.expires_at > COALESCE(%s, now())",
                (token_hash, now),
            )  # fmt: skip
            row = await cursor.fetchone()
            return None if row is None else (str(row[0]), row[1], row[2], row[3])

        return await self.run(select, name="user_for_token")

    async def revoke_token(self, token_hash: bytes) -> bool:
        """Revoke the token with *token_hash*; False when it was unknown or already revoked."""

        async def update(cursor: Cursor) -> bool:
            await cursor.execute(
                "update", "auth_tokens",
                "UPDATE auth_tokens SET revoked_at = now()"
                " WHERE token_hash = %s AND revoked_at IS NULL RETURNING user_id",
                (token_hash,),
            )  # fmt: skip
            return await cursor.fetchone() is not None

        return await self.run(update, name="revoke_token")

    async def add_room_member(self, room: str, username: str) -> None:
        """Make *username* a member of *room*; already being one is fine.

        Raises `NotFound` for an unknown room or user.
        """
        log_params = {"room": room, "username": username}

        async def insert(cursor: Cursor) -> None:
            await cursor.execute(
                "select", "rooms",
                "SELECT (SELECT name FROM rooms WHERE name = %s),"
                " (SELECT id FROM users WHERE username = %s)",
                (room, username), log_params=log_params,
            )  # fmt: skip
            found_room, user_id = await cursor.fetchone() or (None, None)
            if found_room is None:
                raise NotFound(f"room {room}", text="room not found")
            if user_id is None:
                raise NotFound(f"user {username}", text="user not found")
            await cursor.execute(
                "insert", "room_members",
                "INSERT INTO room_members (room, user_id) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                (room, user_id), log_params=log_params,
            )  # fmt: skip

        await self.transaction(insert, name="add_room_member")

    async def room_access(self, room: str, user_id: str) -> tuple[bool, bool] | None:
        """``(is_private, is_member)`` of *user_id* in *room*, or None when there is no room."""

        async def select(cursor: Cursor) -> tuple[bool, bool] | None:
            await cursor.execute(
                "select", "rooms",
                "SELECT r.is_private, EXISTS (SELECT 1 FROM room_members m"
                " WHERE m.room = r.name AND m.user_id = %s) FROM rooms r WHERE r.name = %s",
                (user_id, room), log_params={"room": room, "user_id": user_id},
            )  # fmt: skip
            row = await cursor.fetchone()
            return None if row is None else (row[0], row[1])

        return await self.run(select, name="room_access")

    # -- error events (app/analytics.py's ErrorRecorder) ------------------------------------
    # Rows are sanitized by the recorder (no NULs, no lone surrogates, bounded lengths);
    # event_id makes a batch retried after an unknown outcome add nothing the second time.

    async def insert_error_events(
        self, events: Sequence[dict[str, Any]], *, timeout: float | None = None
    ) -> int:
        """Append *events* to ``error_events`` in one statement; returns the rows new.

        Each event has the keys of `ERROR_EVENT_COLUMNS`. An event whose ``event_id`` is
        stored already is skipped, so retrying a batch whose outcome was unknown is safe.
        *timeout* shortens the deadline of `run`.
        """
        params = {column: [event[column] for event in events] for column in ERROR_EVENT_COLUMNS}

        async def insert(cursor: Cursor) -> int:
            await cursor.execute(
                "insert", "error_events", _INSERT_ERROR_EVENTS_SQL, params,
                log_params={"count": len(events)},
            )  # fmt: skip
            return len(await cursor.fetchall())

        return await self.run(insert, name="insert_error_events", timeout=timeout)

    async def prune_error_events(self, before: datetime, *, limit: int = 10_000) -> int:
        """Delete up to *limit* of the oldest ``error_events`` rows older than *before*;
        returns how many went. Bounded, so a long backlog is pruned over several calls."""

        async def delete(cursor: Cursor) -> int:
            await cursor.execute(
                "delete", "error_events",
                "WITH gone AS (DELETE FROM error_events WHERE id IN (SELECT id FROM"
                " error_events WHERE at < %s ORDER BY at LIMIT %s) RETURNING 1)"
                " SELECT count(*) FROM gone",
                (before, limit), log_params={"before": iso_utc(before), "limit": limit},
            )  # fmt: skip
            row = await cursor.fetchone()
            return int(row[0]) if row else 0

        return await self.run(delete, name="prune_error_events")


#: Keys of each event `Store.insert_error_events` takes, as its columns in ``error_events``.
ERROR_EVENT_COLUMNS = (
    "event_id", "at", "trace_id", "category", "code", "status", "message", "endpoint",
    "method", "transport", "device_type", "user_agent", "user_id",
)  # fmt: skip
#: One multi-row insert per batch; repeats (same event_id) are skipped.
_INSERT_ERROR_EVENTS_SQL = """
INSERT INTO error_events (event_id, at, trace_id, category, code, status, message, endpoint,
                          method, transport, device_type, user_agent, user_id)
SELECT * FROM unnest(%(event_id)s::uuid[], %(at)s::timestamptz[], %(trace_id)s::text[],
                     %(category)s::text[], %(code)s::text[], %(status)s::smallint[],
                     %(message)s::text[], %(endpoint)s::text[], %(method)s::text[],
                     %(transport)s::text[], %(device_type)s::text[], %(user_agent)s::text[],
                     %(user_id)s::text[])
ON CONFLICT (event_id) DO NOTHING
RETURNING id
"""


async def migrate(dsn: str, folder: Path = MIGRATIONS_DIR, *, timeout: float = 30.0) -> list[str]:
    """Apply pending migrations to the database at *dsn* (the ``migrate`` command)."""
    store = Store(dsn, timeout=timeout)
    await store.open()
    try:
        return await store.migrate(folder)
    finally:
        await store.close()
