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
from app.models import Message
from app.services import free_port
from tests.conftest import STALL_BOUNDS, UNLIMITED, StalledReader, wait_for_http, wait_until

ROOT = Path(__file__).resolve().parent.parent


async def test_stalled_reader_is_dropped_while_200_others_keep_receiving(make_hearth):
    """A reader that stops reading is dropped with SLOW_CLIENT while 200 others get every message."""
    hearth = await make_hearth(**STALL_BOUNDS, **UNLIMITED)
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
    hub = Hub(registry)
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


# -- the registry, in isolation --------------------------------------------------------------


class Recorder:
    """A client end without a socket: what the hub offered it, decoded, in order."""

    def __init__(self, username: str) -> None:
        from app.connection import Connection, Limits

        async def send(frame: str) -> None:  # never started: frames stay in the backlog
            raise AssertionError("not a live socket")

        async def close(**_) -> None:
            pass

        self.connection = Connection(send, close, limits=Limits(max_messages=10_000))
        self.connection.username = username
        self.connection.user_id = username
        #: (room topic, after) gap fills the hub asked this client's session for.
        self.fills: list[tuple[str, int]] = []
        self.connection.on_gap = lambda key, after: self.fills.append((key, after))

    def frames(self) -> list[dict]:
        """Every frame offered so far (taken from the backlog)."""
        backlog = self.connection._backlog or []
        frames = [json.loads(entry) for entry in backlog if isinstance(entry, str)]
        backlog.clear()
        return frames


def stored(seq: int) -> Message:
    """Message *seq* of room lobby, as the store returns it."""
    return Message(
        id=f"m{seq}", room="lobby", sender="ann", client_msg_id=f"c{seq}", content="x",
        created_at="2026-12-01T00:00:00.000Z", seq=seq,
    )  # fmt: skip


async def test_a_room_head_from_another_instance_makes_a_client_behind_it_fill_the_gap():
    """RoomHead(seq) asks the session of each subscriber behind it to read the gap from the store; the answer is delivered in order, and a client up to date is left alone."""
    from actors.hub import Deliver, Filled, Hub, Join, Registry, RoomHead, Subscribe
    from app.connection import Reply
    from app.protocol import Topic

    hub = Hub(Registry())
    behind, current = Recorder("ben"), Recorder("cid")
    for client in (behind, current):
        await hub._handle_join(Join(client.connection))
        reply = Reply(client.connection, "s")
        await hub._handle_subscribe(Subscribe(client.connection, Topic("room", "lobby"), reply))
    await hub._handle_deliver(Deliver((stored(1),)))
    current.connection.room_seqs["room:lobby"] = 3  # it heard of 2 and 3 already
    await hub._handle_room_head(RoomHead("room:lobby", 3))
    assert behind.fills == [("room:lobby", 1)]
    assert current.fills == []
    await hub._handle_filled(Filled(behind.connection, "room:lobby", (stored(2), stored(3))))
    seqs = [f["data"]["seq"] for f in behind.frames() if "data" in f]
    assert seqs == [1, 2, 3]
    assert hub.registry.heads["room:lobby"] == 3


async def test_a_resubscribe_with_since_never_resends_what_this_connection_was_sent():
    """A client that resubscribes with a since older than what the hub already sent it (its resync crossed a live frame) gets each seq once: the fill skips what the socket carries already."""
    from actors.hub import Deliver, Filled, Hub, Join, Registry, Subscribe
    from app.connection import Reply
    from app.protocol import Topic

    hub = Hub(Registry())
    client = Recorder("ben")
    topic = Topic("room", "lobby")
    await hub._handle_join(Join(client.connection))
    await hub._handle_subscribe(Subscribe(client.connection, topic, Reply(client.connection, "s")))
    await hub._handle_deliver(Deliver((stored(1), stored(2), stored(3))))
    # The client saw 1 when it asked to resubscribe since 1; 2 and 3 were on their way.
    again = Reply(client.connection, "s2")
    await hub._handle_subscribe(Subscribe(client.connection, topic, again, since=1))
    page = tuple(stored(seq) for seq in (2, 3, 4))
    await hub._handle_filled(Filled(client.connection, "room:lobby", page))
    seqs = [f["data"]["seq"] for f in client.frames() if "data" in f]
    assert seqs == [1, 2, 3, 4]


async def test_subscribe_after_leave_is_ignored():
    """A Subscribe handled after the connection's Leave changes nothing: no subscriber, no presence, no reply."""
    from actors.hub import Hub, Join, Leave, Registry, Subscribe
    from app.connection import Reply
    from app.protocol import Topic

    registry = Registry()
    hub = Hub(registry)
    client = Recorder("carol")
    await hub._handle_join(Join(client.connection))
    await hub._handle_leave(Leave(client.connection))
    reply = Reply(client.connection, "s1")
    made = await hub._handle_subscribe(Subscribe(client.connection, Topic("room", "lobby"), reply))
    assert made is False
    assert not registry.connections and not registry.subscribers and not registry.present
    assert client.frames() == []


def test_registry_and_delivery_match_a_model():
    """Interleaved join, leave, subscribe (with and without since), unsubscribe, lost deliveries and gap fills keep the registry equal to a model, presence never shows a user with no connection, and every connection gets each room's seqs gap-free."""
    from hypothesis import settings as hypothesis_settings
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

    from actors.hub import (
        Deliver,
        Filled,
        FillFailed,
        Hub,
        Join,
        Leave,
        Registry,
        Subscribe,
        Unsubscribe,
    )  # fmt: skip
    from app.connection import Reply
    from app.protocol import Topic

    rooms = ["r1", "r2"]
    users = ["ann", "ben", "cid"]

    class RegistryMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.new_event_loop()
            self.hub = Hub(Registry())
            self.clients = [Recorder(users[index % 3]) for index in range(4)]
            self.joined: set[int] = set()
            self.subs: dict[int, set[str]] = {index: set() for index in range(4)}
            #: room -> every stored message, by seq.
            self.stored: dict[str, list[Message]] = {room: [] for room in rooms}
            #: (client, room topic) -> stored seqs received, in order, since subscribing.
            self.received: dict[tuple[int, str], list[int]] = {}
            #: (client, room topic) -> the seq delivery must continue after.
            self.start: dict[tuple[int, str], int | None] = {}
            #: room -> highest seq that reached the hub.
            self.delivered: dict[str, int] = {room: 0 for room in rooms}

        def run(self, coroutine):
            return self.loop.run_until_complete(coroutine)

        def teardown(self) -> None:
            self.loop.close()

        def collect(self) -> None:
            for index, client in enumerate(self.clients):
                for frame in client.frames():
                    data = frame.get("data")
                    if data is not None and data["seq"] is not None:
                        self.received.setdefault((index, data["topic"]), []).append(data["seq"])

        @rule(index=st.integers(0, 3))
        def join(self, index):
            self.run(self.hub._handle_join(Join(self.clients[index].connection)))
            self.joined.add(index)

        @rule(index=st.integers(0, 3))
        def leave(self, index):
            self.run(self.hub._handle_leave(Leave(self.clients[index].connection)))
            self.joined.discard(index)
            for room in self.subs[index]:
                self._forget(index, f"room:{room}")
            self.subs[index] = set()

        def _forget(self, index, key):
            self.received.pop((index, key), None)
            self.start.pop((index, key), None)
            self.clients[index].fills = [f for f in self.clients[index].fills if f[0] != key]

        @rule(
            index=st.integers(0, 3),
            room=st.sampled_from(rooms),
            since=st.none() | st.integers(0, 3),
        )
        def subscribe(self, index, room, since):
            client = self.clients[index]
            key = f"room:{room}"
            already = room in self.subs[index]
            self.collect()
            made = self.run(self.hub._handle_subscribe(Subscribe(
                client.connection, Topic("room", room), Reply(client.connection, "s"), since=since,
            )))  # fmt: skip
            assert made == (index in self.joined)
            if not made:
                return
            self.subs[index].add(room)
            if since is not None:
                since = min(since, len(self.stored[room]))
                client.connection.room_seqs[key] = since
                self._forget(index, key)
                self.start[(index, key)] = since
                # The session reads what was missed and answers the hub.
                page = tuple(self.stored[room][since:])
                self.run(self.hub._handle_filled(Filled(client.connection, key, page)))
            elif not already:
                self._forget(index, key)
                self.start[(index, key)] = self.hub.registry.heads.get(key)

        @rule(index=st.integers(0, 3), room=st.sampled_from(rooms))
        def unsubscribe(self, index, room):
            self.collect()
            done = self.run(self.hub._handle_unsubscribe(
                Unsubscribe(self.clients[index].connection, Topic("room", room))
            ))  # fmt: skip
            assert done == (room in self.subs[index])
            self.subs[index].discard(room)
            self._forget(index, f"room:{room}")

        @rule(room=st.sampled_from(rooms), count=st.integers(1, 4), lost=st.booleans())
        def store_messages(self, room, count, lost):
            """A group commit of *count* messages, delivered as one batch (or lost whole)."""
            batch = []
            for _ in range(count):
                seq = len(self.stored[room]) + 1
                message = Message(
                    id=f"{room}-{seq}", room=room, sender="ann", client_msg_id=f"{room}-{seq}",
                    content="x", created_at="2026-12-01T00:00:00.000Z", seq=seq,
                )  # fmt: skip
                self.stored[room].append(message)
                batch.append(message)
            if not lost:  # a lost batch never reaches the hub: the outlet dropped it
                self.run(self.hub._handle_deliver(Deliver(tuple(batch))))
                self.delivered[room] = batch[-1].seq

        @rule(room=st.sampled_from(rooms), back=st.integers(1, 3), count=st.integers(1, 2))
        def repeat_delivery(self, room, back, count):
            if len(self.stored[room]) >= back:
                again = tuple(self.stored[room][-back:][:count])
                self.run(self.hub._handle_deliver(Deliver(again)))

        @rule(index=st.integers(0, 3), fail=st.booleans())
        def answer_a_fill(self, index, fail):
            client = self.clients[index]
            if not client.fills:
                return
            key, after = client.fills.pop(0)
            if fail:
                self.run(self.hub._handle_fill_failed(FillFailed(client.connection, key)))
                self.collect()
                # After a resync the client starts over from what it was sent next.
                self.received.pop((index, key), None)
                self.start[(index, key)] = client.connection.room_seqs.get(key)
                return
            page = tuple(self.stored[key[5:]][after : after + 2])
            complete = after + 2 >= len(self.stored[key[5:]])
            self.run(self.hub._handle_filled(Filled(client.connection, key, page, complete)))

        @invariant()
        def registry_matches_the_model(self):
            registry = self.hub.registry
            assert registry.connections == {self.clients[i].connection for i in self.joined}
            for room in rooms:
                key = f"room:{room}"
                expected = {self.clients[i].connection for i in self.joined if room in self.subs[i]}
                assert registry.subscribers.get(key, set()) == expected
                assert registry.subscribers.get(key) != set()  # no empty sets left behind
                online = {
                    self.clients[i].connection.username for i in self.joined if room in self.subs[i]
                }
                assert set(registry.present.get(key, {})) == online

        @invariant()
        def delivery_is_gap_free(self):
            self.collect()
            for (index, key), seqs in self.received.items():
                start = self.start.get((index, key))
                if seqs:
                    first = seqs[0] if start is None else start + 1
                    assert seqs == list(range(first, first + len(seqs))), (index, key, start, seqs)
            for index in self.joined:
                connection = self.clients[index].connection
                for room in self.subs[index]:
                    key = f"room:{room}"
                    if key in connection.held:
                        continue  # a fill is under way; the client has asked for the rest
                    seqs = self.received.get((index, key))
                    reached = seqs[-1] if seqs else self.start.get((index, key))
                    if reached is not None:
                        # Nothing delivered to the hub is missing once no fill is pending.
                        assert reached >= self.delivered[room], (index, key, reached)

    RegistryMachine.TestCase.settings = hypothesis_settings(
        max_examples=150, stateful_step_count=40, deadline=None
    )
    RegistryMachine.TestCase().runTest()
