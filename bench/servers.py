"""The servers under test, each started pinned to the server core, and their wire formats.

Each kind knows how to start its server, how a client opens a subscriber or a publisher
connection, and how a publish frame looks on its wire; hearth also how a subscriber opens
its Server-Sent Events fallback (a ticket, the stream, a ``sub`` over HTTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from app.services import LocalPostgres, LocalRedis, free_port, wait_for_port

#: The core the servers (and PostgreSQL and Redis) run on; the load generator takes the other.
SERVER_CORE = 0
#: The core of the load generator.
CLIENT_CORE = 1
#: The user and room hearth's benchmark publishes as and to.
BENCH_USER = "bench"
BENCH_PASSWORD = "bench-password-not-secret"
BENCH_ROOM = "lobby"
#: The durable scenario's rooms are this prefix and a number from 0.
DURABLE_ROOM_PREFIX = "durable-"
#: The presence scenario's room, and the prefix of its users' names (a number follows).
PRESENCE_ROOM = "presence"
PRESENCE_USER_PREFIX = "presence-"
#: Seconds a hearth with Redis has to show its bridge delivers (its canary came back).
BRIDGE_READY_TIMEOUT = 30.0
#: Seconds a fresh SSE stream has to send its ``hello`` event.
SSE_HELLO_TIMEOUT = 30.0


#: The cores this process could use at start, before the benchmark pinned itself to one.
STARTING_CORES = (
    frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()
)


def pinning_available() -> bool:
    """Whether this host has both cores the benchmark pins to.

    Asked of the starting affinity: once the load generator is pinned to its core, its own
    affinity no longer shows the server's core, which children must still be pinned to.
    """
    return hasattr(os, "sched_setaffinity") and {SERVER_CORE, CLIENT_CORE} <= STARTING_CORES


def pin(pid: int, core: int) -> None:
    """Pin process *pid* (0: this one) to *core* when the host has the benchmark's cores."""
    if pinning_available():
        os.sched_setaffinity(pid, {core})


@contextlib.contextmanager
def on_server_core() -> Iterator[None]:
    """Run this process on the server core for a while, so that what it forks stays there.

    For daemons (PostgreSQL's postmaster, Redis) that are forked by a tool and whose pids
    or threads are not known in time to be pinned one by one.
    """
    if not pinning_available():
        yield
        return
    before = os.sched_getaffinity(0)
    pin(0, SERVER_CORE)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds process *pid* has used, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces; the fields after its closing parenthesis do not.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    """Resident set size of process *pid* in KiB, from /proc/<pid>/status VmRSS."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class WebSocketLike(Protocol):
    """What a handshake needs of a client WebSocket: aiohttp's, or the generator's raw one."""

    async def send_str(self, data: str) -> None: ...  # noqa: D102

    async def receive_str(self, *, timeout: float | None = None) -> str: ...  # noqa: D102


def _pinned_to_server_core() -> None:
    pin(0, SERVER_CORE)


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One Server-Sent Event as its stream's fields gave it."""

    #: The ``event:`` field; ``message`` when the event had none.
    event: str
    #: The ``data:`` lines, joined with newlines.
    data: str
    #: The ``id:`` field, None when the event had none.
    id: str | None


async def read_sse_event(content: aiohttp.StreamReader) -> SseEvent:
    """The next event of the ``text/event-stream`` *content*; comments and ``retry`` skipped.

    Line by line, as the HTML standard's parser does: for the few events of a handshake.
    A run's deliveries are counted by a faster scan (bench.loadgen).
    """
    event, data, event_id = "message", list[str](), None
    while True:
        raw = await content.readline()
        if not raw:
            raise ConnectionError("the event stream ended")
        line = raw.decode().removesuffix("\n").removesuffix("\r")
        if not line:
            if data:
                return SseEvent(event, "\n".join(data), event_id)
            event, event_id = "message", None  # an event without data is not dispatched
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        elif name == "id":
            event_id = value


class SseSubscriber:
    """One open Server-Sent Events stream of hearth's fallback transport."""

    def __init__(self, response: aiohttp.ClientResponse, session_id: str) -> None:
        #: The streaming ``GET /sse`` response; its ``content`` is the event stream.
        self.response = response
        #: The session id the stream's ``hello`` named, for ``X-Hearth-Session``.
        self.session_id = session_id

    def close(self) -> None:
        """Drop the stream's connection."""
        self.response.close()


class Server:
    """A server process on 127.0.0.1 and the client side of its protocol."""

    #: Short name in tables and JSON.
    name = ""

    def __init__(self, send_buffer: int = 0) -> None:
        self.port = free_port()
        #: Kernel send buffer of each client connection in bytes; 0: the kernel's autotuning.
        self.send_buffer = send_buffer
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The server process id."""
        assert self.process is not None
        return self.process.pid

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            argv,
            env=env,
            preexec_fn=_pinned_to_server_core,
            stdout=subprocess.DEVNULL,
            stderr=None,
        )
        try:
            self._wait_ready()
        except Exception:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        # Accepting connections is all a server without dependencies needs to be ready.
        wait_for_port(self.port, timeout=30)

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        raise NotImplementedError

    def _serving_args(self) -> list[str]:
        # The command line bench.serving gives the floor and the socketio peer.
        return ["--port", str(self.port), "--send-buffer", str(self.send_buffer)]

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def extra_cpu_seconds(self) -> float:
        """CPU seconds of helper processes the server leans on (PostgreSQL for hearth)."""
        return 0.0

    #: The path a subscriber's WebSocket opens.
    subscriber_path = "/ws"

    async def login(self, session: aiohttp.ClientSession) -> None:
        """Get the credentials every connection of the run shares, if the server has any."""

    async def open_subscriber(
        self, session: aiohttp.ClientSession
    ) -> aiohttp.ClientWebSocketResponse:
        """A connection that receives every publish of the room from now on."""
        ws = await session.ws_connect(
            f"http://127.0.0.1:{self.port}{self.subscriber_path}", autoping=True
        )
        await self.join_room(ws)
        return ws

    async def join_room(self, ws: WebSocketLike) -> None:
        """Turn the fresh WebSocket *ws* into a subscriber of the room (any client kind)."""

    async def open_publisher(
        self, session: aiohttp.ClientSession
    ) -> aiohttp.ClientWebSocketResponse:
        """A connection that may publish to the room and receives none of its messages."""
        raise NotImplementedError

    def pub_frame(self, content: str, number: int) -> str:
        """The text frame that publishes *content*, the *number*-th publish of this run."""
        raise NotImplementedError


class Floor(Server):
    """bench/floor.py: broadcast with no features."""

    name = "floor"

    def start(self) -> None:  # noqa: D102
        self._spawn([sys.executable, "-m", "bench.floor", *self._serving_args()])

    async def open_publisher(self, session):  # noqa: D102
        return await self.open_subscriber(session)

    def pub_frame(self, content, number):  # noqa: D102
        return content


class SocketIO(Server):
    """bench/socketio_server.py, spoken to in raw Engine.IO v4 / Socket.IO v5 frames."""

    name = "socketio"
    subscriber_path = "/socket.io/?EIO=4&transport=websocket"

    def start(self) -> None:  # noqa: D102
        self._spawn([sys.executable, "-m", "bench.socketio_server", *self._serving_args()])

    async def join_room(self, ws):  # noqa: D102
        opened = await ws.receive_str(timeout=30)  # "0{sid, pingInterval, ...}"
        if not opened.startswith("0"):
            raise RuntimeError(f"unexpected Engine.IO open: {opened[:80]}")
        await ws.send_str("40")
        # The server joins the room on connect, before it acknowledges with 40{sid}.
        while not (reply := await ws.receive_str(timeout=30)).startswith("40"):
            if reply == "2":
                await ws.send_str("3")

    async def open_publisher(self, session):  # noqa: D102
        return await self.open_subscriber(session)

    def pub_frame(self, content, number):  # noqa: D102
        return '42["pub",' + json.dumps(content) + "]"


class HearthDatabase:
    """hearth's throwaway PostgreSQL, Redis and data folder, shared by every hearth of a run.

    Redis starts only when a scenario asks for it (`start_redis`).
    """

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="hearth-bench-"))
        # The postgres system user must be able to enter it when we run as root.
        self.folder.chmod(0o755)
        self.postgres = LocalPostgres(self.folder / "pg", free_port())
        self.redis: LocalRedis | None = None
        self._rooms = {BENCH_ROOM}
        # Presence users' tokens are this secret and the user's name; see create_users.
        self._token_prefix = f"bench-{uuid.uuid4().hex}-"
        self._users = 0

    def env(self) -> dict[str, str]:
        """The environment of every hearth command of the benchmark, the port aside."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")}
        env.update(
            HEARTH_DATABASE_URL=self.postgres.dsn,
            HEARTH_LOG_LEVEL="WARNING",
            HEARTH_LOG_DIR="",
            HEARTH_SPOOL_DIR=str(self.folder / "spool"),
            HEARTH_PUB_RATE="100000",
            HEARTH_PUB_BURST="100000",
            HEARTH_USER_PUB_RATE="100000",
            HEARTH_USER_PUB_BURST="100000",
            HEARTH_CLIENT_QUEUE_MESSAGES="100000",
            HEARTH_CLIENT_QUEUE_BYTES=str(256 * 1024 * 1024),
            HEARTH_AUTH_TIMEOUT="120",
            HEARTH_DRAIN_GRACE="0",
            HEARTH_SHUTDOWN_TIMEOUT="5",
        )
        return env

    def _cli(self, *args: str) -> None:
        subprocess.run(
            [sys.executable, "-m", "app", *args],
            env=self.env(),
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def prepare(self) -> None:
        """Start PostgreSQL on the server core, migrate, and create the user and room."""
        if self.postgres.running():
            return
        # pg_ctl's postmaster and every backend it forks inherit this process's affinity.
        with on_server_core():
            self.postgres.start()
        self._cli("migrate")
        self._cli("user", "add", BENCH_USER, "--password", BENCH_PASSWORD)
        self._cli("room", "create", BENCH_ROOM)

    def create_rooms(self, names: list[str]) -> None:
        """Create the rooms of *names* this benchmark has not created yet, with the CLI."""
        self.prepare()
        for name in names:
            if name not in self._rooms:
                self._cli("room", "create", name)
                self._rooms.add(name)

    def create_users(self, count: int) -> list[str]:
        """Make sure *count* presence users exist and return a login token for each.

        One SQL statement makes every missing user and its token: a CLI process (and a
        scrypt hash) per user would take minutes at N=1000. Nobody can log in with their
        password; the tokens are what they authenticate with.
        """
        self.prepare()
        if count > self._users:
            self.postgres.psql(
                f"""
                WITH made AS (
                    INSERT INTO users (id, username, password_hash)
                    SELECT gen_random_uuid(), '{PRESENCE_USER_PREFIX}' || number, '!'
                    FROM generate_series({self._users}, {count - 1}) AS number
                    RETURNING id, username
                )
                INSERT INTO auth_tokens (token_hash, user_id, expires_at)
                SELECT sha256(convert_to('{self._token_prefix}' || username, 'UTF8')), id,
                       now() + interval '1 day'
                FROM made
                """,
                database=self.postgres.database,
            )
            self._users = count
        return [f"{self._token_prefix}{PRESENCE_USER_PREFIX}{number}" for number in range(count)]

    def start_redis(self) -> str:
        """Start the run's Redis on the server core, unless it runs, and return its URL.

        In memory only: nothing of a benchmark needs to survive a Redis restart.
        """
        if self.redis is None:
            self.redis = LocalRedis(self.folder / "redis", free_port(), persistent=False)
        # The daemon and its threads inherit this process's affinity.
        with on_server_core():
            self.redis.start()
        return self.redis.url

    def cleanup(self) -> None:
        """Stop Redis and PostgreSQL and delete their files."""
        try:
            if self.redis is not None:
                self.redis.stop()
        finally:
            try:
                self.postgres.stop("immediate")
            finally:
                shutil.rmtree(self.folder, ignore_errors=True)

    def postgres_pids(self) -> list[int]:
        """The postmaster and every process it has forked (backends, writers, checkpointer)."""
        postmaster = self.postgres.pid()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            except (OSError, ValueError):
                continue
            if int(entry.name) == postmaster or ppid == postmaster:
                pids.append(int(entry.name))
        return pids

    def pin_postgres(self, core: int) -> bool:
        """Move PostgreSQL's processes to *core*; False when the host or our rights forbid it.

        Backends forked later inherit the postmaster's affinity, so new connections follow.
        """
        if not pinning_available():
            return False
        moved = True
        for pid in self.postgres_pids():
            try:
                os.sched_setaffinity(pid, {core})
            except ProcessLookupError:
                continue
            except PermissionError:
                moved = False
        return moved

    def cpu_seconds(self) -> float:
        """CPU seconds every PostgreSQL process alive now has used."""
        total = 0.0
        for pid in self.postgres_pids():
            try:
                total += cpu_seconds(pid)
            except (OSError, ValueError):
                continue
        return total


@dataclass(frozen=True, slots=True)
class GcRecord:
    """hearth's garbage collection figures as its /metrics showed them at one moment."""

    #: Collections timed so far, every generation.
    collections: float
    #: The longest pause so far (``hearth_gc_pause_max_seconds``).
    longest_s: float
    #: Upper bound of each histogram bucket -> pauses at most that long, every generation.
    at_most: dict[float, float]

    def since(self, earlier: GcRecord) -> dict[str, object]:
        """The collections after *earlier* and the longest of them, in milliseconds.

        Exact when that pause set a new record; otherwise the gauge cannot tell, and
        ``gc_max_ms`` is an upper bound: the smallest bucket that holds every pause since,
        or the earlier record if smaller.
        """
        pauses = self.collections - earlier.collections
        if self.longest_s > earlier.longest_s:
            longest, exact = self.longest_s, True
        elif not pauses:
            longest, exact = 0.0, True
        else:
            bound = min(
                (le for le, n in self.at_most.items() if n - earlier.at_most.get(le, 0) == pauses),
                default=float("inf"),
            )
            longest, exact = min(bound, earlier.longest_s), False
        return {
            "gc_collections": int(pauses),
            "gc_max_ms": round(longest * 1e3, 2),
            "gc_max_exact": exact,
        }


class Hearth(Server):
    """The real server, ``python -m app serve``, against the run's throwaway PostgreSQL.

    With a *redis_url* it bridges its live traffic with every other hearth on that Redis.
    """

    name = "hearth"
    #: HEARTH_EVENT_LOOP of the server process.
    event_loop = "asyncio"

    def __init__(self, database: HearthDatabase, send_buffer: int = 0, redis_url: str = "") -> None:
        super().__init__(send_buffer)
        self.database = database
        #: HEARTH_REDIS_URL of the server process; empty: no bridge, the instance works alone.
        self.redis_url = redis_url
        self.token = ""
        self.run_id = uuid.uuid4().hex[:8]
        self._requests = 0

    def env(self) -> dict[str, str]:
        """The environment of the server process."""
        return {
            **self.database.env(),
            "HEARTH_PORT": str(self.port),
            "HEARTH_EVENT_LOOP": self.event_loop,
            "HEARTH_WS_SEND_BUFFER": str(self.send_buffer),
            "HEARTH_REDIS_URL": self.redis_url,
        }

    def start(self) -> None:  # noqa: D102
        self.database.prepare()
        self.token = ""
        self.run_id = uuid.uuid4().hex[:8]
        self._spawn([sys.executable, "-m", "app", "serve"], env=self.env())

    def _wait_ready(self) -> None:
        super()._wait_ready()
        if self.redis_url:
            self._wait_bridged()

    def _wait_bridged(self) -> None:
        # The bridge reports connected only once its canary came back through Redis, that
        # is once it is subscribed: a message published before then would never reach it.
        url = f"http://127.0.0.1:{self.port}/health/ready"
        deadline = time.monotonic() + BRIDGE_READY_TIMEOUT
        state = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    body = json.load(response)
            except urllib.error.HTTPError as error:  # 503 while the actors start
                body = json.load(error)
            except OSError:
                body = {}
            state = body.get("checks", {}).get("redis")
            if state == "connected":
                return
            time.sleep(0.1)
        raise RuntimeError(
            f"hearth on port {self.port}: Redis bridge {state!r} after {BRIDGE_READY_TIMEOUT} s"
        )

    def extra_cpu_seconds(self) -> float:  # noqa: D102
        return self.database.cpu_seconds()

    async def login(self, session: aiohttp.ClientSession) -> None:
        """Get one token for every connection of the run (the login limit is per minute)."""
        if self.token:
            return
        async with session.post(
            f"http://127.0.0.1:{self.port}/api/v1/auth/login",
            json={"username": BENCH_USER, "password": BENCH_PASSWORD},
        ) as response:
            response.raise_for_status()
            self.token = (await response.json())["token"]

    def _authorization(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def sse_ticket(self, session: aiohttp.ClientSession) -> str:
        """A fresh one-stream ticket for the run's token (``POST /api/v1/sse/ticket``)."""
        async with session.post(
            f"http://127.0.0.1:{self.port}/api/v1/sse/ticket", headers=self._authorization()
        ) as response:
            if response.status != 200:
                raise RuntimeError(f"hearth refused a ticket: {await response.text()}")
            return (await response.json())["ticket"]

    async def open_sse_subscriber(self, session: aiohttp.ClientSession) -> SseSubscriber:
        """An SSE stream, opened with a ticket, whose session is subscribed to the room."""
        await self.login(session)
        ticket = await self.sse_ticket(session)
        response = await session.get(f"http://127.0.0.1:{self.port}/sse", params={"ticket": ticket})
        try:
            if response.status != 200 or response.content_type != "text/event-stream":
                raise RuntimeError(
                    f"hearth refused the stream: {response.status} {await response.text()}"
                )
            async with asyncio.timeout(SSE_HELLO_TIMEOUT):
                hello = await read_sse_event(response.content)
            if hello.event != "hello":
                raise RuntimeError(f"the stream began without hello: {hello}")
            stream = SseSubscriber(response, json.loads(hello.data)["session"])
            await self.rpc(session, stream.session_id, {"op": "sub", "topic": f"room:{BENCH_ROOM}"})
        except BaseException:
            response.close()
            raise
        return stream

    async def rpc(self, session: aiohttp.ClientSession, session_id: str, frame: dict) -> dict:
        """Send *frame* for SSE session *session_id* over ``POST /api/v1/rpc``; its ctrl."""
        self._requests += 1
        request_id = f"r{self._requests}"
        async with session.post(
            f"http://127.0.0.1:{self.port}/api/v1/rpc",
            headers={**self._authorization(), "X-Hearth-Session": session_id},
            json={**frame, "id": request_id},
        ) as response:
            ctrl = (await response.json(content_type=None)).get("ctrl") or {}
        if response.status != 200 or ctrl.get("code") != 200 or ctrl.get("id") != request_id:
            raise RuntimeError(f"hearth refused {frame['op']} over rpc: {response.status} {ctrl}")
        return ctrl

    async def _request(self, ws: WebSocketLike, frame: dict) -> dict:
        self._requests += 1
        request_id = f"r{self._requests}"
        await ws.send_str(json.dumps({**frame, "id": request_id}))
        while True:
            reply = json.loads(await ws.receive_str(timeout=60))
            ctrl = reply.get("ctrl")
            if ctrl and ctrl.get("id") == request_id:
                if ctrl["code"] != 200:
                    raise RuntimeError(f"hearth refused {frame['op']}: {ctrl}")
                return ctrl

    async def open_publisher(self, session):  # noqa: D102
        await self.login(session)
        ws = await session.ws_connect(f"http://127.0.0.1:{self.port}/ws", autoping=True)
        await self._request(ws, {"op": "auth", "token": self.token})
        return ws

    async def open_subscriber(self, session):  # noqa: D102
        await self.login(session)
        return await super().open_subscriber(session)

    async def join_room(self, ws):  # noqa: D102
        await self.join(ws, self.token, BENCH_ROOM)

    async def join(self, ws: WebSocketLike, token: str, room: str) -> None:
        """Authenticate *ws* with *token* and subscribe it to *room*."""
        await self._request(ws, {"op": "auth", "token": token})
        await self._request(ws, {"op": "sub", "topic": f"room:{room}"})

    async def present(self, ws: WebSocketLike, room: str) -> list[str]:
        """The users the ``presence`` op lists for *room*, asked on *ws*."""
        ctrl = await self._request(ws, {"op": "presence", "topic": f"room:{room}"})
        return ctrl["params"]["users"]

    async def _metrics(self, session: aiohttp.ClientSession) -> list:
        async with session.get(f"http://127.0.0.1:{self.port}/metrics") as response:
            response.raise_for_status()
            text = await response.text()
        return [
            sample for family in text_string_to_metric_families(text) for sample in family.samples
        ]

    async def _counter(self, session: aiohttp.ClientSession, name: str, **labels: str) -> int:
        # A labelled counter shows no sample until it is first incremented: 0 then.
        for sample in await self._metrics(session):
            if sample.name == name and labels.items() <= sample.labels.items():
                return int(sample.value)
        return 0

    async def gc_record(self, session: aiohttp.ClientSession) -> GcRecord:
        """hearth's garbage collection figures now, from its /metrics."""
        collections, longest, at_most = 0.0, 0.0, dict[float, float]()
        for sample in await self._metrics(session):
            if sample.name == "hearth_gc_pause_seconds_count":
                collections += sample.value
            elif sample.name == "hearth_gc_pause_max_seconds":
                longest = sample.value
            elif sample.name == "hearth_gc_pause_seconds_bucket":
                le = float(sample.labels["le"])
                at_most[le] = at_most.get(le, 0.0) + sample.value
        return GcRecord(collections, longest, at_most)

    async def slow_client_drops(self, session: aiohttp.ClientSession) -> int:
        """Clients hearth has dropped as too slow since it started."""
        return await self._counter(session, "hearth_slow_client_drops_total")

    async def bridged_in(self, session: aiohttp.ClientSession) -> int:
        """Room messages other instances stored that reached this one through Redis."""
        return await self._counter(session, "hearth_bridge_messages_total", direction="in")

    def pub_frame(self, content, number):  # noqa: D102
        return json.dumps(
            {
                "op": "pub",
                "id": f"p{number}",
                "topic": f"room:{BENCH_ROOM}",
                "content": content,
                "client_msg_id": f"{self.run_id}-{number}",
            }
        )

    def durable_frame(
        self, room: str, content: str, publisher: int, number: int
    ) -> tuple[str, str]:
        """The request id and text frame of publisher *publisher*'s *number*-th pub to *room*."""
        request_id = f"d{publisher}-{number}"
        frame = json.dumps(
            {
                "op": "pub",
                "id": request_id,
                "topic": f"room:{room}",
                "content": content,
                "client_msg_id": f"{self.run_id}-{publisher}-{number}",
            }
        )
        return request_id, frame


class HearthUvloop(Hearth):
    """hearth serving on uvloop's event loop (``HEARTH_EVENT_LOOP=uvloop``)."""

    name = "hearth-uvloop"
    event_loop = "uvloop"


#: Every server kind, floor first: the others' ratios are taken against it.
KINDS: dict[str, type[Server]] = {
    "floor": Floor,
    "socketio": SocketIO,
    "hearth": Hearth,
    "hearth-uvloop": HearthUvloop,
}


def make_server(kind: str, database: HearthDatabase | None, send_buffer: int = 0) -> Server:
    """A server of *kind* whose connections get *send_buffer* bytes of kernel send buffer.

    Hearth kinds serve from *database*, which they need.
    """
    cls = KINDS[kind]
    if issubclass(cls, Hearth):
        assert database is not None, "hearth kinds need the run's database"
        return cls(database, send_buffer)
    return cls(send_buffer)
