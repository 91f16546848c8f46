"""The application factory: routes, middleware and the lifecycle of every resource."""

from __future__ import annotations

import time
from pathlib import Path
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from prometheus_async.aio.web import server_stats

from actors.base import Actor
from actors.db_monitor import DbMonitor
from actors.supervisor import Supervisor
from app import api, health, keys
from app.auth import Authenticator
from app.config import Settings
from app.crypto import parse_keys
from app.log import get_logger
from app.middleware import trace_middleware
from app.resilience import Backoff
from app.spool import Spool
from app.store import Store

log = get_logger("web")

#: Builds the actors an instance runs, in start order.
ActorFactory = Callable[[web.Application], list[Actor]]


def default_actors(app: web.Application) -> list[Actor]:
    """The actors every instance runs, in start order."""
    settings = app[keys.SETTINGS]
    options = {"mailbox_capacity": settings.mailbox_size, "stall_timeout": settings.stall_timeout}
    return [DbMonitor(app[keys.STORE], ping_interval=settings.db_ping_interval, **options)]


def build_store(settings: Settings) -> Store:
    """The store for *settings*, with its spool and optional cipher; does no I/O."""
    return Store(
        settings.database_url,
        spool=Spool(
            Path(settings.spool_dir) / "publish.spool",
            max_bytes=int(settings.spool_max_mb * 1024 * 1024),
        ),
        cipher=parse_keys(settings.message_key) if settings.message_key else None,
        pool_size=settings.db_pool_size,
        timeout=settings.db_timeout,
        slow_query_ms=settings.slow_query_ms,
    )


def create_app(settings: Settings, *, actors: ActorFactory = default_actors) -> web.Application:
    """Build the hearth application for *settings*; no I/O happens until it starts.

    *actors* builds the supervised actors when the app starts; tests pass their own.
    """
    app = web.Application(middlewares=[trace_middleware])
    app[keys.SETTINGS] = settings
    app[keys.DRAINING] = {"draining": False}
    app[keys.STARTED_AT] = time.monotonic()
    # The store only exists once _store_ctx ran, so the authenticator looks it up per use.
    app[keys.AUTH] = Authenticator.from_settings(lambda: app[keys.STORE], settings)
    app.add_routes(health.routes)
    app.add_routes(api.routes)
    app.router.add_get("/metrics", server_stats)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_supervisor_ctx(actors))
    app.on_shutdown.append(_begin_draining)
    return app


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    store = build_store(app[keys.SETTINGS])
    app[keys.STORE] = store
    yield
    await store.close()


def _supervisor_ctx(actors: ActorFactory):
    async def supervisor_ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[keys.SETTINGS]
        supervisor = Supervisor(
            actors(app),
            intensity=settings.restart_intensity,
            period=settings.restart_period,
            backoff=Backoff(initial=settings.restart_initial, max_delay=settings.restart_max),
            stable_after=settings.restart_stable_after,
            shutdown_timeout=settings.shutdown_timeout,
        )
        app[keys.SUPERVISOR] = supervisor
        await supervisor.start()
        log.info("supervisor started")
        yield
        await supervisor.stop()
        log.info("supervisor stopped")

    return supervisor_ctx


async def _begin_draining(app: web.Application) -> None:
    app[keys.DRAINING]["draining"] = True
    log.info("draining: readiness now reports 503")

