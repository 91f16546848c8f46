"""The admin diagnostics API and operator actions, against a real hearth on real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import keys
from app.demo_upstream import create_demo_app
from app.diagnostics import Sampler
from app.vitals import Vitals
from tests.conftest import hung, wait_until

ROOT = Path(__file__).resolve().parent.parent

#: Every admin-only endpoint: method, path, JSON body.
ADMIN_ENDPOINTS = [
    ("GET", "health", None),
    ("GET", "api/v1/diagnostics", None),
    ("GET", "api/v1/diagnostics/actors", None),
    ("GET", "api/v1/diagnostics/database", None),
    ("GET", "api/v1/diagnostics/errors?timeRange=1h", None),
    ("POST", "api/v1/diagnostics/test", {"operation": "read"}),
    ("POST", "api/v1/diagnostics/actors/heartbeat/restart", None),
    ("POST", "api/v1/diagnostics/breakers/agent_status/reset", None),
    ("POST", "api/v1/diagnostics/maintenance", {"on": False}),
]

#: One JSON-RPC feed on the demo upstream, polled fast.
AGENT = {"name": "agent_status", "kind": "jsonrpc", "method": "agent_status", "interval": 0.3}
FAST_BREAKER = {"HEARTH_BREAKER_OPEN_SECONDS": "30", "HEARTH_BREAKER_PROBE_SECONDS": "30"}


async def call(hearth, method: str, path: str, body=None, user: str | None = "root", token=None):
    """Send one request as *user* (or with *token*); return (status, JSON body)."""
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    elif user is not None:
        headers["Authorization"] = f"Bearer {hearth.tokens[user]}"
    async with hearth.session.request(
        method, f"{hearth.url}{path}", json=body, headers=headers
    ) as response:
        return response.status, await response.json()


@pytest.fixture
async def upstream(aiohttp_server):
    """The demo upstream on a real loopback socket, with its /control endpoint."""
    server = await aiohttp_server(create_demo_app(seed=7))
    url = str(server.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as session:

        async def control(mode: str) -> None:
            async with session.post(f"{url}/control", json={"mode": mode}) as response:
                assert response.status == 200

        control.url = url  # type: ignore[attr-defined]
        yield control
        await control("ok")


async def test_every_admin_endpoint_refuses_strangers_and_users(make_hearth, upstream):
    """Each admin endpoint answers 401 with no token or a bad one, 403 to a non-admin (all as ctrl JSON with a trace id), and succeeds for an admin."""
    hearth = await make_hearth(
        HEARTH_EVENT_SOURCES=json.dumps([{**AGENT, "url": upstream.url + "/rpc"}])
    )
    for method, path, body in ADMIN_ENDPOINTS:
        for who, expected in ((None, 401), ("bad", 401), ("alice", 403)):
            token = "not-a-token" if who == "bad" else None
            status, reply = await call(hearth, method, path, body, user=who, token=token)
            assert status == expected, (method, path, who, reply)
            params = reply["ctrl"]["params"]
            assert reply["ctrl"]["code"] == expected and params["trace_id"], reply
        status, reply = await call(hearth, method, path, body)
        assert 200 <= status < 300, (method, path, reply)


async def test_restarting_an_actor_is_a_restart_not_a_crash(make_hearth):
    """POST restart cancels the actor's incarnation and starts a new one at once: restarts goes up by one, it runs again, no error is recorded, and an unknown actor is 404."""
    hearth = await make_hearth()
    heartbeat = hearth.app[keys.SUPERVISOR].get("heartbeat")
    before = heartbeat.restarts
    status, reply = await call(hearth, "POST", "api/v1/diagnostics/actors/heartbeat/restart")
    assert status == 202 and reply == {"restarting": "heartbeat"}
    await wait_until(
        lambda: heartbeat.restarts == before + 1 and heartbeat.state == "running", 5, "restart"
    )
    status, reply = await call(hearth, "GET", "api/v1/diagnostics/actors")
    (listed,) = [actor for actor in reply["actors"] if actor["name"] == "heartbeat"]
    assert listed["restarts"] == before + 1 and listed["last_error"] is None
    assert listed["state"] == "running"
    status, reply = await call(hearth, "POST", "api/v1/diagnostics/actors/nobody/restart")
    assert status == 404 and reply["ctrl"]["params"]["error"] == "NOT_FOUND"


async def test_resetting_an_open_breaker_lets_the_next_call_through(make_hearth, upstream):
    """With the upstream failing, the breaker opens; after the upstream recovers, a reset closes it at once (no 30 s wait) and fresh data follows; a feed without a breaker is 404."""
    hearth = await make_hearth(
        HEARTH_EVENT_SOURCES=json.dumps([{**AGENT, "url": upstream.url + "/rpc"}]), **FAST_BREAKER
    )
    events = hearth.app[keys.SUPERVISOR].get("events")

    def breaker_state() -> str:
        return events.status()["feeds"]["agent_status"]["breaker"]["state"]

    await upstream("fail")
    await wait_until(lambda: breaker_state() == "open", 10, "the breaker to open")
    await upstream("ok")
    await asyncio.sleep(0.5)
    assert breaker_state() == "open"  # the open period is 30 s: nothing but the reset closes it
    status, reply = await call(hearth, "POST", "api/v1/diagnostics/breakers/agent_status/reset")
    assert status == 200 and reply == {"reset": "agent_status"}
    await wait_until(
        lambda: (
            breaker_state() == "closed" and not events.status()["feeds"]["agent_status"]["is_stale"]
        ),
        5,
        "fresh data after the reset",
    )
    status, reply = await call(hearth, "POST", "api/v1/diagnostics/breakers/system/reset")
    assert status == 404


async def test_maintenance_turns_readiness_503_and_survives_a_restart(make_hearth, tmp_path):
    """Maintenance on (API) makes readiness 503 with reason maintenance and /health say so; it holds for a new process on the same spool folder; the CLI turns it off and readiness is 200 again without a restart."""
    hearth = await make_hearth()
    status, reply = await call(
        hearth, "POST", "api/v1/diagnostics/maintenance", {"on": True, "reason": "disk swap"}
    )
    assert status == 200 and reply["maintenance"]["by"] == "root"
    assert reply["maintenance"]["reason"] == "disk swap"
    status, ready = await call(hearth, "GET", "health/ready", user=None)
    assert status == 503 and ready["reasons"] == ["maintenance"], ready
    status, health = await call(hearth, "GET", "health")
    assert health["status"] == "maintenance"
    again = await make_hearth()  # a restart: the same spool folder
    status, ready = await call(again, "GET", "health/ready", user=None)
    assert status == 503 and "maintenance" in ready["reasons"]
    settings = hearth.app[keys.SETTINGS]
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "app", "maintenance", "off"],
        env={"HEARTH_SPOOL_DIR": settings.spool_dir, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "maintenance off" in result.stdout, result.stderr
    for instance in (hearth, again):
        status, ready = await call(instance, "GET", "health/ready", user=None)
        assert status == 200, ready
    status, reply = await call(hearth, "POST", "api/v1/diagnostics/maintenance", {"on": "yes"})
    assert status == 400
    assert reply["ctrl"]["params"]["details"] == [
        {"field": "on", "reason": "must be true or false"}
    ]


async def test_database_test_operations_report_success_and_a_hang_within_the_deadline(
    make_hearth, own_postgres
):
    """read, write and transaction succeed with their duration; while PostgreSQL hangs, each answers 200 {success: false, error: DATABASE_TIMEOUT} within the store's deadline, never a 500."""
    hearth = await make_hearth(
        own_postgres.create_database("diagnostic_test"), HEARTH_DB_TIMEOUT="1.5"
    )
    for operation in ("read", "write", "transaction"):
        status, reply = await call(
            hearth, "POST", "api/v1/diagnostics/test", {"operation": operation}
        )
        assert status == 200 and reply["success"] is True and reply["error"] is None, reply
        assert 0 < reply["durationMs"] < 1500
    status, reply = await call(hearth, "POST", "api/v1/diagnostics/test", {"operation": "drop"})
    assert status == 400 and reply["ctrl"]["params"]["details"][0]["field"] == "operation"
    await call(hearth, "GET", "api/v1/diagnostics/actors")  # the admin token, checked now
    with hung(own_postgres):
        started = time.monotonic()
        status, reply = await call(
            hearth, "POST", "api/v1/diagnostics/test", {"operation": "write"}
        )
        took = time.monotonic() - started
        assert status == 200 and reply["success"] is False, reply
        assert reply["error"] in ("DATABASE_TIMEOUT", "DATABASE_ERROR") and took < 3.0, took
        started = time.monotonic()
        status, reply = await call(hearth, "GET", "api/v1/diagnostics/database")
        assert status == 200 and reply["tables"] is None and reply["tablesError"], reply
        assert reply["connection"]["state"] in ("connected", "unresponsive", "disconnected")
        assert time.monotonic() - started < 3.0


async def test_database_diagnostics_describe_the_tables(make_hearth):
    """The database view lists the schema's tables with row estimates, sizes and indexes."""
    hearth = await make_hearth()
    status, reply = await call(hearth, "GET", "api/v1/diagnostics/database")
    assert status == 200 and reply["tablesError"] is None, reply
    tables = {table["name"]: table for table in reply["tables"]}
    assert {"messages", "rooms", "users", "error_events"} <= set(tables)
    assert tables["messages"]["sizeBytes"] > 0 and tables["messages"]["indexes"]
    assert reply["connection"]["state"] == "connected"
    assert reply["serverVersion"] and reply["serverConnections"] >= 1


async def test_error_statistics_count_what_clients_were_answered(make_hearth):
    """Errors answered over HTTP show in ErrorStatistics by category, device and endpoint, and a bad timeRange is a 400 naming the field."""
    hearth = await make_hearth()
    phone = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Mobile/15E148 Safari/604.1"
    for _ in range(3):
        async with hearth.session.get(
            f"{hearth.url}api/v1/rooms", headers={"User-Agent": phone}
        ) as response:
            assert response.status == 401
    status, stats = await call(hearth, "GET", "api/v1/diagnostics/errors?timeRange=24h")
    assert status == 200
    assert stats["totalErrors"] >= 3 and stats["errorsByCategory"]["auth"] >= 3, stats
    assert stats["errorsByDevice"]["mobile"] >= 3
    assert stats["errorsByEndpoint"]["/api/v1/rooms"] >= 3
    assert {"message", "count"} <= set(stats["topErrors"][0])
    status, reply = await call(hearth, "GET", "api/v1/diagnostics/errors?timeRange=2w")
    assert status == 400 and reply["ctrl"]["params"]["details"][0]["field"] == "timeRange"


#: Families /metrics must carry (issue 12, item 3).
REQUIRED_FAMILIES = {
    "hearth_connections", "hearth_connections_limit", "hearth_publishes", "hearth_messages_out",
    "hearth_deliveries", "hearth_fanout_seconds", "hearth_slow_client_drops",
    "hearth_ws_read_errors", "hearth_ws_write_errors", "hearth_actor_mailbox_depth",
    "hearth_actor_restarts", "hearth_actor_state", "hearth_breaker_state", "hearth_db_state",
    "hearth_db_ping_seconds", "hearth_db_pool_connections", "hearth_redis_state",
    "hearth_redis_canary_age_seconds", "hearth_spool_depth", "hearth_spool_dead_letters",
    "hearth_errors", "hearth_http_requests", "hearth_http_request_duration_seconds",
    "hearth_requests", "hearth_alerts_firing",
}  # fmt: skip


async def test_metrics_parse_and_carry_every_listed_family(make_hearth, upstream):
    """/metrics parses with prometheus_client's parser and has every family issue 12 lists, with a mailbox depth per actor and a breaker state per source."""
    hearth = await make_hearth(
        HEARTH_EVENT_SOURCES=json.dumps([{**AGENT, "url": upstream.url + "/rpc"}])
    )
    client = await hearth.connect("alice")
    await client.request("sub", topic="room:lobby")
    reply = await client.request("pub", topic="room:lobby", content="hi", client_msg_id="m1")
    assert reply["code"] == 200, reply
    await call(hearth, "GET", "api/v1/rooms")
    async with hearth.session.get(f"{hearth.url}metrics") as response:
        assert response.status == 200
        text = await response.text()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert REQUIRED_FAMILIES <= set(families), REQUIRED_FAMILIES - set(families)
    actors = {s.labels["actor"] for s in families["hearth_actor_mailbox_depth"].samples}
    assert actors == {status["name"] for status in hearth.app[keys.SUPERVISOR].statuses()}
    sources = {s.labels["source"] for s in families["hearth_breaker_state"].samples}
    assert sources == {"agent_status"}
    fanout = [s for s in families["hearth_fanout_seconds"].samples if s.name.endswith("_count")]
    assert fanout[0].value >= 1
    routes = {s.labels["route"] for s in families["hearth_http_requests"].samples}
    assert "/api/v1/rooms" in routes
    exported = set(families) | {f"{name}_total" for name in families}
    shipped = (ROOT / "deploy" / "alerts.yml").read_text() + (
        ROOT / "deploy" / "grafana-dashboard.json"
    ).read_text()
    named = {
        re.sub(r"_(bucket|count|sum)$", "", name) for name in re.findall(r"hearth_\w+", shipped)
    }
    assert named <= exported, named - exported


async def test_sampler_keeps_rates_and_raises_the_dead_letter_alert(make_hearth):
    """After traffic the sampler's rate points show it; a real dead letter in the spool fires the dead_letters alert in the snapshot, in /metrics and in the log."""
    hearth = await make_hearth()
    vitals = hearth.app[keys.VITALS]
    client = await hearth.connect("alice")
    await client.request("sub", topic="room:lobby")
    for index in range(5):
        reply = await client.request(
            "pub", topic="room:lobby", content=f"m{index}", client_msg_id=f"m{index}"
        )
        assert reply["code"] == 200, reply
    await wait_until(
        lambda: any(point.messages_in > 0 and point.deliveries > 0 for point in vitals.rates),
        5,
        "a rate point with traffic",
    )
    spool = hearth.app[keys.SPOOL]
    entry = await spool.append({"id": "dead-1", "room": "lobby", "sender": "x", "content": "?"})
    await spool.dead_letter(entry, "test")
    await wait_until(
        lambda: any(alert.name == "dead_letters" for alert in vitals.alerts), 5, "the alert"
    )
    status, snapshot = await call(hearth, "GET", "api/v1/diagnostics")
    assert status == 200
    assert [a["name"] for a in snapshot["alerts"]] == ["dead_letters"], snapshot["alerts"]
    assert snapshot["spool"]["dead_letters"] == 1
    async with hearth.session.get(f"{hearth.url}metrics") as response:
        text = await response.text()
    firing = [
        sample
        for family in text_string_to_metric_families(text)
        if family.name == "hearth_alerts_firing"
        for sample in family.samples
    ]
    assert [(s.labels["alert"], s.value) for s in firing] == [("dead_letters", 1.0)]


async def test_draining_turns_readiness_503_while_liveness_stays_200(make_hearth):
    """Once draining starts, readiness answers 503 naming it, liveness stays 200, and the admin view says unhealthy."""
    from app.web import drain

    hearth = await make_hearth()
    await call(hearth, "GET", "health")  # the admin token, checked before the drain
    await drain(hearth.app)
    status, ready = await call(hearth, "GET", "health/ready", user=None)
    assert status == 503 and ready["reasons"] == ["draining"], ready
    status, live = await call(hearth, "GET", "health/live", user=None)
    assert status == 200 and live["status"] == "alive"
    status, health = await call(hearth, "GET", "health")
    assert status == 200 and health["status"] == "unhealthy"


async def test_crashes_make_a_restart_loop_alert_and_operator_restarts_do_not(make_hearth):
    """Three operator restarts of an actor raise no alert; three crashes within five minutes raise actor_restart_loop naming it."""
    hearth = await make_hearth(HEARTH_RESTART_INITIAL="0.01", HEARTH_RESTART_MAX="0.05")
    sampler = Sampler(hearth.app, vitals=Vitals())  # its own history, apart from the app's
    heartbeat = hearth.app[keys.SUPERVISOR].get("heartbeat")
    sampler.sample()
    for count in range(1, 4):
        await call(hearth, "POST", "api/v1/diagnostics/actors/heartbeat/restart")
        await wait_until(lambda n=count: heartbeat.restarts == n and heartbeat.ready.is_set(), 5)
    sampler.sample()
    assert sampler.alerts == ()

    class Poison:
        """A message the heartbeat has no handler for: it crashes."""

    for count in range(4, 7):
        heartbeat.cast(Poison())
        await wait_until(lambda n=count: heartbeat.restarts == n and heartbeat.ready.is_set(), 5)
    sampler.sample()
    [alert] = sampler.alerts
    assert alert.name == "actor_restart_loop" and "heartbeat" in alert.summary


async def test_a_statement_slower_than_5_s_raises_the_slow_query_alert(make_hearth):
    """A real 5.2 s statement is counted in hearth_db_slow_statements_total and the next sample fires slow_query; quick ones never do."""
    hearth = await make_hearth(HEARTH_DB_TIMEOUT="8")
    sampler = Sampler(hearth.app, vitals=Vitals())  # its own history, apart from the app's
    store = hearth.app[keys.STORE]

    async def sleep_in_postgres(cursor) -> None:
        await cursor.execute("select", "-", "SELECT pg_sleep(5.2)")

    sampler.sample()
    assert "slow_query" not in {alert.name for alert in sampler.alerts}
    await store.run(sleep_in_postgres, name="test_slow")
    sampler.sample()
    [alert] = [alert for alert in sampler.alerts if alert.name == "slow_query"]
    assert alert.severity == "warning"
