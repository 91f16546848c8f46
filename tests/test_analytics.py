"""The error recorder: statistics from memory, and every error written once to error_events."""

from __future__ import annotations

import asyncio
import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import metrics
from app.analytics import WINDOWS, ErrorRecorder, clean_text, device_type
from app.errors import AuthFailed, DatabaseError, NotFound, RateLimited, ValidationError
from app.resilience import Backoff
from app.store import Cursor, Store
from tests.conftest import hung, log_records, wait_until

#: Real user agents and the device type each must be detected as.
USER_AGENTS = {
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
    "Gecko) Version/17.4 Mobile/15E148 Safari/604.1": "mobile",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Mobile Safari/537.36": "mobile",
    "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0": "desktop",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:125.0) Gecko/20100101 Firefox/125.0": "desktop",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Safari/605.1.15": "desktop",
    "curl/8.5.0": "unknown",
    "": "unknown",
}
#: A fast backoff, so that recovery tests never wait real seconds.
QUICK = Backoff(initial=0.05, max_delay=0.2, jitter=0)


class FakeClock:
    """A wall clock that moves only when told."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def _rows(store: Store, sql: str = "SELECT count(*) FROM error_events") -> list[tuple]:
    async def select(cursor: Cursor) -> list[tuple]:
        await cursor.execute("select", "error_events", sql)
        return await cursor.fetchall()

    return await store.run(select, name="test")


async def migrated_store(dsn: str, timeout: float) -> Store:
    """An open store on *dsn*, migrated, with a *timeout* deadline."""
    store = Store(dsn, timeout=timeout)
    await store.open()
    await store.migrate()
    return store


@pytest.fixture
async def store(database):
    """A migrated store on a fresh database (short deadline)."""
    store = await migrated_store(database, 2)
    yield store
    await store.close()


@pytest.mark.parametrize("agent", USER_AGENTS)
def test_device_type_of_real_user_agents(agent):
    """iPhone Safari and Android Chrome are mobile, desktop browsers desktop, curl unknown."""
    assert device_type(agent) == USER_AGENTS[agent]


def test_statistics_count_each_window_by_whole_minutes():
    """1h, 24h and 7d windows count only their errors, grouped by category, device and endpoint."""
    clock = FakeClock()
    recorder = ErrorRecorder(clock=clock)
    iphone, firefox = list(USER_AGENTS)[0], list(USER_AGENTS)[2]
    start = clock.now
    for age, error, endpoint, agent in [
        (8 * 86400, NotFound(), "/gone", firefox),  # past 7 days: forgotten
        (3 * 86400, AuthFailed(), "/api/v1/auth/login", iphone),
        (5 * 3600, RateLimited(), "/api/v1/auth/login", iphone),
        (30 * 60, NotFound(), "unmatched", firefox),
        (0, RuntimeError("boom"), "/api/v1/rooms", None),
    ]:
        clock.now = start - age
        recorder.record(error, transport="http", endpoint=endpoint, user_agent=agent)
    clock.now = start
    hour = recorder.statistics(WINDOWS["1h"]).as_dict()
    assert hour["totalErrors"] == 2
    assert hour["errorsByCategory"] == {"internal": 1, "not_found": 1}
    assert hour["errorsByDevice"] == {"desktop": 1, "unknown": 1}
    assert hour["errorsByEndpoint"] == {"/api/v1/rooms": 1, "unmatched": 1}
    assert hour["timeRange"]["seconds"] == 3600
    day = recorder.statistics(WINDOWS["24h"]).as_dict()
    assert day["totalErrors"] == 3 and day["errorsByCategory"]["rate_limit"] == 1
    week = recorder.statistics(WINDOWS["7d"]).as_dict()
    assert week["totalErrors"] == 4
    assert week["errorsByEndpoint"] == {
        "/api/v1/auth/login": 2, "/api/v1/rooms": 1, "unmatched": 1,
    }  # fmt: skip
    assert week["errorsByDevice"] == {"mobile": 2, "desktop": 1, "unknown": 1}


def test_top_errors_are_the_ten_most_frequent_client_texts():
    """topErrors lists at most ten client texts, most frequent first, with their counts."""
    recorder = ErrorRecorder(clock=FakeClock())
    for index in range(12):
        for _ in range(index + 1):
            recorder.record(
                ValidationError(f"secret detail {index}", text=f"bad field {index:02d}"),
                transport="ws", endpoint="ws:pub",
            )  # fmt: skip
    top = recorder.statistics(3600).as_dict()["topErrors"]
    assert len(top) == 10
    assert top[0] == {"message": "bad field 11", "count": 12}
    assert [entry["count"] for entry in top] == list(range(12, 2, -1))


def test_recent_records_are_sanitized_and_newest_first():
    """recent() shows codes and client texts only: never details, SQL or paths from exceptions."""
    recorder = ErrorRecorder(recent_size=3, clock=FakeClock())
    recorder.record(NotFound("room /etc/passwd"), transport="http", endpoint="/a", trace_id="t1")
    recorder.record(
        RuntimeError("SELECT * FROM users WHERE password='hunter2'"),
        transport="ws", endpoint="ws:sub", user_id="u1", trace_id="t2",
    )  # fmt: skip
    newest = recorder.recent(1)[0].as_dict()
    assert newest == {
        "at": "2023-11-14T22:13:20.000Z", "category": "internal", "code": "INTERNAL_ERROR",
        "status": 500, "message": "internal error", "endpoint": "ws:sub", "method": None,
        "transport": "ws", "device_type": "unknown", "trace_id": "t2",
    }  # fmt: skip
    text = repr([record.as_dict() for record in recorder.recent(10)])
    assert "hunter2" not in text and "passwd" not in text and "SELECT" not in text
    for index in range(5):
        recorder.record(NotFound(), transport="http", endpoint=f"/{index}")
    assert [r.endpoint for r in recorder.recent(10)] == ["/4", "/3", "/2"]


def test_a_full_buffer_drops_the_oldest_counts_them_and_warns_once(log_stream: io.StringIO):
    """Past its capacity the buffer keeps the newest records, counts each drop, and warns once."""
    recorder = ErrorRecorder(capacity=5, clock=FakeClock())
    before = metrics.ERROR_EVENTS_DROPPED._value.get()
    for index in range(8):
        recorder.record(NotFound(), transport="http", endpoint=f"/{index}")
    assert recorder.pending == 5 and recorder.dropped == 3
    assert metrics.ERROR_EVENTS_DROPPED._value.get() == before + 3
    assert [record.endpoint for record in recorder._buffer] == ["/3", "/4", "/5", "/6", "/7"]
    warnings = [r for r in log_records(log_stream) if "buffer full" in r["msg"]]
    assert len(warnings) == 1 and warnings[0]["level"] == "warn"


def test_errors_are_counted_by_category_and_code():
    """Each record adds one to hearth_errors_total under its category and code."""
    child = metrics.ERRORS.labels("rate_limit", "RATE_LIMIT_EXCEEDED")
    before = child._value.get()
    recorder = ErrorRecorder()
    for _ in range(3):
        recorder.record(RateLimited(), transport="ws", endpoint="ws:pub")
    assert child._value.get() == before + 3


@given(st.text(max_size=300), st.text(max_size=300))
def test_clean_text_always_encodes_and_holds_no_nul(user_agent, endpoint):
    """Whatever a client sends, the recorded user agent and endpoint are UTF-8 without NULs."""
    recorder = ErrorRecorder()
    record = recorder.record(NotFound(), transport="http", endpoint=endpoint, user_agent=user_agent)
    assert record is not None
    for text in (record.user_agent, record.endpoint):
        assert text is not None and "\x00" not in text and len(text) <= 256
        text.encode("utf-8")
    assert clean_text("caf\u00e9 \ud800\x00") == "caf\u00e9 ??"


async def test_records_are_written_to_error_events(store):
    """Recorded errors reach error_events within a flush, with their sanitized columns."""
    recorder = ErrorRecorder(flush_interval=0.05)
    recorder.start(store)
    try:
        recorder.record(
            AuthFailed("wrong password for alice"), transport="http",
            endpoint="/api/v1/auth/login", method="POST", user_agent=list(USER_AGENTS)[1],
            trace_id="abc-123",
        )  # fmt: skip
        recorder.record(DatabaseError("psycopg2 said x"), transport="ws", endpoint="ws:pub",
                        user_id="00000000-0000-0000-0000-000000000001")  # fmt: skip
        await wait_until(lambda: recorder.flushed == 2, 10, "two events written")
    finally:
        await recorder.stop()
    rows = await _rows(
        store,
        "SELECT category, code, status, message, endpoint, method, transport, device_type,"
        " trace_id, user_id FROM error_events ORDER BY at, id",
    )
    assert rows == [
        ("auth", "AUTH_FAILED", 401, "authentication failed", "/api/v1/auth/login", "POST",
         "http", "mobile", "abc-123", None),
        ("service", "DATABASE_ERROR", 503, "service unavailable", "ws:pub", None, "ws",
         "unknown", None, "00000000-0000-0000-0000-000000000001"),
    ]  # fmt: skip
    assert recorder.pending == 0 and recorder.last_flush_error is None


async def test_lone_surrogates_and_nuls_do_not_wedge_the_flush(store):
    """A user agent or endpoint with lone surrogates and NULs is written, and so is what follows."""
    recorder = ErrorRecorder(flush_interval=0.05)
    recorder.start(store)
    try:
        recorder.record(
            NotFound(), transport="http", endpoint="/\ud800x\x00y", user_agent="evil\udfff\x00"
        )
        recorder.record(NotFound(), transport="http", endpoint="/fine")
        await wait_until(lambda: recorder.flushed == 2, 10, "both events written")
    finally:
        await recorder.stop()
    assert await _rows(store, "SELECT endpoint, user_agent FROM error_events ORDER BY id") == [
        ("/?x?y", "evil??"),
        ("/fine", None),
    ]
    assert recorder.dropped == 0


async def test_records_wait_out_a_stopped_postgres_and_are_written_exactly_once(own_postgres):
    """With PostgreSQL stopped records stay buffered; once it is back each is written once."""
    store = await migrated_store(own_postgres.dsn, 1)
    recorder = ErrorRecorder(flush_interval=0.05, backoff=QUICK)
    recorder.start(store)
    try:
        await asyncio.to_thread(own_postgres.stop, "fast")
        for index in range(5):
            recorder.record(NotFound(), transport="http", endpoint=f"/{index}")
        await wait_until(lambda: recorder.last_flush_error is not None, 15, "a failed flush")
        assert recorder.last_flush_error in ("DATABASE_ERROR", "DATABASE_TIMEOUT")
        assert recorder.pending == 5 and recorder.flushed == 0
        await asyncio.to_thread(own_postgres.start)
        await wait_until(lambda: recorder.pending == 0, 30, "the buffer written")
        assert recorder.last_flush_error is None and recorder.flushed == 5
        rows = await _rows(
            store, "SELECT endpoint, count(*) FROM error_events GROUP BY 1 ORDER BY 1"
        )
        assert rows == [(f"/{index}", 1) for index in range(5)]
    finally:
        await recorder.stop()
        await store.close()


async def test_a_hung_postgres_keeps_records_buffered_until_it_answers(own_postgres):
    """With PostgreSQL hung, writes time out and records wait; after it resumes each is written once."""
    store = await migrated_store(own_postgres.dsn, 0.5)
    recorder = ErrorRecorder(flush_interval=0.05, backoff=QUICK)
    recorder.start(store)
    try:
        with hung(own_postgres):
            for _ in range(3):
                recorder.record(NotFound(), transport="ws", endpoint="ws:sub")
            await wait_until(lambda: recorder.last_flush_error is not None, 15, "a failed flush")
            assert recorder.pending == 3
        await wait_until(lambda: recorder.pending == 0, 30, "the buffer written")
        assert await _rows(store) == [(3,)]
    finally:
        await recorder.stop()
        await store.close()


async def test_a_batch_committed_after_its_timeout_is_not_written_twice(pg_proxy, database):
    """An insert whose COMMIT landed after the deadline is retried without duplicating a row."""
    direct = await migrated_store(database, 5)
    store = Store(pg_proxy.dsn(database), timeout=0.5)
    await store.open()
    recorder = ErrorRecorder(flush_interval=0.05, backoff=QUICK)
    try:
        pg_proxy.delay_next_reply(b"error_events", 1.5)
        for index in range(4):
            recorder.record(NotFound(), transport="http", endpoint=f"/{index}")
        recorder.start(store)
        await wait_until(lambda: pg_proxy.delayed_replies == 1, 10, "the reply held back")
        await wait_until(lambda: recorder.pending == 0, 30, "the buffer written")
        assert recorder.flushed == 4
        assert await _rows(direct) == [(4,)]
        assert await _rows(direct, "SELECT count(DISTINCT event_id) FROM error_events") == [(4,)]
    finally:
        await recorder.stop()
        await store.close()
        await direct.close()


async def test_stop_writes_what_is_buffered(store):
    """stop() writes the buffer before it returns, even between two flushes."""
    recorder = ErrorRecorder(flush_interval=3600)
    recorder.start(store)
    await asyncio.sleep(0.1)  # the first flush ran, on an empty buffer
    for _ in range(3):
        recorder.record(NotFound(), transport="http", endpoint="/x")
    await recorder.stop()
    assert recorder.pending == 0
    assert await _rows(store) == [(3,)]


async def test_rows_older_than_seven_days_are_pruned(store):
    """The recorder's task deletes the rows it wrote that are past the retention, and no others."""
    clock = FakeClock()
    recorder = ErrorRecorder(flush_interval=0.05, prune_interval=0.05, clock=clock)
    for age in (8 * 86400, 7 * 86400 + 60, 86400, 0):
        clock.now = 1_700_000_000.0 - age
        recorder.record(NotFound(), transport="http", endpoint=f"/{age}")
    clock.now = 1_700_000_000.0
    recorder.start(store)
    try:
        await wait_until(lambda: recorder.flushed == 4, 10, "the buffer written")
        await wait_until_rows(store, 2)
    finally:
        await recorder.stop()
    assert await _rows(store, "SELECT endpoint FROM error_events ORDER BY at") == [
        ("/86400",),
        ("/0",),
    ]


async def wait_until_rows(store: Store, count: int) -> None:
    """Poll error_events until it holds *count* rows, failing after 10 s."""
    for _ in range(200):
        if await _rows(store) == [(count,)]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"error_events never held {count} rows")


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(user_agent=st.text(max_size=80), endpoint=st.text(max_size=80))
async def test_any_text_reaches_postgres(store, user_agent, endpoint):
    """Any user agent and endpoint text, surrogates and NULs included, is written to PostgreSQL."""
    recorder = ErrorRecorder(flush_interval=3600)
    recorder.start(store)
    recorder.record(NotFound(), transport="http", endpoint=endpoint, user_agent=user_agent)
    await recorder.stop()
    assert recorder.pending == 0 and recorder.dropped == 0 and recorder.flushed == 1
