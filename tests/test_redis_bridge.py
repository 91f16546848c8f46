"""The Redis bridge with a real Redis and two real instances on one PostgreSQL database."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time

import pytest

from app import keys
from app.services import _read_pid
from tests.conftest import hung, start_hearth, wait_until
from tests.test_room_writer import UNLIMITED


@pytest.fixture
async def instances(database, own_redis, tmp_path):
    """Start instances of hearth sharing *database* and the test's Redis."""
    started = []

    async def start(count: int = 2, **env: str):
        made = []
        for _ in range(count):
            name = f"instance{len(started)}"
            hearth = await start_hearth(
                database, tmp_path / name / "spool", HEARTH_REDIS_URL=own_redis.url, **env
            )
            started.append(hearth)
            made.append(hearth)
        for hearth in made:
            await wait_until(lambda h=hearth: bridge_state(h) == "connected", 10, "bridge up")
        return made

    yield start
    for hearth in started:
        await hearth.close()


def bridge(hearth):
    return hearth.app[keys.SUPERVISOR].get("redis_bridge")


def bridge_state(hearth) -> str:
    return bridge(hearth).status()["bridge_state"]


class Follower:
    """A subscriber that behaves like the SDK: on ``resync`` it subscribes again with since.

    It owns its socket's reads; *seqs* are the room's seqs it received, in order.
    """

    def __init__(self, client, room: str = "lobby") -> None:
        self.client = client
        self.topic = f"room:{room}"
        self.seqs: list[int] = []
        self.events: list[dict] = []
        self.ids = (f"f{n}" for n in itertools.count())
        self.task = asyncio.create_task(self._read())

    async def start(self) -> None:
        await self.client.send(op="sub", id=next(self.ids), topic=self.topic)

    async def _read(self) -> None:
        ws = self.client.ws
        async for message in ws:
            frame = json.loads(message.data)
            data = frame.get("data")
            if data is not None and data["topic"] == self.topic and data["seq"] is not None:
                if not self.seqs or data["seq"] > self.seqs[-1]:
                    self.seqs.append(data["seq"])
                else:  # a repeat or a step back: kept, so the test sees it
                    self.seqs.append(data["seq"])
            event = frame.get("event")
            if event is not None:
                self.events.append(event)
                if event["type"] == "resync" and self.topic in event["data"]["topics"]:
                    since = self.seqs[-1] if self.seqs else 0
                    await ws.send_str(json.dumps({
                        "op": "sub", "id": next(self.ids), "topic": self.topic, "since": since,
                    }))  # fmt: skip

    def events_of(self, kind: str) -> list[dict]:
        return [e["data"] for e in self.events if e["type"] == kind]

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


class Publisher:
    """Publishes numbered messages on its own connection and keeps the acknowledged seqs."""

    def __init__(self, client, name: str, room: str = "lobby") -> None:
        self.client = client
        self.name = name
        self.topic = f"room:{room}"
        self.acked: list[int] = []
        self.failures: list[dict] = []

    async def publish(self, count: int, rate: float) -> None:
        for n in range(count):
            ctrl = await self.client.request(
                "pub", topic=self.topic, content=f"{self.name} {n}",
                client_msg_id=f"{self.name}-{n}", timeout=15,
            )  # fmt: skip
            if ctrl["code"] == 200:
                self.acked.append(ctrl["params"]["seq"])
            else:
                self.failures.append(ctrl)
            await asyncio.sleep(1 / rate)


async def followers_on(hearths, per_instance: int = 2) -> list[Follower]:
    made = []
    for hearth in hearths:
        for _ in range(per_instance):
            follower = Follower(await hearth.connect("bob"))
            await follower.start()
            made.append(follower)
    await asyncio.sleep(0.3)  # subscribed before anything is published
    return made


async def assert_every_acked_message_once_in_order(followers, publishers, timeout: float):
    acked = sorted(seq for p in publishers for seq in p.acked)
    assert acked == list(range(1, len(acked) + 1)), "acks must be the room's gap-free seqs"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(set(acked) <= set(f.seqs) for f in followers):
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)  # late duplicates would show now
    for index, follower in enumerate(followers):
        missing = sorted(set(acked) - set(follower.seqs))
        assert not missing, f"follower {index} misses {missing[:20]}"
        assert follower.seqs == sorted(set(follower.seqs)), (
            f"follower {index} got a seq twice or out of order: {follower.seqs}"
        )


async def test_a_message_stored_on_one_instance_reaches_the_others_once_in_order(instances):
    """60 publishes on A reach a subscriber on B exactly once and in seq order, and A's own subscriber too."""
    a, b = await instances(2)
    followers = await followers_on([a, b], per_instance=1)
    publisher = Publisher(await a.connect("alice"), "a")
    await publisher.publish(60, rate=200)
    await assert_every_acked_message_once_in_order(followers, [publisher], timeout=10)
    assert bridge(b).status()["received"] >= 1
    for follower in followers:
        await follower.stop()


async def test_redis_killed_for_5_s_under_load_loses_nothing_acknowledged(instances, own_redis):
    """Redis SIGKILLed for 5 s while 100 msg/s are published across two instances: afterwards every client on every instance holds every acknowledged message once, in seq order."""
    a, b = await instances(2, **UNLIMITED)
    followers = await followers_on([a, b], per_instance=2)
    publishers = [Publisher(await h.connect("alice"), f"p{i}") for i, h in enumerate((a, b))]

    async def outage() -> None:
        await asyncio.sleep(1.5)
        os.kill(_read_pid(own_redis.pid_file), signal.SIGKILL)
        await asyncio.sleep(5)
        await asyncio.to_thread(own_redis.start)

    await asyncio.gather(outage(), *(p.publish(400, rate=50) for p in publishers))
    assert not [f for p in publishers for f in p.failures], "PostgreSQL was up: all 200"
    await wait_until(lambda: bridge_state(a) == bridge_state(b) == "connected", 15, "recovery")
    await assert_every_acked_message_once_in_order(followers, publishers, timeout=20)
    for follower in followers:
        assert {"component": "redis", "state": "degraded"} in follower.events_of("degraded")
        await follower.stop()


async def test_a_stopped_redis_is_noticed_by_the_canary_and_repaired_after(instances, own_redis):
    """Redis SIGSTOPped for 10 s: clients get degraded {component: redis} within 3 s, readiness stays 200 and reports it, and after SIGCONT every client resyncs and holds every acknowledged message once."""
    a, b = await instances(2, **UNLIMITED)
    followers = await followers_on([a, b], per_instance=1)
    publishers = [Publisher(await h.connect("alice"), f"s{i}") for i, h in enumerate((a, b))]
    noticed: list[float] = []

    async def stall() -> None:
        await asyncio.sleep(1.0)
        with hung(own_redis):
            stopped = time.monotonic()
            await wait_until(
                lambda: all(f.events_of("degraded") for f in followers), 5, "degraded events"
            )
            noticed.append(time.monotonic() - stopped)
            async with a.session.get(f"{a.url}health/ready") as response:
                assert response.status == 200
                body = await response.json()
            assert body["checks"]["redis"] == "degraded", body
            await asyncio.sleep(10 - (time.monotonic() - stopped))

    await asyncio.gather(stall(), *(p.publish(120, rate=10) for p in publishers))
    assert noticed and noticed[0] < 3.0, noticed
    await wait_until(lambda: bridge_state(a) == bridge_state(b) == "connected", 15, "recovery")
    await assert_every_acked_message_once_in_order(followers, publishers, timeout=20)
    for follower in followers:
        assert {"component": "redis", "state": "connected"} in follower.events_of("degraded")
        assert follower.events_of("resync"), "each client is told to recover with since"
        await follower.stop()


async def test_presence_spans_instances_and_a_crashed_instances_users_expire(instances):
    """A user joining on B is announced to A's subscribers and listed by presence on A; when B dies without saying goodbye, its users leave A's list within two refresh intervals."""
    a, b = await instances(2, HEARTH_PRESENCE_REFRESH="0.5")
    alice = await a.connect("alice")
    await alice.request("sub", topic="room:lobby")
    bob = await b.connect("bob")
    await bob.request("sub", topic="room:lobby")
    joined = await alice.wait_for(
        lambda f: (
            f.get("event", {}).get("type") == "presence"
            and f["event"]["data"].get("joined") == "bob"
        ),
        5,
    )
    assert joined["event"]["data"]["topic"] == "room:lobby"
    ctrl = await alice.request("presence", topic="room:lobby")
    assert ctrl["params"]["users"] == ["alice", "bob"], ctrl
    # B stops its bridge first, as a crash would: nobody tells Redis that bob left.
    await b.app[keys.SUPERVISOR].stop()
    started = time.monotonic()
    while True:
        ctrl = await alice.request("presence", topic="room:lobby")
        if ctrl["params"]["users"] == ["alice"]:
            break
        assert time.monotonic() - started < 2 * 0.5 + 1.5, ctrl
        await asyncio.sleep(0.2)


async def test_readiness_turns_503_after_the_configured_time_in_local_only_mode(
    instances, own_redis
):
    """With HEARTH_REDIS_DEGRADED_READY_AFTER=1 an instance cut off from Redis turns not-ready after 1 s, and ready again once the canary comes back."""
    (a,) = await instances(1, HEARTH_REDIS_DEGRADED_READY_AFTER="1")
    os.kill(_read_pid(own_redis.pid_file), signal.SIGKILL)
    await wait_until(lambda: bridge_state(a) == "degraded", 5, "degraded")

    async def ready_status() -> tuple[int, dict]:
        async with a.session.get(f"{a.url}health/ready") as response:
            return response.status, await response.json()

    status, body = await ready_status()
    assert (status, body["checks"]["redis"]) == (200, "degraded"), body
    await asyncio.sleep(1.3)
    status, body = await ready_status()
    assert status == 503 and "redis:degraded" in body["reasons"], body
    await asyncio.to_thread(own_redis.start)
    await wait_until(lambda: bridge_state(a) == "connected", 15, "recovery")
    status, body = await ready_status()
    assert status == 200, body
    assert body["checks"]["redis_canary"]["age_seconds"] < 2


async def test_a_room_made_on_one_instance_reaches_every_directory_within_a_second(instances):
    """A room created through A's API is in B's room directory within a second."""
    a, b = await instances(2)
    headers = {"Authorization": f"Bearer {a.tokens['root']}"}
    async with a.session.post(
        f"{a.url}api/v1/rooms", json={"name": "annex", "private": False}, headers=headers
    ) as response:
        assert response.status == 201
    created = time.monotonic()
    await wait_until(lambda: b.app[keys.DIRECTORY].get("annex") is not None, 1.0, "annex on B")
    assert time.monotonic() - created < 1.0


async def test_garbage_and_second_copies_on_the_channel_are_dropped(instances, own_redis):
    """Unreadable payloads on the bridge's channel are logged and dropped, and a stored message that arrives twice from Redis reaches a subscriber once; the bridge stays connected."""
    import redis.asyncio as aioredis

    from actors.redis_bridge import MESSAGES_CHANNEL

    a, b = await instances(2)
    follower = (await followers_on([b], per_instance=1))[0]
    publisher = Publisher(await a.connect("alice"), "g")
    await publisher.publish(1, rate=100)
    await wait_until(lambda: follower.seqs == [1], 5, "the first message on B")
    client = aioredis.Redis.from_url(own_redis.url)
    try:
        for garbage in (b"not json", b'{"i": "x"}', b'{"i": "x", "m": [{"id": 1}]}', b"\xff\xfe"):
            await client.publish(MESSAGES_CHANNEL, garbage)
        # A's own publish of message 1, sent again as if by a third instance.
        history = await a.app[keys.STORE].history("lobby", since=0)
        again = json.dumps({"i": "third", "m": [m.to_record() for m in history]})
        await client.publish(MESSAGES_CHANNEL, again)
        await client.publish(MESSAGES_CHANNEL, again)
    finally:
        await client.aclose()
    await Publisher(publisher.client, "h").publish(1, rate=100)  # seq 2 arrives after it all
    await wait_until(lambda: follower.seqs[-1:] == [2], 5, "the second message on B")
    await asyncio.sleep(0.5)
    assert follower.seqs == [1, 2]
    assert bridge(b).status()["duplicates_dropped"] >= 1
    assert bridge_state(b) == "connected"
    await follower.stop()


async def test_what_an_instance_stored_while_cut_off_reaches_the_others_when_it_returns(
    database, own_redis, tmp_path
):
    """Only instance A loses Redis (a real TCP proxy between them is cut): messages A stores meanwhile are not published, and when A's link returns it announces the room's head, so B's subscriber fills the gap from the store with no further message in the room."""
    from tests.conftest import PgProxy

    proxy = PgProxy(own_redis.port)
    await proxy.start()
    started = []
    try:
        a = await start_hearth(
            database, tmp_path / "a" / "spool",
            HEARTH_REDIS_URL=f"redis://127.0.0.1:{proxy.port}/0", **UNLIMITED,
        )  # fmt: skip
        started.append(a)
        b = await start_hearth(
            database, tmp_path / "b" / "spool", HEARTH_REDIS_URL=own_redis.url, **UNLIMITED
        )
        started.append(b)
        for hearth in (a, b):
            await wait_until(lambda h=hearth: bridge_state(h) == "connected", 10, "bridge up")
        follower = (await followers_on([b], per_instance=1))[0]
        publisher = Publisher(await a.connect("alice"), "cut")
        await publisher.publish(1, rate=100)
        await wait_until(lambda: follower.seqs == [1], 5, "the first message on B")
        port = proxy.port
        await proxy.close()
        await wait_until(lambda: bridge_state(a) == "degraded", 5, "A cut off")
        await Publisher(publisher.client, "while-cut").publish(3, rate=100)
        await asyncio.sleep(1.0)
        assert follower.seqs == [1], "B cannot know yet"
        assert bridge_state(b) == "connected"
        await proxy.start(port)
        await wait_until(lambda: bridge_state(a) == "connected", 20, "A back")
        await wait_until(lambda: follower.seqs == [1, 2, 3, 4], 5, "B caught up")
        await follower.stop()
    finally:
        for hearth in started:
            await hearth.close()
        await proxy.close()
