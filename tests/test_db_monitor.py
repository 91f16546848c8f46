"""DbMonitor and the spool against a PostgreSQL that really stops, hangs and restarts."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors.db_monitor import DbMonitor, DbState
from app.errors import SpoolFull
from app.log import setup_logging
from app.models import Message
from app.resilience import Backoff
from app.services import LocalPostgres, free_port
from app.spool import Spool
from app.store import Store
from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parent.parent
FAST_BACKOFF = Backoff(initial=0.05, base=2.0, max_delay=0.4, jitter=0.0)


@pytest.fixture
def log_stream():
    """Every log line of the test, as JSON text."""
    stream = io.StringIO()
    setup_logging(level="DEBUG", stream=stream)
    yield stream
    setup_logging(level="DEBUG", stream=io.StringIO())


def lines(stream: io.StringIO) -> list[dict]:
    """The JSON log records written so far."""
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def prepared_store(server: LocalPostgres, spool_path: Path, **options) -> Store:
    """An open, migrated store on *server* with a lobby room."""
    store = Store(server.dsn, spool=Spool(spool_path, **options), timeout=1.0)
    await store.open()
    await store.migrate()
    await store.create_room("lobby")
    return store


def running_monitor(store: Store) -> tuple[DbMonitor, asyncio.Task]:
    """A DbMonitor pinging every 50 ms, running in its own task."""
    monitor = DbMonitor(store, ping_interval=0.05, backoff=FAST_BACKOFF)
    return monitor, asyncio.create_task(monitor.run())


async def stop_monitor(task: asyncio.Task) -> None:
    """Cancel a monitor task and wait for it."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_acknowledged_publishes_survive_postgres_stop(
    own_postgres, tmp_path, mode, log_stream
):
    """PostgreSQL stopped mid-stream: after restart every acknowledged message is stored exactly once."""
    store = await prepared_store(own_postgres, tmp_path / "publish.spool")
    monitor, task = running_monitor(store)
    await wait_until(lambda: monitor.db_state is DbState.CONNECTED)
    acknowledged: list = []

    async def publisher() -> None:
        for index in range(150):
            accepted = Message.accept(
                room="lobby", sender="alice", content=f"m{index}", client_msg_id=f"c{index}"
            )
            acknowledged.append(await store.publish(accepted))
            await asyncio.sleep(0.01)

    publishing = asyncio.create_task(publisher())
    await wait_until(lambda: len(acknowledged) >= 30)
    await asyncio.to_thread(own_postgres.stop, mode)
    await wait_until(lambda: monitor.db_state is not DbState.CONNECTED)
    await asyncio.sleep(0.5)
    await asyncio.to_thread(own_postgres.start)
    await publishing
    await wait_until(lambda: store.spool.depth == 0 and monitor.db_state is DbState.CONNECTED)

    history = await store.history("lobby", since=0, limit=1000)
    await stop_monitor(task)
    await store.close()
    queued = [result for result in acknowledged if result.queued]
    assert queued, "some publishes must have been spooled while PostgreSQL was down"
    assert [m.seq for m in history] == list(range(1, len(history) + 1))
    stored_ids = [m.id for m in history]
    assert sorted(stored_ids) == sorted(result.message.id for result in acknowledged)
    assert [m.content for m in history] == [f"m{i}" for i in range(150)]
    records = lines(log_stream)
    assert any(r["msg"] == "database connection lost" and r["level"] == "warn" for r in records)
    recovered = [r for r in records if r["msg"] == "database recovered"]
    assert recovered and recovered[0]["level"] == "info" and "attempt" in recovered[0]
    assert all("dsn" not in r or "@" not in r["dsn"] or ":***@" in r["dsn"] or "hearth@" in r["dsn"]
               for r in records)  # fmt: skip


async def test_error_after_five_failed_retries_and_connection_events_recorded(
    own_postgres, tmp_path, log_stream
):
    """Five failed retries log ERROR with the attempt; on recovery the transitions are recorded."""
    store = await prepared_store(own_postgres, tmp_path / "publish.spool")
    monitor, task = running_monitor(store)
    await wait_until(lambda: monitor.db_state is DbState.CONNECTED)
    await asyncio.to_thread(own_postgres.stop, "fast")
    await wait_until(lambda: monitor.db_state is DbState.ERROR)
    errors = [
        r for r in lines(log_stream) if r["level"] == "error" and r["component"] == "db_monitor"
    ]
    assert errors and errors[0]["attempt"] == 6
    await asyncio.to_thread(own_postgres.start)
    await wait_until(lambda: monitor.db_state is DbState.CONNECTED)
    await wait_until(lambda: not monitor._pending_events)
    await stop_monitor(task)
    await store.close()
    states = own_postgres.psql(
        "SELECT string_agg(state, ',' ORDER BY id) FROM connection_events", database="hearth"
    )
    assert states == "connected,disconnected,reconnecting,error,connected"


async def test_stale_pool_after_restart_costs_no_failed_request(own_postgres, tmp_path):
    """After PostgreSQL restarts under a warm pool, the next queries succeed without error."""
    store = await prepared_store(own_postgres, tmp_path / "publish.spool")
    await asyncio.gather(*(store.latest_seq("lobby") for _ in range(5)))
    assert store.pool_stats()["free"] >= 1
    await asyncio.to_thread(own_postgres.stop, "fast")
    await asyncio.to_thread(own_postgres.start)
    results = [await store.latest_seq("lobby") for _ in range(5)]
    await store.close()
    assert results == [0] * 5


async def test_sigstopped_postgres_becomes_a_timeout_not_a_hang(own_postgres, tmp_path):
    """A SIGSTOPped PostgreSQL makes a query fail within a few seconds, never hang."""
    store = await prepared_store(own_postgres, tmp_path / "publish.spool")
    await store.latest_seq("lobby")
    pids = [int(pid) for pid in subprocess.run(
        ["pgrep", "-f", str(own_postgres.data_dir)], capture_output=True, text=True
    ).stdout.split()]  # fmt: skip
    children = subprocess.run(
        ["pgrep", "-P", str(own_postgres.pid())], capture_output=True, text=True
    ).stdout.split()
    pids = sorted(set(pids) | {own_postgres.pid()} | {int(pid) for pid in children})
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    try:
        with pytest.raises(Exception) as caught:  # noqa: B017 - a timeout, whatever its class
            await store.latest_seq("lobby")
        elapsed = time.monotonic() - started
        accepted = Message.accept(
            room="lobby", sender="a", content="while hung", client_msg_id="h1"
        )
        result = await store.publish(accepted)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    await store.close()
    assert (
        isinstance(caught.value, TimeoutError | OSError) or "Timeout" in type(caught.value).__name__
    )
    assert elapsed < 5
    assert result.queued and store.spool.depth == 1


async def test_spool_full_is_503_and_never_acknowledged(own_postgres, tmp_path):
    """With PostgreSQL down and the spool full, publishes get SpoolFull; only acknowledged ones get stored."""
    store = await prepared_store(own_postgres, tmp_path / "publish.spool", max_bytes=2000)
    await asyncio.to_thread(own_postgres.stop, "fast")
    acknowledged, refused = [], []
    for index in range(40):
        accepted = Message.accept(
            room="lobby", sender="a", content=f"x{index}", client_msg_id=f"f{index}"
        )
        try:
            acknowledged.append(await store.publish(accepted))
        except SpoolFull as exc:
            assert exc.status == 503 and exc.retry_after
            refused.append(accepted)
    assert acknowledged and refused
    assert all(result.queued for result in acknowledged)
    await asyncio.to_thread(own_postgres.start)
    monitor, task = running_monitor(store)
    await wait_until(lambda: store.spool.depth == 0 and monitor.db_state is DbState.CONNECTED)
    history = await store.history("lobby", since=0, limit=100)
    await stop_monitor(task)
    await store.close()
    assert {m.id for m in history} == {r.message.id for r in acknowledged}
    assert not {m.id for m in history} & {m.id for m in refused}


def test_sigkilled_server_drains_its_spool_on_restart(own_postgres, tmp_path):
    """A process SIGKILLed after acknowledging spooled publishes loses nothing: the next start drains them."""
    spool_dir = tmp_path / "spool"
    dead_dsn = f"postgresql://hearth@127.0.0.1:{free_port()}/hearth"
    publisher = subprocess.Popen(
        [sys.executable, "-c", PUBLISH_WHILE_DOWN, dead_dsn, str(spool_dir / "publish.spool")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
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
        stored: set[str] = set()
        while time.monotonic() < deadline:
            stored = set(own_postgres.psql("SELECT id FROM messages", database="hearth").split())
            if set(acknowledged) <= stored:
                break
            time.sleep(0.2)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=20)
    assert set(acknowledged) <= stored


async def _migrate_with_lobby(dsn: str) -> None:
    store = Store(dsn)
    await store.open()
    await store.migrate()
    await store.create_room("lobby")
    await store.close()


#: Publishes forever against an unreachable database, printing each acknowledgement.
PUBLISH_WHILE_DOWN = """
import asyncio, sys
from app.log import setup_logging
from app.models import Message
from app.spool import Spool
from app.store import Store

async def main(dsn, path):
    setup_logging(level="ERROR")
    store = Store(dsn, spool=Spool(__import__("pathlib").Path(path)), timeout=0.5)
    await store.open()
    store.available = False
    index = 0
    while True:
        message = Message.accept(room="lobby", sender="k", content=f"k{index}", client_msg_id=f"k{index}")
        result = await store.publish(message)
        assert result.queued
        print("acked", result.message.id, flush=True)
        index += 1

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""
