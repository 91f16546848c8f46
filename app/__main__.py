"""Command line: ``python -m app serve|migrate|services`` (also installed as ``hearth``)."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
from pathlib import Path

from app.config import Settings
from app.errors import ConfigError
from app.log import get_logger, setup_logging

log = get_logger("cli")

#: Where ``make run`` keeps local PostgreSQL and Redis data.
VAR_DIR = Path("var")
#: Loopback ports of the development services.
DEV_PG_PORT = 55432
DEV_REDIS_PORT = 56379


def _load_settings() -> Settings:
    setup_logging()
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        log.bind(variable=exc.variable).log("FATAL", f"invalid configuration: {exc.variable} {exc.reason}")
        sys.exit(2)
    setup_logging(
        level=settings.log_level.upper(),
        log_dir=settings.log_dir or None,
        rotation_bytes=int(settings.log_rotation_mb * 1024 * 1024),
        retention=settings.log_retention,
    )
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve HTTP and WebSocket until SIGINT or SIGTERM."""
    from aiohttp import web

    from app.web import create_app

    settings = _load_settings()
    log.bind(host=settings.host, port=settings.port).info("serving")
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        print=None,
        access_log=None,
        shutdown_timeout=settings.shutdown_timeout,
    )
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply pending migrations."""
    from app import store

    settings = _load_settings()
    try:
        applied = asyncio.run(store.migrate(settings.database_url))
    except store.MigrationFailed as exc:
        log.bind(file=exc.filename).log("FATAL", "migration failed; database left as it was")
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
    """Start, stop or wipe the local PostgreSQL and Redis used by ``make run``."""
    from app.services import ServiceError

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


def cmd_settings(args: argparse.Namespace) -> int:
    """Print the table of HEARTH_* settings that README.rst carries."""
    from app.config import settings_table

    print(settings_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every command."""
    parser = argparse.ArgumentParser(prog="hearth", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help=cmd_serve.__doc__).set_defaults(func=cmd_serve)
    commands.add_parser("migrate", help=cmd_migrate.__doc__).set_defaults(func=cmd_migrate)
    commands.add_parser("settings", help=cmd_settings.__doc__).set_defaults(func=cmd_settings)
    services = commands.add_parser("services", help=cmd_services.__doc__)
    services.add_argument("action", choices=["start", "stop", "clean"])
    services.set_defaults(func=cmd_services)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m app`` and the ``hearth`` script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
