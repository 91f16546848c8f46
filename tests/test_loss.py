"""The loss checker: publishers and subscribers through a PostgreSQL crash and a long hang."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections import Counter, defaultdict

import aiopg
import pytest

from app import keys
from tests.conftest import hung, wait_until

pytestmark = pytest.mark.slow

ROOMS = ("lobby", "annex", "porch")
#: Seconds PostgreSQL stays SIGSTOPped: longer than every timeout in play.
HANG_SECONDS = 20


class Publisher:
    """Publishes until told to stop, retrying each message under its client_msg_id as told."""

    def __init__(self, client, name: str, rng: random.Random) -> None:
        self.client = client
        self.name = name
        self.rng = rng
        #: client_msg_id -> id, for every acknowledged (200 or 202) publish.
        self.acked: dict[str, str] = {}
        #: Every ctrl received, by request id.
        self.ctrls: defaultdict[str, list[dict]] = defaultdict(list)
        self.unanswered = 0
        self._ids = itertools.count()

    async def run(self, stop: asyncio.Event) -> None:
        """Publish one message at a time until *stop*; a message is retried until acknowledged."""
        for n in itertools.count():
            if stop.is_set():
                return
            room = self.rng.choice(ROOMS)
            client_msg_id = f"{self.name}-{n}"
            while True:
                request_id = f"{self.name}-r{next(self._ids)}"
                await self.client.send(
                    id=request_id, op="pub", topic=f"room:{room}", content=f"{client_msg_id} ✓",
                    client_msg_id=client_msg_id,
                )  # fmt: skip
                try:
                    frame = await self.client.wait_for(
                        lambda f, rid=request_id: f.get("ctrl", {}).get("id") == rid, 10
                    )
                except TimeoutError:
                    self.unanswered += 1
                    continue
                ctrl = frame["ctrl"]
                self.ctrls[request_id].append(ctrl)
                if ctrl["code"] in (200, 202):
                    self.acked[client_msg_id] = ctrl["params"]["id"]
                    break
                await asyncio.sleep(min(ctrl.get("params", {}).get("retry_after", 1), 2))
            await asyncio.sleep(0.15)

    def late_ctrls(self) -> None:
        """Move ctrls that arrived after their request was done into the record."""
        for ctrl in self.client.take("ctrl"):
            self.ctrls[ctrl["id"]].append(ctrl)


class Subscriber:
    """Reads every room, recovering with ``sub since`` whenever told to resync."""

    def __init__(self, client) -> None:
        self.client = client
        #: id -> how many stored (seq-carrying) frames of it arrived.
        self.received: Counter[str] = Counter()
        self.last_seq: dict[str, int] = {}
        self.resyncs = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Read frames until *stop*, answering resync events like the SDK does."""
        ws = self.client.ws
        while not stop.is_set():
            try:
                message = await ws.receive(timeout=0.5)
            except TimeoutError:
                continue
            frame = json.loads(message.data)
            data = frame.get("data")
            if data is not None and data["seq"] is not None:
                self.received[data["id"]] += 1
                self.last_seq[data["topic"]] = max(self.last_seq.get(data["topic"], 0), data["seq"])
            event = frame.get("event")
            if event is not None and event["type"] == "resync":
                self.resyncs += 1
                for topic in event["data"]["topics"]:
                    await self.client.send(op="sub", topic=topic, since=self.last_seq.get(topic, 0))


async def test_no_acknowledged_message_is_lost_through_a_crash_and_a_hang(
    make_hearth, own_postgres
):
    """10 publishers and 5 subscribers on 3 rooms through pg_ctl stop -m immediate and a 20 s SIGSTOP: every acknowledged message is stored once, seqs run 1..n, every subscriber gets each exactly once, no 500, no second ctrl."""
    dsn = own_postgres.create_database("loss_checker")
    hearth = await make_hearth(
        dsn, HEARTH_DB_TIMEOUT="1", HEARTH_PUB_RATE="1000", HEARTH_PUB_BURST="1000",
        HEARTH_USER_PUB_RATE="1000", HEARTH_USER_PUB_BURST="1000",
    )  # fmt: skip
    async with aiopg.connect(dsn) as conn, conn.cursor() as cursor:
        for room in ROOMS[1:]:
            await cursor.execute("INSERT INTO rooms (name) VALUES (%s)", (room,))
    directory = hearth.app[keys.DIRECTORY]
    await wait_until(lambda: all(directory.get(room) for room in ROOMS), 10, "the rooms")
    rng = random.Random(8)
    subscribers = [Subscriber(await hearth.connect("bob")) for _ in range(5)]
    for subscriber in subscribers:
        for room in ROOMS:
            assert (await subscriber.client.request("sub", topic=f"room:{room}"))["code"] == 200
    users = ("alice", "carol", "root")
    publishers = [
        Publisher(await hearth.connect(users[n % 3]), f"p{n}", random.Random(rng.random()))
        for n in range(10)
    ]
    stop_publishing, stop_reading = asyncio.Event(), asyncio.Event()
    reading = [asyncio.create_task(s.run(stop_reading)) for s in subscribers]
    publishing = [asyncio.create_task(p.run(stop_publishing)) for p in publishers]
    started = time.monotonic()
    await asyncio.sleep(2)
    await asyncio.to_thread(own_postgres.stop, "immediate")
    await asyncio.sleep(3)
    await asyncio.to_thread(own_postgres.start)
    monitor = hearth.app[keys.SUPERVISOR].get("db_monitor")
    await wait_until(lambda: monitor.db_state == "connected", 40, "the reconnect")
    await asyncio.sleep(3)  # publishing with 200 again
    with hung(own_postgres):
        await asyncio.sleep(HANG_SECONDS)
    await wait_until(lambda: monitor.db_state == "connected", 40, "the recovery")
    await asyncio.sleep(3)
    stop_publishing.set()
    await asyncio.gather(*publishing)
    acked = {msg_id for p in publishers for msg_id in p.acked.values()}
    spool = hearth.app[keys.SPOOL]
    await wait_until(lambda: spool.depth == 0, 60, "the spool to drain")
    await wait_until(
        lambda: all(acked <= set(s.received) for s in subscribers), 60, "every delivery"
    )
    await asyncio.sleep(1)  # anything duplicated would arrive now
    stop_reading.set()
    await asyncio.gather(*reading)
    for publisher in publishers:
        publisher.late_ctrls()

    async with aiopg.connect(dsn) as conn, conn.cursor() as cursor:
        await cursor.execute("SELECT id::text, room, seq FROM messages")
        stored = await cursor.fetchall()
    stored_ids = Counter(row[0] for row in stored)
    seqs = defaultdict(list)
    for _, room, seq in stored:
        seqs[room].append(seq)
    ctrls = [c for p in publishers for cs in p.ctrls.values() for c in cs]
    figures = {
        "seconds": round(time.monotonic() - started, 1),
        "acknowledged": len(acked),
        "acknowledged_200": sum(c["code"] == 200 for c in ctrls),
        "acknowledged_202": sum(c["code"] == 202 for c in ctrls),
        "refused_5xx": sum(c["code"] >= 500 for c in ctrls),
        "stored": len(stored),
        "delivered": sum(len(acked & set(s.received)) for s in subscribers),
        "lost": sum(len(acked - set(s.received)) for s in subscribers),
        "duplicated": sum(n - 1 for s in subscribers for n in s.received.values() if n > 1),
        "resyncs": sum(s.resyncs for s in subscribers),
        "unanswered": sum(p.unanswered for p in publishers),
    }
    print("loss checker:", json.dumps(figures))
    assert all(stored_ids[msg_id] == 1 for msg_id in acked), "an acknowledged id not stored once"
    assert max(stored_ids.values()) == 1
    for room, room_seqs in seqs.items():
        assert sorted(room_seqs) == list(range(1, len(room_seqs) + 1)), room
    assert figures["lost"] == 0 and figures["duplicated"] == 0, figures
    assert figures["delivered"] == 5 * len(acked)
    assert not [c for c in ctrls if c["code"] == 500], "a 500 was answered"
    assert all(len(cs) == 1 for p in publishers for cs in p.ctrls.values()), "two ctrls for one id"
    assert figures["unanswered"] == 0, figures
    assert figures["acknowledged_202"] > 0 and figures["acknowledged_200"] > 0, figures
