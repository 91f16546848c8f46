"""The WebSocket protocol over real sockets and a real PostgreSQL: every op and error path."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import keys
from tests.conftest import wait_until


@pytest.fixture
async def hearth(make_hearth):
    """hearth with a short auth timeout and publish limits out of the way."""
    return await make_hearth(
        HEARTH_AUTH_TIMEOUT="1.5",
        HEARTH_PUB_RATE="1000",
        HEARTH_PUB_BURST="1000",
        HEARTH_USER_PUB_RATE="1000",
        HEARTH_USER_PUB_BURST="1000",
    )


async def test_ops_before_auth_get_401_authentication_required(hearth):
    """Any op before auth is answered 401 "authentication required" and the socket stays open."""
    client = await hearth.connect(user=None)
    for op in ("ping", "sub", "pub", "history", "presence", "unsub"):
        ctrl = await client.request(op, topic="room:lobby", content="x", client_msg_id="c")
        assert (ctrl["code"], ctrl["text"], ctrl["params"]["error"]) == (
            401, "authentication required", "AUTH_REQUIRED"
        )  # fmt: skip
    ctrl = await client.request("auth", token=hearth.tokens["alice"])
    assert ctrl["code"] == 200 and ctrl["params"]["user"]["username"] == "alice"
    assert (await client.request("ping"))["text"] == "pong"


async def test_three_bad_tokens_close_with_1008(hearth):
    """Bad tokens get 401 "authentication failed"; the third failure closes the socket with 1008."""
    client = await hearth.connect(user=None)
    for _ in range(2):
        ctrl = await client.request("auth", token="forged")
        assert (ctrl["code"], ctrl["text"]) == (401, "authentication failed")
    ctrl = await client.request("auth", token="forged")
    assert ctrl["code"] == 401
    message = await client.ws.receive(timeout=5)
    assert message.type is aiohttp.WSMsgType.CLOSE and message.data == 1008


async def test_no_auth_within_timeout_closes_with_1008(hearth):
    """A socket that never authenticates is closed with 1008 after the auth timeout."""
    client = await hearth.connect(user=None)
    message = await client.ws.receive(timeout=5)
    assert message.type is aiohttp.WSMsgType.CLOSE and message.data == 1008


async def test_pub_is_stored_fanned_out_and_idempotent(hearth):
    """pub answers 200 {id, seq}, reaches subscribers, and a repeated client_msg_id changes nothing."""
    alice, bob = await hearth.connect("alice"), await hearth.connect("bob")
    assert (await bob.request("sub", topic="room:lobby"))["params"] == {"seq": 0}
    ctrl = await alice.request("pub", topic="room:lobby", content="hi bob", client_msg_id="m1")
    assert ctrl["code"] == 200 and ctrl["params"]["seq"] == 1
    [data] = await bob.data(1)
    assert data["id"] == ctrl["params"]["id"] and data["content"] == "hi bob"
    assert (data["from"], data["topic"], data["seq"], data["client_msg_id"]) == (
        "alice", "room:lobby", 1, "m1"
    )  # fmt: skip
    again = await alice.request("pub", topic="room:lobby", content="hi bob", client_msg_id="m1")
    assert again["code"] == 200 and again["params"] == ctrl["params"]
    await bob.request("ping")  # anything sent before the pong has arrived by now
    assert bob.take("data") == [], "a repeated publish must not be fanned out again"
    history = await bob.request("history", topic="room:lobby", since=0)
    assert history["params"]["count"] == 1


async def test_validation_errors_are_400_and_store_nothing(hearth):
    """Too-long, empty and wrong-typed content get 400 with specific codes; nothing is stored."""
    client = await hearth.connect("alice")
    too_long = await client.request(
        "pub", topic="room:lobby", content="x" * 4097, client_msg_id="a"
    )
    assert too_long["code"] == 400 and too_long["params"]["error"] == "MESSAGE_TOO_LONG"
    for content in ("", 42, ["x"], "nul\x00byte"):
        ctrl = await client.request("pub", topic="room:lobby", content=content, client_msg_id="b")
        assert ctrl["code"] == 400 and ctrl["params"]["error"] == "INVALID_MESSAGE", content
    status = await client.request("pub", topic="status:system", content="x", client_msg_id="c")
    assert status["code"] == 400
    assert (await client.request("sub", topic="room:lobby"))["params"]["seq"] == 0


async def test_private_room_admits_members_only(hearth):
    """A private room gives non-members 403 ROOM_ACCESS_DENIED; members and admins get in."""
    alice, bob, root = [await hearth.connect(name) for name in ("alice", "bob", "root")]
    for op in ("sub", "history"):
        ctrl = await alice.request(op, topic="room:secret")
        assert (ctrl["code"], ctrl["params"]["error"]) == (403, "ROOM_ACCESS_DENIED")
    ctrl = await alice.request("pub", topic="room:secret", content="let me in", client_msg_id="x")
    assert ctrl["code"] == 403
    assert (await bob.request("sub", topic="room:secret"))["code"] == 200
    assert (await root.request("sub", topic="room:secret"))["code"] == 200
    missing = await bob.request("sub", topic="room:nowhere")
    assert missing["code"] == 404


async def test_unsub_and_presence(hearth):
    """Presence lists subscribed users, announces joins and leaves, and unsub of nothing is 404."""
    alice, bob = await hearth.connect("alice"), await hearth.connect("bob")
    await alice.request("sub", topic="room:lobby")
    await bob.request("sub", topic="room:lobby")
    joined = await alice.wait_for(
        lambda f: f.get("event", {}).get("data", {}).get("joined") == "bob"
    )
    assert joined["event"]["type"] == "presence"
    assert joined["event"]["data"] == {"topic": "room:lobby", "joined": "bob"}
    ctrl = await alice.request("presence", topic="room:lobby")
    assert ctrl["params"]["users"] == ["alice", "bob"]
    assert (await bob.request("unsub", topic="room:lobby"))["code"] == 200
    left = await alice.wait_for(lambda f: "left" in f.get("event", {}).get("data", {}))
    assert left["event"]["data"] == {"topic": "room:lobby", "left": "bob"}
    assert (await bob.request("unsub", topic="room:lobby"))["code"] == 404


async def test_unexpected_disconnect_becomes_presence_left(hearth):
    """A client whose socket drops without a close handshake shows up as presence left."""
    alice, bob = await hearth.connect("alice"), await hearth.connect("bob")
    await alice.request("sub", topic="room:lobby")
    await bob.request("sub", topic="room:lobby")
    await alice.wait_for(lambda f: f.get("event", {}).get("data", {}).get("joined") == "bob")
    bob.ws._response.connection.transport.abort()  # a real dropped TCP connection
    left = await alice.wait_for(lambda f: f.get("event", {}).get("data", {}).get("left") == "bob")
    assert left["event"]["type"] == "presence"
    await bob.ws.close()


async def test_history_before_and_since(hearth):
    """history sends data frames in seq order, then ctrl 200 with the count."""
    client = await hearth.connect("alice")
    for index in range(1, 8):
        await client.request(
            "pub", topic="room:lobby", content=f"n{index}", client_msg_id=f"h{index}"
        )
    ctrl = await client.request("history", topic="room:lobby", before=6, limit=3)
    assert ctrl["params"]["count"] == 3
    assert [d["seq"] for d in client.take("data")] == [3, 4, 5]
    ctrl = await client.request("history", topic="room:lobby", since=5)
    assert ctrl["params"]["count"] == 2
    assert [d["content"] for d in client.take("data")] == ["n6", "n7"]


async def test_history_recovery_after_disconnect(hearth):
    """A client that missed 50 messages gets exactly those 50, in order, with sub since."""
    reader, writer = await hearth.connect("bob"), await hearth.connect("alice")
    await reader.request("sub", topic="room:lobby")
    await writer.request("pub", topic="room:lobby", content="before", client_msg_id="p0")
    [seen] = await reader.data(1)
    await reader.ws.close()
    for index in range(1, 51):
        await writer.request(
            "pub", topic="room:lobby", content=f"missed {index}", client_msg_id=f"p{index}"
        )
    reader = await hearth.connect("bob")
    ctrl = await reader.request("sub", topic="room:lobby", since=seen["seq"])
    assert ctrl["params"]["seq"] == 51
    live = asyncio.create_task(
        writer.request("pub", topic="room:lobby", content="live", client_msg_id="p51")
    )
    frames = await reader.data(51)
    await live
    assert [f["content"] for f in frames] == [f"missed {i}" for i in range(1, 51)] + ["live"]
    assert [f["seq"] for f in frames] == list(range(2, 53))


async def test_bad_frames_get_400_and_the_socket_stays_open(hearth):
    """Non-JSON, binary, unknown ops and wrong types get 400 with specific texts; the socket lives on."""
    client = await hearth.connect("alice")
    await client.ws.send_str("{not json")
    assert (await client.receive())["ctrl"]["text"] == "invalid JSON"
    await client.ws.send_bytes(b"\x00\x01")
    assert (await client.receive())["ctrl"]["text"] == "binary frames are not supported"
    assert (await client.request("dance"))["text"] == "unknown op"
    assert (await client.request("sub", topic=7))["text"] == "topic must be a string"
    assert (await client.request("ping"))["code"] == 200


async def test_oversized_frame_closes_with_1009(hearth):
    """A frame over the maximum size closes the connection with 1009."""
    client = await hearth.connect("alice")
    await client.ws.send_str(json.dumps({"op": "ping", "id": "x", "pad": "y" * 70_000}))
    message = await client.ws.receive(timeout=5)
    assert message.type is aiohttp.WSMsgType.CLOSE and message.data == 1009


async def test_rate_limit_gives_429_with_retry_after_and_stores_nothing(make_hearth):
    """Past the per-connection burst, pub gets 429 with retry_after and the message is not stored."""
    hearth = await make_hearth(HEARTH_PUB_RATE="0.5", HEARTH_PUB_BURST="3")
    client = await hearth.connect("alice")
    codes = []
    for index in range(5):
        ctrl = await client.request(
            "pub", topic="room:lobby", content="spam", client_msg_id=f"s{index}"
        )
        codes.append(ctrl["code"])
    assert codes == [200, 200, 200, 429, 429]
    assert ctrl["params"]["error"] == "RATE_LIMIT_EXCEEDED" and ctrl["params"]["retry_after"] >= 1
    assert ctrl["text"] == "rate limit exceeded"
    assert (await client.request("history", topic="room:lobby", since=0))["params"]["count"] == 3


async def test_per_user_limit_spans_connections(make_hearth):
    """The per-user bucket is shared by all of a user's connections."""
    hearth = await make_hearth(HEARTH_USER_PUB_RATE="0.5", HEARTH_USER_PUB_BURST="2")
    first, second = await hearth.connect("alice"), await hearth.connect("alice")
    codes = [
        (await client.request("pub", topic="room:lobby", content="x", client_msg_id=f"u{i}"))[
            "code"
        ]
        for i, client in enumerate([first, second, first, second])
    ]
    assert codes == [200, 200, 429, 429]


async def test_cross_site_origin_is_refused_with_403(hearth):
    """A WebSocket from another site's page is refused before the handshake; same-origin is fine."""
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await hearth.connect(user=None, origin="https://evil.example")
    assert caught.value.status == 403
    host = hearth.server.make_url("/").authority
    client = await hearth.connect("alice", origin=f"http://{host}")
    assert (await client.request("ping"))["code"] == 200


async def test_heartbeat_reaches_every_client(make_hearth):
    """Heartbeat events arrive on the interval with the number of connected clients."""
    hearth = await make_hearth(HEARTH_HEARTBEAT_INTERVAL="0.2")
    client = await hearth.connect("alice")
    beat = await client.wait_for(lambda f: f.get("event", {}).get("type") == "heartbeat")
    assert beat["event"]["data"]["clients_connected"] >= 1
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", beat["event"]["data"]["timestamp"]
    )
    assert "system_status" in beat["event"]["data"]["feeds"]


async def test_exactly_one_ctrl_per_request_id(hearth):
    """A burst of mixed requests, valid and not, yields exactly one ctrl per request id."""
    client = await hearth.connect("alice")
    await client.request("sub", topic="room:lobby")
    sent = []
    for index in range(30):
        kind = index % 5
        if kind == 0:
            sent.append(
                await client.send(
                    op="pub", topic="room:lobby", content=f"b{index}", client_msg_id=f"b{index}"
                )
            )
        elif kind == 1:
            sent.append(await client.send(op="ping"))
        elif kind == 2:
            sent.append(await client.send(op="sub", topic="room:nope"))
        elif kind == 3:
            sent.append(await client.send(op="bogus"))
        else:
            sent.append(await client.send(op="history", topic="room:lobby", limit=2))
    await client.request("ping")
    await asyncio.sleep(0.2)
    ctrl_ids = [f["ctrl"]["id"] for f in client.inbox if "ctrl" in f]
    while True:
        try:
            frame = await client.receive(timeout=0.3)
        except TimeoutError:
            break
        if "ctrl" in frame:
            ctrl_ids.append(frame["ctrl"]["id"])
    assert sorted(ctrl_ids) == sorted(sent)


garbage = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.dictionaries(
        st.sampled_from(["op", "id", "topic", "content", "since", "limit", "client_msg_id"]),
        st.one_of(
            st.none(), st.integers(), st.text(max_size=30), st.lists(st.integers(), max_size=3)
        ),
    ).map(json.dumps),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(frames=st.lists(garbage, min_size=1, max_size=5))
async def test_garbage_frames_get_400_and_never_hurt_others(hearth, frames):
    """Hypothesis garbage frames get a ctrl each, never crash the server and never close another client."""
    bystander = hearth._bystander if hasattr(hearth, "_bystander") else None
    if bystander is None:
        bystander = hearth._bystander = await hearth.connect("bob")
        await bystander.request("sub", topic="room:lobby")
    attacker = await hearth.connect("carol")
    for text in frames:
        await attacker.ws.send_str(text)
    ctrl = await attacker.request("ping")
    assert ctrl["code"] == 200
    for frame in attacker.take("ctrl"):
        assert frame["code"] in (200, 400, 403, 404), frame
    assert (await bystander.request("ping"))["code"] == 200
    assert hearth.app[keys.SUPERVISOR].ready
    await attacker.ws.close()


async def test_trace_id_flows_from_frame_through_hub_into_store_logs(make_hearth):
    """A frame's trace_id reaches the log lines the hub and the store write for it."""
    import io

    from app.log import setup_logging

    hearth = await make_hearth(HEARTH_SLOW_QUERY_MS="0")
    client = await hearth.connect("alice")
    stream = io.StringIO()
    setup_logging(level="INFO", stream=stream)
    try:
        ctrl = await client.request(
            "pub", topic="room:lobby", content="traced", client_msg_id="t1", trace_id="trace-abc"
        )
    finally:
        setup_logging(level="INFO")
    assert ctrl["code"] == 200
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    # Every query is "slow" at 0 ms; the DbMonitor's pings are untraced, so look at messages.
    store_lines = [
        r for r in records
        if r["component"] == "store" and r["msg"] == "slow query" and r.get("table") == "messages"
    ]  # fmt: skip
    assert store_lines and all(r.get("trace_id") == "trace-abc" for r in store_lines)


def ctrls_by_id(client) -> dict[str, list[dict]]:
    """Every buffered ctrl body, grouped by request id."""
    grouped: dict[str, list[dict]] = {}
    for ctrl in client.take("ctrl"):
        grouped.setdefault(ctrl["id"], []).append(ctrl)
    return grouped


async def test_frame_of_exactly_the_maximum_size_is_served(hearth):
    """A frame of exactly HEARTH_WS_MAX_MSG_SIZE bytes is served; one byte more closes with 1009."""
    client = await hearth.connect("alice")
    limit = hearth.app[keys.SETTINGS].ws_max_msg_size
    skeleton = json.dumps({"op": "ping", "id": "exact", "pad": ""})
    exact = json.dumps({"op": "ping", "id": "exact", "pad": "y" * (limit - len(skeleton))})
    assert len(exact.encode()) == limit
    await client.ws.send_str(exact)
    assert (await client.receive())["ctrl"]["code"] == 200
    await client.ws.send_str(exact[:-2] + 'y"}')
    message = await client.ws.receive(timeout=5)
    assert message.type is aiohttp.WSMsgType.CLOSE and message.data == 1009


async def test_hung_postgres_gets_typed_answers_never_500_and_one_ctrl_each(
    make_hearth, own_postgres, capfd
):
    """With PostgreSQL SIGSTOPped past every timeout, every op gets exactly one typed ctrl in time, none 500, and nothing reaches stderr."""
    from tests.conftest import hung

    dsn = own_postgres.create_database("hung_ops")
    hearth = await make_hearth(dsn, HEARTH_DB_TIMEOUT="1")
    client = await hearth.connect("alice")
    writer = await hearth.connect("bob")
    await writer.request("pub", topic="room:lobby", content="before", client_msg_id="b0")
    answers = {}
    with hung(own_postgres):
        for op, fields in [
            ("pub", {"topic": "room:lobby", "content": "during", "client_msg_id": "d1"}),
            ("sub", {"topic": "room:lobby"}),
            ("presence", {"topic": "room:lobby"}),
            ("sub", {"topic": "room:lobby", "since": 0}),
            ("history", {"topic": "room:lobby", "limit": 5}),
            ("unsub", {"topic": "room:lobby"}),
        ]:
            started = asyncio.get_running_loop().time()
            ctrl = await client.request(op, timeout=10, **fields)
            answers[(op, "since" in fields)] = ctrl
            assert asyncio.get_running_loop().time() - started < 1 + 1 + 0.3, (op, ctrl)
        await asyncio.sleep(2.5)  # longer than every timeout: late answers would show now
    await client.settle(1.0)
    assert answers[("pub", False)]["code"] == 202
    assert answers[("sub", False)]["code"] == 200
    assert answers[("presence", False)]["params"]["users"] == ["alice"]
    for key in (("sub", True), ("history", False)):
        ctrl = answers[key]
        assert ctrl["code"] in (503, 504), ctrl
        assert ctrl["params"]["error"] in ("DATABASE_ERROR", "DATABASE_TIMEOUT"), ctrl
        assert ctrl["params"]["retry_after"] > 0
    assert ctrls_by_id(client) == {}, "a request got a second ctrl"
    assert not client.take("event", lambda e: e["type"] == "resync")
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Task exception" not in err


async def test_stopped_postgres_sub_since_and_history_get_one_503(make_hearth, own_postgres):
    """With PostgreSQL stopped, sub since and history each get one 503 DATABASE_ERROR and nothing else."""
    dsn = own_postgres.create_database("stopped_ops")
    hearth = await make_hearth(dsn)
    client = await hearth.connect("alice")
    await asyncio.to_thread(own_postgres.stop, "fast")
    for op, fields in [("sub", {"since": 0}), ("history", {})]:
        ctrl = await client.request(op, topic="room:lobby", **fields)
        assert (ctrl["code"], ctrl["params"]["error"]) == (503, "DATABASE_ERROR"), ctrl
        assert ctrl["params"]["retry_after"] > 0
    await client.settle(1.0)
    assert ctrls_by_id(client) == {}
    assert not client.take("event", lambda e: e["type"] == "resync")
    assert hearth.app[keys.REGISTRY].subscribers.get("room:lobby") is None
    await asyncio.to_thread(own_postgres.start)


async def test_rooms_made_at_runtime_work_at_once_and_through_an_outage(make_hearth, own_postgres):
    """A room created (or a member added) over the API is usable at once, and the first publish to it during an outage is spooled, not refused."""
    dsn = own_postgres.create_database("cold_rooms")
    hearth = await make_hearth(dsn)
    admin = {"Authorization": f"Bearer {hearth.tokens['root']}"}
    for body in ({"name": "fresh"}, {"name": "vault", "private": True}):
        async with hearth.session.post(f"{hearth.url}api/v1/rooms", json=body, headers=admin) as r:
            assert r.status == 201
    alice = await hearth.connect("alice")
    ctrl = await alice.request("sub", topic="room:vault")
    assert ctrl["code"] == 403
    url = f"{hearth.url}api/v1/rooms/vault/members"
    async with hearth.session.post(url, json={"username": "alice"}, headers=admin) as response:
        assert response.status == 200
    assert (await alice.request("sub", topic="room:vault"))["code"] == 200
    ctrl = await alice.request("pub", topic="room:fresh", content="hot", client_msg_id="f0")
    assert ctrl["code"] == 200
    await asyncio.to_thread(own_postgres.stop, "fast")
    for room in ("fresh", "vault"):
        ctrl = await alice.request(
            "pub", topic=f"room:{room}", content="cold", client_msg_id=f"{room}1"
        )
        assert ctrl["code"] == 202, ctrl
    await asyncio.to_thread(own_postgres.start)
    await wait_until(lambda: hearth.app[keys.SPOOL].depth == 0, 20, "the spool to drain")


async def test_private_room_presence_is_for_members_only(make_hearth, own_postgres):
    """presence on a private room is 403 for a non-member, during an outage too; members see who is there."""
    dsn = own_postgres.create_database("presence_private")
    hearth = await make_hearth(dsn)
    alice, bob = await hearth.connect("alice"), await hearth.connect("bob")
    assert (await bob.request("sub", topic="room:secret"))["code"] == 200
    ctrl = await alice.request("presence", topic="room:secret")
    assert (ctrl["code"], ctrl["params"]["error"]) == (403, "ROOM_ACCESS_DENIED")
    assert (await bob.request("presence", topic="room:secret"))["params"]["users"] == ["bob"]
    await asyncio.to_thread(own_postgres.stop, "fast")
    ctrl = await alice.request("presence", topic="room:secret")
    assert ctrl["code"] == 403, ctrl
    await asyncio.to_thread(own_postgres.start)


async def test_sub_to_an_unknown_status_feed_is_404(hearth):
    """sub to a status topic no feed serves is 404; the built-in system_status is 200."""
    client = await hearth.connect("alice")
    ctrl = await client.request("sub", topic="status:no_such_feed")
    assert (ctrl["code"], ctrl["params"]["error"]) == (404, "NOT_FOUND")
    assert (await client.request("sub", topic="status:system_status"))["code"] == 200


async def test_clients_that_subscribe_and_vanish_leave_nothing_behind(hearth):
    """Twenty clients that subscribe and drop at once, with the rooms table locked elsewhere, leave no connection, subscriber or presence behind."""
    import aiopg

    async with aiopg.connect(hearth.database) as locker, locker.cursor() as cursor:
        await cursor.execute("BEGIN")
        await cursor.execute("LOCK TABLE rooms IN ACCESS EXCLUSIVE MODE")
        clients = [await hearth.connect("carol") for _ in range(20)]
        for client in clients:
            await client.send(op="sub", topic="room:lobby")
        for client in clients:
            client.ws._response.connection.transport.abort()
        registry = hearth.app[keys.REGISTRY]
        await wait_until(lambda: not registry.connections, 10, "every connection to leave")
        await cursor.execute("ROLLBACK")
    assert registry.subscribers.get("room:lobby") is None
    assert "carol" not in registry.present.get("room:lobby", {})
    watcher = await hearth.connect("alice")
    await watcher.request("sub", topic="room:lobby")
    assert (await watcher.request("presence", topic="room:lobby"))["params"]["users"] == ["alice"]


async def test_an_auth_slowed_by_the_database_past_the_auth_timeout_is_not_a_logout(
    make_hearth, pg_proxy, database
):
    """An auth still waiting on a slow token query when HEARTH_AUTH_TIMEOUT passes is answered (200) and the socket stays open: 1008 would tell the client to log in again."""
    import time

    hearth = await make_hearth(
        pg_proxy.dsn(database), HEARTH_AUTH_TIMEOUT="1", HEARTH_DB_TIMEOUT="4"
    )
    client = await hearth.connect(user=None)
    pg_proxy.delay_next_reply(b"FROM auth_tokens", 2.0)
    started = time.monotonic()
    ctrl = await client.request("auth", token=hearth.tokens["alice"], timeout=10)
    assert ctrl["code"] == 200, ctrl
    assert time.monotonic() - started > 1.5  # it did outlast the auth timeout
    assert pg_proxy.delayed_replies == 1
    assert (await client.request("ping"))["text"] == "pong"
    assert client.ws.close_code is None
