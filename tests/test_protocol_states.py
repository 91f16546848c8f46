"""A stateful hypothesis model of the protocol, run against a real server and real sockets."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import defaultdict

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from app import keys
from tests.conftest import Hearth, start_hearth

USERS = ["alice", "bob"]
#: Room roles in the model: a public room, a private one with bob as member, a missing one.
ROLES = ["public", "private", "missing"]


class LoopThread:
    """An event loop in a thread, so synchronous hypothesis rules can drive async clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30):
        """Run *coro* on the loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Stop the loop and its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class ProtocolMachine(RuleBasedStateMachine):
    """Two users sub, unsub and pub in random order; replies, fan-out and history follow the model."""

    #: Set by the test before running: the loop thread and the running server.
    runner: LoopThread
    hearth: Hearth
    examples = itertools.count(1)

    @initialize()
    def connect(self) -> None:
        example = next(self.examples)
        # Fresh rooms per example, so seqs start at 1 whatever earlier examples stored.
        self.rooms = {
            "public": f"pub{example}", "private": f"priv{example}", "missing": f"gone{example}"
        }  # fmt: skip
        self.run(self._create_rooms())
        self.clients = {user: self.run(self.hearth.connect(user)) for user in USERS}
        self.subscribed: dict[str, set[str]] = defaultdict(set)
        self.stored: dict[str, list[str]] = defaultdict(list)
        self.replies: dict[tuple[str, str], dict] = {}
        self.last_id: dict[str, str] = {}
        self.ids = (f"e{example}-{n}" for n in itertools.count(1))

    def run(self, coro):
        return self.runner.run(coro)

    async def _create_rooms(self) -> None:
        headers = {"Authorization": f"Bearer {self.hearth.tokens['root']}"}
        url = f"{self.hearth.url}api/v1/rooms"
        for role, private in (("public", False), ("private", True)):
            body = {"name": self.rooms[role], "private": private}
            async with self.hearth.session.post(url, json=body, headers=headers) as response:
                assert response.status == 201
        members = f"{url}/{self.rooms['private']}/members"
        async with self.hearth.session.post(
            members, json={"username": "bob"}, headers=headers
        ) as response:
            assert response.status == 200

    def teardown(self) -> None:
        for client in getattr(self, "clients", {}).values():
            self.run(client.ws.close())

    @staticmethod
    def allowed(user: str, role: str) -> bool:
        return role == "public" or (role == "private" and user == "bob")

    def expect_refusal(self, ctrl: dict, user: str, role: str) -> bool:
        """Check a refusal the model predicts; True when the request was refused."""
        if role == "missing":
            assert ctrl["code"] == 404, ctrl
            return True
        if not self.allowed(user, role):
            assert (ctrl["code"], ctrl["params"]["error"]) == (403, "ROOM_ACCESS_DENIED"), ctrl
            return True
        return False

    @rule(user=st.sampled_from(USERS), role=st.sampled_from(ROLES))
    def sub(self, user: str, role: str) -> None:
        room = self.rooms[role]
        ctrl = self.run(self.clients[user].request("sub", topic=f"room:{room}"))
        if self.expect_refusal(ctrl, user, role):
            return
        assert ctrl["code"] == 200 and ctrl["params"]["seq"] == len(self.stored[room])
        self.subscribed[user].add(room)

    @rule(user=st.sampled_from(USERS), role=st.sampled_from(ROLES))
    def unsub(self, user: str, role: str) -> None:
        room = self.rooms[role]
        ctrl = self.run(self.clients[user].request("unsub", topic=f"room:{room}"))
        assert ctrl["code"] == (200 if room in self.subscribed[user] else 404)
        self.subscribed[user].discard(room)

    @rule(user=st.sampled_from(USERS), role=st.sampled_from(ROLES), repeat=st.booleans())
    def pub(self, user: str, role: str, repeat: bool) -> None:
        room = self.rooms[role]
        client_msg_id = self.last_id[user] if repeat and user in self.last_id else next(self.ids)
        content = f"{user} says {client_msg_id}"
        ctrl = self.run(
            self.clients[user].request(
                "pub", topic=f"room:{room}", content=content, client_msg_id=client_msg_id
            )
        )
        if self.expect_refusal(ctrl, user, role):
            return
        assert ctrl["code"] == 200, ctrl
        key = (user, client_msg_id)
        if key in self.replies:
            assert ctrl["params"] == self.replies[key], (
                "a repeated publish must get the same answer"
            )
            return
        self.replies[key] = ctrl["params"]
        self.last_id[user] = client_msg_id
        self.stored[room].append(content)
        assert ctrl["params"]["seq"] == len(self.stored[room])
        for reader, rooms in self.subscribed.items():
            if room in rooms:
                [frame] = self.run(self.clients[reader].data(1))
                assert (frame["id"], frame["seq"]) == (ctrl["params"]["id"], ctrl["params"]["seq"])

    @invariant()
    def history_matches_the_model(self) -> None:
        if not hasattr(self, "clients"):
            return
        for role, user in (("public", "alice"), ("private", "bob")):
            room = self.rooms[role]
            client = self.clients[user]
            ctrl = self.run(client.request("history", topic=f"room:{room}", since=0, limit=100))
            topic = f"room:{room}"
            contents = [
                d["content"] for d in client.take("data", lambda d, t=topic: d["topic"] == t)
            ]
            assert ctrl["params"]["count"] == len(self.stored[room])
            assert contents == self.stored[room]

    @invariant()
    def server_subscriptions_match_the_model(self) -> None:
        if not hasattr(self, "clients"):
            return
        registry = self.hearth.app[keys.REGISTRY]
        for user in USERS:
            topics = {f"room:{room}" for room in self.subscribed[user]}
            [connection] = [c for c in registry.connections if c.username == user]
            assert connection.topics == topics


@pytest.fixture
def loop_thread():
    """A background event loop for the state machine."""
    runner = LoopThread()
    yield runner
    runner.close()


def test_protocol_state_machine(loop_thread, postgres, tmp_path):
    """Random runs of sub, unsub and pub keep replies, fan-out, history and server subscriptions in line with the model."""
    database = postgres.create_database("protocol_states")
    unlimited = {name: "100000" for name in (
        "HEARTH_PUB_RATE", "HEARTH_PUB_BURST", "HEARTH_USER_PUB_RATE", "HEARTH_USER_PUB_BURST"
    )}  # fmt: skip
    hearth = loop_thread.run(start_hearth(database, tmp_path / "spool", **unlimited))
    ProtocolMachine.runner, ProtocolMachine.hearth = loop_thread, hearth
    try:
        case = ProtocolMachine.TestCase
        case.settings = settings(
            max_examples=12, stateful_step_count=10, deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        )  # fmt: skip
        case("runTest").runTest()
    finally:
        loop_thread.run(hearth.close())
