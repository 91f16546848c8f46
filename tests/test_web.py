"""The assembled app: probes, metrics, degradation while PostgreSQL is down, dead peers."""

from __future__ import annotations

import asyncio
import time

from app import keys
from tests.conftest import StalledReader, wait_until


def event_type(frame: dict) -> str | None:
    """The type of an event frame, None for other frames."""
    return frame.get("event", {}).get("type")


async def test_live_and_ready_probes(make_hearth):
    """Liveness answers 200 and readiness 200 once every actor runs."""
    hearth = await make_hearth()
    async with hearth.session.get(f"{hearth.url}health/live") as response:
        assert response.status == 200 and (await response.json())["status"] == "alive"
    async with hearth.session.get(f"{hearth.url}health/ready") as response:
        body = await response.json()
        assert response.status == 200, body
        assert body["status"] == "ready" and body["reasons"] == []
        assert body["checks"] == {
            "database": "connected",
            "redis": "disabled",
            "maintenance": False,
        }


async def test_failed_actor_makes_readiness_503_and_the_process_lives_on(make_hearth):
    """An actor past its restart intensity turns readiness 503 naming it; HTTP keeps serving."""
    hearth = await make_hearth(
        HEARTH_RESTART_INTENSITY="1", HEARTH_RESTART_INITIAL="0.01", HEARTH_RESTART_MAX="0.5"
    )
    hub = hearth.app[keys.SUPERVISOR].get("hub")

    class Poison:
        """A message the hub has no handler for."""

    deadline = time.monotonic() + 10
    while hub.status()["state"] != "failed":
        assert time.monotonic() < deadline, hub.status()
        if hub.status()["state"] == "running":
            hub.cast(Poison())
        await asyncio.sleep(0.02)
    async with hearth.session.get(f"{hearth.url}health/ready") as response:
        body = await response.json()
        assert response.status == 503
        assert "hub:failed" in body["reasons"]
    async with hearth.session.get(f"{hearth.url}health/live") as response:
        assert response.status == 200


async def test_metrics_expose_hub_counters(make_hearth):
    """/metrics, served by the main app, exports the hub's client and error counters."""
    hearth = await make_hearth()
    client = await hearth.connect("alice")
    await client.request("sub", topic="room:nowhere")
    async with hearth.session.get(f"{hearth.url}metrics") as response:
        text = await response.text()
    assert response.status == 200
    for name in (
        "hearth_hub_clients",
        "hearth_hub_errors_total",
        "hearth_slow_client_drops_total",
        "hearth_ws_read_errors_total",
        "hearth_ws_write_errors_total",
        "hearth_db_query_seconds",
    ):
        assert name in text, name
    assert 'hearth_hub_errors_total{code="NOT_FOUND"}' in text


async def test_database_loss_is_announced_and_heartbeats_continue(make_hearth, own_postgres):
    """Losing PostgreSQL sends `degraded` to clients, heartbeats keep coming, publishes spool as 202, and recovery is announced."""
    hearth = await make_hearth(
        dsn=own_postgres.dsn,
        HEARTH_HEARTBEAT_INTERVAL="0.2",
        HEARTH_DB_TIMEOUT="1",
        HEARTH_DB_PING_INTERVAL="0.1",
    )
    watcher = await hearth.connect("bob")
    publisher = await hearth.connect("alice")
    await watcher.request("sub", topic="room:lobby")
    await asyncio.to_thread(own_postgres.stop, "fast")
    lost = await watcher.wait_for(lambda f: event_type(f) == "degraded", timeout=15)
    assert lost["event"]["data"] == {"component": "database", "state": "disconnected"}
    for _ in range(2):
        await watcher.wait_for(lambda f: event_type(f) == "heartbeat", timeout=5)
    ctrl = await publisher.request(
        "pub", topic="room:lobby", content="while down", client_msg_id="d1"
    )
    assert ctrl["code"] == 202 and ctrl["params"]["queued"] is True
    [announced] = await watcher.data(1)
    assert announced["seq"] is None and announced["id"] == ctrl["params"]["id"]
    await asyncio.to_thread(own_postgres.start)
    back = await watcher.wait_for(
        lambda f: event_type(f) == "degraded" and f["event"]["data"]["state"] == "connected",
        timeout=30,
    )
    assert back["event"]["data"]["component"] == "database"
    [stored] = await watcher.data(1, timeout=15)
    assert stored["id"] == ctrl["params"]["id"] and stored["seq"] == 1
    assert not watcher.ws.closed and not publisher.ws.closed


async def test_peer_that_never_answers_pings_is_closed(make_hearth):
    """A client that stops answering WebSocket pings is closed by the server."""
    hearth = await make_hearth(HEARTH_WS_PING_INTERVAL="0.2", HEARTH_AUTH_TIMEOUT="30")
    silent = await asyncio.to_thread(StalledReader, hearth.server.port)
    await asyncio.to_thread(silent.send, {"op": "auth", "id": "a", "token": hearth.tokens["carol"]})
    registry = hearth.app[keys.REGISTRY]
    await wait_until(lambda: registry.connections, 10, "the silent client's registration")
    assert await asyncio.to_thread(silent.closed_by_server, 5)
    await wait_until(lambda: not registry.connections, 5, "the dead peer's removal")
    silent.sock.close()


async def test_a_hung_database_shows_in_readiness_within_2_s_while_liveness_stays_200(
    make_hearth, own_postgres
):
    """With PostgreSQL SIGSTOPped, every probe answers within 1 s; readiness reports the database unresponsive within 2 s and stays 200 (publishes spool); liveness stays 200; after SIGCONT it is connected again."""
    from tests.conftest import hung

    hearth = await make_hearth(own_postgres.create_database("hung_probe"))

    async def probe(path: str) -> tuple[int, dict, float]:
        started = time.monotonic()
        async with hearth.session.get(f"{hearth.url}{path}") as response:
            return response.status, await response.json(), time.monotonic() - started

    with hung(own_postgres):
        stopped = time.monotonic()
        seen = None
        while time.monotonic() - stopped < 4:
            status, body, took = await probe("health/ready")
            assert took < 1.0 and status == 200, (took, body)
            live_status, _, live_took = await probe("health/live")
            assert live_status == 200 and live_took < 1.0
            if body["checks"]["database"] != "connected":
                seen = time.monotonic() - stopped
                break
            await asyncio.sleep(0.2)
        assert seen is not None and seen < 2.0, seen
        assert body["checks"]["database"] in ("unresponsive", "disconnected"), body
    deadline = time.monotonic() + 15
    while (await probe("health/ready"))[1]["checks"]["database"] != "connected":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)


async def test_liveness_turns_503_while_the_event_loop_lags_and_back_to_200(make_hearth):
    """A loop blocked for 2.5 s is seen by the lag probe: liveness answers 503 naming it, then 200 once the block is out of the 5 s window."""
    hearth = await make_hearth()
    await asyncio.sleep(0.5)  # a first lag measurement
    asyncio.get_running_loop().call_soon(time.sleep, 2.5)  # blocks the loop for real
    await asyncio.sleep(0.1)
    async with hearth.session.get(f"{hearth.url}health/live") as response:
        body = await response.json()
        assert response.status == 503 and body["reasons"] == ["event_loop_lag"], body
    deadline = time.monotonic() + 8
    while True:
        async with hearth.session.get(f"{hearth.url}health/live") as response:
            if response.status == 200:
                break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)


async def test_database_probe_and_the_admin_health_view_follow_the_database(
    make_hearth, own_postgres
):
    """/health/db has seed 002's shape, 200 connected and 503 with PostgreSQL stopped; /health is 401 without a token, 403 for a user, and for an admin lists every dependency and actor, degraded while the database is down."""
    hearth = await make_hearth(own_postgres.create_database("health_views"))

    async def get(path: str, user: str | None = None) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {hearth.tokens[user]}"} if user else {}
        async with hearth.session.get(f"{hearth.url}{path}", headers=headers) as response:
            return response.status, await response.json()

    status, body = await get("health/db")
    assert status == 200 and body["healthy"] is True, body
    assert set(body["database"]) == {"connected", "latencyMs", "poolSize", "availableConnections"}
    assert body["database"]["poolSize"] >= 1 and body["timestamp"].endswith("Z")
    assert (await get("health"))[0] == 401
    assert (await get("health", "alice"))[0] == 403
    await get("health", "root")  # root's token is checked now, for the outage below
    status, body = await get("health", "root")
    assert status == 200 and body["status"] == "healthy", body
    assert body["checks"]["database"]["status"] == "up"
    assert body["checks"]["redis"]["status"] == "disabled"
    assert body["checks"]["disk"]["status"] in ("up", "low")
    assert {a["name"] for a in body["actors"]} >= {"db_monitor", "hub", "events", "heartbeat"}
    assert body["version"] and body["connections"] >= 0
    await asyncio.to_thread(own_postgres.stop, "fast")
    try:
        deadline = time.monotonic() + 15
        while (await get("health/db"))[0] != 503:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.3)
        status, body = await get("health", "root")
        assert status == 200 and body["status"] == "degraded", body
        assert body["checks"]["database"]["status"] != "up"
    finally:
        await asyncio.to_thread(own_postgres.start)
