"""DbMonitor, room writer and spool against a PostgreSQL that really stops, hangs and restarts."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors.db_monitor import DbMonitor, DbState
from actors.room_writer import Outlet, Publish, PublishResult, RoomWriter
from app.errors import DatabaseError, DatabaseTimeout, SpoolFull
from app.models import Message
from app.resilience import Backoff
from app.services import LocalPostgres, free_port
from app.spool import Spool
from app.store import Store
from tests.conftest import hung, log_records, wait_until

ROOT = Path(__file__).resolve().parent.parent
FAST_BACKOFF = Backoff(initial=0.05, base=2.0, max_delay=0.4, jitter=0.0)


async def prepared_store(server: LocalPostgres) -> Store:
    """An open, migrated store on *server* with a lobby room."""
    store = Store(server.dsn, timeout=1.0)
    await store.open()
    await store.migrate()
    await store.create_room("lobby")
    return store


def running_monitor(store: Store) -> tuple[DbMonitor, asyncio.Task]:
    """A DbMonitor pinging every 50 ms, running in its own task."""
    monitor = DbMonitor(store, ping_interval=0.05, backoff=FAST_BACKOFF)
    return monitor, asyncio.create_task(monitor.run())


async def stop_actor(task: asyncio.Task) -> None:
    """Cancel an actor's task until it ends, as the supervisor does.

    Under Python 3.11 one cancel can be lost: ``asyncio.wait_for`` (aiopg polls through it)
    returns a result that lands together with the cancel, and the actor then idles on.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    await asyncio.gather(task, return_exceptions=True)


class Pipeline:
    """A RoomWriter on *store* and *spool*, driven by *monitor*, with everything its outlet emits."""

    def __init__(self, store: Store, spool: Spool, monitor: DbMonitor) -> None:
        self.store = store
        self.spool = spool
        self.monitor = monitor
        #: Every message the outlet emitted, in order (spooled previews have seq None).
        self.emitted: list[Message] = []
        outlet = Outlet()
        outlet.subscribe(self.emitted.extend)
        self.writer = RoomWriter(
            0, 1, store, spool, outlet,
            database_usable=monitor.usable_after, ask_for_ping=monitor.check_soon,
            drain_interval=0.1,
        )  # fmt: skip
        self.task = asyncio.create_task(self.writer.run())

    async def publish(self, message: Message) -> PublishResult:
        """Publish *message* as a session does: the store's deadline, and a second more to answer."""
        deadline = time.monotonic() + self.store.timeout
        return await self.writer.call(Publish(message, deadline), timeout=self.store.timeout + 1)

    def drained(self) -> bool:
        """Whether nothing waits in the spool and PostgreSQL is connected."""
        return (
            self.spool.depth == 0
            and not self.writer.pending
            and self.monitor.db_state is DbState.CONNECTED
        )

    def stored_emissions(self) -> list[Message]:
        """The emitted messages that carry a seq: stored ones, each to be sent out once."""
        return [message for message in self.emitted if message.seq is not None]

    async def stop(self) -> None:
        """Stop the writer."""
        await stop_actor(self.task)


def accept(index: int, prefix: str = "m") -> Message:
    """A validated lobby message numbered *index*."""
    return Message.accept(
        room="lobby", sender="alice", content=f"{prefix}{index}", client_msg_id=f"{prefix}{index}"
    )


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_acknowledged_publishes_survive_postgres_stop(
    own_postgres, tmp_path, mode, log_stream
):
    """PostgreSQL stopped mid-stream: after restart every acknowledged message is stored once, in order, gap-free, and sent out once."""
    store = await prepared_store(own_postgres)
    monitor, monitor_task = running_monitor(store)
    pipeline = Pipeline(store, Spool(tmp_path / "publish.spool"), monitor)
    await wait_until(lambda: monitor.db_state is DbState.CONNECTED)
    acknowledged: list[PublishResult] = []

    async def publisher() -> None:
        for index in range(150):
            acknowledged.append(await pipeline.publish(accept(index)))
            await asyncio.sleep(0.01)

    publishing = asyncio.create_task(publisher())
    await wait_until(lambda: len(acknowledged) >= 30)
    await asyncio.to_thread(own_postgres.stop, mode)
    await wait_until(lambda: monitor.db_state is not DbState.CONNECTED)
    await asyncio.sleep(0.5)
    await asyncio.to_thread(own_postgres.start)
    await publishing
    await wait_until(pipeline.drained, what="the spool to drain")

    history = await store.history("lobby", since=0, limit=1000)
    await pipeline.stop()
    await stop_actor(monitor_task)
    await store.close()
    queued = [result for result in acknowledged if result.queued]
    assert queued, "some publishes must have been spooled while PostgreSQL was down"
    assert [m.seq for m in history] == list(range(1, 151))
    assert [m.id for m in history] == [result.message.id for result in acknowledged]
    assert [m.content for m in history] == [f"m{i}" for i in range(150)]
    sent = pipeline.stored_emissions()
    assert [(m.id, m.seq) for m in sent] == [(m.id, m.seq) for m in history]
    records = log_records(log_stream)
    assert any(r["msg"] == "database connection lost" and r["level"] == "warn" for r in records)
    recovered = [r for r in records if r["msg"] == "database recovered"]
    assert recovered and recovered[0]["level"] == "info" and "attempt" in recovered[0]
    assert all("dsn" not in r or "@" not in r["dsn"] or ":***@" in r["dsn"] or "hearth@" in r["dsn"]
               for r in records)  # fmt: skip


async def test_error_after_five_failed_retries_and_connection_events_recorded(
    own_postgres, tmp_path, log_stream
):
    """Five failed retries log ERROR with the attempt; on recovery the transitions are recorded."""
    store = await prepared_store(own_postgres)
    monitor, task = running_monitor(store)
    await wait_until(lambda: monitor.db_state is DbState.CONNECTED)
    await asyncio.to_thread(own_postgres.stop, "fast")
    await wait_until(lambda: monitor.db_state is DbState.ERROR)
    errors = [
        r
        for r in log_records(log_stream)
        if r["level"] == "error" and r["component"] == "db_monitor"
    ]
    assert errors and errors[0]["attempt"] == 6
    await asyncio.to_thread(own_postgres.start)
    await wait_until(lambda: monitor.db_state is DbState.CONNECTED)
    await wait_until(lambda: not monitor._pending_events)
    await stop_actor(task)
    await store.close()
    states = own_postgres.psql(
        "SELECT string_agg(state, ',' ORDER BY id) FROM connection_events", database="hearth"
    )
    assert states == "connected,disconnected,reconnecting,error,connected"


async def test_stale_pool_after_restart_costs_no_failed_request(own_postgres):
    """After PostgreSQL restarts under a warm pool, the next queries succeed without error."""
    store = await prepared_store(own_postgres)
    await asyncio.gather(*(store.latest_seq("lobby") for _ in range(5)))
    assert store.pool_stats()["free"] >= 1
    await asyncio.to_thread(own_postgres.stop, "fast")
    await asyncio.to_thread(own_postgres.start)
    results = [await store.latest_seq("lobby") for _ in range(5)]
    await store.close()
    assert results == [0] * 5


async def test_sigstopped_postgres_becomes_a_typed_timeout_and_publishes_spool(
    own_postgres, tmp_path
):
    """A SIGSTOPped PostgreSQL makes a query raise DatabaseTimeout within seconds and a publish spool (202), stored once it wakes."""
    store = await prepared_store(own_postgres)
    monitor, monitor_task = running_monitor(store)
    pipeline = Pipeline(store, Spool(tmp_path / "publish.spool"), monitor)
    await wait_until(lambda: monitor.db_state is DbState.CONNECTED)
    await store.latest_seq("lobby")
    with hung(own_postgres):
        started = time.monotonic()
        with pytest.raises(DatabaseError) as caught:
            await store.latest_seq("lobby")
        query_seconds = time.monotonic() - started
        started = time.monotonic()
        result = await pipeline.publish(accept(1, "hung"))
        publish_seconds = time.monotonic() - started
        depth_while_hung = pipeline.spool.depth
    await wait_until(pipeline.drained, what="the spool to drain")
    history = await store.history("lobby", since=0)
    await pipeline.stop()
    await stop_actor(monitor_task)
    await store.close()
    assert type(caught.value) is DatabaseTimeout
    assert (caught.value.status, caught.value.retry_after) == (504, 2)
    assert query_seconds < 3
    assert result.queued and result.reply == {"id": result.message.id, "queued": True}
    assert publish_seconds < 3 and depth_while_hung == 1
    assert [(m.id, m.seq) for m in history] == [(result.message.id, 1)]


async def test_spool_full_is_503_and_never_acknowledged(own_postgres, tmp_path):
    """With PostgreSQL down and the spool full, publishes get SpoolFull 503; only acknowledged ones are ever stored or sent out."""
    store = await prepared_store(own_postgres)
    monitor, monitor_task = running_monitor(store)
    pipeline = Pipeline(store, Spool(tmp_path / "publish.spool", max_bytes=2000), monitor)
    await wait_until(lambda: monitor.db_state is DbState.CONNECTED)
    await asyncio.to_thread(own_postgres.stop, "fast")
    await wait_until(lambda: monitor.db_state is not DbState.CONNECTED)
    acknowledged, refused = [], []
    for index in range(40):
        message = accept(index, "f")
        try:
            acknowledged.append(await pipeline.publish(message))
        except SpoolFull as exc:
            assert (exc.status, exc.code, exc.retry_after) == (503, "SPOOL_FULL", 5)
            refused.append(message)
    assert acknowledged and refused
    assert all(result.queued for result in acknowledged)
    # Refusals come once the file is full, and every one after stays refused.
    assert [r.message.content for r in acknowledged] == [f"f{i}" for i in range(len(acknowledged))]
    await asyncio.to_thread(own_postgres.start)
    await wait_until(pipeline.drained, what="the spool to drain")
    history = await store.history("lobby", since=0, limit=100)
    await pipeline.stop()
    await stop_actor(monitor_task)
    await store.close()
    assert [m.id for m in history] == [r.message.id for r in acknowledged]
    refused_ids = {m.id for m in refused}
    assert not refused_ids & {m.id for m in pipeline.emitted}
    assert [m.id for m in pipeline.stored_emissions()] == [m.id for m in history]


def test_sigkilled_server_drains_its_spool_on_restart(own_postgres, tmp_path):
    """A process SIGKILLed after acknowledging spooled publishes loses nothing: the next start stores them in order."""
    spool_dir = tmp_path / "spool"
    dead_dsn = f"postgresql://hearth@127.0.0.1:{free_port()}/hearth"
    publisher = subprocess.Popen(
        [sys.executable, "-c", PUBLISH_WHILE_DOWN, dead_dsn, str(spool_dir / "publish.spool")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert publisher.stdout is not None
    acknowledged = []
    for line in publisher.stdout:
        if line.startswith("acked "):
            acknowledged.append(line.split()[1])
        if len(acknowledged) == 25:
            publisher.send_signal(signal.SIGKILL)
            break
    publisher.wait(timeout=10)
    publisher.stdout.close()
    assert publisher.returncode == -signal.SIGKILL

    asyncio.run(_migrate_with_lobby(own_postgres.dsn))
    port = free_port()
    env = {
        **os.environ,
        "HEARTH_PORT": str(port),
        "HEARTH_DATABASE_URL": own_postgres.dsn,
        "HEARTH_SPOOL_DIR": str(spool_dir),
        "HEARTH_LOG_DIR": "",
        "HEARTH_DB_PING_INTERVAL": "0.2",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "app", "serve"], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        stored: list[str] = []
        while time.monotonic() < deadline:
            stored = own_postgres.psql(
                "SELECT id FROM messages ORDER BY seq", database="hearth"
            ).split()
            if set(acknowledged) <= set(stored):
                break
            time.sleep(0.2)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=20)
    # A publish spooled but killed before its ack printed may be stored too, after them;
    # read ids and seqs together, once the server has stopped.
    rows = own_postgres.psql("SELECT seq, id FROM messages ORDER BY seq", database="hearth")
    seqs, stored = zip(*(row.split("|") for row in rows.splitlines()), strict=True)
    assert list(stored[: len(acknowledged)]) == acknowledged
    assert list(seqs) == [str(seq) for seq in range(1, len(stored) + 1)]
    assert server.returncode == 0


async def _migrate_with_lobby(dsn: str) -> None:
    store = Store(dsn)
    await store.open()
    await store.migrate()
    await store.create_room("lobby")
    await store.close()


#: Publishes forever through a RoomWriter that never finds PostgreSQL usable, printing each
#: acknowledgement.
PUBLISH_WHILE_DOWN = """
import asyncio, pathlib, sys, time
from actors.room_writer import Outlet, Publish, RoomWriter
from app.log import setup_logging
from app.models import Message
from app.spool import Spool
from app.store import Store

async def main(dsn, path):
    setup_logging(level="ERROR")
    store = Store(dsn, timeout=0.5)
    writer = RoomWriter(
        0, 1, store, Spool(pathlib.Path(path)), Outlet(), database_usable=lambda since: False
    )
    task = asyncio.create_task(writer.run())
    await writer.ready.wait()
    index = 0
    while True:
        message = Message.accept(room="lobby", sender="k", content=f"k{index}", client_msg_id=f"k{index}")
        result = await writer.call(Publish(message, time.monotonic() + store.timeout), timeout=2)
        assert result.queued
        print("acked", result.message.id, flush=True)
        index += 1

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""
