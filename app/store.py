"""The store: every SQL statement hearth runs, behind one query interceptor."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import aiopg
import psycopg2
from psycopg2.extensions import TRANSACTION_STATUS_IDLE

from app import metrics
from app.crypto import DecryptError, MessageCipher
from app.errors import (
    RETRYABLE_PGCODES,
    Conflict,
    DatabaseError,
    EncryptionError,
    NotFound,
    SpoolFull,
    is_retryable,
)
from app.log import get_logger, iso_utc, redact_dsn
from app.models import Message
from app.resilience import Backoff
from app.spool import Spool

log = get_logger("store")

#: Numbered SQL files applied by `migrate`.
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
#: How often a long spool drain reports progress, in messages.
DRAIN_PROGRESS_EVERY = 1000
#: pgcodes of a server that is shutting down or restarting (admin_shutdown and friends).
SERVER_GOING_AWAY_PGCODES = {"57P01", "57P02", "57P03"}

T = TypeVar("T")


class MigrationFailed(Exception):
    """A migration file failed and was rolled back."""

    def __init__(self, filename: str) -> None:
        super().__init__(filename)
        #: The file that failed.
        self.filename = filename


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What the client is told: stored with a seq (200) or spooled (202)."""

    message: Message
    queued: bool
    #: True when the same message was stored before: nothing new to fan out.
    repeat: bool = False

    @property
    def reply(self) -> dict[str, Any]:
        """The ``params`` of the acknowledgement."""
        if self.queued:
            return {"id": self.message.id, "queued": True}
        return {"id": self.message.id, "seq": self.message.seq}


def _connection_lost(exc: BaseException) -> bool:
    """Whether *exc* means the connection is gone, as opposed to a statement's own failure."""
    if isinstance(exc, psycopg2.Error):
        # SerializationFailure is an OperationalError too, but the connection is fine.
        pgcode = exc.pgcode or ""
        return isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError) and (
            not pgcode or pgcode.startswith("08") or pgcode in SERVER_GOING_AWAY_PGCODES
        )
    return isinstance(exc, TimeoutError | OSError)


def _error_label(exc: BaseException) -> str:
    # psycopg2 messages may quote row values (content, names), so only the type and pgcode
    # ever reach a log line.
    pgcode = getattr(exc, "pgcode", None)
    return f"{type(exc).__name__}:{pgcode}" if pgcode else type(exc).__name__


class Cursor:
    """A cursor bound to one connection, whose every statement goes through the interceptor."""

    def __init__(self, store: Store, cursor: aiopg.Cursor) -> None:
        self._store = store
        self._cursor = cursor

    async def execute(
        self,
        operation: str,
        table: str,
        sql: str,
        params: tuple[Any, ...] = (),
        *,
        log_params: dict[str, Any] | None = None,
    ) -> None:
        """Run *sql* with *params*, timed and counted under *operation* and *table*.

        *log_params* is the only view of the parameters a log line may show; never put
        message content or secrets in it.
        """
        started = time.perf_counter()
        try:
            await self._cursor.execute(sql, params)
        except Exception as exc:
            metrics.DB_QUERY_ERRORS.labels(operation, table).inc()
            level = "WARNING" if _connection_lost(exc) else "ERROR"
            log.bind(
                operation=operation, table=table, params=log_params, error=_error_label(exc),
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
            ).log(level, "query failed")  # fmt: skip
            raise
        finally:
            elapsed = time.perf_counter() - started
            metrics.DB_QUERY_SECONDS.labels(operation, table).observe(elapsed)
        if elapsed * 1000 >= self._store.slow_query_ms:
            log.bind(
                operation=operation, table=table, params=log_params,
                duration_ms=round(elapsed * 1000, 2),
            ).warning("slow query")  # fmt: skip

    async def fetchone(self) -> tuple[Any, ...] | None:
        """The next row of the last statement."""
        return await self._cursor.fetchone()

    async def fetchall(self) -> list[tuple[Any, ...]]:
        """Every remaining row of the last statement."""
        return await self._cursor.fetchall()


class Store:
    """PostgreSQL through an aiopg pool, with the spool as fallback for publishes."""

    def __init__(
        self,
        dsn: str,
        *,
        spool: Spool | None = None,
        cipher: MessageCipher | None = None,
        pool_size: int = 10,
        timeout: float = 5.0,
        slow_query_ms: float = 1000.0,
        tx_retries: int = 3,
        tx_backoff: Backoff = Backoff(initial=0.05, max_delay=1.0),
    ) -> None:
        self.dsn = dsn
        #: Where publishes go while PostgreSQL is unreachable; None only for migrations.
        self.spool = spool
        self.cipher = cipher
        self.pool_size = pool_size
        #: Deadline of every pool acquire and statement, in seconds.
        self.timeout = timeout
        self.slow_query_ms = slow_query_ms
        self.tx_retries = tx_retries
        self.tx_backoff = tx_backoff
        #: Set by the DbMonitor: False sends publishes straight to the spool.
        self.available = True
        # (sender, client_msg_id) -> id of the spooled message, so a retried publish gets
        # the same answer while the first one still waits in the spool.
        self._spooled_ids: dict[tuple[str, str], str] = {}
        self._pool: aiopg.Pool | None = None

    def __repr__(self) -> str:
        return f"<Store {redact_dsn(self.dsn)}>"

    # -- pool -------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the pool; it connects lazily, so this succeeds with PostgreSQL down."""
        if self._pool is None:
            self._pool = await aiopg.create_pool(
                self.dsn,
                minsize=0,
                maxsize=self.pool_size,
                timeout=self.timeout,
                enable_json=False,
                enable_hstore=False,
                enable_uuid=False,
            )

    async def close(self) -> None:
        """Close every connection."""
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

    @asynccontextmanager
    async def _cursor(self) -> AsyncIterator[Cursor]:
        if self._pool is None:
            raise DatabaseError("pool not open")
        async with asyncio.timeout(self.timeout):
            conn = await self._pool.acquire()
        try:
            raw = await conn.cursor()
            try:
                yield Cursor(self, raw)
            finally:
                raw.close()
        finally:
            # A connection left inside a transaction (cancelled, or rollback failed) must
            # not go back to the pool.
            if not conn.closed and conn.raw.get_transaction_status() != TRANSACTION_STATUS_IDLE:
                conn.close()
            await self._pool.release(conn)

    async def run(self, work: Callable[[Cursor], Awaitable[T]], *, name: str) -> T:
        """Run *work* on one autocommit connection.

        A connection that turns out stale costs one retry on a fresh connection; callers
        only pass idempotent work.
        """
        for attempt in (1, 2):
            try:
                async with self._cursor() as cursor:
                    async with asyncio.timeout(self.timeout * 2):
                        return await work(cursor)
            except Exception as exc:
                if attempt == 2 or not _connection_lost(exc):
                    raise
                log.bind(name=name, error=_error_label(exc), retry_count=1).warning(
                    "connection lost; retrying once on a fresh connection"
                )
                await self.forget_connections()
        raise AssertionError("unreachable")

    async def transaction(self, work: Callable[[Cursor], Awaitable[T]], *, name: str) -> T:
        """Run *work* inside BEGIN/COMMIT, rolling back on any error.

        Serialization failures and deadlocks are retried with backoff up to ``tx_retries``
        attempts; a stale connection costs one retry. *work* must be idempotent.
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self.run(
                    lambda cursor: self._in_transaction(cursor, work, name), name=name
                )
            except psycopg2.Error as exc:
                if exc.pgcode not in RETRYABLE_PGCODES or attempt >= self.tx_retries:
                    raise
                metrics.DB_TX_RETRIES.labels(name).inc()
                delay = self.tx_backoff.delay(attempt)
                log.bind(name=name, retry_count=attempt, error=_error_label(exc)).warning(
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
            if not _connection_lost(exc):
                try:
                    await cursor.execute("rollback", "-", "ROLLBACK")
                except Exception as rollback_exc:
                    # The connection is then closed instead of pooled; the error that
                    # caused the rollback is the one worth raising.
                    log.bind(name=name, error=_error_label(rollback_exc)).warning("rollback failed")
            raise
        return result

    async def ping(self) -> float:
        """Round-trip ``SELECT 1`` and return its latency in seconds."""
        started = time.perf_counter()

        async def select_one(cursor: Cursor) -> None:
            await cursor.execute("ping", "-", "SELECT 1")
            await cursor.fetchone()

        async with self._cursor() as cursor:
            async with asyncio.timeout(self.timeout):
                await select_one(cursor)
        return time.perf_counter() - started

    # -- migrations -------------------------------------------------------------------------

    async def migrate(self, folder: Path = MIGRATIONS_DIR) -> list[str]:
        """Apply each pending ``NNN_name.sql`` in *folder* in its own transaction.

        Returns the files applied. A failing file is rolled back, logged at FATAL and
        raised as `MigrationFailed`; files before it stay applied.
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
            except psycopg2.Error as exc:
                log.bind(file=path.name, error=_error_label(exc)).log("FATAL", "migration failed")
                raise MigrationFailed(path.name) from exc
            log.bind(file=path.name).info("migration applied")
            applied.append(path.name)
        return applied

    # -- messages ---------------------------------------------------------------------------

    async def load_spool(self) -> int:
        """Read what an earlier run left in the spool (off the event loop); return its depth.

        Afterwards a retried publish of a spooled message gets the first answer again.
        """
        spool = self._spool()
        records = await asyncio.to_thread(spool.pending_records)
        for record in records:
            self._spooled_ids[(record["sender"], record["client_msg_id"])] = record["id"]
        return len(records)

    def _spool(self) -> Spool:
        if self.spool is None:
            raise DatabaseError("this store has no spool")  # only the migrate command's has none
        return self.spool

    async def publish(self, message: Message) -> PublishResult:
        """Store *message* (200 with seq) or, with PostgreSQL away, spool it (202).

        While the spool holds anything, new messages queue behind it so that a room's
        seq order follows acceptance order. Raises `SpoolFull` when neither is possible.
        """
        spool = self._spool()
        if self.available and spool.depth == 0:
            try:
                stored, created = await self._insert_message(message)
            except Exception as exc:
                if not is_retryable(exc):  # includes every lost connection
                    raise
                log.bind(error=_error_label(exc), topic=f"room:{message.room}").warning(
                    "database unreachable; spooling the publish"
                )
            else:
                metrics.PUBLISHES.labels("stored" if created else "repeated").inc()
                return PublishResult(stored, queued=False, repeat=not created)
        key = (message.sender, message.client_msg_id)
        if key in self._spooled_ids:
            metrics.PUBLISHES.labels("repeated").inc()
            first = replace(message, id=self._spooled_ids[key])
            return PublishResult(first, queued=True, repeat=True)
        try:
            await spool.append(message.to_record())
        except OSError as exc:
            # A full or failing disk: refuse the publish rather than acknowledge a loss.
            log.bind(error=type(exc).__name__, errno=exc.errno).error("spool write failed")
            metrics.PUBLISHES.labels("refused").inc()
            raise SpoolFull("spool write failed") from exc
        self._spooled_ids[key] = message.id
        metrics.PUBLISHES.labels("spooled").inc()
        metrics.SPOOL_DEPTH.set(spool.depth)
        return PublishResult(message, queued=True)

    async def store_message(self, message: Message) -> Message:
        """Insert *message* and return it with its seq; idempotent by id and client_msg_id.

        Raises `NotFound` for an unknown room and `EncryptionError` when encryption fails.
        """
        stored, _ = await self._insert_message(message)
        return stored

    async def _insert_message(self, message: Message) -> tuple[Message, bool]:
        """Like `store_message`, also telling whether the row is new (False: a repeat).

        Raises `NotFound` for an unknown room and `EncryptionError` when encryption fails.
        """
        content, content_enc = self._seal(message)

        async def insert(cursor: Cursor) -> tuple[Message, bool]:
            log_params = {"room": message.room, "id": message.id}
            await cursor.execute(
                "lock", "rooms", "SELECT last_seq FROM rooms WHERE name = %s FOR UPDATE",
                (message.room,), log_params=log_params,
            )  # fmt: skip
            row = await cursor.fetchone()
            if row is None:
                raise NotFound(text="room not found", params={"topic": f"room:{message.room}"})
            await cursor.execute(
                "select", "messages",
                "SELECT id, seq FROM messages WHERE id = %s OR (sender = %s AND client_msg_id = %s)",
                (message.id, message.sender, message.client_msg_id), log_params=log_params,
            )  # fmt: skip
            existing = await cursor.fetchone()
            if existing is not None:
                return replace(message, id=str(existing[0]), seq=existing[1]), False
            seq = row[0] + 1
            await cursor.execute(
                "insert", "messages",
                "INSERT INTO messages (id, room, seq, sender, client_msg_id, content,"
                " content_enc, flags, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (message.id, message.room, seq, message.sender, message.client_msg_id, content,
                 content_enc, list(message.flags), message.created_at),
                log_params=log_params,
            )  # fmt: skip
            await cursor.execute(
                "update", "rooms", "UPDATE rooms SET last_seq = %s WHERE name = %s",
                (seq, message.room), log_params={"room": message.room},
            )  # fmt: skip
            return replace(message, seq=seq), True

        return await self.transaction(insert, name="store_message")

    def _seal(self, message: Message) -> tuple[str | None, bytes | None]:
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

    async def drain_spool(
        self, on_stored: Callable[[Message], Awaitable[None]] | None = None
    ) -> int:
        """Move spooled messages into PostgreSQL in order; returns how many were committed.

        Each is committed idempotently before the spool lets go of it. A message whose room
        no longer exists is logged at ERROR and dropped, since no retry can store it.
        *on_stored* sees each newly stored message (with its seq) for fan-out. Progress is
        logged every `DRAIN_PROGRESS_EVERY` messages, since a long outage makes a long drain.
        """
        spool = self._spool()
        committed = 0
        pending_at_start = spool.depth

        async def commit(record: dict[str, Any]) -> None:
            nonlocal committed
            message = Message.from_record(record)
            key = (message.sender, message.client_msg_id)
            try:
                stored, created = await self._insert_message(message)
            except NotFound:
                self._spooled_ids.pop(key, None)
                log.bind(id=message.id, topic=f"room:{message.room}").error(
                    "spooled message for a missing room dropped"
                )
                return
            committed += 1
            self._spooled_ids.pop(key, None)
            metrics.SPOOL_DEPTH.set(max(spool.depth - 1, 0))
            if committed % DRAIN_PROGRESS_EVERY == 0:
                log.bind(committed=committed, pending_at_start=pending_at_start).info(
                    "draining the spool"
                )
            if created and on_stored is not None:
                await on_stored(stored)

        drained = await spool.drain(commit)
        metrics.SPOOL_DEPTH.set(spool.depth)
        if drained:
            log.bind(count=drained).info("spool drained")
        return drained

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

    async def record_error_event(
        self,
        *,
        category: str,
        code: str,
        severity: str,
        component: str,
        message: str,
        endpoint: str | None = None,
        device_type: str | None = None,
        trace_id: str | None = None,
    ) -> None:
        """Append a sanitized error to ``error_events`` for analytics."""

        async def insert(cursor: Cursor) -> None:
            await cursor.execute(
                "insert", "error_events",
                "INSERT INTO error_events (category, code, severity, component, endpoint,"
                " device_type, trace_id, message) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (category, code, severity, component, endpoint, device_type, trace_id, message),
                log_params={"code": code, "component": component},
            )  # fmt: skip

        await self.run(insert, name="error_event")

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
    ) -> tuple[str, str, bool] | None:
        """``(id, username, is_admin)`` owning the token with *token_hash*, or None.

        Only tokens neither revoked nor expired at *now* (default: the database's clock)
        count.
        """

        async def select(cursor: Cursor) -> tuple[str, str, bool] | None:
            await cursor.execute(
                "select", "auth_tokens",
                "SELECT u.id, u.username, u.is_admin FROM auth_tokens t"
                " JOIN users u ON u.id = t.user_id WHERE t.token_hash = %s"
                " AND t.revoked_at IS NULL AND t.expires_at > COALESCE(%s, now())",
                (token_hash, now),
            )  # fmt: skip
            row = await cursor.fetchone()
            return None if row is None else (str(row[0]), row[1], row[2])

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


async def migrate(dsn: str, folder: Path = MIGRATIONS_DIR, *, timeout: float = 30.0) -> list[str]:
    """Apply pending migrations to the database at *dsn* (the ``migrate`` command)."""
    store = Store(dsn, timeout=timeout)
    await store.open()
    try:
        return await store.migrate(folder)
    finally:
        await store.close()
