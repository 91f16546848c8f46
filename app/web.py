"""The application factory: routes, middleware and the lifecycle of every resource."""

from __future__ import annotations

import asyncio
import functools
import gc
import secrets
import signal
import time
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
import redis.asyncio as aioredis
from aiohttp import WSCloseCode, web
from prometheus_async.aio.web import server_stats
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from actors.base import Actor
from actors.db_monitor import DbMonitor, RecordTransition
from actors.events import EventSubscriber
from actors.heartbeat import Heartbeat
from actors.hub import (
    Announce,
    Deliver,
    Hub,
    Registry,
    RemotePresence,
    ResyncAll,
    RoomHead,
    Shutdown,
)
from actors.redis_bridge import Outgoing, PresenceChanged, RedisBridge
from actors.room_writer import DrainTick, Outlet, RoomWriter, StopAccepting
from actors.supervisor import Supervisor
from app import admin, api, dashboard, health, keys, metrics, pages, sse, ws
from app.analytics import ErrorRecorder
from app.auth import Authenticator
from app.config import Settings
from app.crypto import parse_keys
from app.diagnostics import SNAPSHOT_COLLECTOR, Sampler, take_snapshot
from app.directory import RoomDirectory
from app.errors import MailboxFull
from app.log import get_logger, install_loop_exception_handler
from app.looplag import LoopLag
from app.maintenance import MAINTENANCE_FILE, Maintenance
from app.middleware import trace_middleware
from app.ratelimit import LOCAL_ONLY, KeyedBuckets, SharedLimiter
from app.resilience import Backoff
from app.spool import SPOOL_FILE, Spool
from app.store import Store
from app.vitals import Vitals

log = get_logger("web")

#: The Jinja2 pages (the diagnostics dashboard fills this folder).
TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
#: Builds the actors an instance runs, in start order.
ActorFactory = Callable[[web.Application], list[Actor]]


def default_actors(app: web.Application) -> list[Actor]:
    """The actors every instance runs, in start order, wired to each other.

    A publish goes session -> its room's writer -> store -> outlet -> hub; the DbMonitor
    keeps the room directory and tells everyone how PostgreSQL is doing.
    """
    settings = app[keys.SETTINGS]
    options: dict[str, Any] = {
        "mailbox_capacity": settings.mailbox_size,
        "stall_timeout": settings.stall_timeout,
    }
    store = app[keys.STORE]
    db_monitor = DbMonitor(
        store, app[keys.DIRECTORY], ping_interval=settings.db_ping_interval, **options
    )
    hub = Hub(app[keys.REGISTRY], **options)
    outlet = app[keys.OUTLET]
    outlet.subscribe(lambda messages: hub.cast(Deliver(messages)))
    writers = [
        RoomWriter(
            index, settings.room_writers, store, app[keys.SPOOL], outlet,
            database_usable=db_monitor.usable_after, ask_for_ping=db_monitor.check_soon,
            drain_interval=min(1.0, settings.db_ping_interval), **options,
        )
        for index in range(settings.room_writers)
    ]  # fmt: skip

    def on_database_state(component: str, state: str) -> None:
        _cast_or_log(hub, Announce("degraded", {"component": component, "state": state}))
        if state == "connected":
            for writer in writers:
                _cast_or_log(writer, DrainTick())

    db_monitor.listeners.append(on_database_state)
    events = EventSubscriber(
        hub,
        settings.sources(),
        open_seconds=settings.breaker_open_seconds,
        probe_seconds=settings.breaker_probe_seconds,
        disk_path=settings.spool_dir,
        loop_lag=app[keys.LOOP_LAG],
        **options,
    )
    events.listeners.append(
        lambda component, state, previous: _cast_or_log(
            db_monitor, RecordTransition(component, state, previous)
        )
    )
    heartbeat = Heartbeat(
        hub, interval=settings.heartbeat_interval, feeds=events.feed_times, **options
    )
    bridge = _redis_bridge(app, hub, options)
    return [db_monitor, hub, *writers, events, heartbeat, *([bridge] if bridge else [])]


def _redis_bridge(app: web.Application, hub: Hub, options: dict[str, Any]) -> RedisBridge | None:
    """The bridge to the other instances, wired to the outlet and the hub; None without
    Redis (local-only mode)."""
    client = app[keys.REDIS]
    if client is None:
        return None
    settings = app[keys.SETTINGS]
    registry = app[keys.REGISTRY]
    bridge = RedisBridge(
        client,
        app[keys.INSTANCE_ID],
        deliver=lambda messages: hub.cast(Deliver(messages)),
        room_head=lambda room, seq: _cast_or_log(hub, RoomHead(f"room:{room}", seq)),
        announce=lambda kind, data: _cast_or_log(hub, Announce(kind, data)),
        resync_all=lambda: _cast_or_log(hub, ResyncAll()),
        remote_presence=lambda room, change, user: _cast_or_log(
            hub, RemotePresence(f"room:{room}", change, user)
        ),
        local_presence=lambda room: sorted(registry.present.get(f"room:{room}", ())),
        local_rooms=lambda: {
            key[len("room:") :]: list(users) for key, users in registry.present.items()
        },
        timeout=settings.redis_timeout,
        canary_interval=settings.redis_canary_interval,
        presence_interval=settings.presence_refresh,
        **options,
    )
    app[keys.OUTLET].subscribe(lambda messages: _cast_or_log(bridge, Outgoing(messages)))
    hub.presence_listeners.append(
        lambda room, change, user: _cast_or_log(bridge, PresenceChanged(room, change, user))
    )
    return bridge


def _cast_or_log(actor: Actor, message: object) -> None:
    try:
        actor.cast(message)
    except MailboxFull:
        log.bind(actor=actor.name, kind=type(message).__name__).error(
            "mailbox full; message dropped"
        )


def build_store(settings: Settings) -> Store:
    """The store for *settings*, with its optional cipher; does no I/O."""
    return Store(
        settings.database_url,
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
    app[keys.WEBSOCKETS] = weakref.WeakSet()
    app[keys.EVENT_STREAMS] = weakref.WeakSet()
    app[keys.REGISTRY] = Registry()
    app[keys.DIRECTORY] = RoomDirectory(Path(settings.spool_dir) / "rooms.json")
    app[keys.OUTLET] = Outlet()
    app[keys.STATUS_TOPICS] = frozenset(source.name for source in settings.sources())
    app[keys.USER_PUBLISH_BUCKETS] = KeyedBuckets(settings.user_pub_rate, settings.user_pub_burst)
    app[keys.MAINTENANCE] = Maintenance(Path(settings.spool_dir) / MAINTENANCE_FILE)
    app[keys.ERRORS] = ErrorRecorder()
    app[keys.VITALS] = Vitals()
    app.add_routes(health.routes)
    app.add_routes(api.routes)
    app.add_routes(admin.routes)
    app.add_routes(ws.routes)
    app.add_routes(sse.routes)
    app.add_routes(pages.routes)
    app.router.add_get("/metrics", server_stats)
    app.add_subapp("/dashboard", dashboard.create_dashboard(app))
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(TEMPLATES_DIR))
    app.cleanup_ctx.append(_loop_ctx)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_redis_ctx)
    app.cleanup_ctx.append(_supervisor_ctx(actors))
    app.cleanup_ctx.append(_sampler_ctx)
    app.cleanup_ctx.append(sse.sse_ctx)
    app.on_shutdown.append(_begin_draining)
    return app


async def _loop_ctx(app: web.Application) -> AsyncIterator[None]:
    # Whatever the event loop reports (a task nobody awaited, a driver's fatal error)
    # goes through the JSON log and its redaction, never raw to stderr.
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    install_loop_exception_handler(loop)
    lag = app[keys.LOOP_LAG] = LoopLag()
    lag.start()
    yield
    lag.stop()
    loop.set_exception_handler(previous)


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    store = build_store(settings)
    app[keys.STORE] = store
    spool = Spool(
        Path(settings.spool_dir) / SPOOL_FILE,
        max_bytes=int(settings.spool_max_mb * 1024 * 1024),
    )
    app[keys.SPOOL] = spool
    # Scan the spool now, off the event loop, rather than on the first publish.
    pending = len(await spool.pending())
    if pending:
        log.bind(spool_depth=pending).warning(
            "spool holds messages from an earlier run; they drain once PostgreSQL answers"
        )
    rooms = await asyncio.to_thread(app[keys.DIRECTORY].load_snapshot)
    if rooms:
        log.bind(rooms=rooms).info("room directory seeded from its snapshot")
    recorder = app[keys.ERRORS]
    recorder.start(store)
    yield
    await recorder.stop()
    await store.close()


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    """One Redis client per instance (connecting lazily), or None in local-only mode."""
    settings = app[keys.SETTINGS]
    app[keys.INSTANCE_ID] = secrets.token_hex(6)
    if not settings.redis_url:
        app[keys.REDIS] = None
        app[keys.LIMITER] = LOCAL_ONLY
        yield
        return
    client = aioredis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
        # Fail fast, never retry: every caller has a local fallback, and a retried
        # PUBLISH could deliver twice.
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
    )
    app[keys.REDIS] = client
    # One per instance, so that an outage is noticed (and logged) once.
    app[keys.LIMITER] = SharedLimiter(client, timeout=settings.redis_timeout)
    yield
    await client.aclose()


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


async def _sampler_ctx(app: web.Application) -> AsyncIterator[None]:
    """Rates and alerts every second, and the snapshot's Prometheus families."""
    sampler = Sampler(app)
    sampler.start()
    source = SNAPSHOT_COLLECTOR.source = functools.partial(take_snapshot, app)
    yield
    if SNAPSHOT_COLLECTOR.source is source:
        SNAPSHOT_COLLECTOR.source = None
    sampler.stop()


async def _begin_draining(app: web.Application) -> None:
    await drain(app)


async def drain(app: web.Application, *, grace: float = 0.0) -> None:
    """Shutdown's first step: readiness 503 at once, then goodbye to every client.

    After *grace* seconds (time for the load balancer to notice), the room writers answer
    the publishes already in their mailboxes and refuse later ones, then the hub sends
    every client SERVER_SHUTDOWN and a 1001 close. Idempotent.
    """
    state = app[keys.DRAINING]
    if state["draining"]:
        return
    state["draining"] = True
    log.info("draining: readiness now reports 503")
    if grace:
        await asyncio.sleep(grace)
    settings = app[keys.SETTINGS]
    supervisor = app.get(keys.SUPERVISOR)
    if supervisor is not None:
        deadline = settings.shutdown_timeout / 2
        try:
            # Each writer answers publishes queued before this first: none is half done.
            for index in range(settings.room_writers):
                await supervisor.get(f"room_writer.{index}").call(StopAccepting(), deadline / 2)
            connections = await supervisor.get("hub").call(
                Shutdown(drain=deadline / 4), timeout=deadline / 4
            )
            async with asyncio.timeout(deadline / 2):
                await asyncio.gather(*(c.wait_closed() for c in connections))
        except Exception as exc:
            log.bind(error=type(exc).__name__).error("could not say goodbye to every client")
    sockets: weakref.WeakSet[web.WebSocketResponse] = app[keys.WEBSOCKETS]
    for socket in list(sockets):
        await socket.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")


async def serve(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully within the deadline."""
    app = create_app(settings)
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, shutdown_timeout=settings.shutdown_timeout / 4
    )
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.port).start()
    metrics.install_gc_timer()
    # What start-up built lives as long as the process: no collection need scan it again
    # (its garbage is collected first, or it would be kept forever). Only here, in the
    # process that serves: tests build many apps in one process.
    gc.collect()
    gc.freeze()
    log.bind(host=settings.host, port=settings.port).info("serving")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.bind(deadline=settings.shutdown_timeout).info("shutting down")
    started = time.monotonic()
    try:
        async with asyncio.timeout(settings.shutdown_timeout):
            await drain(app, grace=settings.drain_grace)
            await runner.cleanup()
    except TimeoutError:
        log.bind(deadline=settings.shutdown_timeout).error("shutdown overran its deadline; exiting")
        return
    log.bind(duration_ms=round((time.monotonic() - started) * 1000)).info("shut down cleanly")
