"""The load generator: raw aiohttp WebSockets (or hearth's SSE streams) in one asyncio process.

It runs on the client core. A subscriber parses only what it must: it finds the publisher's
embedded send time with a substring search, never decoding JSON, on either transport.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import resource
import socket
import struct
import time
from dataclasses import dataclass, field

import aiohttp

from bench.servers import (
    DURABLE_ROOM_PREFIX,
    PRESENCE_ROOM,
    GcRecord,
    Hearth,
    Server,
    SseSubscriber,
    cpu_seconds,
    rss_kb,
)

#: Marks the send time in a payload; no other frame of any server contains it.
STAMP = "~T="
#: `STAMP` as it appears in the bytes of an event stream.
STAMP_BYTES = STAMP.encode()
#: How the fan-out's subscribers receive: a WebSocket each (every server), or a Server-Sent
#: Events stream each with their subscription made over HTTP (hearth's fallback transport).
TRANSPORTS = ("websocket", "sse")
#: Publish content length in characters (the stamp included).
CONTENT_LENGTH = 100
#: How many handshakes run at once while connecting the subscribers.
CONNECT_CONCURRENCY = 50
#: Seconds a durable publisher waits for its ctrl before it gives up and counts an error.
ACK_TIMEOUT = 30.0
#: The slow-consumer scenario's content length (below hearth's 4096-character limit): at
#: 5 msg/s for 20 s a stalled reader's backlog reaches 400 KB, where at 100 it would stay
#: within what every server buffers before it pushes back.
SLOW_CONTENT_LENGTH = 4000
#: The slow-consumer scenario's kernel send buffer per connection, the same for every
#: server (hearth: HEARTH_WS_SEND_BUFFER). Left to autotuning, Linux lets a stalled
#: loopback socket absorb about 3 MB, and no server would notice the stall within a run.
SLOW_SEND_BUFFER = 16384
#: Receive buffer of a stalled reader's socket: small, so the server feels it stall soon.
STALLED_RECEIVE_BUFFER = 4096
#: Seconds after a run before the stalled readers are checked: hearth drops a client whose
#: send has been stuck for HEARTH_SEND_TIMEOUT (5 s), and checking means reading, which
#: unsticks it.
DROP_GRACE = 6.0
#: Seconds a checked stalled reader has to show its server closed it.
DROP_CHECK_SECONDS = 2.0


def make_content(number: int, length: int = CONTENT_LENGTH) -> str:
    """A *length*-character content embedding *number* and the monotonic time of now."""
    head = f"{STAMP}{time.monotonic():.6f} ~S={number} "
    return head + "x" * max(0, length - len(head))


class StalledReader:
    """A client WebSocket on a bare socket that reads only during its handshake.

    Unlike aiohttp's client, which keeps reading into its own buffer, nothing reads this
    socket once the handshake is done: the kernel's buffers fill and the server sees a
    client that stopped reading. Speaks just enough RFC 6455 for the handshakes.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, path: str) -> StalledReader:
        """Open a WebSocket to 127.0.0.1:*port* at *path*, with a small receive buffer."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Set before connecting, so the window the server may fill is small from the start.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALLED_RECEIVE_BUFFER)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        # A small stream limit keeps the stream from reading far ahead into its own buffer.
        reader, writer = await asyncio.open_connection(sock=sock, limit=STALLED_RECEIVE_BUFFER)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            writer.close()
            raise RuntimeError(f"WebSocket upgrade refused: {head[:80]!r}")
        return cls(reader, writer)

    async def send_str(self, data: str) -> None:
        """Send *data* as one masked text frame."""
        self._send(0x1, data.encode())
        await self.writer.drain()

    def _send(self, opcode: int, payload: bytes) -> None:
        size = len(payload)
        if size < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
        elif size < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
        mask = os.urandom(4)
        masked = int.from_bytes(payload, "big") ^ int.from_bytes(
            (mask * (size // 4 + 1))[:size], "big"
        )
        self.writer.write(head + mask + masked.to_bytes(size, "big"))

    async def receive_str(self, *, timeout: float | None = None) -> str:
        """The next text frame; protocol pings are answered on the way."""
        async with asyncio.timeout(timeout):
            while True:
                first, second = await self.reader.readexactly(2)
                size = second & 0x7F
                if size == 126:
                    (size,) = struct.unpack("!H", await self.reader.readexactly(2))
                elif size == 127:
                    (size,) = struct.unpack("!Q", await self.reader.readexactly(8))
                payload = await self.reader.readexactly(size)
                opcode = first & 0x0F
                if opcode == 0x1:
                    return payload.decode()
                if opcode == 0x8:
                    raise ConnectionError("server closed the WebSocket")
                if opcode == 0x9:
                    self._send(0xA, payload)

    async def was_dropped(self) -> bool:
        """Read what the server sent; True if it closed the connection.

        Reading lets a server blocked on this client go on, so call it only once the
        run's figures are taken.
        """
        try:
            async with asyncio.timeout(DROP_CHECK_SECONDS):
                while await self.reader.read(1 << 16):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        return True

    def close(self) -> None:
        """Drop the connection without a close handshake."""
        self.writer.transport.abort()


@dataclass
class Receiver:
    """What the subscribers saw, shared by all of them (one event loop, no locks)."""

    #: Publish-to-deliver latencies in seconds, one per delivery.
    latencies: list[float] = field(default_factory=list)
    #: Monotonic time of the latest delivery.
    last_delivery: float = 0.0
    #: Deliveries the run expects; `complete` is set once they have all arrived.
    expected: int = 0
    complete: asyncio.Event = field(default_factory=asyncio.Event)

    def deliver(self, sent_at: float) -> None:
        """Count one delivery of a publish sent at monotonic time *sent_at*."""
        now = time.monotonic()
        self.latencies.append(now - sent_at)
        self.last_delivery = now
        if len(self.latencies) == self.expected:
            self.complete.set()


async def _subscribe(ws: aiohttp.ClientWebSocketResponse, receiver: Receiver) -> None:
    while True:
        msg = await ws.receive()
        if msg.type is not aiohttp.WSMsgType.TEXT:
            return
        data = msg.data
        at = data.find(STAMP)
        if at < 0:
            if data == "2":  # Engine.IO ping
                await ws.send_str("3")
            continue
        start = at + len(STAMP)
        receiver.deliver(float(data[start : data.index(" ", start)]))


async def _subscribe_sse(stream: SseSubscriber, receiver: Receiver) -> None:
    # A streaming line scan over whatever the socket had: only complete lines are searched
    # (a line cut by a read waits for its rest), and the stamp occurs only in the data line
    # of a publish's event, once, so neither events nor JSON are parsed. Under load one read
    # returns many events, and one scan covers them all.
    content = stream.response.content
    tail = b""
    while chunk := await content.readany():
        buffer = tail + chunk if tail else chunk
        end = buffer.rfind(b"\n") + 1
        tail = buffer[end:]
        at = buffer.find(STAMP_BYTES, 0, end)
        while at >= 0:
            start = at + len(STAMP_BYTES)
            receiver.deliver(float(buffer[start : buffer.index(b" ", start)]))
            at = buffer.find(STAMP_BYTES, start, end)


async def _drain(ws: aiohttp.ClientWebSocketResponse, errors: list[str]) -> None:
    # The publisher reads its replies (hearth's ctrl frames) so they never pile up.
    while True:
        msg = await ws.receive()
        if msg.type is not aiohttp.WSMsgType.TEXT:
            return
        data = msg.data
        if data == "2":
            await ws.send_str("3")
        elif '"ctrl"' in data and '"code":200' not in data.replace(" ", ""):
            errors.append(data[:200])


def _latency_ms(ordered: list[float]) -> dict[str, float]:
    """p50, p99 and max of the sorted latencies *ordered* (seconds), in milliseconds."""
    return {
        "p50_ms": round(_percentile(ordered, 0.50) * 1e3, 2),
        "p99_ms": round(_percentile(ordered, 0.99) * 1e3, 2),
        "max_ms": round(ordered[-1] * 1e3, 2) if ordered else float("nan"),
    }


def _percentile(ordered: list[float], fraction: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_fanout(
    server: Server,
    subscribers: int,
    rate: float,
    duration: float,
    drain: float,
    *,
    stalled: int = 0,
    content_length: int = CONTENT_LENGTH,
    publisher_server: Server | None = None,
    transport: str = "websocket",
) -> tuple[dict, dict]:
    """Fan-out: *subscribers* on the room, one publisher at *rate* msg/s for *duration* s.

    Waits up to *drain* seconds after the last publish for deliveries still under way.
    *stalled* of the subscribers are `StalledReader` s that stop reading once subscribed;
    the latencies and losses are the other subscribers'. Publishes carry *content_length*
    characters. The subscribers connect to *server* over *transport* (one of `TRANSPORTS`;
    ``sse`` on hearth only, without stalled readers), the publisher to *publisher_server*
    (default the same) over a WebSocket; the server CPU figures are both servers'
    together, memory and GC are *server*'s. Returns the fan-out figures and the idle
    figures of the connection phase (memory per connection, connect time).
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}")
    if transport == "sse" and (not isinstance(server, Hearth) or stalled):
        raise ValueError("SSE subscribers need a hearth and no stalled readers")
    publisher_server = publisher_server or server
    server_pids = {server.pid, publisher_server.pid}
    receiver = Receiver()
    errors: list[str] = []
    stalled_readers: list[StalledReader] = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks: list[asyncio.Task[None]] = []
        sockets: list[aiohttp.ClientWebSocketResponse] = []
        streams: list[SseSubscriber] = []
        try:
            publisher = await publisher_server.open_publisher(session)
            sockets.append(publisher)
            # Once, before the subscribers race for a token (when the publisher's server,
            # which already has one, is another).
            await server.login(session)
            await asyncio.sleep(0.5)
            rss_before = rss_kb(server.pid)
            gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
            # Spread the stalled readers evenly over the connection order.
            every = subscribers // stalled if stalled else 0

            async def connect(number: int) -> None:
                async with gate:
                    if every and number % every == 0 and len(stalled_readers) < stalled:
                        reader = await StalledReader.connect(server.port, server.subscriber_path)
                        stalled_readers.append(reader)
                        await server.join_room(reader)
                        return
                    if isinstance(server, Hearth) and transport == "sse":
                        stream = await server.open_sse_subscriber(session)
                        streams.append(stream)
                        tasks.append(asyncio.create_task(_subscribe_sse(stream, receiver)))
                        return
                    ws = await server.open_subscriber(session)
                sockets.append(ws)
                tasks.append(asyncio.create_task(_subscribe(ws, receiver)))

            connect_started = time.monotonic()
            await asyncio.gather(*(connect(number) for number in range(subscribers)))
            connect_seconds = time.monotonic() - connect_started
            await asyncio.sleep(1.0)
            rss_after = rss_kb(server.pid)
            idle = {
                "connections": subscribers,
                "connect_s": round(connect_seconds, 3),
                "connects_per_s": round(subscribers / connect_seconds, 1),
                "rss_before_kb": rss_before,
                "rss_after_kb": rss_after,
                "kb_per_connection": round((rss_after - rss_before) / subscribers, 2),
            }
            tasks.append(asyncio.create_task(_drain(publisher, errors)))

            messages = max(1, round(rate * duration))
            readers = subscribers - len(stalled_readers)
            expected = receiver.expected = messages * readers
            gc_before = await _gc_record(server, session)
            cpu_before = _cpu_seconds_of(server_pids)
            extra_before = server.extra_cpu_seconds()
            client_before = _client_cpu()
            started = time.monotonic()
            for number in range(messages):
                delay = started + number / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                content = make_content(number, content_length)
                await publisher.send_str(publisher_server.pub_frame(content, number))
            sent_at = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(receiver.complete.wait(), drain)
            finished = time.monotonic()
            # What arrives later (say once the drop check unblocks a server) is not the run's.
            latencies, last_delivery = receiver.latencies[:], receiver.last_delivery
            cpu = _cpu_seconds_of(server_pids) - cpu_before
            extra = server.extra_cpu_seconds() - extra_before
            client_cpu = _client_cpu() - client_before
            rss_end = rss_kb(server.pid)
            gc_after = await _gc_record(server, session)
            dropped = await _stalled_dropped(server, session, stalled_readers)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for reader in stalled_readers:
                reader.close()
            for stream in streams:
                stream.close()
            await asyncio.gather(
                *(asyncio.wait_for(ws.close(), 5) for ws in sockets), return_exceptions=True
            )

    received = len(latencies)
    ordered = sorted(latencies)
    span = max(last_delivery, sent_at) - started
    per_delivery = 1e6 / received if received else float("nan")
    fanout = {
        "transport": transport,
        "subscribers": subscribers,
        "stalled": len(stalled_readers),
        "rate": rate,
        "duration_s": duration,
        "content_length": content_length,
        "published": messages,
        "expected": expected,
        "received": received,
        "lost": expected - received,
        "publish_errors": len(errors),
        "first_publish_error": errors[0] if errors else None,
        "send_s": round(sent_at - started, 3),
        "wall_s": round(finished - started, 3),
        "deliveries_per_s": round(received / span, 1) if received else 0.0,
        **_latency_ms(ordered),
        "server_cpu_s": round(cpu, 3),
        "cpu_us_per_delivery": round(cpu * per_delivery, 3),
        "helper_cpu_s": round(extra, 3),
        "helper_cpu_us_per_delivery": round(extra * per_delivery, 3),
        "client_cpu_s": round(client_cpu, 3),
        "client_cpu_share": round(client_cpu / (finished - started), 3),
        "client_cpu_us_per_delivery": round(client_cpu * per_delivery, 3),
        "client_pid": os.getpid(),
        "rss_start_kb": rss_after,
        "rss_end_kb": rss_end,
        "rss_growth_kb": rss_end - rss_after,
        **dropped,
        **_gc_during(gc_before, gc_after),
    }
    return fanout, idle


def _cpu_seconds_of(pids: set[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


async def run_bridged_fanout(
    subscribers_at: Hearth,
    publisher_at: Hearth,
    subscribers: int,
    rate: float,
    duration: float,
    drain: float,
) -> dict:
    """`run_fanout` with the subscribers on *subscribers_at* and the publisher on *publisher_at*.

    Both are hearths on one Redis (or the same hearth). The figures add ``bridged_in``: the
    messages *subscribers_at* received from other instances through Redis since it started.
    """
    fanout, _ = await run_fanout(
        subscribers_at, subscribers, rate, duration, drain, publisher_server=publisher_at
    )
    async with aiohttp.ClientSession() as session:
        fanout["bridged_in"] = await subscribers_at.bridged_in(session)
    return fanout


async def _gc_record(server: Server, session: aiohttp.ClientSession) -> GcRecord | None:
    return await server.gc_record(session) if isinstance(server, Hearth) else None


def _gc_during(before: GcRecord | None, after: GcRecord | None) -> dict[str, object]:
    if before is None or after is None:
        return {"gc_collections": None, "gc_max_ms": None, "gc_max_exact": None}
    return after.since(before)


async def _stalled_dropped(
    server: Server, session: aiohttp.ClientSession, readers: list[StalledReader]
) -> dict[str, int | None]:
    """How many stalled readers the server closed; for hearth also its own count."""
    if not readers:
        return {"stalled_dropped": 0, "slow_client_drops": None}
    await asyncio.sleep(DROP_GRACE)
    # Asked first: reading the stalled sockets below could let a stuck send complete.
    drops = await server.slow_client_drops(session) if isinstance(server, Hearth) else None
    closed = await asyncio.gather(*(reader.was_dropped() for reader in readers))
    return {"stalled_dropped": sum(closed), "slow_client_drops": drops}


async def _watch_joins(
    ws: aiohttp.ClientWebSocketResponse, others: int, seen: asyncio.Event
) -> None:
    # Counts the *others* users' joined events; sets *seen* once they have all arrived.
    joined = 0
    while joined < others:
        msg = await ws.receive()
        if msg.type is not aiohttp.WSMsgType.TEXT:
            return
        if '"joined"' in msg.data:
            joined += 1
    seen.set()


async def run_presence(server: Hearth, tokens: list[str], settle: float) -> dict:
    """Presence: one user per token of *tokens* authenticates and joins one room.

    The first user joins alone, then the others CONNECT_CONCURRENCY at a time. Reported:
    the time until every join is answered, the server's CPU per join (each one fans a
    joined event out to everyone already there), the time until the first user has seen
    every other user's joined event (waiting at most *settle* s after the last join), and
    what a ``presence`` query lists afterwards.
    """
    users = len(tokens)
    seen = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    url = f"http://127.0.0.1:{server.port}/ws"
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks: list[asyncio.Task[None]] = []
        sockets: list[aiohttp.ClientWebSocketResponse] = []
        try:
            gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

            async def join(token: str) -> aiohttp.ClientWebSocketResponse:
                async with gate:
                    ws = await session.ws_connect(url, autoping=True)
                    sockets.append(ws)
                    await server.join(ws, token, PRESENCE_ROOM)
                return ws

            cpu_before = cpu_seconds(server.pid)
            extra_before = server.extra_cpu_seconds()
            client_before = _client_cpu()
            started = time.monotonic()
            first = await join(tokens[0])
            tasks.append(asyncio.create_task(_watch_joins(first, users - 1, seen)))
            # Only the first user's events are read: the others' (N²/2 in all) wait in the
            # kernel's buffers, or the load generator, not the server, would set the pace.
            await asyncio.gather(*(join(token) for token in tokens[1:]))
            joined_at = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(seen.wait(), settle)
            settled_at = time.monotonic()
            cpu = cpu_seconds(server.pid) - cpu_before
            extra = server.extra_cpu_seconds() - extra_before
            client_cpu = _client_cpu() - client_before
            # Asked by the bench user, who is authenticated but not in the room.
            query = await server.open_publisher(session)
            sockets.append(query)
            asked = time.monotonic()
            present = await server.present(query, PRESENCE_ROOM)
            answered = time.monotonic()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(
                *(asyncio.wait_for(ws.close(), 5) for ws in sockets), return_exceptions=True
            )

    return {
        "users": users,
        "join_s": round(joined_at - started, 3),
        "joins_per_s": round(users / (joined_at - started), 1),
        "settled": seen.is_set(),
        "settled_s": round(settled_at - started, 3),
        "server_cpu_s": round(cpu, 3),
        "cpu_us_per_join": round(cpu * 1e6 / users, 1),
        "postgres_cpu_us_per_join": round(extra * 1e6 / users, 1),
        "presence_users": len(present),
        "presence_query_ms": round((answered - asked) * 1e3, 2),
        "client_cpu_s": round(client_cpu, 3),
        "client_cpu_share": round(client_cpu / (settled_at - started), 3),
        "client_pid": os.getpid(),
    }


def durable_rooms(rooms: int) -> list[str]:
    """The names of the durable scenario's *rooms* rooms."""
    return [f"{DURABLE_ROOM_PREFIX}{number}" for number in range(rooms)]


@dataclass
class Acks:
    """What the durable publishers saw, shared by all of them (one event loop, no locks)."""

    #: Send-to-ctrl latencies in seconds of every answered publish, any code.
    latencies: list[float] = field(default_factory=list)
    #: Publishes answered 200 {id, seq}: committed.
    stored: int = 0
    #: Publishes answered 202 {id, queued}: spooled, to be committed later.
    queued: int = 0
    #: The first few non-2xx replies or failures, as text.
    errors: list[str] = field(default_factory=list)
    #: Every non-2xx reply, timeout or dropped connection.
    error_count: int = 0

    def fail(self, what: str) -> None:
        """Count one error and keep the first few for the JSON."""
        self.error_count += 1
        if len(self.errors) < 5:
            self.errors.append(what[:200])


async def _publish_closed_loop(
    server: Hearth,
    ws: aiohttp.ClientWebSocketResponse,
    publisher: int,
    room: str,
    stop_at: float,
    acks: Acks,
) -> None:
    # One publish in flight: the next one leaves only once the previous one is answered.
    number = 0
    while time.monotonic() < stop_at:
        request_id, frame = server.durable_frame(room, make_content(number), publisher, number)
        number += 1
        sent = time.monotonic()
        await ws.send_str(frame)
        while True:
            try:
                msg = await ws.receive(timeout=ACK_TIMEOUT)
            except TimeoutError:
                acks.fail(f"publisher {publisher}: no ctrl within {ACK_TIMEOUT} s")
                return
            if msg.type is not aiohttp.WSMsgType.TEXT:
                acks.fail(f"publisher {publisher}: connection ended ({msg.type.name})")
                return
            ctrl = json.loads(msg.data).get("ctrl")
            if ctrl and ctrl.get("id") == request_id:
                break
        acks.latencies.append(time.monotonic() - sent)
        code = ctrl.get("code")
        if code == 200:
            acks.stored += 1
        elif code == 202:
            acks.queued += 1
        else:
            acks.fail(json.dumps(ctrl))


async def run_durable(server: Hearth, publishers: int, rooms: int, duration: float) -> dict:
    """Durable: *publishers* connections over *rooms* rooms, each closed loop for *duration* s.

    Every publish is answered only once it is stored (200) or spooled (202); the figures
    are acknowledged publishes per second, ack latency, errors, and the CPU the server and
    its PostgreSQL spent per acknowledged publish.
    """
    names = durable_rooms(rooms)
    acks = Acks()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        sockets: list[aiohttp.ClientWebSocketResponse] = []
        try:
            await server.login(session)  # once, before the publishers race for a token
            gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

            async def connect() -> None:
                async with gate:
                    sockets.append(await server.open_publisher(session))

            await asyncio.gather(*(connect() for _ in range(publishers)))
            await asyncio.sleep(0.5)
            cpu_before = cpu_seconds(server.pid)
            extra_before = server.extra_cpu_seconds()
            client_before = _client_cpu()
            started = time.monotonic()
            await asyncio.gather(
                *(
                    _publish_closed_loop(
                        server, ws, number, names[number % rooms], started + duration, acks
                    )
                    for number, ws in enumerate(sockets)
                )
            )
            finished = time.monotonic()
            cpu = cpu_seconds(server.pid) - cpu_before
            extra = server.extra_cpu_seconds() - extra_before
            client_cpu = _client_cpu() - client_before
        finally:
            await asyncio.gather(
                *(asyncio.wait_for(ws.close(), 5) for ws in sockets), return_exceptions=True
            )

    acknowledged = acks.stored + acks.queued
    wall = finished - started
    ordered = sorted(acks.latencies)
    per_publish = 1e6 / acknowledged if acknowledged else float("nan")
    return {
        "publishers": publishers,
        "rooms": rooms,
        "duration_s": duration,
        "wall_s": round(wall, 3),
        "acknowledged": acknowledged,
        "stored_200": acks.stored,
        "queued_202": acks.queued,
        "errors": acks.error_count,
        "first_errors": acks.errors,
        "acks_per_s": round(acknowledged / wall, 1),
        "stored_per_s": round(acks.stored / wall, 1),
        "queued_per_s": round(acks.queued / wall, 1),
        **_latency_ms(ordered),
        "server_cpu_s": round(cpu, 3),
        "cpu_us_per_publish": round(cpu * per_publish, 1),
        "postgres_cpu_s": round(extra, 3),
        "postgres_cpu_us_per_publish": round(extra * per_publish, 1),
        "client_cpu_s": round(client_cpu, 3),
        "client_cpu_share": round(client_cpu / wall, 3),
        "client_pid": os.getpid(),
    }
