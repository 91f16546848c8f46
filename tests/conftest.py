"""Session fixtures: a real PostgreSQL and a real Redis on free loopback ports."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import itertools
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from app.log import setup_logging
from app.services import LocalPostgres, LocalRedis, _read_pid, free_port

_database_names = itertools.count(1)


@pytest.fixture(scope="session", autouse=True)
def json_logging() -> None:
    """Every test logs through the production JSON sinks, so formatting bugs surface anywhere."""
    setup_logging(level="INFO")


def _throwaway_postgres() -> Iterator[LocalPostgres]:
    # Outside pytest's 0700 tmp folders, which the postgres user could not enter.
    data = Path(tempfile.mkdtemp(prefix="hearth-pg-"))
    data.chmod(0o755)
    server = LocalPostgres(data / "data", free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[LocalPostgres]:
    """A throwaway PostgreSQL cluster for the whole session."""
    yield from _throwaway_postgres()


@pytest.fixture
def own_postgres() -> Iterator[LocalPostgres]:
    """A PostgreSQL cluster of one test alone, free to be stopped, hung and restarted."""
    yield from _throwaway_postgres()


def _throwaway_redis() -> Iterator[LocalRedis]:
    data = Path(tempfile.mkdtemp(prefix="hearth-redis-"))
    server = LocalRedis(data, free_port(), persistent=False)
    server.start()
    try:
        yield server
    finally:
        pid = _read_pid(server.pid_file)
        if pid is not None:
            os.kill(pid, signal.SIGCONT)  # a test may have left it stopped
        server.stop()
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedis]:
    """A throwaway Redis server for the whole session."""
    yield from _throwaway_redis()


@pytest.fixture
def own_redis() -> Iterator[LocalRedis]:
    """A Redis server of one test alone, free to be killed, stopped and restarted."""
    yield from _throwaway_redis()


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Every JSON log line of the test, from DEBUG up (read them with `log_records`)."""
    stream = io.StringIO()
    setup_logging(level="DEBUG", stream=stream)
    try:
        yield stream
    finally:
        # Back to what the session's json_logging fixture set up.
        setup_logging(level="INFO")


def log_records(stream: io.StringIO) -> list[dict]:
    """The JSON log records written to *stream* so far."""
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.fixture
async def pg_proxy(postgres: LocalPostgres) -> AsyncIterator[PgProxy]:
    """A started `PgProxy` in front of the session's PostgreSQL, closed after the test."""
    proxy = PgProxy(postgres.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


@pytest.fixture
def database(postgres: LocalPostgres) -> str:
    """The DSN of a fresh, empty database for one test."""
    return postgres.create_database(f"test_{next(_database_names)}")


async def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll *predicate* until it holds, failing the test after *timeout* seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not reached in {timeout}s")
        await asyncio.sleep(0.02)


async def wait_for_http(session: aiohttp.ClientSession, url: str, timeout: float = 10.0) -> None:
    """Poll GET *url* until it answers 200, failing after *timeout* seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            async with session.get(url) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{url} did not answer 200 within {timeout}s")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def demo_upstream_process(seed: int):
    """``python -m app.demo_upstream`` as its own process on loopback; yields its base URL."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.demo_upstream", "--host", "127.0.0.1", "--port", str(port),
        "--seed", str(seed), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            await wait_for_http(session, f"{url}/stats")
        yield url
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 10) is not None


class WsClient:
    """A real WebSocket client speaking hearth's protocol, with helpers for requests."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        #: Frames received but not yet consumed by a wait.
        self.inbox: list[dict] = []
        self._ids = itertools.count(1)

    async def send(self, **frame) -> str:
        """Send *frame* with a fresh id unless it has one; returns the id."""
        frame.setdefault("id", f"r{next(self._ids)}")
        await self.ws.send_str(json.dumps(frame))
        return frame["id"]

    async def receive(self, timeout: float = 10.0) -> dict:
        """The next frame from the server."""
        message = await self.ws.receive(timeout=timeout)
        if message.type is not aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"socket ended: {message.type.name} {self.ws.close_code}")
        return json.loads(message.data)

    async def wait_for(self, predicate, timeout: float = 10.0) -> dict:
        """The first frame (buffered or new) matching *predicate*; others stay buffered."""
        for index, frame in enumerate(self.inbox):
            if predicate(frame):
                return self.inbox.pop(index)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError("no matching frame")
            frame = await self.receive(remaining)
            if predicate(frame):
                return frame
            self.inbox.append(frame)

    async def request(self, op: str, timeout: float = 10.0, **fields) -> dict:
        """Send one request and return its ctrl body."""
        request_id = await self.send(op=op, **fields)
        frame = await self.wait_for(lambda f: f.get("ctrl", {}).get("id") == request_id, timeout)
        return frame["ctrl"]

    async def settle(self, seconds: float) -> None:
        """Buffer whatever else arrives within *seconds* (late or duplicate frames show now)."""
        try:
            await self.wait_for(lambda frame: False, seconds)
        except TimeoutError:
            pass

    def take(self, kind: str, predicate=lambda body: True) -> list[dict]:
        """Remove and return buffered frames of *kind* ('data', 'event', 'ctrl') matching."""
        taken = [f[kind] for f in self.inbox if kind in f and predicate(f[kind])]
        self.inbox = [f for f in self.inbox if not (kind in f and predicate(f[kind]))]
        return taken

    async def data(self, count: int, timeout: float = 10.0) -> list[dict]:
        """The next *count* data frames, in arrival order."""
        frames = self.take("data")
        while len(frames) < count:
            frames.append((await self.wait_for(lambda f: "data" in f, timeout))["data"])
        return frames


class Hearth:
    """A running hearth app on a real PostgreSQL, with users, rooms and tokens ready."""

    #: Users created for every test: name -> admin flag.
    USERS = {"alice": False, "bob": False, "carol": False, "root": True}
    PASSWORD = "correct horse battery"

    def __init__(self, server, app, database: str) -> None:
        self.server = server
        self.app = app
        self.database = database
        self.tokens: dict[str, str] = {}
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self.clients: list[WsClient] = []

    @property
    def url(self) -> str:
        """Base URL of the server."""
        return str(self.server.make_url("/"))

    async def connect(self, user: str | None = "alice", **kwargs) -> WsClient:
        """Open a WebSocket (authenticated as *user* unless None)."""
        ws = await self.session.ws_connect(self.server.make_url("/ws"), **kwargs)
        client = WsClient(ws)
        self.clients.append(client)
        if user is not None:
            ctrl = await client.request("auth", token=self.tokens[user])
            assert ctrl["code"] == 200, ctrl
        return client

    async def close(self) -> None:
        """Close every client, the session and the server."""
        for client in self.clients:
            await client.ws.close()
        await self.session.close()
        await self.server.close()


async def start_hearth(dsn: str, spool_dir: Path, **env: str) -> Hearth:
    """Seed users and rooms in *dsn*, then start hearth on a free port with HEARTH_* *env*."""
    from aiohttp.test_utils import TestServer

    from app import keys
    from app.auth import hash_password
    from app.config import Settings
    from app.store import Store
    from app.web import create_app

    store = Store(dsn)
    await store.open()
    await store.migrate()
    password_hash = hash_password(Hearth.PASSWORD)
    for name, admin in Hearth.USERS.items():
        if await store.user_by_name(name) is None:
            await store.create_user(name, password_hash, is_admin=admin)
    await store.create_room("lobby")
    await store.create_room("secret", private=True)
    await store.add_room_member("secret", "bob")
    await store.close()
    settings = Settings.from_env(
        {
            "HEARTH_DATABASE_URL": dsn,
            "HEARTH_SPOOL_DIR": str(spool_dir),
            "HEARTH_LOG_DIR": "",
            "HEARTH_DB_PING_INTERVAL": "0.2",
            **env,
        }
    )
    app = create_app(settings)
    server = TestServer(app)
    await server.start_server()
    hearth = Hearth(server, app, dsn)
    for name in Hearth.USERS:
        token, _ = await app[keys.AUTH].login(name, Hearth.PASSWORD, client_ip="127.0.0.1")
        hearth.tokens[name] = token
    return hearth


@pytest.fixture
async def make_hearth(database, tmp_path):
    """Build and start hearth with HEARTH_* overrides (on *dsn*, default a fresh database)."""
    started: list[Hearth] = []

    async def make(dsn: str | None = None, **env: str) -> Hearth:
        hearth = await start_hearth(dsn or database, tmp_path / "spool", **env)
        started.append(hearth)
        return hearth

    yield make
    for hearth in started:
        await hearth.close()


def masked_text_frame(text: str) -> bytes:
    """One client-to-server WebSocket text frame (clients must mask)."""
    payload = text.encode()
    mask = os.urandom(4)
    header = bytes([0x81])
    if len(payload) < 126:
        header += bytes([0x80 | len(payload)])
    else:
        header += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


#: Publish limits no test reaches: for tests that publish in bursts.
UNLIMITED = {
    "HEARTH_PUB_RATE": "100000",
    "HEARTH_PUB_BURST": "100000",
    "HEARTH_USER_PUB_RATE": "100000",
    "HEARTH_USER_PUB_BURST": "100000",
}

#: Client bounds a stalled reader reaches within seconds: a 50-frame backlog, a 2 s send
#: timeout and a 16 KB kernel send buffer (loopback would otherwise absorb megabytes).
STALL_BOUNDS = {
    "HEARTH_CLIENT_QUEUE_MESSAGES": "50",
    "HEARTH_SEND_TIMEOUT": "2",
    "HEARTH_WS_SEND_BUFFER": "16384",
}


class StalledSocket:
    """A client socket on a tiny receive buffer that stops reading once it is set up."""

    sock: socket.socket

    def closed_by_server(self, timeout: float) -> bool:
        """Read (at last) until the server closes the TCP connection or *timeout* passes."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        finally:
            self.sock.close()
        return True


class StalledReader(StalledSocket):
    """A real WebSocket client on a tiny receive buffer that stops reading after its handshake."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        response = b""
        while b"\r\n\r\n" not in response:
            response += self.sock.recv(1)
        assert response.startswith(b"HTTP/1.1 101"), response

    def send(self, frame: dict) -> None:
        """Send one JSON frame."""
        self.sock.sendall(masked_text_frame(json.dumps(frame)))
        return True


class PgProxy:
    """A real TCP proxy in front of PostgreSQL that can slow chosen statements down.

    It makes faults a live server cannot be asked for. :meth:`delay_next_reply`: a statement
    that commits on the server while its answer arrives after the client gave up (the
    server's bytes on that connection are held once the statement is seen; psycopg2 sends
    simple ``Q`` messages). :attr:`listen_delay`: a slow network as the room listener sees
    it, every LISTEN held back before it reaches the server.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._reply_delay: tuple[bytes, float] | None = None
        #: Statements whose answer was held back.
        self.delayed_replies = 0
        #: Seconds each LISTEN is held before it goes on to the server; 0 holds nothing.
        self.listen_delay = 0.0
        #: LISTEN statements held so far.
        self.delayed_listens = 0
        self._tasks: set[asyncio.Task] = set()

    async def start(self, port: int = 0) -> None:
        """Listen on loopback *port* (0: a free one); after `close`, the same port again
        brings a cut link back."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]

    def dsn(self, dsn: str) -> str:
        """*dsn* (a postgresql:// URL) pointed at this proxy instead."""
        return dsn.replace(f":{self.target_port}/", f":{self.port}/")

    def delay_next_reply(self, marker: bytes, seconds: float) -> None:
        """Hold the server's answer to the next statement containing *marker* for *seconds*."""
        self._reply_delay = (marker, seconds)

    async def close(self) -> None:
        """Stop listening and cut every proxied connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_reader, client_writer) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            server_reader, server_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port
            )
        except OSError:
            client_writer.close()
            self._tasks.discard(task)
            return
        hold_until = [0.0]

        async def upstream() -> None:
            while data := await client_reader.read(65536):
                delay = self._reply_delay
                if delay is not None and b"Q" in data and delay[0] in data:
                    hold_until[0] = asyncio.get_running_loop().time() + delay[1]
                    self._reply_delay = None
                    self.delayed_replies += 1
                if self.listen_delay and b"LISTEN" in data:
                    self.delayed_listens += 1
                    await asyncio.sleep(self.listen_delay)
                server_writer.write(data)
                await server_writer.drain()
            server_writer.close()

        async def downstream() -> None:
            while data := await server_reader.read(65536):
                wait = hold_until[0] - asyncio.get_running_loop().time()
                if wait > 0:
                    await asyncio.sleep(wait)
                client_writer.write(data)
                await client_writer.drain()
            client_writer.close()

        try:
            await asyncio.gather(upstream(), downstream())
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            server_writer.close()
            client_writer.close()
            self._tasks.discard(task)


def postgres_pids(server: LocalPostgres) -> list[int]:
    """The postmaster of *server* and every process it started."""
    postmaster = server.pid()
    children = subprocess.run(
        ["pgrep", "-P", str(postmaster)], capture_output=True, text=True
    ).stdout.split()
    return sorted({postmaster, *map(int, children)})


@contextlib.contextmanager
def hung(server: LocalPostgres | LocalRedis) -> Iterator[None]:
    """*server* SIGSTOPped (PostgreSQL's postmaster and backends alike) until the block
    ends: connections stay open and nothing answers."""
    if isinstance(server, LocalRedis):
        pid = _read_pid(server.pid_file)
        pids = [] if pid is None else [pid]
    else:
        pids = postgres_pids(server)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


@pytest.fixture
async def blocking_proxy(tmp_path: Path):
    """Start real HAProxy in front of a hearth port, refusing every WebSocket upgrade (403)
    as some corporate proxies do; call it with the port, get the started `LocalHaproxy`.

    Each proxy has its own folder and port; all are stopped after the test. Skips when
    HAProxy is missing and cannot be installed.
    """
    from app.services import LocalHaproxy, ServiceError, ensure_haproxy_installed

    try:
        ensure_haproxy_installed()
    except ServiceError as exc:
        pytest.skip(f"haproxy is missing and could not be installed: {exc}")
    started: list[LocalHaproxy] = []

    async def start(server_port: int, *, block_websocket: bool = True) -> LocalHaproxy:
        proxy = LocalHaproxy(
            tmp_path / f"haproxy-{len(started) + 1}",
            free_port(),
            [server_port],
            check_interval="500ms",
            block_websocket=block_websocket,
        )
        started.append(proxy)
        await asyncio.to_thread(proxy.start)
        return proxy

    yield start
    for proxy in started:
        await asyncio.to_thread(proxy.stop)


@pytest.fixture
async def browser():
    """A headless Chromium (Debian's, installed with apt-get when missing, so ``make test``
    gets it) driven by playwright; closed after the test."""
    from tests.browser import CHROMIUM, CHROMIUM_ARGS, ensure_chromium

    ensure_chromium()
    playwright_api = pytest.importorskip("playwright.async_api")
    async with playwright_api.async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
def console():
    """The console errors (CSP violations included) of every page a test opens."""
    from tests.browser import ConsoleWatch

    return ConsoleWatch()
