"""The room writers over real sockets and a real PostgreSQL: order per room, spool, outlet."""

from __future__ import annotations

import asyncio
import json
import time

import aiopg
import pytest

from app import keys, metrics
from app.crypto import generate_key_spec
from app.spool import Spool
from tests.conftest import UNLIMITED, hung, wait_until


def stored_frames(client, room: str = "lobby") -> list[dict]:
    """Data frames of *room* that carry a seq (spooled previews have none), in arrival order."""
    return client.take("data", lambda d: d["topic"] == f"room:{room}" and d["seq"] is not None)


async def collect_stored(client, count: int, timeout: float) -> list[dict]:
    """The next *count* data frames that carry a seq, in arrival order."""
    frames = stored_frames(client)
    deadline = time.monotonic() + timeout
    while len(frames) < count:
        remaining = deadline - time.monotonic()
        frame = await client.wait_for(
            lambda f: "data" in f and f["data"]["seq"] is not None, remaining
        )
        frames.append(frame["data"])
    return frames


async def rows(dsn: str, room: str) -> list[tuple[int, str, str]]:
    """(seq, client_msg_id, content) of every stored message of *room*, by seq."""
    async with aiopg.connect(dsn) as conn, conn.cursor() as cursor:
        await cursor.execute(
            "SELECT seq, client_msg_id, content FROM messages WHERE room = %s ORDER BY seq",
            (room,),
        )
        return await cursor.fetchall()


async def test_lone_surrogate_is_refused_at_the_door_with_or_without_postgres(
    make_hearth, own_postgres
):
    """Content with a lone surrogate or NUL gets 400 whether PostgreSQL is up or down, and nothing is spooled."""
    dsn = own_postgres.create_database("surrogates")
    hearth = await make_hearth(dsn)
    client = await hearth.connect("alice")
    spool = hearth.app[keys.SPOOL]
    for content in ("\ud800", "ok \udfff tail", "nul \x00 inside"):
        ctrl = await client.request("pub", topic="room:lobby", content=content, client_msg_id="s1")
        assert (ctrl["code"], ctrl["params"]["error"]) == (400, "INVALID_MESSAGE"), ctrl
    await asyncio.to_thread(own_postgres.stop, "fast")
    ctrl = await client.request("pub", topic="room:lobby", content="\ud800", client_msg_id="s2")
    assert ctrl["code"] == 400, ctrl
    assert spool.depth == 0
    ctrl = await client.request("pub", topic="room:lobby", content="fine", client_msg_id="s3")
    assert ctrl["code"] == 202, ctrl
    await asyncio.to_thread(own_postgres.start)
    await wait_until(lambda: spool.depth == 0, 20, "the spool to drain")
    assert [row[1] for row in await rows(dsn, "lobby")] == ["s3"]


async def test_poison_record_is_dead_lettered_and_the_drain_goes_on(
    make_hearth, database, tmp_path
):
    """A spooled record PostgreSQL can never store goes to the dead-letter file; the rest of its room and other rooms are stored in order."""
    spool_dir = tmp_path / "spool"
    earlier = Spool(spool_dir / "publish.spool")

    def record(n: int, room: str, content: str) -> dict:
        return {
            "id": f"00000000-0000-4000-8000-{n:012d}", "room": room, "sender": "alice",
            "client_msg_id": f"c{n}", "content": content,
            "created_at": "2026-12-01T10:00:00.000Z", "seq": None, "flags": [], "trace_id": None,
        }  # fmt: skip

    # As an earlier version accepted them: a poison record first, then good ones behind it.
    await earlier.append(record(1, "lobby", "poison \ud800"))
    await earlier.append(record(2, "lobby", "after the poison"))
    await earlier.append(record(3, "secret", "other room"))
    await earlier.append(record(4, "lobby", "last"))
    dead_before = metrics.SPOOL_DEAD_LETTERS._value.get()
    hearth = await make_hearth()
    spool = hearth.app[keys.SPOOL]
    await wait_until(lambda: spool.depth == 0, 20, "the spool to drain")
    assert [(r[1], r[2]) for r in await rows(hearth.database, "lobby")] == [
        ("c2", "after the poison"),
        ("c4", "last"),
    ]
    assert [r[1] for r in await rows(hearth.database, "secret")] == ["c3"]
    dead_lines = (spool_dir / "publish.spool.dead").read_text().splitlines()
    dead = [json.loads(line.split(" ", 2)[2]) for line in dead_lines]  # "<len> <crc> <json>"
    assert [entry["record"]["client_msg_id"] for entry in dead] == ["c1"]
    assert metrics.SPOOL_DEAD_LETTERS._value.get() == dead_before + 1
    client = await hearth.connect("alice")
    ctrl = await client.request("pub", topic="room:lobby", content="new", client_msg_id="n1")
    assert (ctrl["code"], ctrl["params"]["seq"]) == (200, 3), ctrl


async def test_commit_answered_too_late_still_reaches_every_subscriber_once(
    make_hearth, pg_proxy, database
):
    """A store that commits after the writer gave up on its answer is spooled, found again on drain, and sent out: subscribers get seqs 1..3 exactly once."""
    hearth = await make_hearth(pg_proxy.dsn(database), HEARTH_DB_TIMEOUT="1", **UNLIMITED)
    subscriber = await hearth.connect("bob")
    assert (await subscriber.request("sub", topic="room:lobby"))["code"] == 200
    publisher = await hearth.connect("alice")
    first = await publisher.request("pub", topic="room:lobby", content="one", client_msg_id="m1")
    assert first["code"] == 200
    pg_proxy.delay_next_reply(b"INSERT INTO messages", 2.5)
    started = time.monotonic()
    second = await publisher.request(
        "pub", topic="room:lobby", content="two", client_msg_id="m2", timeout=10
    )
    assert second["code"] == 202, second
    assert time.monotonic() - started < 1 + 1 + 0.5  # HEARTH_DB_TIMEOUT plus 1 s
    assert pg_proxy.delayed_replies == 1
    retried = await publisher.request("pub", topic="room:lobby", content="two", client_msg_id="m2")
    assert retried["params"]["id"] == second["params"]["id"]
    third = await publisher.request("pub", topic="room:lobby", content="three", client_msg_id="m3")
    assert third["code"] in (200, 202), third
    frames = await collect_stored(subscriber, 3, timeout=20)
    await subscriber.settle(1.0)
    frames += stored_frames(subscriber)
    assert [f["seq"] for f in frames] == [1, 2, 3]
    assert [f["client_msg_id"] for f in frames] == ["m1", "m2", "m3"]
    assert [r[1] for r in await rows(database, "lobby")] == ["m1", "m2", "m3"]


async def test_publishes_behind_a_slow_commit_go_together_in_order_and_once(
    make_hearth, pg_proxy, database
):
    """While one slow insert holds a room, 24 pipelined publishes from three clients wait, then go in a few statements: every ack is 200 after its commit, seqs are gap-free and in each client's order, and a subscriber gets each message once."""
    hearth = await make_hearth(
        pg_proxy.dsn(database), HEARTH_DB_TIMEOUT="3", HEARTH_ROOM_WRITERS="1", **UNLIMITED
    )
    writer = hearth.app[keys.SUPERVISOR].get("room_writer.0")
    subscriber = await hearth.connect("bob")
    await subscriber.request("sub", topic="room:lobby")
    publishers = [await hearth.connect("alice") for _ in range(3)]
    pg_proxy.delay_next_reply(b"INSERT INTO messages", 0.8)
    slow = await publishers[0].send(
        op="pub", topic="room:lobby", content="slow", client_msg_id="slow"
    )
    await asyncio.sleep(0.2)  # the slow insert is on its way
    sent = {
        index: [
            await client.send(
                op="pub",
                topic="room:lobby",
                content=f"{index}-{n}",
                client_msg_id=f"{index}-{n}",
            )  # fmt: skip
            for n in range(8)
        ]
        for index, client in enumerate(publishers)
    }
    first = await publishers[0].wait_for(lambda f: f.get("ctrl", {}).get("id") == slow, 10)
    assert (first["ctrl"]["code"], first["ctrl"]["params"]["seq"]) == (200, 1)
    for index, client in enumerate(publishers):
        seqs = []
        for request_id in sent[index]:
            frame = await client.wait_for(
                lambda f, rid=request_id: f.get("ctrl", {}).get("id") == rid, 10
            )
            assert frame["ctrl"]["code"] == 200, frame
            seqs.append(frame["ctrl"]["params"]["seq"])
        assert seqs == sorted(seqs), f"client {index} acks out of its order: {seqs}"
    frames = await collect_stored(subscriber, 25, timeout=10)
    await subscriber.settle(0.5)
    frames += stored_frames(subscriber)
    assert [f["seq"] for f in frames] == list(range(1, 26))
    assert [r[0] for r in await rows(database, "lobby")] == list(range(1, 26))
    status = writer.status()
    assert status["stored"] == 25
    assert status["batches"] <= 6, status  # the 24 waited behind the slow one together


async def test_a_publish_retried_while_its_first_copy_is_being_stored_gets_the_same_answer(
    make_hearth, pg_proxy, database
):
    """The same client_msg_id sent twice while the first insert is slow: both are answered 200 with one id and seq, and one row is stored."""
    hearth = await make_hearth(pg_proxy.dsn(database), HEARTH_DB_TIMEOUT="3", **UNLIMITED)
    client = await hearth.connect("alice")
    pg_proxy.delay_next_reply(b"INSERT INTO messages", 0.6)
    ids = [
        await client.send(op="pub", topic="room:lobby", content="twice", client_msg_id="t1")
        for _ in range(2)
    ]
    ctrls = [
        (await client.wait_for(lambda f, r=rid: f.get("ctrl", {}).get("id") == r, 10))["ctrl"]
        for rid in ids
    ]
    assert [c["code"] for c in ctrls] == [200, 200], ctrls
    assert ctrls[0]["params"] == ctrls[1]["params"]
    assert [r[1] for r in await rows(database, "lobby")] == ["t1"]


async def test_a_batch_that_times_out_is_spooled_whole_and_each_message_arrives_once(
    make_hearth, pg_proxy, database
):
    """A batch whose COMMIT lands after the deadline: every publish in it and behind it gets 202 in time, and after the drain the subscriber has seqs 1..N once, in order."""
    hearth = await make_hearth(
        pg_proxy.dsn(database), HEARTH_DB_TIMEOUT="1", HEARTH_ROOM_WRITERS="1", **UNLIMITED
    )
    subscriber = await hearth.connect("bob")
    await subscriber.request("sub", topic="room:lobby")
    publisher = await hearth.connect("alice")
    pg_proxy.delay_next_reply(b"INSERT INTO messages", 2.5)
    started = time.monotonic()
    ids = [
        await publisher.send(
            op="pub", topic="room:lobby", content=f"late {n}", client_msg_id=f"l{n}"
        )
        for n in range(6)
    ]
    codes = []
    for request_id in ids:
        frame = await publisher.wait_for(
            lambda f, rid=request_id: f.get("ctrl", {}).get("id") == rid, 10
        )
        codes.append(frame["ctrl"]["code"])
    assert codes == [202] * 6, codes
    assert time.monotonic() - started < 1 + 1 + 0.5  # HEARTH_DB_TIMEOUT plus 1 s
    frames = await collect_stored(subscriber, 6, timeout=30)
    await subscriber.settle(1.0)
    frames += stored_frames(subscriber)
    assert [(f["seq"], f["client_msg_id"]) for f in frames] == [(n + 1, f"l{n}") for n in range(6)]
    assert [r[1] for r in await rows(database, "lobby")] == [f"l{n}" for n in range(6)]


async def test_a_writer_crash_answers_its_waiting_publishes_at_once_and_a_retry_stores_once(
    make_hearth, pg_proxy, database
):
    """A writer that crashes while an insert is on its way answers that publish 503 with retry_after at once, not at the deadline; the retry after the restart is stored exactly once."""
    hearth = await make_hearth(
        pg_proxy.dsn(database), HEARTH_DB_TIMEOUT="5", HEARTH_ROOM_WRITERS="1", **UNLIMITED
    )
    writer = hearth.app[keys.SUPERVISOR].get("room_writer.0")
    client = await hearth.connect("alice")
    pg_proxy.delay_next_reply(b"INSERT INTO messages", 2.0)
    request_id = await client.send(
        op="pub", topic="room:lobby", content="crash", client_msg_id="x1"
    )
    await asyncio.sleep(0.3)
    started = time.monotonic()
    writer.cast(object())  # no handler for it: the incarnation crashes
    frame = await client.wait_for(lambda f: f.get("ctrl", {}).get("id") == request_id, 10)
    assert time.monotonic() - started < 1.0
    assert frame["ctrl"]["code"] == 503, frame
    assert frame["ctrl"]["params"]["retry_after"] > 0
    await wait_until(lambda: writer.restarts == 1 and writer.ready.is_set(), 10, "restart")
    retried = await client.request("pub", topic="room:lobby", content="crash", client_msg_id="x1")
    assert (retried["code"], retried["params"]["seq"]) == (200, 1), retried
    assert [r[1] for r in await rows(database, "lobby")] == ["x1"]


async def test_one_rooms_backlog_does_not_hold_up_other_rooms(make_hearth, database):
    """With room A's row locked elsewhere, A's publish is spooled (202) in time while room B keeps storing with 200; A is stored once the lock goes."""
    hearth = await make_hearth(HEARTH_DB_TIMEOUT="1", **UNLIMITED)
    publisher = await hearth.connect("alice")
    watcher = await hearth.connect("alice")
    await watcher.request("sub", topic="room:lobby")
    async with aiopg.connect(database) as locker, locker.cursor() as cursor:
        await cursor.execute("INSERT INTO rooms (name) VALUES ('annex')")
        await wait_until(lambda: hearth.app[keys.DIRECTORY].get("annex") is not None, 5, "annex")
        await cursor.execute("BEGIN")
        await cursor.execute("SELECT last_seq FROM rooms WHERE name = 'lobby' FOR UPDATE")
        started = time.monotonic()
        locked = await publisher.request(
            "pub", topic="room:lobby", content="behind a lock", client_msg_id="a1"
        )
        assert locked["code"] == 202, locked
        assert time.monotonic() - started < 2.5
        for n in range(5):
            other = await publisher.request(
                "pub", topic="room:annex", content=f"free {n}", client_msg_id=f"b{n}"
            )
            assert (other["code"], other["params"]["seq"]) == (200, n + 1), other
        await cursor.execute("ROLLBACK")
    frame = await watcher.wait_for(lambda f: "data" in f and f["data"]["seq"] == 1, 40)
    assert frame["data"]["client_msg_id"] == "a1"
    assert [r[1] for r in await rows(database, "lobby")] == ["a1"]


async def test_hung_postgres_publish_is_spooled_within_the_deadline(make_hearth, own_postgres):
    """With PostgreSQL SIGSTOPped, every publish is answered 202 within HEARTH_DB_TIMEOUT plus 1 s and stored after SIGCONT."""
    dsn = own_postgres.create_database("hang_pub")
    hearth = await make_hearth(dsn, HEARTH_DB_TIMEOUT="1", **UNLIMITED)
    publisher = await hearth.connect("alice")
    with hung(own_postgres):
        for n in range(4):
            started = time.monotonic()
            ctrl = await publisher.request(
                "pub", topic="room:lobby", content=f"hung {n}", client_msg_id=f"h{n}"
            )
            assert ctrl["code"] == 202, ctrl
            assert time.monotonic() - started < 2.0 + 0.3
    spool = hearth.app[keys.SPOOL]
    await wait_until(lambda: spool.depth == 0, 40, "the spool to drain")
    assert [r[0:2] for r in await rows(dsn, "lobby")] == [(n + 1, f"h{n}") for n in range(4)]


async def test_spooled_content_is_encrypted_at_rest(make_hearth, own_postgres, tmp_path):
    """With HEARTH_MESSAGE_KEY set, a spooled message's content never sits in plaintext on disk."""
    dsn = own_postgres.create_database("sealed")
    hearth = await make_hearth(dsn, HEARTH_MESSAGE_KEY=generate_key_spec("k1"))
    client = await hearth.connect("alice")
    await asyncio.to_thread(own_postgres.stop, "fast")
    ctrl = await client.request(
        "pub", topic="room:lobby", content="the launch code is 0000", client_msg_id="e1"
    )
    assert ctrl["code"] == 202, ctrl
    spool_file = tmp_path / "spool" / "publish.spool"
    assert b"launch code" not in spool_file.read_bytes()
    await asyncio.to_thread(own_postgres.start)
    await wait_until(lambda: hearth.app[keys.SPOOL].depth == 0, 20, "the spool to drain")
    history = await client.request("history", topic="room:lobby", limit=10)
    assert history["params"]["count"] == 1
    (frame,) = client.take("data", lambda d: d["seq"] is not None)
    assert frame["content"] == "the launch code is 0000"


@pytest.mark.parametrize("writers", ["1", "3"])
async def test_each_room_keeps_its_order_across_writers(make_hearth, writers):
    """Concurrent publishers on several rooms get gap-free seqs per room, with any number of writers."""
    hearth = await make_hearth(HEARTH_ROOM_WRITERS=writers, **UNLIMITED)
    async with aiopg.connect(hearth.database) as conn, conn.cursor() as cursor:
        for room in ("r1", "r2", "r3"):
            await cursor.execute("INSERT INTO rooms (name) VALUES (%s)", (room,))
    await wait_until(lambda: hearth.app[keys.DIRECTORY].get("r3") is not None, 5, "rooms")
    clients = [await hearth.connect("alice") for _ in range(6)]

    async def publish(index: int) -> list[int]:
        room = f"r{index % 3 + 1}"
        seqs = []
        for n in range(15):
            ctrl = await clients[index].request(
                "pub", topic=f"room:{room}", content=f"{index}-{n}", client_msg_id=f"{index}-{n}"
            )
            assert ctrl["code"] == 200, ctrl
            seqs.append(ctrl["params"]["seq"])
        return seqs

    await asyncio.gather(*(publish(index) for index in range(6)))
    for room in ("r1", "r2", "r3"):
        assert [r[0] for r in await rows(hearth.database, room)] == list(range(1, 31))


async def test_spool_write_failure_is_503_never_an_acknowledgement(
    make_hearth, own_postgres, tmp_path
):
    """With PostgreSQL down and the spool file unwritable (a directory in its place), a publish gets 503 SPOOL_FULL with retry_after."""
    dsn = own_postgres.create_database("spool_broken")
    hearth = await make_hearth(dsn)
    client = await hearth.connect("alice")
    await asyncio.to_thread(own_postgres.stop, "fast")
    spool_file = tmp_path / "spool" / "publish.spool"
    spool_file.unlink(missing_ok=True)
    spool_file.mkdir(parents=True)
    ctrl = await client.request("pub", topic="room:lobby", content="nowhere", client_msg_id="w1")
    assert (ctrl["code"], ctrl["params"]["error"]) == (503, "SPOOL_FULL"), ctrl
    assert ctrl["params"]["retry_after"] > 0
    spool_file.rmdir()
    await asyncio.to_thread(own_postgres.start)


async def test_retried_publish_gets_the_spooled_answer_again_after_a_restart(
    make_hearth, own_postgres
):
    """A publish retried while its first copy waits in the spool gets the same id, also from a restarted server, and is stored once."""
    dsn = own_postgres.create_database("spool_retry")
    first_run = await make_hearth(dsn)
    client = await first_run.connect("alice")
    await asyncio.to_thread(own_postgres.stop, "fast")
    first = await client.request("pub", topic="room:lobby", content="once", client_msg_id="r1")
    again = await client.request("pub", topic="room:lobby", content="once", client_msg_id="r1")
    assert first["code"] == again["code"] == 202
    assert again["params"]["id"] == first["params"]["id"]
    await first_run.close()
    await asyncio.to_thread(own_postgres.start)
    second_run = await make_hearth(dsn)  # the same spool folder
    client = await second_run.connect("alice")
    retried = await client.request("pub", topic="room:lobby", content="once", client_msg_id="r1")
    assert retried["params"]["id"] == first["params"]["id"], retried
    await wait_until(lambda: second_run.app[keys.SPOOL].depth == 0, 20, "the spool to drain")
    assert [r[1] for r in await rows(dsn, "lobby")] == ["r1"]
