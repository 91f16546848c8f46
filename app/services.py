"""Local PostgreSQL and Redis processes on loopback, for ``make run`` and the test session."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from app.log import get_logger

log = get_logger("services")

#: Where Debian keeps the PostgreSQL binaries when they are not on PATH.
PG_BIN_DIRS = ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin")


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


def _pg_tool(name: str) -> str:
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
                _pg_tool("initdb"),
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
                _pg_tool("pg_ctl"),
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
            + [_pg_tool("pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop"]
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
            _pg_tool("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
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


def ensure_redis_installed() -> str:
    """Return the redis-server path, installing Debian's package as root when missing."""
    found = shutil.which("redis-server")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ServiceError("redis-server is missing: install Debian's redis-server package")
    log.info("installing redis-server with apt-get")
    _run(["apt-get", "update", "-qq"])
    _run(
        ["apt-get", "install", "-y", "-qq", "redis-server"],
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    found = shutil.which("redis-server")
    if not found:
        raise ServiceError("redis-server still missing after apt-get install")
    return found


@dataclass
class LocalRedis:
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

    def running(self) -> bool:
        """Whether the daemon behind the pid file is alive."""
        try:
            os.kill(int(self.pid_file.read_text().strip()), 0)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return False
        return True

    def stop(self) -> None:
        """Stop the daemon and wait for it to exit."""
        if not self.running():
            return
        pid = int(self.pid_file.read_text().strip())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
