"""A client's outbound side: ordering, conflation, backlog bounds, send timeouts, write errors."""

from __future__ import annotations

import asyncio
import json

from app.connection import CLOSE_TRY_AGAIN_LATER, Connection, Limits


class Peer:
    """The far end of a connection: records frames and closes; can stall or fail sends."""

    def __init__(self) -> None:
        self.frames: list[str] = []
        self.closes: list[tuple[int, bytes]] = []
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.failures = 0

    async def send(self, frame: str) -> None:
        await self.flowing.wait()
        if self.failures:
            self.failures -= 1
            raise ConnectionResetError("peer reset")
        self.frames.append(frame)

    async def close(self, *, code: int, message: bytes) -> None:
        self.closes.append((code, message))


async def settle() -> None:
    """Let the writer task run until it has nothing left to do."""
    for _ in range(20):
        await asyncio.sleep(0)


def connection_for(peer: Peer, **limits) -> Connection:
    """A started connection writing to *peer*."""
    connection = Connection(peer.send, peer.close, limits=Limits(**limits))
    connection.start()
    return connection


async def test_frames_go_out_in_order():
    """Offered frames reach the peer in the order they were offered."""
    peer = Peer()
    connection = connection_for(peer)
    for index in range(10):
        assert connection.offer(f"f{index}")
    await settle()
    assert peer.frames == [f"f{index}" for index in range(10)]
    await connection.closed_by_peer()


async def test_status_frames_are_conflated_for_a_lagging_client():
    """A lagging client gets only the newest value of each feed, never a queue of old ones."""
    peer = Peer()
    connection = connection_for(peer, max_messages=5)
    peer.flowing.clear()
    connection.offer("room-1")
    await settle()
    for value in range(500):
        connection.offer_latest("status:system", f"system {value}")
        connection.offer_latest("status:agents", f"agents {value}")
    assert not connection.closed
    peer.flowing.set()
    await settle()
    assert peer.frames == ["room-1", "system 499", "agents 499"]
    await connection.closed_by_peer()


async def test_warning_at_high_water_then_drop_at_hard_limit():
    """Room frames past half the bound bring one SLOW_CLIENT warning; past the bound, a 1013 close."""
    peer = Peer()
    connection = connection_for(peer, max_messages=10, warn_ratio=0.5)
    await settle()
    peer.flowing.clear()
    assert all(connection.offer(f"m{index}") for index in range(5))
    peer.flowing.set()
    await settle()
    warnings = [json.loads(f)["event"]["data"] for f in peer.frames if f.startswith("{")]
    assert [w["code"] for w in warnings] == ["SLOW_CLIENT"] and warnings[0]["severity"] == "warning"
    assert not connection.closed

    peer.flowing.clear()
    accepted = [connection.offer(f"n{index}") for index in range(11)]
    assert accepted[:10] == [True] * 10 and accepted[10] is False
    assert connection.closed and connection.closed_reason == "slow client"
    peer.flowing.set()
    await connection.closed_by_peer()
    farewell = json.loads(peer.frames[-1])["event"]["data"]
    assert farewell["code"] == "SLOW_CLIENT"
    assert peer.closes == [(CLOSE_TRY_AGAIN_LATER, b"slow client")]


async def test_byte_bound_drops_a_client_too():
    """A backlog over the byte bound drops the client even with few frames."""
    peer = Peer()
    connection = connection_for(peer, max_bytes=1024)
    peer.flowing.clear()
    assert connection.offer("x" * 1000)
    assert not connection.offer("y" * 100)
    assert connection.closed
    peer.flowing.set()
    await connection.closed_by_peer()


async def test_send_timeout_evicts_and_cancels_the_pending_send():
    """A send stuck past its timeout is cancelled and the client closed with 1013."""
    peer = Peer()
    connection = connection_for(peer, send_timeout=0.05)
    peer.flowing.clear()
    connection.offer("stuck")
    await asyncio.sleep(0.2)
    assert connection.closed_reason == "slow client"
    await connection.closed_by_peer()
    assert peer.closes and peer.closes[0][0] == CLOSE_TRY_AGAIN_LATER
    assert connection._writer is None  # the pending send ended, and its task was let go


async def test_three_consecutive_write_errors_close_the_client():
    """Three failed writes in a row close the client; a success in between resets the count."""
    peer = Peer()
    connection = connection_for(peer)
    peer.failures = 2
    for index in range(3):
        connection.offer(f"a{index}")
    await settle()
    assert not connection.closed and peer.frames == ["a2"]
    peer.failures = 3
    for index in range(3):
        connection.offer(f"b{index}")
    await settle()
    await connection.closed_by_peer()
    assert connection.closed_reason == "write errors"
    assert peer.closes[0][0] == CLOSE_TRY_AGAIN_LATER


async def test_shutdown_drains_backlog_before_farewell():
    """A shut with drain sends what was queued, then closes with the given code."""
    peer = Peer()
    connection = connection_for(peer)
    connection.offer("last words")
    connection.shut(1001, "server shutdown", drain=1.0)
    await connection.closed_by_peer()
    assert peer.frames == ["last words"]
    assert peer.closes == [(1001, b"server shutdown")]
