"""The three servers under test, each started pinned to the server core, and their wire formats.

Each kind knows how to start its server, how a client opens a subscriber or a publisher
connection, and how a publish frame looks on its wire.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import aiohttp

from app.services import LocalPostgres, free_port, wait_for_port

#: The core the servers (and PostgreSQL) run on; the load generator takes the other one.
SERVER_CORE = 0
#: The core of the load generator.
CLIENT_CORE = 1
#: The user and room hearth's benchmark publishes as and to.
BENCH_USER = "bench"
BENCH_PASSWORD = "bench-password-not-secret"
BENCH_ROOM = "lobby"
#: The durable scenario's rooms are this prefix and a number from 0.
DURABLE_ROOM_PREFIX = "durable-"


#: The cores this process could use at start, before the benchmark pinned itself to one.
STARTING_CORES = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else ()


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


def _pinned_to_server_core() -> None:
    pin(0, SERVER_CORE)


class Server:
    """A server process on 127.0.0.1 and the client side of its protocol."""

    #: Short name in tables and JSON.
    name = ""

    def __init__(self) -> None:
        self.port = free_port()
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
            wait_for_port(self.port, timeout=30)
        except Exception:
            self.stop()
            raise

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        raise NotImplementedError

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

    async def open_subscriber(
        self, session: aiohttp.ClientSession
    ) -> aiohttp.ClientWebSocketResponse:
        """A connection that receives every publish of the room from now on."""
        raise NotImplementedError

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
        self._spawn([sys.executable, "-m", "bench.floor", "--port", str(self.port)])

    async def open_subscriber(self, session):  # noqa: D102
        return await session.ws_connect(f"http://127.0.0.1:{self.port}/ws", autoping=True)

    open_publisher = open_subscriber

    def pub_frame(self, content, number):  # noqa: D102
        return content


class SocketIO(Server):
    """bench/socketio_server.py, spoken to in raw Engine.IO v4 / Socket.IO v5 frames."""

    name = "socketio"

    def start(self) -> None:  # noqa: D102
        self._spawn([sys.executable, "-m", "bench.socketio_server", "--port", str(self.port)])

    async def open_subscriber(self, session):  # noqa: D102
        ws = await session.ws_connect(
            f"http://127.0.0.1:{self.port}/socket.io/?EIO=4&transport=websocket", autoping=True
        )
        opened = await ws.receive_str(timeout=30)  # "0{sid, pingInterval, ...}"
        if not opened.startswith("0"):
            raise RuntimeError(f"unexpected Engine.IO open: {opened[:80]}")
        await ws.send_str("40")
        # The server joins the room on connect, before it acknowledges with 40{sid}.
        while not (reply := await ws.receive_str(timeout=30)).startswith("40"):
            if reply == "2":
                await ws.send_str("3")
        return ws

    open_publisher = open_subscriber

    def pub_frame(self, content, number):  # noqa: D102
        return '42["pub",' + json.dumps(content) + "]"


class Hearth(Server):
    """The real server, ``python -m app serve``, against its own throwaway PostgreSQL."""

    name = "hearth"

    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="hearth-bench-"))
        # The postgres system user must be able to enter it when we run as root.
        self.folder.chmod(0o755)
        self.postgres = LocalPostgres(self.folder / "pg", free_port())
        self.token = ""
        self.run_id = uuid.uuid4().hex[:8]
        self._requests = 0
        self._rooms = {BENCH_ROOM}

    def env(self) -> dict[str, str]:
        """The environment of every hearth command of the benchmark."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")}
        env.update(
            HEARTH_PORT=str(self.port),
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
        before = os.sched_getaffinity(0)
        pin(0, SERVER_CORE)
        try:
            self.postgres.start()
        finally:
            os.sched_setaffinity(0, before)
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

    def start(self) -> None:  # noqa: D102
        self.prepare()
        self.token = ""
        self.run_id = uuid.uuid4().hex[:8]
        self._spawn([sys.executable, "-m", "app", "serve"], env=self.env())

    def cleanup(self) -> None:
        """Stop hearth and PostgreSQL and delete their files."""
        self.stop()
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

    def extra_cpu_seconds(self) -> float:  # noqa: D102
        total = 0.0
        for pid in self.postgres_pids():
            try:
                total += cpu_seconds(pid)
            except (OSError, ValueError):
                continue
        return total

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

    async def _request(self, ws: aiohttp.ClientWebSocketResponse, frame: dict) -> dict:
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
        ws = await self.open_publisher(session)
        await self._request(ws, {"op": "sub", "topic": f"room:{BENCH_ROOM}"})
        return ws

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


#: Every server kind, floor first: the others' ratios are taken against it.
KINDS: dict[str, type[Server]] = {"floor": Floor, "socketio": SocketIO, "hearth": Hearth}
