"""Command line: ``python -m app serve|migrate|services|user|room|demo`` (also ``hearth``)."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import secrets
import shutil
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from app.config import Settings, unknown_variables
from app.errors import ConfigError
from app.log import get_logger, setup_logging

if TYPE_CHECKING:
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
    credentials = _demo_credentials(settings.database_url)
    if credentials is not None:
        print(f"demo login: {credentials[0]} / {credentials[1]}", flush=True)


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


def _run_store_command(work: Callable[[Store], Awaitable[None]]) -> int:
    """Run *work* on a store opened from the settings; 0, or 1 after one error line."""
    from app.store import Store

    settings = _load_settings()

    async def run() -> None:
        store = Store(settings.database_url, timeout=settings.db_timeout)
        await store.open()
        try:
            await work(store)
        finally:
            await store.close()

    try:
        asyncio.run(run())
    except Exception as exc:
        if not _log_failure(exc, settings, "ERROR"):
            raise
        return 1
    return 0


def cmd_user(args: argparse.Namespace) -> int:
    """Add a user: ``user add NAME --password PW [--admin]``."""
    from app.auth import check_password, check_username, hash_password

    async def add(store: Store) -> None:
        username = check_username(args.name)
        password_hash = await asyncio.to_thread(hash_password, check_password(args.password))
        user_id = await store.create_user(username, password_hash, is_admin=args.admin)
        log.bind(user_id=user_id, username=username, is_admin=args.admin).info("user added")

    return _run_store_command(add)


def cmd_room(args: argparse.Namespace) -> int:
    """Manage rooms: ``room create NAME [--private]``, ``room add-member ROOM USER``."""
    from app.auth import check_username
    from app.errors import Conflict
    from app.models import check_room_name

    async def create(store: Store) -> None:
        name = check_room_name(args.name)
        if not await store.create_room(name, private=args.private):
            raise Conflict(f"room {name} exists", text="room already exists")
        log.bind(topic=f"room:{name}", private=args.private).info("room created")

    async def add_member(store: Store) -> None:
        room, username = check_room_name(args.room), check_username(args.user)
        await store.add_room_member(room, username)
        log.bind(topic=f"room:{room}", member=username).info("room member added")

    return _run_store_command(create if args.action == "create" else add_member)


def cmd_demo(args: argparse.Namespace) -> int:
    """Seed a fresh database: an ``admin`` user and a public ``lobby``.

    The password is printed, and kept under ``var/demo-credentials/`` (mode 0600) so that
    ``serve`` shows it again on every ``make run``.
    """
    from app.auth import hash_password

    async def seed(store: Store) -> None:
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
                "version made them); make clean starts over"
            )
        if await store.create_room(DEMO_ROOM):
            log.bind(topic=f"room:{DEMO_ROOM}").info("demo room created")

    return _run_store_command(seed)


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
    user = commands.add_parser("user", help=cmd_user.__doc__)
    user_actions = user.add_subparsers(dest="action", required=True)
    user_add = user_actions.add_parser("add", help="add a user")
    user_add.add_argument("name")
    user_add.add_argument("--password", required=True)
    user_add.add_argument("--admin", action="store_true", help="may manage rooms, enters all")
    user.set_defaults(func=cmd_user)
    room = commands.add_parser("room", help=cmd_room.__doc__)
    room_actions = room.add_subparsers(dest="action", required=True)
    room_create = room_actions.add_parser("create", help="create a room")
    room_create.add_argument("name")
    room_create.add_argument("--private", action="store_true", help="members and admins only")
    room_member = room_actions.add_parser("add-member", help="let a user into a private room")
    room_member.add_argument("room")
    room_member.add_argument("user")
    room.set_defaults(func=cmd_room)
    commands.add_parser("demo", help=cmd_demo.__doc__).set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m app`` and the ``hearth`` script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
