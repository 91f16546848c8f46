"""Health: liveness and readiness for the load balancer, the database probe, and the
detailed view for admins. Each reads the one diagnostics snapshot: none queries anything,
so they answer at once even while a dependency hangs."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from actors.db_monitor import DbMonitor
from app import keys
from app.alerts import DISK_LOW
from app.api import require_admin
from app.diagnostics import Diagnostics, take_snapshot
from app.log import iso_utc

routes = web.RouteTableDef()

#: Readiness asks for a fresh ping when the last good one is older than this.
PING_FRESHNESS = 1.0


@routes.get("/health/live")
async def live(request: web.Request) -> web.Response:
    """200 while the event loop keeps up and the supervisor runs; no auth, no I/O."""
    snapshot = take_snapshot(request.app)
    body = {
        "status": "alive" if snapshot.live else "not_alive",
        "reasons": list(snapshot.live_reasons),
        "loop_lag_ms": snapshot.host.loop_lag_ms,
    }
    return web.json_response(body, status=200 if snapshot.live else 503)


def _ask_for_fresh_ping(app: web.Application) -> None:
    # A stale answer asks the monitor for a ping, so a hang shows as "unresponsive" in ~2 s.
    supervisor = app.get(keys.SUPERVISOR)
    monitor = supervisor.find("db_monitor") if supervisor is not None else None
    if isinstance(monitor, DbMonitor):
        age = monitor.last_ok_age()
        if age is None or age > PING_FRESHNESS:
            monitor.check_soon()


def _ready_checks(snapshot: Diagnostics) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    if snapshot.database is not None:
        checks["database"] = snapshot.database.state
    checks["redis"] = snapshot.redis.state
    if snapshot.redis.state != "disabled":
        checks["redis_canary"] = {
            "age_seconds": snapshot.redis.canary_age_seconds,
            "rtt_ms": snapshot.redis.canary_rtt_ms,
        }
    checks["maintenance"] = snapshot.maintenance is not None
    return checks


@routes.get("/health/ready")
async def ready(request: web.Request) -> web.Response:
    """200 when every actor runs and we are neither draining nor in maintenance, else 503
    with the reasons. A degraded database or Redis is reported but keeps it ready."""
    _ask_for_fresh_ping(request.app)
    snapshot = take_snapshot(request.app)
    body = {
        "status": "ready" if snapshot.ready else "not_ready",
        "reasons": list(snapshot.reasons),
        "checks": _ready_checks(snapshot),
        "uptime_seconds": snapshot.uptime_seconds,
    }
    return web.json_response(body, status=200 if snapshot.ready else 503)


@routes.get("/health/db")
async def database_health(request: web.Request) -> web.Response:
    """The database as the DbMonitor last saw it (seed 002's shape); 503 when unhealthy."""
    database = take_snapshot(request.app).database
    connected = database is not None and database.state == "connected"
    body = {
        "healthy": connected,
        "database": {
            "connected": connected,
            "latencyMs": database.latency_ms if database is not None else None,
            "poolSize": database.pool_size if database is not None else 0,
            "availableConnections": database.pool_free if database is not None else 0,
        },
        "timestamp": iso_utc(datetime.now(UTC)),
    }
    return web.json_response(body, status=200 if connected else 503)


@routes.get("/health")
async def detailed_health(request: web.Request) -> web.Response:
    """Admin only: every dependency with its latency, the actors, uptime, version and
    connections (seed 000 §5.3). ``status`` is ``healthy``, ``degraded`` (serving, with a
    dependency down), ``maintenance`` or ``unhealthy`` (not ready)."""
    await require_admin(request)
    snapshot = take_snapshot(request.app)
    checks: dict[str, Any] = {}
    database = snapshot.database
    if database is not None:
        checks["database"] = {
            "status": "up" if database.state == "connected" else database.state,
            "latency_ms": database.latency_ms,
            "pool": {
                "size": database.pool_size, "free": database.pool_free,
                "in_use": database.pool_in_use, "waiting": database.pool_waiting,
                "max": database.pool_max,
            },
        }  # fmt: skip
    redis = snapshot.redis
    checks["redis"] = {
        "status": "up" if redis.state == "connected" else redis.state,
        "latency_ms": redis.canary_rtt_ms,
        "canary_age_seconds": redis.canary_age_seconds,
    }
    host = snapshot.host
    checks["disk"] = {
        "status": "unknown" if host.disk_free_share is None
        else "low" if host.disk_free_share < DISK_LOW else "up",
        "free_gb": None if host.disk_free_bytes is None
        else round(host.disk_free_bytes / 1024**3, 2),
        "free_share": host.disk_free_share,
    }  # fmt: skip
    for feed in snapshot.feeds:
        checks[f"upstream:{feed.name}"] = {
            "status": "down" if feed.stale else "up",
            "breaker": feed.breaker,
            "cache_age_seconds": feed.cache_age_seconds,
        }
    body = {
        "status": snapshot.status,
        "checks": checks,
        "uptime_seconds": snapshot.uptime_seconds,
        "version": snapshot.version,
        "connections": snapshot.connections,
        "actors": [
            {
                "name": actor.name, "state": actor.state, "restarts": actor.restarts,
                "mailbox": actor.mailbox.depth, "last_error": actor.last_error,
            }
            for actor in snapshot.actors
        ],
        "alerts": [alert["name"] for alert in snapshot.as_dict()["alerts"]],
    }  # fmt: skip
    return web.json_response(body)
