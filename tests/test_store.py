"""The store against a real PostgreSQL: migrations, idempotent publishes, seq, crypto, logs."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from pathlib import Path

import psycopg2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.crypto import generate_key_spec, parse_keys
from app.errors import AppError, EncryptionError, NotFound, SpoolFull
from app.log import setup_logging
from app.models import Message
from app.spool import Spool
from app.store import MIGRATIONS_DIR, MigrationFailed, Store


def _db_name(dsn: str) -> str:
    return dsn.rsplit("/", 1)[1]


@pytest.fixture
async def store(database, tmp_path):
    """A migrated store with a lobby room and a spool in tmp_path."""
    store = Store(database, spool=Spool(tmp_path / "publish.spool"), timeout=5)
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
    """A failing migration is rolled back whole, not recorded, and raises MigrationFailed."""
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
    name = _db_name(database)
    assert postgres.psql("SELECT filename FROM schema_migrations", database=name) == "001_ok.sql"
    assert postgres.psql("SELECT to_regclass('half') IS NULL", database=name) == "t"
    assert postgres.psql("SELECT to_regclass('good') IS NOT NULL", database=name) == "t"


async def test_same_client_msg_id_twice_gives_one_row_and_same_seq(store, database, postgres):
    """Publishing the same client_msg_id twice stores one row and answers the same id and seq."""
    first = await store.publish(message(1))
    again = Message.accept(room="lobby", sender="alice", content="resent", client_msg_id="c-1")
    second = await store.publish(again)
    assert not first.queued and not second.queued
    assert second.reply == first.reply == {"id": first.message.id, "seq": 1}
    count = postgres.psql("SELECT count(*) FROM messages", database=_db_name(database))
    assert count == "1"


async def test_retry_with_same_id_after_commit_is_idempotent(store):
    """Storing the very same message again (a retry after a lost reply) returns the first seq."""
    original = message(7)
    stored = await store.store_message(original)
    retried = await store.store_message(original)
    assert (retried.id, retried.seq) == (stored.id, stored.seq) == (original.id, 1)


async def test_seq_is_gap_free_under_20_concurrent_publishers(store):
    """Twenty concurrent publishers get seqs 1..N with no gap and no repeat."""

    async def publisher(worker: int) -> list[int]:
        seqs = []
        for i in range(10):
            result = await store.publish(message(worker * 100 + i, sender=f"user{worker}"))
            seqs.append(result.message.seq)
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
        await store.publish(message(i))
    assert [m.seq for m in await store.history("lobby", since=7)] == [8, 9, 10]
    assert [m.seq for m in await store.history("lobby", before=5, limit=2)] == [3, 4]
    assert [m.content for m in await store.history("lobby", since=9)] == ["hello 10"]
    assert await store.latest_seq("lobby") == 10


async def test_unknown_room_is_not_found_and_not_stored(store):
    """A publish to a room that does not exist is refused with NotFound."""
    with pytest.raises(NotFound):
        await store.publish(message(1, room="nowhere"))
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
        await store.publish(accepted)
    assert caught.value.status in (400, 404)
    assert await store.latest_seq("lobby") == before
    assert store.spool.depth == 0


async def test_query_log_never_holds_content_or_password(database, tmp_path):
    """Properties 3 and 14: with every query logged as slow and errors forced, no content or password is logged."""
    secret_dsn = database.replace("hearth@", "hearth:hunter2-pw@")
    stream = io.StringIO()
    setup_logging(level="DEBUG", log_dir=tmp_path / "logs", stream=stream)
    store = Store(secret_dsn, spool=Spool(tmp_path / "s.spool"), slow_query_ms=0)
    await store.open()
    try:
        await store.migrate()
        await store.create_room("lobby")
        await store.publish(message(1, content="TOP-SECRET-CONTENT"))
        # A NOT NULL violation makes PostgreSQL quote the whole failing row, content included.
        with pytest.raises(psycopg2.IntegrityError):
            await store.store_message(
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


async def test_encryption_round_trip_stores_ciphertext(database, tmp_path, postgres):
    """With a key, content is stored encrypted and read back as the original text."""
    store = Store(
        database, spool=Spool(tmp_path / "s.spool"), cipher=parse_keys(generate_key_spec())
    )
    await store.open()
    try:
        await store.migrate()
        await store.create_room("lobby")
        await store.publish(message(1, content="attack at dawn"))
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
    store = Store(database, spool=Spool(tmp_path / "s.spool"), cipher=parse_keys(old_spec))
    await store.open()
    await store.migrate()
    await store.create_room("lobby")
    await store.publish(message(1, content="old secret"))
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
        await store.publish(message(1))
    assert caught.value.status == 500
    assert await store.latest_seq("lobby") == 0
    assert store.spool.depth == 0


def test_migration_files_are_numbered_and_unique():
    """Migration files carry unique numeric prefixes so their order is unambiguous."""
    prefixes = [Path(p).name.split("_", 1)[0] for p in MIGRATIONS_DIR.glob("*.sql")]
    assert prefixes and all(p.isdigit() for p in prefixes)
    assert len(prefixes) == len(set(prefixes))


async def test_spool_write_failure_is_503_not_an_acknowledgement(database, tmp_path):
    """When the spool cannot be written (here: its path is a directory), a publish gets 503 SpoolFull."""
    (tmp_path / "publish.spool").mkdir()
    store = Store(database, spool=Spool(tmp_path / "publish.spool"))
    store.available = False
    with pytest.raises(SpoolFull) as caught:
        await store.publish(message(1))
    assert caught.value.status == 503 and caught.value.retry_after


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


async def test_retry_while_spooled_gets_the_first_answer_even_after_restart(database, tmp_path):
    """A publish retried while the first copy waits in the spool gets the same id, also after a restart, and one row results."""
    path = tmp_path / "publish.spool"
    first_run = Store(database, spool=Spool(path))
    first_run.available = False
    first = await first_run.publish(message(1))
    again = await first_run.publish(
        Message.accept(room="lobby", sender="alice", content="resent", client_msg_id="c-1")
    )
    assert first.queued and again.queued and again.repeat
    assert again.reply == first.reply
    assert first_run.spool.depth == 1

    second_run = Store(database, spool=Spool(path))
    assert await second_run.load_spool() == 1
    second_run.available = False
    after_restart = await second_run.publish(message(1))
    assert after_restart.reply == first.reply and second_run.spool.depth == 1

    await second_run.open()
    await second_run.migrate()
    await second_run.create_room("lobby")
    second_run.available = True
    assert await second_run.drain_spool() == 1
    [stored] = await second_run.history("lobby", since=0)
    await second_run.close()
    assert (stored.id, stored.seq, stored.content) == (first.message.id, 1, "hello 1")
