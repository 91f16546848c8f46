"""The fallback transport over real HTTP: event streams, tickets, resume and rpc requests."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from app import keys, metrics, sse
from app.protocol import Topic
from app.sse import ResumeRecord
from app.web import drain
from tests.conftest import STALL_BOUNDS, UNLIMITED, StalledSocket, hung, wait_until

_ids = itertools.count(1)


class SseClient:
    """A real event stream client: reads ``GET /sse`` line by line, as EventSource would."""

    def __init__(self, response: aiohttp.ClientResponse, ticket: str | None) -> None:
        self.response = response
        self.ticket = ticket
        #: The session id the hello gave.
        self.session = ""
        #: The id of the last event that had one.
        self.last_event_id: str | None = None
        #: Comment lines seen (``: keep-alive``).
        self.comments: list[str] = []

    async def event(self, timeout: float = 10.0) -> dict:
        """The next event: ``{"event", "id", "data"}`` (data parsed as JSON), or the
        ``{"retry"}`` field; comments are collected on the way."""
        fields: dict = {}
        async with asyncio.timeout(timeout):
            while True:
                line = (await self.response.content.readline()).decode()
                if line == "":
                    raise ConnectionError("stream ended")
                line = line.rstrip("\n")
                if line == "":
                    if "data" in fields:
                        if "id" in fields:
                            self.last_event_id = fields["id"]
                        fields["data"] = json.loads(fields["data"])
                        return fields
                    continue
                if line.startswith(":"):
                    self.comments.append(line)
                    continue
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value

    async def data(self, count: int, timeout: float = 10.0) -> list[tuple[str | None, dict]]:
        """The next *count* room data events as (id, data), skipping other events."""
        got = []
        while len(got) < count:
            event = await self.event(timeout)
            if "data" in event["data"]:
                got.append((event.get("id"), event["data"]["data"]))
        return got

    async def ended(self, timeout: float = 10.0) -> list[dict]:
        """Every event until the server ends the stream."""
        events = []
        try:
            while True:
                events.append(await self.event(timeout))
        except ConnectionError:
            return events


@pytest.fixture(autouse=True)
async def opened(make_hearth) -> AsyncIterator[list[aiohttp.ClientResponse]]:
    """The event stream responses a test opened, closed before its servers stop."""
    responses: list[aiohttp.ClientResponse] = []
    _opened.append(responses)
    yield responses
    _opened.remove(responses)
    for response in responses:
        response.close()


_opened: list[list[aiohttp.ClientResponse]] = []


async def ticket(hearth, user: str) -> str:
    """A fresh ticket for *user*."""
    async with hearth.session.post(
        hearth.server.make_url("/api/v1/sse/ticket"),
        headers={"Authorization": f"Bearer {hearth.tokens[user]}"},
    ) as response:
        assert response.status == 200, await response.text()
        body = await response.json()
    assert body["expires_in"] == 30 and len(body["ticket"]) >= 32
    return body["ticket"]


async def stream(
    hearth, user: str = "alice", *, ticket_: str | None = None, last_event_id: str | None = None
) -> SseClient:
    """An event stream of *user* (by a new ticket unless *ticket_*), past its hello."""
    ticket_ = ticket_ or await ticket(hearth, user)
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    response = await hearth.session.get(
        hearth.server.make_url("/sse"),
        params={"ticket": ticket_},
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
    )
    _opened[-1].append(response)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Accel-Buffering"] == "no"
    client = SseClient(response, ticket_)
    hello = await client.event()
    assert hello["retry"] == "2000" and hello["event"] == "hello", hello
    assert hello["data"]["user"]["username"] == user
    client.session = hello["data"]["session"]
    client.hello = hello["data"]  # type: ignore[attr-defined]
    return client


async def rpc(hearth, user: str, session: str, **frame) -> tuple[int, dict, aiohttp.ClientResponse]:
    """POST one request frame for *user* on stream *session*: (status, ctrl, response)."""
    frame.setdefault("id", f"q{next(_ids)}")
    async with hearth.session.post(
        hearth.server.make_url("/api/v1/rpc"),
        data=json.dumps(frame),
        headers={"Authorization": f"Bearer {hearth.tokens[user]}", "X-Hearth-Session": session},
    ) as response:
        body = await response.json()
    return response.status, body["ctrl"], response


async def test_auth_is_required_on_every_endpoint(make_hearth):
    """Streams, tickets and rpc refuse a missing, bad or expired credential with 401 ctrl JSON."""
    hearth = await make_hearth()
    url = hearth.server.make_url
    for path, params in [("/sse", {}), ("/sse", {"ticket": "x" * 43})]:
        async with hearth.session.get(url(path), params=params) as response:
            assert response.status == 401
            assert (await response.json())["ctrl"]["code"] == 401
    async with hearth.session.get(url("/sse"), headers={"Authorization": "Bearer nope"}) as r:
        assert r.status == 401
    async with hearth.session.post(url("/api/v1/sse/ticket")) as response:
        assert response.status == 401
        assert (await response.json())["ctrl"]["params"]["error"] == "AUTH_REQUIRED"
    async with hearth.session.post(url("/api/v1/rpc"), data='{"op":"ping","id":"1"}') as response:
        assert response.status == 401
    streams = hearth.app[sse.STREAMS]
    stale = await ticket(hearth, "alice")
    streams.clock = lambda: time.monotonic() + 31
    async with hearth.session.get(url("/sse"), params={"ticket": stale}) as response:
        assert response.status == 401
    streams.clock = time.monotonic
    # A client that can send headers needs no ticket; the token itself is never in a URL.
    async with hearth.session.get(
        url("/sse"), headers={"Authorization": f"Bearer {hearth.tokens['bob']}"}
    ) as response:
        assert response.status == 200
        first = await response.content.readline()
        assert first == b"retry: 2000\n"


async def test_rpc_refuses_unknown_and_foreign_sessions(make_hearth):
    """An rpc for a session this instance lacks is 404, for another user's session 403."""
    hearth = await make_hearth()
    alice = await stream(hearth, "alice")
    status, ctrl, _ = await rpc(hearth, "alice", "no-such-session", op="ping")
    assert (status, ctrl["params"]["error"], ctrl["text"]) == (404, "NOT_FOUND", "unknown session")
    status, ctrl, _ = await rpc(hearth, "bob", alice.session, op="ping")
    assert (status, ctrl["params"]["error"]) == (403, "FORBIDDEN")
    status, ctrl, _ = await rpc(hearth, "alice", alice.session, op="ping", id="p1")
    assert (status, ctrl["id"], ctrl["text"]) == (200, "p1", "pong")
    status, ctrl, _ = await rpc(hearth, "alice", alice.session, op="auth", token="t", id="a1")
    assert (status, ctrl["id"]) == (400, "a1")


async def test_pub_over_rpc_answers_in_the_post_and_the_frame_comes_on_the_stream(make_hearth):
    """A pub over rpc answers 200 {id, seq} in its response and its data event carries id lobby:<seq>; history frames come on the stream, the count in the response."""
    hearth = await make_hearth()
    alice = await stream(hearth, "alice")
    assert alice.hello["resumed"] is False
    status, ctrl, _ = await rpc(hearth, "alice", alice.session, op="sub", topic="room:lobby")
    assert status == 200 and ctrl["params"]["seq"] in (None, 0)
    for index in range(3):
        status, ctrl, _ = await rpc(
            hearth, "alice", alice.session, op="pub", topic="room:lobby",
            content=f"hi {index}", client_msg_id=f"c{index}",
        )  # fmt: skip
        assert status == 200 and ctrl["params"]["seq"] == index + 1, ctrl
    received = await alice.data(3)
    assert [event_id for event_id, _ in received] == ["lobby:1", "lobby:2", "lobby:3"]
    assert [data["content"] for _, data in received] == ["hi 0", "hi 1", "hi 2"]
    # A retried POST is safe: the same client_msg_id is the same message.
    status, ctrl, _ = await rpc(
        hearth, "alice", alice.session, op="pub", topic="room:lobby", content="hi 2",
        client_msg_id="c2",
    )  # fmt: skip
    assert status == 200 and ctrl["params"]["seq"] == 3
    status, ctrl, _ = await rpc(
        hearth, "alice", alice.session, op="history", topic="room:lobby", limit=2
    )
    assert status == 200 and ctrl["params"]["count"] == 2
    history = await alice.data(2)
    assert [data["seq"] for _, data in history] == [2, 3]
    status, ctrl, response = await rpc(
        hearth, "alice", alice.session, op="sub", topic="room:secret"
    )
    assert (status, ctrl["params"]["error"]) == (403, "ROOM_ACCESS_DENIED")
    assert "X-Trace-ID" in response.headers


async def test_websocket_and_sse_clients_in_one_room_get_every_message_once_in_order(
    make_hearth,
):
    """A WebSocket client and an SSE client publishing a burst into one room each receive all of it once, in seq order."""
    hearth = await make_hearth(**UNLIMITED)
    ws = await hearth.connect("alice")
    await ws.request("sub", topic="room:lobby")
    bob = await stream(hearth, "bob")
    await rpc(hearth, "bob", bob.session, op="sub", topic="room:lobby")

    async def ws_burst() -> None:
        for index in range(40):
            await ws.send(
                op="pub", topic="room:lobby", content=f"w{index}", client_msg_id=f"w{index}"
            )

    async def sse_burst() -> None:
        for index in range(40):
            status, _, _ = await rpc(
                hearth, "bob", bob.session, op="pub", topic="room:lobby", content=f"s{index}",
                client_msg_id=f"s{index}",
            )  # fmt: skip
            assert status == 200

    await asyncio.gather(ws_burst(), sse_burst())
    on_ws = await ws.data(80)
    on_sse = await bob.data(80)
    assert [frame["seq"] for frame in on_ws] == list(range(1, 81))
    assert [data["seq"] for _, data in on_sse] == list(range(1, 81))
    assert [event_id for event_id, _ in on_sse] == [f"lobby:{n}" for n in range(1, 81)]
    contents = [frame["content"] for frame in on_ws]
    assert [data["content"] for _, data in on_sse] == contents
    assert sorted(contents) == sorted([f"w{n}" for n in range(40)] + [f"s{n}" for n in range(40)])
    await ws.settle(0.5)
    assert not ws.take("data"), "a message came twice"


async def test_a_dropped_stream_resumes_by_last_event_id_without_gaps_or_repeats(make_hearth):
    """A stream dropped mid-burst and resumed with its ticket and Last-Event-ID gets every message of two rooms once, in order; past the resume window the ticket is refused."""
    hearth = await make_hearth(**UNLIMITED)
    publisher = await hearth.connect("root")
    bob = await stream(hearth, "bob")
    for room in ("lobby", "secret"):
        status, _, _ = await rpc(hearth, "bob", bob.session, op="sub", topic=f"room:{room}")
        assert status == 200

    async def publish(start: int, stop: int) -> None:
        for index in range(start, stop):
            room = "lobby" if index % 3 else "secret"
            ctrl = await publisher.request(
                "pub", topic=f"room:{room}", content=f"m{index}", client_msg_id=f"m{index}"
            )
            assert ctrl["code"] == 200

    await publish(0, 30)
    first = await bob.data(13)
    bob.response.close()  # the connection drops with events unread on the way
    await publish(30, 60)  # stored while the stream is down
    resumed = await stream(hearth, "bob", ticket_=bob.ticket, last_event_id=bob.last_event_id)
    assert resumed.session == bob.session and resumed.hello["resumed"] is True
    await publish(60, 75)
    second = await resumed.data(75 - 13)
    events = first + second
    for room, expected in [
        ("lobby", [f"m{n}" for n in range(75) if n % 3]),
        ("secret", [f"m{n}" for n in range(75) if not n % 3]),
    ]:
        got = [data for _, data in events if data["topic"] == f"room:{room}"]
        assert [data["content"] for data in got] == expected, room
        assert [data["seq"] for data in got] == list(range(1, len(expected) + 1)), room
    # Requests go on against the same session id on the new connection.
    status, ctrl, _ = await rpc(hearth, "bob", bob.session, op="ping")
    assert status == 200
    resumed.response.close()
    streams = hearth.app[sse.STREAMS]
    open_streams = hearth.app[keys.EVENT_STREAMS]
    await wait_until(lambda: not open_streams, 10, "the dropped stream noticed")
    streams.clock = lambda: time.monotonic() + hearth.app[keys.SETTINGS].sse_resume + 1
    async with hearth.session.get(
        hearth.server.make_url("/sse"),
        params={"ticket": bob.ticket},
        headers={"Last-Event-ID": resumed.last_event_id or ""},
    ) as response:
        assert response.status == 401
    status, ctrl, _ = await rpc(hearth, "bob", bob.session, op="ping")
    assert status == 404 and ctrl["text"] == "unknown session"


def test_resume_record_replays_from_the_oldest_known_position_for_an_unknown_id():
    """The resume record maps an event id to each room's position exactly, and an unknown or evicted id to the oldest positions it knows."""
    record = ResumeRecord(limit=4)
    record.subscribed(Topic("room", "a"), 10)
    record.subscribed(Topic("room", "b"), None)
    record.subscribed(Topic("status", "system_status"), None)
    for room, seq in [("a", 11), ("b", 1), ("a", 12), ("b", 2)]:
        record.wrote(room, seq)
    assert record.positions("a:12") == {"a": 12, "b": 1}
    assert record.positions("b:1") == {"a": 11, "b": 1}
    assert record.positions("zzz") == {"a": 10, "b": 0}
    assert record.positions(None) == {"a": 10, "b": 0}
    record.wrote("a", 13)  # a:11 leaves the window: a's oldest known position is now 11
    assert record.positions("nope") == {"a": 11, "b": 0}
    assert record.positions("a:13") == {"a": 13, "b": 2}
    record.unsubscribed(Topic("room", "b"))
    assert record.positions("a:13") == {"a": 13}


class StalledStream(StalledSocket):
    """A real event stream client on a tiny receive buffer that stops reading after its hello."""

    def __init__(self, port: int, ticket_: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(
            f"GET /sse?ticket={ticket_} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        received = b""
        while b'"session":"' not in received or not received.endswith(b"\n\n"):
            received += self.sock.recv(1)
        assert received.startswith(b"HTTP/1.1 200"), received
        self.session = received.split(b'"session":"')[1].split(b'"')[0].decode()


async def test_a_stalled_sse_reader_is_dropped_while_others_keep_receiving(make_hearth):
    """An SSE reader that stops reading is dropped with SLOW_CLIENT under the WebSocket's bounds while an SSE and a WebSocket reader get every message."""
    hearth = await make_hearth(**STALL_BOUNDS, **UNLIMITED)
    drops_before = metrics.SLOW_CLIENT_DROPS._value.get()
    stalled_ticket = await ticket(hearth, "carol")
    stalled = await asyncio.to_thread(StalledStream, hearth.server.port, stalled_ticket)
    status, _, _ = await rpc(hearth, "carol", stalled.session, op="sub", topic="room:lobby")
    assert status == 200
    reader = await stream(hearth, "bob")
    await rpc(hearth, "bob", reader.session, op="sub", topic="room:lobby")
    ws = await hearth.connect("bob")
    await ws.request("sub", topic="room:lobby")
    publisher = await hearth.connect("alice")
    payload = "x" * 3000
    for index in range(120):
        ctrl = await publisher.request(
            "pub", topic="room:lobby", content=payload, client_msg_id=f"f{index}"
        )
        assert ctrl["code"] == 200
    assert [data["seq"] for _, data in await reader.data(120, 30)] == list(range(1, 121))
    assert [frame["seq"] for frame in await ws.data(120, 30)] == list(range(1, 121))
    await wait_until(
        lambda: metrics.SLOW_CLIENT_DROPS._value.get() > drops_before, 15, "the stalled drop"
    )
    assert metrics.SLOW_CLIENT_DROPS._value.get() == drops_before + 1
    assert await asyncio.to_thread(stalled.closed_by_server, 10)
    registry = hearth.app[keys.REGISTRY]
    await wait_until(lambda: len(registry.subscribers["room:lobby"]) == 2, 10, "the leave")


async def test_rpc_during_a_postgres_hang_answers_typed_in_time(make_hearth, own_postgres):
    """With PostgreSQL SIGSTOPped, rpc requests answer within the deadline with a typed 202/503/504, never a 500 or a hang."""
    dsn = own_postgres.create_database("hung_rpc")
    hearth = await make_hearth(dsn, HEARTH_DB_TIMEOUT="1")
    alice = await stream(hearth, "alice")
    await rpc(hearth, "alice", alice.session, op="sub", topic="room:lobby")
    answers = {}
    with hung(own_postgres):
        for op, fields in [
            ("pub", {"topic": "room:lobby", "content": "during", "client_msg_id": "d1"}),
            ("history", {"topic": "room:lobby", "limit": 5}),
            ("sub", {"topic": "room:lobby", "since": 0}),
        ]:
            started = asyncio.get_running_loop().time()
            status, ctrl, response = await rpc(hearth, "alice", alice.session, op=op, **fields)
            answers[op] = (status, ctrl, response.headers.get("Retry-After"))
            assert asyncio.get_running_loop().time() - started < 1 + 1 + 0.5, (op, ctrl)
    assert answers["pub"][0] == 202 and answers["pub"][1]["params"]["queued"] is True
    for op in ("history", "sub"):
        status, ctrl, retry_after = answers[op]
        assert status in (503, 504) and status == ctrl["code"], ctrl
        assert ctrl["params"]["error"] in ("DATABASE_ERROR", "DATABASE_TIMEOUT"), ctrl
        assert retry_after is not None and int(retry_after) >= 1
    status, ctrl, _ = await rpc(hearth, "alice", alice.session, op="ping")
    assert status == 200


async def test_odd_unicode_over_rpc_is_answered_as_over_websocket(make_hearth):
    """A lone surrogate in content is the same 400 over rpc as over WebSocket, other odd text is stored intact, and the stream goes on."""
    hearth = await make_hearth()
    ws = await hearth.connect("bob")
    alice = await stream(hearth, "alice")
    await rpc(hearth, "alice", alice.session, op="sub", topic="room:lobby")
    lone = '{"op":"pub","id":"u1","topic":"room:lobby","content":"a\\ud800b","client_msg_id":"u1"}'
    async with hearth.session.post(
        hearth.server.make_url("/api/v1/rpc"),
        data=lone,
        headers={
            "Authorization": f"Bearer {hearth.tokens['alice']}",
            "X-Hearth-Session": alice.session,
        },
    ) as response:
        over_rpc = (response.status, (await response.json())["ctrl"])
    await ws.ws.send_str(lone)
    over_ws = (await ws.wait_for(lambda f: f.get("ctrl", {}).get("id") == "u1"))["ctrl"]
    assert over_rpc[0] == 400 == over_ws["code"]
    assert over_rpc[1]["text"] == over_ws["text"]
    odd = "line\nbreak\r\u2028\u2029 \x00 emoji 🔥 \ufeff"
    status, ctrl, _ = await rpc(
        hearth,
        "alice",
        alice.session,
        op="pub",
        topic="room:lobby",
        content=odd,
        client_msg_id="o1",
    )
    if status == 200:
        [(event_id, data)] = await alice.data(1)
        assert event_id == f"lobby:{ctrl['params']['seq']}" and data["content"] == odd
    else:
        assert status == 400  # refused as over WebSocket (NUL), and the stream goes on
    status, ctrl, _ = await rpc(
        hearth, "alice", alice.session, op="pub", topic="room:lobby", content="after",
        client_msg_id="o2",
    )  # fmt: skip
    assert status == 200
    [(_, data)] = await alice.data(1)
    assert data["content"] == "after"


async def test_the_connection_limit_counts_event_streams(make_hearth):
    """HEARTH_MAX_CONNECTIONS counts event streams: a stream and a WebSocket fill a limit of two, and a third client of either kind is refused 503."""
    hearth = await make_hearth(HEARTH_MAX_CONNECTIONS="2")
    await stream(hearth, "alice")
    await hearth.connect("bob")
    async with hearth.session.get(
        hearth.server.make_url("/sse"), params={"ticket": await ticket(hearth, "carol")}
    ) as response:
        assert response.status == 503
        assert (await response.json())["ctrl"]["params"]["retry_after"] == 5
    try:
        await hearth.session.ws_connect(hearth.server.make_url("/ws"))
    except aiohttp.WSServerHandshakeError as exc:
        assert exc.status == 503
    else:
        raise AssertionError("a third client got in")


async def test_keep_alive_comments_and_shutdown_reach_the_stream(make_hearth):
    """A stream gets a keep-alive comment every HEARTH_SSE_KEEPALIVE seconds, and SERVER_SHUTDOWN before it ends when the server drains; a draining server refuses new streams with 503."""
    hearth = await make_hearth(HEARTH_SSE_KEEPALIVE="0.2")
    alice = await stream(hearth, "alice")
    pending = asyncio.create_task(alice.ended(15))
    await wait_until(lambda: ": keep-alive" in alice.comments, 5, "a keep-alive comment")
    await drain(hearth.app)
    events = await pending
    assert events[-1]["data"]["event"]["data"]["code"] == "SERVER_SHUTDOWN"
    async with hearth.session.get(
        hearth.server.make_url("/sse"), params={"ticket": "anything"}
    ) as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "5"
