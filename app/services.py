"""Local PostgreSQL, Redis, hearth and HAProxy processes on loopback, for ``make`` and tests."""

from __future__ import annotations

import contextlib
import csv
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from app.log import get_logger

log = get_logger("services")

#: Where Debian keeps the PostgreSQL binaries when they are not on PATH.
PG_BIN_DIRS = ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin")
#: The repository root: ``python -m app`` runs from here, and the deploy example lives here.
ROOT = Path(__file__).resolve().parent.parent
#: The production HAProxy example that ``make cluster`` and the cluster tests render.
HAPROXY_TEMPLATE = ROOT / "deploy" / "haproxy.cfg"


class ServiceError(RuntimeError):
    """A local service could not be installed, started or stopped."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    """Block until something accepts TCP connections on 127.0.0.1:*port*."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise ServiceError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def pg_tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for folder in PG_BIN_DIRS:
        candidate = Path(folder, name)
        if candidate.exists():
            return str(candidate)
    raise ServiceError(f"PostgreSQL tool {name!r} not found; install postgresql")


def _as_postgres_user() -> list[str]:
    # initdb and postgres refuse to run as root, so root runs them as the postgres user.
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise ServiceError("running as root needs a 'postgres' system user") from None
    return ["runuser", "-u", "postgres", "--"]


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise ServiceError(f"{cmd[0]} failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    return result


@dataclass
class LocalPostgres:
    """A PostgreSQL cluster in *data_dir*, listening on 127.0.0.1:*port* with trust auth."""

    data_dir: Path
    port: int
    database: str = "hearth"
    user: str = "hearth"

    @property
    def dsn(self) -> str:
        """The DSN the application connects with."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"

    @property
    def admin_dsn(self) -> str:
        """A DSN for the superuser, used to create databases."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def init(self) -> None:
        """Create the cluster unless it exists."""
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        self._chown(self.data_dir)
        _run(
            _as_postgres_user()
            + [
                pg_tool("initdb"),
                "-D", str(self.data_dir),
                "-U", "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ]
        )  # fmt: skip

    def start(self) -> None:
        """Start the server (initialising it first) and create the app role and database."""
        self.init()
        if self.running():
            return
        socket_dir = self.data_dir / "sock"
        socket_dir.mkdir(exist_ok=True)
        self._chown(socket_dir)
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {socket_dir} "
            "-c fsync=on -c max_connections=200"
        )
        _run(
            _as_postgres_user()
            + [
                pg_tool("pg_ctl"),
                "-D", str(self.data_dir),
                "-o", options,
                "-l", str(self.data_dir / "server.log"),
                "-w", "-t", "30",
                "start",
            ]
        )  # fmt: skip
        wait_for_port(self.port)
        self._ensure_role_and_database()

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; *mode* is pg_ctl's: smart, fast or immediate."""
        if not self.running():
            return
        _run(
            _as_postgres_user()
            + [pg_tool("pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop"]
        )

    def running(self) -> bool:
        """Whether a postmaster serves this data dir."""
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return False
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, 0)
        except (ValueError, IndexError, ProcessLookupError, PermissionError):
            return False
        return True

    def pid(self) -> int:
        """The postmaster's process id."""
        return int((self.data_dir / "postmaster.pid").read_text().split()[0])

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run *sql* as the superuser and return the unaligned output."""
        cmd = [
            pg_tool("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
            "-d", database, "-v", "ON_ERROR_STOP=1", "-Atc", sql,
        ]  # fmt: skip
        return _run(cmd).stdout.strip()

    def create_database(self, name: str) -> str:
        """Create an empty database owned by the app role and return its DSN."""
        self.psql(f'CREATE DATABASE "{name}" OWNER "{self.user}"')
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{name}"

    def _ensure_role_and_database(self) -> None:
        exists = self.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{self.user}'")
        if not exists:
            self.psql(f'CREATE ROLE "{self.user}" LOGIN CREATEDB')
        exists = self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'")
        if not exists:
            self.psql(f'CREATE DATABASE "{self.database}" OWNER "{self.user}"')


def ensure_installed(program: str, package: str) -> str:
    """Return the path of *program*, installing Debian's *package* as root when missing.

    The install is tried first with the package lists the machine has, and only after
    ``apt-get update`` when that fails (a fresh image ships none, or stale ones).
    """
    found = _which(program)
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ServiceError(f"{program} is missing: install Debian's {package} package")
    log.bind(package=package).info("installing a missing package with apt-get")
    install = ["apt-get", "install", "-y", "-qq", package]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        _run(install, env=env)
    except ServiceError as exc:
        log.bind(package=package, error=str(exc)).info("install failed; updating package lists")
        _run(["apt-get", "update", "-qq"])
        _run(install, env=env)
    found = _which(program)
    if not found:
        raise ServiceError(f"{program} still missing after apt-get install {package}")
    return found


def _which(program: str) -> str | None:
    # Debian puts daemons such as haproxy in /usr/sbin, which a user's PATH may lack.
    return shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin")


def ensure_redis_installed() -> str:
    """Return the redis-server path, installing Debian's package as root when missing."""
    return ensure_installed("redis-server", "redis-server")


def ensure_haproxy_installed() -> str:
    """Return the haproxy path, installing Debian's package as root when missing."""
    return ensure_installed("haproxy", "haproxy")


def ensure_promtool(bin_dir: Path) -> str | None:
    """Return a promtool path, unpacking the one binary from Debian's ``prometheus`` package
    into *bin_dir* when missing; None (logged) when that cannot be done.

    Only the binary: installing the package would start a Prometheus server where systemd
    runs. The alert-rule tests use promtool when it is there and skip without it.
    """
    found = shutil.which("promtool") or shutil.which("promtool", path=str(bin_dir))
    if found or not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        return found
    with tempfile.TemporaryDirectory() as scratch:
        try:
            try:
                _run(["apt-get", "download", "-qq", "prometheus"], cwd=scratch)
            except ServiceError:
                if os.geteuid() != 0:
                    raise
                _run(["apt-get", "update", "-qq"])
                _run(["apt-get", "download", "-qq", "prometheus"], cwd=scratch)
            (package,) = Path(scratch).glob("prometheus_*.deb")
            _run(["dpkg-deb", "-x", str(package), scratch])
        except (ServiceError, ValueError) as exc:
            log.bind(error=str(exc)).warning("promtool unavailable; alert-rule checks will skip")
            return None
        target = bin_dir / "promtool"
        shutil.copy2(Path(scratch) / "usr" / "bin" / "promtool", target)
    return str(target)


def process_alive(pid: int) -> bool:
    """Whether process *pid* exists and has not exited (a zombie counts as exited)."""
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (ProcessLookupError, PermissionError, FileNotFoundError):
        return False
    return state != "Z"


def stop_process(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM process *pid*, wait up to *timeout* seconds for it to exit, then SIGKILL it."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return
        time.sleep(0.05)
    log.bind(pid=pid, timeout=timeout).warning("process ignored SIGTERM; sending SIGKILL")
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return


def _read_pid(pid_file: Path) -> int | None:
    # None when the file is missing, garbled, or names a process that is gone.
    try:
        pid = int(pid_file.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    return pid if process_alive(pid) else None


class _PidFileProcess:
    """A background process known by the pid file its subclass names in `pid_file`."""

    @property
    def pid_file(self) -> Path:
        raise NotImplementedError

    def running(self) -> bool:
        """Whether the process behind the pid file is alive."""
        return _read_pid(self.pid_file) is not None

    def _terminate(self, timeout: float = 10.0) -> None:
        """SIGTERM it, wait up to *timeout* seconds, then SIGKILL (see `stop_process`)."""
        pid = _read_pid(self.pid_file)
        if pid is not None:
            stop_process(pid, timeout)


@dataclass
class LocalRedis(_PidFileProcess):
    """A Redis server with its files in *data_dir*, listening on 127.0.0.1:*port*."""

    data_dir: Path
    port: int
    persistent: bool = True

    @property
    def url(self) -> str:
        """The URL the application connects with."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid_file(self) -> Path:
        """Where redis-server writes its process id."""
        return self.data_dir / "redis.pid"

    def start(self) -> None:
        """Start the server as a daemon and wait until it accepts connections."""
        if self.running():
            return
        server = ensure_redis_installed()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            server,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir.resolve()),
            "--daemonize", "yes",
            "--pidfile", str(self.pid_file.resolve()),
            "--logfile", str((self.data_dir / "redis.log").resolve()),
            "--protected-mode", "yes",
        ]  # fmt: skip
        if self.persistent:
            cmd += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            cmd += ["--save", "", "--appendonly", "no"]
        _run(cmd)
        wait_for_port(self.port)

    def stop(self) -> None:
        """Stop the daemon and wait for it to exit."""
        self._terminate()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health/ready", timeout=1) as response:
            return response.status == 200
    except OSError:  # refused, reset, or an HTTPError such as 503
        return False


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no output)"


@dataclass
class LocalHearth(_PidFileProcess):
    """One ``python -m app serve`` on 127.0.0.1:*port*, with its spool, logs and pid in *folder*.

    *env* holds the ``HEARTH_*`` settings it shares with its peers (database, Redis); its
    own port, spool and log folder are added to them.
    """

    folder: Path
    port: int
    env: dict[str, str] = field(default_factory=dict)
    #: The process, when this object started it (the tests signal and reap it).
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Its base URL, bypassing any load balancer."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        """Where its process id is kept between ``make cluster`` and ``make cluster-stop``."""
        return self.folder / "hearth.pid"

    @property
    def output(self) -> Path:
        """Its stdout and stderr: the JSON log, and whatever fails before logging is set up."""
        return self.folder / "serve.out"

    def start(self, timeout: float = 30.0) -> None:
        """Start serving in the background and wait until ``/health/ready`` answers 200."""
        self.spawn()
        self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start ``python -m app serve`` in the background, unless it runs already."""
        if self.running():
            return
        (self.folder / "spool").mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            **self.env,
            "HEARTH_HOST": "127.0.0.1",
            "HEARTH_PORT": str(self.port),
            "HEARTH_SPOOL_DIR": str(self.folder / "spool"),
            "HEARTH_LOG_DIR": str(self.folder / "log"),
        }
        # Owner-only: serve prints the demo login there.
        descriptor = os.open(self.output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with open(descriptor, "ab") as output:
            # Its own session: a Ctrl-C in the terminal that ran `make cluster` is not for it.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app", "serve"], cwd=ROOT, env=env,
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.pid_file.write_text(f"{self.process.pid}\n")

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until ``/health/ready`` answers 200; stop it and raise if it does not in time."""
        deadline = time.monotonic() + timeout
        while not _ready(self.url):
            if not self.running() or time.monotonic() > deadline:
                self.stop()
                raise ServiceError(
                    f"hearth on port {self.port} did not turn ready: {_log_tail(self.output)}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM it (it drains), wait up to *timeout* seconds, then SIGKILL."""
        self._terminate(timeout)
        if self.process is not None:
            self.process.wait()
        self.pid_file.unlink(missing_ok=True)


def render_haproxy_config(
    template: str,
    *,
    port: int,
    server_ports: Sequence[int],
    stats_socket: Path,
    check_interval: str | None = None,
    block_websocket: bool = False,
) -> str:
    """*template* (``deploy/haproxy.cfg``) pointed at this machine's processes.

    The frontend listens on 127.0.0.1:*port*, the runtime API on *stats_socket*, and the
    template's ``server`` lines become one per port of *server_ports*, each built like the
    first; *check_interval* (HAProxy's syntax: ``500ms``) replaces every ``inter``. With
    *block_websocket* the frontend refuses every WebSocket upgrade with 403, as some
    corporate proxies do (README.rst "Behind a proxy that blocks WebSocket").
    """
    rendered: list[str] = []
    found = {"bind": False, "stats": False, "server": False}
    for line in template.splitlines():
        indent = line[: len(line) - len(line.lstrip())]
        words = line.split()
        if not words or words[0].startswith("#"):
            rendered.append(line)
            continue
        if words[:1] == ["bind"]:
            words[1] = f"127.0.0.1:{port}"
            found["bind"] = True
            if block_websocket:
                rendered.append(indent + " ".join(words))
                words = ["http-request", "deny", "if", "{", "hdr(upgrade)", "-i", "websocket", "}"]
        elif words[:2] == ["stats", "socket"]:
            words[2] = str(stats_socket)
            found["stats"] = True
        elif words[:1] == ["server"]:
            if not found["server"]:
                rendered += [
                    indent + " ".join(["server", f"hearth{number}", f"127.0.0.1:{server_port}"]
                                      + _own_cookie(words[3:], f"hearth{number}"))
                    for number, server_port in enumerate(server_ports, 1)
                ]  # fmt: skip
                found["server"] = True
            continue
        if check_interval and "inter" in words:
            words[words.index("inter") + 1] = check_interval
        rendered.append(indent + " ".join(words))
    missing = [name for name, seen in found.items() if not seen]
    if missing:
        raise ServiceError(f"HAProxy template lacks a line for: {', '.join(missing)}")
    return "\n".join(rendered) + "\n"


def _own_cookie(options: list[str], name: str) -> list[str]:
    """A server line's *options* with its sticky ``cookie`` value set to *name*."""
    options = list(options)
    if "cookie" in options[:-1]:
        options[options.index("cookie") + 1] = name
    return options


@dataclass
class LocalHaproxy(_PidFileProcess):
    """HAProxy on 127.0.0.1:*port* in front of hearth on *server_ports*, its files in *folder*."""

    folder: Path
    port: int
    server_ports: Sequence[int]
    #: The health check interval, in HAProxy's syntax; None keeps the template's.
    check_interval: str | None = None
    #: Refuse WebSocket upgrades (403), as a proxy that blocks WebSocket does.
    block_websocket: bool = False

    @property
    def url(self) -> str:
        """The URL clients use."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        """Where the HAProxy daemon writes its process id."""
        return self.folder / "haproxy.pid"

    @property
    def stats_socket(self) -> Path:
        """Its runtime API socket."""
        return self.folder / "haproxy.sock"

    @property
    def config(self) -> Path:
        """The configuration rendered from :data:`HAPROXY_TEMPLATE`."""
        return self.folder / "haproxy.cfg"

    def start(self, timeout: float = 15.0) -> None:
        """Render the configuration, start the daemon and wait until every server is UP."""
        if self.running():
            return
        program = ensure_haproxy_installed()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            render_haproxy_config(
                HAPROXY_TEMPLATE.read_text(),
                port=self.port,
                server_ports=self.server_ports,
                stats_socket=self.stats_socket,
                check_interval=self.check_interval,
                block_websocket=self.block_websocket,
            )
        )
        output = self.folder / "haproxy.out"
        # A file, not a pipe: the daemon it forks could keep a pipe open after the parent exits.
        with output.open("wb") as sink:
            started = subprocess.run(
                [program, "-f", str(self.config), "-D", "-p", str(self.pid_file)],
                stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
            )  # fmt: skip
        if started.returncode != 0:
            raise ServiceError(f"haproxy failed ({started.returncode}): {_log_tail(output)}")
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = self.server_states()
            except OSError as exc:
                states = {"runtime API": f"unreachable ({exc})"}
            if set(states.values()) == {"UP"}:
                return
            if time.monotonic() > deadline:
                raise ServiceError(f"HAProxy servers not all UP after {timeout}s: {states}")
            time.sleep(0.1)

    def server_states(self) -> dict[str, str]:
        """Each backend server's status from the runtime API: ``UP``, ``DOWN``, ``MAINT``…"""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(str(self.stats_socket))
            sock.sendall(b"show stat\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        lines = answer.decode().splitlines()
        rows = csv.DictReader([lines[0].removeprefix("# "), *lines[1:]])
        # "UP 1/2" while a server is moving from one state to the other counts as its old state.
        return {
            row["svname"]: row["status"].split()[0]
            for row in rows
            if row["pxname"] == "hearth" and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def stop(self) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL after 10 s)."""
        self._terminate()
        self.pid_file.unlink(missing_ok=True)


@dataclass
class LocalCluster:
    """``make cluster``: hearth instances on 127.0.0.1 behind HAProxy, their files in *folder*.

    Instance *n* (from 1) serves on the *n*-th of *instance_ports* and keeps its spool,
    logs and pid file in ``folder/<n>``.
    """

    folder: Path
    port: int = 8080
    instance_ports: tuple[int, ...] = (8081, 8082, 8083)

    def instances(self, env: dict[str, str] | None = None) -> list[LocalHearth]:
        """The instances, sharing the ``HEARTH_*`` settings *env*."""
        return [
            LocalHearth(self.folder / str(number), port, dict(env or {}))
            for number, port in enumerate(self.instance_ports, 1)
        ]

    def haproxy(self) -> LocalHaproxy:
        """The load balancer in front of the instances."""
        return LocalHaproxy(self.folder, self.port, self.instance_ports)

    def start(self, database_url: str, redis_url: str) -> str:
        """Start the instances on *database_url* and *redis_url*, then HAProxy; returns its URL.

        What already runs is left alone, so a second ``make cluster`` completes the first.
        """
        from app.config import known_variables

        # Before any instance starts, so that a missing HAProxy leaves nothing behind.
        ensure_haproxy_installed()
        env = {"HEARTH_DATABASE_URL": database_url, "HEARTH_REDIS_URL": redis_url}
        # Login throttling counts HAProxy's X-Forwarded-For once hearth knows this setting.
        if "HEARTH_TRUSTED_PROXIES" in known_variables():
            env["HEARTH_TRUSTED_PROXIES"] = "127.0.0.1"
        instances = self.instances(env)
        # All spawned first, so they start side by side.
        for instance in instances:
            instance.spawn()
        for instance in instances:
            instance.wait_ready()
            log.bind(port=instance.port, folder=str(instance.folder)).info("hearth instance up")
        haproxy = self.haproxy()
        haproxy.start()
        log.bind(port=haproxy.port, servers=list(self.instance_ports)).info("haproxy up")
        return haproxy.url

    def stop(self) -> None:
        """Stop every instance, then HAProxy, so clients get hearth's goodbye through it."""
        instances = self.instances()
        # SIGTERM all at once, so their drains overlap instead of adding up.
        for instance in instances:
            pid = _read_pid(instance.pid_file)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        for instance in instances:
            instance.stop()
        self.haproxy().stop()
