"""The Hub under stress over real sockets: slow readers, crashes with 100 clients, shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from app import keys, metrics
from app.services import free_port
from tests.conftest import StalledReader, wait_for_http, wait_until

ROOT = Path(__file__).resolve().parent.parent

#: Publish limits out of the way for tests that publish in bulk.
UNLIMITED = {
    "HEARTH_PUB_RATE": "100000",
    "HEARTH_PUB_BURST": "100000",
    "HEARTH_USER_PUB_RATE": "100000",
    "HEARTH_USER_PUB_BURST": "100000",
}


async def test_stalled_reader_is_dropped_while_200_others_keep_receiving(make_hearth):
    """A reader that stops reading is dropped with SLOW_CLIENT while 200 others get every message."""
    hearth = await make_hearth(
        HEARTH_CLIENT_QUEUE_MESSAGES="50",
        HEARTH_SEND_TIMEOUT="2",
        HEARTH_WS_SEND_BUFFER="16384",
        **UNLIMITED,
    )
    drops_before = metrics.SLOW_CLIENT_DROPS._value.get()
    # Blocking socket calls run in a thread: the server shares this event loop.
    stalled = await asyncio.to_thread(StalledReader, hearth.server.port)
    await asyncio.to_thread(
        stalled.send, {"op": "auth", "id": "a", "token": hearth.tokens["carol"]}
    )
    await asyncio.to_thread(stalled.send, {"op": "sub", "id": "s", "topic": "room:lobby"})
    readers = [await hearth.connect("bob") for _ in range(200)]
    for reader in readers:
        await reader.request("sub", topic="room:lobby")
    registry = hearth.app[keys.REGISTRY]
    assert len(registry.subscribers["room:lobby"]) == 201
    publisher = await hearth.connect("alice")
    payload = "x" * 3000
    for index in range(120):
        ctrl = await publisher.request(
            "pub", topic="room:lobby", content=payload, client_msg_id=f"f{index}"
        )
        assert ctrl["code"] == 200

    async def receive_all(reader) -> list[int]:
        return [frame["seq"] for frame in await reader.data(120, timeout=30)]

    received = await asyncio.gather(*(receive_all(reader) for reader in readers))
    assert all(seqs == list(range(1, 121)) for seqs in received)
    await wait_until(
        lambda: metrics.SLOW_CLIENT_DROPS._value.get() > drops_before,
        10,
        "the stalled reader's drop",
    )
    assert metrics.SLOW_CLIENT_DROPS._value.get() == drops_before + 1
    assert await asyncio.to_thread(stalled.closed_by_server, 10)
    assert len(registry.subscribers["room:lobby"]) == 200
    stalled.sock.close()


async def test_hub_crash_keeps_100_clients_and_their_subscriptions(make_hearth):
    """After the Hub crashes and restarts, all 100 connections and subscriptions remain and get the next message."""
    hearth = await make_hearth(HEARTH_RESTART_INITIAL="0.05", **UNLIMITED)
    clients = [await hearth.connect("bob") for _ in range(100)]
    for client in clients:
        await client.request("sub", topic="room:lobby")
    hub = hearth.app[keys.SUPERVISOR].get("hub")

    class Poison:
        """A message no handler knows: the hub crashes on it, as on any bug."""

    hub.cast(Poison())
    await wait_until(
        lambda: hub.restarts > 0 and hub.status()["state"] == "running", 10, "the hub's restart"
    )
    assert hub.status()["last_error"]["type"] == "TypeError"
    assert len(hub.registry.connections) >= 100
    publisher = await hearth.connect("alice")
    ctrl = await publisher.request(
        "pub", topic="room:lobby", content="still here?", client_msg_id="after"
    )
    assert ctrl["code"] == 200
    frames = await asyncio.gather(*(client.data(1) for client in clients))
    assert all(frame[0]["content"] == "still here?" for frame in frames)


def test_sigterm_shutdown_order_and_no_half_written_publish(postgres, tmp_path):
    """SIGTERM: readiness 503 at once, in-flight publishes finish, SERVER_SHUTDOWN, close 1001, exit in time."""
    database = postgres.create_database("shutdown_order")
    subprocess.run(
        [sys.executable, "-m", "app", "migrate"], cwd=ROOT, check=True, capture_output=True,
        env={**os.environ, "HEARTH_DATABASE_URL": database},
    )  # fmt: skip
    env = {
        **os.environ,
        **UNLIMITED,
        "HEARTH_DATABASE_URL": database,
        "HEARTH_PORT": str(free_port()),
        "HEARTH_SPOOL_DIR": str(tmp_path / "spool"),
        "HEARTH_LOG_DIR": "",
        "HEARTH_DRAIN_GRACE": "0.5",
        "HEARTH_SHUTDOWN_TIMEOUT": "6",
    }
    for command in (
        ["user", "add", "alice", "--password", "correct horse battery"],
        ["room", "create", "lobby"],
    ):
        subprocess.run(
            [sys.executable, "-m", "app", *command],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
        )
    server_log = tmp_path / "server.log"
    with server_log.open("w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "app", "serve"], cwd=ROOT, env=env,
            stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        outcome = asyncio.run(
            _shutdown_scenario(server, f"http://127.0.0.1:{env['HEARTH_PORT']}", database)
        )
        exit_code = server.wait(timeout=15)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert exit_code == 0, server_log.read_text()[-3000:]
    assert outcome["ready_after_signal"] == 503
    assert outcome["events"][-2:] == ["SERVER_SHUTDOWN", "close 1001"], server_log.read_text()[
        -3000:
    ]
    assert 500 <= outcome["reconnect_after_ms"]
    assert outcome["exit_seconds"] < 6 + 1
    stored = set(postgres.psql("SELECT id FROM messages", database="shutdown_order").split())
    assert outcome["acked"] and set(outcome["acked"]) == stored


async def _shutdown_scenario(server: subprocess.Popen, base: str, database: str) -> dict:
    async with aiohttp.ClientSession() as session:
        await wait_for_http(session, f"{base}/health/ready", timeout=20)
        async with session.post(
            f"{base}/api/v1/auth/login",
            json={"username": "alice", "password": "correct horse battery"},
        ) as response:
            token = (await response.json())["token"]
        ws = await session.ws_connect(f"{base}/ws")
        await ws.send_json({"op": "auth", "id": "auth", "token": token})
        await ws.send_json({"op": "sub", "id": "sub", "topic": "room:lobby"})
        events: list[str] = []
        acked: list[str] = []
        reconnect_after_ms = 0
        stop_publishing = asyncio.Event()

        async def publish() -> None:
            index = 0
            while not stop_publishing.is_set() and not ws.closed:
                try:
                    await ws.send_json({"op": "pub", "id": f"p{index}", "topic": "room:lobby",
                                        "content": f"m{index}", "client_msg_id": f"c{index}"})  # fmt: skip
                except (ConnectionError, RuntimeError):
                    return
                index += 1
                await asyncio.sleep(0.005)

        async def read() -> None:
            nonlocal reconnect_after_ms
            async for message in ws:
                frame = json.loads(message.data)
                ctrl = frame.get("ctrl")
                if ctrl and ctrl["id"].startswith("p") and ctrl["code"] == 200:
                    acked.append(ctrl["params"]["id"])
                event = frame.get("event")
                if event and event["type"] == "error":
                    events.append(event["data"]["code"])
                    reconnect_after_ms = event["data"].get("reconnect_after_ms", 0)
            events.append(f"close {ws.close_code}")

        publishing = asyncio.create_task(publish())
        reading = asyncio.create_task(read())
        await asyncio.sleep(0.5)
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.1)
        async with session.get(f"{base}/health/ready") as response:
            ready_after_signal = response.status
        await asyncio.wait_for(reading, 10)
        stop_publishing.set()
        await publishing
        await asyncio.to_thread(server.wait, 15)
        return {
            "ready_after_signal": ready_after_signal,
            "events": events,
            "acked": acked,
            "reconnect_after_ms": reconnect_after_ms,
            "exit_seconds": time.monotonic() - signalled,
        }


async def test_status_values_and_feed_errors_are_conflated_for_a_lagging_client():
    """A client that lags behind a status feed gets only the newest value and the newest event of each code."""
    from actors.hub import Hub, Registry, StatusUpdate, TopicEvent
    from app.connection import Connection

    sent: list[str] = []
    flowing = asyncio.Event()

    async def send(frame: str) -> None:
        await flowing.wait()
        sent.append(frame)

    async def close(**_) -> None:
        pass

    registry = Registry()
    hub = Hub(registry, store=None, check_access=None)  # status traffic never touches either
    running = asyncio.create_task(hub.run())
    connection = Connection(send, close)
    connection.start()
    registry.connections.add(connection)
    connection.topics.add("status:agent_status")
    registry.subscribers["status:agent_status"].add(connection)
    for index in range(100):
        hub.cast(StatusUpdate("status:agent_status", "agent_status", {"value": index}))
        for code in ("RPC_FAILURE", "CIRCUIT_OPEN"):
            hub.cast(TopicEvent("status:agent_status", "error", {"code": code, "n": index}))
    await wait_until(lambda: hub.mailbox.empty(), 5, "the hub's backlog")
    flowing.set()
    await wait_until(lambda: len(sent) >= 3, 5, "the conflated frames")
    await asyncio.sleep(0.05)
    frames = [json.loads(frame)["event"] for frame in sent]
    # One early frame may have been in flight before the client stalled; the rest conflate.
    assert len(frames) <= 4
    newest = {(f["type"], f["data"].get("code")): f["data"] for f in frames}
    assert newest == {
        ("agent_status", None): {"value": 99},
        ("error", "RPC_FAILURE"): {"code": "RPC_FAILURE", "n": 99},
        ("error", "CIRCUIT_OPEN"): {"code": "CIRCUIT_OPEN", "n": 99},
    }
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    await connection.closed_by_peer()
