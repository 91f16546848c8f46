"""The load generator: raw aiohttp WebSockets in one asyncio process on the client core.

A subscriber parses only what it must: it finds the publisher's embedded send time with a
substring search, never decoding JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import time
from dataclasses import dataclass, field

import aiohttp

from bench.servers import DURABLE_ROOM_PREFIX, Hearth, Server, cpu_seconds, rss_kb

#: Marks the send time in a payload; no other frame of any server contains it.
STAMP = "~T="
#: Publish content length in characters (the stamp included).
CONTENT_LENGTH = 100
#: How many handshakes run at once while connecting the subscribers.
CONNECT_CONCURRENCY = 50
#: Seconds a durable publisher waits for its ctrl before it gives up and counts an error.
ACK_TIMEOUT = 30.0


def make_content(number: int) -> str:
    """A ~100-character content embedding *number* and the monotonic time of now."""
    head = f"{STAMP}{time.monotonic():.6f} ~S={number} "
    return head + "x" * max(0, CONTENT_LENGTH - len(head))


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


async def _subscribe(ws: aiohttp.ClientWebSocketResponse, receiver: Receiver) -> None:
    latencies = receiver.latencies
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
        now = time.monotonic()
        start = at + len(STAMP)
        latencies.append(now - float(data[start : data.index(" ", start)]))
        receiver.last_delivery = now
        if len(latencies) == receiver.expected:
            receiver.complete.set()


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
    server: Server, subscribers: int, rate: float, duration: float, drain: float
) -> tuple[dict, dict]:
    """Fan-out: *subscribers* on the room, one publisher at *rate* msg/s for *duration* s.

    Waits up to *drain* seconds after the last publish for deliveries still under way.
    Returns the fan-out figures and the idle figures of the connection phase (memory per
    connection, connect time).
    """
    receiver = Receiver()
    errors: list[str] = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks: list[asyncio.Task[None]] = []
        sockets: list[aiohttp.ClientWebSocketResponse] = []
        try:
            publisher = await server.open_publisher(session)
            sockets.append(publisher)
            await asyncio.sleep(0.5)
            rss_before = rss_kb(server.pid)
            gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

            async def connect() -> None:
                async with gate:
                    ws = await server.open_subscriber(session)
                sockets.append(ws)
                tasks.append(asyncio.create_task(_subscribe(ws, receiver)))

            connect_started = time.monotonic()
            await asyncio.gather(*(connect() for _ in range(subscribers)))
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
            expected = receiver.expected = messages * subscribers
            cpu_before = cpu_seconds(server.pid)
            extra_before = server.extra_cpu_seconds()
            client_before = _client_cpu()
            started = time.monotonic()
            for number in range(messages):
                delay = started + number / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await publisher.send_str(server.pub_frame(make_content(number), number))
            sent_at = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(receiver.complete.wait(), drain)
            finished = time.monotonic()
            cpu = cpu_seconds(server.pid) - cpu_before
            extra = server.extra_cpu_seconds() - extra_before
            client_cpu = _client_cpu() - client_before
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(
                *(asyncio.wait_for(ws.close(), 5) for ws in sockets), return_exceptions=True
            )

    received = len(receiver.latencies)
    ordered = sorted(receiver.latencies)
    span = max(receiver.last_delivery, sent_at) - started
    per_delivery = 1e6 / received if received else float("nan")
    fanout = {
        "subscribers": subscribers,
        "rate": rate,
        "duration_s": duration,
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
        "client_pid": os.getpid(),
    }
    return fanout, idle


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
