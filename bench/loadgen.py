"""The load generator: raw aiohttp WebSockets in one asyncio process on the client core.

A subscriber parses only what it must: it finds the publisher's embedded send time with a
substring search, never decoding JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import time
from dataclasses import dataclass, field

import aiohttp

from bench.servers import Server, cpu_seconds, rss_kb

#: Marks the send time in a payload; no other frame of any server contains it.
STAMP = "~T="
#: Publish content length in characters (the stamp included).
CONTENT_LENGTH = 100
#: How many handshakes run at once while connecting the subscribers.
CONNECT_CONCURRENCY = 50


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
        "p50_ms": round(_percentile(ordered, 0.50) * 1e3, 2),
        "p99_ms": round(_percentile(ordered, 0.99) * 1e3, 2),
        "max_ms": round(ordered[-1] * 1e3, 2) if ordered else float("nan"),
        "server_cpu_s": round(cpu, 3),
        "cpu_us_per_delivery": round(cpu * per_delivery, 3),
        "helper_cpu_s": round(extra, 3),
        "helper_cpu_us_per_delivery": round(extra * per_delivery, 3),
        "client_cpu_s": round(client_cpu, 3),
        "client_cpu_share": round(client_cpu / (finished - started), 3),
        "client_pid": os.getpid(),
    }
    return fanout, idle
