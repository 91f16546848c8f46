"""Command line: ``python -m app serve|migrate|services|user|room|token|backup|check|...``."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import hashlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from app.config import Settings, unknown_variables
from app.errors import ConfigError
from app.log import get_logger, setup_logging

if TYPE_CHECKING:
    from app.spool import Spool
    from app.store import Store

log = get_logger("cli")

#: Where ``make run`` keeps local PostgreSQL and Redis data.
VAR_DIR = Path("var")
#: The admin user and public room ``demo`` creates on a fresh database.
DEMO_ADMIN = "admin"
DEMO_ROOM = "lobby"
#: Where ``demo`` keeps the demo admin's password (one 0600 file per database) so ``serve``
#: can show it on every ``make run``; ``make clean`` deletes it with the rest of ``var/``.
DEMO_CREDENTIALS = VAR_DIR / "demo-credentials"
#: Loopback ports of the development services.
DEV_PG_PORT = 55432
DEV_REDIS_PORT = 56379
#: Where ``backup`` writes its dump when no ``--output`` is given.
BACKUP_DIR = VAR_DIR / "backups"
#: The spool's data file within HEARTH_SPOOL_DIR, as the server names it (app/web.py).
#: Tables a hearth backup must hold for ``backup verify`` to accept it.
BACKUP_TABLES = ("users", "rooms", "messages", "schema_migrations")


class CommandFailed(Exception):
    """A command cannot go on; its text is the one error line the operator sees."""


def _load_settings(stream: TextIO | None = None) -> Settings:
    # Logs go to *stream* (stdout when None) and the configured files.
    setup_logging(stream=stream)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        log.bind(variable=exc.variable).log(
            "FATAL", f"invalid configuration: {exc.variable} {exc.reason}"
        )
        sys.exit(2)
    setup_logging(
        level=settings.log_level.upper(),
        log_dir=settings.log_dir or None,
        rotation_bytes=int(settings.log_rotation_mb * 1024 * 1024),
        retention=settings.log_retention,
        stream=stream,
    )
    for variable, suggestion in unknown_variables():
        hint = f"; did you mean {suggestion}?" if suggestion else ""
        log.bind(variable=variable, suggestion=suggestion).warning(
            f"unknown variable {variable} ignored{hint}"
        )
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve HTTP and WebSocket until SIGINT or SIGTERM."""
    from app.web import serve

    settings = _load_settings()

    async def serve_and_announce() -> None:
        server = asyncio.ensure_future(serve(settings))
        await _announce_when_listening(settings, server)
        await server

    try:
        with asyncio.Runner(loop_factory=_loop_factory(settings.event_loop)) as runner:
            runner.run(serve_and_announce())
    except OSError as exc:
        log.bind(host=settings.host, port=settings.port, error=exc.strerror).log(
            "FATAL", "cannot listen"
        )
        return 1
    return 0


async def _announce_when_listening(settings: Settings, server: asyncio.Future[None]) -> None:
    """Once the port of *settings* accepts connections, print the URL and the demo login.

    They are the last lines ``make run`` shows before the logs of requests. Nothing is
    printed when *server* ends first (it could not listen).
    """
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    while not server.done():
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, settings.port), 1.0)
        except (OSError, TimeoutError):
            await asyncio.sleep(0.1)
            continue
        writer.close()
        break
    else:
        return
    print(f"hearth is serving on http://{host}:{settings.port}", flush=True)
    print(f"diagnostics dashboard: http://{host}:{settings.port}/dashboard", flush=True)
    credentials = _demo_credentials(settings.database_url)
    if credentials is not None:
        print(f"demo login: {credentials[0]} / {credentials[1]}", flush=True)
        print(
            f"forgot or changed it? python -m app user reset-password {credentials[0]}",
            flush=True,
        )


def _demo_credentials_file(database_url: str) -> Path:
    # One file per database: ``demo`` run on another database (a test's) never replaces
    # the login of ``make run``'s.
    digest = hashlib.sha256(database_url.encode()).hexdigest()[:16]
    return DEMO_CREDENTIALS / digest


def _demo_credentials(database_url: str) -> tuple[str, str] | None:
    """The demo admin's username and password ``demo`` saved for *database_url*, or None."""
    try:
        text = _demo_credentials_file(database_url).read_text(encoding="utf-8")
        username, password = text.split()[:2]
    except (OSError, ValueError):
        return None
    return username, password


def _save_demo_credentials(database_url: str, username: str, password: str) -> None:
    """Keep the demo login of *database_url* under `DEMO_CREDENTIALS`, for this user only."""
    path = _demo_credentials_file(database_url)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(f"{username}\n{password}\n")


def _loop_factory(event_loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory of *event_loop*'s loops (HEARTH_EVENT_LOOP); None: asyncio's own.

    uvloop is an optional extra: when it is asked for but missing, serving goes on with
    asyncio after a warning rather than not at all.
    """
    if event_loop != "uvloop":
        return None
    try:
        import uvloop
    except ImportError:
        log.bind(event_loop=event_loop).warning(
            "HEARTH_EVENT_LOOP=uvloop but uvloop is not installed; using asyncio"
        )
        return None
    log.bind(event_loop=event_loop, version=uvloop.__version__).info("event loop: uvloop")
    return uvloop.new_event_loop


def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply pending migrations."""
    from app import store

    settings = _load_settings()
    try:
        # Not HEARTH_DB_TIMEOUT: that is also each statement's server-side limit, and a
        # migration may rightly run longer than any request.
        applied = asyncio.run(store.migrate(settings.database_url))
    except store.MigrationFailed as exc:
        log.bind(file=exc.filename).log("FATAL", "migration failed; database left as it was")
        return 1
    except Exception as exc:
        if not _log_failure(exc, settings, "FATAL"):
            raise
        return 1
    log.bind(applied=applied).info("migrations up to date")
    return 0


def _dev_services():
    from app.services import LocalPostgres, LocalRedis

    return (
        LocalPostgres(VAR_DIR.resolve() / "pg", DEV_PG_PORT),
        LocalRedis(VAR_DIR.resolve() / "redis", DEV_REDIS_PORT),
    )


def cmd_services(args: argparse.Namespace) -> int:
    """Start, stop or wipe the local PostgreSQL and Redis used by ``make run``.

    ``cluster`` starts ``make cluster``'s hearth instances and HAProxy (on those services,
    migrated), and ``cluster-stop`` stops them.
    """
    from app.services import ServiceError

    if args.action.startswith("cluster"):
        return _cluster(args.action)
    setup_logging()
    postgres, redis = _dev_services()
    try:
        if args.action == "start":
            postgres.start()
            redis.start()
            log.bind(postgres_port=postgres.port, redis_port=redis.port).info("services up")
        else:
            redis.stop()
            postgres.stop()
            if args.action == "clean":
                shutil.rmtree(VAR_DIR, ignore_errors=True)
            log.info("services stopped" if args.action == "stop" else "services removed")
    except ServiceError as exc:
        log.bind(error=str(exc)).log("FATAL", f"services {args.action} failed")
        return 1
    return 0


def _cluster(action: str) -> int:
    from app.services import LocalCluster, ServiceError

    settings = _load_settings()
    cluster = LocalCluster(VAR_DIR.resolve() / "cluster")
    try:
        if action == "cluster":
            _, redis = _dev_services()
            url = cluster.start(settings.database_url, settings.redis_url or redis.url)
            ports = ", ".join(map(str, cluster.instance_ports))
            print(f"hearth cluster: {url} (HAProxy in front of ports {ports})", flush=True)
        else:
            cluster.stop()
            log.info("cluster stopped")
    except ServiceError as exc:
        log.bind(error=str(exc)).log("FATAL", f"services {action} failed")
        return 1
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    """Print the settings in effect here, one VARIABLE=value line each, secrets hidden.

    With --table, print instead the table of every setting, its default and meaning, that
    README.rst carries.
    """
    from app.config import effective_settings, settings_table

    if args.table:
        print(settings_table())
        return 0
    # Logs (an unknown variable's warning) go to stderr so stdout stays only the settings.
    print(effective_settings(_load_settings(stream=sys.stderr)))
    return 0


def _log_failure(exc: Exception, settings: Settings, level: str) -> bool:
    """Log a command's failure *exc* as one line at *level*; False when it is no known kind.

    An unreachable PostgreSQL (the store's `DatabaseError`) says so with the DSN of
    *settings* redacted. Any other `AppError` logs its client text (a refused name, a
    duplicate).
    """
    from app.errors import AppError, DatabaseError
    from app.log import redact_dsn

    if isinstance(exc, DatabaseError):
        failure = log.bind(error=type(exc).__name__, database=redact_dsn(settings.database_url))
        message, detail = "database unreachable", exc.detail
    elif isinstance(exc, AppError):
        failure, message, detail = log.bind(error=exc.code), exc.client_text, exc.detail
    else:
        return False
    if detail:
        failure = failure.bind(detail=detail)
    # depth=1 credits the line to the command, not to this helper.
    failure.opt(depth=1).log(level, message)
    return True


def _run_store_command(
    work: Callable[[Store, Settings], Awaitable[None]], *, stream: TextIO | None = sys.stderr
) -> int:
    """Run *work* on a store opened from the settings; 0, or 1 after one error line.

    Logs go to *stream*: stderr by default, so that stdout holds only what a command prints
    (a listing, a token, a path). The store is the server's (`app.web.build_store`), with
    its cipher.
    """
    from app.web import build_store

    settings = _load_settings(stream)

    async def run() -> None:
        store = build_store(settings)
        await store.open()
        try:
            await work(store, settings)
        finally:
            await store.close()

    return _run_reporting(lambda: asyncio.run(run()), settings)


def _run_reporting(work: Callable[[], object], settings: Settings) -> int:
    """Call *work*; 0, or 1 after one error line for any failure a command expects."""
    from app.services import ServiceError

    try:
        work()
    except (CommandFailed, ServiceError) as exc:
        log.error(str(exc))
        return 1
    except OSError as exc:
        log.bind(error=type(exc).__name__, file=exc.filename).error(exc.strerror or str(exc))
        return 1
    except Exception as exc:
        if not _log_failure(exc, settings, "ERROR"):
            raise
        return 1
    return 0


def _read_secret(given: str | None, prompt: str, *, confirm: bool = False) -> str:
    """*given*, else one line of stdin when it is not a terminal, else a getpass prompt.

    With *confirm* the prompt asks twice. Nothing read here is ever logged.
    """
    if given is not None:
        return given
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    try:
        secret = getpass.getpass(f"{prompt}: ")
        if confirm and getpass.getpass(f"{prompt} (again): ") != secret:
            raise CommandFailed(f"the two {prompt}s differ")
    except (EOFError, KeyboardInterrupt):
        raise CommandFailed(f"no {prompt} given") from None
    return secret


def cmd_user(args: argparse.Namespace) -> int:
    """Manage users: ``user add NAME [--admin]``, ``user list``, ``user reset-password NAME``.

    A password not given with --password is read from stdin, or prompted for on a terminal.
    """
    from app.auth import check_password, check_username, hash_password

    async def add(store: Store, settings: Settings) -> None:
        username = check_username(args.name)
        password = check_password(_read_secret(args.password, "password", confirm=True))
        password_hash = await asyncio.to_thread(hash_password, password)
        user_id = await store.create_user(username, password_hash, is_admin=args.admin)
        log.bind(user_id=user_id, username=username, is_admin=args.admin).info("user added")

    async def list_users(store: Store, settings: Settings) -> None:
        for username, is_admin, created_at in await store.list_users():
            role = "admin" if is_admin else "user"
            print(f"{username:<24} {role:<5} created {created_at:%Y-%m-%d %H:%M:%S}Z", flush=True)

    async def reset_password(store: Store, settings: Settings) -> None:
        from app.errors import NotFound

        username = check_username(args.name)
        if await store.user_by_name(username) is None:
            raise NotFound(f"user {username}", text="user not found")
        password = check_password(_read_secret(args.password, "password", confirm=True))
        password_hash = await asyncio.to_thread(hash_password, password)
        revoked = await store.set_password(username, password_hash)
        if username == DEMO_ADMIN:
            # serve would otherwise keep printing the demo password that no longer works.
            _demo_credentials_file(store.dsn).unlink(missing_ok=True)
        log.bind(username=username, tokens_revoked=revoked).info("password reset")

    actions = {"add": add, "list": list_users, "reset-password": reset_password}
    return _run_store_command(actions[args.action])


def cmd_room(args: argparse.Namespace) -> int:
    """Manage rooms: ``room create NAME [--private]``, ``room list``, ``room add-member ROOM USER``."""
    from app.auth import check_username
    from app.errors import Conflict
    from app.models import check_room_name

    async def create(store: Store, settings: Settings) -> None:
        name = check_room_name(args.name)
        if not await store.create_room(name, private=args.private):
            raise Conflict(f"room {name} exists", text="room already exists")
        log.bind(topic=f"room:{name}", private=args.private).info("room created")

    async def list_rooms(store: Store, settings: Settings) -> None:
        for room in await store.load_rooms():
            kind = "private" if room.is_private else "public"
            print(
                f"{room.name:<24} {kind:<7} last_seq {room.last_seq:<8} "
                f"members {len(room.members)}",
                flush=True,
            )

    async def add_member(store: Store, settings: Settings) -> None:
        room, username = check_room_name(args.room), check_username(args.user)
        await store.add_room_member(room, username)
        log.bind(topic=f"room:{room}", member=username).info("room member added")

    actions = {"create": create, "list": list_rooms, "add-member": add_member}
    return _run_store_command(actions[args.action])


def cmd_token(args: argparse.Namespace) -> int:
    """Issue or revoke login tokens: ``token issue USER [--hours H]``, ``token revoke [TOKEN]``.

    ``issue`` prints the new token, and only there. ``revoke`` reads a token not given as an
    argument from stdin, or a prompt on a terminal (an argument shows in ``ps``).
    """
    from app.auth import check_username, token_hash
    from app.errors import NotFound

    async def issue(store: Store, settings: Settings) -> None:
        username = check_username(args.user)
        row = await store.user_by_name(username)
        if row is None:
            raise NotFound(f"user {username}", text="user not found")
        hours = settings.token_ttl_hours if args.hours is None else args.hours
        if hours <= 0:
            raise CommandFailed("--hours must be positive")
        token = secrets.token_urlsafe(32)
        expires_at = datetime.now(UTC) + timedelta(hours=hours)
        await store.insert_token(token_hash(token), row[0], expires_at)
        log.bind(username=username, expires_at=expires_at.isoformat()).info("token issued")
        print(token, flush=True)

    async def revoke(store: Store, settings: Settings) -> None:
        token = _read_secret(args.token, "token").strip()
        if not token or not await store.revoke_token(token_hash(token)):
            raise CommandFailed("token unknown or already revoked")
        log.info("token revoked")

    return _run_store_command(issue if args.action == "issue" else revoke)


def _pg_connection(dsn: str) -> tuple[str, dict[str, str]]:
    """The libpq conninfo of *dsn* without its password, and an environment carrying it.

    The password goes in PGPASSWORD so it never shows in ``ps``.
    """
    import psycopg2
    import psycopg2.extensions

    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.Error:
        raise CommandFailed("HEARTH_DATABASE_URL is not a valid PostgreSQL DSN") from None
    env = dict(os.environ)
    password = params.pop("password", None)
    if password:
        env["PGPASSWORD"] = password
    params.setdefault("connect_timeout", "10")

    def quoted(value: str) -> str:
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"

    return " ".join(f"{key}={quoted(value)}" for key, value in params.items()), env


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def cmd_backup(args: argparse.Namespace) -> int:
    """Dump the database with pg_dump (custom format) and print the file's path.

    ``backup verify FILE`` reads FILE's table of contents with pg_restore --list and fails
    when it is unreadable or holds no hearth tables.
    """
    from app.services import pg_tool

    settings = _load_settings(sys.stderr)

    def dump() -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        target = Path(args.output or BACKUP_DIR / f"hearth-{stamp}.dump").resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        conninfo, env = _pg_connection(settings.database_url)
        partial = target.with_name(target.name + ".partial")
        result = subprocess.run(
            [pg_tool("pg_dump"), "--format=custom", f"--file={partial}", f"--dbname={conninfo}"],
            capture_output=True, text=True, env=env, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            raise CommandFailed(f"pg_dump failed: {_last_line(result.stderr)}")
        partial.replace(target)
        log.bind(file=str(target), bytes=target.stat().st_size).info("backup written")
        print(target, flush=True)

    def verify() -> None:
        path = Path(args.file)
        if not path.is_file():
            raise CommandFailed(f"backup {path} not found")
        result = subprocess.run(
            [pg_tool("pg_restore"), "--list", str(path)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise CommandFailed(f"backup {path} unreadable: {_last_line(result.stderr)}")
        entries = [line for line in result.stdout.splitlines() if line and not line.startswith(";")]
        tables = {
            line.split()[-2]
            for line in entries
            if " TABLE DATA " in line and len(line.split()) >= 2
        }
        missing = [table for table in BACKUP_TABLES if table not in tables]
        if missing:
            raise CommandFailed(f"backup {path} holds no data of: {', '.join(missing)}")
        print(
            f"{path}: readable, {len(entries)} entries, {len(tables)} tables with data", flush=True
        )

    return _run_reporting(verify if args.action == "verify" else dump, settings)


def _spool_path(settings: Settings) -> Path:
    from app.spool import SPOOL_FILE

    return Path(settings.spool_dir) / SPOOL_FILE


def _open_spool(settings: Settings) -> Spool:
    from app.spool import Spool

    # save_every=1: each ack is durable, so a drain cut short never stores one twice.
    return Spool(
        _spool_path(settings), max_bytes=int(settings.spool_max_mb * 1024 * 1024), save_every=1
    )


def _refuse_while_serving(settings: Settings, force: bool) -> None:
    """Raise `CommandFailed` when a server answers on the port of *settings*.

    A server with these settings shares their spool, and two processes writing one spool
    lose records. Only the port is checked: a server on another port with the same
    HEARTH_SPOOL_DIR goes unnoticed (hence the caveat in README.rst). *force* skips this.
    """
    if force:
        return
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    try:
        with socket.create_connection((host, settings.port), timeout=0.5):
            pass
    except OSError:
        return
    raise CommandFailed(
        f"a server is listening on {host}:{settings.port} and may be using the spool "
        f"{_spool_path(settings)}; stop it first (--force if it uses another spool)"
    )


def cmd_drain_spool(args: argparse.Namespace) -> int:
    """Store every spooled message now, oldest first, as the server's drain would.

    A record that can never be stored (unreadable, an unknown room, refused content) goes to
    the dead-letter file. PostgreSQL failing stops the drain; what is left stays spooled.
    Refuses to run while a server answers on HEARTH_PORT (see --force).
    """
    from app.crypto import DecryptError
    from app.errors import DatabaseError, DatabaseRejected, NotFound
    from app.log import trace_context
    from app.spool import open_record

    async def drain(store: Store, settings: Settings) -> None:
        _refuse_while_serving(settings, args.force)
        spool = _open_spool(settings)
        entries = await spool.pending()
        if not entries:
            print("spool empty: nothing to store", flush=True)
            return
        total, stored, dead = len(entries), 0, 0
        for index, entry in enumerate(entries, start=1):
            progress = (
                f"[{index}/{total}] id={entry.record.get('id')} room={entry.record.get('room')}"
            )
            reason: str | None = None
            try:
                message = open_record(entry.record, store.cipher)
            except (DecryptError, KeyError, TypeError, ValueError) as exc:
                reason = f"unreadable record: {type(exc).__name__}"
            else:
                try:
                    with trace_context(message.trace_id):
                        outcome, is_new = await store.insert_message(message)
                except (DatabaseRejected, NotFound) as exc:
                    reason = type(exc).__name__  # no retry can store it
                except DatabaseError:
                    print(f"{progress}: stopped; {total - index + 1} left in the spool", flush=True)
                    raise
            if reason is not None:
                await spool.dead_letter(entry, reason)
                dead += 1
                print(f"{progress}: dead letter ({reason})", flush=True)
                continue
            await spool.ack(entry)
            stored += 1
            repeat = "" if is_new else " (already stored)"
            print(f"{progress}: stored as seq {outcome.seq}{repeat}", flush=True)
        log.bind(stored=stored, dead_letters=dead).info("spool drained")
        print(f"done: {stored} stored, {dead} dead-lettered", flush=True)

    return _run_store_command(drain)


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if epoch else "?"


def cmd_dead_letters(args: argparse.Namespace) -> int:
    """List the spool's dead letters, or move them back to the spool to be stored again.

    ``list`` shows each one's line, time, id, room, sender and reason (never its content)
    and is safe while a server runs. ``retry`` requeues every readable one and refuses to
    run while a server answers on HEARTH_PORT (see --force); the server's drain, or
    ``drain-spool``, then stores them.
    """
    from app.spool import read_dead_letters, requeue_dead_letters

    settings = _load_settings(sys.stderr)

    def describe(record: dict | None) -> str:
        if record is None:
            return "corrupt line"
        return f"id={record.get('id')} room={record.get('room')} sender={record.get('sender')}"

    def list_letters() -> None:
        letters = read_dead_letters(_open_spool(settings).dead_path)
        for letter in letters:
            reason = f" reason={letter.reason}" if letter.record is not None else ""
            print(f"{letter.line}: {_when(letter.dead_at)} {describe(letter.record)}{reason}")
        print(f"{len(letters)} dead letter(s)", flush=True)

    def retry() -> None:
        _refuse_while_serving(settings, args.force)
        outcomes = asyncio.run(requeue_dead_letters(_open_spool(settings)))
        for letter, outcome in outcomes:
            print(f"{letter.line}: {describe(letter.record)}: {outcome}")
        requeued = sum(outcome == "requeued" for _, outcome in outcomes)
        log.bind(requeued=requeued, kept=len(outcomes) - requeued).info("dead letters retried")
        print(
            f"{requeued} requeued, {len(outcomes) - requeued} kept; "
            "drain-spool (or the server) stores them",
            flush=True,
        )

    return _run_reporting(retry if args.action == "retry" else list_letters, settings)


def cmd_maintenance(args: argparse.Namespace) -> int:
    """Turn maintenance mode on or off, or show it, for the instance whose HEARTH_SPOOL_DIR
    this is. While it is on, ``/health/ready`` answers 503 (reason ``maintenance``), so the
    load balancer sends new clients elsewhere; connected clients stay. It survives a
    restart. A running server sees the change at its next probe, no restart needed."""
    from app.maintenance import MAINTENANCE_FILE, Maintenance

    settings = _load_settings(sys.stderr)
    maintenance = Maintenance(Path(settings.spool_dir) / MAINTENANCE_FILE)
    by = f"cli:{getpass.getuser()}"
    if args.action == "on":
        state = maintenance.turn_on(by=by, reason=args.reason)
        print(f"maintenance on since {state.since}; readiness answers 503", flush=True)
    elif args.action == "off":
        was_on = maintenance.turn_off(by=by)
        print("maintenance off" if was_on else "maintenance was not on", flush=True)
    else:
        current = maintenance.state()
        if current is None:
            print("maintenance off", flush=True)
        else:
            print(f"maintenance on since {current.since} by {current.by}: {current.reason}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Check that migrations are current, every room's seqs are whole, the spool is empty
    and there are no dead letters; print each result, exit 0 only when all hold."""
    from app.spool import pending_count, read_dead_letters
    from app.store import MIGRATIONS_DIR

    async def check(store: Store, settings: Settings) -> None:
        results: list[tuple[str, bool, str]] = []
        applied = await store.applied_migrations()
        files = sorted(path.name for path in MIGRATIONS_DIR.glob("[0-9]*.sql"))
        pending = [name for name in files if name not in applied]
        results.append((
            "migrations", not pending,
            f"pending: {', '.join(pending)}" if pending else f"{len(applied)} applied, none pending",
        ))  # fmt: skip
        problems = []
        report = await store.room_seq_report()
        for room, last_seq, max_seq, count in report:
            if last_seq != max_seq:
                problems.append(f"{room}: last_seq {last_seq} but highest seq {max_seq}")
            if count != max_seq:
                problems.append(f"{room}: {max_seq - count} seq(s) missing in 1..{max_seq}")
        results.append((
            "seqs", not problems, "; ".join(problems) or f"{len(report)} rooms, no gaps",
        ))  # fmt: skip
        spool_path = _spool_path(settings)
        depth = await asyncio.to_thread(pending_count, spool_path)
        results.append(("spool", not depth, f"{depth} message(s) waiting in {spool_path}"))
        dead = await asyncio.to_thread(read_dead_letters, _open_spool(settings).dead_path)
        results.append(("dead letters", not dead, f"{len(dead)} in the dead-letter file"))
        for name, ok, detail in results:
            print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        failed = [name for name, ok, _ in results if not ok]
        if failed:
            raise CommandFailed(f"checks failed: {', '.join(failed)}")

    return _run_store_command(check)


def cmd_demo(args: argparse.Namespace) -> int:
    """Seed a fresh database: an ``admin`` user and a public ``lobby``.

    The password is printed, and kept under ``var/demo-credentials/`` (mode 0600) so that
    ``serve`` shows it again on every ``make run``.
    """
    from app.auth import hash_password

    async def seed(store: Store, settings: Settings) -> None:
        database_url = store.dsn
        if not await store.has_users():
            password = secrets.token_urlsafe(12)
            password_hash = await asyncio.to_thread(hash_password, password)
            await store.create_user(DEMO_ADMIN, password_hash, is_admin=True)
            _save_demo_credentials(database_url, DEMO_ADMIN, password)
            # stdout and the 0600 file, never the logs.
            print(f"demo admin user: {DEMO_ADMIN} / password: {password}", flush=True)
        elif _demo_credentials(database_url) is None:
            log.warning(
                "no saved demo login for this database (users existed before, or an older "
                f"version made them); set a new password with: python -m app user "
                f"reset-password {DEMO_ADMIN} (make clean starts over)"
            )
        if await store.create_room(DEMO_ROOM):
            log.bind(topic=f"room:{DEMO_ROOM}").info("demo room created")

    return _run_store_command(seed, stream=None)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every command."""
    parser = argparse.ArgumentParser(prog="hearth", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help=cmd_serve.__doc__).set_defaults(func=cmd_serve)
    commands.add_parser("migrate", help=cmd_migrate.__doc__).set_defaults(func=cmd_migrate)
    settings = commands.add_parser(
        "settings",
        help="print the settings in effect, secrets hidden (--table: the README table)",
        description=cmd_settings.__doc__,
    )
    settings.add_argument(
        "--table", action="store_true", help="print the README table of every setting instead"
    )
    settings.set_defaults(func=cmd_settings)
    services = commands.add_parser("services", help=cmd_services.__doc__)
    services.add_argument("action", choices=["start", "stop", "clean", "cluster", "cluster-stop"])
    services.set_defaults(func=cmd_services)
    password_help = "the password (default: a line of stdin, or a prompt on a terminal)"
    user = commands.add_parser(
        "user", help="add, list users, reset a password", description=cmd_user.__doc__
    )
    user_actions = user.add_subparsers(dest="action", required=True)
    user_add = user_actions.add_parser("add", help="add a user")
    user_add.add_argument("name")
    user_add.add_argument("--password", help=password_help)
    user_add.add_argument("--admin", action="store_true", help="may manage rooms, enters all")
    user_actions.add_parser("list", help="list users: name, role, creation time")
    user_reset = user_actions.add_parser(
        "reset-password", help="set a user's password and revoke the user's tokens"
    )
    user_reset.add_argument("name")
    user_reset.add_argument("--password", help=password_help)
    user.set_defaults(func=cmd_user)
    room = commands.add_parser(
        "room", help="create, list rooms, add members", description=cmd_room.__doc__
    )
    room_actions = room.add_subparsers(dest="action", required=True)
    room_create = room_actions.add_parser("create", help="create a room")
    room_create.add_argument("name")
    room_create.add_argument("--private", action="store_true", help="members and admins only")
    room_actions.add_parser("list", help="list rooms: name, privacy, last seq, members")
    room_member = room_actions.add_parser("add-member", help="let a user into a private room")
    room_member.add_argument("room")
    room_member.add_argument("user")
    room.set_defaults(func=cmd_room)
    token = commands.add_parser(
        "token", help="issue or revoke login tokens", description=cmd_token.__doc__
    )
    token_actions = token.add_subparsers(dest="action", required=True)
    token_issue = token_actions.add_parser("issue", help="issue a token for a user; prints it")
    token_issue.add_argument("user")
    token_issue.add_argument(
        "--hours", type=float, help="lifetime (default: HEARTH_TOKEN_TTL_HOURS)"
    )
    token_revoke = token_actions.add_parser("revoke", help="revoke a token")
    token_revoke.add_argument(
        "token", nargs="?", help="the token (default: a line of stdin, or a prompt)"
    )
    token.set_defaults(func=cmd_token)
    backup = commands.add_parser(
        "backup", help="pg_dump the database to a file (backup verify FILE: check one)",
        description=cmd_backup.__doc__,
    )  # fmt: skip
    backup.add_argument(
        "--output", help=f"file to write (default: {BACKUP_DIR}/hearth-<UTC time>.dump)"
    )
    backup_actions = backup.add_subparsers(dest="action")
    backup_verify = backup_actions.add_parser(
        "verify", help="check that a backup file is readable by pg_restore"
    )
    backup_verify.add_argument("file")
    backup.set_defaults(func=cmd_backup)
    check = commands.add_parser(
        "check", help="migrations current, seqs whole, spool empty, no dead letters",
        description=cmd_check.__doc__,
    )  # fmt: skip
    check.set_defaults(func=cmd_check)
    maintenance = commands.add_parser(
        "maintenance", help="turn maintenance mode on or off (readiness 503), or show it",
        description=cmd_maintenance.__doc__,
    )  # fmt: skip
    maintenance_actions = maintenance.add_subparsers(dest="action", required=True)
    maintenance_on = maintenance_actions.add_parser("on", help="take this instance out of rotation")
    maintenance_on.add_argument("--reason", default="", help="a note shown on the dashboard")
    maintenance_actions.add_parser("off", help="put it back into rotation")
    maintenance_actions.add_parser("status", help="show whether it is on, since when and why")
    maintenance.set_defaults(func=cmd_maintenance)
    force_help = "run even though a server answers on HEARTH_PORT (it must use another spool)"
    drain = commands.add_parser(
        "drain-spool", help="store every spooled message now", description=cmd_drain_spool.__doc__
    )
    drain.add_argument("--force", action="store_true", help=force_help)
    drain.set_defaults(func=cmd_drain_spool)
    dead = commands.add_parser(
        "dead-letters", help="list or retry the spool's dead letters",
        description=cmd_dead_letters.__doc__,
    )  # fmt: skip
    dead_actions = dead.add_subparsers(dest="action", required=True)
    dead_actions.add_parser("list", help="list dead letters (safe while serving)")
    dead_retry = dead_actions.add_parser("retry", help="move every dead letter back to the spool")
    dead_retry.add_argument("--force", action="store_true", help=force_help)
    dead.set_defaults(func=cmd_dead_letters)
    commands.add_parser("demo", help=cmd_demo.__doc__).set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m app`` and the ``hearth`` script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
