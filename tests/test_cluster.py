"""Two real hearth processes behind a real HAProxy: a crash and a drain as clients see them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from app.auth import hash_password
from app.log import get_logger
from app.services import (
    HAPROXY_TEMPLATE,
    LocalHaproxy,
    LocalHearth,
    LocalRedis,
    ServiceError,
    ensure_haproxy_installed,
    free_port,
    render_haproxy_config,
)
from app.store import Store
from tests.conftest import WsClient

log = get_logger("test_cluster")

ROOM = "lobby"
TOPIC = f"room:{ROOM}"
PASSWORD = "correct horse battery staple"
#: Checks twice a second: with ``fall 2`` an instance is out 0.5 to 1 s after it fails.
CHECK_INTERVAL = "500ms"
#: Settings of every instance: logins and publishes unthrottled (HAProxy makes every
#: client 127.0.0.1, and the session's Redis may hold other tests' counts), a quick stop.
INSTANCE_ENV = {
    "HEARTH_DB_PING_INTERVAL": "0.5",
    "HEARTH_LOGIN_RATE_PER_MIN": "10000",
    "HEARTH_LOGIN_USER_RATE_PER_MIN": "10000",
    "HEARTH_PUB_RATE": "1000",
    "HEARTH_PUB_BURST": "1000",
    "HEARTH_SHUTDOWN_TIMEOUT": "5",
}


@pytest.fixture(scope="module")
def haproxy_installed() -> None:
    """HAProxy is on this machine, installed with apt-get if need be, or the module skips."""
    try:
        ensure_haproxy_installed()
    except ServiceError as exc:
        pytest.skip(f"haproxy is missing and could not be installed: {exc}")


async def seed(dsn: str) -> None:
    """Migrate *dsn* and create the users alice and bob and the public room."""
    store = Store(dsn)
    await store.open()
    try:
        await store.migrate()
        password_hash = await asyncio.to_thread(hash_password, PASSWORD)
        for name in ("alice", "bob"):
            await store.create_user(name, password_hash, is_admin=False)
        await store.create_room(ROOM)
    finally:
        await store.close()


@dataclass
class Cluster:
    """hearth instances behind HAProxy, and an HTTP session to talk to both."""

    instances: list[LocalHearth]
    haproxy: LocalHaproxy
    session: aiohttp.ClientSession
    clients: list[WsClient] = field(default_factory=list)

    def server_name(self, instance: LocalHearth) -> str:
        """HAProxy's name for *instance* (``render_haproxy_config`` numbers them from 1)."""
        return f"hearth{self.instances.index(instance) + 1}"

    async def login(self, username: str) -> str:
        """A token for *username*, logged in through HAProxy."""
        async with self.session.post(
            f"{self.haproxy.url}/api/v1/auth/login",
            json={"username": username, "password": PASSWORD},
        ) as response:
            assert response.status == 200, await response.text()
            return (await response.json())["token"]

    async def connect(self, url: str, token: str) -> WsClient:
        """An authenticated WebSocket to *url* (HAProxy's, or an instance's own)."""
        client = WsClient(await self.session.ws_connect(f"{url}/ws"))
        self.clients.append(client)
        ctrl = await client.request("auth", token=token)
        assert ctrl["code"] == 200, ctrl
        return client

    async def hub_clients(self, instance: LocalHearth) -> int:
        """The WebSocket clients *instance* has, from its own ``/metrics``."""
        async with self.session.get(f"{instance.url}/metrics") as response:
            text = await response.text()
        for line in text.splitlines():
            if line.startswith("hearth_hub_clients "):
                return int(float(line.split()[1]))
        raise AssertionError("hearth_hub_clients missing from /metrics")

    async def placement(self, total: int) -> list[int]:
        """Each instance's WebSocket clients, in instance order, once they add up to *total*."""
        deadline = time.monotonic() + 5
        while sum(counts := [await self.hub_clients(i) for i in self.instances]) != total:
            assert time.monotonic() < deadline, f"clients {counts}, not {total} in all"
            await asyncio.sleep(0.02)
        return counts

    async def wait_for_clients(self, instance: LocalHearth, count: int) -> None:
        """Return once *instance* has *count* WebSocket clients (its hub counts them soon)."""
        deadline = time.monotonic() + 5
        while (clients := await self.hub_clients(instance)) != count:
            assert time.monotonic() < deadline, f"{clients} clients, not {count}"
            await asyncio.sleep(0.02)

    async def wait_until_down(self, instance: LocalHearth, timeout: float = 10.0) -> None:
        """Return once HAProxy's checks have marked *instance* DOWN."""
        name = self.server_name(instance)
        deadline = time.monotonic() + timeout
        while (await asyncio.to_thread(self.haproxy.server_states))[name] != "DOWN":
            assert time.monotonic() < deadline, f"HAProxy still routes to {name}"
            await asyncio.sleep(0.02)


@pytest.fixture
async def start_cluster(
    haproxy_installed, database: str, redis_server: LocalRedis, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[Cluster]]]:
    """Start 2 instances on one fresh database and the session Redis, behind HAProxy."""
    started: list[Cluster] = []

    async def start(**env: str) -> Cluster:
        await seed(database)
        shared = {
            **INSTANCE_ENV,
            "HEARTH_DATABASE_URL": database,
            "HEARTH_REDIS_URL": redis_server.url,
            **env,
        }
        instances = [LocalHearth(tmp_path / name, free_port(), shared) for name in ("a", "b")]
        haproxy = LocalHaproxy(
            tmp_path / "haproxy",
            free_port(),
            [instance.port for instance in instances],
            check_interval=CHECK_INTERVAL,
        )
        cluster = Cluster(instances, haproxy, aiohttp.ClientSession())
        started.append(cluster)
        for instance in instances:
            instance.spawn()
        for instance in instances:
            await asyncio.to_thread(instance.wait_ready)
        await asyncio.to_thread(haproxy.start)
        return cluster

    yield start
    for cluster in started:
        for client in cluster.clients:
            await client.ws.close()
        await cluster.session.close()
        await asyncio.to_thread(cluster.haproxy.stop)
        for instance in cluster.instances:
            await asyncio.to_thread(instance.stop)


class Subscriber:
    """A client of the room through HAProxy that, when dropped, reconnects and resumes.

    It records the seq of every data frame; after a drop it reconnects through HAProxy,
    sends ``auth`` and ``sub`` with ``since`` = the last seq it has, as the protocol's
    recovery recipe says.
    """

    def __init__(self, cluster: Cluster, token: str) -> None:
        self.cluster = cluster
        self.token = token
        #: Seqs of the data frames received, in arrival order, across connections.
        self.seqs: list[int] = []
        #: Connections lost so far.
        self.drops = 0
        #: Seconds from the last drop to a new connection's ``sub`` answered 200.
        self.reconnect_seconds: float | None = None
        self.client: WsClient | None = None

    @property
    def last_seq(self) -> int:
        """The highest seq received (0 before any)."""
        return self.seqs[-1] if self.seqs else 0

    async def connect(self) -> None:
        """Connect through HAProxy, authenticate and subscribe (with since after a drop)."""
        client = await self.cluster.connect(self.cluster.haproxy.url, self.token)
        since = {"since": self.last_seq} if self.drops else {}
        ctrl = await client.request("sub", topic=TOPIC, **since)
        assert ctrl["code"] == 200, ctrl
        self.client = client

    async def receive_until(self, seq: int, timeout: float = 20.0) -> None:
        """Record data frames until *seq* arrives, reconnecting whenever the socket drops."""
        deadline = time.monotonic() + timeout
        while self.last_seq < seq:
            assert self.client is not None
            remaining = deadline - time.monotonic()
            try:
                frame = await self.client.wait_for(lambda f: "data" in f, remaining)
            except ConnectionError:
                dropped_at = time.monotonic()
                self.drops += 1
                await self._reconnect(deadline)
                self.reconnect_seconds = time.monotonic() - dropped_at
                continue
            if frame["data"]["seq"] is not None:
                self.seqs.append(frame["data"]["seq"])

    async def _reconnect(self, deadline: float) -> None:
        while True:
            try:
                await self.connect()
                return
            except (aiohttp.ClientError, ConnectionError) as exc:
                # HAProxy has no instance to offer for a moment, or it died under us.
                if time.monotonic() > deadline:
                    raise AssertionError(f"no reconnect through HAProxy: {exc!r}") from exc
                await asyncio.sleep(0.1)


async def publish(client: WsClient, number: int) -> int:
    """Publish message *number* to the room and return its seq."""
    ctrl = await client.request(
        "pub", topic=TOPIC, content=f"message {number}", client_msg_id=f"m-{number}"
    )
    assert ctrl["code"] == 200, ctrl
    return ctrl["params"]["seq"]


def test_rendered_config_is_the_deploy_example():
    """The config HAProxy runs here is deploy/haproxy.cfg with only addresses, paths and
    the check interval changed, one server line per instance, each with its own sticky
    cookie value."""
    template = HAPROXY_TEMPLATE.read_text()
    rendered = render_haproxy_config(
        template, port=9000, server_ports=[9001, 9002], stats_socket=Path("/run/h.sock"),
        check_interval="500ms",
    )  # fmt: skip
    # Each line the renderer changes, and what it becomes (None: dropped).
    changed = {
        "    bind 127.0.0.1:8080": "    bind 127.0.0.1:9000",
        "    stats socket /run/haproxy/hearth.sock mode 600 level admin":
            "    stats socket /run/h.sock mode 600 level admin",
        "    default-server check inter 1s fall 2 rise 2 on-marked-down shutdown-sessions":
            "    default-server check inter 500ms fall 2 rise 2 on-marked-down shutdown-sessions",
        "    server hearth1 127.0.0.1:8081 cookie hearth1":
            "    server hearth1 127.0.0.1:9001 cookie hearth1\n"
            "    server hearth2 127.0.0.1:9002 cookie hearth2",
        "    server hearth2 127.0.0.1:8082 cookie hearth2": None,
        "    server hearth3 127.0.0.1:8083 cookie hearth3": None,
    }  # fmt: skip
    expected = [
        changed.get(line, line)
        for line in template.splitlines()
        if changed.get(line, "") is not None
    ]
    assert rendered == "\n".join(expected) + "\n"
    with pytest.raises(ServiceError, match="server"):
        render_haproxy_config(
            "bind :1\nstats socket /s\n", port=1, server_ports=[2], stats_socket=Path("/s")
        )


def told_to_leave(event: dict) -> bool:
    """Whether *event* (an event frame's body) is the SERVER_SHUTDOWN goodbye."""
    return event.get("type") == "error" and event.get("data", {}).get("code") == "SERVER_SHUTDOWN"


async def test_sigkilled_instance_clients_resume_on_the_survivor(start_cluster):
    """A SIGKILLed instance's clients reconnect through HAProxy and, with since, get every
    message published on the survivor meanwhile, with no gap and no duplicate."""
    cluster = await start_cluster()
    doomed, survivor = cluster.instances
    alice, bob = await cluster.login("alice"), await cluster.login("bob")
    # leastconn spreads them; the instances' own metrics tell where each one landed.
    on_doomed: list[Subscriber] = []
    for connected in range(1, 5):
        before = await cluster.hub_clients(doomed)
        subscriber = Subscriber(cluster, alice)
        await subscriber.connect()
        if (await cluster.placement(connected))[0] > before:
            on_doomed.append(subscriber)
    assert 1 <= len(on_doomed) <= 3, f"leastconn put {len(on_doomed)} of 4 on one instance"
    publisher = await cluster.connect(doomed.url, bob)
    assert [await publish(publisher, number) for number in range(1, 6)] == [1, 2, 3, 4, 5]
    await asyncio.gather(*(subscriber.receive_until(5) for subscriber in on_doomed))

    assert doomed.process is not None
    killed_at = time.monotonic()
    doomed.process.kill()
    await asyncio.to_thread(doomed.process.wait)

    # The dropped clients have not noticed yet: these they can only get with since.
    survivor_publisher = await cluster.connect(survivor.url, bob)
    published = [await publish(survivor_publisher, number) for number in range(6, 11)]

    async def publish_while_they_reconnect() -> None:
        for number in range(11, 16):
            published.append(await publish(survivor_publisher, number))
            await asyncio.sleep(0.02)

    async def marked_down() -> float:
        await cluster.wait_until_down(doomed)
        return time.monotonic() - killed_at

    _, down_seconds, *_ = await asyncio.gather(
        publish_while_they_reconnect(),
        marked_down(),
        *(subscriber.receive_until(15) for subscriber in on_doomed),
    )
    reconnects = [subscriber.reconnect_seconds for subscriber in on_doomed]
    log.bind(
        down_seconds=round(down_seconds, 3),
        reconnect_seconds=[round(seconds or 0, 3) for seconds in reconnects],
    ).info("SIGKILL: HAProxy marked the instance down; its clients came back")
    assert published == list(range(6, 16))
    for subscriber in on_doomed:
        assert subscriber.drops == 1
        assert subscriber.seqs == list(range(1, 16)), subscriber.seqs
        assert subscriber.reconnect_seconds is not None and subscriber.reconnect_seconds < 5
    # fall 2 checks every 0.5 s: out after 0.5 to 1 s, plus a check's own time.
    assert down_seconds < 3
    assert await asyncio.to_thread(cluster.haproxy.server_states) == {
        cluster.server_name(doomed): "DOWN",
        cluster.server_name(survivor): "UP",
    }
    # Every new request through HAProxy succeeds; only the survivor is there to answer it.
    for _ in range(20):
        async with cluster.session.get(f"{cluster.haproxy.url}/health/ready") as response:
            assert response.status == 200
    # The 4 subscribers (those that moved included) and the survivor's publisher.
    await cluster.wait_for_clients(survivor, 5)


async def test_sigterm_turns_not_ready_before_closing_websockets(start_cluster):
    """A SIGTERMed instance answers readiness 503 while its WebSockets are still open,
    HAProxy sends new clients to the other instance, and only then are they told to go."""
    cluster = await start_cluster(HEARTH_DRAIN_GRACE="2")
    draining, other = cluster.instances
    alice = await cluster.login("alice")
    existing = await cluster.connect(draining.url, alice)
    assert (await existing.request("sub", topic=TOPIC))["code"] == 200

    assert draining.process is not None
    terminated_at = time.monotonic()
    draining.process.terminate()
    while True:
        async with cluster.session.get(f"{draining.url}/health/ready") as response:
            if response.status == 503:
                not_ready_at = time.monotonic()
                assert "draining" in (await response.json())["reasons"]
                break
            assert response.status == 200
    await existing.settle(0.05)
    assert not existing.ws.closed
    assert not existing.take("event", told_to_leave), "told to leave before readiness turned 503"

    await cluster.wait_until_down(draining)
    down_seconds = time.monotonic() - terminated_at
    newcomers = [await cluster.connect(cluster.haproxy.url, alice) for _ in range(3)]
    await cluster.wait_for_clients(other, len(newcomers))
    # Still serving the client it had, and nobody new.
    assert await cluster.hub_clients(draining) == 1
    assert not existing.ws.closed

    goodbye = await existing.wait_for(lambda frame: told_to_leave(frame.get("event", {})), 10)
    goodbye_at = time.monotonic()
    assert goodbye["event"]["data"]["reconnect_after_ms"] >= 500
    with pytest.raises(ConnectionError):
        await existing.wait_for(lambda frame: False, timeout=5)
    assert existing.ws.close_code == 1001
    log.bind(
        not_ready_seconds=round(not_ready_at - terminated_at, 3),
        down_seconds=round(down_seconds, 3),
        goodbye_seconds=round(goodbye_at - terminated_at, 3),
    ).info("SIGTERM: not ready, out of HAProxy, then goodbye")
    assert not_ready_at - terminated_at < 1
    assert down_seconds < goodbye_at - terminated_at
    # HEARTH_DRAIN_GRACE is 2 s; a little slack for timers.
    assert goodbye_at - not_ready_at > 1.5
    assert await asyncio.to_thread(draining.process.wait, 10) == 0
