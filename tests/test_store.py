"""The store against a real PostgreSQL: migrations, idempotent publishes, seq, crypto, logs."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import time
import uuid
from dataclasses import replace
from pathlib import Path

import aiopg
import psycopg2
import psycopg2.errors
import psycopg2.extensions
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.crypto import generate_key_spec, parse_keys
from app.errors import (
    AppError,
    DatabaseError,
    DatabaseRejected,
    DatabaseTimeout,
    EncryptionError,
    NotFound,
)
from app.log import setup_logging
from app.models import Message, RoomRecord
from app.resilience import Backoff
from app.store import MIGRATIONS_DIR, ROOMS_CHANNEL, MigrationFailed, Store, _as_app_error
from tests.conftest import log_records, wait_until


def _db_name(dsn: str) -> str:
    return dsn.rsplit("/", 1)[1]


@pytest.fixture
async def store(database, tmp_path):
    """A migrated store with a lobby room."""
    store = Store(database, timeout=5)
    await store.open()
    await store.migrate()
    await store.create_room("lobby")
    yield store
    await store.close()


def message(index: int, *, room: str = "lobby", sender: str = "alice", content: str | None = None):
    """A valid message numbered *index*."""
    return Message.accept(
        room=room, sender=sender, content=content or f"hello {index}", client_msg_id=f"c-{index}"
    )


async def test_migrations_from_empty_then_rerun_is_noop(database, postgres):
    """Migrations apply to an empty database once, and a rerun applies nothing."""
    store = Store(database)
    await store.open()
    try:
        first = await store.migrate()
        second = await store.migrate()
    finally:
        await store.close()
    assert first == sorted(p.name for p in MIGRATIONS_DIR.glob("[0-9]*.sql"))
    assert second == []
    tables = postgres.psql(
        "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables"
        " WHERE schemaname = 'public'",
        database=_db_name(database),
    ).split(",")
    for table in ("users", "auth_tokens", "rooms", "room_members", "messages", "error_events",
                  "connection_events", "schema_migrations"):  # fmt: skip
        assert table in tables


async def test_failing_migration_leaves_database_as_it_was(database, postgres, tmp_path):
    """A failing migration is rolled back whole, not recorded, and raises MigrationFailed (a DatabaseRejected)."""
    (tmp_path / "001_ok.sql").write_text("CREATE TABLE good (x int);")
    (tmp_path / "002_bad.sql").write_text("CREATE TABLE half (x int); SELECT * FROM nowhere;")
    store = Store(database)
    await store.open()
    try:
        with pytest.raises(MigrationFailed) as caught:
            await store.migrate(tmp_path)
    finally:
        await store.close()
    assert caught.value.filename == "002_bad.sql"
    assert isinstance(caught.value, DatabaseRejected) and caught.value.pgcode == "42P01"
    name = _db_name(database)
    assert postgres.psql("SELECT filename FROM schema_migrations", database=name) == "001_ok.sql"
    assert postgres.psql("SELECT to_regclass('half') IS NULL", database=name) == "t"
    assert postgres.psql("SELECT to_regclass('good') IS NOT NULL", database=name) == "t"


async def test_same_client_msg_id_twice_gives_one_row_and_same_seq(store, database, postgres):
    """Publishing the same client_msg_id twice stores one row and answers the same id and seq."""
    first, created = await store.insert_message(message(1))
    again = Message.accept(room="lobby", sender="alice", content="resent", client_msg_id="c-1")
    second, created_again = await store.insert_message(again)
    assert created and not created_again
    assert (second.id, second.seq) == (first.id, first.seq) == (first.id, 1)
    count = postgres.psql("SELECT count(*) FROM messages", database=_db_name(database))
    assert count == "1"


async def test_retry_with_same_id_after_commit_is_idempotent(store):
    """Storing the very same message again (a retry after a lost reply) returns the first seq."""
    original = message(7)
    stored, _ = await store.insert_message(original)
    retried, created = await store.insert_message(original)
    assert not created
    assert (retried.id, retried.seq) == (stored.id, stored.seq) == (original.id, 1)


async def test_seq_is_gap_free_under_20_concurrent_publishers(store):
    """Twenty concurrent publishers get seqs 1..N with no gap and no repeat."""

    async def publisher(worker: int) -> list[int]:
        seqs = []
        for i in range(10):
            stored, _ = await store.insert_message(
                message(worker * 100 + i, sender=f"user{worker}")
            )
            seqs.append(stored.seq)
        return seqs

    results = await asyncio.gather(*(publisher(worker) for worker in range(20)))
    for seqs in results:
        assert seqs == sorted(seqs)
    every = sorted(seq for seqs in results for seq in seqs)
    assert every == list(range(1, 201))
    history = await store.history("lobby", since=0, limit=300)
    assert [m.seq for m in history] == list(range(1, 201))


async def test_history_since_and_before(store):
    """History returns messages after `since`, or the latest `limit` before `before`, in order."""
    for i in range(1, 11):
        await store.insert_message(message(i))
    assert [m.seq for m in await store.history("lobby", since=7)] == [8, 9, 10]
    assert [m.seq for m in await store.history("lobby", before=5, limit=2)] == [3, 4]
    assert [m.content for m in await store.history("lobby", since=9)] == ["hello 10"]
    assert await store.latest_seq("lobby") == 10


async def test_unknown_room_is_not_found_and_not_stored(store):
    """A publish to a room that does not exist is refused with NotFound."""
    with pytest.raises(NotFound):
        await store.insert_message(message(1, room="nowhere"))
    assert await store.history("lobby", since=0) == []


async def test_a_batch_takes_consecutive_seqs_in_its_order_and_finds_repeats(store):
    """One statement stores a room's batch with the next seqs in batch order; a message stored before comes back as a repeat with its first seq, and takes no seq."""
    (first, _) = await store.insert_message(message(1))
    retried = replace(message(1), id=str(uuid.uuid4()))  # same sender and client_msg_id
    flagged = replace(message(3), flags=("spooled", "late"))
    outcomes = await store.insert_messages("lobby", [message(2), retried, flagged, message(4)])
    assert [(m.client_msg_id, m.seq, new) for m, new in outcomes] == [
        ("c-2", 2, True), ("c-1", 1, False), ("c-3", 3, True), ("c-4", 4, True),
    ]  # fmt: skip
    assert outcomes[1][0].id == first.id
    stored = await store.history("lobby", since=0)
    assert [(m.seq, m.client_msg_id) for m in stored] == [
        (1, "c-1"),
        (2, "c-2"),
        (3, "c-3"),
        (4, "c-4"),
    ]
    assert stored[2].flags == ("spooled", "late")
    assert await store.latest_seq("lobby") == 4


async def test_a_client_msg_id_reused_in_another_room_answers_as_the_first_copy(store):
    """The same sender and client_msg_id sent to another room is a repeat of the first message: it comes back with the first copy's room, seq and content, and the other room stores nothing."""
    await store.create_room("annex")
    (first, _) = await store.insert_message(message(1, content="the original"))
    elsewhere = message(1, room="annex", content="a different text")
    [(again, new)] = await store.insert_messages("annex", [elsewhere])
    assert not new
    assert (again.id, again.room, again.seq, again.content) == (
        first.id, "lobby", 1, "the original",
    )  # fmt: skip
    assert await store.history("annex", since=0) == []


async def test_content_postgres_refuses_costs_only_its_own_message_in_a_batch(store):
    """A NUL byte (which validation refuses at the door) in the middle of a batch is refused alone: the others are stored gap-free."""
    poisoned = replace(message(2), content="nul \x00 inside")
    outcomes = await store.insert_messages("lobby", [message(1), poisoned, message(3)])
    assert isinstance(outcomes[1], DatabaseRejected)
    assert [(m.client_msg_id, m.seq) for m, _ in (outcomes[0], outcomes[2])] == [
        ("c-1", 1), ("c-3", 2),
    ]  # fmt: skip
    assert [m.seq for m in await store.history("lobby", since=0)] == [1, 2]


async def test_a_batch_for_an_unknown_room_is_not_found_per_message(store):
    outcomes = await store.insert_messages(
        "nowhere", [message(1, room="nowhere"), message(2, room="nowhere")]
    )
    assert all(isinstance(outcome, NotFound) for outcome in outcomes)
    assert await store.history("lobby", since=0) == []


invalid_documents = st.one_of(
    st.fixed_dictionaries({"room": st.text(min_size=65, max_size=80), "content": st.just("x")}),
    st.fixed_dictionaries(
        {
            "room": st.text().filter(lambda s: not s.isascii() or " " in s or s == ""),
            "content": st.just("x"),
        }
    ),  # fmt: skip
    st.fixed_dictionaries(
        {"room": st.just("lobby"), "content": st.text(min_size=4097, max_size=4200)}
    ),
    st.fixed_dictionaries(
        {"room": st.just("lobby"), "content": st.text(min_size=1).map(lambda s: s + "\x00")}
    ),
    st.fixed_dictionaries(
        {
            "room": st.just("lobby"),
            "content": st.one_of(st.integers(), st.none(), st.lists(st.text()), st.booleans()),
        }
    ),  # fmt: skip
    st.fixed_dictionaries(
        {"room": st.one_of(st.integers(), st.none(), st.booleans()), "content": st.just("x")}
    ),
    st.fixed_dictionaries(
        {
            "room": st.just("lobby"),
            "content": st.just("x"),
            "client_msg_id": st.one_of(st.integers(), st.just(""), st.text(min_size=65)),
        }
    ),  # fmt: skip
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(document=invalid_documents)
async def test_invalid_documents_are_rejected_and_never_stored(store, document):
    """Property 5: oversized content, bad room names, wrong types and NUL bytes never get stored."""
    before = await store.latest_seq("lobby")
    with pytest.raises(AppError) as caught:
        accepted = Message.accept(
            room=document["room"], sender="alice", content=document["content"],
            client_msg_id=document.get("client_msg_id", "cid"),
        )  # fmt: skip
        await store.insert_message(accepted)
    assert caught.value.status in (400, 404)
    assert await store.latest_seq("lobby") == before


async def test_query_log_never_holds_content_or_password(database, tmp_path):
    """Properties 3 and 14: with every query logged as slow and errors forced, no content or password is logged."""
    secret_dsn = database.replace("hearth@", "hearth:hunter2-pw@")
    stream = io.StringIO()
    setup_logging(level="DEBUG", log_dir=tmp_path / "logs", stream=stream)
    store = Store(secret_dsn, slow_query_ms=0)
    await store.open()
    try:
        await store.migrate()
        await store.create_room("lobby")
        await store.insert_message(message(1, content="TOP-SECRET-CONTENT"))
        # A NOT NULL violation makes PostgreSQL quote the whole failing row, content included.
        with pytest.raises(DatabaseRejected) as caught:
            await store.insert_message(
                Message(id=str(uuid.uuid4()), room="lobby", sender=None, client_msg_id="x",
                        content="TOP-SECRET-CONTENT", created_at="2026-01-01T00:00:00Z")
            )  # fmt: skip
        await store.history("lobby", since=0)
    finally:
        await store.close()
        setup_logging(level="DEBUG", stream=io.StringIO())
    captured = stream.getvalue() + (tmp_path / "logs" / "hearth.log").read_text()
    lines = [json.loads(line) for line in captured.splitlines()]
    assert any(line["msg"] == "slow query" and line.get("table") == "messages" for line in lines)
    assert any(line["msg"] == "query failed" for line in lines)
    assert "TOP-SECRET-CONTENT" not in captured
    assert "hunter2-pw" not in captured
    assert caught.value.pgcode == "23502"
    assert isinstance(caught.value.__cause__, psycopg2.IntegrityError)
    assert "TOP-SECRET-CONTENT" not in str(caught.value)


async def test_encryption_round_trip_stores_ciphertext(database, tmp_path, postgres):
    """With a key, content is stored encrypted and read back as the original text."""
    store = Store(database, cipher=parse_keys(generate_key_spec()))
    await store.open()
    try:
        await store.migrate()
        await store.create_room("lobby")
        await store.insert_message(message(1, content="attack at dawn"))
        [read] = await store.history("lobby", since=0)
    finally:
        await store.close()
    assert read.content == "attack at dawn" and read.flags == ()
    raw = postgres.psql(
        "SELECT coalesce(content, '<null>') || ' ' || encode(content_enc, 'escape') FROM messages",
        database=_db_name(database),
    )
    assert "attack at dawn" not in raw and raw.startswith("<null>")


async def test_rotated_key_still_reads_and_unknown_key_flags_decrypt_failed(database, tmp_path):
    """Old keys stay readable after rotation; a row no key opens comes back null with decrypt_failed."""
    old_spec = generate_key_spec("k1")
    store = Store(database, cipher=parse_keys(old_spec))
    await store.open()
    await store.migrate()
    await store.create_room("lobby")
    await store.insert_message(message(1, content="old secret"))
    await store.close()

    rotated = Store(database, cipher=parse_keys(f"{generate_key_spec('k2')},{old_spec}"))
    await rotated.open()
    [read] = await rotated.history("lobby", since=0)
    await rotated.close()
    assert read.content == "old secret"

    stream = io.StringIO()
    setup_logging(level="DEBUG", stream=stream)
    stranger = Store(database, cipher=parse_keys(generate_key_spec("k9")))
    await stranger.open()
    try:
        [failed] = await stranger.history("lobby", since=0)
    finally:
        await stranger.close()
        setup_logging(level="DEBUG", stream=io.StringIO())
    assert failed.content is None and "decrypt_failed" in failed.flags
    errors = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert any(line["level"] == "error" and "decrypt" in line["msg"] for line in errors)
    assert "old secret" not in stream.getvalue()


async def test_encryption_failure_fails_publish_and_stores_nothing(store):
    """A cipher that fails makes the publish raise a 500 EncryptionError with nothing stored."""

    class BrokenCipher:
        def encrypt(self, plaintext: str, *, aad: bytes) -> bytes:
            raise RuntimeError("hardware security module unplugged")

    store.cipher = BrokenCipher()  # a fault that cannot be made for real
    with pytest.raises(EncryptionError) as caught:
        await store.insert_message(message(1))
    assert caught.value.status == 500
    assert await store.latest_seq("lobby") == 0


def test_migration_files_are_numbered_and_unique():
    """Migration files carry unique numeric prefixes so their order is unambiguous."""
    prefixes = [Path(p).name.split("_", 1)[0] for p in MIGRATIONS_DIR.glob("*.sql")]
    assert prefixes and all(p.isdigit() for p in prefixes)
    assert len(prefixes) == len(set(prefixes))


async def test_failed_transaction_rolls_back_everything(store, postgres, database):
    """Property 6: a transaction whose work fails leaves no trace, and the rollback is counted."""
    from app import metrics

    rollbacks = metrics.DB_ROLLBACKS.labels("doomed")._value.get()

    async def doomed(cursor) -> None:
        await cursor.execute("insert", "rooms", "INSERT INTO rooms (name) VALUES (%s)", ("ghost",))
        raise RuntimeError("work failed halfway")

    with pytest.raises(RuntimeError):
        await store.transaction(doomed, name="doomed")
    assert (
        postgres.psql(
            "SELECT count(*) FROM rooms WHERE name = 'ghost'", database=_db_name(database)
        )
        == "0"
    )
    assert metrics.DB_ROLLBACKS.labels("doomed")._value.get() == rollbacks + 1


async def test_serialization_failures_are_retried(store):
    """Two serializable transactions that conflict: the loser is retried and both end up applied."""
    from app import metrics

    retries = metrics.DB_TX_RETRIES.labels("bump")._value.get()
    both_read = asyncio.Barrier(2)
    attempts = 0

    async def bump(cursor) -> int:
        nonlocal attempts
        attempts += 1
        await cursor.execute("isolation", "-", "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        await cursor.execute("select", "rooms", "SELECT last_seq FROM rooms WHERE name = 'lobby'")
        (value,) = await cursor.fetchone()
        if attempts <= 2:
            await both_read.wait()  # the first two attempts interleave; retries run alone
        await cursor.execute(
            "update", "rooms", "UPDATE rooms SET last_seq = %s WHERE name = 'lobby'", (value + 1,)
        )
        return value + 1

    results = await asyncio.gather(
        store.transaction(bump, name="bump"), store.transaction(bump, name="bump")
    )
    assert sorted(results) == [1, 2]
    assert await store.latest_seq("lobby") == 2
    assert attempts == 3
    assert metrics.DB_TX_RETRIES.labels("bump")._value.get() == retries + 1


async def lock_waiters(monitor, database: str) -> list[int]:
    """Pids of the backends of *database* waiting on a lock right now."""
    async with monitor.cursor() as cursor:
        await cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
            (_db_name(database),),
        )
        return [row[0] for row in await cursor.fetchall()]


async def seconds_until_no_lock_waiter(monitor, database: str, limit: float) -> float:
    """How long until no backend of *database* waits on a lock; fails after *limit* seconds."""
    started = time.monotonic()
    while await lock_waiters(monitor, database):
        assert time.monotonic() - started < limit, "a backend still waits on the lock"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@pytest.fixture
def locked_lobby(store, database):
    """A plain psycopg2 transaction holding the lobby row lock, as a stuck publisher would."""
    holder = psycopg2.connect(database)
    with holder.cursor() as cursor:
        cursor.execute("SELECT last_seq FROM rooms WHERE name = 'lobby' FOR UPDATE")
    yield holder
    holder.rollback()
    holder.close()


@pytest.fixture
async def monitor(database):
    """A separate autocommit connection for looking at pg_stat_activity."""
    async with aiopg.connect(database) as connection:
        yield connection


def stop_processes(server) -> list[int]:
    """SIGSTOP the postmaster of *server* and all its children; return their pids."""
    found = subprocess.run(
        ["pgrep", "-f", str(server.data_dir)], capture_output=True, text=True
    ).stdout.split()
    children = subprocess.run(
        ["pgrep", "-P", str(server.pid())], capture_output=True, text=True
    ).stdout.split()
    pids = sorted({server.pid(), *map(int, found), *map(int, children)})
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


# -- deadlines, cancellation and the error model ----------------------------------------------


async def test_statement_blocked_on_a_row_lock_times_out_once_and_dies_on_the_server(
    store, locked_lobby, monitor, database, log_stream
):
    """A statement stuck on a row lock raises DatabaseTimeout once, unretried, and its backend stops waiting at once."""
    quick = Store(database, timeout=1.0)
    await quick.open()
    started = time.monotonic()
    try:
        with pytest.raises(DatabaseTimeout) as caught:
            await quick.insert_message(message(1))
        elapsed = time.monotonic() - started
        gone_after = await seconds_until_no_lock_waiter(monitor, database, limit=2.0)
        await wait_until(
            lambda: any(
                r["msg"] == "abandoned statement cancelled" for r in log_records(log_stream)
            ),
            timeout=2.0,
        )
    finally:
        await quick.close()
    print(f"timeout after {elapsed:.3f}s, backend gone {gone_after:.3f}s later")
    assert 1.0 <= elapsed < 1.5
    assert caught.value.status == 504 and caught.value.code == "DATABASE_TIMEOUT"
    assert caught.value.retry_after == 2
    records = log_records(log_stream)
    assert not [r for r in records if "retrying" in r["msg"]]
    # Whether the cancel or the server's own 1 s statement timeout got there first varies.
    assert len([r for r in records if r["msg"] == "abandoned statement cancelled"]) == 1


async def test_abandoned_statement_is_cancelled_long_before_the_server_would_notice(
    store, locked_lobby, monitor, database
):
    """With a 0.2 s per-call deadline, far inside the server's 5 s timeouts and 1 s client check, the backend stops waiting within 0.5 s."""
    assert store.timeout == 5
    started = time.monotonic()
    with pytest.raises(DatabaseTimeout):
        await store.insert_message(message(1), timeout=0.2)
    elapsed = time.monotonic() - started
    # The client check would end the backend 1 s into its statement, 0.8 s from now.
    gone_after = await seconds_until_no_lock_waiter(monitor, database, limit=0.5)
    print(f"timeout after {elapsed:.3f}s, backend gone {gone_after:.3f}s later")
    assert 0.2 <= elapsed < 0.5
    # The lock is still held: the backend went because it was cancelled, not served.
    assert locked_lobby.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INTRANS


async def test_eight_blocked_calls_on_a_pool_of_four_never_have_more_than_four_waiters(
    database, tmp_path, locked_lobby, monitor
):
    """Eight calls stuck on one row lock with a pool of 4: all time out within the deadline and at most 4 backends ever wait."""
    store = Store(database, pool_size=4, timeout=1.0)
    await store.open()
    samples: list[tuple[float, int]] = []
    sampling = True

    async def sample() -> None:
        while sampling:
            samples.append((time.monotonic(), len(await lock_waiters(monitor, database))))
            await asyncio.sleep(0.02)

    async def timed(index: int) -> tuple[BaseException | None, float]:
        started = time.monotonic()
        try:
            await store.insert_message(message(index))
        except Exception as exc:
            return exc, time.monotonic() - started
        return None, time.monotonic() - started

    sampler = asyncio.create_task(sample())
    try:
        outcomes = await asyncio.gather(*(timed(index) for index in range(8)))
        ended = time.monotonic()
        # Keep sampling a while: a waiter left behind, or a late one, would show.
        await asyncio.sleep(1.0)
    finally:
        sampling = False
        await sampler
        await store.close()
    slowest = max(elapsed for _, elapsed in outcomes)
    peak = max(count for _, count in samples)
    gone_after = min(at for at, count in samples if at >= ended and count == 0) - ended
    print(f"peak waiters {peak}, slowest call {slowest:.3f}s, waiters gone {gone_after:.3f}s after")
    assert all(isinstance(error, DatabaseTimeout) for error, _ in outcomes)
    assert slowest < 1.5
    assert 1 <= peak <= 4
    assert gone_after < 2.0 and samples[-1][1] == 0


async def test_sigstopped_server_gives_database_errors_within_the_deadline(own_postgres, tmp_path):
    """With PostgreSQL SIGSTOPped, run, ping, history and listen raise DatabaseTimeout or DatabaseError within timeout + 1 s."""
    store = Store(own_postgres.dsn, timeout=1.0)
    await store.open()
    await store.migrate()
    await store.create_room("lobby")
    await store.ping()  # a warm connection in the pool, and then fresh ones

    async def listen() -> None:
        async with store.listen(ROOMS_CHANNEL):
            pass

    calls = {
        "run": lambda: store.run(lambda cursor: cursor.execute("x", "-", "SELECT 1"), name="x"),
        "ping": store.ping,
        "history": lambda: store.history("lobby", since=0),
        "listen": listen,
    }
    outcomes = {}
    pids = stop_processes(own_postgres)
    try:
        for name, call in calls.items():
            started = time.monotonic()
            try:
                await call()
            except Exception as exc:
                outcomes[name] = (exc, time.monotonic() - started)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        await store.close()
    print(
        {name: (type(exc).__name__, round(elapsed, 3)) for name, (exc, elapsed) in outcomes.items()}
    )
    assert set(outcomes) == set(calls)
    for exc, elapsed in outcomes.values():
        assert isinstance(exc, DatabaseError) and not isinstance(exc, psycopg2.Error)
        assert elapsed < 2.0


async def test_stopped_server_is_database_error_and_a_restart_costs_one_retry(
    own_postgres, tmp_path, log_stream
):
    """A stopped PostgreSQL gives DatabaseError fast; after a restart a stale pooled connection is retried once, unseen."""
    store = Store(own_postgres.dsn, timeout=2.0)
    await store.open()
    await store.migrate()
    await store.create_room("lobby")
    await store.latest_seq("lobby")
    await asyncio.to_thread(own_postgres.stop, "immediate")
    try:
        for call in (lambda: store.latest_seq("lobby"), store.ping, store.load_rooms):
            started = time.monotonic()
            with pytest.raises(DatabaseError) as caught:
                await call()
            assert not isinstance(caught.value, DatabaseTimeout)
            assert time.monotonic() - started < 1.0
        with pytest.raises(DatabaseError):
            async with store.listen(ROOMS_CHANNEL):
                pass
        await asyncio.to_thread(own_postgres.start)
        await store.latest_seq("lobby")
        # Restarting while the event loop is blocked leaves a pooled connection whose end
        # nobody noticed yet: the next query is the first to find out.
        own_postgres.stop("fast")
        own_postgres.start()
        before = len([r for r in log_records(log_stream) if "retrying once" in r["msg"]])
        assert await store.latest_seq("lobby") == 0
        stale = len([r for r in log_records(log_stream) if "retrying once" in r["msg"]]) - before
    finally:
        await store.close()
    assert stale == 1


async def test_lone_surrogate_is_rejected_and_nothing_is_stored(store, database, postgres):
    """Content with a lone surrogate raises DatabaseRejected (no pgcode, never reached the server) and stores nothing."""
    # Built directly: Message.accept refuses it already, so only other paths get this far.
    surrogate = Message(id=str(uuid.uuid4()), room="lobby", sender="alice", client_msg_id="s1",
                        content="a\ud800b", created_at="2026-01-01T00:00:00Z")  # fmt: skip
    with pytest.raises(DatabaseRejected) as caught:
        await store.insert_message(surrogate)
    assert caught.value.status == 500 and not caught.value.recoverable
    assert caught.value.pgcode is None
    assert isinstance(caught.value.__cause__, UnicodeEncodeError)
    assert await store.latest_seq("lobby") == 0
    assert postgres.psql("SELECT count(*) FROM messages", database=_db_name(database)) == "0"
    # The rolled-back connection is healthy for the next caller.
    stored, created = await store.insert_message(message(2))
    assert created and stored.seq == 1


@pytest.mark.parametrize(
    ("setting", "statement", "pgcode"),
    [
        ("statement_timeout", "SELECT pg_sleep(2)", "57014"),
        ("lock_timeout", "SELECT 1 FROM rooms WHERE name = 'lobby' FOR UPDATE", "55P03"),
    ],
)
async def test_server_side_timeouts_are_database_timeouts(
    store, locked_lobby, setting, statement, pgcode
):
    """A statement the server gives up on (statement or lock timeout) raises DatabaseTimeout, and the caller is not cancelled."""

    async def slow(cursor) -> None:
        await cursor.execute("set", "-", f"SET LOCAL {setting} = 100")
        await cursor.execute("select", "rooms", statement)

    with pytest.raises(DatabaseTimeout) as caught:
        await store.transaction(slow, name="slow")
    assert caught.value.__cause__.pgcode == pgcode
    assert asyncio.current_task().cancelling() == 0
    assert await store.latest_seq("lobby") == 0


@pytest.mark.parametrize(
    ("tx_retries", "backoff"),
    [(1, Backoff(initial=0.05)), (5, Backoff(initial=10.0, max_delay=10.0))],
    ids=["no-retries-left", "backoff-past-deadline"],
)
async def test_conflicts_beyond_the_retries_are_a_recoverable_database_error(
    database, tmp_path, tx_retries, backoff
):
    """A serialization failure with no retry left, or whose backoff would outlast the deadline, raises a recoverable DatabaseError at once."""
    store = Store(
        database, timeout=2.0, tx_retries=tx_retries,
        tx_backoff=backoff,
    )  # fmt: skip
    await store.open()
    await store.migrate()
    await store.create_room("lobby")
    both_read = asyncio.Barrier(2)

    async def bump(cursor) -> None:
        await cursor.execute("isolation", "-", "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        await cursor.execute("select", "rooms", "SELECT last_seq FROM rooms WHERE name = 'lobby'")
        (value,) = await cursor.fetchone()
        await both_read.wait()
        await cursor.execute(
            "update", "rooms", "UPDATE rooms SET last_seq = %s WHERE name = 'lobby'", (value + 1,)
        )

    started = time.monotonic()
    try:
        outcomes = await asyncio.gather(
            store.transaction(bump, name="bump"),
            store.transaction(bump, name="bump"),
            return_exceptions=True,
        )
    finally:
        await store.close()
    elapsed = time.monotonic() - started
    [error] = [outcome for outcome in outcomes if outcome is not None]
    assert type(error) is DatabaseError and error.recoverable
    assert error.detail == "SerializationFailure:40001"
    assert elapsed < 1.0


async def test_closed_store_raises_database_error(store):
    """A store whose pool is closed raises DatabaseError, not aiopg's RuntimeError."""
    await store.close()
    with pytest.raises(DatabaseError) as caught:
        await store.latest_seq("lobby")
    assert caught.value.detail == "_PoolClosed"


async def test_every_pool_connection_carries_the_server_side_deadlines(store):
    """Pool connections run with statement, lock and idle-in-transaction timeouts of the store's deadline, and a client check."""

    async def show(cursor) -> list[str]:
        settings = []
        for name in ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout",
                     "client_connection_check_interval"):  # fmt: skip
            await cursor.execute("show", "-", f"SHOW {name}")
            settings.append((await cursor.fetchone())[0])
        return settings

    assert await store.run(show, name="show") == ["5s", "5s", "5s", "1s"]


async def test_work_errors_pass_through_unchanged(store):
    """An AppError or a bug inside the work reaches the caller as it is, not as a database error."""

    async def missing(cursor) -> None:
        raise NotFound(text="room not found")

    async def buggy(cursor) -> None:
        raise KeyError("bug")

    with pytest.raises(NotFound):
        await store.run(missing, name="missing")
    with pytest.raises(KeyError):
        await store.run(buggy, name="buggy")


class ServerError(psycopg2.DatabaseError):
    """A psycopg2 error whose pgcode the class sets, since only the server sets it on instances."""

    pgcode: str | None = None


def driver_error(kind: type[BaseException], pgcode: str | None, text: str) -> BaseException:
    """An exception of *kind* with message *text*, and *pgcode* when it is a psycopg2 error."""
    if issubclass(kind, psycopg2.Error):
        return type("Planted", (kind, ServerError), {"pgcode": pgcode})(text)
    return kind(text)


#: Exception kinds the driver and the network raise.
DRIVER_KINDS = [
    psycopg2.OperationalError, psycopg2.InterfaceError, psycopg2.IntegrityError,
    psycopg2.DataError, psycopg2.ProgrammingError, psycopg2.InternalError,
    psycopg2.errors.QueryCanceled, OSError, ConnectionResetError, TimeoutError,
]  # fmt: skip
#: SQLSTATEs of lost sessions, timeouts, conflicts, server trouble and refusals.
PGCODES = [
    None, "08006", "57P01", "25P03", "57014", "55P03", "40001", "40P01", "53100", "58030",
    "23505", "22P02", "42601", "XX000",
]  # fmt: skip


def expected_error(kind: type[BaseException], pgcode: str | None) -> type[AppError]:
    """The error class the store's mapping promises for *kind* with *pgcode*."""
    if kind is TimeoutError:
        return DatabaseTimeout
    if not issubclass(kind, psycopg2.Error):
        return DatabaseError
    if pgcode in ("57014", "55P03"):
        return DatabaseTimeout
    if pgcode in ("40001", "40P01") or (pgcode or "")[:2] in ("53", "58"):
        return DatabaseError
    lost = pgcode is None or pgcode.startswith("08") or pgcode in ("57P01", "25P03")
    if issubclass(kind, psycopg2.OperationalError | psycopg2.InterfaceError) and lost:
        return DatabaseError
    return DatabaseRejected


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(DRIVER_KINDS),
    pgcode=st.sampled_from(PGCODES),
    text=st.text(min_size=8).map(lambda s: f"SECRET{s}"),
)
def test_every_driver_error_becomes_exactly_one_database_error(kind, pgcode, text):
    """Property: any driver-level error maps to exactly the promised one of DatabaseError, DatabaseTimeout, DatabaseRejected, and never carries its message."""
    error = _as_app_error(driver_error(kind, pgcode, text))
    assert type(error) is expected_error(kind, pgcode)
    assert text not in str(error) and text not in json.dumps(error.params)
    assert error.recoverable is (type(error) is not DatabaseRejected)
    if isinstance(error, DatabaseRejected):
        assert error.pgcode == pgcode and error.code == "INTERNAL_ERROR"
    if isinstance(error, DatabaseTimeout):
        assert error.status == 504 and error.retry_after == 2


def test_value_errors_are_rejections_only_from_the_driver():
    """A ValueError is a DatabaseRejected when the driver raised it adapting parameters, and nobody's business otherwise."""
    error = _as_app_error(
        UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"), adapting=True
    )
    assert type(error) is DatabaseRejected and error.detail == "UnicodeEncodeError"
    assert _as_app_error(ValueError("bad"), adapting=False) is None
    assert _as_app_error(KeyError("bug")) is None
    not_found = NotFound()
    assert _as_app_error(not_found) is not_found


# -- the room directory and its notifications ------------------------------------------------


async def test_load_rooms_and_load_room_return_privacy_members_and_last_seq(store):
    """load_rooms and load_room give each room's privacy, last seq and member ids; an unknown room is None."""
    alice = await store.create_user("alice", "hash")
    bob = await store.create_user("bob", "hash")
    await store.create_room("secret", private=True)
    await store.add_room_member("secret", "alice")
    await store.add_room_member("secret", "bob")
    for index in range(3):
        await store.insert_message(message(index))
    rooms = await store.load_rooms()
    assert rooms == [
        RoomRecord(name="lobby", is_private=False, last_seq=3, members=frozenset()),
        RoomRecord(name="secret", is_private=True, last_seq=0, members=frozenset({alice, bob})),
    ]
    assert await store.load_room("secret") == rooms[1]
    assert await store.load_room("nowhere") is None


async def test_room_changes_notify_and_publishes_do_not(store):
    """Creating a room, changing its privacy and adding or removing a member notify hearth_rooms with its name; a publish does not."""
    user_id = await store.create_user("alice", "hash")

    async def execute(sql: str, *params) -> None:
        await store.run(lambda cursor: cursor.execute("test", "rooms", sql, params), name="test")

    async with store.listen(ROOMS_CHANNEL) as listener:
        assert await listener.next(timeout=0.05) is None
        await store.create_room("news")
        assert await listener.next(timeout=2) == "news"
        await execute("UPDATE rooms SET is_private = true WHERE name = 'news'")
        assert await listener.next(timeout=2) == "news"
        await store.add_room_member("news", "alice")
        assert await listener.next(timeout=2) == "news"
        await execute("DELETE FROM room_members WHERE room = 'news' AND user_id = %s", user_id)
        assert await listener.next(timeout=2) == "news"
        # Neither a publish (last_seq moves) nor a privacy "change" to the same value
        # notifies: the next payload is the room created after them.
        await store.insert_message(message(1, room="news"))
        await execute("UPDATE rooms SET is_private = true WHERE name = 'news'")
        await store.create_room("after")
        assert await listener.next(timeout=2) == "after"
        await execute("DELETE FROM rooms WHERE name = 'after'")
        assert await listener.next(timeout=2) == "after"
        assert await listener.next(timeout=0.2) is None


async def test_listener_that_loses_its_connection_raises_database_error(store, postgres, database):
    """When the server ends the listening connection, next raises DatabaseError instead of waiting."""
    async with store.listen(ROOMS_CHANNEL) as listener:
        assert await listener.next(timeout=0.05) is None
        terminated = postgres.psql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            f" WHERE datname = '{_db_name(database)}' AND query LIKE 'LISTEN %'"
        )
        assert terminated == "1"
        started = time.monotonic()
        with pytest.raises(DatabaseError) as caught:
            await listener.next(timeout=5)
    assert time.monotonic() - started < 1
    assert not isinstance(caught.value, DatabaseTimeout)


async def test_callers_beyond_the_pool_size_wait_their_turn_without_starving(database):
    """Thirty callers on three connections all get served in turn; none starves past its deadline."""
    store = Store(database, pool_size=3, timeout=2.0)
    await store.open()
    try:
        await store.migrate()
        await store.create_room("lobby")

        async def caller(index: int) -> int:
            for n in range(30):
                await store.insert_message(message(index * 100 + n, sender=f"caller{index}"))
            return index

        done = await asyncio.gather(*(caller(index) for index in range(30)))
        assert done == list(range(30))
        assert await store.latest_seq("lobby") == 900
    finally:
        await store.close()
